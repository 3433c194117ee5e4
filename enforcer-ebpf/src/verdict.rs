//! The decision for one packet, in the order of DESIGN §4:
//! shape → identity and anti-spoofing → fragments → conntrack (re-judged after a policy change)
//! → ICMP errors of tracked flows → rules (deny beats allow) → rate limit → default.
//! Audit mode runs the same steps and turns every drop into a reported pass.
//!
//! One shortcut, for the bulk of packets: a packet of a flow admitted under the current
//! generation, arriving where that direction's earlier packets arrived (the same ingress
//! interface at XDP, the same socket cgroup at TC), passes without identity lookups. Those
//! earlier packets went through the identity and anti-spoofing checks, under this same
//! generation; anything else takes the full path, which records where it came from.
//!
//! The steps are separate BPF functions (`#[inline(never)]`) taking the [`Subject`] by
//! reference: each gets its own stack frame, which keeps the whole under the 512-byte BPF stack.

use enforcer_common::{
    config::flags as config_flags,
    conntrack::{CtEntry, CtKey, FRAG_TIMEOUT_NS, FragEntry, FragKey, flags as ct_flags},
    event::flags as event_flags,
    identity::{FIRST_SERVICE, IdentityInfo, SERVICE_END},
    policy::{action, rule},
    verdict::{ALLOW, AUDIT, DENY, reason},
};

use crate::{
    conntrack, identity,
    maps::FRAGMENTS,
    maps::SCRATCH,
    packet::{self, Frame, Packet, QuotedFlow, fragment},
    report::{self, Hook, Outcome},
    rules,
};

/// The packet being judged and what is known about it so far. It lives in the per-CPU
/// [`SCRATCH`] map, not on the stack: the verifier allows 512 bytes of stack across all nested
/// calls, and the subject alone would take a third of that.
#[repr(C)]
pub struct Subject {
    pub packet: Packet,
    pub outcome: Outcome,
    pub src: IdentityInfo,
    pub dst: IdentityInfo,
    /// Conntrack key of the packet's flow, and whether the packet's source is its `lo` end.
    pub key: CtKey,
    pub from_lo: u8,
    pub slot: u8,
    pub global_audit: u8,
    /// Whether conntrack has an entry for the flow (looked up once, by [`pass_established`]).
    pub tracked: u8,
}

/// Judges the frame and returns [`ALLOW`], [`DENY`] or [`AUDIT`] (which passes).
#[inline(always)]
pub fn judge<F: Frame>(frame: &F, hook: &Hook) -> u8 {
    let Some(subject) = SCRATCH.get_ptr_mut(0) else {
        // A one-entry per-CPU array always has its entry; fail closed if not.
        return DENY;
    };
    // SAFETY: this CPU's slot, used by one program run at a time (XDP and TC run with bottom
    // halves off and do not nest on a CPU).
    let subject = unsafe { &mut *subject };
    subject.outcome = Outcome::EMPTY;
    subject.src = IdentityInfo::WORLD;
    subject.dst = IdentityInfo::WORLD;
    subject.tracked = 0;
    match packet::parse(frame, &mut subject.packet) {
        packet::PARSED_IP => {}
        packet::NOT_IP => return ALLOW,
        why => return refuse_shape(hook, why),
    }
    let Some(config) = identity::active_config() else {
        report::count(hook, DENY, reason::NO_POLICY, 0, 0);
        return DENY;
    };
    if subject.packet.is_link_infrastructure() {
        report::count(hook, ALLOW, reason::INFRASTRUCTURE, 0, 0);
        return ALLOW;
    }
    subject.slot = config.slot as u8;
    subject.global_audit = (config.flags & config_flags::AUDIT != 0) as u8;
    subject.outcome.generation = config.generation;

    // Later fragments have no ports, so no flow key.
    if subject.packet.fragment != fragment::LATER {
        let packet = &subject.packet;
        let from_lo = conntrack::flow_key(
            &packet.src,
            packet.src_port,
            &packet.dst,
            packet.dst_port,
            packet.proto,
            &mut subject.key,
        );
        subject.from_lo = from_lo as u8;
        let verdict = pass_established(hook, subject);
        if verdict != NOT_TRACKED {
            return verdict;
        }
    }
    if !resolve_identities(hook, subject) {
        return refuse(hook, subject);
    }
    if subject.packet.fragment == fragment::LATER {
        return follow_first_fragment(hook, subject);
    }
    if subject.tracked != 0 {
        let verdict = judge_tracked(hook, subject);
        if verdict != NOT_TRACKED {
            return verdict;
        }
    }
    if subject.packet.is_icmp_error() && is_about_tracked_flow(frame, hook, subject) {
        subject.outcome.verdict = ALLOW;
        subject.outcome.reason = reason::RELATED;
        return conclude(hook, subject, Report::Nothing);
    }
    judge_new_flow(hook, subject)
}

