//! A per-CPU cache of the IPv4 flows this CPU passed through the shortcut lately, in front of
//! conntrack: the bulk of packets, an established flow's, then pass after one array lookup
//! instead of a hash lookup (two for a flow not answered yet) and an entry update. It is asked
//! before anything else, from a plain frame's headers (`packet::plain_ipv4`), not the parser's
//! reading: in real traffic, where the network stack evicts a program's lines between two
//! packets, the parser, the per-CPU scratch and the flow key cost a TC hook 30 ns a packet.
//!
//! A cached flow passes exactly where the shortcut (`verdict::pass_established`) passed its
//! last packet: the same flow key and direction, the same hook, interface and sending socket's
//! cgroup, under the same generation. The socket's own cgroup, not the service's above it
//! that the full path binds the flow to: a cgroup's ancestors never change, and the
//! generation fixes which of them is a service's, so the same own cgroup under the same
//! generation is bound the same way, and a cached packet skips the walk (a helper call and a
//! hash lookup for each level the services' cgroups sit at). What else could have changed
//! since is bounded by the entry's age: it is trusted for [`timeout::REFRESH_NS`] after the
//! shortcut last checked it, then the shortcut checks it again, which also refreshes the
//! conntrack entry's `last_seen` as often as a packet of its own would. Packets that change a
//! flow's state (TCP SYN, FIN, RST) and fragments never use the cache.
//!
//! Nothing here needs invalidating from other CPUs: a new generation makes every entry stale
//! at once, and an entry only passes packets the conntrack entry it was taken from passes
//! (an expired flow has had no packet for longer than an entry lives). The one difference: a
//! flow the kernel evicted from a full conntrack table still passes for what is left of the
//! second; it was admitted under the policy in force.
//!
//! A packet passed from the cache is counted in its slot, not in the per-CPU counters: the
//! slot's counts move there when the slot is written again, and the controller adds what the
//! slots hold when it reads the counters (after them, so that counts moving meanwhile show at
//! the next read, never twice).

use enforcer_common::{
    config::PolicyConfig,
    conntrack::{CachedFlow, CtKey4, FLOW_CACHE_SLOTS, timeout},
    counters::Counter,
    policy::proto,
    verdict::reason,
};

use crate::{
    conntrack,
    maps::FLOW_CACHES,
    packet::{self, Frame, TCP_FIN, TCP_RST, TCP_SYN, fragment},
    report::{self, Hook},
    subject::Subject,
};

/// 1: the cache is used. The controller leaves it on; the datapath benchmark loads a copy
/// with it off, to measure the conntrack path it stands in front of. A frozen read-only
/// global: the verifier drops the branch not taken.
#[unsafe(no_mangle)]
static FLOW_CACHE_ON: u8 = 1;

#[inline(always)]
fn enabled() -> bool {
    // SAFETY: a plain read of a global; volatile so that it is read from the map at run time
    // rather than folded into the default at compile time.
    unsafe { core::ptr::read_volatile(&FLOW_CACHE_ON) != 0 }
}

/// What [`pass`] returns for a packet it leaves to the full path (no verdict is 0).
pub const MISS: u8 = 0;

/// The verdict of a packet of a cached flow under `config` (the packet's one reading of it, see
/// `verdict::judge`), counted in its slot; [`MISS`] when the full path has to decide. The
/// first thing an interface hook asks, before the parser: it reads only a plain frame's
/// headers (see `packet::plain_ipv4`), and a cached flow's packet then costs those loads and
/// one slot. Inlined into the entry point: a BPF call costs about 9 ns a packet here (see
/// `clock`), as much as the rest of it. Its locals grow the entry's frame, which fits since
/// `verdict::rejudge` left the chains under `conclude`.
#[inline(always)]
pub fn pass<F: Frame>(frame: &F, hook: &Hook, config: &PolicyConfig) -> u8 {
    if !enabled() {
        return MISS;
    }
    let Some(packet) = packet::plain_ipv4(frame) else {
        return MISS;
    };
    if !changes_no_state(packet.proto, packet.tcp_flags) {
        return MISS;
    }
    let mut key = CtKey4::default();
    let from_lo = conntrack::short_key(
        packet.src,
        packet.src_port,
        packet.dst,
        packet.dst_port,
        packet.proto,
        &mut key,
    ) as u8;
    let Some(cached) = slot(&key, from_lo, hook.kind) else {
        return MISS;
    };
    // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context).
    let cached = unsafe { &mut *cached };
    if !describes(cached, &key, from_lo, hook, config.generation)
        || hook.now.wrapping_sub(cached.checked_at) >= timeout::REFRESH_NS
    {
        return MISS;
    }
    // The counts stay in the slot until it is written again (`remember`).
    cached.packets += 1;
    cached.bytes += hook.len as u64;
    cached.verdict
}

