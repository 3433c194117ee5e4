//! Counters and flow events.

use enforcer_common::{
    counters::{Counter, FlowCounterKey, edge_cache_slot},
    event::{
        DENIAL_SLOTS, DenialDetails, DenialSlot, DenialTable, FlowEvent, REPORT_INTERVAL_NS,
        ReportKey, ReportState, flags, may_wake_reader, reason_is_urgent,
    },
    verdict::packet_counter_index,
};

use crate::{
    cpu_state::{self, CpuState, RoomEstimate},
    maps::{
        DENIAL_DETAILS, DENIAL_TABLE, EDGE_CACHE, EVENT_STATE, EVENTS, EVENTS_BYTES, FLOW_COUNTS,
        LOST_PACKETS, PACKET_COUNTS,
    },
    packet::Packet,
};

/// Everything an event says besides the packet itself.
#[repr(C)]
pub struct Outcome {
    pub verdict: u8,
    pub reason: u8,
    pub rule: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub addr_identity: u32,
    pub generation: u32,
    pub flags: u8,
}

impl Outcome {
    pub const EMPTY: Self = Self {
        verdict: 0,
        reason: 0,
        rule: 0,
        src_identity: 0,
        dst_identity: 0,
        addr_identity: 0,
        generation: 0,
        flags: 0,
    };
}

/// Where and when a packet was seen.
pub struct Hook {
    /// An `enforcer_common::event::hook` code.
    pub kind: u8,
    pub ifindex: u32,
    /// The interface the packet came in through: `ifindex` when entering, the forwarded
    /// packet's ingress interface at TC egress, 0 for a packet this host sent.
    pub arrived_on: u32,
    /// The sending socket's cgroup (TC egress), else 0.
    pub cgroup_id: u64,
    /// The receiving socket's cgroup (the socket hook), else 0.
    pub receiving_cgroup: u64,
    pub len: u32,
    pub now: u64,
}

impl Hook {
    /// The packet is entering the host through `ifindex` (XDP or TC ingress): where the
    /// endpoint-interface identity and anti-spoofing apply.
    #[inline(always)]
    pub fn entering(&self) -> bool {
        use enforcer_common::event::hook::{TC_INGRESS, XDP_INGRESS};
        self.kind == XDP_INGRESS || self.kind == TC_INGRESS
    }
}

/// Adds the packet to the per-CPU volume counters. Inlined into `conclude`, which every
/// judged packet ends in: a BPF call costs about 9 ns here (see `clock`).
#[inline(always)]
pub fn count(hook: &Hook, verdict: u8, reason: u8, src_identity: u32, dst_identity: u32) {
    let packets = Counter {
        packets: 1,
        bytes: hook.len as u64,
    };
    add_counts(verdict, reason, src_identity, dst_identity, &packets);
}

/// [`count`] in a BPF function of its own, for the few packets that end elsewhere than in
/// `conclude`: the entry points' frames, on every chain of calls, stay as they are (5.10's and
/// 6.1's verifiers count every frame of the deepest chain against 512 bytes).
#[inline(never)]
pub fn count_apart(hook: &Hook, verdict: u8, reason: u8, src_identity: u32, dst_identity: u32) {
    count(hook, verdict, reason, src_identity, dst_identity);
}

/// Adds `packets` to the per-CPU volume counters (see [`count`]).
#[inline(always)]
pub fn add_counts(
    verdict: u8,
    reason: u8,
    src_identity: u32,
    dst_identity: u32,
    packets: &Counter,
) {
    if let Some(counter) = PACKET_COUNTS.get_ptr_mut(packet_counter_index(verdict, reason)) {
        // SAFETY: per-CPU slot; programs on one CPU do not interleave (softirq context).
        let counter = unsafe { &mut *counter };
        counter.packets += packets.packets;
        counter.bytes += packets.bytes;
    }
    if src_identity == 0 && dst_identity == 0 {
        return;
    }
    let key = FlowCounterKey {
        src_identity,
        dst_identity,
        verdict,
        _pad: [0; 3],
    };
    let Some(slot) = EDGE_CACHE.get_ptr_mut(edge_cache_slot(&key)) else {
        add_to_edge_table(&key, packets.packets, packets.bytes);
        return;
    };
    // SAFETY: as above.
    let slot = unsafe { &mut *slot };
    if slot.counter.packets != 0 && !same_edge(&slot.key, &key) {
        // Another edge took the slot: its counts go to the table first, so none is lost.
        add_to_edge_table(&slot.key, slot.counter.packets, slot.counter.bytes);
        slot.counter = Counter::default();
    }
    slot.key = key;
    slot.counter.packets += packets.packets;
    slot.counter.bytes += packets.bytes;
}

