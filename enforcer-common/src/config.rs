//! The installed policy generation.
//!
//! Each generation's config lives in its own one-entry array map, frozen once written, and the
//! programs reach it through a one-entry array-of-maps. Installing a generation is one update of
//! that outer map: packets see either the old config or the new one, and the kernel returns from
//! the update only after every program that could still hold the old one has finished, so the
//! controller knows when the old slot is free to rewrite.

/// Bits of [`PolicyConfig::flags`].
pub mod flags {
    /// `settings.mode = "audit"`: nothing is dropped, would-be drops are reported.
    pub const AUDIT: u32 = 1 << 0;
    /// No prefix of the generation's address tables covers an IPv4 address but whole (a /32):
    /// an IPv4 address the identity table does not hold is world, and the datapath does not
    /// walk the trie for it (a walk cost a scan's packet to unnamed addresses about 30 ns).
    /// Set by the controller when it holds; a config without it walks the trie, as before.
    pub const IPV4_HOSTS_ONLY: u32 = 1 << 1;
    /// The same for IPv6 (IPv4's mapped range apart): no prefix covers an IPv6 address but
    /// whole (a /128), so one the exact table does not hold is world without the trie (the
    /// walk cost a SYN to an unnamed address among 2 000 services' addresses about 60 ns in
    /// the datapath benchmark: the trie holds whole addresses too).
    pub const IPV6_HOSTS_ONLY: u32 = 1 << 2;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    pub generation: u32,
    /// Which half (0 or 1) of the slot-keyed tables this generation's entries are in.
    pub slot: u32,
    pub flags: u32,
    /// Bit `L` set: a service's cgroup sits at level `L` of the cgroup v2 hierarchy (the root
    /// is level 0). A packet's socket belongs to a service when its cgroup or an ancestor at
    /// one of these levels is the service's: a cgroup covers its whole subtree.
    pub cgroup_levels: u32,
    /// Wall-clock time (ns since the epoch) the controller installed this generation.
    pub installed_at_ns: u64,
    /// SHA-256 of the policy source this generation was compiled from.
    pub policy_hash: [u8; 32],
}

kernel_abi!(PolicyConfig = 56);

/// The deepest cgroup level the datapath looks at for a service's cgroup: bits 0 to this of
/// [`PolicyConfig::cgroup_levels`]. Deeper service cgroups match only themselves, not their
/// subtree (the controller warns).
pub const MAX_CGROUP_LEVEL: u32 = 15;
