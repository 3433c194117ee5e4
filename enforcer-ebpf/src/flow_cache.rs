//! Per-CPU caches of the flows this CPU passed through the shortcut lately, in front of
//! conntrack, one for IPv4 flows and one for IPv6 ones: the bulk of packets, an established
//! flow's, then pass after one array lookup instead of a hash lookup (two for a flow not
//! answered yet) and an entry update. They are asked before anything else, from a plain
//! frame's headers (`packet::plain_ipv4`, `packet::plain_ipv6`), not the parser's reading: in
//! real traffic, where the network stack evicts a program's lines between two packets, the
//! parser, the per-CPU scratch and the flow key cost a TC hook 30 ns a packet.
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
    conntrack::{
        CachedFlow, CachedPass, CtKey, CtKey4, FLOW_CACHE_SLOTS, FLOW_CACHE6_SLOTS, timeout,
    },
    counters::Counter,
    policy::proto,
    verdict::reason,
};

use crate::{
    conntrack,
    maps::{FLOW_CACHES, FLOW_CACHES6},
    packet::{self, Frame, Plain, TCP_FIN, TCP_RST, TCP_SYN, fragment},
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

/// The verdict of a packet of a cached flow under the generation `generation` (the packet's
/// one reading of the config, see `verdict::judge`), counted in its slot; [`MISS`] when the
/// full path has to decide. The first thing an interface hook asks, before the parser: it
/// reads only a plain frame's headers, and a cached flow's packet then costs those loads and
/// one slot.
#[inline(always)]
pub fn pass<F: Frame>(frame: &F, hook: &Hook, generation: u32) -> u8 {
    if !enabled() {
        return MISS;
    }
    match packet::plain_ipv4(frame) {
        Some(packet) => pass_ipv4(&packet, hook, generation),
        // What else is not plain IPv4 (ARP, a VLAN tag, IPv4 options) is not plain IPv6
        // either, and spares the call.
        None if packet::carries_ipv6(frame) => pass_ipv6(frame, hook, generation),
        None => MISS,
    }
}

/// [`pass`] for a plain IPv4 frame. Inlined into the entry point: a BPF call costs about 9 ns
/// a packet here (see `clock`), as much as the rest of it. Its locals grow the entry's frame,
/// which fits since `verdict::rejudge` left the chains under `conclude`.
#[inline(always)]
fn pass_ipv4(packet: &Plain<u32>, hook: &Hook, generation: u32) -> u8 {
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
    let Some(cached) = slot4(&key, from_lo, hook.kind) else {
        return MISS;
    };
    // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context).
    let cached = unsafe { &mut *cached };
    if !same_short_key(&cached.key, &key) {
        return MISS;
    }
    count_if_passes(&mut cached.pass, from_lo, hook, generation)
}

/// [`pass`] for an IPv6 frame, if plain. A BPF function of its own: the IPv4 path does not
/// carry its code, nor the entry point's frame its 40-byte key.
#[inline(never)]
fn pass_ipv6<F: Frame>(frame: &F, hook: &Hook, generation: u32) -> u8 {
    let Some(packet) = packet::plain_ipv6(frame) else {
        return MISS;
    };
    if !changes_no_state(packet.proto, packet.tcp_flags) {
        return MISS;
    }
    let mut key = CtKey::default();
    let from_lo = conntrack::long_key(
        &packet.src,
        packet.src_port,
        &packet.dst,
        packet.dst_port,
        packet.proto,
        &mut key,
    ) as u8;
    let Some(cached) = slot6(&key, from_lo, hook.kind) else {
        return MISS;
    };
    // SAFETY: as in `pass_ipv4`.
    let cached = unsafe { &mut *cached };
    if !same_long_key(&cached.key, &key) {
        return MISS;
    }
    count_if_passes(&mut cached.pass, from_lo, hook, generation)
}

/// The slot's verdict, the packet counted in it, if the slot describes where the packet is
/// (its key matched already) and was checked less than [`timeout::REFRESH_NS`] ago; else
/// [`MISS`].
#[inline(always)]
fn count_if_passes(pass: &mut CachedPass, from_lo: u8, hook: &Hook, generation: u32) -> u8 {
    if !(pass.from_lo == from_lo
        && pass.hook_kind == hook.kind
        && pass.ifindex == hook.ifindex
        && pass.cgroup_id == hook.cgroup_id
        && pass.generation == generation
        && pass.checked_at != 0)
        || hook.now.wrapping_sub(pass.checked_at) >= timeout::REFRESH_NS
    {
        return MISS;
    }
    // The counts stay in the slot until it is written again (`remember`).
    pass.packets += 1;
    pass.bytes += hook.len as u64;
    pass.verdict
}

/// Caches the packet's flow direction after the shortcut passed it with `verdict`.
#[inline(always)]
pub fn remember(hook: &Hook, subject: &Subject, verdict: u8) {
    if !cacheable(subject) {
        return;
    }
    let key = &subject.key;
    let cached = if key.ipv4 != 0 {
        let Some(cached) = slot4(&key.short, subject.from_lo, hook.kind) else {
            return;
        };
        // SAFETY: as in `pass_ipv4`.
        let cached = unsafe { &mut *cached };
        cached.key = key.short;
        &mut cached.pass
    } else {
        let Some(cached) = slot6(&key.long, subject.from_lo, hook.kind) else {
            return;
        };
        // SAFETY: as in `pass_ipv4`.
        let cached = unsafe { &mut *cached };
        cached.key = key.long;
        &mut cached.pass
    };
    if cached.packets != 0 {
        count_passed(cached);
    }
    let outcome = &subject.outcome;
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
fn count_passed(cached: &CachedPass) {
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

/// A plain packet that changes no connection state (see [`changes_no_state`]): what [`pass`]
/// looks up.
#[inline(always)]
fn cacheable(subject: &Subject) -> bool {
    let packet = &subject.packet;
    let plain_l4_offset = if subject.key.ipv4 != 0 {
        packet::PLAIN_IPV4_L4_OFFSET
    } else {
        packet::PLAIN_IPV6_L4_OFFSET
    };
    enabled()
        && packet.fragment == fragment::NONE
        && packet.l4_offset as usize == plain_l4_offset
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
fn same_short_key(cached: &CtKey4, key: &CtKey4) -> bool {
    cached.addr_lo == key.addr_lo
        && cached.addr_hi == key.addr_hi
        && cached.port_lo == key.port_lo
        && cached.port_hi == key.port_hi
        && cached.proto == key.proto
}

/// Word by word: an array comparison would be a `memcmp` call, which BPF does not have.
#[inline(always)]
fn same_long_key(cached: &CtKey, key: &CtKey) -> bool {
    let (cached, key) = (cached.words(), key.words());
    cached[0] == key[0]
        && cached[1] == key[1]
        && cached[2] == key[2]
        && cached[3] == key[3]
        && cached[4] == key[4]
}

/// The IPv4 flow direction's slot in this CPU's table.
#[inline(always)]
fn slot4(key: &CtKey4, from_lo: u8, hook_kind: u8) -> Option<*mut CachedFlow<CtKey4>> {
    let table = FLOW_CACHES.get_ptr_mut(0)?;
    let index = slot_index(key.addr_lo, key.addr_hi, ports(key.port_lo, key.port_hi));
    let index = in_direction(index, from_lo, hook_kind) & (FLOW_CACHE_SLOTS - 1);
    // SAFETY: this CPU's table; the index is below `FLOW_CACHE_SLOTS` (masked).
    Some(unsafe { (*table).slots.as_mut_ptr().add(index as usize) })
}

/// The IPv6 flow direction's slot in this CPU's table: as [`slot4`], of each address's words
/// folded into one.
#[inline(always)]
fn slot6(key: &CtKey, from_lo: u8, hook_kind: u8) -> Option<*mut CachedFlow<CtKey>> {
    let table = FLOW_CACHES6.get_ptr_mut(0)?;
    let words = key.words();
    let (lo, hi) = (words[0] ^ words[1], words[2] ^ words[3]);
    let index = slot_index(
        (lo ^ (lo >> 32)) as u32,
        (hi ^ (hi >> 32)) as u32,
        ports(key.port_lo, key.port_hi),
    );
    let index = in_direction(index, from_lo, hook_kind) & (FLOW_CACHE6_SLOTS - 1);
    // SAFETY: this CPU's table; the index is below `FLOW_CACHE6_SLOTS` (masked).
    Some(unsafe { (*table).slots.as_mut_ptr().add(index as usize) })
}

#[inline(always)]
fn ports(port_lo: u16, port_hi: u16) -> u32 {
    (port_lo as u32) << 16 | port_hi as u32
}

/// A flow's slot index before its direction: a multiply carries a difference only upwards,
/// so each round folds the high half down, and addresses that differ in their first octet
/// part too.
#[inline(always)]
fn slot_index(addr_lo: u32, addr_hi: u32, ports: u32) -> u32 {
    let mut mixed = addr_lo.wrapping_mul(0x9E37_79B1) ^ addr_hi;
    mixed = (mixed ^ (mixed >> 16)).wrapping_mul(0x85EB_CA6B) ^ ports;
    mixed = (mixed ^ (mixed >> 16)).wrapping_mul(0xC2B2_AE35);
    mixed ^ (mixed >> 16)
}

/// The flow direction's slot index: the same flow forwarded through the host is seen by two
/// hooks on one CPU, and each direction by one, so all of them take part, in the low bits (the
/// variants of one flow never share a slot).
#[inline(always)]
fn in_direction(index: u32, from_lo: u8, hook_kind: u8) -> u32 {
    index ^ ((hook_kind as u32) << 1 | from_lo as u32)
}