#[inline(always)]
fn same_edge(a: &FlowCounterKey, b: &FlowCounterKey) -> bool {
    a.src_identity == b.src_identity && a.dst_identity == b.dst_identity && a.verdict == b.verdict
}

/// Adds to an edge's counts in the per-CPU table (the cache's slots are added to them by the
/// controller).
#[inline(never)]
fn add_to_edge_table(key: &FlowCounterKey, packets: u64, bytes: u64) {
    match FLOW_COUNTS.get_ptr_mut(key) {
        // SAFETY: per-CPU value; programs on one CPU do not interleave (softirq context).
        Some(counter) => unsafe {
            (*counter).packets += packets;
            (*counter).bytes += bytes;
        },
        None => {
            let _ = FLOW_COUNTS.insert(key, &Counter { packets, bytes }, 0);
        }
    }
}

/// The share of the ring buffer (1/8) below which records of other reasons than the urgent
/// ones are not sent (counted as lost): the room left is for the urgent ones.
const URGENT_ROOM_SHIFT: u32 = 3;
/// The share (1/2) below which a denial of a reason that is not urgent is de-duplicated per
/// source and reason instead of per flow shape: a scan or a flood then makes one record a
/// second per source, with the count, instead of one per shape.
const AGGREGATE_BELOW_SHIFT: u32 = 1;

/// The ring buffer's size in bytes, as the controller created it: set before loading when it
/// differs from the declared one. Known, not asked: `bpf_ringbuf_query` is a helper call, and
/// a call costs as much as the rest of a new shape's record-keeping (see `clock`).
#[unsafe(no_mangle)]
static RING_BYTES: u32 = EVENTS_BYTES;

/// The ring buffer's free room and size, as this CPU estimates them, read once per record.
#[derive(Clone, Copy)]
pub struct RingRoom {
    free: u64,
    size: u64,
}

/// The bytes a record takes in the ring buffer: the record and the kernel's 8-byte header,
/// rounded up to 8.
const RECORD_BYTES: u64 = (size_of::<FlowEvent>() as u64 + 8 + 7) & !7;

impl RingRoom {
    /// Not read yet (no ring buffer has size 0). Not an `Option`: 5.10's verifier refuses the
    /// read of a `None`'s uninitialized payload that the compiler emits.
    pub const UNREAD: Self = Self { free: 0, size: 0 };

    #[inline(always)]
    fn is_read(self) -> bool {
        self.size != 0
    }

    /// This room, estimated now if it was not.
    #[inline(always)]
    fn read(self) -> Self {
        if self.is_read() {
            self
        } else {
            Self::estimate()
        }
    }

    /// This CPU's estimate: the ring buffer's free bytes as `bpf_ringbuf_query` gave them in
    /// this tick, less the records this CPU reserved since ([`RingRoom::take_record`]): a
    /// helper call once a tick rather than on every new shape (see `clock` for what a call
    /// costs here). Within a tick the estimate misses what the reader consumed (it is low,
    /// and a record may be aggregated or crowded out a tick early) and what other CPUs
    /// reserved (it is high: a record the estimate let through may find the ring full, and
    /// is then counted lost as any is).
    #[inline(always)]
    pub fn estimate() -> Self {
        let size = ring_bytes();
        let Some(state) = cpu_state::this_cpu() else {
            return Self {
                free: free_bytes(size),
                size,
            };
        };
        if state.room.tick != state.clock.tick {
            state.room = RoomEstimate {
                tick: state.clock.tick,
                free: free_bytes(size),
            };
        }
        Self {
            free: state.room.free,
            size,
        }
    }

    /// Takes a record reserved by this CPU off its estimate.
    #[inline(always)]
    fn take_record(state: &mut CpuState) {
        state.room.free = state.room.free.saturating_sub(RECORD_BYTES);
    }

    /// Whether the free room is below `1 / (1 << shift)` of the size.
    #[inline(always)]
    fn below(self, shift: u32) -> bool {
        self.free < self.size >> shift
    }
}

