//! Connection tracking: flow keys, expiry and per-packet state updates.

use enforcer_common::{
    conntrack::{CtEntry, CtKey, CtKey4, FlowTableCounts, flags, timeout},
    flow_filter,
    policy::proto,
};

use crate::maps::{CONNTRACK, CONNTRACK4, FLOW_STAMPS, FLOW_TABLES, UNANSWERED, UNANSWERED4};

/// A flow's conntrack key, in the form of its family's tables: the short one for IPv4, the
/// long one otherwise (see `CtKey4`). Only that form is written (see [`flow_key_v4`] and
/// [`flow_key_v6`]).
#[repr(C)]
pub struct FlowKey {
    pub long: CtKey,
    pub short: CtKey4,
    pub ipv4: u8,
    pub _pad: [u8; 7],
}

impl FlowKey {
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        if self.ipv4 != 0 {
            self.short.proto
        } else {
            self.long.proto
        }
    }

    /// The port of the `lo` end (`lo`) or of the `hi` end.
    #[inline(always)]
    pub fn port(&self, lo: bool) -> u16 {
        match (self.ipv4 != 0, lo) {
            (true, true) => self.short.port_lo,
            (true, false) => self.short.port_hi,
            (false, true) => self.long.port_lo,
            (false, false) => self.long.port_hi,
        }
    }
}

/// Runs `$body` with `$answered`, `$unanswered` and `$k` bound to the two tables of `$key`'s
/// family and its key in their form.
macro_rules! in_family_tables {
    ($key:expr, |$answered:ident, $unanswered:ident, $k:ident| $body:expr) => {
        if $key.ipv4 != 0 {
            let ($answered, $unanswered, $k) = (&CONNTRACK4, &UNANSWERED4, &$key.short);
            $body
        } else {
            let ($answered, $unanswered, $k) = (&CONNTRACK, &UNANSWERED, &$key.long);
            $body
        }
    };
}

/// The two 64-bit halves of an address, for ordering without `memcmp`.
#[inline(always)]
fn words(addr: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]),
        u64::from_be_bytes([
            addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
        ]),
    )
}

/// Whether `(a, a_port)` sorts before `(b, b_port)`.
#[inline(always)]
fn end_is_lower(a: &[u8; 16], a_port: u16, b: &[u8; 16], b_port: u16) -> bool {
    let (a_high, a_low) = words(a);
    let (b_high, b_low) = words(b);
    if a_high != b_high {
        return a_high < b_high;
    }
    if a_low != b_low {
        return a_low < b_low;
    }
    a_port < b_port
}

/// Writes the key of the IPv4 flow `src:src_port → dst:dst_port` (addresses as numbers) into
/// `key`; returns whether `src` is its `lo` end (see [`short_key`]).
#[inline(always)]
pub fn flow_key_v4(
    src: u32,
    src_port: u16,
    dst: u32,
    dst_port: u16,
    protocol: u8,
    key: &mut FlowKey,
) -> bool {
    key.ipv4 = 1;
    short_key(src, src_port, dst, dst_port, protocol, &mut key.short)
}

/// Writes the short key of the IPv4 flow `src:src_port → dst:dst_port` (addresses as numbers)
/// into `key`; returns whether `src` is its `lo` end. The order is the long key's (the mapped
/// prefix is the same on both ends).
#[inline(always)]
pub fn short_key(
    src: u32,
    src_port: u16,
    dst: u32,
    dst_port: u16,
    protocol: u8,
    key: &mut CtKey4,
) -> bool {
    let src_is_lo = src < dst || (src == dst && src_port < dst_port);
    if src_is_lo {
        (key.addr_lo, key.port_lo, key.addr_hi, key.port_hi) = (src, src_port, dst, dst_port);
    } else {
        (key.addr_lo, key.port_lo, key.addr_hi, key.port_hi) = (dst, dst_port, src, src_port);
    }
    key.proto = protocol;
    key._pad = [0; 3];
    src_is_lo
}

