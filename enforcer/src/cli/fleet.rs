//! `enforcer fleet push|status` (DESIGN §12): the policy in etcd, and what every host says it
//! enforces.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use clap::Subcommand;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::{Failure, load_offline, run::KvstoreArgs};
use crate::{
    fleet::{self, NodeStatus, POLICY_KEY, client::connect},
    policy,
};

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Validate a policy file here, then write it to etcd for every host (only if the key
    /// still holds what was read: a compare-and-swap on its revision).
    Push {
        /// One policy file.
        file: PathBuf,
        /// The key the hosts' `--policy etcd:KEY` follows.
        #[arg(long, default_value = POLICY_KEY)]
        key: String,
        #[command(flatten)]
        kvstore: KvstoreArgs,
    },
    /// Every host in the fleet: the policy it enforces, its generation, and who lags or is
    /// silent; exits 1 when the fleet disagrees.
    Status {
        #[arg(long, default_value = POLICY_KEY)]
        key: String,
        #[command(flatten)]
        kvstore: KvstoreArgs,
    },
}

pub fn execute(command: FleetCommand) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure::Runtime(format!("starting the async runtime: {error}")))?;
    match command {
        FleetCommand::Push { file, key, kvstore } => runtime.block_on(push(&file, &key, &kvstore)),
        FleetCommand::Status { key, kvstore } => runtime.block_on(status(&key, &kvstore)),
    }
}

fn options(kvstore: &KvstoreArgs) -> Result<fleet::KvstoreOptions, Failure> {
    kvstore
        .options()
        .ok_or_else(|| Failure::BadInput("--kvstore is needed".to_owned()))
}

fn etcd_failure(error: impl std::fmt::Display) -> Failure {
    Failure::Runtime(format!("etcd: {error}"))
}

/// The policy's hash as a host reading `key` computes it.
fn hash_as_hosts_see_it(key: &str, text: &str) -> Result<String, Failure> {
    let policy = policy::parse_sources(vec![(
        crate::fleet::policy_source_name(key),
        text.to_owned(),
    )])
    .map_err(|error| Failure::BadInput(error.to_string()))?;
    Ok(hex::encode(policy.hash))
}

async fn push(file: &Path, key: &str, kvstore: &KvstoreArgs) -> Result<(), Failure> {
    if file.is_dir() {
        return Err(Failure::BadInput(format!(
            "{} is a directory; fleet push takes one policy file",
            file.display()
        )));
    }
    load_offline(file)?;
    let text = std::fs::read_to_string(file)
        .map_err(|error| Failure::BadInput(format!("reading {}: {error}", file.display())))?;
    let hash = hash_as_hosts_see_it(key, &text)?;
    let mut client = connect(&options(kvstore)?).await.map_err(etcd_failure)?;
    let current = client.get(key, None).await.map_err(etcd_failure)?;
    let (revision, unchanged) = current.kvs().first().map_or((0, false), |kv| {
        (kv.mod_revision(), kv.value() == text.as_bytes())
    });
    if unchanged {
        println!("{key} already holds this policy (sha256 {hash}); nothing written");
        return Ok(());
    }
    let swap = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
        .and_then([TxnOp::put(key, text.as_bytes(), None)]);
    let result = client.txn(swap).await.map_err(etcd_failure)?;
    if !result.succeeded() {
        return Err(Failure::Runtime(format!(
            "{key} changed while this push validated (it was at revision {revision}); nothing written, push again"
        )));
    }
    let written = result.header().map_or(0, |header| header.revision());
    println!(
        "pushed {} to {key} at revision {written}: sha256 {hash}",
        file.display()
    );
    Ok(())
}

/// A node's line in `fleet status`.
struct NodeLine {
    node: String,
    status: NodeStatus,
    state: &'static str,
}

