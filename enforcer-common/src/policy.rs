//! The compiled rule tables.
//!
//! Lookups for a new flow go, first hit wins: exact `(proto, port)`, then the port ranges of
//! `proto`, then `(proto, ANY_PORT)`, then `(ANY_PROTO, ANY_PORT)`. Each is a hash lookup (ranges
//! one lookup plus a bounded scan), so the cost does not grow with the number of rules. The
//! controller compiles explicit denies so that they win over any allow under that order.

/// Port field of a key that matches every port of its protocol (port 0 is refused in policies).
pub const ANY_PORT: u16 = 0;
/// Protocol field of a key that matches every protocol.
pub const ANY_PROTO: u8 = 0;

/// Protocol numbers the policy knows. ICMPv6 is judged as [`proto::ICMP`], so one `icmp` rule
/// covers both families.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// [`RuleVerdict::action`] values.
pub mod action {
    /// No rule: the half of [`SlotVerdicts`](super::SlotVerdicts) of a slot without this key.
    pub const NONE: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
}

/// Rule numbers with a fixed meaning; rules from the policy are numbered from `FIRST_USER` in
/// the order the controller compiled them, per generation.
pub mod rule {
    /// No rule decided (infrastructure traffic such as neighbour discovery).
    pub const NONE: u32 = 0;
    /// The default for traffic touching a declared service that no rule allows.
    pub const DEFAULT_DENY: u32 = 1;
    /// The default for traffic between undeclared parties.
    pub const DEFAULT_ALLOW: u32 = 2;
    /// The endpoint-interface source-address check and the cgroup/address cross-check.
    pub const ANTI_SPOOFING: u32 = 3;
    /// Packets dropped for their shape: truncated, malformed, orphan or overlapping fragments.
    pub const PACKET_SANITY: u32 = 4;
    /// No policy generation is installed (fail closed).
    pub const NO_POLICY: u32 = 5;
    pub const FIRST_USER: u32 = 16;

    /// The names of the reserved rules, as alerts and `explain` show them. A policy's rules
    /// may not take them.
    pub const RESERVED_NAMES: [(u32, &str); 5] = [
        (DEFAULT_DENY, "default-deny"),
        (DEFAULT_ALLOW, "default-allow"),
        (ANTI_SPOOFING, "anti-spoofing"),
        (PACKET_SANITY, "packet-sanity"),
        (NO_POLICY, "no-policy"),
    ];

    /// The name of reserved rule `number`.
    pub fn reserved_name(number: u32) -> Option<&'static str> {
        RESERVED_NAMES
            .iter()
            .find(|(reserved, _)| *reserved == number)
            .map(|(_, name)| *name)
    }

    /// Whether `name` is a reserved rule's.
    pub fn is_reserved_name(name: &str) -> bool {
        RESERVED_NAMES.iter().any(|(_, reserved)| *reserved == name)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Destination port in host order, or [`ANY_PORT`].
    pub port: u16,
    /// [`proto`] number, or [`ANY_PROTO`].
    pub proto: u8,
    pub _pad: u8,
}

/// What a matching rule decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleVerdict {
    pub rule: u32,
    /// Key of the rule's new-connection token bucket (stable across reloads), when limited.
    pub bucket: u32,
    /// New connections per second admitted on this rule's edge; 0 = unlimited.
    pub max_new_per_sec: u32,
    pub action: u8,
    pub _pad: [u8; 3],
}

/// The value of a rule entry: what it decides in each policy slot. A key is in both
/// generations' tables at once, and most keys decide the same in both, so one entry with a half
/// per slot takes about half the kernel memory of an entry per slot (104 bytes against 2 × 88).
/// A half whose action is [`action::NONE`] is a slot without this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotVerdicts {
    pub by_slot: [RuleVerdict; 2],
}