/// Writes the key of the IPv6 flow `src:src_port → dst:dst_port` into `key`; returns whether
/// `src` is its `lo` end (see [`long_key`]).
#[inline(always)]
pub fn flow_key_v6(
    src: &[u8; 16],
    src_port: u16,
    dst: &[u8; 16],
    dst_port: u16,
    protocol: u8,
    key: &mut FlowKey,
) -> bool {
    key.ipv4 = 0;
    long_key(src, src_port, dst, dst_port, protocol, &mut key.long)
}

/// Writes the long key of the flow `src:src_port → dst:dst_port` into `key`; returns whether
/// `src` is its `lo` end. (ICMPv6 and ICMP share the policy; conntrack keeps them apart by the
/// wire protocol.)
#[inline(always)]
pub fn long_key(
    src: &[u8; 16],
    src_port: u16,
    dst: &[u8; 16],
    dst_port: u16,
    protocol: u8,
    key: &mut CtKey,
) -> bool {
    let src_is_lo = end_is_lower(src, src_port, dst, dst_port);
    let (lo, lo_port, hi, hi_port) = if src_is_lo {
        (src, src_port, dst, dst_port)
    } else {
        (dst, dst_port, src, src_port)
    };
    key.addr_lo = *lo;
    key.addr_hi = *hi;
    key.port_lo = lo_port;
    key.port_hi = hi_port;
    key.proto = protocol;
    key._pad = [0; 3];
    src_is_lo
}

#[inline(always)]
fn is_closing(entry_flags: u32) -> bool {
    entry_flags & flags::RST != 0
        || entry_flags & (flags::FIN_FROM_LO | flags::FIN_FROM_HI)
            == (flags::FIN_FROM_LO | flags::FIN_FROM_HI)
}

/// Whether an entry has been idle longer than its protocol and state allow.
#[inline(always)]
pub fn is_expired(entry: &CtEntry, protocol: u8, now: u64) -> bool {
    let limit = match protocol {
        proto::TCP if is_closing(entry.flags) => timeout::TCP_CLOSING_NS,
        proto::TCP if entry.flags & flags::SEEN_REPLY != 0 => timeout::TCP_ESTABLISHED_NS,
        proto::TCP => timeout::TCP_OPENING_NS,
        proto::UDP => timeout::UDP_NS,
        _ => timeout::OTHER_NS,
    };
    now.saturating_sub(entry.last_seen_ns) > limit
}

/// A live (unexpired) entry for `key`. A TCP SYN on a closing entry reuses the ports for a new
/// connection, so the old entry counts as gone.
#[inline(always)]
pub fn live_entry(key: &FlowKey, tcp_syn_only: bool, now: u64) -> Option<*mut CtEntry> {
    if !may_be_tracked(key, now) {
        return None;
    }
    // Answered flows first: they are the bulk of packets.
    let entry = in_family_tables!(key, |answered, unanswered, k| {
        match answered.get_ptr_mut(k) {
            Some(entry) => entry,
            None => unanswered.get_ptr_mut(k)?,
        }
    });
    // SAFETY: a pointer from a map lookup stays valid for the program run; fields are plain
    // integers, and racing updates from other CPUs only ever store whole valid values.
    let current = unsafe { &*entry };
    if is_expired(current, key.proto(), now) || (tcp_syn_only && is_closing(current.flags)) {
        return None;
    }
    Some(entry)
}