async fn status(key: &str, kvstore: &KvstoreArgs) -> Result<(), Failure> {
    let mut client = connect(&options(kvstore)?).await.map_err(etcd_failure)?;
    // A policy in etcd that does not load is what no host enforces: said, and no reference.
    let held = client.get(key, None).await.map_err(etcd_failure)?;
    let (expected, invalid) = match held.kvs().first() {
        Some(kv) => match hash_as_hosts_see_it(key, &String::from_utf8_lossy(kv.value())) {
            Ok(hash) => (Some(hash), None),
            Err(Failure::BadInput(error) | Failure::Runtime(error)) => (None, Some(error)),
        },
        None => (None, None),
    };
    let listing = client
        .get(fleet::nodes_prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd_failure)?;
    let nodes: Vec<(String, NodeStatus)> = listing
        .kvs()
        .iter()
        .filter_map(|kv| {
            let node = kv
                .key_str()
                .ok()?
                .strip_prefix(&fleet::nodes_prefix())?
                .to_owned();
            Some((node, serde_json::from_slice(kv.value()).ok()?))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |now| now.as_secs());
    let lines = judge(nodes, expected.as_deref(), now);
    if let Some(error) = &invalid {
        println!(
            "the policy in etcd at {key} is INVALID; every host keeps the one before:\n{error}"
        );
    }
    print!("{}", render(&lines, expected.as_deref(), now));
    if invalid.is_some() || lines.is_empty() || lines.iter().any(|line| line.state != "ok") {
        return Err(Failure::BadInput(
            "the fleet does not agree (or no node reports)".to_owned(),
        ));
    }
    Ok(())
}

/// Each node's state: `silent` when its status is older than three of its intervals, `lags`
/// when it enforces another policy than etcd holds (or, without one there, than most nodes).
fn judge(nodes: Vec<(String, NodeStatus)>, expected: Option<&str>, now: u64) -> Vec<NodeLine> {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, status) in &nodes {
        *counts.entry(status.policy_sha256.as_str()).or_default() += 1;
    }
    let majority = counts
        .iter()
        .max_by_key(|(_, count)| **count)
        .map(|(hash, _)| (*hash).to_owned());
    let reference = expected.map(str::to_owned).or(majority);
    nodes
        .into_iter()
        .map(|(node, status)| {
            let silent = now.saturating_sub(status.time) > 3 * status.interval_secs.max(1);
            let lags = reference
                .as_deref()
                .is_some_and(|reference| reference != status.policy_sha256);
            let state = if silent {
                "silent"
            } else if lags {
                "lags"
            } else {
                "ok"
            };
            NodeLine {
                node,
                status,
                state,
            }
        })
        .collect()
}

fn render(lines: &[NodeLine], expected: Option<&str>, now: u64) -> String {
    let mut out = String::new();
    match expected {
        Some(hash) => {
            let _ = writeln!(out, "policy in etcd: sha256 {hash}");
        }
        None => {
            let _ = writeln!(
                out,
                "no valid policy in etcd: nodes are compared with each other"
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<20} {:<16} {:>10} {:>8}  state",
        "node", "policy", "generation", "age"
    );
    for line in lines {
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:>10} {:>7}s  {}",
            line.node,
            &line.status.policy_sha256[..line.status.policy_sha256.len().min(16)],
            line.status.generation,
            now.saturating_sub(line.status.time),
            line.state
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(hash: &str, time: u64) -> NodeStatus {
        NodeStatus {
            policy_sha256: hash.repeat(32),
            generation: 3,
            programs: Default::default(),
            time,
            interval_secs: 10,
            kvstore_connected: true,
        }
    }

    #[test]
    fn a_node_on_another_policy_lags_and_one_without_news_is_silent() {
        let nodes = vec![
            ("a".to_owned(), status("aa", 1000)),
            ("b".to_owned(), status("aa", 995)),
            ("c".to_owned(), status("bb", 1000)),
            ("d".to_owned(), status("aa", 900)),
        ];
        let states: Vec<&str> = judge(nodes.clone(), None, 1000)
            .iter()
            .map(|line| line.state)
            .collect();
        assert_eq!(states, ["ok", "ok", "lags", "silent"]);
        let expected = "bb".repeat(32);
        let states: Vec<&str> = judge(nodes, Some(&expected), 1000)
            .iter()
            .map(|line| line.state)
            .collect();
        assert_eq!(
            states,
            ["lags", "lags", "ok", "silent"],
            "etcd's policy is the reference"
        );
        let text = render(
            &judge(vec![("a".to_owned(), status("aa", 990))], None, 1000),
            None,
            1000,
        );
        assert!(
            text.contains("a                    aaaaaaaaaaaaaaaa          3      10s  ok"),
            "{text}"
        );
    }
}
