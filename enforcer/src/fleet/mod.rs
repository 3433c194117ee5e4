//! A fleet of hosts sharing state through etcd v3 (DESIGN §12), as Cilium's kvstore mode does:
//! each controller publishes its host's endpoints and its own status under keys bound to a
//! lease it keeps alive, and watches everyone else's. Hosts agree on identities without etcd
//! (declared, or hashed from the name): what etcd carries is which addresses are which
//! service's right now, and optionally the policy itself.
//!
//! Keys, under [`PREFIX`]: `endpoints/<node>/<address>` ([`PublishedEndpoint`]),
//! `nodes/<node>` ([`NodeStatus`]), `policy` (the policy text, see `fleet push`).
//!
//! Fail static: when etcd cannot be reached the controller keeps enforcing what it last knew
//! (the remote endpoints stay in its address table, nothing is opened), says so, and on
//! reconnection resumes watching from the revision it had; only a compacted revision makes it
//! list everything again. Leases outlive a controller restart or a short partition (see
//! [`LEASE_TTL`]), and a restarted controller starts from the fleet view it kept beside its
//! pins, so neither causes a denial between hosts.

pub mod client;
pub mod session;
pub mod view;

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Every key enforcer writes is under this prefix.
pub const PREFIX: &str = "/enforcer/v1/";
/// The policy's key for `fleet push` and `--policy etcd:` without a key of its own.
pub const POLICY_KEY: &str = "/enforcer/v1/policy";

/// The name a policy read from etcd key `key` goes by (in diagnostics, and in its hash, which
/// every host and `fleet status` compute alike).
pub fn policy_source_name(key: &str) -> PathBuf {
    PathBuf::from(format!("etcd:{key}"))
}

/// How long a controller's keys outlive its last keep-alive: a restart or a partition shorter
/// than this changes nothing for the other hosts; a host gone longer is forgotten.
pub const LEASE_TTL_SECS: i64 = 30;

pub fn endpoints_prefix() -> String {
    format!("{PREFIX}endpoints/")
}

pub fn endpoint_key(node: &str, address: IpAddr) -> String {
    format!("{PREFIX}endpoints/{node}/{address}")
}

pub fn nodes_prefix() -> String {
    format!("{PREFIX}nodes/")
}

pub fn node_key(node: &str) -> String {
    format!("{PREFIX}nodes/{node}")
}

/// An endpoint of one host, as it publishes it (one key per address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedEndpoint {
    pub service: String,
    pub identity: u32,
    pub addresses: Vec<IpAddr>,
    pub interface: String,
}

/// What a controller says of itself under `nodes/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub policy_sha256: String,
    pub generation: u32,
    /// Program tags of this build, by program.
    pub programs: std::collections::BTreeMap<String, String>,
    /// Seconds since the epoch when this status was written.
    pub time: u64,
    /// Seconds between rewrites: a status older than a few of these is a silent node.
    pub interval_secs: u64,
    /// Whether this controller is connected to etcd (always true when read from etcd, but
    /// kept for the heartbeat).
    pub kvstore_connected: bool,
}

/// An address another host says is one of its endpoints, as the compiler places it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    pub node: String,
    pub service: String,
    pub address: IpAddr,
}

/// How to reach etcd (`run --kvstore`, `fleet --kvstore`).
#[derive(Clone, Debug)]
pub struct KvstoreOptions {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// This host's name in the fleet: `--node`, else the hostname.
pub fn default_node_name() -> String {
    crate::outputs::alert::hostname()
}