/// Records what a packet of a tracked flow says about the connection's state. A flow's first
/// reply moves it from the unanswered table to the established one; `entry` must not be used
/// after this call.
#[inline(always)]
pub fn observe(
    key: &FlowKey,
    entry: *mut CtEntry,
    from_lo: bool,
    tcp_fin: bool,
    tcp_rst: bool,
    now: u64,
) {
    // SAFETY: see `live_entry`.
    let current = unsafe { &mut *entry };
    let mut entry_flags = current.flags;
    let from_initiator = from_lo == (entry_flags & flags::ORIG_IS_LO != 0);
    if !from_initiator {
        entry_flags |= flags::SEEN_REPLY;
    }
    entry_flags |= closing_flags(from_lo, tcp_fin, tcp_rst);
    if current.flags & flags::SEEN_REPLY == 0 && entry_flags & flags::SEEN_REPLY != 0 {
        current.flags = entry_flags;
        seen(key, current, now);
        // Copied from the map value itself, not through the stack: the 5.10 and 6.1 verifiers
        // count every frame of the deepest call chain against 512 bytes.
        let moved = in_family_tables!(key, |answered, unanswered, k| {
            let inserted = answered.insert(k, current, 0).is_ok();
            if inserted {
                let _ = unanswered.remove(k);
            }
            inserted
        });
        if moved {
            count(|counts| counts.answered += 1);
        }
        // Else (no memory for an entry) the flow stays where it is, answered.
        return;
    }
    if entry_flags != current.flags {
        current.flags = entry_flags;
        seen(key, current, now);
    } else if now.saturating_sub(current.last_seen_ns) > timeout::REFRESH_NS {
        seen(key, current, now);
    }
}

/// Records that the flow `key` was seen at `now`, in its entry and in the flow filter.
#[inline(always)]
fn seen(key: &FlowKey, entry: &mut CtEntry, now: u64) {
    entry.last_seen_ns = now;
    stamp_filter(key, now);
}

/// The flow filter's bucket of `key` (see `enforcer_common::flow_filter`).
#[inline(always)]
fn filter_bucket(key: &FlowKey) -> u32 {
    if key.ipv4 != 0 {
        flow_filter::bucket4(&key.short)
    } else {
        flow_filter::bucket(&key.long)
    }
}

/// Whether `key` may have a live entry: false only when its filter bucket says it cannot.
#[inline(always)]
pub fn may_be_tracked(key: &FlowKey, now: u64) -> bool {
    let (word, place) = flow_filter::place(filter_bucket(key));
    FLOW_STAMPS
        .get(word)
        .is_none_or(|stamps| flow_filter::may_hold(stamps[place], key.proto(), now))
}

/// Stamps `key`'s filter bucket with `now`: wherever an entry is created or its `last_seen_ns`
/// moves, before a later packet can look for it.
#[inline(always)]
fn stamp_filter(key: &FlowKey, now: u64) {
    let (word, place) = flow_filter::place(filter_bucket(key));
    let Some(stamps) = FLOW_STAMPS.get_ptr_mut(word) else {
        return;
    };
    let stamp = flow_filter::stamp(now);
    // SAFETY: an array value pointer, valid for this run; other CPUs store whole stamps too,
    // each its own two bytes. Written only when it moves: the line is shared, and every
    // lookup reads it.
    unsafe {
        let bucket = &mut (*stamps)[place];
        if *bucket != stamp {
            *bucket = stamp;
        }
    }
}

/// The flags a FIN or RST from the `lo` end (or not) adds.
#[inline(always)]
fn closing_flags(from_lo: bool, tcp_fin: bool, tcp_rst: bool) -> u32 {
    let fin = match (tcp_fin, from_lo) {
        (false, _) => 0,
        (true, true) => flags::FIN_FROM_LO,
        (true, false) => flags::FIN_FROM_HI,
    };
    fin | if tcp_rst { flags::RST } else { 0 }
}

/// Starts tracking a flow, as unanswered.
#[inline(always)]
pub fn track(key: &FlowKey, entry: &CtEntry) {
    stamp_filter(key, entry.last_seen_ns);
    // An LRU map makes room by evicting the least recently used unanswered flow; a failure
    // here only means the next packet is judged as new again.
    let tracked = in_family_tables!(key, |_answered, unanswered, k| unanswered
        .insert(k, entry, 0)
        .is_ok());
    if tracked {
        count(|counts| counts.opened += 1);
    }
}

#[inline(always)]
pub fn forget(key: &FlowKey) {
    in_family_tables!(key, |answered, unanswered, k| {
        let _ = answered.remove(k);
        let _ = unanswered.remove(k);
    });
}

#[inline(always)]
fn count(add: impl FnOnce(&mut FlowTableCounts)) {
    if let Some(counts) = FLOW_TABLES.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context).
        add(unsafe { &mut *counts });
    }
}
