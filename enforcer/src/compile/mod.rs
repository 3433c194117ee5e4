//! Compiling a policy into the datapath's tables.
//!
//! The kernel looks rules up in a fixed order — exact `(proto, port)`, the port ranges of
//! `proto` (denies first), `(proto, any port)`, `(any proto)` — and the first hit decides. The
//! compiler arranges the entries so that this order gives DESIGN §4's answer: an explicit deny
//! beats any allow, and among allows the most specific wins (ties: the first in the policy).
//! An allow entry that a less specific deny covers is left out, so the lookup falls through to
//! that deny. [`Compiled::evaluate`] runs the same lookup in userspace for `explain`.

mod change;
pub mod diff;

mod evaluate;
mod identities;
mod numbering;
mod rules;
mod tables;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use enforcer_common::{
    identity::{HOST, IdentityInfo, WORLD},
    policy::{MAX_PORT_RANGES, proto, rule},
};
use imbl::OrdMap;
use ipnet::IpNet;

pub use self::{
    change::{Before, compile_change},
    tables::{Cgroup, HostView, Pair, Prefix, Tables},
};
use self::{identities::Identities, numbering::number_rules};
use crate::policy::{Mode, Peer, Policy, PortMatch, Protocol, Rule, RuleKind};

/// What a rule number stands for, for events, alerts and `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RuleInfo {
    pub id: Box<str>,
    pub kind: RuleKind,
    /// Shared with every other rule of the generation that names the same peer or ports: a
    /// generation's names are kept for as long as its events may arrive, 100 000 rules' worth
    /// each.
    pub from: Arc<str>,
    pub to: Arc<str>,
    pub ports: Arc<str>,
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
    /// costs little more than one. Persistent (see `imbl`): a change copies it in O(1).
    pub rules: OrdMap<u32, Arc<RuleInfo>>,
    /// Every identity the policy names: services, host, world, CIDR peers.
    pub identities: BTreeMap<u32, (String, IdentityInfo)>,
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
    let mut tables = Tables::default();
    let identities = Identities::of(policy)?;
    identities.place(policy, host, &mut tables, &mut warnings);
    let mut shared = SharedNames::of(policy);
    let infos: Vec<RuleInfo> = policy
        .rules
        .iter()
        .map(|rule| RuleInfo::of(&mut shared, rule))
        .collect();
    let numbers = number_rules(&infos, previous);
    rules::write_entries(policy, &identities, &numbers, &mut tables)?;
    let rule_sources = policy
        .rules
        .iter()
        .map(|rule| identities.single(&rule.from))
        .collect();
    Ok(Compiled {
        hash: policy.hash,
        audit: policy.mode == Mode::Audit,
        tables: Arc::new(tables),
        names: Arc::new(Names::of(
            infos,
            &numbers,
            identities.names.clone(),
            previous,
        )),
        rule_order: numbers,
        rule_sources,
        identities: Arc::new(identities),
        warnings,
        detection: policy.detection.clone(),
    })
}

impl RuleInfo {
    fn of<'a>(shared: &mut SharedNames<'a>, rule: &'a Rule) -> Self {
        Self {
            id: rule.id.clone(),
            kind: rule.kind,
            from: shared.of_peer(&rule.from),
            to: shared.of_peer(&rule.to),
            ports: shared.of_ports(&rule.ports),
            max_new_per_sec: rule.max_new_per_sec,
        }
    }
}

/// Each peer's name (as `Policy::peer_name` gives it) and each list of ports as text, made
/// once for all the rules that name them.
struct SharedNames<'a> {
    policy: &'a Policy,
    /// By index, as rules name services: the lookup every rule does twice stays an index.
    services: Vec<Arc<str>>,
    /// World, host and CIDR peers.
    others: HashMap<&'a Peer, Arc<str>>,
    ports: HashMap<&'a [PortMatch], Arc<str>>,
}

