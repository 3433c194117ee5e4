//! Compiling a policy into the datapath's tables.
//!
//! The kernel looks rules up in a fixed order — exact `(proto, port)`, the port ranges of
//! `proto` (denies first), `(proto, any port)`, `(any proto)` — and the first hit decides. The
//! compiler arranges the entries so that this order gives DESIGN §4's answer: an explicit deny
//! beats any allow, and among allows the most specific wins (ties: the first in the policy).
//! An allow entry that a less specific deny covers is left out, so the lookup falls through to
//! that deny. [`Compiled::evaluate`] runs the same lookup in userspace for `explain`.

pub mod diff;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use enforcer_common::{
    addr::IpcacheKey,
    identity::{CgroupKey, EndpointKey, HOST, IdentityInfo, WORLD, flags},
    policy::{
        ANY_PORT, ANY_PROTO, MAX_PORT_RANGES, PairKey, PairLayers, PolicyKey, PortRange,
        PortRanges, RangeKey, RuleVerdict, action, layer, proto, rule,
    },
};
use ipnet::IpNet;

use crate::{
    policy::identity,
    policy::{Mode, Peer, Policy, PortMatch, Protocol, RuleKind},
};

/// The parts of this host a policy refers to by name: its own addresses, interface indexes,
/// cgroup ids. Compiling is pure given this view; `host::observe` reads it from the system.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostView {
    pub addresses: Vec<IpAddr>,
    pub interfaces: BTreeMap<String, u32>,
    pub cgroups: BTreeMap<PathBuf, u64>,
}

/// LPM entry of the ipcache, without the slot (the map layer adds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: [u8; 16],
    /// Prefix length over the 16-byte form (IPv4 counts from 96).
    pub len: u8,
}

impl Prefix {
    pub fn of(net: &IpNet) -> Self {
        let (addr, len) = match net {
            IpNet::V4(v4) => (
                enforcer_common::addr::v4_mapped(v4.network().octets()),
                96 + v4.prefix_len(),
            ),
            IpNet::V6(v6) => (v6.network().octets(), v6.prefix_len()),
        };
        Self { addr, len }
    }

    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        let bits = u32::from(self.len);
        let mask = if bits == 0 {
            0
        } else {
            u128::MAX << (128 - bits)
        };
        u128::from_be_bytes(self.addr) & mask == u128::from_be_bytes(*addr) & mask
    }

    pub fn key(&self, slot: u8) -> (u32, IpcacheKey) {
        (
            enforcer_common::addr::IPCACHE_KEY_HEADER_BITS + u32::from(self.len),
            IpcacheKey {
                slot,
                _pad: [0; 3],
                addr: self.addr,
            },
        )
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = enforcer_common::addr::from_key_bytes(self.addr);
        let len = if addr.is_ipv4() {
            self.len.saturating_sub(96)
        } else {
            self.len
        };
        write!(f, "{addr}/{len}")
    }
}

/// The compiled tables, with slot 0 in every key (the map layer writes them into a slot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub ipcache: BTreeMap<Prefix, IdentityInfo>,
    pub endpoints: BTreeMap<EndpointKey, IdentityInfo>,
    pub cgroups: BTreeMap<CgroupKey, IdentityInfo>,
    pub rules: BTreeMap<PolicyKey, RuleVerdict>,
    pub ranges: BTreeMap<RangeKey, PortRanges>,
    /// Which of `rules` and `ranges` each pair has, derived from them.
    pub pairs: BTreeMap<PairKey, PairLayers>,
}

impl Tables {
    /// Entries per kernel map, by map name.
    pub fn entry_counts(&self) -> [(&'static str, usize); 6] {
        [
            ("IPCACHE", self.ipcache.len()),
            ("ENDPOINTS", self.endpoints.len()),
            ("CGROUPS", self.cgroups.len()),
            ("POLICY", self.rules.len()),
            ("PORT_RANGES", self.ranges.len()),
            ("PAIRS", self.pairs.len()),
        ]
    }

    /// The [`PairLayers`] of every pair that has rule entries, from those entries.
    fn pair_layers(&self) -> BTreeMap<PairKey, PairLayers> {
        let mut pairs: BTreeMap<PairKey, PairLayers> = BTreeMap::new();
        let mut mark = |src_identity: u32, dst_identity: u32, bit: u32| {
            pairs
                .entry(PairKey {
                    src_identity,
                    dst_identity,
                    slot: 0,
                    _pad: [0; 3],
                })
                .or_default()
                .bits |= bit;
        };
        for key in self.rules.keys() {
            let bit = match (key.proto, key.port) {
                (ANY_PROTO, _) => layer::ANY_PROTOCOL_BIT,
                (protocol, ANY_PORT) => layer::bit(layer::ANY_PORT, protocol),
                (protocol, _) => layer::bit(layer::EXACT, protocol),
            };
            mark(key.src_identity, key.dst_identity, bit);
        }
        for key in self.ranges.keys() {
            mark(
                key.src_identity,
                key.dst_identity,
                layer::bit(layer::RANGE, key.proto),
            );
        }
        pairs
    }
}

/// What a rule number stands for, for events, alerts and `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RuleInfo {
    pub id: String,
    pub kind: RuleKind,
    pub from: String,
    pub to: String,
    pub ports: String,
    pub max_new_per_sec: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("CIDR identities collide: {a} and {b} both hash to {identity}")]
    CidrCollision { a: IpNet, b: IpNet, identity: u32 },
    #[error(
        "{from} -> {to} over {protocol} has {count} port ranges after merging rules ({rules}); at most {MAX_PORT_RANGES} fit, list single ports or merge ranges"
    )]
    TooManyRanges {
        from: String,
        to: String,
        protocol: &'static str,
        count: usize,
        rules: String,
    },
}