/// Source and destination identity, strongest source first, with the checks that keep them
/// honest. False when the packet is spoofed (the outcome then says how).
#[inline(never)]
fn resolve_identities(hook: &Hook, subject: &mut Subject) -> bool {
    let by_address = identity::of_address(subject.slot, &subject.packet.src);
    subject.dst = identity::of_address(subject.slot, &subject.packet.dst);
    subject.src = by_address;
    subject.outcome.addr_identity = by_address.identity;
    subject.outcome.src_identity = by_address.identity;
    subject.outcome.dst_identity = subject.dst.identity;
    if hook.entering() {
        if let Some(endpoint) = identity::of_endpoint(subject.slot, hook.ifindex) {
            subject.src = endpoint;
            subject.outcome.src_identity = endpoint.identity;
            if by_address.identity != endpoint.identity {
                subject.outcome.reason = reason::SPOOFED;
                subject.outcome.rule = rule::ANTI_SPOOFING;
                return false;
            }
        }
    } else if let Some(owner) = identity::of_cgroup(subject.slot, hook.cgroup_id) {
        subject.src = owner;
        subject.outcome.src_identity = owner.identity;
        let address_names_a_service =
            by_address.identity >= FIRST_SERVICE && by_address.identity < SERVICE_END;
        if address_names_a_service && by_address.identity != owner.identity {
            subject.outcome.reason = reason::IDENTITY_MISMATCH;
            subject.outcome.rule = rule::ANTI_SPOOFING;
            return false;
        }
    }
    true
}

/// What [`judge_tracked`] and [`pass_established`] return when they do not decide.
const NOT_TRACKED: u8 = 0;

/// Whether a packet of a tracked flow came in where its direction's earlier packets did: the
/// same ingress interface (entering the host), the same sending socket's cgroup, or none (TC
/// egress).
#[inline(always)]
fn arrives_as_before(hook: &Hook, tracked: &CtEntry, from_initiator: bool) -> bool {
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

/// Notes where this direction's packets come from, once they passed the full checks.
#[inline(always)]
fn remember_arrival(hook: &Hook, tracked: &mut CtEntry, from_initiator: bool) {
    match (hook.entering(), from_initiator) {
        (true, true) => tracked.orig_ifindex = hook.ifindex,
        (true, false) => tracked.reply_ifindex = hook.ifindex,
        (false, true) if hook.cgroup_id != 0 => tracked.cgroup_id = hook.cgroup_id,
        (false, false) if hook.cgroup_id != 0 => tracked.reply_cgroup_id = hook.cgroup_id,
        _ => {}
    }
}

/// The live conntrack entry of the subject's flow, as [`conntrack::live_entry`] finds it.
#[inline(always)]
fn tracked_entry(hook: &Hook, subject: &Subject) -> Option<*mut CtEntry> {
    let packet = &subject.packet;
    conntrack::live_entry(
        &subject.key,
        packet.is_tcp() && packet.tcp_syn_only(),
        hook.now,
    )
}

/// The shortcut (see the module documentation): [`NOT_TRACKED`] unless it applies.
#[inline(never)]
fn pass_established(hook: &Hook, subject: &mut Subject) -> u8 {
    let Some(entry) = tracked_entry(hook, subject) else {
        return NOT_TRACKED;
    };
    subject.tracked = 1;
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &*entry };
    let from_initiator = (subject.from_lo != 0) == (tracked.flags & ct_flags::ORIG_IS_LO != 0);
    if tracked.generation != subject.outcome.generation
        || !arrives_as_before(hook, tracked, from_initiator)
    {
        return NOT_TRACKED;
    }
    established(hook, subject, entry, from_initiator)
}

