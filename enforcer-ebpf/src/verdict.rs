//! The decision for one packet, in the order of DESIGN §4:
//! shape → identity and anti-spoofing → fragments → conntrack (re-judged after a policy change)
//! → ICMP errors of tracked flows → rules (deny beats allow) → rate limit → default.
//! Audit mode runs the same steps and turns every drop into a reported pass. A TCP SYN asks its
//! rule before conntrack: one its rule refuses is a new flow's whatever conntrack holds (see
//! [`refused_whatever_is_tracked`]).
//!
//! One shortcut, for the bulk of packets: a packet of a flow admitted under the current
//! generation, arriving where that direction's earlier packets arrived (the same ingress
//! interface at XDP, the same socket cgroup at TC), passes without identity lookups. Those
//! earlier packets went through the identity and anti-spoofing checks, under this same
//! generation; anything else takes the full path, which records where it came from. In front
//! of everything, at an interface, the flow cache passes what the shortcut passed a moment ago
//! (see `flow_cache`), from the headers alone.
//!
//! The steps are separate BPF functions (`#[inline(never)]`) taking the [`Subject`] by
//! reference: each gets its own stack frame, which keeps the whole under the 512-byte BPF stack.
//! Conntrack bookkeeping is in `flow`, fragments in `fragments`, how a verdict is counted and
//! reported in `conclude`: this module is the decisions.

use enforcer_common::{
    addr::{Address16, family},
    config::PolicyConfig,
    conntrack::{CtEntry, flags as ct_flags},
    event::flags as event_flags,
    identity::{FIRST_SERVICE, HOST, IdentityInfo, SERVICE_END, flags as identity_flags},
    policy::{action, proto, rule},
    verdict::{ALLOW, AUDIT, DENY, reason},
};

use crate::{
    conclude::{Report, conclude, conclude_inline, deny_reason, refusal, refuse, refuse_shape},
    conntrack,
    flow::{self, from_initiator},
    flow_cache, fragments, identity,
    maps::SCRATCH,
    packet::{self, Frame, fragment},
    report::{self, Hook, Outcome},
    rules, sockets,
    subject::Subject,
};

