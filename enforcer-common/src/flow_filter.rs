//! The flow filter: in front of the conntrack tables, when each bucket of flow keys last had a
//! tracked flow written, so that a packet of no tracked flow (a new flow's first packet, the
//! bulk of a flood of distinct shapes) skips their two hash lookups, each a cache miss in a
//! large table. One array lookup in a table small enough to stay in the CPU's caches stands
//! in for them.
//!
//! A bucket holds the time, in [`UNIT_SHIFT`] units and modulo 2^16 (about 19.5 hours), at
//! which the datapath last created or refreshed (`last_seen_ns`) an entry whose key falls in
//! it. An entry idle for longer than its protocol's longest timeout has expired, so a bucket
//! stamped longer ago than that holds no live flow of the protocol: the lookups could only
//! miss. Buckets are never cleared, only stamped again; flows sharing a bucket keep it stamped
//! for the latest of them. A stamp written by a plain store on one CPU may overwrite another
//! CPU's a moment newer, hence a unit of slack in [`may_hold`].
//!
//! A bucket never stamped holds 0, which no stamp is. Every other error is on the side of a
//! lookup: a stamp ahead of the clock (another CPU's, or the controller's, which stamps ahead)
//! may hold a flow; so may a bucket stamped so long ago that its time comes round again. The
//! filter only ever skips lookups that would find nothing live, and never changes a verdict.
//!
//! Two bytes a bucket keep the filter small enough to stay in the CPU's caches under a flood;
//! with four, and four times the buckets, its own misses cost what the lookups did. Four
//! buckets to an array entry ([`Word`]): the kernel gives every entry of an array at least 8
//! bytes, so a bucket an entry made the filter four times its size (512 KiB, 128 pages),
//! and its random line the costliest load of a new flow's packet.
//!
//! The datapath stores a bucket's two bytes alone; the controller, which can only write whole
//! entries, stamps all four buckets of an entry it writes, ahead of the clock (see
//! `KernelMaps::stamp_tracked_flows`): a bucket it overwrites with a stamp ahead may hold more
//! than it does, never less, whatever the datapath stored in it meanwhile.

use crate::conntrack::{CtKey, CtKey4, timeout};
use crate::policy::proto;

/// Buckets in the filter: 128 KiB of stamps.
pub const BUCKETS: u32 = 1 << 16;
const _: () = assert!(BUCKETS.is_power_of_two());

/// An array entry of the filter: four buckets' stamps.
pub type Word = [u16; BUCKETS_PER_WORD as usize];
pub const BUCKETS_PER_WORD: u32 = 4;
/// Entries of the filter's array.
pub const WORDS: u32 = BUCKETS / BUCKETS_PER_WORD;

/// Where bucket `bucket` is: its entry, and its place in the entry.
#[inline(always)]
pub const fn place(bucket: u32) -> (u32, usize) {
    (
        bucket / BUCKETS_PER_WORD,
        (bucket % BUCKETS_PER_WORD) as usize,
    )
}

/// A stamp's unit: 2^30 ns, about a second.
pub const UNIT_SHIFT: u32 = 30;

/// The stamp of the time `now_ns` (monotonic clock): never 0, which means never stamped. The
/// unit that would be 0 is stamped 1, a unit ahead.
#[inline(always)]
pub const fn stamp(now_ns: u64) -> u16 {
    let units = (now_ns >> UNIT_SHIFT) as u16;
    if units == 0 { 1 } else { units }
}

/// How far ahead of the clock a stamp may be and still count as now, in units.
pub const AHEAD: u16 = 128;

/// The longest a tracked flow of `protocol` may be idle and live, in stamp units, rounded up.
#[inline(always)]
const fn longest_idle(protocol: u8) -> u16 {
    let ns = match protocol {
        proto::TCP => max(
            max(timeout::TCP_ESTABLISHED_NS, timeout::TCP_OPENING_NS),
            timeout::TCP_CLOSING_NS,
        ),
        proto::UDP => timeout::UDP_NS,
        _ => timeout::OTHER_NS,
    };
    (ns >> UNIT_SHIFT) as u16 + 1
}
// The longest idle time and the window ahead fit in the stamps' period, apart.
const _: () = assert!((longest_idle(proto::TCP) as u32 + 1) + AHEAD as u32 <= u16::MAX as u32);

const fn max(a: u64, b: u64) -> u64 {
    if a > b { a } else { b }
}

