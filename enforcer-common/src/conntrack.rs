//! Connection tracking: one entry per flow, found from either direction.

/// Flow key with the two ends ordered (lower `(addr, port)` first), so a packet and its reply
/// find the same entry with one lookup. Aligned to 8 so that it can be compared as five words
/// (see [`CtKey::words`]): the BPF target loads a field it cannot prove aligned a byte at a
/// time, and the verifier refuses an unaligned load from the stack.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The key as five 64-bit words, in five loads. Two keys are the same flow's when their
    /// words are equal: every key is written with its padding zeroed.
    #[inline(always)]
    pub fn words(&self) -> &[u64; 5] {
        const { assert!(align_of::<CtKey>() >= align_of::<u64>()) };
        // SAFETY: 40 bytes (asserted below), aligned for `u64` (asserted above), and any bits
        // are a valid `u64`.
        unsafe { &*(self as *const Self).cast::<[u64; 5]>() }
    }
}

/// An IPv4 flow's key: the same ends in the same order as [`CtKey`] gives them (two
/// IPv4-mapped addresses differ only in their last four bytes), in 16 bytes instead of 40.
/// Every packet of an established flow hashes its key, and the long key's hash was the largest
/// cost of that path; IPv4 flows live in tables of their own under this one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    /// The addresses as numbers (`u32::from_be_bytes` of their bytes).
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey4 {
    /// The short form of a long key whose two ends are IPv4(-mapped) addresses.
    pub fn of_mapped(key: &CtKey) -> Option<Self> {
        Some(Self {
            addr_lo: crate::addr::v4_of_mapped(&key.addr_lo)?,
            addr_hi: crate::addr::v4_of_mapped(&key.addr_hi)?,
            port_lo: key.port_lo,
            port_hi: key.port_hi,
            proto: key.proto,
            _pad: [0; 3],
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Cgroup of the socket that sends the initiator's packets (0 if none), so the flow can be
    /// judged again as the same service after a policy change, even from a reply packet.
    pub cgroup_id: u64,
    /// Cgroup of the socket that sends the responder's packets, once seen at TC egress.
    pub reply_cgroup_id: u64,
    /// Policy generation that admitted the flow; any other generation judges it again.
    pub generation: u32,
    pub rule: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub flags: u32,
    /// Interface the initiator's packets enter the host through (XDP), once seen; 0 before.
    /// A later packet entering elsewhere is checked again as if new (anti-spoofing).
    pub orig_ifindex: u32,
    /// The same for the responder's packets.
    pub reply_ifindex: u32,
    pub _pad: u32,
}

/// Bits of [`CtEntry::flags`].
pub mod flags {
    /// The flow's initiator is the `lo` end of the key.
    pub const ORIG_IS_LO: u32 = 1 << 0;
    /// A packet from the responder was seen.
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const FIN_FROM_LO: u32 = 1 << 2;
    pub const FIN_FROM_HI: u32 = 1 << 3;
    pub const RST: u32 = 1 << 4;
    /// Admitted only because audit mode passes what policy would drop.
    pub const AUDIT: u32 = 1 << 5;
}

/// Idle timeouts, after which an entry counts as gone and the next packet is a new flow.
pub mod timeout {
    const SEC: u64 = 1_000_000_000;
    /// TCP before the responder answered.
    pub const TCP_OPENING_NS: u64 = 60 * SEC;
    pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * SEC;
    /// TCP after a RST or a FIN from both ends.
    pub const TCP_CLOSING_NS: u64 = 10 * SEC;
    pub const UDP_NS: u64 = 60 * SEC;
    pub const OTHER_NS: u64 = 30 * SEC;
    /// `last_seen_ns` is refreshed at most this often, to keep a busy flow's entry from
    /// bouncing between CPUs on every packet.
    pub const REFRESH_NS: u64 = SEC;
}

/// One flow direction in one of the datapath's per-CPU flow caches (`FLOW_CACHES` of IPv4
/// flows, `FLOW_CACHES6` of IPv6 ones): the flow's key, `K`, in the form of its family's
/// conntrack tables, and what the established-flow shortcut last passed of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow<K> {
    pub key: K,
    pub pass: CachedPass,
}

/// Where the established-flow shortcut last passed a packet of a flow direction, and how its
/// packets are counted. A packet that matches every field of its slot but the time, within
/// [`timeout::REFRESH_NS`] of `checked_at`, passes without a conntrack lookup, counted in
/// `packets` and `bytes` until the slot is written again, when they move to the per-edge and
/// per-reason counters: a reader of those adds what the slots hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedPass {
    /// The sending socket's own cgroup at TC egress, as the hook reads it (not the service's
    /// cgroup above it that the flow is bound to: that one is a walk up the hierarchy, and a
    /// leaf has one set of ancestors), else 0.
    pub cgroup_id: u64,
    /// When the shortcut last passed a packet of it (`CLOCK_MONOTONIC` ns); 0: an empty slot.
    pub checked_at: u64,
    /// Bytes passed from the cache since the slot was written, and their packets: counted
    /// with `verdict`, reason `established`, and the two identities. The slot is written
    /// again at least every [`timeout::REFRESH_NS`] while its flow has packets, so a second's
    /// packets on one CPU is the most `packets` holds.
    pub bytes: u64,
    pub packets: u32,
    pub ifindex: u32,
    pub generation: u32,
    /// The identities the packet is counted under, in its direction.
    pub src_identity: u32,
    pub dst_identity: u32,
    /// An `event::hook` code.
    pub hook_kind: u8,
    /// Whether the packet's source is the key's `lo` end.
    pub from_lo: u8,
    pub verdict: u8,
    pub _pad: u8,
}

/// Slots of the IPv4 flow cache on each CPU.
pub const FLOW_CACHE_SLOTS: u32 = 512;
/// Slots of the IPv6 flow cache on each CPU: fewer, as many as fit in the same 32 KiB.
pub const FLOW_CACHE6_SLOTS: u32 = 256;
const _: () = assert!(FLOW_CACHE_SLOTS.is_power_of_two() && FLOW_CACHE6_SLOTS.is_power_of_two());

/// A CPU's IPv4 flow cache, one per-CPU map value: one contiguous stretch of memory (eight
/// pages) rather than a per-CPU allocation per slot, scattered over the per-CPU area's pages
/// and reached through a table of pointers, which cost a packet a TLB and two cache misses.
/// 32 KiB is the most a per-CPU map value may hold.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowCacheTable {
    pub slots: [CachedFlow<CtKey4>; FLOW_CACHE_SLOTS as usize],
}

