//! Conntrack bookkeeping for the verdict: where a tracked flow's packets arrive, what a
//! packet of an admitted flow records, a new flow's entry, and whether an ICMP error is about a
//! tracked flow. The decisions are `verdict`'s; these only read and write entries.

use enforcer_common::{
    addr::family,
    conntrack::{CtEntry, flags as ct_flags},
    policy::RuleVerdict,
    verdict::{ALLOW, AUDIT, reason},
};

use crate::{
    conntrack,
    packet::{self, Frame, QuotedFlow},
    report::Hook,
    subject::Subject,
};

/// Whether a packet of a tracked flow came in where its direction's earlier packets did: the
/// same ingress interface (entering the host), the same sending socket's cgroup, or none (TC
/// egress).
#[inline(always)]
pub fn arrives_as_before(hook: &Hook, tracked: &CtEntry, from_initiator: bool) -> bool {
    if hook.entering() {
        hook.ifindex
            == if from_initiator {
                tracked.orig_ifindex
            } else {
                tracked.reply_ifindex
            }
    } else {
        hook.cgroup_id == 0
            || hook.cgroup_id
                == if from_initiator {
                    tracked.cgroup_id
                } else {
                    tracked.reply_cgroup_id
                }
    }
}

/// Whether this direction's packets were seen arriving somewhere else than this one: another
/// ingress interface, or another sending socket's cgroup.
#[inline(always)]
pub fn arrives_elsewhere(hook: &Hook, tracked: &CtEntry, from_initiator: bool) -> bool {
    let known = if hook.entering() {
        if from_initiator {
            tracked.orig_ifindex as u64
        } else {
            tracked.reply_ifindex as u64
        }
    } else if from_initiator {
        tracked.cgroup_id
    } else {
        tracked.reply_cgroup_id
    };
    known != 0 && !arrives_as_before(hook, tracked, from_initiator)
}

/// Notes where this direction's packets come from, once they passed the full checks. The
/// first place learnt stays until the flow is admitted again (a new generation): a packet
/// arriving elsewhere is judged in full every time and cannot move the flow.
#[inline(always)]
pub fn remember_arrival(hook: &Hook, tracked: &mut CtEntry, from_initiator: bool) {
    match (hook.entering(), from_initiator) {
        (true, true) if tracked.orig_ifindex == 0 => tracked.orig_ifindex = hook.ifindex,
        (true, false) if tracked.reply_ifindex == 0 => tracked.reply_ifindex = hook.ifindex,
        (false, true) if tracked.cgroup_id == 0 => tracked.cgroup_id = hook.cgroup_id,
        (false, false) if tracked.reply_cgroup_id == 0 => tracked.reply_cgroup_id = hook.cgroup_id,
        _ => {}
    }
}

/// The live conntrack entry of the subject's flow, as [`conntrack::live_entry`] finds it.
#[inline(always)]
pub fn tracked_entry(hook: &Hook, subject: &Subject) -> Option<*mut CtEntry> {
    conntrack::live_entry(&subject.key, subject.packet.opens_connection(), hook.now)
}

/// Whether the packet's source is its flow's initiator.
#[inline(always)]
pub fn from_initiator(subject: &Subject, tracked: &CtEntry) -> bool {
    (subject.from_lo != 0) == (tracked.flags & ct_flags::ORIG_IS_LO != 0)
}

/// Records a packet of a flow admitted under the current generation in its entry and in the
/// outcome. `may_close`: whether its RST or FIN counts (it arrived where its direction's
/// packets do); a blind one from elsewhere would otherwise end a live flow's entry.
#[inline(always)]
pub fn pass(
    hook: &Hook,
    subject: &mut Subject,
    entry: *mut CtEntry,
    from_initiator: bool,
    may_close: bool,
) {
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &*entry };
    let packet = &subject.packet;
    let outcome = &mut subject.outcome;
    outcome.verdict = if tracked.flags & ct_flags::AUDIT != 0 {
        AUDIT
    } else {
        ALLOW
    };
    outcome.reason = reason::ESTABLISHED;
    outcome.rule = tracked.rule;
    (outcome.src_identity, outcome.dst_identity) = if from_initiator {
        (tracked.src_identity, tracked.dst_identity)
    } else {
        (tracked.dst_identity, tracked.src_identity)
    };
    conntrack::observe(
        &subject.key,
        entry,
        subject.from_lo != 0,
        may_close && packet.tcp_fin(),
        may_close && packet.tcp_rst(),
        hook.now,
    );
}

