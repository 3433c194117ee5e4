//! Rule lookup for a new flow, and the per-rule new-connection limit.

use enforcer_common::{
    identity::IdentityInfo,
    policy::{
        ANY_PORT, ANY_PROTO, MAX_PORT_RANGES, PolicyKey, RangeKey, RateState, RuleVerdict, action,
        layer, pair_filter, proto, rule,
    },
};

use crate::maps::{PAIR_FILTER, PORT_RANGES, RATE_LIMITS, RULES};

/// The protocol number rules are written against: ICMPv6 is judged as ICMP.
#[inline(always)]
pub fn policy_proto(wire_proto: u8) -> u8 {
    if wire_proto == proto::ICMPV6 {
        proto::ICMP
    } else {
        wire_proto
    }
}

/// The rule that decides a new flow from `src` to `dst`: exact port, then port ranges, then any
/// port of the protocol, then any protocol; else the default. Only the lookups the pair has
/// entries for are made.
#[inline(always)]
pub fn evaluate(
    slot: u8,
    src: &IdentityInfo,
    dst: &IdentityInfo,
    wire_proto: u8,
    dst_port: u16,
) -> RuleVerdict {
    let protocol = policy_proto(wire_proto);
    let layers = pair_layers(slot, src.identity, dst.identity);
    if layers == 0 {
        return default_for(src, dst);
    }
    let mut key = PolicyKey {
        src_identity: src.identity,
        dst_identity: dst.identity,
        port: ANY_PORT,
        proto: protocol,
        _pad: 0,
    };
    if (protocol == proto::TCP || protocol == proto::UDP) && dst_port != ANY_PORT {
        if layers & layer::bit(layer::EXACT, protocol) != 0 {
            key.port = dst_port;
            if let Some(verdict) = rule_in_slot(&key, slot) {
                return verdict;
            }
            key.port = ANY_PORT;
        }
        if layers & layer::bit(layer::RANGE, protocol) != 0
            && let Some(verdict) =
                in_port_range(slot, src.identity, dst.identity, protocol, dst_port)
        {
            return verdict;
        }
    }
    if layers & layer::bit(layer::ANY_PORT, protocol) != 0
        && let Some(verdict) = rule_in_slot(&key, slot)
    {
        return verdict;
    }
    key.proto = ANY_PROTO;
    if layers & layer::ANY_PROTOCOL_BIT != 0
        && let Some(verdict) = rule_in_slot(&key, slot)
    {
        return verdict;
    }
    default_for(src, dst)
}

/// The layer bits of the bucket of the pair `(src, dst)` in `slot`: 0 when no pair of the
/// bucket has a rule.
#[inline(always)]
fn pair_layers(slot: u8, src: u32, dst: u32) -> u32 {
    let bucket = pair_filter::bucket(src, dst);
    PAIR_FILTER
        .get(pair_filter::word(slot, bucket))
        .map_or(0, |word| {
            (*word >> pair_filter::shift(bucket)) as u32 & 0xffff
        })
}

/// The verdict of the rule entry `key` in `slot`, if that slot has it.
#[inline(always)]
fn rule_in_slot(key: &PolicyKey, slot: u8) -> Option<RuleVerdict> {
    // SAFETY: the value is copied out at once.
    unsafe { RULES.get(key) }?.in_slot(slot)
}

/// DESIGN §4 step 5: drop if either side is a declared service, pass otherwise, so rollout can go
/// one service at a time.
#[inline(always)]
fn default_for(src: &IdentityInfo, dst: &IdentityInfo) -> RuleVerdict {
    let (verdict_action, verdict_rule) = if src.is_service() || dst.is_service() {
        (action::DENY, rule::DEFAULT_DENY)
    } else {
        (action::ALLOW, rule::DEFAULT_ALLOW)
    };
    RuleVerdict {
        rule: verdict_rule,
        bucket: 0,
        max_new_per_sec: 0,
        action: verdict_action,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn in_port_range(slot: u8, src: u32, dst: u32, protocol: u8, port: u16) -> Option<RuleVerdict> {
    let key = RangeKey {
        src_identity: src,
        dst_identity: dst,
        proto: protocol,
        slot,
        _pad: [0; 2],
    };
    // SAFETY: the value is only read during this call.
    let ranges = unsafe { PORT_RANGES.get(&key) }?;
    let count = ranges.count as usize;
    for index in 0..MAX_PORT_RANGES {
        if index >= count {
            break;
        }
        let range = ranges.ranges.get(index)?;
        if range.lo <= port && port <= range.hi {
            return Some(range.verdict);
        }
    }
    None
}

/// Whether one more new connection on a rule limited to `per_sec` must wait. A generic cell rate
/// algorithm: each admission books `1/per_sec` seconds; up to one second's worth may be booked
/// ahead, so a burst of `per_sec` passes at once and the rest at the rate.
///
/// The read-modify-write is not atomic across CPUs: two CPUs admitting at the same instant can
/// both pass, so the limit may be exceeded by at most the number of CPUs per interval.
#[inline(never)]
pub fn over_limit(bucket: u32, per_sec: u32, now: u64) -> bool {
    const SECOND_NS: u64 = 1_000_000_000;
    if per_sec == 0 {
        return false;
    }
    let interval = SECOND_NS / per_sec as u64;
    let Some(state) = RATE_LIMITS.get_ptr_mut(&bucket) else {
        let _ = RATE_LIMITS.insert(
            &bucket,
            &RateState {
                next_free_ns: now + interval,
            },
            0,
        );
        return false;
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    let next_free = if state.next_free_ns > now {
        state.next_free_ns
    } else {
        now
    };
    if next_free - now > SECOND_NS - interval {
        return true;
    }
    state.next_free_ns = next_free + interval;
    false
}
