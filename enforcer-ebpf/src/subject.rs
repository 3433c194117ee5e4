//! The packet being judged, and what the steps of the verdict have learnt about it: the type
//! every step shares.

use enforcer_common::{
    config::{PolicyConfig, flags as config_flags},
    identity::IdentityInfo,
    policy::RuleVerdict,
};

use crate::{conntrack::FlowKey, identity::AddressTables, packet::Packet, report::Outcome};

/// The packet being judged and what is known about it so far. It lives in the per-CPU
/// [`crate::maps::SCRATCH`] map, not on the stack: the verifier allows 512 bytes of stack across all nested
/// calls, and the subject alone would take a third of that.
#[repr(C)]
pub struct Subject {
    pub packet: Packet,
    pub outcome: Outcome,
    pub src: IdentityInfo,
    pub dst: IdentityInfo,
    /// The rule that decides the packet as a new flow's (see `verdict::decide`).
    pub decision: RuleVerdict,
    /// Conntrack key of the packet's flow, and whether the packet's source is its `lo` end.
    pub key: FlowKey,
    /// Conntrack key of the flow an ICMP error quotes (see `flow::icmp_error_relation`).
    pub quoted_key: FlowKey,
    pub from_lo: u8,
    /// The generation's address tables (their slot is every policy table's).
    pub tables: AddressTables,
    pub global_audit: u8,
    /// Whether conntrack has an entry for the flow (looked up once, by the shortcut).
    pub tracked: u8,
    /// The sending socket's own cgroup as the hook read it (0: none): the flow cache's (see
    /// `flow_cache::remember`), where the hook's becomes the cgroup the flow is bound to.
    pub socket_cgroup: u64,
}

impl Subject {
    /// Takes what the packet is judged under from the generation's config: its tables, whether
    /// the policy audits everything, and the generation the outcome names.
    #[inline(always)]
    pub fn take_generation(&mut self, config: &PolicyConfig) {
        self.tables = AddressTables::of(config);
        self.global_audit = (config.flags & config_flags::AUDIT != 0) as u8;
        self.outcome.generation = config.generation;
    }
}
