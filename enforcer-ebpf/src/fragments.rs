//! IP fragments: a first fragment's verdict is remembered for the rest of its datagram, whose
//! later fragments carry no ports and follow it.

use enforcer_common::{
    addr::family,
    conntrack::{FRAG_TIMEOUT_NS, FragEntry, FragKey},
    policy::rule,
    verdict::{ALLOW, reason},
};

use crate::{maps::FRAGMENTS, packet::Packet, report::Hook, subject::Subject};

/// Gives a later fragment the outcome of its first fragment; false (the outcome then says
/// why) when the first was not seen: out of order, lost, or a crafted fragment.
#[inline(never)]
pub fn follow_first(hook: &Hook, subject: &mut Subject) -> bool {
    let key = key_of(&subject.packet);
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
    let key = key_of(packet);
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

/// The datagram a fragment belongs to, as the receiving stack reassembles it: IPv4 by source,
/// destination, protocol and id (RFC 791); IPv6 by source, destination and id (RFC 8200), the
/// protocol being the first fragment's, whatever a later fragment's header says.
#[inline(always)]
fn key_of(packet: &Packet) -> FragKey {
    FragKey {
        src: packet.src.0,
        dst: packet.dst.0,
        id: packet.fragment_id,
        proto: if packet.family == family::INET6 {
            0
        } else {
            packet.proto
        },
        _pad: [0; 3],
    }
}
