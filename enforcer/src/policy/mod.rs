//! The policy language (DESIGN §5): parsing one file or a directory of `*.toml` files, merging
//! them, and validating the result. Every problem is reported with its file, line and column.

pub mod identity;

mod tables;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use enforcer_common::policy::rule;
use ipnet::IpNet;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

/// A position in a policy file, 1-based.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem in a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no policy files (*.toml) in directory {}", .0.display())]
    EmptyDirectory(PathBuf),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl PolicyError {
    /// The individual problems, for callers that report them one by one.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Self::Invalid(diagnostics) => diagnostics,
            _ => &[],
        }
    }
}

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
    pub addresses: Vec<IpNet>,
    /// Per-service override of the global mode.
    pub mode: Option<Mode>,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub kind: RuleKind,
    /// Stable id shown in events and alerts: the policy's `id`, or derived from the rule.
    pub id: String,
    pub from: Peer,
    pub to: Peer,
    /// Empty means any port of any protocol.
    pub ports: Vec<PortMatch>,
    pub max_new_per_sec: Option<u32>,
    pub origin: Origin,
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
    pub rules: Vec<Rule>,
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

// --- The TOML documents ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDocument {
    settings: Option<Spanned<SettingsDocument>>,
    #[serde(default)]
    service: Vec<Spanned<ServiceDocument>>,
    #[serde(default)]
    allow: Vec<Spanned<RuleDocument>>,
    #[serde(default)]
    deny: Vec<Spanned<RuleDocument>>,
    detection: Option<Spanned<DetectionDocument>>,
}

impl PolicyDocument {
    fn parse(text: &str) -> Result<Self, toml::de::Error> {
        let mut document: Self = toml::from_str(text)?;
        document.shrink_to_fit();
        Ok(document)
    }

    /// Deserializing leaves each list with room for four entries: for a table of one rule,
    /// kept in the parse cache, that is most of its memory.
    fn shrink_to_fit(&mut self) {
        self.service.shrink_to_fit();
        for service in &mut self.service {
            let service = service.get_mut();
            service.cgroups.shrink_to_fit();
            service.interfaces.shrink_to_fit();
            service.addresses.shrink_to_fit();
        }
        for rules in [&mut self.allow, &mut self.deny] {
            rules.shrink_to_fit();
            for rule in rules.iter_mut() {
                if let Some(ports) = &mut rule.get_mut().ports {
                    ports.shrink_to_fit();
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsDocument {
    mode: Option<Spanned<String>>,
    manage_host: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDocument {
    name: Spanned<String>,
    identity: Option<Spanned<i64>>,
    #[serde(default)]
    cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDocument {
    from: Spanned<String>,
    to: Spanned<String>,
    ports: Option<Vec<Spanned<String>>>,
    max_new_per_sec: Option<Spanned<i64>>,
    id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetectionDocument {
    window_secs: Option<Spanned<i64>>,
    spike_z: Option<Spanned<f64>>,
    spike_min_calls: Option<Spanned<i64>>,
    spike_warmup_windows: Option<Spanned<i64>>,
    fanout_distinct_peers: Option<Spanned<i64>>,
    deny_burst: Option<Spanned<i64>>,
}

/// A policy file's text, for turning byte offsets into line and column.
struct Source {
    path: PathBuf,
    text: String,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
}

impl Source {
    fn new(path: PathBuf, text: String) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(newline, _)| newline + 1))
            .collect();
        Self {
            path,
            text,
            line_starts,
        }
    }

    fn origin(&self, offset: usize) -> Origin {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|start| *start <= offset);
        let line_start = self.line_starts[line - 1];
        let column = self.text[line_start..offset].chars().count() + 1;
        Origin {
            file: self.path.clone(),
            line,
            column,
        }
    }

    /// Positions in the part of this file that starts at byte `base`.
    fn from(&self, base: usize) -> At<'_> {
        At { source: self, base }
    }
}

/// A part of a policy file (one top-level table, or the whole file) that was parsed on its
/// own: the spans of what was parsed from it count from `base`.
#[derive(Clone, Copy)]
struct At<'a> {
    source: &'a Source,
    base: usize,
}

impl At<'_> {
    fn at<T>(&self, spanned: &Spanned<T>) -> Origin {
        self.source.origin(self.base + spanned.span().start)
    }
}

/// Collects diagnostics while a policy is checked, so one run reports every problem.
#[derive(Default)]
struct Diagnostics(Vec<Diagnostic>);

impl Diagnostics {
    fn error(&mut self, origin: Origin, message: impl ToString) {
        self.0.push(Diagnostic {
            origin,
            message: message.to_string(),
        });
    }
}

/// Loads a policy from a file or a directory of `*.toml` files (merged, in name order).
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    load_cached(path, &mut ParseCache::default())
}