/// A tracked flow that the current generation allows again: the entry takes the generation,
/// the rule and the identities, and where each direction arrives is learnt again — but the
/// answering socket's cgroup stays if it named the destination (`responder_named`).
#[inline(always)]
pub fn readmit(
    hook: &Hook,
    subject: &Subject,
    entry: *mut CtEntry,
    decision: &RuleVerdict,
    responder_named: bool,
) {
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &mut *entry };
    let from_lo = subject.from_lo != 0;
    tracked.generation = subject.outcome.generation;
    tracked.rule = decision.rule;
    tracked.src_identity = subject.src.identity;
    tracked.dst_identity = subject.dst.identity;
    tracked.flags &= !ct_flags::AUDIT;
    // Where the other direction arrives is checked again under the new generation.
    (tracked.orig_ifindex, tracked.reply_ifindex) = (0, 0);
    if !responder_named {
        tracked.reply_cgroup_id = 0;
    }
    remember_arrival(
        hook,
        tracked,
        from_lo == (tracked.flags & ct_flags::ORIG_IS_LO != 0),
    );
    conntrack::observe(
        &subject.key,
        entry,
        from_lo,
        subject.packet.tcp_fin(),
        subject.packet.tcp_rst(),
        hook.now,
    );
}

/// A tracked flow the current generation refuses but audit mode passes: kept, marked audited.
#[inline(always)]
pub fn keep_audited(subject: &Subject, entry: *mut CtEntry, decision: &RuleVerdict) {
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &mut *entry };
    tracked.generation = subject.outcome.generation;
    tracked.rule = decision.rule;
    tracked.flags |= ct_flags::AUDIT;
}

/// A new flow's entry, from the outcome.
#[inline(never)]
pub fn track(hook: &Hook, subject: &Subject, extra_flags: u32) {
    let outcome = &subject.outcome;
    let entry = CtEntry {
        created_ns: hook.now,
        last_seen_ns: hook.now,
        // The sending socket's cgroup, a service's or not: the shortcut compares against it,
        // judging again looks it up.
        cgroup_id: if hook.entering() { 0 } else { hook.cgroup_id },
        // The receiving socket's (at the socket hook): the one that answers.
        reply_cgroup_id: hook.receiving_cgroup,
        generation: outcome.generation,
        rule: outcome.rule,
        src_identity: outcome.src_identity,
        dst_identity: outcome.dst_identity,
        flags: if subject.from_lo != 0 {
            ct_flags::ORIG_IS_LO
        } else {
            0
        } | extra_flags,
        orig_ifindex: if hook.entering() { hook.ifindex } else { 0 },
        reply_ifindex: 0,
        _pad: 0,
    };
    conntrack::track(&subject.key, &entry);
}

/// What an ICMP error is to the tracked flows (see [`icmp_error_relation`]).
pub const UNRELATED: u8 = 0;
/// An error about a flow tracked under the current generation, sent to the quoted packet's
/// sender and no larger than an error is.
pub const RELATED: u8 = 1;
/// It quotes a tracked flow, but goes to someone else or is too large to be an error: a
/// workload with any tracked flow could otherwise send anything to anyone as an "error".
pub const FORGED: u8 = 2;

/// Whether an ICMP error quotes a packet of a flow tracked under the current generation, and if
/// so whether it is a true error about it: [`UNRELATED`], [`RELATED`] or [`FORGED`].
#[inline(never)]
pub fn icmp_error_relation<F: Frame>(frame: &F, hook: &Hook, subject: &mut Subject) -> u8 {
    let mut quoted = QuotedFlow {
        src: [0; 16],
        dst: [0; 16],
        src_v4: 0,
        dst_v4: 0,
        proto: 0,
        src_port: 0,
        dst_port: 0,
    };
    if !packet::quoted_flow(frame, &subject.packet, &mut quoted) {
        return UNRELATED;
    }
    // In the scratch map: the stack of this call chain is near the verifier's limit.
    let key = &mut subject.quoted_key;
    if subject.packet.family == family::INET {
        conntrack::flow_key_v4(
            quoted.src_v4,
            quoted.src_port,
            quoted.dst_v4,
            quoted.dst_port,
            quoted.proto,
            key,
        );
    } else {
        conntrack::flow_key_v6(
            &quoted.src,
            quoted.src_port,
            &quoted.dst,
            quoted.dst_port,
            quoted.proto,
            key,
        );
    }
    let tracked = match conntrack::live_entry(key, false, hook.now) {
        // SAFETY: map value pointer, read once.
        Some(entry) => unsafe { (*entry).generation == subject.outcome.generation },
        None => false,
    };
    if !tracked {
        return UNRELATED;
    }
    // The quoted packet travelled from the error's receiver: an error goes back to its sender.
    if subject.packet.dst.0 != quoted.src || !subject.packet.is_error_sized() {
        return FORGED;
    }
    RELATED
}
