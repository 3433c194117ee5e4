//! The second phase of compiling: every rule's port matches on every (source, destination)
//! identity pair, and the kernel entries that give DESIGN §4's answer under the datapath's
//! lookup order (see the module above).

use std::collections::BTreeSet;

use enforcer_common::policy::{
    ANY_PORT, ANY_PROTO, MAX_PORT_RANGES, PolicyKey, PortRange, PortRanges, RangeKey, RuleVerdict,
    action, proto,
};

use super::{CompileError, identities::Identities, tables::Tables};
use crate::policy::{Policy, PortMatch, RuleKind, identity};

/// Where a port match sits in the kernel's lookup order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Exact,
    Range,
    AnyPort,
    AnyProto,
}

/// One port match of one rule, on one (source identity, destination identity) pair.
#[derive(Clone, Copy, Debug)]
struct PairMatch {
    pair: (u32, u32),
    layer: Layer,
    /// Wire protocol number; 0 for [`Layer::AnyProto`].
    protocol: u8,
    /// The port of an exact match; 0 in the other layers, so that their matches stay in
    /// policy order.
    port: u16,
    /// Policy order: the rule's index, then the match's position within the rule.
    order: u32,
    lo: u16,
    hi: u16,
    kind: RuleKind,
    rule: usize,
}

impl PairMatch {
    fn sort_key(&self) -> ((u32, u32), Layer, u8, u16, u32) {
        (self.pair, self.layer, self.protocol, self.port, self.order)
    }
}

/// The first match of `kind` in policy order.
fn first_of<'a>(
    kind: RuleKind,
    matches: impl IntoIterator<Item = &'a PairMatch>,
) -> Option<&'a PairMatch> {
    matches.into_iter().find(|candidate| candidate.kind == kind)
}

/// The matches of one layer in a pair's matches (sorted by [`PairMatch::sort_key`]).
fn layer_of(matches: &[PairMatch], layer: Layer) -> &[PairMatch] {
    let start = matches.partition_point(|candidate| candidate.layer < layer);
    let end = matches.partition_point(|candidate| candidate.layer <= layer);
    &matches[start..end]
}

/// The matches of the rules `chosen` (indexes into the policy's rules, in policy order),
/// grouped by pair and lookup layer by sorting: no per-pair collections, which for 100 000
/// pairs cost more than the rest of the compile.
fn pair_matches(
    policy: &Policy,
    identities: &Identities,
    chosen: impl Iterator<Item = usize>,
) -> Vec<PairMatch> {
    let mut matches: Vec<PairMatch> = Vec::with_capacity(policy.rules.len());
    let (mut sources, mut destinations) = (Vec::new(), Vec::new());
    let mut order = 0u32;
    for index in chosen {
        let rule = &policy.rules[index];
        identities.expand(&rule.from, &mut sources);
        identities.expand(&rule.to, &mut destinations);
        let port_matches = rule.ports.iter().map(|port| match *port {
            PortMatch::Port(protocol, number) => {
                (Layer::Exact, protocol.number(), number, number, number)
            }
            PortMatch::Range(protocol, lo, hi) => (Layer::Range, protocol.number(), 0, lo, hi),
            PortMatch::AnyPort(protocol) => (Layer::AnyPort, protocol.number(), 0, 0, 0),
        });
        let any_proto = rule
            .ports
            .is_empty()
            .then_some((Layer::AnyProto, 0, 0, 0, 0));
        for (layer, protocol, port, lo, hi) in port_matches.chain(any_proto) {
            for src in &sources {
                for dst in &destinations {
                    matches.push(PairMatch {
                        pair: (*src, *dst),
                        layer,
                        protocol,
                        port,
                        order,
                        lo,
                        hi,
                        kind: rule.kind,
                        rule: index,
                    });
                }
            }
            order += 1;
        }
    }
    matches.sort_unstable_by_key(PairMatch::sort_key);
    matches
}

/// Writes the rule entries (`rules`, `ranges`) of `policy` into `tables`; `numbers` are the
/// rules' numbers in policy order.
pub(super) fn write_entries(
    policy: &Policy,
    identities: &Identities,
    numbers: &[u32],
    tables: &mut Tables,
) -> Result<(), CompileError> {
    let entries = entries_of(policy, identities, numbers, 0..policy.rules.len(), tables)?;
    tables.rules = entries.into_iter().collect();
    tables.pairs = tables.pair_layers();
    Ok(())
}

