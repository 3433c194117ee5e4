//! The policy language (DESIGN §5): parsing one file or a directory of `*.toml` files, merging
//! them, and validating the result. Every problem is reported with its file, line and column.

pub mod identity;

mod build;
mod diagnostics;
mod documents;
mod load;
mod rule_ids;
mod tables;

use std::{fmt, net::IpAddr, path::PathBuf, str::FromStr, sync::Arc};

use ipnet::IpNet;

pub use self::{
    diagnostics::{Diagnostic, Origin, PolicyError},
    load::{
        ParseCache, check_writers, load, load_cached, parse_sources, parse_sources_cached,
        policy_files,
    },
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        use enforcer_common::policy::proto;
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
            Self::Icmp => proto::ICMP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp)
    }
}

/// A value in a policy, or on the command line, that does not say what it must.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("unknown protocol \"{0}\": expected tcp, udp or icmp")]
    Protocol(String),
    #[error("invalid port \"{text}\": {problem}")]
    Port { text: String, problem: PortProblem },
    #[error("invalid port range \"{text}\": {lo} is above {hi}")]
    BackwardsRange { text: String, lo: u16, hi: u16 },
    #[error("unknown service \"{name}\" (services: {known}; or \"world\", \"host\", a CIDR)")]
    UnknownService { name: String, known: String },
    #[error("invalid address or CIDR \"{0}\"")]
    Address(String),
    #[error("CIDR \"{text}\" has host bits set; did you mean \"{network}\"?")]
    HostBits { text: String, network: IpNet },
}

/// What is wrong with a port entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortProblem {
    #[error("expected PORT/PROTO, LOW-HIGH/PROTO, tcp, udp or icmp")]
    Shape,
    #[error("{0} has no ports, write \"{0}\"")]
    NoPorts(&'static str),
    #[error("\"{0}\" is not a number")]
    NotANumber(String),
    #[error("port {0} out of range 1-65535")]
    OutOfRange(u64),
}

impl FromStr for Protocol {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" | "icmpv6" => Ok(Self::Icmp),
            other => Err(ValueError::Protocol(other.to_owned())),
        }
    }
}

/// What one entry of a rule's `ports` list matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// One port (`"443/tcp"`).
    Port(Protocol, u16),
    /// An inclusive range (`"8000-8100/tcp"`).
    Range(Protocol, u16, u16),
    /// Every port of a protocol (`"tcp"`, `"icmp"`).
    AnyPort(Protocol),
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Port(protocol, port) => write!(f, "{port}/{}", protocol.as_str()),
            Self::Range(protocol, lo, hi) => write!(f, "{lo}-{hi}/{}", protocol.as_str()),
            Self::AnyPort(protocol) => f.write_str(protocol.as_str()),
        }
    }
}

impl FromStr for PortMatch {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let invalid = |problem| ValueError::Port {
            text: text.to_owned(),
            problem,
        };
        let Some((ports, protocol)) = text.split_once('/') else {
            let protocol: Protocol = text.parse().map_err(|_| invalid(PortProblem::Shape))?;
            return Ok(Self::AnyPort(protocol));
        };
        let protocol: Protocol = protocol.parse()?;
        if !protocol.has_ports() {
            return Err(invalid(PortProblem::NoPorts(protocol.as_str())));
        }
        let parse_port = |number: &str| -> Result<u16, ValueError> {
            let value: u64 = number
                .trim()
                .parse()
                .map_err(|_| invalid(PortProblem::NotANumber(number.to_owned())))?;
            if value == 0 || value > 65535 {
                return Err(invalid(PortProblem::OutOfRange(value)));
            }
            Ok(value as u16)
        };
        match ports.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse_port(lo)?, parse_port(hi)?);
                if lo > hi {
                    return Err(ValueError::BackwardsRange {
                        text: text.to_owned(),
                        lo,
                        hi,
                    });
                }
                if lo == hi {
                    return Ok(Self::Port(protocol, lo));
                }
                Ok(Self::Range(protocol, lo, hi))
            }
            None => Ok(Self::Port(protocol, parse_port(ports)?)),
        }
    }
}