/// [`load`], parsing only the top-level tables that are not in `cache` (the tables of the
/// policy it last loaded), and leaving this policy's tables there for the next load.
pub fn load_cached(path: &Path, cache: &mut ParseCache) -> Result<Policy, PolicyError> {
    let files = policy_files(path)?;
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| PolicyError::Read {
            path: file.clone(),
            source,
        })?;
        sources.push((file, text));
    }
    parse_sources_cached(sources, cache)
}

/// The files a policy path stands for.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let metadata = std::fs::metadata(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Kubernetes ConfigMap mounts keep their real files in `..data`-style hidden entries;
        // the visible names are symlinks into them.
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        if file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(PolicyError::EmptyDirectory(path.to_owned()));
    }
    Ok(files)
}

/// Parses policy sources given as `(path, text)`, in the order given.
pub fn parse_sources(files: Vec<(PathBuf, String)>) -> Result<Policy, PolicyError> {
    parse_sources_cached(files, &mut ParseCache::default())
}

/// Each file of the policy last loaded, with its top-level tables as parsed. With it, a
/// one-rule change to a policy of 100 000 rules parses one table, not 100 000.
#[derive(Default)]
pub struct ParseCache {
    files: HashMap<PathBuf, ParsedFile>,
}

struct ParsedFile {
    text: String,
    parts: FileParts,
}

/// [`parse_sources`] with a [`ParseCache`].
pub fn parse_sources_cached(
    files: Vec<(PathBuf, String)>,
    cache: &mut ParseCache,
) -> Result<Policy, PolicyError> {
    let hash = content_hash(&files);
    let sources: Vec<Source> = files
        .into_iter()
        .map(|(path, text)| Source::new(path, text))
        .collect();
    let mut diagnostics = Diagnostics::default();
    let mut previous = std::mem::take(&mut cache.files);
    let mut parts = Vec::with_capacity(sources.len());
    for source in &sources {
        if declares_nothing(&source.text) {
            // Installing it would stop enforcing everything the policy declared; an empty
            // file is far more often a write caught half-way, or a mistake, than a wish.
            diagnostics.error(
                source.origin(0),
                "the file is empty: a policy file declares at least one service, rule or setting",
            );
            continue;
        }
        match parse_file(source, previous.remove(&source.path).as_ref()) {
            Ok(file_parts) => {
                cache.files.insert(
                    source.path.clone(),
                    ParsedFile {
                        text: source.text.clone(),
                        parts: file_parts.clone(),
                    },
                );
                parts.push((source, file_parts));
            }
            Err(diagnostic) => diagnostics.0.push(diagnostic),
        }
    }
    if !diagnostics.0.is_empty() {
        return Err(PolicyError::Invalid(diagnostics.0));
    }
    let files: Vec<FileContent<'_>> = parts
        .iter()
        .map(|(source, file_parts)| FileContent::gather(source, file_parts))
        .collect();
    let paths = sources.iter().map(|source| source.path.clone()).collect();
    let policy = build(hash, paths, &files, &mut diagnostics);
    if diagnostics.0.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyError::Invalid(diagnostics.0))
    }
}