/// Whether a bucket stamped `bucket_stamp` may hold a live flow of `protocol` at `now_ns`:
/// stamped, within the protocol's longest idle time (and a unit) or up to [`AHEAD`] units
/// ahead of the clock.
#[inline(always)]
pub const fn may_hold(bucket_stamp: u16, protocol: u8, now_ns: u64) -> bool {
    if bucket_stamp == 0 {
        return false;
    }
    let age = stamp(now_ns).wrapping_sub(bucket_stamp);
    age <= longest_idle(protocol) + 1 || age > u16::MAX - AHEAD
}

/// The bucket of an IPv4 flow's key.
#[inline(always)]
pub const fn bucket4(key: &CtKey4) -> u32 {
    let addresses = ((key.addr_lo as u64) << 32) | key.addr_hi as u64;
    let rest = ((key.port_lo as u64) << 32) | ((key.port_hi as u64) << 16) | key.proto as u64;
    fold(mix(mix(0, addresses), rest))
}

/// The bucket of a flow's long key (IPv6, or IPv4 in mapped form).
#[inline(always)]
pub const fn bucket(key: &CtKey) -> u32 {
    let mut mixed = 0;
    mixed = mix(mixed, u64::from_ne_bytes(eight(&key.addr_lo, 0)));
    mixed = mix(mixed, u64::from_ne_bytes(eight(&key.addr_lo, 8)));
    mixed = mix(mixed, u64::from_ne_bytes(eight(&key.addr_hi, 0)));
    mixed = mix(mixed, u64::from_ne_bytes(eight(&key.addr_hi, 8)));
    let rest = ((key.port_lo as u64) << 32) | ((key.port_hi as u64) << 16) | key.proto as u64;
    fold(mix(mixed, rest))
}

#[inline(always)]
const fn eight(bytes: &[u8; 16], at: usize) -> [u8; 8] {
    [
        bytes[at],
        bytes[at + 1],
        bytes[at + 2],
        bytes[at + 3],
        bytes[at + 4],
        bytes[at + 5],
        bytes[at + 6],
        bytes[at + 7],
    ]
}

/// One round: a multiply carries a difference only upwards, so the high half folds back down.
#[inline(always)]
const fn mix(mixed: u64, word: u64) -> u64 {
    let mixed = (mixed ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    mixed ^ (mixed >> 31)
}

#[inline(always)]
const fn fold(mixed: u64) -> u32 {
    ((mixed >> 32) as u32 ^ mixed as u32) & (BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_bucket_may_hold_a_flow_as_long_as_its_protocol_can_idle_and_never_when_unstamped() {
        let now = 1_000_000 * SECOND;
        assert!(
            !may_hold(0, proto::TCP, now),
            "a bucket never stamped holds nothing"
        );
        assert!(
            may_hold(stamp(0), proto::UDP, 0),
            "a flow tracked in the clock's first unit is found then"
        );
        for (protocol, idle) in [
            (proto::TCP, timeout::TCP_ESTABLISHED_NS),
            (proto::UDP, timeout::UDP_NS),
            (proto::ICMP, timeout::OTHER_NS),
        ] {
            let stamped_at = now - idle;
            assert!(
                may_hold(stamp(stamped_at), protocol, now),
                "a flow of {protocol} last seen its timeout ago may live"
            );
            assert!(
                !may_hold(stamp(stamped_at - 3 * (1 << UNIT_SHIFT)), protocol, now),
                "a bucket stamped well before that holds none of {protocol}"
            );
        }
        assert!(
            may_hold(stamp(now + 60 * SECOND), proto::UDP, now),
            "a stamp ahead of the clock (another CPU's, the controller's) may"
        );
        let unit = 1 << UNIT_SHIFT;
        assert!(
            !may_hold(stamp(now + 200 * unit), proto::UDP, now),
            "one further ahead is taken for one long past"
        );
        let period = (u16::MAX as u64 + 1) * unit;
        assert!(
            may_hold(stamp(now - period), proto::UDP, now),
            "a stamp a whole period old comes round again: a lookup, never a miss"
        );
    }

    #[test]
    fn keys_differing_in_any_field_spread_over_the_buckets() {
        let base = CtKey4 {
            addr_lo: 0x0a00_0001,
            addr_hi: 0x0a00_0002,
            port_lo: 40000,
            port_hi: 80,
            proto: proto::TCP,
            _pad: [0; 3],
        };
        let mut buckets = [false; 64];
        let mut count = |key: &CtKey4| buckets[bucket4(key) as usize % 64] = true;
        for step in 0..16 {
            count(&CtKey4 {
                port_hi: 80 + step,
                ..base
            });
            count(&CtKey4 {
                addr_hi: base.addr_hi + ((step as u32) << 24),
                ..base
            });
        }
        let used = buckets.iter().filter(|used| **used).count();
        assert!(used > 20, "32 keys fell in {used} of 64 buckets");
    }
}