/// Caches the packet's flow direction after the shortcut passed it with `verdict`.
#[inline(always)]
pub fn remember(hook: &Hook, subject: &Subject, verdict: u8) {
    if !cacheable(subject) {
        return;
    }
    let Some(cached) = slot(&subject.key.short, subject.from_lo, hook.kind) else {
        return;
    };
    // SAFETY: as in `pass`.
    let cached = unsafe { &mut *cached };
    if cached.packets != 0 {
        count_passed(cached);
    }
    let outcome = &subject.outcome;
    cached.key = subject.key.short;
    cached.cgroup_id = subject.socket_cgroup;
    cached.checked_at = hook.now;
    cached.packets = 0;
    cached.bytes = 0;
    cached.ifindex = hook.ifindex;
    cached.generation = outcome.generation;
    cached.src_identity = outcome.src_identity;
    cached.dst_identity = outcome.dst_identity;
    cached.hook_kind = hook.kind;
    cached.from_lo = subject.from_lo;
    cached.verdict = verdict;
}

/// Moves the counts of the packets a slot passed to the per-CPU counters, before the slot is
/// written again. A function of its own: `remember` runs in the shortcut's frame, which is on
/// the deepest call chain (5.10's verifier counts every frame of it against 512 bytes).
#[inline(never)]
fn count_passed(cached: &CachedFlow) {
    let passed = Counter {
        packets: u64::from(cached.packets),
        bytes: cached.bytes,
    };
    report::add_counts(
        cached.verdict,
        reason::ESTABLISHED,
        cached.src_identity,
        cached.dst_identity,
        &passed,
    );
}

/// A plain IPv4 packet that changes no connection state (see [`changes_no_state`]): what
/// [`pass`] looks up.
#[inline(always)]
fn cacheable(subject: &Subject) -> bool {
    let packet = &subject.packet;
    enabled()
        && subject.key.ipv4 != 0
        && packet.fragment == fragment::NONE
        && packet.l4_offset as usize == packet::PLAIN_IPV4_L4_OFFSET
        && changes_no_state(packet.proto, packet.tcp_flags)
}

/// A TCP segment without SYN, FIN or RST, or a UDP datagram: packets the cache may pass
/// (the others change a flow's state, which conntrack has to see).
#[inline(always)]
fn changes_no_state(protocol: u8, tcp_flags: u8) -> bool {
    match protocol {
        proto::TCP => tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0,
        proto::UDP => true,
        _ => false,
    }
}

#[inline(always)]
fn describes(cached: &CachedFlow, key: &CtKey4, from_lo: u8, hook: &Hook, generation: u32) -> bool {
    cached.key.addr_lo == key.addr_lo
        && cached.key.addr_hi == key.addr_hi
        && cached.key.port_lo == key.port_lo
        && cached.key.port_hi == key.port_hi
        && cached.key.proto == key.proto
        && cached.from_lo == from_lo
        && cached.hook_kind == hook.kind
        && cached.ifindex == hook.ifindex
        && cached.cgroup_id == hook.cgroup_id
        && cached.generation == generation
        && cached.checked_at != 0
}

/// The flow direction's slot in this CPU's table.
#[inline(always)]
fn slot(key: &CtKey4, from_lo: u8, hook_kind: u8) -> Option<*mut CachedFlow> {
    let table = FLOW_CACHES.get_ptr_mut(0)?;
    // SAFETY: this CPU's table; the index is below `FLOW_CACHE_SLOTS` (masked).
    Some(unsafe {
        (*table)
            .slots
            .as_mut_ptr()
            .add(slot_index(key, from_lo, hook_kind) as usize)
    })
}

/// The flow direction's slot index: the same flow forwarded through the host is seen by two hooks
/// on one CPU, and each direction by one, so all of them take part, in the low bits (the
/// variants of one flow never share a slot). A multiply carries a difference only upwards, so
/// each round folds the high half down: addresses that differ in their first octet part too.
#[inline(always)]
fn slot_index(key: &CtKey4, from_lo: u8, hook_kind: u8) -> u32 {
    let ports = (key.port_lo as u32) << 16 | key.port_hi as u32;
    let direction = (hook_kind as u32) << 1 | from_lo as u32;
    let mut mixed = key.addr_lo.wrapping_mul(0x9E37_79B1) ^ key.addr_hi;
    mixed = (mixed ^ (mixed >> 16)).wrapping_mul(0x85EB_CA6B) ^ ports;
    mixed = (mixed ^ (mixed >> 16)).wrapping_mul(0xC2B2_AE35);
    (mixed ^ (mixed >> 16) ^ direction) & (FLOW_CACHE_SLOTS - 1)
}
