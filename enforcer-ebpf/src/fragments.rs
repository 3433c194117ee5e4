//! IP fragments: a first fragment's verdict is remembered for the rest of its datagram, whose
//! later fragments carry no ports and follow it.

use enforcer_common::{
    conntrack::{FRAG_TIMEOUT_NS, FragEntry, FragKey},
    policy::rule,
    verdict::{ALLOW, reason},
};

use crate::{maps::FRAGMENTS, report::Hook, subject::Subject};

/// Gives a later fragment the outcome of its first fragment; false (the outcome then says
/// why) when the first was not seen: out of order, lost, or a crafted fragment.
#[inline(never)]
pub fn follow_first(hook: &Hook, subject: &mut Subject) -> bool {
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
            true
        }
        _ => {
            subject.outcome.reason = reason::BAD_FRAGMENT;
            subject.outcome.rule = rule::PACKET_SANITY;
            false
        }
    }
}

/// Remembers a first fragment's outcome for the later fragments of its datagram.
#[inline(never)]
pub fn remember(hook: &Hook, subject: &Subject) {
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