/// Judges the frame under `config`, the active policy's config (see
/// [`identity::active_config`]), and returns [`ALLOW`], [`DENY`] or [`AUDIT`] (which passes).
/// The entry point reads the config once for the whole packet and hands it down: one
/// generation per packet, and one map-in-map lookup, an indirect call under retpolines, where
/// every step that needed it used to make its own. The socket hook calls it only for a packet
/// it may judge (see [`socket_hook_may_judge`]).
#[inline(always)]
pub fn judge<F: Frame>(frame: &F, hook: &mut Hook, config: Option<&PolicyConfig>) -> u8 {
    if let (true, Some(config)) = (F::AT_INTERFACE, config) {
        let verdict = flow_cache::pass(frame, hook, config.generation);
        if verdict != flow_cache::MISS {
            return verdict;
        }
    }
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
    subject.socket_cgroup = hook.cgroup_id;
    let parsed = packet::parse(frame, &mut subject.packet);
    if !F::AT_INTERFACE
        && !(parsed == packet::PARSED_IP && socket_hook_judges(frame, hook, subject, config))
    {
        return ALLOW;
    }
    match parsed {
        packet::PARSED_IP | packet::ARP => {}
        packet::NOT_IP => return ALLOW,
        why => return refuse_shape(hook, why, config),
    }
    let Some(config) = config else {
        if parsed == packet::ARP {
            // Without a policy there are no endpoints to speak for; ARP is not IP.
            return ALLOW;
        }
        report::count_apart(hook, DENY, reason::NO_POLICY, 0, 0);
        return DENY;
    };
    if parsed == packet::ARP {
        return judge_link_infrastructure(hook, subject, config);
    }
    if subject.packet.is_link_infrastructure() {
        return judge_link_infrastructure(hook, subject, config);
    }
    subject.take_generation(config);
    if F::AT_INTERFACE {
        // From here on the packet's cgroup is the one its flow is bound to.
        hook.cgroup_id = identity::sending_cgroup(frame, config, hook.cgroup_id);
    }
    let hook = &*hook;
    let opening = subject.packet.opens_connection();

    // Later fragments have no ports, so no flow key.
    if subject.packet.fragment != fragment::LATER {
        if F::AT_INTERFACE {
            // (The socket hook took the key already, in `socket_hook_judges`.)
            flow_key(subject);
        }
        // Asked here as well as in the shortcut: the flow filter clears most new flows, and
        // they then skip the call (a call costs on the order of 10 ns, see `clock`). A SYN
        // asks conntrack only once its rule allows it (see `refused_whatever_is_tracked`).
        if !opening && conntrack::may_be_tracked(&subject.key, hook.now) {
            let verdict = pass_established::<F>(hook, subject);
            if verdict != NOT_TRACKED {
                return verdict;
            }
        }
    }
    if !resolve_identities(hook, subject) {
        return refuse(hook, subject);
    }
    if subject.packet.fragment == fragment::LATER {
        return if fragments::follow_first(hook, subject) {
            conclude(hook, subject, Report::Nothing)
        } else {
            refuse(hook, subject)
        };
    }
    if subject.tracked == 0 && hands_over(frame, hook, subject, config.cgroup_levels) {
        return ALLOW;
    }
    if opening {
        let verdict = judge_new_flow(hook, subject, RuleLookup::Opening);
        if verdict != NOT_DECIDED {
            return verdict;
        }
        subject.tracked = conntrack::may_be_tracked(&subject.key, hook.now) as u8;
    }
    if subject.tracked != 0 {
        let verdict = judge_tracked(hook, subject);
        if verdict != NOT_TRACKED {
            return verdict;
        }
    }
    if subject.packet.is_icmp_error() {
        match flow::icmp_error_relation(frame, hook, subject) {
            flow::RELATED => {
                subject.outcome.verdict = ALLOW;
                subject.outcome.reason = reason::RELATED;
                return conclude(hook, subject, Report::Nothing);
            }
            flow::FORGED => {
                subject.outcome.reason = reason::FORGED_ICMP_ERROR;
                subject.outcome.rule = rule::PACKET_SANITY;
                return refuse(hook, subject);
            }
            _ => {}
        }
    }
    let lookup = if opening {
        RuleLookup::Done
    } else {
        RuleLookup::Pending
    };
    judge_new_flow(hook, subject, lookup)
}

/// The subject's conntrack key, and whether its source is the key's `lo` end.
#[inline(always)]
fn flow_key(subject: &mut Subject) {
    let packet = &subject.packet;
    let key = &mut subject.key;
    let from_lo = if packet.family == family::INET {
        conntrack::flow_key_v4(
            packet.src_v4,
            packet.src_port,
            packet.dst_v4,
            packet.dst_port,
            packet.proto,
            key,
        )
    } else {
        conntrack::flow_key_v6(
            &packet.src,
            packet.src_port,
            &packet.dst,
            packet.dst_port,
            packet.proto,
            key,
        )
    };
    subject.from_lo = from_lo as u8;
}

/// Whether the socket hook may judge a packet that came in through `ifindex` at all: never
/// traffic between the host's own processes (over loopback), which no hook judges. Most
/// packets the socket hook sees are none of its business: it asks this first, before it reads
/// anything else about the packet.
///
/// Not whether the live generation has services identified by cgroup: a packet an interface
/// hook handed over under a generation that had some may be delivered after the switch to one
/// that has none, and must still be judged (under the live one). The controller keeps the hook
/// attached until no packet handed over can still be on its way (a grace period after that
/// switch), so this costs only in between.
#[inline(always)]
pub fn socket_hook_may_judge(ifindex: u32, config: Option<&PolicyConfig>) -> bool {
    ifindex != LOOPBACK_IFINDEX && config.is_some()
}

