//! `syncline group list|describe|reset-offsets`: consumer-group administration.
//!
//! Output contracts (also in each command's help):
//! - `list`: one group name per line, sorted; `--long`: a table `GROUP MEMBERS STATE`.
//! - `describe G`: header lines `group: G`, `state: S`, `epoch: E`, `members: N`, a blank
//!   line, the table `TOPIC PARTITION MEMBER COMMITTED END LAG` (`-` for no owner or no commit),
//!   a blank line, and the table `MEMBER CLIENT EPOCH PARTITIONS LAST-HEARTBEAT` (partitions as
//!   `topic/p,topic/q`, `-` for none; the heartbeat as `N ms ago`). Without members the second
//!   table is left out.
//! - `reset-offsets`: the table `TOPIC PARTITION NEW-OFFSET`.

use std::io::{self, Write};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use syncline_client::{Client, Code, OffsetCommit, OffsetQuery, TopicPartition};

use crate::output::table;

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups, one name per line (sorted).
    List {
        /// Print a table with the number of members and the state instead of names only.
        #[arg(long, short)]
        long: bool,
    },
    /// Show a group's state, per partition its owner, committed offset, end offset and lag,
    /// and its members.
    #[command(after_help = "\
Output: the lines `group: G`, `state: S` (empty, assigning, reconciling or stable), `epoch: E` \
and `members: N`; a blank line; the table TOPIC PARTITION MEMBER COMMITTED END LAG (MEMBER and \
COMMITTED are `-` when the partition has no owner or no commit; LAG = END - COMMITTED, or END - \
log start without a commit); then, if the group has members, a blank line and the table \
MEMBER CLIENT EPOCH PARTITIONS LAST-HEARTBEAT.")]
    Describe {
        /// The group.
        group: String,
    },
    /// Set a group's committed offsets of a topic (all partitions, or one) to the earliest or
    /// latest offset or to a given offset. Refused while the group has members: stop them
    /// first.
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "\
Prints the table TOPIC PARTITION NEW-OFFSET. The group's members (there must be none) read on \
from these offsets when they next start.")]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_offset"])))]
pub struct ResetArgs {
    /// The group.
    group: String,
    /// The topic whose offsets to set.
    #[arg(long, value_name = "TOPIC")]
    topic: String,
    /// Only this partition (default: every partition of the topic).
    #[arg(long, value_name = "P")]
    partition: Option<u32>,
    /// To the first retained offset: everything is read again.
    #[arg(long)]
    to_earliest: bool,
    /// To the latest (durable) offset: nothing already written is read.
    #[arg(long)]
    to_latest: bool,
    /// To offset N (must be within the partition's log: from its start to its latest offset).
    #[arg(long, value_name = "N")]
    to_offset: Option<u64>,
}

pub async fn run(client: &Client, command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::List { long } => list(client, long).await,
        GroupCommand::Describe { group } => describe(client, &group).await,
        GroupCommand::ResetOffsets(args) => reset_offsets(client, args).await,
    }
}

async fn list(client: &Client, long: bool) -> anyhow::Result<()> {
    let groups = client.list_groups().await?;
    let mut stdout = io::stdout().lock();
    if long {
        let mut rows = vec![["GROUP", "MEMBERS", "STATE"].map(str::to_owned).to_vec()];
        rows.extend(groups.iter().map(|group| {
            vec![
                group.group.clone(),
                group.members.to_string(),
                group.state.clone(),
            ]
        }));
        stdout.write_all(table(&rows).as_bytes())?;
    } else {
        for group in groups {
            writeln!(stdout, "{}", group.group)?;
        }
    }
    stdout.flush()?;
    Ok(())
}