impl<'a> SharedNames<'a> {
    fn of(policy: &'a Policy) -> Self {
        Self {
            policy,
            services: (0..policy.services.len())
                .map(|index| policy.peer_name(&Peer::Service(index)).into())
                .collect(),
            others: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    fn of_peer(&mut self, peer: &'a Peer) -> Arc<str> {
        let policy = self.policy;
        let name = match peer {
            Peer::Service(index) => &self.services[*index],
            other => self
                .others
                .entry(other)
                .or_insert_with(|| policy.peer_name(other).into()),
        };
        Arc::clone(name)
    }

    fn of_ports(&mut self, ports: &'a [PortMatch]) -> Arc<str> {
        let text = self.ports.entry(ports).or_insert_with(|| {
            if ports.is_empty() {
                "any".into()
            } else {
                let each: Vec<String> = ports.iter().map(ToString::to_string).collect();
                each.join(", ").into()
            }
        });
        Arc::clone(text)
    }
}

impl Names {
    /// The names of a generation whose rules are `infos`, numbered `numbers`. A rule the
    /// `previous` generation has unchanged shares its entry.
    fn of(
        infos: Vec<RuleInfo>,
        numbers: &[u32],
        identities: BTreeMap<u32, (String, IdentityInfo)>,
        previous: Option<&Compiled>,
    ) -> Self {
        let rules = infos
            .into_iter()
            .zip(numbers)
            .map(|(info, number)| {
                let shared = previous
                    .and_then(|previous| previous.names.rules.get(number))
                    .filter(|was| ***was == info);
                (*number, shared.map_or_else(|| Arc::new(info), Arc::clone))
            })
            .collect();
        Self { rules, identities }
    }

    /// The stable id of rule number `number`, as events and alerts show it.
    pub fn rule_id(&self, number: u32) -> String {
        if let Some(reserved) = rule::reserved_name(number) {
            return reserved.to_owned();
        }
        match number {
            rule::NONE => "none".to_owned(),
            user => match self.rules.get(&user) {
                Some(info) => info.id.to_string(),
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
    /// Shared with the installer, which remembers what each slot holds (a copy took several
    /// milliseconds of the switch, and memory, at 100 000 rules).
    pub tables: Arc<Tables>,
    pub names: Arc<Names>,
    /// The rules' numbers in policy order.
    pub rule_order: Vec<u32>,
    /// The rules' source identities in policy order ([`identities::MANY`] for a peer that
    /// stands for several): what a change looks through for the rules of the pairs it touches.
    pub(crate) rule_sources: Vec<u32>,
    /// The identities the policy names. A change to rules that name no CIDR leaves them as
    /// they are.
    pub(crate) identities: Arc<Identities>,
    /// Things the policy names that this host does not have (skipped, not fatal).
    pub warnings: Vec<String>,
    /// The anomaly detectors' tuning (`[detection]`).
    pub detection: crate::policy::Detection,
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
    use std::{collections::BTreeSet, path::PathBuf};

    use enforcer_common::{
        identity::EndpointKey,
        policy::{ANY_PORT, PolicyKey, action},
    };

    use super::*;
    use crate::policy::parse_sources;
    use crate::policy::{Peer, PortMatch, identity};

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
            .filter(|(key, verdict)| previous.tables.rules.get(*key) != Some(verdict))
            .count();
        let removed = previous
            .tables
            .rules
            .keys()
            .filter(|key| !next.tables.rules.contains_key(*key))
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
                    (action::ALLOW, rule.id.to_string()),
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
                .find(|info| &*info.id == id)
                .cloned()
                .unwrap()
        };
        assert!(Arc::ptr_eq(&info(&before, "web"), &info(&after, "web")));
        assert!(!Arc::ptr_eq(&info(&before, "db"), &info(&after, "db")));
        assert_eq!(&*info(&after, "db").ports, "5433/tcp");
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

    /// A random rule over services `a`..`d`, world, host and two CIDRs: allow or deny, exact
    /// ports, ranges, whole protocols or any protocol, now and then a rate limit or an id.
    fn random_rule(draw: &mut enforcer_testbed::policies::Draw) -> String {
        const PEERS: [&str; 8] = [
            "a",
            "b",
            "c",
            "d",
            "world",
            "host",
            "192.168.0.0/16",
            "192.168.1.0/24",
        ];
        const PORTS: [&str; 7] = [
            "80/tcp",
            "81/tcp",
            "80-90/tcp",
            "tcp",
            "53/udp",
            "icmp",
            "1000-2000/udp",
        ];
        let mut pick =
            |choices: &[&'static str]| choices[draw.below(choices.len() as u64) as usize];
        let kind = if pick(&["allow", "allow", "allow", "deny"]) == "deny" {
            "deny"
        } else {
            "allow"
        };
        let (from, to) = (pick(&PEERS), pick(&PEERS));
        let mut text = format!("[[{kind}]]\nfrom = \"{from}\"\nto = \"{to}\"\n");
        if draw.chance(80) {
            let ports: Vec<String> = (0..1 + draw.below(2))
                .map(|_| format!("\"{}\"", PORTS[draw.below(PORTS.len() as u64) as usize]))
                .collect();
            text.push_str(&format!("ports = [{}]\n", ports.join(", ")));
        }
        if kind == "allow" && draw.chance(15) {
            text.push_str(&format!("max_new_per_sec = {}\n", 1 + draw.below(100)));
        }
        if draw.chance(50) {
            text.push_str(&format!("id = \"r{}\"\n", draw.below(1_000_000)));
        }
        text
    }

    /// `compile_change` after `before`, and the whole compile with the same previous
    /// generation: the same tables, numbers, names and warnings, or the same error.
    fn assert_change_compiles_as_whole(
        policy: &Policy,
        before: Option<&(Policy, Compiled)>,
        context: &str,
    ) -> Option<Compiled> {
        let host = HostView::default();
        let whole = compile(policy, &host, before.map(|(_, compiled)| compiled));
        let change = match before {
            Some((was, compiled)) => compile_change(
                policy,
                &host,
                Before {
                    policy: was,
                    host: &host,
                    compiled,
                },
            ),
            None => compile(policy, &host, None),
        };
        let (whole, change) = match (whole, change) {
            (Ok(whole), Ok(change)) => (whole, change),
            (whole, change) => {
                let error = |result: Result<Compiled, CompileError>| {
                    result.err().map(|error| error.to_string())
                };
                assert_eq!(error(whole), error(change), "{context}");
                return None;
            }
        };
        assert_eq!(whole.tables, change.tables, "{context}");
        assert_eq!(whole.rule_order, change.rule_order, "{context}");
        assert_eq!(whole.rule_sources, change.rule_sources, "{context}");
        assert_eq!(whole.identities.cidrs, change.identities.cidrs, "{context}");
        assert_eq!(whole.names.rules, change.names.rules, "{context}");
        assert_eq!(whole.names.identities, change.names.identities, "{context}");
        assert_eq!(whole.warnings, change.warnings, "{context}");
        Some(change)
    }

    /// A change compiled on its own compiles to what the whole policy compiles to: over a run
    /// of edits (rules added, removed, changed; a service's address changed), each compiled
    /// after the one before both ways.
    #[test]
    fn a_change_compiled_alone_is_the_whole_policy_compiled() {
        let mut draw = enforcer_testbed::policies::Draw::from_seed(11);
        let mut rules: Vec<String> = Vec::new();
        let mut address = 4;
        let mut cache = crate::policy::ParseCache::default();
        let mut before: Option<(Policy, Compiled)> = None;
        for step in 0..300 {
            let at = draw.below(rules.len() as u64 + 1) as usize;
            match draw.below(8) {
                0..=2 => rules.insert(at, random_rule(&mut draw)),
                3 | 4 if !rules.is_empty() => {
                    rules.remove(at.min(rules.len() - 1));
                }
                5 | 6 if !rules.is_empty() => {
                    let changed = at.min(rules.len() - 1);
                    rules[changed] = random_rule(&mut draw);
                }
                _ => address += 1,
            }
            let services: String = ["a", "b", "c", "d"]
                .iter()
                .enumerate()
                .map(|(n, name)| {
                    let last = if n == 0 { address } else { n };
                    format!("[[service]]\nname = \"{name}\"\naddresses = [\"10.0.0.{last}/32\"]\n")
                })
                .collect();
            let text = format!("{services}{}", rules.concat());
            let file = vec![(PathBuf::from("p.toml"), text.clone())];
            // A repeated id is not a policy.
            let Ok(policy) = crate::policy::parse_sources_cached(file, &mut cache) else {
                continue;
            };
            let context = format!("step {step}:\n{text}");
            if let Some(compiled) =
                assert_change_compiles_as_whole(&policy, before.as_ref(), &context)
            {
                before = Some((policy, compiled));
            }
        }
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
                .map(|(_, rule)| rule.id.to_string())
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
            _pad: 0,
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
    fn the_datapath_skips_the_trie_for_ipv4_only_where_no_prefix_covers_ipv4_partly() {
        let hosts_only = |addresses: &str, rules: &str| {
            compile_text(&format!(
                "[[service]]\nname = \"a\"\naddresses = [{addresses}]\n{rules}"
            ))
            .tables
            .ipv4_hosts_only
        };
        assert!(hosts_only(r#""10.0.0.1/32", "fd00::/64""#, ""));
        assert!(!hosts_only(r#""10.0.0.0/24""#, ""));
        assert!(
            !hosts_only(r#""10.0.0.1/32", "::/0""#, ""),
            "IPv6's whole space holds IPv4's mapped addresses"
        );
        assert!(!hosts_only(r#""::ffff:10.0.0.0/104""#, ""));
        let cidr_peer = "[[allow]]\nfrom = \"192.0.2.0/24\"\nto = \"a\"\nports = [\"80/tcp\"]\n";
        assert!(!hosts_only(r#""10.0.0.1/32""#, cidr_peer), "a CIDR peer");
    }

    #[test]
    fn the_datapath_skips_the_trie_for_ipv6_only_where_no_prefix_covers_ipv6_partly() {
        let hosts_only = |addresses: &str, rules: &str| {
            compile_text(&format!(
                "[[service]]\nname = \"a\"\naddresses = [{addresses}]\n{rules}"
            ))
            .tables
            .ipv6_hosts_only
        };
        assert!(hosts_only(r#""fd00::1/128", "10.0.0.0/8""#, ""));
        assert!(
            hosts_only(r#""::ffff:10.0.0.0/104""#, ""),
            "IPv4's mapped range holds no IPv6 address"
        );
        assert!(!hosts_only(r#""fd00::/64""#, ""));
        assert!(!hosts_only(r#""::/0""#, ""), "the whole space");
        assert!(
            !hosts_only(r#""::/64""#, ""),
            "a prefix around the mapped range holds IPv6 addresses too"
        );
        let cidr_peer = "[[allow]]\nfrom = \"2001:db8::/32\"\nto = \"a\"\nports = [\"80/tcp\"]\n";
        assert!(!hosts_only(r#""fd00::1/128""#, cidr_peer), "a CIDR peer");
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

    #[test]
    fn only_addresses_routed_through_their_services_interface_must_come_in_there() {
        let policy = parse_sources(vec![(
            PathBuf::from("p.toml"),
            "[[service]]\nname = \"api\"\ninterfaces = [\"v-api\"]\n\
             addresses = [\"10.0.0.5/32\", \"10.9.0.5/32\", \"10.0.1.0/24\"]\n"
                .to_owned(),
        )])
        .unwrap();
        let host = HostView {
            interfaces: [("v-api".to_owned(), 7)].into(),
            routes: [
                ("10.0.0.5".parse().unwrap(), "v-api".to_owned()),
                // A replica on another host: routed through the uplink.
                ("10.9.0.5".parse().unwrap(), "eth0".to_owned()),
            ]
            .into(),
            ..HostView::default()
        };
        let compiled = compile(&policy, &host, None).unwrap();
        let local = |net: &str| {
            let prefix = Prefix::of(&net.parse().unwrap());
            compiled.tables.ipcache[&prefix].flags
                & enforcer_common::identity::flags::LOCAL_ENDPOINT
                != 0
        };
        assert!(local("10.0.0.5/32"));
        assert!(!local("10.9.0.5/32"), "a remote replica's address");
        assert!(!local("10.0.1.0/24"), "a prefix is not one endpoint");
    }
}