/// Whether the socket hook judges the packet (see `sockets`), given that it may (see
/// [`socket_hook_may_judge`]): one an interface hook of this datapath handed over, or any for a
/// socket of one of the policy's cgroup services that came in through an interface (an
/// interface hook may have admitted its flow for another destination, the host; or it entered
/// where this datapath is not attached). Leaves the receiving socket's service cgroup in the
/// hook. A function of its own: the socket hook's entry frame must stay as small as the
/// others' (5.10's verifier counts every frame of the deepest call chain against 512 bytes).
#[inline(never)]
fn socket_hook_judges<F: Frame>(
    frame: &F,
    hook: &mut Hook,
    subject: &mut Subject,
    config: Option<&PolicyConfig>,
) -> bool {
    if subject.packet.fragment == fragment::LATER {
        return false;
    }
    let Some(config) = config else {
        return false;
    };
    let slot = config.slot as u8;
    hook.receiving_cgroup =
        identity::service_cgroup(frame, slot, config.cgroup_levels, hook.receiving_cgroup);
    flow_key(subject);
    sockets::take_handed_over(&subject.key)
        || identity::of_cgroup(slot, hook.receiving_cgroup).is_some()
}

/// The loopback interface's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether an interface hook hands the packet over to the socket hook instead of judging it
/// (see `sockets`): the first packet of a new flow for one of this host's own sockets, when
/// the policy has services identified by cgroup, whose socket may be the receiver. A first
/// fragment is judged here, for the host: its datagram is delivered long after, when the note
/// may be gone; the socket hook judges the datagram again if a service's socket takes it.
#[inline(always)]
fn hands_over<F: Frame>(frame: &F, hook: &Hook, subject: &Subject, cgroup_levels: u32) -> bool {
    let packet = &subject.packet;
    F::AT_INTERFACE
        && hook.entering()
        && cgroup_levels != 0
        && subject.dst.identity == HOST
        && packet.fragment == fragment::NONE
        && (packet.proto == proto::UDP || packet.opens_connection())
        && sockets::has_receiver(frame, subject)
        && sockets::hand_over(&subject.key)
}

/// Link-local traffic (ARP, neighbour discovery, MLD) passes, unless an endpoint speaks
/// through it for someone else. A function of its own: the entry program's stack frame stays as it was
/// (the verifiers of 5.10 and 6.1 count every frame of the deepest call chain against 512
/// bytes).
#[inline(never)]
fn judge_link_infrastructure(hook: &Hook, subject: &mut Subject, config: &PolicyConfig) -> u8 {
    subject.take_generation(config);
    if !neighbour_discovery_is_its_own(hook, subject) {
        return refuse(hook, subject);
    }
    // ARP was never counted: it is not IP.
    if subject.packet.proto != 0 {
        report::count_apart(hook, ALLOW, reason::INFRASTRUCTURE, 0, 0);
    }
    ALLOW
}

