//! The target assignment of a group: which member should own each partition.
//!
//! Balanced per topic among the members subscribed to it (counts differ by at most one), and
//! sticky: a partition stays with its previous target owner whenever that owner is still
//! subscribed and below its share, so a membership change moves as few partitions as
//! possible. The extra partitions of a topic that does not divide evenly go to the members
//! with the fewest partitions overall, which keeps the whole group balanced across topics.
//! Deterministic (members in id order), so the same inputs give the same assignment.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A topic partition.
pub type TopicPartition = (String, u32);

/// A member's subscription, as the assignor sees it.
#[derive(Debug, Clone)]
pub struct Subscriber<'a> {
    /// Member id.
    pub id: &'a str,
    /// Subscribed topics.
    pub topics: &'a BTreeSet<String>,
}

/// Computes the target assignment. `partitions`: topic -> partition count (topics no member
/// subscribes to are ignored); `previous`: the previous target.
pub fn assign(
    subscribers: &[Subscriber<'_>],
    partitions: &BTreeMap<String, u32>,
    previous: &HashMap<TopicPartition, String>,
) -> HashMap<TopicPartition, String> {
    let mut target: HashMap<TopicPartition, String> = HashMap::new();
    let mut totals: BTreeMap<&str, usize> = subscribers.iter().map(|s| (s.id, 0)).collect();
    for (topic, &count) in partitions {
        let mut members: Vec<&str> = subscribers
            .iter()
            .filter(|s| s.topics.contains(topic))
            .map(|s| s.id)
            .collect();
        if members.is_empty() || count == 0 {
            continue;
        }
        members.sort_unstable();
        let base = count as usize / members.len();
        let mut extra = count as usize % members.len();
        let mut owned: BTreeMap<&str, Vec<u32>> =
            members.iter().map(|m| (*m, Vec::new())).collect();
        let mut free: Vec<u32> = Vec::new();
        // 1. Keep previous owners up to their base share.
        for partition in 0..count {
            let keep = previous
                .get(&(topic.clone(), partition))
                .and_then(|m| owned.get_mut(m.as_str()))
                .filter(|list| list.len() < base);
            match keep {
                Some(list) => list.push(partition),
                None => free.push(partition),
            }
        }
        // 2. Members that held more than their base keep one more while extra slots last.
        let mut still_free = Vec::new();
        for partition in free {
            let previous_owner = previous
                .get(&(topic.clone(), partition))
                .map(String::as_str)
                .filter(|m| owned.get(m).is_some_and(|list| list.len() == base));
            match previous_owner {
                Some(member) if extra > 0 => {
                    if let Some(list) = owned.get_mut(member) {
                        list.push(partition);
                    }
                    extra -= 1;
                }
                _ => still_free.push(partition),
            }
        }
        // 3. The rest to the members below their share, fewest partitions overall first.
        for partition in still_free {
            let pick = members
                .iter()
                .filter(|m| {
                    let n = owned[*m].len();
                    n < base || (n == base && extra > 0)
                })
                .min_by_key(|m| (owned[*m].len(), totals[*m], **m))
                .copied();
            let Some(member) = pick else { continue };
            if let Some(list) = owned.get_mut(member) {
                if list.len() == base {
                    extra -= 1;
                }
                list.push(partition);
            }
        }
        for (member, list) in owned {
            if let Some(total) = totals.get_mut(member) {
                *total += list.len();
            }
            for partition in list {
                target.insert((topic.clone(), partition), member.to_string());
            }
        }
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subs(ids: &[&str], topics: &BTreeSet<String>) -> Vec<(String, BTreeSet<String>)> {
        ids.iter()
            .map(|id| (id.to_string(), topics.clone()))
            .collect()
    }

    fn run(
        members: &[(String, BTreeSet<String>)],
        partitions: &BTreeMap<String, u32>,
        previous: &HashMap<TopicPartition, String>,
    ) -> HashMap<TopicPartition, String> {
        let subscribers: Vec<Subscriber<'_>> = members
            .iter()
            .map(|(id, topics)| Subscriber { id, topics })
            .collect();
        assign(&subscribers, partitions, previous)
    }

    fn counts(target: &HashMap<TopicPartition, String>) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for member in target.values() {
            *out.entry(member.clone()).or_default() += 1;
        }
        out
    }

    #[test]
    fn given_three_members_and_twelve_partitions_should_give_four_each() {
        let topics = BTreeSet::from(["t".to_string()]);
        let partitions = BTreeMap::from([("t".to_string(), 12)]);
        let target = run(
            &subs(&["a", "b", "c"], &topics),
            &partitions,
            &HashMap::new(),
        );
        assert_eq!(target.len(), 12);
        assert!(counts(&target).values().all(|n| *n == 4));
    }

    #[test]
    fn given_a_fourth_member_should_move_only_what_it_needs() {
        let topics = BTreeSet::from(["t".to_string()]);
        let partitions = BTreeMap::from([("t".to_string(), 64)]);
        let before = run(
            &subs(&["a", "b", "c"], &topics),
            &partitions,
            &HashMap::new(),
        );
        let after = run(&subs(&["a", "b", "c", "d"], &topics), &partitions, &before);
        let moved = before
            .iter()
            .filter(|(p, m)| after.get(*p) != Some(*m))
            .count();
        assert_eq!(moved, 16, "exactly the new member's share moves");
        assert!(counts(&after).values().all(|n| *n == 16));
    }

    #[test]
    fn given_a_member_gone_should_move_only_its_partitions() {
        let topics = BTreeSet::from(["t".to_string()]);
        let partitions = BTreeMap::from([("t".to_string(), 12)]);
        let before = run(
            &subs(&["a", "b", "c"], &topics),
            &partitions,
            &HashMap::new(),
        );
        let after = run(&subs(&["a", "c"], &topics), &partitions, &before);
        for (partition, member) in &before {
            if member != "b" {
                assert_eq!(after.get(partition), Some(member), "{partition:?} stays");
            }
        }
        assert!(counts(&after).values().all(|n| *n == 6));
    }

    proptest! {
        #[test]
        fn given_any_groups_assignment_should_be_complete_balanced_and_sticky(
            members in proptest::collection::btree_set("[a-f]", 1..6),
            counts_per_topic in proptest::collection::vec(0u32..20, 1..4),
            subscriptions in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 4), 6),
            churn in proptest::collection::btree_set("[a-h]", 1..6),
        ) {
            let partitions: BTreeMap<String, u32> = counts_per_topic
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("t{i}"), *n))
                .collect();
            let make = |ids: &BTreeSet<String>| -> Vec<(String, BTreeSet<String>)> {
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let topics = partitions
                            .keys()
                            .enumerate()
                            .filter(|(t, _)| subscriptions[i % 6][*t % 4] || *t == 0)
                            .map(|(_, name)| name.clone())
                            .collect();
                        (id.clone(), topics)
                    })
                    .collect()
            };
            for (ids, previous) in [(members.clone(), HashMap::new())] {
                let first_members = make(&ids);
                let first = run(&first_members, &partitions, &previous);
                let second_members = make(&churn);
                let second = run(&second_members, &partitions, &first);
                for (members, target) in [(&first_members, &first), (&second_members, &second)] {
                    for (topic, count) in &partitions {
                        let subscribed: Vec<&String> = members
                            .iter()
                            .filter(|(_, t)| t.contains(topic))
                            .map(|(id, _)| id)
                            .collect();
                        let mut per_member: BTreeMap<&String, usize> =
                            subscribed.iter().map(|m| (*m, 0)).collect();
                        for partition in 0..*count {
                            let owner = target.get(&(topic.clone(), partition));
                            if subscribed.is_empty() {
                                prop_assert!(owner.is_none());
                                continue;
                            }
                            let owner = owner.expect("every partition of a subscribed topic is assigned");
                            let slot = per_member.get_mut(owner);
                            prop_assert!(slot.is_some(), "owner {} is subscribed to {}", owner, topic);
                            if let Some(slot) = slot { *slot += 1; }
                        }
                        if let (Some(min), Some(max)) = (per_member.values().min(), per_member.values().max()) {
                            prop_assert!(max - min <= 1, "balanced: {:?}", per_member);
                        }
                    }
                }
                // Sticky: a partition whose owner stayed subscribed and whose count did not
                // exceed the new share keeps its owner, so at most the moved share changes.
                for (partition, owner) in &first {
                    if let Some(new_owner) = second.get(partition) {
                        if new_owner != owner {
                            let owner_still_there = second_members
                                .iter()
                                .any(|(id, t)| id == owner && t.contains(&partition.0));
                            if owner_still_there {
                                let kept = second
                                    .iter()
                                    .filter(|(p, m)| p.0 == partition.0 && *m == owner)
                                    .count();
                                let subscribed = second_members.iter().filter(|(_, t)| t.contains(&partition.0)).count();
                                let count = partitions[&partition.0] as usize;
                                prop_assert!(kept >= count / subscribed, "an owner below its share lost {:?}", partition);
                            }
                        }
                    }
                }
            }
        }
    }
}
