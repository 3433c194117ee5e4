//! Per-CPU volume counters.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCounterKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

kernel_abi!(FlowCounterKey = 12, Counter = 16);

/// One slot of the per-CPU edge cache in front of the per-edge counter table: the edge it
/// counts for now (`counter.packets == 0`: none yet) and what it counted since it took it.
/// A packet of the slot's edge only adds to it; another edge hashing to the slot first moves
/// the slot's counts into the table (see `report::count` in the programs). The controller adds
/// the slots to the table's counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeCacheSlot {
    pub key: FlowCounterKey,
    pub _pad: u32,
    pub counter: Counter,
}

/// Slots of the per-CPU edge cache (a power of two).
pub const EDGE_CACHE_SLOTS: u32 = 1024;
const _: () = assert!(EDGE_CACHE_SLOTS.is_power_of_two());

/// The slot an edge is counted in.
#[inline(always)]
pub const fn edge_cache_slot(key: &FlowCounterKey) -> u32 {
    // Identities are dense small numbers or hashes: mixing with an odd multiplier spreads both.
    let mixed = (key.src_identity.wrapping_mul(0x9E37_79B1) ^ key.dst_identity)
        .wrapping_mul(0x85EB_CA6B)
        ^ key.verdict as u32;
    (mixed ^ (mixed >> 15)) & (EDGE_CACHE_SLOTS - 1)
}

kernel_abi!(EdgeCacheSlot = 32);