/// Writes again the entries of the identity pairs `pairs`, from the rules `chosen`: every
/// rule that touches one of those pairs, in policy order (and maybe others).
pub(super) fn rewrite_pairs(
    policy: &Policy,
    identities: &Identities,
    numbers: &[u32],
    pairs: &BTreeSet<(u32, u32)>,
    chosen: impl Iterator<Item = usize>,
    tables: &mut Tables,
) -> Result<(), CompileError> {
    for &(src, dst) in pairs {
        tables.remove_pair(src, dst);
    }
    // The chosen rules also name pairs outside `pairs`, whose entries stay as they are.
    let mut recomputed = Tables::default();
    let entries = entries_of(policy, identities, numbers, chosen, &mut recomputed)?;
    let in_pairs = |src: u32, dst: u32| pairs.contains(&(src, dst));
    tables.rules.extend(
        entries
            .into_iter()
            .filter(|(key, _)| in_pairs(key.src_identity, key.dst_identity)),
    );
    tables.ranges.extend(
        recomputed
            .ranges
            .into_iter()
            .filter(|(key, _)| in_pairs(key.src_identity, key.dst_identity)),
    );
    for &(src, dst) in pairs {
        tables.mark_pair(src, dst);
    }
    Ok(())
}

/// The rule entries of the pairs the rules `chosen` touch, in key order; their port ranges go
/// into `tables`.
fn entries_of(
    policy: &Policy,
    identities: &Identities,
    numbers: &[u32],
    chosen: impl Iterator<Item = usize>,
    tables: &mut Tables,
) -> Result<Vec<(PolicyKey, RuleVerdict)>, CompileError> {
    let matches = pair_matches(policy, identities, chosen);
    let verdicts = Verdicts { policy, numbers };
    let mut rule_entries: Vec<(PolicyKey, RuleVerdict)> = Vec::with_capacity(matches.len());
    for pair_matches in matches.chunk_by(|a, b| a.pair == b.pair) {
        let pair = PairEntries::of(pair_matches, &verdicts);
        pair.exact(&mut rule_entries);
        pair.ranges(identities, tables)?;
        pair.any_port_and_any_proto(&mut rule_entries);
    }
    Ok(rule_entries)
}

/// The verdict a match's rule gives.
struct Verdicts<'a> {
    policy: &'a Policy,
    numbers: &'a [u32],
}

impl Verdicts<'_> {
    fn of(&self, found: &PairMatch) -> RuleVerdict {
        let rule = &self.policy.rules[found.rule];
        let (verdict_action, bucket, limit) = match rule.kind {
            RuleKind::Deny => (action::DENY, 0, 0),
            RuleKind::Allow => match rule.max_new_per_sec {
                Some(limit) => (action::ALLOW, identity::of_rule_bucket(&rule.id), limit),
                None => (action::ALLOW, 0, 0),
            },
        };
        RuleVerdict {
            rule: self.numbers[found.rule],
            bucket,
            max_new_per_sec: limit,
            action: verdict_action,
            _pad: [0; 3],
        }
    }
}

/// One pair's matches, by layer. An allow that a deny of a less specific layer covers gets no
/// entry, so that the lookup falls through to that deny.
struct PairEntries<'a> {
    src: u32,
    dst: u32,
    exact: &'a [PairMatch],
    ranges: &'a [PairMatch],
    any_port: &'a [PairMatch],
    any_proto: &'a [PairMatch],
    verdicts: &'a Verdicts<'a>,
}

impl<'a> PairEntries<'a> {
    fn of(matches: &'a [PairMatch], verdicts: &'a Verdicts<'a>) -> Self {
        let (src, dst) = matches[0].pair;
        Self {
            src,
            dst,
            exact: layer_of(matches, Layer::Exact),
            ranges: layer_of(matches, Layer::Range),
            any_port: layer_of(matches, Layer::AnyPort),
            any_proto: layer_of(matches, Layer::AnyProto),
            verdicts,
        }
    }

    fn key(&self, protocol: u8, port: u16) -> PolicyKey {
        PolicyKey {
            src_identity: self.src,
            dst_identity: self.dst,
            port,
            proto: protocol,
            _pad: 0,
        }
    }

