use proptest::prelude::*;

use super::*;

fn acl(principal: &str, effect: Effect, operation: Operation, resource: Pattern) -> Acl {
    Acl {
        principal: principal.into(),
        effect,
        operation,
        resource,
    }
}

fn topic(name: &str) -> Pattern {
    Pattern {
        kind: ResourceKind::Topic,
        name: name.into(),
        prefix: false,
    }
}

fn topic_prefix(name: &str) -> Pattern {
    Pattern {
        kind: ResourceKind::Topic,
        name: name.into(),
        prefix: true,
    }
}

fn set(acls: &[Acl]) -> AclSet {
    let mut set = AclSet::default();
    set.add(acls).expect("valid ACLs");
    set
}

#[test]
fn nothing_is_allowed_without_a_binding() {
    let set = AclSet::default();
    assert_eq!(
        set.decide("alice", Operation::Read, &Resource::topic("orders")),
        Decision::NotAllowed
    );
}

#[test]
fn a_literal_binding_covers_its_name_only() {
    let set = set(&[acl(
        "alice",
        Effect::Allow,
        Operation::Read,
        topic("orders"),
    )]);
    assert_eq!(
        set.decide("alice", Operation::Read, &Resource::topic("orders")),
        Decision::Allowed
    );
    assert_eq!(
        set.decide("alice", Operation::Read, &Resource::topic("orders2")),
        Decision::NotAllowed
    );
    assert_eq!(
        set.decide("bob", Operation::Read, &Resource::topic("orders")),
        Decision::NotAllowed
    );
    assert_eq!(
        set.decide("alice", Operation::Write, &Resource::topic("orders")),
        Decision::NotAllowed
    );
    assert_eq!(
        set.decide("alice", Operation::Read, &Resource::group("orders")),
        Decision::NotAllowed,
        "a topic binding says nothing of a group of the same name"
    );
}

#[test]
fn a_prefix_binding_covers_names_that_start_with_it() {
    let set = set(&[acl(
        "*",
        Effect::Allow,
        Operation::Write,
        topic_prefix("tenant-a."),
    )]);
    assert_eq!(
        set.decide(
            "anyone",
            Operation::Write,
            &Resource::topic("tenant-a.orders")
        ),
        Decision::Allowed
    );
    assert_eq!(
        set.decide(
            "anyone",
            Operation::Write,
            &Resource::topic("tenant-b.orders")
        ),
        Decision::NotAllowed
    );
}

#[test]
fn deny_wins_over_allow() {
    let set = set(&[
        acl("*", Effect::Allow, Operation::Read, topic_prefix("")),
        acl("mallory", Effect::Deny, Operation::Read, topic("payroll")),
    ]);
    assert_eq!(
        set.decide("mallory", Operation::Read, &Resource::topic("payroll")),
        Decision::Denied
    );
    assert_eq!(
        set.decide("mallory", Operation::Read, &Resource::topic("orders")),
        Decision::Allowed
    );
    assert_eq!(
        set.decide("alice", Operation::Read, &Resource::topic("payroll")),
        Decision::Allowed
    );
}

#[test]
fn read_and_write_imply_describe_but_a_deny_of_read_denies_only_read() {
    let set = set(&[
        acl("alice", Effect::Allow, Operation::Write, topic("orders")),
        acl("alice", Effect::Deny, Operation::Read, topic("orders")),
        acl(
            "alice",
            Effect::Allow,
            Operation::GroupRead,
            Pattern {
                kind: ResourceKind::Group,
                name: "g".into(),
                prefix: false,
            },
        ),
    ]);
    assert_eq!(
        set.decide("alice", Operation::Describe, &Resource::topic("orders")),
        Decision::Allowed
    );
    assert_eq!(
        set.decide("alice", Operation::Describe, &Resource::group("g")),
        Decision::Allowed
    );
    assert_eq!(
        set.decide("alice", Operation::Read, &Resource::topic("orders")),
        Decision::Denied
    );
}