/// Whether link-local traffic (ARP, neighbour discovery, MLD) entering through an endpoint
/// interface speaks only for the endpoint: from its own addresses (or link-local, or the
/// unspecified address of duplicate address detection and ARP probes), advertising only its
/// own addresses, and never as a router (router advertisements and redirects come from the host's side). A
/// workload that could claim another service's address would have the host, and a bridge's
/// other members, send it that service's traffic. Other interfaces' link traffic is the
/// link's business. False: spoofed (the outcome says so).
#[inline(always)]
fn neighbour_discovery_is_its_own(hook: &Hook, subject: &mut Subject) -> bool {
    if !hook.entering() {
        return true;
    }
    let Some(endpoint) = identity::of_endpoint(subject.tables.slot, hook.ifindex) else {
        return true;
    };
    subject.src = endpoint;
    subject.outcome.src_identity = endpoint.identity;
    let packet = &subject.packet;
    let owned = |address: &Address16| {
        is_link_local(address)
            || identity::of_address(subject.tables, address).identity == endpoint.identity
    };
    let honest = match (packet.proto, packet.icmp_type) {
        // ARP: the sender's address is the one claimed; 0.0.0.0 probes (RFC 5227).
        (0, _) => packet.src.0 == enforcer_common::addr::v4_mapped([0; 4]) || owned(&packet.src),
        // Router advertisement, redirect.
        (_, 134 | 137) => false,
        // Neighbour advertisement: the target is the address claimed.
        (_, 136) => owned(&packet.src) && owned(&packet.nd_target),
        _ => packet.src.0 == [0; 16] || owned(&packet.src),
    };
    if !honest {
        subject.outcome.reason = reason::SPOOFED;
        subject.outcome.rule = rule::ANTI_SPOOFING;
    }
    honest
}

/// fe80::/10.
#[inline(always)]
fn is_link_local(address: &[u8; 16]) -> bool {
    address[0] == 0xfe && address[1] & 0xc0 == 0x80
}

