//! How a verdict ends: counted, remembered for the later fragments of a datagram, reported;
//! and a would-be drop turned into a reported pass where audit mode applies.

use enforcer_common::{
    config::{PolicyConfig, flags as config_flags},
    policy::rule,
    verdict::{AUDIT, DENY, reason},
};

use crate::{
    fragments,
    packet::fragment,
    report::{self, Hook},
    subject::Subject,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Nothing,
    /// A new flow: one event each.
    Flow,
    /// A denial-like outcome: de-duplicated in the kernel.
    Deduplicated,
}

/// Counts, remembers a first fragment's verdict for the rest of its datagram, reports.
#[inline(never)]
pub fn conclude(hook: &Hook, subject: &Subject, report_kind: Report) -> u8 {
    conclude_inline(hook, subject, report_kind)
}

/// [`conclude`] in the caller's frame: for `verdict::judge_new_flow`, which every new flow's
/// packet ends in, denied ones above all, and for an established flow's packet (a call costs
/// about 9 ns, see `clock`).
#[inline(always)]
pub fn conclude_inline(hook: &Hook, subject: &Subject, report_kind: Report) -> u8 {
    let outcome = &subject.outcome;
    report::count(
        hook,
        outcome.verdict,
        outcome.reason,
        outcome.src_identity,
        outcome.dst_identity,
    );
    if subject.packet.fragment == fragment::FIRST {
        fragments::remember(hook, subject);
    }
    match report_kind {
        Report::Nothing => {}
        Report::Flow => {
            let sending = report::Sending::of(outcome.reason, 0, report::RingRoom::UNREAD);
            report::report(hook, &subject.packet, outcome, 1, sending);
        }
        Report::Deduplicated => report::report_deduplicated(hook, &subject.packet, outcome),
    }
    outcome.verdict
}

/// A would-be drop: dropped, or in audit mode passed and reported as such. Inlined: a BPF
/// function of its own would add a frame to every chain of calls through it (`judge_new_flow`
/// → `refuse` → `conclude` → ...), and 6.1's verifier counts even an empty frame as 32 of its
/// 512 bytes.
#[inline(always)]
pub fn refuse(hook: &Hook, subject: &mut Subject) -> u8 {
    subject.outcome.verdict = refusal(subject);
    conclude(hook, subject, Report::Deduplicated)
}

/// The verdict of a would-be drop: [`DENY`], or [`AUDIT`] where audit mode applies.
#[inline(always)]
pub fn refusal(subject: &Subject) -> u8 {
    if audit_applies(subject) { AUDIT } else { DENY }
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

/// The reason of a denial by rule `decided_by`.
#[inline(always)]
pub fn deny_reason(decided_by: u32) -> u8 {
    if decided_by == rule::DEFAULT_DENY {
        reason::DEFAULT_DENY
    } else {
        reason::POLICY_DENY
    }
}

/// A frame refused for its shape, before any identity is known: counted, not reported.
#[inline(never)]
pub fn refuse_shape(hook: &Hook, why: u8, config: Option<&PolicyConfig>) -> u8 {
    let audit = matches!(config, Some(config) if config.flags & config_flags::AUDIT != 0);
    let verdict = if audit { AUDIT } else { DENY };
    report::count_apart(hook, verdict, why, 0, 0);
    verdict
}