    fn deny_any_proto(&self) -> Option<&'a PairMatch> {
        first_of(RuleKind::Deny, self.any_proto)
    }

    fn deny_any_port(&self, protocol: u8) -> Option<&'a PairMatch> {
        first_of(
            RuleKind::Deny,
            self.any_port
                .iter()
                .filter(|candidate| candidate.protocol == protocol),
        )
    }

    fn denied_by_range(&self, protocol: u8, port: u16) -> bool {
        self.ranges.iter().any(|range| {
            range.protocol == protocol
                && range.kind == RuleKind::Deny
                && range.lo <= port
                && port <= range.hi
        })
    }

    fn exact(&self, entries: &mut Vec<(PolicyKey, RuleVerdict)>) {
        for list in self
            .exact
            .chunk_by(|a, b| (a.protocol, a.port) == (b.protocol, b.port))
        {
            let (protocol, port) = (list[0].protocol, list[0].port);
            if let Some(deny) = first_of(RuleKind::Deny, list) {
                entries.push((self.key(protocol, port), self.verdicts.of(deny)));
            } else if self.deny_any_proto().is_none()
                && self.deny_any_port(protocol).is_none()
                && !self.denied_by_range(protocol, port)
                && let Some(allow) = first_of(RuleKind::Allow, list)
            {
                entries.push((self.key(protocol, port), self.verdicts.of(allow)));
            }
        }
    }

    /// The pair's port ranges per protocol, denies first; more than fit is an error naming the
    /// rules.
    fn ranges(&self, identities: &Identities, tables: &mut Tables) -> Result<(), CompileError> {
        for list in self.ranges.chunk_by(|a, b| a.protocol == b.protocol) {
            let protocol = list[0].protocol;
            let allows_covered =
                self.deny_any_proto().is_some() || self.deny_any_port(protocol).is_some();
            let ordered: Vec<&PairMatch> = list
                .iter()
                .filter(|range| range.kind == RuleKind::Deny)
                .chain(
                    list.iter()
                        .filter(|range| range.kind == RuleKind::Allow && !allows_covered),
                )
                .collect();
            if ordered.is_empty() {
                continue;
            }
            if ordered.len() > MAX_PORT_RANGES {
                let mut rules: Vec<&str> = ordered
                    .iter()
                    .map(|range| &*self.verdicts.policy.rules[range.rule].id)
                    .collect();
                rules.dedup();
                return Err(CompileError::TooManyRanges {
                    from: identities.name(self.src),
                    to: identities.name(self.dst),
                    protocol: if protocol == proto::TCP { "tcp" } else { "udp" },
                    count: ordered.len(),
                    rules: rules.join(", "),
                });
            }
            let mut port_ranges = PortRanges {
                count: ordered.len() as u32,
                ranges: [PortRange::default(); MAX_PORT_RANGES],
            };
            for (slot, range) in port_ranges.ranges.iter_mut().zip(&ordered) {
                *slot = PortRange {
                    lo: range.lo,
                    hi: range.hi,
                    verdict: self.verdicts.of(range),
                };
            }
            let key = RangeKey {
                src_identity: self.src,
                dst_identity: self.dst,
                proto: protocol,
                slot: 0,
                _pad: [0; 2],
            };
            tables.ranges.insert(key, port_ranges);
        }
        Ok(())
    }

    fn any_port_and_any_proto(&self, entries: &mut Vec<(PolicyKey, RuleVerdict)>) {
        for list in self.any_port.chunk_by(|a, b| a.protocol == b.protocol) {
            let protocol = list[0].protocol;
            if let Some(deny) = first_of(RuleKind::Deny, list) {
                entries.push((self.key(protocol, ANY_PORT), self.verdicts.of(deny)));
            } else if self.deny_any_proto().is_none()
                && let Some(allow) = first_of(RuleKind::Allow, list)
            {
                entries.push((self.key(protocol, ANY_PORT), self.verdicts.of(allow)));
            }
        }
        if let Some(chosen) = self
            .deny_any_proto()
            .or_else(|| first_of(RuleKind::Allow, self.any_proto))
        {
            entries.push((self.key(ANY_PROTO, ANY_PORT), self.verdicts.of(chosen)));
        }
    }
}