/// Source and destination identity, strongest source first, with the checks that keep them
/// honest. False when the packet is spoofed (the outcome then says how).
#[inline(never)]
fn resolve_identities(hook: &Hook, subject: &mut Subject) -> bool {
    let (by_address, dst) = identity::of_packet_addresses(subject.tables, &subject.packet);
    subject.dst = dst;
    subject.src = by_address;
    subject.outcome.addr_identity = by_address.identity;
    subject.outcome.src_identity = by_address.identity;
    subject.outcome.dst_identity = subject.dst.identity;
    // At the socket hook: the service whose socket receives the packet.
    if let Some(receiver) = identity::of_cgroup(subject.tables.slot, hook.receiving_cgroup) {
        subject.dst = receiver;
        subject.outcome.dst_identity = receiver.identity;
    }
    if hook.entering() {
        if let Some(endpoint) = identity::of_endpoint(subject.tables.slot, hook.ifindex) {
            subject.src = endpoint;
            subject.outcome.src_identity = endpoint.identity;
            if by_address.identity != endpoint.identity {
                subject.outcome.reason = reason::SPOOFED;
                subject.outcome.rule = rule::ANTI_SPOOFING;
                return false;
            }
        } else if by_address.flags & identity_flags::LOCAL_ENDPOINT != 0 {
            // A local endpoint's address, from an interface that is none of its service's.
            subject.outcome.reason = reason::SPOOFED;
            subject.outcome.rule = rule::ANTI_SPOOFING;
            return false;
        }
    } else if by_address.flags & identity_flags::LOCAL_ENDPOINT != 0
        && hook.arrived_on != 0
        && !came_through_its_endpoint(hook, subject, &by_address)
    {
        // Forwarded here from an interface this datapath may not be attached to.
        subject.outcome.reason = reason::SPOOFED;
        subject.outcome.rule = rule::ANTI_SPOOFING;
        return false;
    } else if let Some(owner) = identity::of_cgroup(subject.tables.slot, hook.cgroup_id) {
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

/// Whether a forwarded packet came in through an endpoint interface of its source address's
/// service.
#[inline(always)]
fn came_through_its_endpoint(hook: &Hook, subject: &Subject, by_address: &IdentityInfo) -> bool {
    matches!(
        identity::of_endpoint(subject.tables.slot, hook.arrived_on),
        Some(endpoint) if endpoint.identity == by_address.identity
    )
}

/// What [`judge_tracked`] and [`pass_established`] return when they do not decide.
const NOT_TRACKED: u8 = 0;

/// The shortcut (see the module documentation): [`NOT_TRACKED`] unless it applies. What it
/// passes at an interface, `flow_cache` passes for a while without asking conntrack.
#[inline(never)]
fn pass_established<F: Frame>(hook: &Hook, subject: &mut Subject) -> u8 {
    let Some(entry) = flow::tracked_entry(hook, subject) else {
        return NOT_TRACKED;
    };
    subject.tracked = 1;
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &*entry };
    let from_initiator = from_initiator(subject, tracked);
    if tracked.generation != subject.outcome.generation
        || !flow::arrives_as_before(hook, tracked, from_initiator)
    {
        return NOT_TRACKED;
    }
    if from_initiator && !received_as_admitted(hook, subject, tracked) {
        // Judged again by `judge_tracked`.
        return NOT_TRACKED;
    }
    let verdict = established(hook, subject, entry, from_initiator, true);
    if F::AT_INTERFACE {
        flow_cache::remember(hook, subject, verdict);
    }
    verdict
}

/// At the socket hook, whether a service's socket receiving a packet of a flow from its
/// initiator is the destination the flow was admitted for (an interface hook admits for the
/// host what it cannot tell is for a service's socket: a datagram's first fragment).
#[inline(always)]
fn received_as_admitted(hook: &Hook, subject: &Subject, tracked: &CtEntry) -> bool {
    match identity::of_cgroup(subject.tables.slot, hook.receiving_cgroup) {
        Some(receiver) => receiver.identity == tracked.dst_identity,
        None => true,
    }
}

/// A packet of a flow admitted under the current generation (see [`flow::pass`]). Concludes
/// in the caller's frame: what an established packet's conclusion does (count it) is small,
/// and a call costs about 9 ns (see `clock`).
#[inline(always)]
fn established(
    hook: &Hook,
    subject: &mut Subject,
    entry: *mut CtEntry,
    from_initiator: bool,
    may_close: bool,
) -> u8 {
    flow::pass(hook, subject, entry, from_initiator, may_close);
    conclude_inline(hook, subject, Report::Nothing)
}

/// A packet of a tracked flow: passes if the flow was admitted under the current generation,
/// else is judged again. [`NOT_TRACKED`] if the flow is not tracked.
#[inline(never)]
fn judge_tracked(hook: &Hook, subject: &mut Subject) -> u8 {
    let Some(entry) = flow::tracked_entry(hook, subject) else {
        return NOT_TRACKED;
    };
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let tracked = unsafe { &*entry };
    let from_initiator = from_initiator(subject, tracked);
    if tracked.generation != subject.outcome.generation
        || (from_initiator && !received_as_admitted(hook, subject, tracked))
    {
        return judge_again(hook, subject, entry);
    }
    // A tracked tuple is no pass for whoever sends on it: a packet whose source identity is not
    // the one its direction was admitted with (another cgroup reusing the ports) is a new flow.
    let admitted = if from_initiator {
        tracked.src_identity
    } else {
        tracked.dst_identity
    };
    if subject.src.identity != admitted {
        return NOT_TRACKED;
    }
    // The right identity, arriving where this direction never did (another interface, another
    // cgroup): it passes as the flow's, but its RST or FIN closes nothing. Only the flow's own
    // path may end it; a remote host forging a RST would otherwise cut a live connection.
    let elsewhere = flow::arrives_elsewhere(hook, tracked, from_initiator);
    // This packet passed the identity checks just now: later ones of its direction arriving
    // the same way can take the shortcut.
    // SAFETY: as above; no reference to the entry is held across this write.
    flow::remember_arrival(hook, unsafe { &mut *entry }, from_initiator);
    established(hook, subject, entry, from_initiator, !elsewhere)
}

/// A tracked flow admitted under an older generation, or for another destination than the
/// service whose socket receives it: judge it again as its initiator sent it, so that revoking
/// a rule cuts established connections at their next packet.
#[inline(always)]
fn judge_again(hook: &Hook, subject: &mut Subject, entry: *mut CtEntry) -> u8 {
    let report = rejudge(hook, subject, entry);
    conclude(hook, subject, report)
}

/// [`judge_again`]'s decision, left in the outcome with the conntrack entry brought in line
/// with it; returns how the outcome is reported. A function of its own, apart from
/// `conclude`: its frame is then on no chain of calls under `conclude`'s, the deepest (5.10's
/// and 6.1's verifiers count every frame of the deepest chain against 512 bytes).
#[inline(never)]
fn rejudge(hook: &Hook, subject: &mut Subject, entry: *mut CtEntry) -> Report {
    let responder_named = identities_as_admitted(hook, subject, entry);
    let key = &subject.key;
    // SAFETY: map value pointer from `live_entry`, valid for this run.
    let responder_is_lo = unsafe { (*entry).flags } & ct_flags::ORIG_IS_LO == 0;
    let decision = rules::evaluate(
        subject.tables.slot,
        &subject.src,
        &subject.dst,
        key.proto(),
        key.port(responder_is_lo),
    );
    subject.outcome.rule = decision.rule;
    subject.outcome.src_identity = subject.src.identity;
    subject.outcome.dst_identity = subject.dst.identity;
    subject.outcome.flags = event_flags::REJUDGED;
    if decision.action == action::ALLOW {
        flow::readmit(hook, subject, entry, &decision, responder_named);
        subject.outcome.verdict = ALLOW;
        subject.outcome.reason = reason::ESTABLISHED;
        return Report::Nothing;
    }
    subject.outcome.reason = deny_reason(decision.rule);
    subject.outcome.verdict = refusal(subject);
    if subject.outcome.verdict == AUDIT {
        flow::keep_audited(subject, entry, &decision);
    } else {
        conntrack::forget(&subject.key);
    }
    Report::Deduplicated
}

/// A tracked flow's identities, for judging it again: its initiator's (by the sending
/// cgroup it was admitted with, else by address) and its responder's (by the cgroup of the
/// local socket that answers, else by address), in the subject. True when the responder's
/// came from its socket's cgroup. A function of its own, to keep `rejudge`'s frame small
/// (5.10's and 6.1's verifiers count every frame of the deepest call chain against 512 bytes).
#[inline(never)]
fn identities_as_admitted(hook: &Hook, subject: &mut Subject, entry: *mut CtEntry) -> bool {
    // At the socket hook, the socket receiving the initiator's packet is the one that answers.
    // SAFETY: map value pointer from `live_entry`, valid for this run; no reference to the
    // entry is held across this write.
    if hook.receiving_cgroup != 0 && from_initiator(subject, unsafe { &*entry }) {
        unsafe { (*entry).reply_cgroup_id = hook.receiving_cgroup };
    }
    // SAFETY: as above.
    let tracked = unsafe { &*entry };
    let packet = &subject.packet;
    let (initiator, responder) = if from_initiator(subject, tracked) {
        (&packet.src, &packet.dst)
    } else {
        (&packet.dst, &packet.src)
    };
    subject.src = match identity::of_cgroup(subject.tables.slot, tracked.cgroup_id) {
        Some(owner) => owner,
        None => identity::of_address(subject.tables, initiator),
    };
    match identity::of_cgroup(subject.tables.slot, tracked.reply_cgroup_id) {
        Some(receiver) => {
            subject.dst = receiver;
            true
        }
        None => {
            subject.dst = identity::of_address(subject.tables, responder);
            false
        }
    }
}

/// The rule that decides the packet as a new flow's, in the subject. Inlined into
/// [`judge_new_flow`], its one caller: the rule keys stay off the entry program's frame, and a
/// new flow pays one call for both (a call costs about 9 ns, see `clock`).
#[inline(always)]
fn decide(subject: &mut Subject) {
    subject.decision = rules::evaluate(
        subject.tables.slot,
        &subject.src,
        &subject.dst,
        subject.packet.proto,
        subject.packet.dst_port,
    );
}

/// Whether a SYN that opens a connection is dropped whatever conntrack holds for its ports:
/// its rule refuses it, outside audit mode. Conntrack could only pass it as a packet of a
/// connection the same rules admitted, which they do not now (a connection admitted under an
/// earlier generation is judged again by the current one), or as its responder's SYN, which
/// answers nothing: a SYN-ACK answers. Such a SYN therefore never asks the flow filter, whose
/// random line was the costliest load of a scan's packet.
#[inline(always)]
fn refused_whatever_is_tracked(subject: &Subject) -> bool {
    subject.decision.action != action::ALLOW && refusal(subject) == DENY
}

/// Where [`judge_new_flow`] stands with a packet's rule.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RuleLookup {
    /// Not looked up yet.
    Pending,
    /// A connection's opening packet, before conntrack: looked up, then judged here only if it
    /// refuses the packet whatever conntrack holds (see [`refused_whatever_is_tracked`]);
    /// otherwise left in the subject, and [`NOT_DECIDED`] returned.
    Opening,
    /// Looked up already (an opening packet that conntrack does not know).
    Done,
}

