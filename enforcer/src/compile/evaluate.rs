//! The datapath's lookups, run in userspace: for `explain`, `diff` and the tests that check the
//! compiler against them.

use std::net::IpAddr;

use enforcer_common::{
    identity::IdentityInfo,
    policy::{ANY_PORT, ANY_PROTO, PolicyKey, RangeKey, RuleVerdict, action, proto, rule},
};

use super::Compiled;

impl Compiled {
    /// The identity an address resolves to (longest matching prefix, else world), as the
    /// datapath's ipcache lookup does.
    pub fn resolve_address(&self, addr: IpAddr) -> IdentityInfo {
        let bytes = enforcer_common::addr::to_key_bytes(addr);
        self.tables
            .ipcache
            .iter()
            .filter(|(prefix, _)| prefix.contains(&bytes))
            .max_by_key(|(prefix, _)| prefix.len)
            .map_or(IdentityInfo::WORLD, |(_, info)| *info)
    }

    /// The rule that decides a new flow, by the same lookups as the datapath (`rules.rs`; its
    /// pair summary only skips lookups that would miss, so it is not consulted here).
    pub fn evaluate(
        &self,
        src: &IdentityInfo,
        dst: &IdentityInfo,
        wire_proto: u8,
        dst_port: u16,
    ) -> RuleVerdict {
        let protocol = if wire_proto == proto::ICMPV6 {
            proto::ICMP
        } else {
            wire_proto
        };
        let mut key = PolicyKey {
            src_identity: src.identity,
            dst_identity: dst.identity,
            port: ANY_PORT,
            proto: protocol,
            _pad: 0,
        };
        if (protocol == proto::TCP || protocol == proto::UDP) && dst_port != ANY_PORT {
            key.port = dst_port;
            if let Some(verdict) = self.tables.rules.get(&key) {
                return *verdict;
            }
            let range_key = RangeKey {
                src_identity: src.identity,
                dst_identity: dst.identity,
                proto: protocol,
                slot: 0,
                _pad: [0; 2],
            };
            if let Some(ranges) = self.tables.ranges.get(&range_key) {
                let found = ranges.ranges[..ranges.count as usize]
                    .iter()
                    .find(|range| range.lo <= dst_port && dst_port <= range.hi);
                if let Some(range) = found {
                    return range.verdict;
                }
            }
            key.port = ANY_PORT;
        }
        if let Some(verdict) = self.tables.rules.get(&key) {
            return *verdict;
        }
        key.proto = ANY_PROTO;
        if let Some(verdict) = self.tables.rules.get(&key) {
            return *verdict;
        }
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
}