impl SlotVerdicts {
    /// The verdict of `slot`, if that slot has this key.
    #[inline(always)]
    pub fn in_slot(&self, slot: u8) -> Option<RuleVerdict> {
        let verdict = if slot & 1 == 0 {
            self.by_slot[0]
        } else {
            self.by_slot[1]
        };
        (verdict.action != action::NONE).then_some(verdict)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub proto: u8,
    pub slot: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Inclusive bounds, host order.
    pub lo: u16,
    pub hi: u16,
    pub verdict: RuleVerdict,
}

/// Most port ranges one `(src, dst, proto)` may carry; the scan is bounded by it.
pub const MAX_PORT_RANGES: usize = 16;

/// The port ranges of one `(src, dst, proto)`, denies first, scanned in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRanges {
    pub count: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

/// Which rule lookups can hit for a (source, destination) pair, one [`layer`] bit each, kept in
/// a fixed array: the datapath skips the other lookups. Most new flows a default-deny refuses
/// are between identities with no rule at all, and then one array read replaces four lookups.
///
/// A pair's bits sit in a bucket its identities hash to, with the bits of every other pair of
/// that bucket: a lookup a shared bucket lets through finds no entry and falls through, as for
/// a pair without rules, so sharing costs lookups but never changes a verdict. Four buckets of
/// 16 bits share a word (the kernel keeps an array's values 8 bytes apart), each slot has its
/// own words, and the array is sized once: unlike a hash of pairs, it takes no memory per rule.
pub mod pair_filter {
    /// Words of one slot.
    pub const WORDS_PER_SLOT: u32 = 1 << 19;
    /// Buckets of one slot, four to a word.
    pub const BUCKETS_PER_SLOT: u32 = WORDS_PER_SLOT * BUCKETS_PER_WORD;
    pub const BUCKETS_PER_WORD: u32 = 4;
    /// Words of the whole array: both slots.
    pub const WORDS: u32 = 2 * WORDS_PER_SLOT;

    /// The bucket of the pair `(src, dst)`: a 64-bit multiply between two folds of the high
    /// half, so that identities differing in any bit spread over all buckets.
    #[inline(always)]
    pub const fn bucket(src: u32, dst: u32) -> u32 {
        let mut mixed = ((src as u64) << 32) | dst as u64;
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xff51_afd7_ed55_8ccd);
        mixed ^= mixed >> 33;
        (mixed as u32) & (BUCKETS_PER_SLOT - 1)
    }

    /// The array index of `slot`'s first word.
    #[inline(always)]
    pub const fn first_word(slot: u8) -> u32 {
        (slot as u32 & 1) * WORDS_PER_SLOT
    }

    /// The array index of the word holding `bucket` in `slot`.
    #[inline(always)]
    pub const fn word(slot: u8, bucket: u32) -> u32 {
        first_word(slot) + bucket / BUCKETS_PER_WORD
    }

    /// Where `bucket`'s 16 bits sit in its word.
    #[inline(always)]
    pub const fn shift(bucket: u32) -> u32 {
        (bucket % BUCKETS_PER_WORD) * 16
    }
}

/// The lookup layers of [`pair_filter`]; every bit is below 16.
pub mod layer {
    use super::proto;

    pub const EXACT: u32 = 0;
    pub const RANGE: u32 = 1;
    pub const ANY_PORT: u32 = 2;

    /// The bit of the any-protocol entry ([`ANY_PROTO`](super::ANY_PROTO)).
    pub const ANY_PROTOCOL_BIT: u32 = 1 << 9;
    // A bucket of the pair filter holds 16 bits.
    const _: () = assert!(ANY_PROTOCOL_BIT < 1 << 16);

    /// The bit of `layer` (one of the above) for `protocol`: TCP, UDP and ICMP have three each;
    /// other protocols, which rules cannot name, none.
    #[inline(always)]
    pub const fn bit(layer: u32, protocol: u8) -> u32 {
        let index = match protocol {
            proto::TCP => 0,
            proto::UDP => 1,
            proto::ICMP => 2,
            _ => return 0,
        };
        1 << (index * 3 + layer)
    }
}

/// Token bucket of one rate-limited rule, kept as the GCRA "theoretical arrival time".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub next_free_ns: u64,
}

kernel_abi!(
    PolicyKey = 12,
    RuleVerdict = 16,
    RangeKey = 12,
    PortRange = 20,
    PortRanges = 4 + 20 * MAX_PORT_RANGES,
    RateState = 8,
    SlotVerdicts = 32,
);