/// What a generation's numbers stand for: events carry a rule number and identities, and may
/// be read after their generation was replaced, so these outlive the generation's tables.
#[derive(Debug, Default)]
pub struct Names {
    /// The rules by the number the kernel's entries and events carry. A rule that is the same in
    /// the generation before shares its entry with it, so keeping several generations' names
    /// costs little more than one.
    pub rules: BTreeMap<u32, Arc<RuleInfo>>,
    /// Every identity the policy names: services, host, world, CIDR peers.
    pub identities: BTreeMap<u32, (String, IdentityInfo)>,
}

impl Names {
    /// The stable id of rule number `number`, as events and alerts show it.
    pub fn rule_id(&self, number: u32) -> String {
        if let Some(reserved) = rule::reserved_name(number) {
            return reserved.to_owned();
        }
        match number {
            rule::NONE => "none".to_owned(),
            user => match self.rules.get(&user) {
                Some(info) => info.id.clone(),
                None => format!("rule-{user}"),
            },
        }
    }

    /// The name of an identity: a service name, `host`, `world`, or a CIDR.
    pub fn identity_name(&self, identity: u32) -> String {
        match self.identities.get(&identity) {
            Some((name, _)) => name.clone(),
            None if identity == WORLD => "world".to_owned(),
            None if identity == HOST => "host".to_owned(),
            None => format!("identity-{identity}"),
        }
    }

    pub fn identity_info(&self, identity: u32) -> IdentityInfo {
        self.identities
            .get(&identity)
            .map_or(IdentityInfo { identity, flags: 0 }, |(_, info)| *info)
    }
}

/// A policy compiled for this host.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub hash: [u8; 32],
    pub audit: bool,
    pub tables: Tables,
    pub names: Arc<Names>,
    /// The rules' numbers in policy order.
    pub rule_order: Vec<u32>,
    /// Things the policy names that this host does not have (skipped, not fatal).
    pub warnings: Vec<String>,
    /// The anomaly detectors' tuning (`[detection]`).
    pub detection: crate::policy::Detection,
}

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
            slot: 0,
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