/// One side of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// A declared service, by index into [`Policy::services`].
    Service(usize),
    World,
    Host,
    Cidr(IpNet),
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Allow,
    Deny,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub identity: u32,
    /// Whether `identity` was written in the policy (else hashed from the name).
    pub identity_declared: bool,
    pub cgroups: Vec<PathBuf>,
    pub interfaces: Vec<String>,
    /// `interfaces`, each as a selector (built once: hosts ask for every interface they have).
    pub interface_selectors: Vec<InterfaceSelector>,
    pub addresses: Vec<IpNet>,
    /// Per-service override of the global mode.
    pub mode: Option<Mode>,
    pub origin: Origin,
}

impl Service {
    /// Whether the interface called `name` is one of this service's endpoint interfaces: named
    /// by an entry, or matched by an entry that is a pattern.
    pub fn selects_interface(&self, name: &str) -> bool {
        self.interfaces
            .iter()
            .any(|entry| InterfaceSelector::new(entry).is_ok_and(|selector| selector.selects(name)))
    }
}

/// An `interfaces` entry: an interface's name, or a shell-style pattern (`*`, `?`, `[...]`)
/// that names every interface it matches, now or later (`"veth-api-*"`).
#[derive(Clone, Debug, PartialEq)]
pub enum InterfaceSelector {
    Name(String),
    Pattern(glob::Pattern),
}

impl InterfaceSelector {
    pub fn new(entry: &str) -> Result<Self, glob::PatternError> {
        if entry.contains(['*', '?', '[']) {
            glob::Pattern::new(entry).map(Self::Pattern)
        } else {
            Ok(Self::Name(entry.to_owned()))
        }
    }