/// A CPU's IPv6 flow cache, as [`FlowCacheTable`] is the IPv4 one.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowCacheTable6 {
    pub slots: [CachedFlow<CtKey>; FLOW_CACHE6_SLOTS as usize],
}

/// How flows moved through the two conntrack tables on one CPU: new flows enter the
/// unanswered table (`opened`), and move to the established one at their first reply
/// (`answered`). Unanswered flows are what a spoofed-source flood makes, so they live in a
/// table of their own and can only push out each other, never an answered flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTableCounts {
    pub opened: u64,
    pub answered: u64,
}

/// Key of the fragment map: the datagram a non-first fragment belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The verdict the first fragment got, which the rest of the datagram follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub created_ns: u64,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: [u8; 6],
}

/// A datagram's fragments must all arrive within this time of the first.
pub const FRAG_TIMEOUT_NS: u64 = 2_000_000_000;

kernel_abi!(
    CtKey = 40,
    CtKey4 = 16,
    CachedPass = 48,
    CachedFlow<CtKey4> = 64,
    CachedFlow<CtKey> = 88,
    FlowCacheTable = 32768,
    FlowCacheTable6 = 22528,
    CtEntry = 64,
    FlowTableCounts = 16,
    FragKey = 40,
    FragEntry = 32
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    #[test]
    fn a_long_key_of_two_ipv4_ends_has_a_short_form_with_the_same_ends() {
        let long = CtKey {
            addr_lo: v4_mapped([10, 0, 0, 1]),
            addr_hi: v4_mapped([10, 0, 0, 2]),
            port_lo: 40000,
            port_hi: 80,
            proto: 6,
            _pad: [0; 3],
        };
        assert_eq!(
            CtKey4::of_mapped(&long),
            Some(CtKey4 {
                addr_lo: 0x0a00_0001,
                addr_hi: 0x0a00_0002,
                port_lo: 40000,
                port_hi: 80,
                proto: 6,
                _pad: [0; 3],
            })
        );
        let mut ipv6 = long;
        ipv6.addr_hi[0] = 0xfd;
        assert_eq!(CtKey4::of_mapped(&ipv6), None);
    }

    #[test]
    fn two_long_keys_have_the_same_words_exactly_when_they_are_the_same_key() {
        let key = CtKey {
            addr_lo: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            addr_hi: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            port_lo: 40000,
            port_hi: 80,
            proto: 6,
            _pad: [0; 3],
        };
        let same = key;
        assert_eq!(key.words(), same.words());
        // Every address byte, the ports and the protocol, changed one at a time.
        let mut differing = [key; 35];
        for byte in 0..16 {
            differing[byte].addr_lo[byte] ^= 0x80;
            differing[16 + byte].addr_hi[byte] ^= 0x01;
        }
        differing[32].port_lo ^= 1;
        differing[33].port_hi ^= 0x8000;
        differing[34].proto = 17;
        for other in differing {
            assert_ne!(key.words(), other.words(), "{other:?}");
        }
    }
}
