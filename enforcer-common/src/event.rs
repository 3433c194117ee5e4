//! Records the datapath sends to the controller through the ring buffer.

/// Which program judged the packet.
pub mod hook {
    /// XDP, packets entering the host (physical interfaces).
    pub const XDP_INGRESS: u8 = 1;
    pub const TC_EGRESS: u8 = 2;
    /// TC ingress, packets entering the host (veths, where XDP would cost segmentation offload).
    pub const TC_INGRESS: u8 = 3;
    /// cgroup_skb ingress: a packet the interface hook handed over, judged as it is delivered
    /// to a socket of this host, whose cgroup names the destination service.
    pub const SOCKET_INGRESS: u8 = 4;
}

/// Bits of [`FlowEvent::flags`].
pub mod flags {
    /// A tracked flow judged again because the policy generation changed.
    pub const REJUDGED: u8 = 1 << 0;
    /// Sent while the ring buffer was filling up: `count` covers every destination this source
    /// was refused for the same reason (de-duplicated per source and reason, not per flow
    /// shape); the destination fields are those of one packet among them.
    pub const AGGREGATED: u8 = 1 << 1;
}

/// Reasons whose records must reach the controller even under a flood of others: each says
/// someone lies about who they are or pushes past a limit. They may use the whole ring
/// buffer; other records leave them room (see `RingRoom` in the programs); and each wakes the
/// controller's reader at once, where others may wait for its next sweep.
pub const fn reason_is_urgent(reason: u8) -> bool {
    matches!(
        reason,
        crate::verdict::reason::SPOOFED
            | crate::verdict::reason::IDENTITY_MISMATCH
            | crate::verdict::reason::RATE_LIMITED
            | crate::verdict::reason::FORGED_ICMP_ERROR
    )
}

/// How often one CPU's records may wake the controller's reader (see [`may_wake_reader`]).
pub const WAKEUP_INTERVAL_NS: u64 = 1_000_000;

/// Whether a record of `reason` committed at `now` may wake the controller's reader, when this
/// CPU's records last woke it at `last_wakeup` (0: never). Waking it is an interrupt and a
/// wakeup of a task on another CPU, several times what the record costs; in a flood of new
/// shapes nearly every record did it, the reader having caught up each time (the ring buffer's
/// default wakes a reader that has caught up). So a CPU's records wake the reader at most once
/// per [`WAKEUP_INTERVAL_NS`], urgent ones always; the records in between are read with the one
/// that woke it, or at the reader's next sweep (`RING_SWEEP` in the controller). With the
/// coarse clock, that is once per clock tick at most.
pub const fn may_wake_reader(reason: u8, now: u64, last_wakeup: u64) -> bool {
    reason_is_urgent(reason) || now.wrapping_sub(last_wakeup) >= WAKEUP_INTERVAL_NS
}

/// One flow-level fact: a new allowed flow, a denied (or audited) flow, a spoofed packet, a
/// rate-limit hit. Denials are de-duplicated in the kernel: `count` says how many packets the
/// record stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `CLOCK_MONOTONIC` nanoseconds, as of the kernel's latest tick (the datapath reads the
    /// clock once a tick on each CPU: `enforcer-ebpf`'s `clock`).
    pub timestamp_ns: u64,
    /// Per-CPU sequence number: every record a CPU tried to send took the next one, so a gap
    /// is a record the ring buffer could not take.
    pub seq: u64,
    pub cgroup_id: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Identity the source address alone resolves to; differs from `src_identity` on spoofs.
    pub addr_identity: u32,
    pub rule: u32,
    pub generation: u32,
    pub ifindex: u32,
    pub count: u32,
    pub cpu: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// Protocol as on the wire (ICMPv6 stays 58 here).
    pub proto: u8,
    pub family: u8,
    pub verdict: u8,
    pub reason: u8,
    pub hook: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Key of the kernel-side de-duplication of denial reports. 8-aligned (its layout is the same
/// as 4-aligned) so that the datapath reads it as six aligned words: the BPF target cannot load
/// a word it does not know to be aligned, and reads it a byte at a time instead.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReportKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_port: u16,
    pub proto: u8,
    pub reason: u8,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportState {
    pub last_report_ns: u64,
    /// Packets seen since the last report.
    pub suppressed: u32,
    pub _pad: u32,
}

/// A slot of the per-CPU de-duplication of denial reports: the shape it last reported, and
/// when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenialSlot {
    pub key: ReportKey,
    pub state: ReportState,
}

/// Slots of the de-duplication of denial reports on each CPU.
pub const DENIAL_SLOTS: u32 = 512;
const _: () = assert!(DENIAL_SLOTS.is_power_of_two());

/// A CPU's de-duplication slots, one map value: one contiguous stretch of memory (eight pages)
/// rather than a separate per-CPU allocation per slot, scattered over the per-CPU area's pages
/// and reached through a table of pointers. In a flood of distinct shapes every packet takes a
/// slot at random; scattered, that cost a TLB and two cache misses (see `enforcer-ebpf`'s
/// `report::report_deduplicated`). 32 KiB is the most a per-CPU map value may hold.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DenialTable {
    pub slots: [DenialSlot; DENIAL_SLOTS as usize],
}

/// What a record of a de-duplicated shape says besides its [`ReportKey`], kept beside its
/// slot while it has packets not yet reported: when another shape takes the slot, they go
/// out in a record of their own instead of vanishing with the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenialDetails {
    /// When the latest packet not yet reported was seen; 0: none was since this build's
    /// programs were loaded (the slot is older than this table).
    pub last_seen_ns: u64,
    pub cgroup_id: u64,
    pub addr_identity: u32,
    pub rule: u32,
    pub generation: u32,
    pub ifindex: u32,
    pub src_port: u16,
    pub family: u8,
    pub verdict: u8,
    pub hook: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// The details of a CPU's de-duplication slots, slot for slot: a separate value because the
/// slots fill the largest one a per-CPU map holds, and touched only by packets that are
/// suppressed or that take over a slot with packets not yet reported.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DenialDetailsTable {
    pub slots: [DenialDetails; DENIAL_SLOTS as usize],
}

/// A key reports at most once per this interval; the next report carries the count.
pub const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

/// Per-CPU state of the event stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCpuState {
    /// Last sequence number handed out.
    pub seq: u64,
    /// Records the ring buffer could not take.
    pub lost: u64,
}

kernel_abi!(
    FlowEvent = 104,
    ReportKey = 48,
    ReportState = 16,
    DenialSlot = 64,
    DenialTable = 32768,
    DenialDetails = 40,
    DenialDetailsTable = 20480,
    EventCpuState = 16
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::reason;

    #[test]
    fn a_cpu_wakes_the_reader_at_most_once_an_interval_unless_urgent() {
        let start = 5 * WAKEUP_INTERVAL_NS;
        assert!(
            may_wake_reader(reason::DEFAULT_DENY, start, 0),
            "a CPU's first record wakes the reader"
        );
        assert!(!may_wake_reader(reason::DEFAULT_DENY, start, start));
        assert!(!may_wake_reader(
            reason::DEFAULT_DENY,
            start + WAKEUP_INTERVAL_NS - 1,
            start
        ));
        assert!(may_wake_reader(
            reason::DEFAULT_DENY,
            start + WAKEUP_INTERVAL_NS,
            start
        ));
        for urgent in [
            reason::SPOOFED,
            reason::IDENTITY_MISMATCH,
            reason::RATE_LIMITED,
            reason::FORGED_ICMP_ERROR,
        ] {
            assert!(
                may_wake_reader(urgent, start, start),
                "reason {urgent} is urgent"
            );
        }
    }
}