    pub fn selects(&self, name: &str) -> bool {
        match self {
            Self::Name(own) => own == name,
            Self::Pattern(pattern) => pattern.matches(name),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub kind: RuleKind,
    /// Stable id shown in events and alerts: the policy's `id`, or derived from the rule.
    pub id: Box<str>,
    /// Whether the policy gave `id` (else it is derived, and carries the rule's line).
    pub id_declared: bool,
    pub from: Peer,
    pub to: Peer,
    /// Empty means any port of any protocol. (A boxed slice: a policy holds 100 000 rules.)
    pub ports: Box<[PortMatch]>,
    pub max_new_per_sec: Option<u32>,
    pub origin: Origin,
    /// The last load that took the rule (see `rule_ids`); no part of what the rule means.
    pub(crate) seen: rule_ids::Seen,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub window_secs: u64,
    pub spike_z: f64,
    pub spike_min_calls: u64,
    pub spike_warmup_windows: u64,
    pub fanout_distinct_peers: u64,
    pub deny_burst: u64,
}

impl Default for Detection {
    fn default() -> Self {
        Self {
            window_secs: 10,
            spike_z: 4.0,
            spike_min_calls: 50,
            spike_warmup_windows: 5,
            fanout_distinct_peers: 20,
            deny_burst: 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// SHA-256 over the source files (names and contents, in load order).
    pub hash: [u8; 32],
    pub files: Vec<PathBuf>,
    pub mode: Mode,
    pub manage_host: bool,
    /// Sorted by name (lookups by name rely on it).
    pub services: Vec<Service>,
    /// Allow and deny rules in file order (files in name order), allows of a file before its
    /// denies as the TOML tables are separate.
    pub rules: Vec<Arc<Rule>>,
    pub detection: Detection,
}

impl Policy {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services
            .binary_search_by(|service| service.name.as_str().cmp(name))
            .ok()
            .map(|index| &self.services[index])
    }

    /// The name a peer is written as in the policy.
    pub fn peer_name(&self, peer: &Peer) -> String {
        match peer {
            Peer::Service(index) => self.services[*index].name.clone(),
            Peer::World => "world".to_owned(),
            Peer::Host => "host".to_owned(),
            Peer::Cidr(net) => net.to_string(),
        }
    }

    /// Effective mode of a service.
    pub fn service_mode(&self, service: &Service) -> Mode {
        service.mode.unwrap_or(self.mode)
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Parses a peer as written in a rule or on the command line.
    pub fn parse_peer(&self, text: &str) -> Result<Peer, ValueError> {
        match text {
            "world" => return Ok(Peer::World),
            "host" => return Ok(Peer::Host),
            _ => {}
        }
        // `services` is sorted by name.
        if let Ok(index) = self
            .services
            .binary_search_by(|service| service.name.as_str().cmp(text))
        {
            return Ok(Peer::Service(index));
        }
        if looks_like_address(text) {
            return parse_cidr(text).map(Peer::Cidr);
        }
        let known: Vec<&str> = self
            .services
            .iter()
            .map(|service| service.name.as_str())
            .collect();
        Err(ValueError::UnknownService {
            name: text.to_owned(),
            known: if known.is_empty() {
                "none declared".to_owned()
            } else {
                known.join(", ")
            },
        })
    }
}

fn looks_like_address(text: &str) -> bool {
    text.contains('/')
        || text.contains(':')
        || text.parse::<IpAddr>().is_ok()
        || text.chars().next().is_some_and(|c| c.is_ascii_digit())
}

/// Parses `a.b.c.d/n`, `x::/n` or a bare address (a /32 or /128). Host bits must be zero.
pub fn parse_cidr(text: &str) -> Result<IpNet, ValueError> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => return Err(ValueError::Address(text.to_owned())),
        },
    };
    if net.trunc() != net {
        return Err(ValueError::HostBits {
            text: text.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use enforcer_common::policy::rule;

    use super::{
        build::build,
        diagnostics::{Diagnostics, Source},
        documents::PolicyDocument,
        load::{FileContent, PartContent, common_ends, content_hash, parse_whole_file},
        *,
    };

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        parse_sources(vec![(PathBuf::from("policy.toml"), text.to_owned())])
    }

    /// The policy as a parse of the whole file at once sees it.
    fn parse_whole(text: &str) -> Result<Policy, String> {
        parse_each_whole(&[(PathBuf::from("policy.toml"), text.to_owned())])
    }

    /// The policy as a parse of each file whole, at once, sees it: one part per file, and
    /// nothing from a cache.
    fn parse_each_whole(files: &[(PathBuf, String)]) -> Result<Policy, String> {
        let hash = content_hash(
            files
                .iter()
                .map(|(path, text)| (path.as_path(), text.as_str())),
        );
        let sources: Vec<Source> = files
            .iter()
            .map(|(path, text)| Source::new(path.clone(), text.clone()))
            .collect();
        let mut parts = Vec::new();
        for source in &sources {
            parts.push(parse_whole_file(source).map_err(|diagnostic| diagnostic.to_string())?);
        }
        let contents: Vec<FileContent<'_>> = sources
            .iter()
            .zip(&parts)
            .map(|(source, parts)| FileContent::gather(source, parts, false))
            .collect();
        let mut diagnostics = Diagnostics::default();
        let paths = sources
            .iter()
            .map(|source| source.path.to_path_buf())
            .collect();
        let policy = build(hash, paths, &contents, &mut diagnostics);
        if diagnostics.0.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError::Invalid(diagnostics.0).to_string())
        }
    }

    /// Texts that stress the cutting into tables: strings, comments and values holding
    /// brackets, spaced and quoted headers, CRLF, repeated singletons, keys before any header.
    const TRICKY: &[&str] = &[
        "[settings]\nmode = \"audit\"\n[[service]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\"]\n[[service]]\nname = \"b\"\naddresses = [\n  \"10.0.0.2/32\", # [[deny]]\n  \"fd00::2/128\",\n]\n[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"80/tcp\"]\n[[deny]]\nfrom = \"a\"\nto = \"b\"\nports = [\"81/tcp\"]\n[[allow]]\nfrom = \"b\"\nto = \"a\"\n[detection]\ndeny_burst = 5\n",
        "[[service]]\nname = \"a\"\n  [[ allow ]]\nfrom = \"a\"\nto = \"world\"\n[[\"deny\"]]\nfrom = \"a\"\nto = 'host'\n",
        "[[service]]\r\nname = \"a\"\r\n[[allow]]\r\nfrom = \"a\"\r\nto = \"a\"\r\n",
        "[[service]]\nname = \"a\"\n[[allow]]\nfrom = \"a\"\nto = \"a\"\nid = \"\"\"\n[[deny]]\nfrom = \"a\"\nto = \"a\"\n\"\"\"\n",
        "[[service]]\nname = \"a\"\n[[allow]]\nfrom = '''\n[[allow]]'''\nto = \"a\"\n",
        "[settings]\nmode = \"audit\"\n[[service]]\nname = \"a\"\n[settings]\nmanage_host = true\n",
        "[detection]\n[[service]]\nname = \"a\"\n[detection]\n",
        "mode = \"audit\"\n[[service]]\nname = \"a\"\n",
        "[[service]]\nname = \"a\"\n[service]\nname = \"b\"\n",
        "[[service]]\nname = \"a\"\n[[allow]]\nfrom = \"a\"\nto = \"a\"\n[allow.extra]\n",
        "[[service]]\nname = \"a\"\n[[allow]]\nfrom = \"a\"\nto = \"nobody\"\nports = [\"0/tcp\"]\n",
    ];

    /// A two-file policy under random edits: services in the first file, rules in both.
    struct EditedPolicy {
        draw: enforcer_testbed::policies::Draw,
        services: Vec<(String, String)>,
        files: [Vec<String>; 2],
        rules_made: usize,
    }

    impl EditedPolicy {
        fn rule(&mut self) -> String {
            self.rules_made += 1;
            let draw = &mut self.draw;
            let mut service = || {
                self.services[draw.below(self.services.len() as u64) as usize]
                    .0
                    .clone()
            };
            let (from, to) = (service(), service());
            // Now and then an id another rule may hold: one given before, or a default one.
            let id = match draw.below(8) {
                0..=2 => format!("id = \"r{}\"\n", self.rules_made),
                3 => format!("id = \"r{}\"\n", 1 + draw.below(self.rules_made as u64)),
                4 => format!("id = \"allow:s0->s1@b.toml:{}\"\n", 1 + draw.below(60)),
                _ => String::new(),
            };
            let blank = "\n".repeat(draw.below(3) as usize);
            let kind = if draw.chance(25) { "deny" } else { "allow" };
            let port = 1 + draw.below(60_000);
            format!(
                "[[{kind}]]\nfrom = \"{from}\"\nto = \"{to}\"\nports = [\"{port}/tcp\"]\n{id}{blank}"
            )
        }

        /// One edit: a rule added, removed or changed anywhere in either file, a service added
        /// before the others, or a service given another address.
        fn edit(&mut self, step: usize) {
            let file = self.draw.below(2) as usize;
            let len = self.files[file].len();
            let at = self.draw.below(len as u64 + 1) as usize;
            match self.draw.below(10) {
                0..=3 => {
                    let rule = self.rule();
                    self.files[file].insert(at, rule);
                }
                4 | 5 if len > 0 => {
                    self.files[file].remove(at.min(len - 1));
                }
                6 | 7 if len > 0 => self.files[file][at.min(len - 1)] = self.rule(),
                8 => {
                    let address = format!("10.1.{}.{}/32", step / 250, step % 250);
                    self.services.insert(0, (format!("a{step}"), address));
                }
                9 => {
                    let service = self.draw.below(self.services.len() as u64) as usize;
                    self.services[service].1 = format!("10.2.{}.{}/32", step / 250, step % 250);
                }
                _ => {}
            }
        }

        /// The files, the second ending in a mistake now and then: a repeated id, an unknown
        /// service, a CIDR that is a service's address.
        fn sources(&mut self) -> Vec<(PathBuf, String)> {
            let broken = match self.draw.below(24) {
                0 => "[[allow]]\nfrom = \"s0\"\nto = \"s1\"\nid = \"twice\"\n[[deny]]\nfrom = \"s0\"\nto = \"s1\"\nid = \"twice\"\n".to_owned(),
                1 => "[[allow]]\nfrom = \"nobody\"\nto = \"s1\"\n".to_owned(),
                2 => format!("[[allow]]\nfrom = \"{}\"\nto = \"s1\"\n", self.services[0].1),
                _ => String::new(),
            };
            let declared: String = self
                .services
                .iter()
                .map(|(name, address)| {
                    format!("[[service]]\nname = \"{name}\"\naddresses = [\"{address}\"]\n")
                })
                .collect();
            vec![
                (
                    PathBuf::from("a.toml"),
                    format!("{declared}{}", self.files[0].concat()),
                ),
                (
                    PathBuf::from("b.toml"),
                    format!("# rules\n{}{broken}", self.files[1].concat()),
                ),
            ]
        }
    }

    /// Edits of a two-file policy, each loaded with the cache the one before left: rules added,
    /// removed and changed at either end and in the middle (moving the lines after them), rules
    /// without ids (whose default ids carry their line), rules taking an id another rule holds
    /// or held (the cache checks only the rules it builds), services added before the others
    /// (moving every service's place) or given another address, and edits that do not load
    /// between them. Each load is the load of the same files without a cache, and of each file
    /// parsed whole.
    #[test]
    fn a_policy_built_from_the_last_ones_parts_is_the_policy_built_afresh() {
        let mut policy = EditedPolicy {
            draw: enforcer_testbed::policies::Draw::from_seed(7),
            services: (0..4)
                .map(|n| (format!("s{n}"), format!("10.0.0.{n}/32")))
                .collect(),
            files: [Vec::new(), Vec::new()],
            rules_made: 0,
        };
        let mut cache = ParseCache::default();
        for step in 0..400 {
            policy.edit(step);
            let sources = policy.sources();
            let cached = parse_sources_cached(sources.clone(), &mut cache)
                .map_err(|error| error.to_string());
            let fresh = parse_sources(sources.clone()).map_err(|error| error.to_string());
            assert_eq!(
                cached, fresh,
                "step {step}:\n{}\n{}",
                sources[0].1, sources[1].1
            );
            // And as each file parsed whole: one part each, so nothing cut, cached or split
            // between threads. (An empty file is refused before any of that.)
            if !sources
                .iter()
                .any(|(_, text)| super::load::declares_nothing(text))
            {
                assert_eq!(
                    cached,
                    parse_each_whole(&sources),
                    "step {step}, versus each file whole:\n{}\n{}",
                    sources[0].1,
                    sources[1].1
                );
            }
        }
    }

    #[test]
    fn cutting_a_file_into_tables_never_changes_what_it_means() {
        let mut cache = ParseCache::default();
        // Every text, then every one-byte edit of the first (insertions of the characters
        // that structure TOML, deletions), each parsed with the cache the previous one left.
        let mut texts: Vec<String> = TRICKY.iter().map(|text| text.to_string()).collect();
        let base = TRICKY[0];
        for (at, _) in base.char_indices() {
            texts.push(format!("{}{}", &base[..at], &base[at + 1..]));
            for inserted in ["[", "]", "\"", "'", "#", "\n", "{", "\\", "=", ","] {
                texts.push(format!("{}{inserted}{}", &base[..at], &base[at..]));
            }
        }
        for text in &texts {
            let whole = parse_whole(text);
            let cached = parse_sources_cached(
                vec![(PathBuf::from("policy.toml"), text.clone())],
                &mut cache,
            )
            .map_err(|error| error.to_string());
            let fresh = parse(text).map_err(|error| error.to_string());
            assert_eq!(cached, whole, "cut with a cache, versus whole:\n{text}");
            assert_eq!(fresh, whole, "cut, versus whole:\n{text}");
        }
    }

    #[test]
    fn common_ends_never_overlap() {
        let long = "x".repeat(10_000);
        for (old, new, ends) in [
            ("abc", "abc", (3, 0)),
            ("", "abc", (0, 0)),
            ("abXc", "abc", (2, 1)),
            ("abc", "abYYc", (2, 1)),
            ("aaaa", "aa", (2, 0)),
            ("ab", "b", (0, 1)),
        ] {
            assert_eq!(
                common_ends(old.as_bytes(), new.as_bytes()),
                ends,
                "{old:?} {new:?}"
            );
        }
        let (old, new) = (format!("{long}A{long}"), format!("{long}BB{long}"));
        assert_eq!(
            common_ends(old.as_bytes(), new.as_bytes()),
            (10_000, 10_000)
        );
    }

    #[test]
    fn a_reload_parses_only_the_tables_that_changed() {
        let policy = |port: u16| {
            let mut text = String::from("[[service]]\nname = \"a\"\n");
            for rule in 0..100 {
                let port = if rule == 50 { port } else { 1000 + rule };
                text.push_str(&format!(
                    "[[allow]]\nfrom = \"a\"\nto = \"a\"\nports = [\"{port}/tcp\"]\n"
                ));
            }
            text
        };
        let mut cache = ParseCache::default();
        let file = |text: String| vec![(PathBuf::from("policy.toml"), text)];
        let first = parse_sources_cached(file(policy(9000)), &mut cache).unwrap();
        // Each part's document (the service), or its rule as built (the rules, once a policy
        // built from them).
        type Kept = (Option<Arc<PolicyDocument>>, Option<Arc<Rule>>);
        let tables = |cache: &ParseCache| -> Vec<Kept> {
            cache.files[Path::new("policy.toml")]
                .parts
                .iter()
                .map(|part| match &part.content {
                    PartContent::Parsed(document) => (Some(Arc::clone(document)), None),
                    PartContent::Built(rules) => (None, Some(Arc::clone(&rules[0]))),
                })
                .collect()
        };
        let same = |(a, b): &Kept, (c, d): &Kept| match (a, b, c, d) {
            (Some(a), _, Some(c), _) => Arc::ptr_eq(a, c),
            (_, Some(b), _, Some(d)) => Arc::ptr_eq(b, d),
            _ => false,
        };
        let kept = tables(&cache);
        let second = parse_sources_cached(file(policy(9001)), &mut cache).unwrap();
        assert_ne!(first.rules[50], second.rules[50]);
        assert_eq!(second, parse(&policy(9001)).unwrap());
        let now = tables(&cache);
        assert_eq!(now.len(), 101);
        let reused: Vec<bool> = now
            .iter()
            .map(|table| kept.iter().any(|old| same(old, table)))
            .collect();
        assert_eq!(
            reused.iter().filter(|reused| !**reused).count(),
            1,
            "every table but the changed rule is reused"
        );
        assert!(
            !reused[51],
            "the changed rule (after the service) is parsed again"
        );
    }

    #[test]
    fn an_empty_file_is_refused_not_taken_for_a_policy_that_enforces_nothing() {
        for text in ["", "\n  \n", "# policy coming soon\n"] {
            assert_eq!(
                only_error(text),
                "policy.toml:1:1: the file is empty: a policy file declares at least one service, rule or setting"
            );
        }
    }

    fn only_error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("policy was accepted:\n{text}"),
            Err(error) => {
                let diagnostics = error.diagnostics();
                assert_eq!(
                    diagnostics.len(),
                    1,
                    "expected one diagnostic, got: {error}"
                );
                diagnostics[0].to_string()
            }
        }
    }

    const SHOP: &str = r#"