/// A packet of a flow admitted under the current generation.
#[inline(always)]
fn established(
    hook: &Hook,
    subject: &mut Subject,
    entry: *mut CtEntry,
    from_initiator: bool,
) -> u8 {
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
        entry,
        subject.from_lo != 0,
        packet.tcp_fin(),
        packet.tcp_rst(),
        hook.now,
    );
    conclude(hook, subject, Report::Nothing)
}

/// A packet of a tracked flow: passes if the flow was admitted under the current generation,
/// else is judged again. [`NOT_TRACKED`] if the flow is not tracked.
#[inline(never)]
fn judge_tracked(hook: &Hook, subject: &mut Subject) -> u8 {
    let Some(entry) = tracked_entry(hook, subject) else {
        return NOT_TRACKED;
    };
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &*entry };
    if tracked.generation != subject.outcome.generation {
        return judge_again(hook, subject, entry);
    }
    let from_initiator = (subject.from_lo != 0) == (tracked.flags & ct_flags::ORIG_IS_LO != 0);
    // This packet passed the identity checks just now: later ones of its direction arriving
    // the same way can take the shortcut.
    // SAFETY: as above; no reference to the entry is held across this write.
    remember_arrival(hook, unsafe { &mut *entry }, from_initiator);
    established(hook, subject, entry, from_initiator)
}

/// A tracked flow admitted under an older generation: judge it again as its initiator sent it,
/// so that revoking a rule cuts established connections at their next packet.
#[inline(never)]
fn judge_again(hook: &Hook, subject: &mut Subject, entry: *mut CtEntry) -> u8 {
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &mut *entry };
    let key = &subject.key;
    let from_lo = subject.from_lo != 0;
    let (initiator, responder, responder_port) = if tracked.flags & ct_flags::ORIG_IS_LO != 0 {
        (&key.addr_lo, &key.addr_hi, key.port_hi)
    } else {
        (&key.addr_hi, &key.addr_lo, key.port_lo)
    };
    subject.src = match identity::of_cgroup(subject.slot, tracked.cgroup_id) {
        Some(owner) => owner,
        None => identity::of_address(subject.slot, initiator),
    };
    subject.dst = identity::of_address(subject.slot, responder);
    let decision = rules::evaluate(
        subject.slot,
        &subject.src,
        &subject.dst,
        key.proto,
        responder_port,
    );
    subject.outcome.rule = decision.rule;
    subject.outcome.src_identity = subject.src.identity;
    subject.outcome.dst_identity = subject.dst.identity;
    subject.outcome.flags = event_flags::REJUDGED;
    if decision.action == action::ALLOW {
        tracked.generation = subject.outcome.generation;
        tracked.rule = decision.rule;
        tracked.src_identity = subject.src.identity;
        tracked.dst_identity = subject.dst.identity;
        tracked.flags &= !ct_flags::AUDIT;
        // Where the other direction arrives is checked again under the new generation.
        (
            tracked.orig_ifindex,
            tracked.reply_ifindex,
            tracked.reply_cgroup_id,
        ) = (0, 0, 0);
        remember_arrival(
            hook,
            tracked,
            from_lo == (tracked.flags & ct_flags::ORIG_IS_LO != 0),
        );
        conntrack::observe(
            entry,
            from_lo,
            subject.packet.tcp_fin(),
            subject.packet.tcp_rst(),
            hook.now,
        );
        subject.outcome.verdict = ALLOW;
        subject.outcome.reason = reason::ESTABLISHED;
        return conclude(hook, subject, Report::Nothing);
    }
    subject.outcome.reason = deny_reason(decision.rule);
    let verdict = refuse(hook, subject);
    if verdict == AUDIT {
        tracked.generation = subject.outcome.generation;
        tracked.rule = decision.rule;
        tracked.flags |= ct_flags::AUDIT;
    } else {
        conntrack::forget(&subject.key);
    }
    verdict
}