/// SHA-256 over the files' names and texts: what `status` and the audit log call the policy
/// hash.
fn content_hash(files: &[(PathBuf, String)]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for (path, text) in files {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    hasher.finalize().into()
}

/// A file's parsed parts, each with the bytes it was parsed from: its top-level tables, or the
/// whole file as one part.
type FileParts = Vec<(Range<usize>, Arc<PolicyDocument>)>;

/// Parses one file table by table, taking the tables whose text did not change since `previous`
/// from it. A file that cannot be cut into tables, or whose tables do not all parse, is parsed
/// whole, so that its errors are exactly those of the whole file.
fn parse_file(source: &Source, previous: Option<&ParsedFile>) -> Result<FileParts, Diagnostic> {
    if let Some(ranges) = tables::top_level_tables(&source.text)
        && let Some(parts) = parse_tables(&source.text, ranges, previous)
    {
        return Ok(parts);
    }
    parse_whole_file(source)
}

fn parse_whole_file(source: &Source) -> Result<FileParts, Diagnostic> {
    match PolicyDocument::parse(&source.text) {
        Ok(document) => Ok(vec![(0..source.text.len(), Arc::new(document))]),
        Err(error) => Err(Diagnostic {
            origin: source.origin(error.span().map_or(0, |span| span.start)),
            message: error.message().trim().to_owned(),
        }),
    }
}

/// Below this many tables to parse, threads cost more than they save.
const PARALLEL_PARSE_MIN: usize = 1024;

fn parse_tables(
    text: &str,
    ranges: Vec<Range<usize>>,
    previous: Option<&ParsedFile>,
) -> Option<FileParts> {
    let mut known: Vec<Option<Arc<PolicyDocument>>> = match previous {
        Some(previous) => {
            let same = common_ends(previous.text.as_bytes(), text.as_bytes());
            ranges
                .iter()
                .map(|range| previous.unchanged(text.len(), same, range))
                .collect()
        }
        None => vec![None; ranges.len()],
    };
    let missing: Vec<(usize, &str)> = ranges
        .iter()
        .enumerate()
        .filter(|(index, _)| known[*index].is_none())
        .map(|(index, range)| (index, &text[range.clone()]))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(missing.len().div_ceil(PARALLEL_PARSE_MIN))
        .max(1);
    let chunk = missing.len().div_ceil(threads).max(1);
    let parsed: Vec<Vec<Option<PolicyDocument>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = missing
            .chunks(chunk)
            .map(|tables| {
                scope.spawn(move || {
                    tables
                        .iter()
                        .map(|(_, table)| PolicyDocument::parse(table).ok())
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_default())
            .collect()
    });
    for ((index, _), document) in missing.iter().zip(parsed.into_iter().flatten()) {
        known[*index] = Some(Arc::new(document?));
    }
    let parts: FileParts = ranges
        .into_iter()
        .zip(known)
        .map(|(range, document)| document.map(|document| (range, document)))
        .collect::<Option<_>>()?;
    // Given twice in one file, [settings] or [detection] is an error of the whole file.
    let singletons_repeat = parts
        .iter()
        .filter(|(_, part)| part.settings.is_some())
        .count()
        > 1
        || parts
            .iter()
            .filter(|(_, part)| part.detection.is_some())
            .count()
            > 1;
    (!singletons_repeat).then_some(parts)
}

impl ParsedFile {
    /// The parse of the new text's `range`, when that range lies in what the new text (of
    /// `new_len` bytes) has in common with this one at its start or end (`same`), and was a
    /// table here too. So no table's text is hashed or compared on its own.
    fn unchanged(
        &self,
        new_len: usize,
        (same_start, same_end): (usize, usize),
        range: &Range<usize>,
    ) -> Option<Arc<PolicyDocument>> {
        let was = if range.end <= same_start {
            range.clone()
        } else if range.start >= new_len - same_end {
            let shift = |offset: usize| offset + self.text.len() - new_len;
            shift(range.start)..shift(range.end)
        } else {
            return None;
        };
        let index = self
            .parts
            .binary_search_by_key(&was.start, |(range, _)| range.start)
            .ok()?;
        let (old_range, document) = &self.parts[index];
        (old_range.end == was.end).then(|| document.clone())
    }
}

/// How many bytes two texts have in common at their start, and then at their end (the two
/// never overlap in either text).
fn common_ends(old: &[u8], new: &[u8]) -> (usize, usize) {
    const CHUNK: usize = 4096;
    let shorter = old.len().min(new.len());
    let mut start = 0;
    while start + CHUNK <= shorter && old[start..start + CHUNK] == new[start..start + CHUNK] {
        start += CHUNK;
    }
    start += old[start..shorter]
        .iter()
        .zip(&new[start..shorter])
        .take_while(|(a, b)| a == b)
        .count();
    let room = shorter - start;
    let (old_tail, new_tail) = (&old[old.len() - room..], &new[new.len() - room..]);
    let mut end = 0;
    while end + CHUNK <= room
        && old_tail[room - end - CHUNK..room - end] == new_tail[room - end - CHUNK..room - end]
    {
        end += CHUNK;
    }
    end += old_tail[..room - end]
        .iter()
        .rev()
        .zip(new_tail[..room - end].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    (start, end)
}

/// One file's content in the order a parse of the whole file gives it, each item with the
/// part it was parsed from.
struct FileContent<'a> {
    settings: Option<(At<'a>, &'a Spanned<SettingsDocument>)>,
    detection: Option<(At<'a>, &'a Spanned<DetectionDocument>)>,
    service: Vec<(At<'a>, &'a Spanned<ServiceDocument>)>,
    allow: Vec<(At<'a>, &'a Spanned<RuleDocument>)>,
    deny: Vec<(At<'a>, &'a Spanned<RuleDocument>)>,
}

impl<'a> FileContent<'a> {
    fn gather(source: &'a Source, parts: &'a FileParts) -> Self {
        let mut content = Self {
            settings: None,
            detection: None,
            service: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
        };
        for (range, part) in parts {
            let at = source.from(range.start);
            if let Some(settings) = &part.settings {
                content.settings = Some((at, settings));
            }
            if let Some(detection) = &part.detection {
                content.detection = Some((at, detection));
            }
            content
                .service
                .extend(part.service.iter().map(|service| (at, service)));
            content
                .allow
                .extend(part.allow.iter().map(|rule| (at, rule)));
            content.deny.extend(part.deny.iter().map(|rule| (at, rule)));
        }
        content
    }
}

/// Whether TOML text is only whitespace and comments.
fn declares_nothing(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    })
}