fn partition_list(partitions: &[TopicPartition]) -> String {
    if partitions.is_empty() {
        return "-".to_owned();
    }
    partitions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

async fn describe(client: &Client, group: &str) -> anyhow::Result<()> {
    let description = client.describe_group(group).await?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "group: {}", description.group)?;
    writeln!(stdout, "state: {}", description.state)?;
    writeln!(stdout, "epoch: {}", description.group_epoch)?;
    writeln!(stdout, "members: {}", description.members.len())?;
    writeln!(stdout)?;
    let mut rows = vec![["TOPIC", "PARTITION", "MEMBER", "COMMITTED", "END", "LAG"]
        .map(str::to_owned)
        .to_vec()];
    for partition in &description.partitions {
        rows.push(vec![
            partition.topic.clone(),
            partition.partition.to_string(),
            partition.owner.clone().unwrap_or_else(|| "-".to_owned()),
            partition
                .committed_offset
                .map_or_else(|| "-".to_owned(), |offset| offset.to_string()),
            partition.end_offset.to_string(),
            partition.lag.to_string(),
        ]);
    }
    stdout.write_all(table(&rows).as_bytes())?;
    if !description.members.is_empty() {
        writeln!(stdout)?;
        let mut rows = vec![
            ["MEMBER", "CLIENT", "EPOCH", "PARTITIONS", "LAST-HEARTBEAT"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for member in &description.members {
            rows.push(vec![
                member.member_id.clone(),
                member.client_id.clone(),
                member.member_epoch.to_string(),
                partition_list(&member.assignment),
                format!("{} ms ago", member.last_heartbeat_ms_ago),
            ]);
        }
        stdout.write_all(table(&rows).as_bytes())?;
    }
    stdout.flush()?;
    Ok(())
}

async fn reset_offsets(client: &Client, args: ResetArgs) -> anyhow::Result<()> {
    match client.describe_group(&args.group).await {
        Ok(description) if !description.members.is_empty() => bail!(
            "group {} has {} member(s); stop them before resetting its offsets",
            args.group,
            description.members.len()
        ),
        Ok(_) => {}
        // A group nobody has used yet: nothing to check.
        Err(error) if error.code() == Some(Code::NotFound) => {}
        Err(error) => return Err(error.into()),
    }
    let topic = client.describe_topic(&args.topic).await?;
    let partitions: Vec<u32> = match args.partition {
        Some(partition) if partition >= topic.partition_count() => bail!(
            "topic `{}` has no partition {partition} (it has {})",
            args.topic,
            topic.partition_count()
        ),
        Some(partition) => vec![partition],
        None => (0..topic.partition_count()).collect(),
    };
    let mut offsets = Vec::new();
    for partition in partitions {
        let offset = if args.to_earliest {
            client
                .list_offsets(&args.topic, partition, OffsetQuery::Earliest)
                .await?
                .offset
        } else if args.to_latest {
            client
                .list_offsets(&args.topic, partition, OffsetQuery::Latest)
                .await?
                .offset
        } else {
            let offset = args.to_offset.context("no target offset given")?;
            let earliest = client
                .list_offsets(&args.topic, partition, OffsetQuery::Earliest)
                .await?
                .offset;
            let latest = client
                .list_offsets(&args.topic, partition, OffsetQuery::Latest)
                .await?
                .offset;
            if !(earliest..=latest).contains(&offset) {
                bail!(
                    "offset {offset} is outside partition {partition} of {} ([{earliest}, {latest}])",
                    args.topic
                );
            }
            offset
        };
        offsets.push(OffsetCommit::new(args.topic.clone(), partition, offset));
    }
    for chunk in offsets.chunks(syncline_client::OFFSETS_PER_REQUEST_MAX) {
        client.commit_offsets(&args.group, chunk).await?;
    }
    let mut rows = vec![["TOPIC", "PARTITION", "NEW-OFFSET"]
        .map(str::to_owned)
        .to_vec()];
    for offset in &offsets {
        rows.push(vec![
            offset.topic.clone(),
            offset.partition.to_string(),
            offset.offset.to_string(),
        ]);
    }
    let mut stdout = io::stdout().lock();
    stdout.write_all(table(&rows).as_bytes())?;
    stdout.flush()?;
    Ok(())
}