/// Compiles `policy` for the host described by `host`. Rules that `previous` (the policy in
/// force) also has keep their numbers, so a change touches only the kernel entries of the rules
/// it changes.
pub fn compile(
    policy: &Policy,
    host: &HostView,
    previous: Option<&Compiled>,
) -> Result<Compiled, CompileError> {
    let mut warnings = Vec::new();
    let mut identities: BTreeMap<u32, (String, IdentityInfo)> = BTreeMap::new();
    let host_info = IdentityInfo {
        identity: HOST,
        flags: if policy.manage_host {
            flags::SERVICE
        } else {
            0
        },
    };
    identities.insert(HOST, ("host".to_owned(), host_info));
    identities.insert(WORLD, ("world".to_owned(), IdentityInfo::WORLD));
    let service_infos: Vec<IdentityInfo> = policy
        .services
        .iter()
        .map(|service| {
            let audit = if policy.service_mode(service) == Mode::Audit {
                flags::AUDIT
            } else {
                0
            };
            IdentityInfo {
                identity: service.identity,
                flags: flags::SERVICE | audit,
            }
        })
        .collect();
    for (service, info) in policy.services.iter().zip(&service_infos) {
        identities.insert(info.identity, (service.name.clone(), *info));
    }

    // CIDR peers get identities of their own.
    let cidrs: BTreeSet<IpNet> = policy
        .rules
        .iter()
        .flat_map(|rule| [&rule.from, &rule.to])
        .filter_map(|peer| {
            if let Peer::Cidr(net) = peer {
                Some(*net)
            } else {
                None
            }
        })
        .collect();
    let mut cidr_identity: BTreeMap<IpNet, u32> = BTreeMap::new();
    let mut cidr_owner: BTreeMap<u32, IpNet> = BTreeMap::new();
    for net in &cidrs {
        let id = identity::of_cidr(net);
        if let Some(other) = cidr_owner.get(&id) {
            return Err(CompileError::CidrCollision {
                a: *other,
                b: *net,
                identity: id,
            });
        }
        cidr_owner.insert(id, *net);
        cidr_identity.insert(*net, id);
        identities.insert(
            id,
            (
                net.to_string(),
                IdentityInfo {
                    identity: id,
                    flags: 0,
                },
            ),
        );
    }

    let mut tables = Tables::default();
    for (service, info) in policy.services.iter().zip(&service_infos) {
        for net in &service.addresses {
            tables.ipcache.insert(Prefix::of(net), *info);
        }
        for name in &service.interfaces {
            match host.interfaces.get(name) {
                Some(ifindex) => {
                    tables.endpoints.insert(
                        EndpointKey {
                            ifindex: *ifindex,
                            slot: 0,
                        },
                        *info,
                    );
                }
                None => warnings.push(format!(
                    "interface \"{name}\" of service \"{}\" does not exist on this host; skipped",
                    service.name
                )),
            }
        }
        for path in &service.cgroups {
            match host.cgroups.get(path) {
                Some(cgroup_id) => {
                    tables.cgroups.insert(
                        CgroupKey {
                            cgroup_id: *cgroup_id,
                            slot: 0,
                            _pad: 0,
                        },
                        *info,
                    );
                }
                None => warnings.push(format!(
                    "cgroup {} of service \"{}\" does not exist on this host; skipped",
                    path.display(),
                    service.name
                )),
            }
        }
    }
    for (net, id) in &cidr_identity {
        tables
            .ipcache
            .entry(Prefix::of(net))
            .or_insert(IdentityInfo {
                identity: *id,
                flags: 0,
            });
    }
    for addr in &host.addresses {
        let prefix = Prefix::of(&IpNet::from(*addr));
        match tables.ipcache.get(&prefix) {
            None => {
                tables.ipcache.insert(prefix, host_info);
            }
            Some(existing) if existing.identity >= enforcer_common::identity::SERVICE_END => warnings.push(format!(
                "host address {addr} is also CIDR peer {prefix} in a rule; it resolves to that CIDR, not to \"host\""
            )),
            Some(_) => {}
        }
    }

    // Rule entries.
    let infos: Vec<RuleInfo> = policy
        .rules
        .iter()
        .map(|rule| RuleInfo {
            id: rule.id.clone(),
            kind: rule.kind,
            from: policy.peer_name(&rule.from),
            to: policy.peer_name(&rule.to),
            ports: if rule.ports.is_empty() {
                "any".to_owned()
            } else {
                rule.ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            max_new_per_sec: rule.max_new_per_sec,
        })
        .collect();
    let numbers = number_rules(&infos, previous);
    let expand = |peer: &Peer, identities: &mut Vec<u32>| {
        identities.clear();
        match peer {
            Peer::Service(index) => identities.push(service_infos[*index].identity),
            Peer::Host => identities.push(HOST),
            // World is everything unclaimed, and that includes addresses a CIDR rule names.
            Peer::World => {
                identities.push(WORLD);
                identities.extend(cidr_identity.values().copied());
            }
            // A longest-prefix match resolves an address inside a narrower CIDR peer to that
            // peer's identity; rules about the wider CIDR must apply to it too.
            Peer::Cidr(net) => identities.extend(
                cidr_identity
                    .iter()
                    .filter(|(inner, _)| net.contains(*inner))
                    .map(|(_, id)| *id),
            ),
        }
    };
    // Every rule's matches, grouped by pair and lookup layer by sorting: no per-pair
    // collections, which for 100 000 pairs cost more than the rest of the compile.
    let mut matches: Vec<PairMatch> = Vec::with_capacity(policy.rules.len());
    let (mut sources, mut destinations) = (Vec::new(), Vec::new());
    let mut order = 0u32;
    for (index, rule) in policy.rules.iter().enumerate() {
        expand(&rule.from, &mut sources);
        expand(&rule.to, &mut destinations);
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
    let verdict_of = |found: &PairMatch| -> RuleVerdict {
        let rule = &policy.rules[found.rule];
        let (verdict_action, bucket, limit) = match rule.kind {
            RuleKind::Deny => (action::DENY, 0, 0),
            RuleKind::Allow => match rule.max_new_per_sec {
                Some(limit) => (action::ALLOW, identity::of_rule_bucket(&rule.id), limit),
                None => (action::ALLOW, 0, 0),
            },
        };
        RuleVerdict {
            rule: numbers[found.rule],
            bucket,
            max_new_per_sec: limit,
            action: verdict_action,
            _pad: [0; 3],
        }
    };
    let mut rule_entries: Vec<(PolicyKey, RuleVerdict)> = Vec::with_capacity(matches.len());
    for pair_matches in matches.chunk_by(|a, b| a.pair == b.pair) {
        let (src, dst) = pair_matches[0].pair;
        let key = |protocol: u8, port: u16| PolicyKey {
            src_identity: src,
            dst_identity: dst,
            port,
            proto: protocol,
            slot: 0,
        };
        let exact = layer_of(pair_matches, Layer::Exact);
        let ranges = layer_of(pair_matches, Layer::Range);
        let any_port = layer_of(pair_matches, Layer::AnyPort);
        let any_proto = layer_of(pair_matches, Layer::AnyProto);
        let deny_any_proto = first_of(RuleKind::Deny, any_proto);
        let deny_any_port = |protocol: u8| {
            first_of(
                RuleKind::Deny,
                any_port
                    .iter()
                    .filter(|candidate| candidate.protocol == protocol),
            )
        };
        let denied_by_range = |protocol: u8, port: u16| {
            ranges.iter().any(|range| {
                range.protocol == protocol
                    && range.kind == RuleKind::Deny
                    && range.lo <= port
                    && port <= range.hi
            })
        };
        for list in exact.chunk_by(|a, b| (a.protocol, a.port) == (b.protocol, b.port)) {
            let (protocol, port) = (list[0].protocol, list[0].port);
            if let Some(deny) = first_of(RuleKind::Deny, list) {
                rule_entries.push((key(protocol, port), verdict_of(deny)));
            } else if deny_any_proto.is_none()
                && deny_any_port(protocol).is_none()
                && !denied_by_range(protocol, port)
                && let Some(allow) = first_of(RuleKind::Allow, list)
            {
                rule_entries.push((key(protocol, port), verdict_of(allow)));
            }
        }
        for list in ranges.chunk_by(|a, b| a.protocol == b.protocol) {
            let protocol = list[0].protocol;
            let allows_covered = deny_any_proto.is_some() || deny_any_port(protocol).is_some();
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
                    .map(|range| policy.rules[range.rule].id.as_str())
                    .collect();
                rules.dedup();
                return Err(CompileError::TooManyRanges {
                    from: identities
                        .get(&src)
                        .map_or_else(|| src.to_string(), |(name, _)| name.clone()),
                    to: identities
                        .get(&dst)
                        .map_or_else(|| dst.to_string(), |(name, _)| name.clone()),
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
                    verdict: verdict_of(range),
                };
            }
            tables.ranges.insert(
                RangeKey {
                    src_identity: src,
                    dst_identity: dst,
                    proto: protocol,
                    slot: 0,
                    _pad: [0; 2],
                },
                port_ranges,
            );
        }
        for list in any_port.chunk_by(|a, b| a.protocol == b.protocol) {
            let protocol = list[0].protocol;
            if let Some(deny) = first_of(RuleKind::Deny, list) {
                rule_entries.push((key(protocol, ANY_PORT), verdict_of(deny)));
            } else if deny_any_proto.is_none()
                && let Some(allow) = first_of(RuleKind::Allow, list)
            {
                rule_entries.push((key(protocol, ANY_PORT), verdict_of(allow)));
            }
        }
        if let Some(chosen) = deny_any_proto.or_else(|| first_of(RuleKind::Allow, any_proto)) {
            rule_entries.push((key(ANY_PROTO, ANY_PORT), verdict_of(chosen)));
        }
    }
    tables.rules = rule_entries.into_iter().collect();
    tables.pairs = tables.pair_layers();

    let rules = infos
        .into_iter()
        .zip(&numbers)
        .map(|(info, number)| {
            let shared = previous
                .and_then(|previous| previous.names.rules.get(number))
                .filter(|was| ***was == info);
            (*number, shared.map_or_else(|| Arc::new(info), Arc::clone))
        })
        .collect();
    Ok(Compiled {
        hash: policy.hash,
        audit: policy.mode == Mode::Audit,
        tables,
        names: Arc::new(Names { rules, identities }),
        rule_order: numbers,
        warnings,
        detection: policy.detection.clone(),
    })
}

/// The number of each of `rules` (in policy order). A rule the previous generation had keeps
/// its number: those before and after the changed part of the policy by position, those in it
/// by same id and meaning, then by same meaning (a rule whose default id moved with its line).
/// The rest take the lowest free numbers. So adding or removing a rule leaves every other
/// rule's kernel entries as they are.
fn number_rules(rules: &[RuleInfo], previous: Option<&Compiled>) -> Vec<u32> {
    type Meaning<'a> = (RuleKind, &'a str, &'a str, &'a str, Option<u32>);
    fn meaning(info: &RuleInfo) -> Meaning<'_> {
        (
            info.kind,
            &info.from,
            &info.to,
            &info.ports,
            info.max_new_per_sec,
        )
    }
    let mut numbers: Vec<Option<u32>> = vec![None; rules.len()];
    if let Some(previous) = previous {
        let old: Vec<(&RuleInfo, u32)> = previous
            .rule_order
            .iter()
            .filter_map(|number| Some((&**previous.names.rules.get(number)?, *number)))
            .collect();
        let shorter = rules.len().min(old.len());
        let same_start = rules
            .iter()
            .zip(&old)
            .take_while(|(rule, (was, _))| *rule == *was)
            .count();
        let same_end = rules[same_start..]
            .iter()
            .rev()
            .zip(old[same_start..].iter().rev())
            .take(shorter - same_start)
            .take_while(|(rule, (was, _))| *rule == *was)
            .count();
        let new_middle = same_start..rules.len() - same_end;
        let old_middle = &old[same_start..old.len() - same_end];
        for (index, (_, number)) in (0..same_start)
            .zip(&old)
            .chain((rules.len() - same_end..rules.len()).zip(&old[old.len() - same_end..]))
        {
            numbers[index] = Some(*number);
        }
        let mut by_info: HashMap<&RuleInfo, u32> = old_middle.iter().copied().collect();
        for index in new_middle.clone() {
            if let Some(number) = by_info.remove(&rules[index]) {
                numbers[index] = Some(number);
            }
        }
        let mut by_meaning: HashMap<Meaning<'_>, VecDeque<u32>> = HashMap::new();
        for (was, number) in old_middle {
            if by_info.contains_key(was) {
                by_meaning
                    .entry(meaning(was))
                    .or_default()
                    .push_back(*number);
            }
        }
        for index in new_middle {
            if numbers[index].is_none()
                && let Some(number) = by_meaning
                    .get_mut(&meaning(&rules[index]))
                    .and_then(VecDeque::pop_front)
            {
                numbers[index] = Some(number);
            }
        }
    }
    let taken: HashSet<u32> = numbers.iter().flatten().copied().collect();
    let mut next_free = rule::FIRST_USER;
    numbers
        .into_iter()
        .map(|number| {
            number.unwrap_or_else(|| {
                while taken.contains(&next_free) {
                    next_free += 1;
                }
                next_free += 1;
                next_free - 1
            })
        })
        .collect()
}