/// The ring buffer's size: known, not asked (see [`RING_BYTES`]).
#[inline(always)]
fn ring_bytes() -> u64 {
    // SAFETY: a plain read of a global; volatile so that it is read from the map at run time
    // rather than folded into the default at compile time.
    u64::from(unsafe { core::ptr::read_volatile(&RING_BYTES) })
}

/// The ring buffer's free bytes now, of `size`.
#[inline(always)]
fn free_bytes(size: u64) -> u64 {
    let ring = core::ptr::from_ref(&EVENTS).cast_mut().cast();
    // SAFETY: a ring buffer map; BPF_RB_AVAIL_DATA (0) asks for the bytes not yet consumed.
    let pending = unsafe { aya_ebpf::helpers::bpf_ringbuf_query(ring, 0) };
    size.saturating_sub(pending)
}

/// How a record goes out, besides what it says: the flags it adds to the outcome's, and
/// whether it is crowded out (the ring buffer is nearly full and its reason is not urgent, see
/// [`URGENT_ROOM_SHIFT`]: not sent, only counted as lost). One word, as one argument: a BPF
/// call takes five, and a pair of fields would be passed as two.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Sending(u16);

impl Sending {
    /// A record of `reason` with `extra_flags`, by the ring buffer's `room` (read now if the
    /// caller did not).
    #[inline(always)]
    pub fn of(reason: u8, extra_flags: u8, room: RingRoom) -> Self {
        let crowded = !reason_is_urgent(reason) && room.read().below(URGENT_ROOM_SHIFT);
        Self(u16::from(extra_flags) | u16::from(crowded) << 8)
    }

    #[inline(always)]
    fn extra_flags(self) -> u8 {
        self.0 as u8
    }

    #[inline(always)]
    fn crowded(self) -> bool {
        self.0 >> 8 != 0
    }
}

/// Reports a denial-like outcome at most once per [`REPORT_INTERVAL_NS`] per flow shape
/// (addresses, identities, destination port, protocol, reason) on this CPU, so a flood cannot
/// drown the ring buffer. The report that goes out carries how many packets it stands for.
/// While the ring buffer fills up, a new shape is aggregated per source and reason instead
/// (see [`AGGREGATE_BELOW_SHIFT`]), unless its reason is urgent.
///
/// A shape is remembered in one slot of a per-CPU array chosen by its hash, not in a hash
/// map: a flood of distinct shapes makes every packet a new one, and a shared hash map's miss
/// and insert were half of such a packet's cost. A shape takes over another's slot; the
/// packets the other had not reported yet go out first (see [`report_evicted`]), so every
/// denied packet is in some record's count or still pending in a slot. Inlined into
/// `conclude`, its one caller: a call of its own cost every denied packet about 9 ns.
#[inline(always)]
pub fn report_deduplicated(hook: &Hook, packet: &Packet, outcome: &Outcome) {
    let mut key = ReportKey {
        src_addr: packet.src.0,
        dst_addr: packet.dst.0,
        src_identity: outcome.src_identity,
        dst_identity: outcome.dst_identity,
        dst_port: packet.dst_port,
        proto: packet.proto,
        reason: outcome.reason,
        _pad: 0,
    };
    let Some(table) = DENIAL_TABLE.get_ptr_mut(0) else {
        return;
    };
    let mut index = denial_index(&key);
    let mut extra_flags = 0;
    // Read only for a new shape of a reason that is not urgent: the one kind it decides.
    let mut room = RingRoom::UNREAD;
    // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context).
    if !same_shape(unsafe { &(*denial_slot(table, index)).key }, &key)
        && !reason_is_urgent(outcome.reason)
    {
        room = RingRoom::estimate();
    }
    if room.is_read() && room.below(AGGREGATE_BELOW_SHIFT) {
        key.dst_addr = [0; 16];
        key.dst_identity = 0;
        key.dst_port = 0;
        key.proto = 0;
        extra_flags = flags::AGGREGATED;
        index = denial_index(&key);
    }
    // SAFETY: as above.
    let slot = unsafe { &mut *denial_slot(table, index) };
    if !same_shape(&slot.key, &key) {
        if slot.state.suppressed != 0 {
            report_evicted(slot, index, hook.now);
        }
        slot.key = key;
        slot.state = ReportState {
            last_report_ns: hook.now,
            suppressed: 0,
            _pad: 0,
        };
        report(
            hook,
            packet,
            outcome,
            1,
            Sending::of(outcome.reason, extra_flags, room),
        );
        return;
    }
    let state = &mut slot.state;
    if hook.now.saturating_sub(state.last_report_ns) < REPORT_INTERVAL_NS {
        state.suppressed += 1;
        remember_details(index, hook, packet, outcome, extra_flags);
        return;
    }
    let count = state.suppressed + 1;
    state.suppressed = 0;
    state.last_report_ns = hook.now;
    report(
        hook,
        packet,
        outcome,
        count,
        Sending::of(outcome.reason, extra_flags, room),
    );
}

