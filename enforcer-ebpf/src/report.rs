//! Counters and flow events.

use enforcer_common::{
    counters::{Counter, FlowCounterKey},
    event::{REPORT_INTERVAL_NS, ReportKey, ReportState},
    verdict::packet_counter_index,
};

use crate::{
    maps::{EVENT_STATE, EVENTS, FLOW_COUNTS, PACKET_COUNTS, REPORTS},
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
    pub cgroup_id: u64,
    pub len: u32,
    pub now: u64,
}

impl Hook {
    /// The packet is entering the host through `ifindex` (XDP or TC ingress): where the
    /// endpoint-interface identity and anti-spoofing apply.
    #[inline(always)]
    pub fn entering(&self) -> bool {
        self.kind != enforcer_common::event::hook::TC_EGRESS
    }
}

/// Adds the packet to the per-CPU volume counters.
#[inline(never)]
pub fn count(hook: &Hook, verdict: u8, reason: u8, src_identity: u32, dst_identity: u32) {
    if let Some(counter) = PACKET_COUNTS.get_ptr_mut(packet_counter_index(verdict, reason)) {
        // SAFETY: per-CPU slot; programs on one CPU do not interleave (softirq context).
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += hook.len as u64;
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
    match FLOW_COUNTS.get_ptr_mut(&key) {
        // SAFETY: as above.
        Some(counter) => unsafe {
            (*counter).packets += 1;
            (*counter).bytes += hook.len as u64;
        },
        None => {
            let _ = FLOW_COUNTS.insert(
                &key,
                &Counter {
                    packets: 1,
                    bytes: hook.len as u64,
                },
                0,
            );
        }
    }
}

/// Reports a denial-like outcome at most once per [`REPORT_INTERVAL_NS`] per flow shape
/// (addresses, identities, destination port, protocol, reason), so a flood cannot drown the
/// ring buffer. The report that goes out carries how many packets it stands for.
#[inline(never)]
pub fn report_deduplicated(hook: &Hook, packet: &Packet, outcome: &Outcome) {
    let key = ReportKey {
        src_addr: packet.src,
        dst_addr: packet.dst,
        src_identity: outcome.src_identity,
        dst_identity: outcome.dst_identity,
        dst_port: packet.dst_port,
        proto: packet.proto,
        reason: outcome.reason,
        _pad: 0,
    };
    let count = match REPORTS.get_ptr_mut(&key) {
        Some(state) => {
            // SAFETY: map value pointer valid for this run; concurrent CPUs can at worst lose a
            // suppressed-count increment, never send a flood.
            let state = unsafe { &mut *state };
            if hook.now.saturating_sub(state.last_report_ns) < REPORT_INTERVAL_NS {
                state.suppressed += 1;
                return;
            }
            let count = state.suppressed + 1;
            state.suppressed = 0;
            state.last_report_ns = hook.now;
            count
        }
        None => {
            let _ = REPORTS.insert(
                &key,
                &ReportState {
                    last_report_ns: hook.now,
                    suppressed: 0,
                    _pad: 0,
                },
                0,
            );
            1
        }
    };
    report(hook, packet, outcome, count);
}

/// Sends one event. Every attempt takes the CPU's next sequence number, so one the ring buffer
/// could not take shows up as a gap as well as in the lost counter.
#[inline(never)]
pub fn report(hook: &Hook, packet: &Packet, outcome: &Outcome, count: u32) {
    let Some(state) = EVENT_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, see `count`.
    let state = unsafe { &mut *state };
    state.seq += 1;
    let Some(mut entry) = EVENTS.reserve(0) else {
        state.lost += 1;
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned record of the right size; every
    // field is written before submit, padding included, so no stale kernel memory leaks out.
    unsafe {
        (*event).timestamp_ns = hook.now;
        (*event).seq = state.seq;
        (*event).cgroup_id = hook.cgroup_id;
        (*event).src_addr = packet.src;
        (*event).dst_addr = packet.dst;
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
        (*event).flags = outcome.flags;
        (*event)._pad = [0; 6];
    }
    entry.submit(0);
}