fn parse_mode(
    source: At<'_>,
    text: &Spanned<String>,
    diagnostics: &mut Diagnostics,
) -> Option<Mode> {
    match text.get_ref().as_str() {
        "enforce" => Some(Mode::Enforce),
        "audit" => Some(Mode::Audit),
        other => {
            diagnostics.error(
                source.at(text),
                format!("unknown mode \"{other}\": expected \"enforce\" or \"audit\""),
            );
            None
        }
    }
}

fn positive(
    source: At<'_>,
    value: &Spanned<i64>,
    what: &str,
    diagnostics: &mut Diagnostics,
) -> Option<u64> {
    match u64::try_from(*value.get_ref()) {
        Ok(number) if number > 0 => Some(number),
        _ => {
            diagnostics.error(
                source.at(value),
                format!("{what} must be a positive integer, not {}", value.get_ref()),
            );
            None
        }
    }
}

fn valid_service_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn build(
    hash: [u8; 32],
    files: Vec<PathBuf>,
    contents: &[FileContent<'_>],
    diagnostics: &mut Diagnostics,
) -> Policy {
    let mut policy = Policy {
        hash,
        files,
        mode: Mode::Enforce,
        manage_host: false,
        services: Vec::new(),
        rules: Vec::new(),
        detection: Detection::default(),
    };

    // Settings and detection may each be given once across all files.
    let mut settings_origin: Option<Origin> = None;
    let mut detection_origin: Option<Origin> = None;
    for content in contents {
        if let Some((source, settings)) = content.settings {
            let origin = source.at(settings);
            if let Some(first) = &settings_origin {
                diagnostics.error(
                    origin.clone(),
                    format!("[settings] is already given at {first}"),
                );
            }
            settings_origin = Some(origin);
            if let Some(mode) = &settings.get_ref().mode {
                policy.mode = parse_mode(source, mode, diagnostics).unwrap_or_default();
            }
            policy.manage_host = settings.get_ref().manage_host.unwrap_or(false);
        }
        if let Some((source, detection)) = content.detection {
            let origin = source.at(detection);
            if let Some(first) = &detection_origin {
                diagnostics.error(
                    origin.clone(),
                    format!("[detection] is already given at {first}"),
                );
            }
            detection_origin = Some(origin);
            let tuning = detection.get_ref();
            let defaults = Detection::default();
            let count = |value: &Option<Spanned<i64>>,
                         what: &str,
                         default: u64,
                         diagnostics: &mut Diagnostics| {
                value
                    .as_ref()
                    .map_or(Some(default), |value| {
                        positive(source, value, what, diagnostics)
                    })
                    .unwrap_or(default)
            };
            policy.detection = Detection {
                window_secs: count(
                    &tuning.window_secs,
                    "window_secs",
                    defaults.window_secs,
                    diagnostics,
                ),
                spike_z: match &tuning.spike_z {
                    Some(z) if *z.get_ref() > 0.0 && z.get_ref().is_finite() => *z.get_ref(),
                    Some(z) => {
                        diagnostics.error(
                            source.at(z),
                            format!("spike_z must be a positive number, not {}", z.get_ref()),
                        );
                        defaults.spike_z
                    }
                    None => defaults.spike_z,
                },
                spike_min_calls: count(
                    &tuning.spike_min_calls,
                    "spike_min_calls",
                    defaults.spike_min_calls,
                    diagnostics,
                ),
                spike_warmup_windows: count(
                    &tuning.spike_warmup_windows,
                    "spike_warmup_windows",
                    defaults.spike_warmup_windows,
                    diagnostics,
                ),
                fanout_distinct_peers: count(
                    &tuning.fanout_distinct_peers,
                    "fanout_distinct_peers",
                    defaults.fanout_distinct_peers,
                    diagnostics,
                ),
                deny_burst: count(
                    &tuning.deny_burst,
                    "deny_burst",
                    defaults.deny_burst,
                    diagnostics,
                ),
            };
        }
    }

    // Services, then identities (which need every service to find collisions).
    let mut services_by_name: BTreeMap<String, Service> = BTreeMap::new();
    for content in contents {
        for &(source, service) in &content.service {
            if let Some(parsed) = build_service(source, service, diagnostics) {
                if let Some(first) = services_by_name.get(&parsed.name) {
                    diagnostics.error(
                        parsed.origin.clone(),
                        format!(
                            "service \"{}\" is already declared at {}",
                            parsed.name, first.origin
                        ),
                    );
                    continue;
                }
                services_by_name.insert(parsed.name.clone(), parsed);
            }
        }
    }
    policy.services = services_by_name.into_values().collect();
    check_identities(&policy.services, diagnostics);
    check_addresses(&policy.services, diagnostics);

    // Rules.
    let rule_count = contents
        .iter()
        .map(|content| content.allow.len() + content.deny.len())
        .sum();
    let mut rule_ids: HashMap<String, Origin> = HashMap::with_capacity(rule_count);
    policy.rules.reserve(rule_count);
    for content in contents {
        for (kind, rules) in [
            (RuleKind::Allow, &content.allow),
            (RuleKind::Deny, &content.deny),
        ] {
            for &(source, rule) in rules {
                let Some(parsed) = build_rule(&policy, source, kind, rule, diagnostics) else {
                    continue;
                };
                if let Some(first) = rule_ids.get(&parsed.id) {
                    diagnostics.error(
                        parsed.origin.clone(),
                        format!("rule id \"{}\" is already used at {first}", parsed.id),
                    );
                    continue;
                }
                rule_ids.insert(parsed.id.clone(), parsed.origin.clone());
                policy.rules.push(parsed);
            }
        }
    }
    // A CIDR peer that is exactly a service's address is that service: say so instead of
    // silently creating a second identity for the same address.
    for rule in &policy.rules {
        for peer in [&rule.from, &rule.to] {
            if let Peer::Cidr(net) = peer
                && let Some(owner) = policy
                    .services
                    .iter()
                    .find(|service| service.addresses.contains(net))
            {
                diagnostics.error(
                    rule.origin.clone(),
                    format!(
                        "{net} is the address of service \"{}\"; name the service instead",
                        owner.name
                    ),
                );
            }
        }
    }
    policy
}

fn build_service(
    source: At<'_>,
    spanned: &Spanned<ServiceDocument>,
    diagnostics: &mut Diagnostics,
) -> Option<Service> {
    let document = spanned.get_ref();
    let name = document.name.get_ref().trim().to_owned();
    let origin = source.at(spanned);
    if !valid_service_name(&name) {
        diagnostics.error(
            source.at(&document.name),
            format!("invalid service name \"{name}\": use letters, digits, '-', '_' and '.', starting with a letter or digit"),
        );
        return None;
    }
    if name == "world" || name == "host" {
        diagnostics.error(
            source.at(&document.name),
            format!("\"{name}\" is a reserved peer name and cannot name a service"),
        );
        return None;
    }
    let (identity, identity_declared) = match &document.identity {
        Some(value) => {
            let number = *value.get_ref();
            if number < i64::from(enforcer_common::identity::FIRST_SERVICE)
                || number >= i64::from(enforcer_common::identity::SERVICE_END)
            {
                diagnostics.error(
                    source.at(value),
                    format!(
                        "identity {number} of service \"{name}\" is out of range {}..{} (lower values are reserved)",
                        enforcer_common::identity::FIRST_SERVICE,
                        enforcer_common::identity::SERVICE_END - 1
                    ),
                );
                return None;
            }
            (number as u32, true)
        }
        None => (identity::of_service_name(&name), false),
    };
    let mut addresses = Vec::new();
    for address in &document.addresses {
        match parse_cidr(address.get_ref()) {
            Ok(net) => addresses.push(net),
            Err(message) => diagnostics.error(source.at(address), message),
        }
    }
    let mut cgroups = Vec::new();
    for cgroup in &document.cgroups {
        let path = PathBuf::from(cgroup.get_ref());
        if !path.is_absolute() {
            diagnostics.error(
                source.at(cgroup),
                format!("cgroup \"{}\" must be an absolute path", cgroup.get_ref()),
            );
            continue;
        }
        cgroups.push(path);
    }
    let mut interfaces = Vec::new();
    for interface in &document.interfaces {
        let text = interface.get_ref();
        if text.is_empty()
            || text.len() > 15
            || text.contains('/')
            || text.contains(char::is_whitespace)
        {
            diagnostics.error(
                source.at(interface),
                format!(
                    "invalid interface name \"{text}\" (at most 15 characters, no '/' or spaces)"
                ),
            );
            continue;
        }
        interfaces.push(text.clone());
    }
    if !interfaces.is_empty() && addresses.is_empty() {
        diagnostics.error(
            origin.clone(),
            format!("service \"{name}\" has interfaces but no addresses: packets from its interfaces are checked against its addresses"),
        );
    }
    let mode = document
        .mode
        .as_ref()
        .and_then(|mode| parse_mode(source, mode, diagnostics));
    Some(Service {
        name,
        identity,
        identity_declared,
        cgroups,
        interfaces,
        addresses,
        mode,
        origin,
    })
}

fn check_identities(services: &[Service], diagnostics: &mut Diagnostics) {
    let mut owners: BTreeMap<u32, &Service> = BTreeMap::new();
    for service in services {
        if let Some(first) = owners.get(&service.identity) {
            let how = |service: &Service| {
                if service.identity_declared {
                    "declared"
                } else {
                    "hashed from its name"
                }
            };
            diagnostics.error(
                service.origin.clone(),
                format!(
                    "duplicate identity {}: service \"{}\" ({}) and service \"{}\" at {} ({}); give one an explicit identity",
                    service.identity,
                    service.name,
                    how(service),
                    first.name,
                    first.origin,
                    how(first)
                ),
            );
            continue;
        }
        owners.insert(service.identity, service);
    }
}

fn check_addresses(services: &[Service], diagnostics: &mut Diagnostics) {
    let mut owners: BTreeMap<IpNet, &Service> = BTreeMap::new();
    for service in services {
        for net in &service.addresses {
            if let Some(first) = owners.get(net) {
                if first.name != service.name {
                    diagnostics.error(
                        service.origin.clone(),
                        format!("address {net} of service \"{}\" is already an address of service \"{}\" at {}", service.name, first.name, first.origin),
                    );
                }
                continue;
            }
            owners.insert(*net, service);
        }
    }
}

fn build_rule(
    policy: &Policy,
    source: At<'_>,
    kind: RuleKind,
    spanned: &Spanned<RuleDocument>,
    diagnostics: &mut Diagnostics,
) -> Option<Rule> {
    let document = spanned.get_ref();
    let origin = source.at(spanned);
    let mut peer = |text: &Spanned<String>| match policy.parse_peer(text.get_ref().trim()) {
        Ok(peer) => Some(peer),
        Err(message) => {
            diagnostics.error(source.at(text), message);
            None
        }
    };
    let from = peer(&document.from);
    let to = peer(&document.to);
    let mut ports = Vec::new();
    let mut ports_ok = true;
    for port in document.ports.iter().flatten() {
        match port.get_ref().parse::<PortMatch>() {
            Ok(parsed) => ports.push(parsed),
            Err(message) => {
                diagnostics.error(source.at(port), message);
                ports_ok = false;
            }
        }
    }
    if document.ports.as_ref().is_some_and(Vec::is_empty) {
        diagnostics.error(
            origin.clone(),
            "ports = [] matches nothing; omit `ports` to match any port and protocol",
        );
        ports_ok = false;
    }
    let max_new_per_sec = match &document.max_new_per_sec {
        Some(_) if kind == RuleKind::Deny => {
            diagnostics.error(
                origin.clone(),
                "max_new_per_sec applies to allow rules only",
            );
            return None;
        }
        Some(value) => match u32::try_from(*value.get_ref()) {
            Ok(rate) if rate > 0 && rate <= 1_000_000_000 => Some(rate),
            _ => {
                diagnostics.error(
                    source.at(value),
                    format!(
                        "max_new_per_sec must be between 1 and 1000000000, not {}",
                        value.get_ref()
                    ),
                );
                return None;
            }
        },
        None => None,
    };
    let (from, to) = (from?, to?);
    if !ports_ok {
        return None;
    }
    let id = match &document.id {
        Some(id) => {
            let text = id.get_ref().trim();
            if text.is_empty() || text.contains(char::is_whitespace) {
                diagnostics.error(
                    source.at(id),
                    format!("invalid rule id \"{text}\": use a non-empty word"),
                );
                return None;
            }
            if rule::is_reserved_name(text) {
                let reserved: Vec<&str> =
                    rule::RESERVED_NAMES.iter().map(|(_, name)| *name).collect();
                diagnostics.error(
                    source.at(id),
                    format!(
                        "invalid rule id \"{text}\": it is reserved for enforcer's own decisions ({})",
                        reserved.join(", ")
                    ),
                );
                return None;
            }
            text.to_owned()
        }
        None => format!(
            "{}:{}->{}@{}:{}",
            kind.as_str(),
            policy.peer_name(&from),
            policy.peer_name(&to),
            file_name(&origin.file),
            origin.line
        ),
    };
    Some(Rule {
        kind,
        id,
        from,
        to,
        ports,
        max_new_per_sec,
        origin,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        parse_sources(vec![(PathBuf::from("policy.toml"), text.to_owned())])
    }

    /// The policy as a parse of the whole file at once sees it.
    fn parse_whole(text: &str) -> Result<Policy, String> {
        let files = vec![(PathBuf::from("policy.toml"), text.to_owned())];
        let hash = content_hash(&files);
        let source = Source::new(files[0].0.clone(), text.to_owned());
        let parts = parse_whole_file(&source).map_err(|diagnostic| diagnostic.to_string())?;
        let mut diagnostics = Diagnostics::default();
        let policy = build(
            hash,
            vec![source.path.clone()],
            &[FileContent::gather(&source, &parts)],
            &mut diagnostics,
        );
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
        let tables = |cache: &ParseCache| -> Vec<Arc<PolicyDocument>> {
            cache.files[Path::new("policy.toml")]
                .parts
                .iter()
                .map(|(_, table)| table.clone())
                .collect()
        };
        let kept = tables(&cache);
        let second = parse_sources_cached(file(policy(9001)), &mut cache).unwrap();
        assert_ne!(first.rules[50], second.rules[50]);
        assert_eq!(second, parse(&policy(9001)).unwrap());
        let now = tables(&cache);
        assert_eq!(now.len(), 101);
        let reused: Vec<bool> = now
            .iter()
            .map(|table| kept.iter().any(|old| Arc::ptr_eq(old, table)))
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
        assert_eq!(rule.id, "fe-to-api");
        assert_eq!(rule.max_new_per_sec, Some(200));
        assert_eq!(
            rule.ports,
            vec![
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
        assert_eq!(merged.rules[0].id, "allow:world->api@b.toml:1");
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