/// Keeps what a record of the suppressed packet would say besides its key, for
/// [`report_evicted`]: the latest suppressed packet's, as a report names one packet among
/// those it counts.
#[inline(always)]
fn remember_details(index: u32, hook: &Hook, packet: &Packet, outcome: &Outcome, extra: u8) {
    let Some(table) = DENIAL_DETAILS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's table; the index is below `DENIAL_SLOTS` (masked).
    let details = unsafe { &mut *(*table).slots.as_mut_ptr().add(index as usize) };
    *details = DenialDetails {
        last_seen_ns: hook.now,
        cgroup_id: hook.cgroup_id,
        addr_identity: outcome.addr_identity,
        rule: outcome.rule,
        generation: outcome.generation,
        ifindex: hook.ifindex,
        src_port: packet.src_port,
        family: packet.family,
        verdict: outcome.verdict,
        hook: hook.kind,
        flags: outcome.flags | extra,
        _pad: [0; 2],
    };
}

/// Reports the packets `slot` counted but had not reported yet, as another shape takes it:
/// one record with the slot's key and the details [`remember_details`] kept, dated when the
/// latest of them was seen. A slot whose details this build never wrote (it was pinned by an
/// earlier one) has nothing to say them with: its packets stay unreported.
#[inline(never)]
fn report_evicted(slot: &DenialSlot, index: u32, now: u64) {
    let Some(table) = DENIAL_DETAILS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `remember_details`.
    let details = unsafe { &*(*table).slots.as_ptr().add(index as usize) };
    if details.last_seen_ns == 0 {
        return;
    }
    let key = &slot.key;
    let sending = Sending::of(key.reason, details.flags, RingRoom::UNREAD);
    send(
        now,
        key.reason,
        slot.state.suppressed,
        sending,
        |event, seq| {
            // SAFETY: as in `report`.
            unsafe {
                (*event).timestamp_ns = details.last_seen_ns;
                (*event).seq = seq;
                (*event).cgroup_id = details.cgroup_id;
                (*event).src_addr = key.src_addr;
                (*event).dst_addr = key.dst_addr;
                (*event).src_identity = key.src_identity;
                (*event).dst_identity = key.dst_identity;
                (*event).addr_identity = details.addr_identity;
                (*event).rule = details.rule;
                (*event).generation = details.generation;
                (*event).ifindex = details.ifindex;
                (*event).count = slot.state.suppressed;
                (*event).cpu = aya_ebpf::helpers::bpf_get_smp_processor_id();
                (*event).src_port = details.src_port;
                (*event).dst_port = key.dst_port;
                (*event).proto = key.proto;
                (*event).family = details.family;
                (*event).verdict = details.verdict;
                (*event).reason = key.reason;
                (*event).hook = details.hook;
                (*event).flags = sending.extra_flags();
                (*event)._pad = [0; 6];
            }
        },
    );
}

const _: () = assert!(align_of::<ReportKey>() == align_of::<u64>());

/// A report key as six words, for comparing and hashing it without `memcmp`.
#[inline(always)]
fn words(key: &ReportKey) -> [u64; 6] {
    // SAFETY: `ReportKey` is 48 bytes of plain integers without padding (size asserted in
    // enforcer-common) and 8-aligned (asserted above).
    unsafe { *core::ptr::from_ref(key).cast::<[u64; 6]>() }
}

