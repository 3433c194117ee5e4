//! Connection tracking: flow keys, expiry and per-packet state updates.

use enforcer_common::{
    conntrack::{CtEntry, CtKey, FlowTableCounts, flags, timeout},
    policy::proto,
};

use crate::maps::{CONNTRACK, FLOW_TABLES, UNANSWERED};

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

/// Writes the key of the flow `src:src_port → dst:dst_port` into `key`; returns whether `src`
/// is its `lo` end. (ICMPv6 and ICMP share the policy; conntrack keeps them apart by the wire
/// protocol.)
#[inline(always)]
pub fn flow_key(
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
pub fn live_entry(key: &CtKey, tcp_syn_only: bool, now: u64) -> Option<*mut CtEntry> {
    // Answered flows first: they are the bulk of packets.
    let entry = match CONNTRACK.get_ptr_mut(key) {
        Some(entry) => entry,
        None => UNANSWERED.get_ptr_mut(key)?,
    };
    // SAFETY: a pointer from a map lookup stays valid for the program run; fields are plain
    // integers, and racing updates from other CPUs only ever store whole valid values.
    let current = unsafe { &*entry };
    if is_expired(current, key.proto, now) || (tcp_syn_only && is_closing(current.flags)) {
        return None;
    }
    Some(entry)
}

/// Records what a packet of a tracked flow says about the connection's state. A flow's first
/// reply moves it from the unanswered table to the established one; `entry` must not be used
/// after this call.
#[inline(always)]
pub fn observe(
    key: &CtKey,
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
        current.last_seen_ns = now;
        // Copied from the map value itself, not through the stack: the 5.10 and 6.1 verifiers
        // count every frame of the deepest call chain against 512 bytes.
        if CONNTRACK.insert(key, current, 0).is_ok() {
            let _ = UNANSWERED.remove(key);
            count(|counts| counts.answered += 1);
        }
        // Else (no memory for an entry) the flow stays where it is, answered.
        return;
    }
    if entry_flags != current.flags {
        current.flags = entry_flags;
        current.last_seen_ns = now;
    } else if now.saturating_sub(current.last_seen_ns) > timeout::REFRESH_NS {
        current.last_seen_ns = now;
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
pub fn track(key: &CtKey, entry: &CtEntry) {
    // An LRU map makes room by evicting the least recently used unanswered flow; a failure
    // here only means the next packet is judged as new again.
    if UNANSWERED.insert(key, entry, 0).is_ok() {
        count(|counts| counts.opened += 1);
    }
}

#[inline(always)]
pub fn forget(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
    let _ = UNANSWERED.remove(key);
}

#[inline(always)]
fn count(add: impl FnOnce(&mut FlowTableCounts)) {
    if let Some(counts) = FLOW_TABLES.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context).
        add(unsafe { &mut *counts });
    }
}