#[test]
fn bad_bindings_are_refused_with_what_to_use() {
    let cluster_read = acl(
        "alice",
        Effect::Allow,
        Operation::Read,
        Pattern {
            kind: ResourceKind::Cluster,
            name: String::new(),
            prefix: false,
        },
    );
    let error = AclSet::default()
        .add(&[cluster_read])
        .expect_err("read on the cluster");
    assert!(error.0.contains("cluster-admin"), "{error}");
    let no_name = acl("alice", Effect::Allow, Operation::Read, topic(""));
    assert!(AclSet::default().add(&[no_name]).is_err());
    let no_principal = acl("", Effect::Allow, Operation::Read, topic("t"));
    assert!(AclSet::default().add(&[no_principal]).is_err());
    assert!(Operation::parse("reed")
        .expect_err("a typo")
        .0
        .contains("group-read"));
}

#[test]
fn adding_is_idempotent_and_removing_counts() {
    let binding = acl("alice", Effect::Allow, Operation::Read, topic("orders"));
    let mut set = AclSet::default();
    assert_eq!(set.add(&[binding.clone(), binding.clone()]).ok(), Some(1));
    assert_eq!(set.add(std::slice::from_ref(&binding)).ok(), Some(0));
    assert_eq!(set.len(), 1);
    assert_eq!(set.remove(std::slice::from_ref(&binding)), 1);
    assert_eq!(set.remove(&[binding]), 0);
    assert!(set.is_empty());
}

fn arb_acl() -> impl Strategy<Value = Acl> {
    let principal = prop_oneof![Just("*"), Just("alice"), Just("bob")];
    let effect = prop_oneof![Just(Effect::Allow), Just(Effect::Deny)];
    let pattern = (
        prop_oneof![Just(ResourceKind::Topic), Just(ResourceKind::Group)],
        prop_oneof![Just(""), Just("a"), Just("ab"), Just("b")],
        any::<bool>(),
    )
        .prop_map(|(kind, name, prefix)| Pattern {
            kind,
            name: name.into(),
            prefix: prefix || name.is_empty(),
        });
    (principal, effect, pattern, 0usize..6).prop_map(|(principal, effect, resource, op)| {
        let operation = resource.kind.operations()[op % resource.kind.operations().len()];
        acl(principal, effect, operation, resource)
    })
}

/// The decision as the module doc states it, written plainly over the list.
fn model(acls: &[Acl], principal: &str, operation: Operation, resource: &Resource<'_>) -> Decision {
    let relevant: Vec<&Acl> = acls
        .iter()
        .filter(|a| a.principal == principal || a.principal == "*")
        .filter(|a| a.resource.kind == resource.kind)
        .filter(|a| {
            if a.resource.prefix {
                resource.name.starts_with(a.resource.name.as_str())
            } else {
                resource.name == a.resource.name
            }
        })
        .collect();
    if relevant
        .iter()
        .any(|a| a.effect == Effect::Deny && a.operation == operation)
    {
        return Decision::Denied;
    }
    let implied = |granted: Operation| {
        granted == operation
            || (operation == Operation::Describe
                && granted != Operation::Describe
                && granted != Operation::ClusterAdmin)
    };
    if relevant
        .iter()
        .any(|a| a.effect == Effect::Allow && implied(a.operation))
    {
        Decision::Allowed
    } else {
        Decision::NotAllowed
    }
}

proptest! {
    #[test]
    fn decisions_follow_the_model(
        acls in proptest::collection::vec(arb_acl(), 0..12),
        principal in prop_oneof![Just("alice"), Just("bob"), Just("carol")],
        group in any::<bool>(),
        name in prop_oneof![Just("a"), Just("ab"), Just("abc"), Just("b")],
        op in 0usize..6,
    ) {
        let mut set = AclSet::default();
        set.add(&acls).expect("generated ACLs are valid");
        let resource = if group { Resource::group(name) } else { Resource::topic(name) };
        let operation = resource.kind.operations()[op % resource.kind.operations().len()];
        prop_assert_eq!(
            set.decide(principal, operation, &resource),
            model(&acls, principal, operation, &resource)
        );
        // A deny of exactly this always wins; removing it restores the decision.
        let before = set.decide(principal, operation, &resource);
        let deny = acl(principal, Effect::Deny, operation, Pattern {
            kind: resource.kind,
            name: name.into(),
            prefix: false,
        });
        let added = set.add(std::slice::from_ref(&deny)).expect("valid") == 1;
        prop_assert_eq!(set.decide(principal, operation, &resource), Decision::Denied);
        if added {
            set.remove(&[deny]);
            prop_assert_eq!(set.decide(principal, operation, &resource), before);
        }
    }
}