[[service]]
name = "frontend"
addresses = ["10.10.0.2/32"]

[[service]]
name = "api"
identity = 1002
addresses = ["10.10.1.2/32", "fd00:10:1::2/128"]

[[allow]]
from = "frontend"
to = "api"
ports = ["8080/tcp", "9000-9010/tcp", "53/udp", "icmp"]
max_new_per_sec = 200
id = "fe-to-api"
"#;

    #[test]
    fn parses_services_rules_and_ports() {
        let policy = parse(SHOP).expect("valid policy");
        assert_eq!(policy.services.len(), 2);
        let api = policy.service("api").unwrap();
        assert_eq!(api.identity, 1002);
        assert!(api.identity_declared);
        let frontend = policy.service("frontend").unwrap();
        assert_eq!(frontend.identity, identity::of_service_name("frontend"));
        let rule = &policy.rules[0];
        assert_eq!(&*rule.id, "fe-to-api");
        assert_eq!(rule.max_new_per_sec, Some(200));
        assert_eq!(
            *rule.ports,
            [
                PortMatch::Port(Protocol::Tcp, 8080),
                PortMatch::Range(Protocol::Tcp, 9000, 9010),
                PortMatch::Port(Protocol::Udp, 53),
                PortMatch::AnyPort(Protocol::Icmp)
            ]
        );
    }

    #[test]
    fn unknown_service_names_file_line_and_column() {
        let error = only_error("[[allow]]\nfrom = \"frontend\"\nto = \"world\"\n");
        assert_eq!(
            error,
            "policy.toml:2:8: unknown service \"frontend\" (services: none declared; or \"world\", \"host\", a CIDR)"
        );
    }

    #[test]
    fn every_reserved_rule_id_is_refused() {
        for (_, reserved) in rule::RESERVED_NAMES {
            let error = only_error(&format!(
                "[[allow]]\nfrom = \"world\"\nto = \"host\"\nid = \"{reserved}\"\n"
            ));
            assert_eq!(
                error,
                format!(
                    "policy.toml:4:6: invalid rule id \"{reserved}\": it is reserved for enforcer's own decisions (default-deny, default-allow, anti-spoofing, packet-sanity, no-policy)"
                )
            );
        }
    }

    /// A policy file (mode `file_mode`) in a directory of its own (mode `dir_mode`); removed on
    /// drop.
    struct PolicyOnDisk(PathBuf);

    impl PolicyOnDisk {
        fn new(name: &str, dir_mode: u32, file_mode: u32) -> Self {
            use std::os::unix::fs::PermissionsExt as _;
            let dir = std::env::temp_dir()
                .join(format!("enforcer-writers-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("policy.toml");
            std::fs::write(&file, "[[service]]\nname = \"a\"\n").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(file_mode)).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(dir_mode)).unwrap();
            Self(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("policy.toml")
        }
    }

    impl Drop for PolicyOnDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_policy_others_can_change_is_refused_as_sshd_refuses_its_files() {
        let safe = PolicyOnDisk::new("safe", 0o755, 0o644);
        check_writers(&safe.file()).expect("root's, 0644 in a 0755 directory");
        check_writers(&safe.0).expect("the directory itself");
        for (name, dir_mode, file_mode, refused, who) in [
            ("group-file", 0o755, 0o664, "policy.toml", "its group"),
            ("world-file", 0o755, 0o646, "policy.toml", "every user"),
            ("world-dir", 0o777, 0o644, "world-dir", "every user"),
        ] {
            let policy = PolicyOnDisk::new(name, dir_mode, file_mode);
            let error = check_writers(&policy.file()).unwrap_err().to_string();
            assert!(
                error.contains(&format!("{refused} can be changed by {who}")),
                "{name}: {error}"
            );
        }
        // A sticky directory (like /tmp) lets no one replace a file they do not own: a single
        // file there passes; as a directory of policy files, anyone could add one.
        let sticky = PolicyOnDisk::new("sticky", 0o1777, 0o644);
        check_writers(&sticky.file()).expect("a file in a sticky directory");
        let error = check_writers(&sticky.0).unwrap_err().to_string();
        assert!(error.contains("can be changed by every user"), "{error}");
    }

    #[test]
    fn bad_cidr_is_located() {
        let error = only_error("[[service]]\nname = \"a\"\naddresses = [\"10.0.0.300/24\"]\n");
        assert_eq!(
            error,
            "policy.toml:3:14: invalid address or CIDR \"10.0.0.300/24\""
        );
    }

    #[test]
    fn cidr_with_host_bits_suggests_the_network() {
        let error = only_error("[[allow]]\nfrom = \"10.1.2.3/16\"\nto = \"world\"\n");
        assert_eq!(
            error,
            "policy.toml:2:8: CIDR \"10.1.2.3/16\" has host bits set; did you mean \"10.1.0.0/16\"?"
        );
    }

    #[test]
    fn port_out_of_range_is_located() {
        let error = only_error(
            "[[allow]]\nfrom = \"world\"\nto = \"host\"\nports = [\"22/tcp\", \"70000/tcp\"]\n",
        );
        assert_eq!(
            error,
            "policy.toml:4:20: invalid port \"70000/tcp\": port 70000 out of range 1-65535"
        );
    }

    #[test]
    fn port_zero_backwards_range_and_unknown_protocol_are_refused() {
        assert!(
            only_error("[[allow]]\nfrom=\"world\"\nto=\"host\"\nports=[\"0/tcp\"]\n")
                .ends_with("port 0 out of range 1-65535")
        );
        assert!(
            only_error("[[allow]]\nfrom=\"world\"\nto=\"host\"\nports=[\"90-80/udp\"]\n")
                .ends_with("90 is above 80")
        );
        assert!(
            only_error("[[allow]]\nfrom=\"world\"\nto=\"host\"\nports=[\"80/sctp\"]\n")
                .contains("unknown protocol \"sctp\"")
        );
        assert!(
            only_error("[[allow]]\nfrom=\"world\"\nto=\"host\"\nports=[\"8/icmp\"]\n")
                .contains("icmp has no ports")
        );
    }

    #[test]
    fn duplicate_identity_names_both_services() {
        let error = only_error(
            "[[service]]\nname = \"a\"\nidentity = 5000\n\n[[service]]\nname = \"b\"\nidentity = 5000\n",
        );
        assert_eq!(
            error,
            "policy.toml:5:1: duplicate identity 5000: service \"b\" (declared) and service \"a\" at policy.toml:1:1 (declared); give one an explicit identity"
        );
    }

    #[test]
    fn reserved_identity_is_refused() {
        let error = only_error("[[service]]\nname = \"a\"\nidentity = 2\n");
        assert_eq!(
            error,
            "policy.toml:3:12: identity 2 of service \"a\" is out of range 256..16777215 (lower values are reserved)"
        );
    }

    #[test]
    fn unknown_field_is_an_error_not_ignored() {
        let error =
            only_error("[[allow]]\nfrom = \"world\"\nto = \"host\"\nprots = [\"22/tcp\"]\n");
        assert!(
            error.starts_with("policy.toml:4:1: unknown field `prots`, expected one of"),
            "{error}"
        );
    }

    #[test]
    fn syntax_error_is_located() {
        let error = only_error("[[service]]\nname = \"a\n");
        assert!(error.starts_with("policy.toml:2:"), "{error}");
    }

    #[test]
    fn every_problem_is_reported_in_one_run() {
        let error = parse("[[allow]]\nfrom = \"nope\"\nto = \"nada\"\nports = [\"99999/tcp\"]\n")
            .unwrap_err();
        let lines: Vec<_> = error
            .diagnostics()
            .iter()
            .map(|d| (d.origin.line, d.origin.column))
            .collect();
        assert_eq!(lines, vec![(2, 8), (3, 6), (4, 10)]);
    }

    #[test]
    fn files_merge_and_duplicates_across_files_are_named() {
        let error = parse_sources(vec![
            (
                PathBuf::from("a.toml"),
                "[[service]]\nname = \"api\"\n".to_owned(),
            ),
            (
                PathBuf::from("b.toml"),
                "\n[[service]]\nname = \"api\"\n".to_owned(),
            ),
        ])
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "b.toml:2:1: service \"api\" is already declared at a.toml:1:1"
        );

        let merged = parse_sources(vec![
            (
                PathBuf::from("a.toml"),
                "[[service]]\nname = \"api\"\n".to_owned(),
            ),
            (
                PathBuf::from("b.toml"),
                "[[allow]]\nfrom = \"world\"\nto = \"api\"\n".to_owned(),
            ),
        ])
        .unwrap();
        assert_eq!(merged.rules[0].to, Peer::Service(0));
        assert_eq!(&*merged.rules[0].id, "allow:world->api@b.toml:1");
    }

    #[test]
    fn interface_service_needs_addresses() {
        let error = only_error("[[service]]\nname = \"a\"\ninterfaces = [\"veth-a\"]\n");
        assert!(error.contains("has interfaces but no addresses"), "{error}");
    }

    #[test]
    fn rate_limit_on_deny_is_refused() {
        let error = only_error("[[deny]]\nfrom = \"world\"\nto = \"host\"\nmax_new_per_sec = 5\n");
        assert_eq!(
            error,
            "policy.toml:1:1: max_new_per_sec applies to allow rules only"
        );
    }

    #[test]
    fn hash_changes_with_content() {
        let a = parse("[settings]\nmode = \"audit\"\n").unwrap();
        let b = parse("[settings]\nmode = \"enforce\"\n").unwrap();
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.mode, Mode::Audit);
    }
}