/// A flow conntrack does not know: rules, then the rate limit.
#[inline(never)]
fn judge_new_flow(hook: &Hook, subject: &mut Subject) -> u8 {
    let decision = rules::evaluate(
        subject.slot,
        &subject.src,
        &subject.dst,
        subject.packet.proto,
        subject.packet.dst_port,
    );
    subject.outcome.rule = decision.rule;
    if decision.action != action::ALLOW {
        subject.outcome.reason = deny_reason(decision.rule);
        let verdict = refuse(hook, subject);
        if verdict == AUDIT {
            track(hook, subject, ct_flags::AUDIT);
        }
        return verdict;
    }
    if decision.rule == rule::DEFAULT_ALLOW {
        // Traffic between undeclared parties is not the policy's: no tracking, no events.
        subject.outcome.verdict = ALLOW;
        subject.outcome.reason = reason::DEFAULT_ALLOW;
        return conclude(hook, subject, Report::Nothing);
    }
    let opens_connection = !subject.packet.is_tcp() || subject.packet.tcp_syn_only();
    if opens_connection && rules::over_limit(decision.bucket, decision.max_new_per_sec, hook.now) {
        subject.outcome.reason = reason::RATE_LIMITED;
        let verdict = refuse(hook, subject);
        if verdict == AUDIT {
            track(hook, subject, ct_flags::AUDIT);
        }
        return verdict;
    }
    subject.outcome.verdict = ALLOW;
    subject.outcome.reason = reason::POLICY_ALLOW;
    track(hook, subject, 0);
    conclude(hook, subject, Report::Flow)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    Nothing,
    /// A new flow: one event each.
    Flow,
    /// A denial-like outcome: de-duplicated in the kernel.
    Deduplicated,
}

/// Counts, remembers a first fragment's verdict for the rest of its datagram, reports.
#[inline(never)]
fn conclude(hook: &Hook, subject: &Subject, report_kind: Report) -> u8 {
    let outcome = &subject.outcome;
    report::count(
        hook,
        outcome.verdict,
        outcome.reason,
        outcome.src_identity,
        outcome.dst_identity,
    );
    if subject.packet.fragment == fragment::FIRST {
        remember_fragment(hook, subject);
    }
    match report_kind {
        Report::Nothing => {}
        Report::Flow => report::report(hook, &subject.packet, outcome, 1),
        Report::Deduplicated => report::report_deduplicated(hook, &subject.packet, outcome),
    }
    outcome.verdict
}

/// A would-be drop: dropped, or in audit mode passed and reported as such.
#[inline(never)]
fn refuse(hook: &Hook, subject: &mut Subject) -> u8 {
    subject.outcome.verdict = if audit_applies(subject) { AUDIT } else { DENY };
    conclude(hook, subject, Report::Deduplicated)
}

/// Audit mode covers a drop when it is on globally, or when every declared service on the
/// packet's path is in audit mode (so one service can be rolled out at a time).
#[inline(always)]
fn audit_applies(subject: &Subject) -> bool {
    if subject.global_audit != 0 {
        return true;
    }
    let (src, dst) = (&subject.src, &subject.dst);
    (src.is_service() || dst.is_service())
        && (!src.is_service() || src.is_audit())
        && (!dst.is_service() || dst.is_audit())
}