/// What [`judge_new_flow`] returns for an opening packet it leaves to conntrack (no verdict
/// is 0).
const NOT_DECIDED: u8 = 0;

/// A flow conntrack does not know, decided by its rule (see [`decide`]), then the rate limit.
/// Concludes inline: a new flow's packet pays one call for its rule and its end (a call costs
/// about 9 ns, see `clock`).
#[inline(never)]
fn judge_new_flow(hook: &Hook, subject: &mut Subject, lookup: RuleLookup) -> u8 {
    if lookup != RuleLookup::Done {
        decide(subject);
    }
    if lookup == RuleLookup::Opening && !refused_whatever_is_tracked(subject) {
        return NOT_DECIDED;
    }
    let report = new_flow_outcome(hook, subject);
    conclude_inline(hook, subject, report)
}

/// A new flow's outcome by its rule, in the subject, with the conntrack entry of a flow that
/// passes; returns how it is reported.
#[inline(always)]
fn new_flow_outcome(hook: &Hook, subject: &mut Subject) -> Report {
    let decision = subject.decision;
    subject.outcome.rule = decision.rule;
    if decision.action != action::ALLOW {
        subject.outcome.reason = deny_reason(decision.rule);
        return refused_new_flow(hook, subject);
    }
    if decision.rule == rule::DEFAULT_ALLOW {
        // Traffic between undeclared parties is not the policy's: no tracking, no events.
        subject.outcome.verdict = ALLOW;
        subject.outcome.reason = reason::DEFAULT_ALLOW;
        return Report::Nothing;
    }
    // Only a SYN opens a TCP connection. Any other segment of no tracked connection would make
    // an entry that later packets pass through: a SYN over the rate limit, for one.
    if subject.packet.is_tcp() && !subject.packet.tcp_syn_only() {
        subject.outcome.reason = reason::NO_CONNECTION;
        subject.outcome.rule = rule::PACKET_SANITY;
        subject.outcome.verdict = refusal(subject);
        return Report::Deduplicated;
    }
    if rules::over_limit(decision.bucket, decision.max_new_per_sec, hook.now) {
        subject.outcome.reason = reason::RATE_LIMITED;
        return refused_new_flow(hook, subject);
    }
    subject.outcome.verdict = ALLOW;
    subject.outcome.reason = reason::POLICY_ALLOW;
    flow::track(hook, subject, 0);
    Report::Flow
}

/// A new flow its rule or its rate limit refuses: dropped, or in audit mode passed and
/// tracked as audited.
#[inline(always)]
fn refused_new_flow(hook: &Hook, subject: &mut Subject) -> Report {
    subject.outcome.verdict = refusal(subject);
    if subject.outcome.verdict == AUDIT {
        flow::track(hook, subject, ct_flags::AUDIT);
    }
    Report::Deduplicated
}