#[inline(always)]
fn same_shape(a: &ReportKey, b: &ReportKey) -> bool {
    let (a, b) = (words(a), words(b));
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

/// Slot `index` of this CPU's de-duplication table.
#[inline(always)]
fn denial_slot(table: *mut DenialTable, index: u32) -> *mut DenialSlot {
    // SAFETY: the index is below `DENIAL_SLOTS` (masked in `denial_index`).
    unsafe { (*table).slots.as_mut_ptr().add(index as usize) }
}

/// The index of a shape's slot. Keys that differ only in a high byte (the last octet of an
/// IPv4 address, in the mapped form) must still part: a multiply carries a difference only
/// upwards, so each round folds the high half back down.
#[inline(always)]
fn denial_index(key: &ReportKey) -> u32 {
    let mut mixed: u64 = 0;
    for word in words(key) {
        mixed = (mixed ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        mixed ^= mixed >> 31;
    }
    ((mixed >> 32) as u32 ^ mixed as u32) & (DENIAL_SLOTS - 1)
}

/// Sends one event about `packet`. Inlined into `conclude` (through `report_deduplicated`
/// too): a new shape's record paid a call of its own.
#[inline(always)]
pub fn report(hook: &Hook, packet: &Packet, outcome: &Outcome, count: u32, sending: Sending) {
    send(hook.now, outcome.reason, count, sending, |event, seq| {
        // SAFETY: `event` points at a reserved, exclusively owned record of the right size;
        // every field is written before submit, padding included, so no stale kernel memory
        // leaks out.
        unsafe {
            (*event).timestamp_ns = hook.now;
            (*event).seq = seq;
            (*event).cgroup_id = hook.cgroup_id;
            (*event).src_addr = packet.src.0;
            (*event).dst_addr = packet.dst.0;
            (*event).src_identity = outcome.src_identity;
            (*event).dst_identity = outcome.dst_identity;
            (*event).addr_identity = outcome.addr_identity;
            (*event).rule = outcome.rule;
            (*event).generation = outcome.generation;
            (*event).ifindex = hook.ifindex;
            (*event).count = count;
            (*event).cpu = aya_ebpf::helpers::bpf_get_smp_processor_id();
            (*event).src_port = packet.src_port;
            (*event).dst_port = packet.dst_port;
            (*event).proto = packet.proto;
            (*event).family = packet.family;
            (*event).verdict = outcome.verdict;
            (*event).reason = outcome.reason;
            (*event).hook = hook.kind;
            (*event).flags = outcome.flags | sending.extra_flags();
            (*event)._pad = [0; 6];
        }
    });
}

/// Sends the record `write` fills in, of `reason`, standing for `packets`, at `now`. Every
/// attempt takes the CPU's next sequence number, so one the ring buffer could not take shows up
/// as a gap as well as in the lost counter, and its packets in `LOST_PACKETS`. A record whose
/// reason is not urgent is not sent once the ring buffer is nearly full (see [`Sending`]).
#[inline(always)]
fn send(
    now: u64,
    reason: u8,
    packets: u32,
    sending: Sending,
    write: impl FnOnce(*mut FlowEvent, u64),
) {
    let Some(state) = EVENT_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, see `count`.
    let state = unsafe { &mut *state };
    state.seq += 1;
    let reserved = if sending.crowded() {
        None
    } else {
        EVENTS.reserve(0)
    };
    let Some(mut entry) = reserved else {
        state.lost += 1;
        if let Some(lost) = LOST_PACKETS.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; programs on one CPU do not interleave (softirq context).
            unsafe { *lost += u64::from(packets) };
        }
        return;
    };
    write(entry.as_mut_ptr(), state.seq);
    let flags = match cpu_state::this_cpu() {
        Some(cpu) => {
            RingRoom::take_record(cpu);
            wakeup(cpu, now, reason)
        }
        None => 0,
    };
    entry.submit(flags);
}

/// The ring buffer's `BPF_RB_NO_WAKEUP`: the record is committed without waking the reader.
const BPF_RB_NO_WAKEUP: u64 = 1;

/// The commit flags of a record of `reason` sent `now`: the ring buffer's default (wake a
/// reader that has caught up) where [`may_wake_reader`] allows it, else no wakeup.
#[inline(always)]
fn wakeup(cpu: &mut CpuState, now: u64, reason: u8) -> u64 {
    if !may_wake_reader(reason, now, cpu.last_wakeup_ns) {
        return BPF_RB_NO_WAKEUP;
    }
    cpu.last_wakeup_ns = now;
    0
}