#[inline(always)]
fn deny_reason(decided_by: u32) -> u8 {
    if decided_by == rule::DEFAULT_DENY {
        reason::DEFAULT_DENY
    } else {
        reason::POLICY_DENY
    }
}

#[inline(never)]
fn refuse_shape(hook: &Hook, why: u8) -> u8 {
    let audit = matches!(identity::active_config(), Some(config) if config.flags & config_flags::AUDIT != 0);
    let verdict = if audit { AUDIT } else { DENY };
    report::count(hook, verdict, why, 0, 0);
    verdict
}

#[inline(never)]
fn track(hook: &Hook, subject: &Subject, extra_flags: u32) {
    let outcome = &subject.outcome;
    let entry = CtEntry {
        created_ns: hook.now,
        last_seen_ns: hook.now,
        // The sending socket's cgroup, a service's or not: the shortcut compares against it,
        // judging again looks it up.
        cgroup_id: if hook.entering() { 0 } else { hook.cgroup_id },
        reply_cgroup_id: 0,
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

/// Whether an ICMP error quotes a packet of a flow tracked under the current generation.
#[inline(never)]
fn is_about_tracked_flow<F: Frame>(frame: &F, hook: &Hook, subject: &Subject) -> bool {
    let mut quoted = QuotedFlow {
        src: [0; 16],
        dst: [0; 16],
        proto: 0,
        src_port: 0,
        dst_port: 0,
    };
    if !packet::quoted_flow(frame, &subject.packet, &mut quoted) {
        return false;
    }
    let mut key = CtKey::default();
    conntrack::flow_key(
        &quoted.src,
        quoted.src_port,
        &quoted.dst,
        quoted.dst_port,
        quoted.proto,
        &mut key,
    );
    match conntrack::live_entry(&key, false, hook.now) {
        // SAFETY: map value pointer, read once.
        Some(entry) => unsafe { (*entry).generation == subject.outcome.generation },
        None => false,
    }
}

/// Later fragments carry no ports: they follow the verdict their first fragment got, and are
/// refused when it was not seen (out of order, lost, or a crafted fragment).
#[inline(never)]
fn follow_first_fragment(hook: &Hook, subject: &mut Subject) -> u8 {
    let packet = &subject.packet;
    let key = FragKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        proto: packet.proto,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    match unsafe { FRAGMENTS.get(&key) }.copied() {
        Some(first) if hook.now.saturating_sub(first.created_ns) <= FRAG_TIMEOUT_NS => {
            let outcome = &mut subject.outcome;
            outcome.verdict = first.verdict;
            outcome.reason = if first.verdict == ALLOW {
                reason::FRAGMENT_FOLLOWS
            } else {
                first.reason
            };
            outcome.rule = first.rule;
            outcome.src_identity = first.src_identity;
            outcome.dst_identity = first.dst_identity;
            conclude(hook, subject, Report::Nothing)
        }
        _ => {
            subject.outcome.reason = reason::BAD_FRAGMENT;
            subject.outcome.rule = rule::PACKET_SANITY;
            refuse(hook, subject)
        }
    }
}

#[inline(never)]
fn remember_fragment(hook: &Hook, subject: &Subject) {
    let (packet, outcome) = (&subject.packet, &subject.outcome);
    let key = FragKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        proto: packet.proto,
        _pad: [0; 3],
    };
    let first = FragEntry {
        created_ns: hook.now,
        src_identity: outcome.src_identity,
        dst_identity: outcome.dst_identity,
        rule: outcome.rule,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        verdict: outcome.verdict,
        reason: outcome.reason,
        _pad: [0; 6],
    };
    let _ = FRAGMENTS.insert(&key, &first, 0);
}