/// A protocol name for a wire protocol number (ICMPv6 counts as ICMP, as in the policy).
pub fn protocol_name(wire_proto: u8) -> String {
    match wire_proto {
        proto::TCP => Protocol::Tcp.as_str().to_owned(),
        proto::UDP => Protocol::Udp.as_str().to_owned(),
        proto::ICMP | proto::ICMPV6 => Protocol::Icmp.as_str().to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::parse_sources;

    fn compile_text(text: &str) -> Compiled {
        let policy =
            parse_sources(vec![(PathBuf::from("p.toml"), text.to_owned())]).expect("valid policy");
        compile(&policy, &HostView::default(), None).expect("compiles")
    }

    /// Kernel rule entries that `next` adds, removes or changes relative to `previous`.
    fn rewritten_entries(previous: &Compiled, next: &Compiled) -> usize {
        let changed = next
            .tables
            .rules
            .iter()
            .filter(|(key, verdict)| previous.tables.rules.get(key) != Some(verdict))
            .count();
        let removed = previous
            .tables
            .rules
            .keys()
            .filter(|key| !next.tables.rules.contains_key(key))
            .count();
        changed + removed
    }

    #[test]
    fn adding_removing_or_changing_one_rule_rewrites_only_that_rules_entries() {
        // Half the rules with ids, half with default ids (which carry their line number).
        let rules: Vec<String> = (0..40)
            .map(|n| {
                let id = if n % 2 == 0 {
                    format!("id = \"r{n}\"\n")
                } else {
                    String::new()
                };
                format!(
                    "[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"{}/tcp\"]\n{id}",
                    1000 + n
                )
            })
            .collect();
        let text = |rules: &[String]| format!("{SERVICES}{}", rules.concat());
        let parse = |rules: &[String]| {
            parse_sources(vec![(PathBuf::from("p.toml"), text(rules))]).expect("valid policy")
        };
        let before = compile(&parse(&rules), &HostView::default(), None).unwrap();
        let new_rule = "[[allow]]\nfrom = \"b\"\nto = \"a\"\nports = [\"9/tcp\"]\n".to_owned();
        let mut inserted_first = rules.clone();
        inserted_first.insert(0, new_rule.clone());
        let mut removed_middle = rules.clone();
        removed_middle.remove(20);
        let mut port_changed = rules.clone();
        port_changed[10] = port_changed[10].replace("1010/tcp", "2010/tcp");
        for (change, after, rewritten) in [
            ("a rule added first", inserted_first, 1),
            ("a rule removed", removed_middle, 1),
            ("a rule's port changed", port_changed, 2),
        ] {
            let policy = parse(&after);
            let compiled = compile(&policy, &HostView::default(), Some(&before)).unwrap();
            assert_eq!(rewritten_entries(&before, &compiled), rewritten, "{change}");
            // Every rule still answers to its own id.
            for rule in &policy.rules {
                let PortMatch::Port(_, port) = rule.ports[0] else {
                    unreachable!()
                };
                let from = policy.peer_name(&rule.from);
                let to = policy.peer_name(&rule.to);
                assert_eq!(
                    decide(&compiled, &from, &to, proto::TCP, port),
                    (action::ALLOW, rule.id.clone()),
                    "{change}"
                );
            }
            let numbers: BTreeSet<u32> = compiled.names.rules.keys().copied().collect();
            assert_eq!(
                numbers.len(),
                policy.rules.len(),
                "{change}: one number a rule"
            );
        }
        // Without the policy in force to follow, numbers follow the policy order.
        let fresh = compile(&parse(&rules), &HostView::default(), None).unwrap();
        assert_eq!(
            fresh.names.rules.keys().copied().collect::<Vec<_>>(),
            (rule::FIRST_USER..rule::FIRST_USER + 40).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_new_generation_shares_the_names_of_rules_that_did_not_change() {
        let rule = |port: u16, id: &str| {
            format!(
                "[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"{port}/tcp\"]\nid = \"{id}\"\n"
            )
        };
        let before = compile_text(&format!(
            "{SERVICES}{}{}",
            rule(80, "web"),
            rule(5432, "db")
        ));
        let policy = parse_sources(vec![(
            PathBuf::from("p.toml"),
            format!("{SERVICES}{}{}", rule(80, "web"), rule(5433, "db")),
        )])
        .unwrap();
        let after = compile(&policy, &HostView::default(), Some(&before)).unwrap();
        let info = |compiled: &Compiled, id: &str| {
            compiled
                .names
                .rules
                .values()
                .find(|info| info.id == id)
                .cloned()
                .unwrap()
        };
        assert!(Arc::ptr_eq(&info(&before, "web"), &info(&after, "web")));
        assert!(!Arc::ptr_eq(&info(&before, "db"), &info(&after, "db")));
        assert_eq!(info(&after, "db").ports, "5433/tcp");
    }

    fn decide(compiled: &Compiled, from: &str, to: &str, protocol: u8, port: u16) -> (u8, String) {
        let by_name = |name: &str| {
            compiled
                .names
                .identities
                .values()
                .find(|(candidate, _)| candidate == name)
                .map(|(_, info)| *info)
                .expect("known identity")
        };
        let verdict = compiled.evaluate(&by_name(from), &by_name(to), protocol, port);
        (verdict.action, compiled.names.rule_id(verdict.rule))
    }

    const SERVICES: &str = r#"
[[service]]
name = "a"
addresses = ["10.0.0.1/32"]
[[service]]
name = "b"
addresses = ["10.0.0.2/32"]
"#;

    #[test]
    fn exact_range_any_port_and_default() {
        let compiled = compile_text(&format!(
            "{SERVICES}
[[allow]]
from = \"a\"
to = \"b\"
ports = [\"443/tcp\", \"8000-8100/tcp\", \"icmp\"]
id = \"a-b\"
"
        ));
        for port in [443, 8000, 8050, 8100] {
            assert_eq!(
                decide(&compiled, "a", "b", proto::TCP, port),
                (action::ALLOW, "a-b".to_owned()),
                "port {port}"
            );
        }
        for port in [442, 7999, 8101] {
            assert_eq!(
                decide(&compiled, "a", "b", proto::TCP, port),
                (action::DENY, "default-deny".to_owned()),
                "port {port}"
            );
        }
        assert_eq!(decide(&compiled, "a", "b", proto::ICMP, 0).0, action::ALLOW);
        assert_eq!(
            decide(&compiled, "a", "b", proto::ICMPV6, 0).0,
            action::ALLOW
        );
        assert_eq!(decide(&compiled, "a", "b", proto::UDP, 443).0, action::DENY);
        assert_eq!(
            decide(&compiled, "b", "a", proto::TCP, 443).0,
            action::DENY,
            "rules are directional"
        );
    }

    /// DESIGN §4 stated directly, rule by rule, for the randomized test below: a deny that
    /// matches beats every allow; the deciding rule is the most specific match of the winning
    /// kind (exact port, then range, then any port of the protocol, then any protocol), the
    /// first in the policy among equally specific ones; with no match, default-deny.
    fn reference_decision(
        policy: &Policy,
        src: usize,
        dst: usize,
        protocol: u8,
        port: u16,
    ) -> (u8, String) {
        let specificity = |ports: &[PortMatch]| -> Option<u8> {
            if ports.is_empty() {
                return Some(3);
            }
            ports
                .iter()
                .filter_map(|port_match| match *port_match {
                    PortMatch::Port(p, number) if p.number() == protocol && number == port => {
                        Some(0)
                    }
                    PortMatch::Range(p, lo, hi)
                        if p.number() == protocol && lo <= port && port <= hi =>
                    {
                        Some(1)
                    }
                    PortMatch::AnyPort(p) if p.number() == protocol => Some(2),
                    _ => None,
                })
                .min()
        };
        let best = |kind: RuleKind| {
            policy
                .rules
                .iter()
                .filter(|rule| {
                    rule.kind == kind
                        && rule.from == Peer::Service(src)
                        && rule.to == Peer::Service(dst)
                })
                .filter_map(|rule| Some((specificity(&rule.ports)?, rule)))
                .min_by_key(|(specificity, _)| *specificity)
                .map(|(_, rule)| rule.id.clone())
        };
        match (best(RuleKind::Deny), best(RuleKind::Allow)) {
            (Some(deny), _) => (action::DENY, deny),
            (None, Some(allow)) => (action::ALLOW, allow),
            (None, None) => (action::DENY, "default-deny".to_owned()),
        }
    }

    #[test]
    fn compiled_lookups_agree_with_the_rules_read_directly_on_random_policies() {
        use enforcer_testbed::policies::{RANDOM_PORTS, RANDOM_SERVICES, random};
        let names = RANDOM_SERVICES.map(|(name, _)| name);
        for seed in 0..300 {
            let text = random(seed);
            let policy =
                parse_sources(vec![(PathBuf::from("p.toml"), text.clone())]).expect("valid policy");
            let compiled = compile(&policy, &HostView::default(), None).expect("compiles");
            let index_of = |name: &str| {
                policy
                    .services
                    .iter()
                    .position(|service| service.name == name)
                    .unwrap()
            };
            for from in names {
                for to in names {
                    for protocol in [proto::TCP, proto::UDP, proto::ICMP] {
                        let ports: Vec<u16> = if protocol == proto::ICMP {
                            vec![ANY_PORT]
                        } else {
                            RANDOM_PORTS.collect()
                        };
                        for port in ports {
                            assert_eq!(
                                decide(&compiled, from, to, protocol, port),
                                reference_decision(
                                    &policy,
                                    index_of(from),
                                    index_of(to),
                                    protocol,
                                    port
                                ),
                                "{from} -> {to} {protocol}/{port} under\n{text}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn deny_beats_allow_at_every_layer() {
        // Each deny is less specific than the allow it must beat.
        for (allow_ports, deny_ports, probe) in [
            ("[\"5432/tcp\"]", "[\"5000-6000/tcp\"]", 5432),
            ("[\"5432/tcp\"]", "[\"tcp\"]", 5432),
            ("[\"5432/tcp\"]", "null", 5432),
            ("[\"5000-6000/tcp\"]", "[\"tcp\"]", 5500),
            ("[\"tcp\"]", "null", 22),
            ("[\"5432/tcp\"]", "[\"5432/tcp\"]", 5432),
            ("null", "[\"5432/tcp\"]", 5432),
        ] {
            let deny_ports = if deny_ports == "null" {
                String::new()
            } else {
                format!("ports = {deny_ports}")
            };
            let allow_ports = if allow_ports == "null" {
                String::new()
            } else {
                format!("ports = {allow_ports}")
            };
            let compiled = compile_text(&format!(
                "{SERVICES}
[[allow]]
from = \"a\"
to = \"b\"
{allow_ports}
id = \"allow-it\"
[[deny]]
from = \"a\"
to = \"b\"
{deny_ports}
id = \"deny-it\"
"
            ));
            assert_eq!(
                decide(&compiled, "a", "b", proto::TCP, probe),
                (action::DENY, "deny-it".to_owned()),
                "allow {allow_ports} / deny {deny_ports}"
            );
        }
    }

    #[test]
    fn more_specific_allow_wins_and_carries_its_rate_limit() {
        let compiled = compile_text(&format!(
            "{SERVICES}
[[allow]]
from = \"a\"
to = \"b\"
id = \"anything\"
[[allow]]
from = \"a\"
to = \"b\"
ports = [\"443/tcp\"]
max_new_per_sec = 10
id = \"https\"
"
        ));
        assert_eq!(decide(&compiled, "a", "b", proto::TCP, 443).1, "https");
        assert_eq!(decide(&compiled, "a", "b", proto::TCP, 80).1, "anything");
        let key = PolicyKey {
            src_identity: identity::of_service_name("a"),
            dst_identity: identity::of_service_name("b"),
            port: 443,
            proto: proto::TCP,
            slot: 0,
        };
        let verdict = compiled.tables.rules[&key];
        assert_eq!(verdict.max_new_per_sec, 10);
        assert_eq!(verdict.bucket, identity::of_rule_bucket("https"));
    }

    #[test]
    fn undeclared_parties_default_to_allow() {
        let compiled = compile_text(SERVICES);
        assert_eq!(
            decide(&compiled, "world", "world", proto::TCP, 80),
            (action::ALLOW, "default-allow".to_owned())
        );
        assert_eq!(
            decide(&compiled, "world", "a", proto::TCP, 80).0,
            action::DENY
        );
        assert_eq!(
            decide(&compiled, "host", "world", proto::TCP, 80).0,
            action::ALLOW,
            "host is unmanaged by default"
        );
        let managed = compile_text(&format!("[settings]\nmanage_host = true\n{SERVICES}"));
        assert_eq!(
            decide(&managed, "host", "world", proto::TCP, 80).0,
            action::DENY
        );
    }

    #[test]
    fn cidr_rules_cover_nested_cidrs_and_world_rules_cover_cidrs() {
        let compiled = compile_text(&format!(
            "{SERVICES}
[[allow]]
from = \"10.1.0.0/16\"
to = \"a\"
ports = [\"80/tcp\"]
id = \"wide\"
[[allow]]
from = \"10.1.2.0/24\"
to = \"a\"
ports = [\"81/tcp\"]
id = \"narrow\"
[[allow]]
from = \"world\"
to = \"a\"
ports = [\"82/tcp\"]
id = \"everyone\"
"
        ));
        let narrow = compiled.resolve_address("10.1.2.3".parse().unwrap());
        let wide = compiled.resolve_address("10.1.9.9".parse().unwrap());
        let elsewhere = compiled.resolve_address("192.0.2.1".parse().unwrap());
        assert_eq!(elsewhere, IdentityInfo::WORLD);
        let a = compiled.resolve_address("10.0.0.1".parse().unwrap());
        let rule = |src: &IdentityInfo, port| {
            compiled
                .names
                .rule_id(compiled.evaluate(src, &a, proto::TCP, port).rule)
        };
        assert_eq!(rule(&narrow, 80), "wide");
        assert_eq!(rule(&narrow, 81), "narrow");
        assert_eq!(rule(&narrow, 82), "everyone");
        assert_eq!(rule(&wide, 81), "default-deny");
        assert_eq!(rule(&elsewhere, 82), "everyone");
        assert_eq!(rule(&elsewhere, 80), "default-deny");
    }

    #[test]
    fn host_addresses_resolve_to_host_unless_a_service_owns_them() {
        let policy = parse_sources(vec![(PathBuf::from("p.toml"), SERVICES.to_owned())]).unwrap();
        let host = HostView {
            addresses: vec!["10.0.0.1".parse().unwrap(), "10.9.9.9".parse().unwrap()],
            ..Default::default()
        };
        let compiled = compile(&policy, &host, None).unwrap();
        assert_eq!(
            compiled
                .resolve_address("10.9.9.9".parse().unwrap())
                .identity,
            HOST
        );
        assert_eq!(
            compiled
                .resolve_address("10.0.0.1".parse().unwrap())
                .identity,
            identity::of_service_name("a")
        );
    }

    #[test]
    fn missing_interfaces_and_cgroups_are_warnings() {
        let policy = parse_sources(vec![(
            PathBuf::from("p.toml"),
            "[[service]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\"]\ninterfaces = [\"veth-a\", \"veth-gone\"]\ncgroups = [\"/sys/fs/cgroup/x\"]\n".to_owned(),
        )])
        .unwrap();
        let host = HostView {
            interfaces: BTreeMap::from([("veth-a".to_owned(), 7)]),
            ..Default::default()
        };
        let compiled = compile(&policy, &host, None).unwrap();
        assert_eq!(compiled.tables.endpoints.len(), 1);
        assert_eq!(
            compiled.tables.endpoints[&EndpointKey {
                ifindex: 7,
                slot: 0
            }]
                .identity,
            identity::of_service_name("a")
        );
        assert_eq!(compiled.warnings.len(), 2, "{:?}", compiled.warnings);
    }

    #[test]
    fn audit_mode_is_carried_per_service() {
        let compiled = compile_text(
            "[[service]]\nname = \"a\"\nmode = \"audit\"\n[[service]]\nname = \"b\"\n",
        );
        assert!(
            compiled
                .names
                .identity_info(identity::of_service_name("a"))
                .is_audit()
        );
        assert!(
            !compiled
                .names
                .identity_info(identity::of_service_name("b"))
                .is_audit()
        );
        assert!(!compiled.audit);
        assert!(compile_text("[settings]\nmode = \"audit\"\n").audit);
    }

    #[test]
    fn too_many_ranges_is_an_error_naming_the_edge() {
        let ports: Vec<String> = (0..17)
            .map(|i| format!("\"{}-{}/tcp\"", 1000 + i * 10, 1005 + i * 10))
            .collect();
        let text = format!(
            "{SERVICES}\n[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [{}]\nid = \"many\"\n",
            ports.join(", ")
        );
        let policy = parse_sources(vec![(PathBuf::from("p.toml"), text)]).unwrap();
        let error = compile(&policy, &HostView::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("a -> b over tcp has 17 port ranges"),
            "{error}"
        );
    }
}
