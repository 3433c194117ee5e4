//! Building a [`Policy`] from the documents of every file, with every problem reported.

use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use enforcer_common::policy::rule;
use ipnet::IpNet;
use toml::Spanned;

use super::{
    Detection, InterfaceSelector, Mode, Peer, Policy, PortMatch, Rule, RuleKind, Service,
    diagnostics::{At, Diagnostics, Origin},
    documents::{DetectionDocument, RuleDocument, ServiceDocument},
    identity,
    load::{FileContent, RuleItem},
    parse_cidr,
    rule_ids::{Repeated, RuleIds, Seen},
};

pub(super) fn parse_mode(
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

pub(super) fn positive(
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

pub(super) fn valid_service_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Builds the policy of `contents` (a whole build: [`start`], then [`add_rules`]).
#[cfg(test)]
pub(super) fn build(
    hash: [u8; 32],
    files: Vec<PathBuf>,
    contents: &[FileContent<'_>],
    diagnostics: &mut Diagnostics,
) -> Policy {
    let mut policy = start(files, contents, diagnostics);
    policy.hash = hash;
    add_rules(&mut policy, contents, &mut RuleIds::default(), diagnostics);
    policy
}

/// The policy of `contents` without its rules: settings, services, identities (which need
/// every service to find collisions). Rules come after, in [`add_rules`]: they name services.
pub(super) fn start(
    files: Vec<PathBuf>,
    contents: &[FileContent<'_>],
    diagnostics: &mut Diagnostics,
) -> Policy {
    let mut policy = Policy {
        hash: [0; 32],
        files,
        mode: Mode::Enforce,
        manage_host: false,
        services: Vec::new(),
        rules: Vec::new(),
        detection: Detection::default(),
    };
    build_settings(&mut policy, contents, diagnostics);
    policy.services = build_services(contents, diagnostics);
    check_identities(&policy.services, diagnostics);
    check_addresses(&policy.services, diagnostics);
    policy
}

/// What built rules depend on of the services: their names in order (a rule names a service by
/// its place) and their addresses (a rule may not name one as a CIDR).
pub(super) fn service_names_and_addresses(services: &[Service]) -> Vec<(String, Vec<IpNet>)> {
    services
        .iter()
        .map(|service| (service.name.clone(), service.addresses.clone()))
        .collect()
}

/// Every file's rules in order, allows before denies within a file: built from their
/// documents, or built already; an id used twice is an error (`ids`: who held each id after
/// the last load). Returns the rules built just now, each with its (file, part).
pub(super) fn add_rules(
    policy: &mut Policy,
    contents: &[FileContent<'_>],
    ids: &mut RuleIds,
    diagnostics: &mut Diagnostics,
) -> Vec<FreshRule> {
    ids.begin();
    let (rules, fresh, unchecked) = build_rules(policy, contents, ids, diagnostics);
    policy.rules = rules;
    for Repeated { again, first } in ids.repeated(&policy.rules, &unchecked) {
        let rule = &policy.rules[again];
        diagnostics.error(
            rule.origin.clone(),
            format!(
                "rule id \"{}\" is already used at {}",
                rule.id, first.origin
            ),
        );
    }
    check_cidr_peers(policy, &fresh, diagnostics);
    fresh
}

/// A rule built from its document by this load: where it is in the policy, and the file and
/// part it came from.
pub(super) struct FreshRule {
    pub(super) index: usize,
    pub(super) file: usize,
    pub(super) part: usize,
}

/// `rule` as built from a table that now starts `lines` lines further down: its line, and the
/// default id that carries it.
pub(super) fn moved(rule: &Rule, lines: i64) -> Rule {
    let line = u32::try_from(i64::from(rule.origin.line) + lines).unwrap_or(u32::MAX);
    let id = match (rule.id_declared, rule.id.rsplit_once(':')) {
        (false, Some((before_line, _))) => format!("{before_line}:{line}").into(),
        _ => rule.id.clone(),
    };
    Rule {
        id,
        origin: Origin {
            line,
            ..rule.origin.clone()
        },
        ..rule.clone()
    }
}

/// `[settings]` and `[detection]`, each given at most once across all files.
fn build_settings(
    policy: &mut Policy,
    contents: &[FileContent<'_>],
    diagnostics: &mut Diagnostics,
) {
    let mut settings_origin: Option<Origin> = None;
    let mut detection_origin: Option<Origin> = None;
    for content in contents {
        if let Some((source, settings)) = content.settings {
            once(
                "[settings]",
                source.at(settings),
                &mut settings_origin,
                diagnostics,
            );
            if let Some(mode) = &settings.get_ref().mode {
                policy.mode = parse_mode(source, mode, diagnostics).unwrap_or_default();
            }
            policy.manage_host = settings.get_ref().manage_host.unwrap_or(false);
        }
        if let Some((source, detection)) = content.detection {
            once(
                "[detection]",
                source.at(detection),
                &mut detection_origin,
                diagnostics,
            );
            policy.detection = build_detection(source, detection.get_ref(), diagnostics);
        }
    }
}

/// Reports a table given a second time.
fn once(table: &str, origin: Origin, first: &mut Option<Origin>, diagnostics: &mut Diagnostics) {
    if let Some(first) = first {
        diagnostics.error(
            origin.clone(),
            format!("{table} is already given at {first}"),
        );
    }
    *first = Some(origin);
}

fn build_detection(
    source: At<'_>,
    tuning: &DetectionDocument,
    diagnostics: &mut Diagnostics,
) -> Detection {
    let defaults = Detection::default();
    let count = |value: &Option<Spanned<i64>>, what, default, diagnostics: &mut Diagnostics| {
        value
            .as_ref()
            .map_or(Some(default), |value| {
                positive(source, value, what, diagnostics)
            })
            .unwrap_or(default)
    };
    // In the order of the fields, so that problems are reported in it.
    let window_secs = count(
        &tuning.window_secs,
        "window_secs",
        defaults.window_secs,
        diagnostics,
    );
    let spike_z = match &tuning.spike_z {
        Some(z) if *z.get_ref() > 0.0 && z.get_ref().is_finite() => *z.get_ref(),
        Some(z) => {
            diagnostics.error(
                source.at(z),
                format!("spike_z must be a positive number, not {}", z.get_ref()),
            );
            defaults.spike_z
        }
        None => defaults.spike_z,
    };
    let spike_min_calls = count(
        &tuning.spike_min_calls,
        "spike_min_calls",
        defaults.spike_min_calls,
        diagnostics,
    );
    let spike_warmup_windows = count(
        &tuning.spike_warmup_windows,
        "spike_warmup_windows",
        defaults.spike_warmup_windows,
        diagnostics,
    );
    let fanout_distinct_peers = count(
        &tuning.fanout_distinct_peers,
        "fanout_distinct_peers",
        defaults.fanout_distinct_peers,
        diagnostics,
    );
    let deny_burst = count(
        &tuning.deny_burst,
        "deny_burst",
        defaults.deny_burst,
        diagnostics,
    );
    Detection {
        window_secs,
        spike_z,
        spike_min_calls,
        spike_warmup_windows,
        fanout_distinct_peers,
        deny_burst,
    }
}

/// Every file's services, sorted by name; a name declared twice is an error.
fn build_services(contents: &[FileContent<'_>], diagnostics: &mut Diagnostics) -> Vec<Service> {
    let mut services_by_name: BTreeMap<String, Service> = BTreeMap::new();
    for content in contents {
        for &(source, service) in &content.service {
            let Some(parsed) = build_service(source, service, diagnostics) else {
                continue;
            };
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
    services_by_name.into_values().collect()
}

/// The rules, those built just now (from their documents), and the indexes of those whose ids
/// need checking (see [`RuleIds::take`]). One pass over each file's parts, allows and denies
/// set apart as it goes, on two threads for a large file: a policy may have 100 000 parts.
fn build_rules(
    policy: &Policy,
    contents: &[FileContent<'_>],
    ids: &RuleIds,
    diagnostics: &mut Diagnostics,
) -> (Vec<Arc<Rule>>, Vec<FreshRule>, Vec<usize>) {
    // (Each part holds a rule, but for services, settings and files parsed whole.)
    let rule_count = contents.iter().map(|content| content.parts.len()).sum();
    let mut rules: Vec<Arc<Rule>> = Vec::with_capacity(rule_count);
    let (mut fresh, mut unchecked) = (Vec::new(), Vec::new());
    for (file, content) in contents.iter().enumerate() {
        let parts = content.parts.len();
        let mut stretches: Vec<[KindRules; 2]> = if parts < PARALLEL_PARTS {
            vec![rules_of(policy, content, 0..parts, ids)]
        } else {
            std::thread::scope(|scope| {
                let later = scope.spawn(|| rules_of(policy, content, parts / 2..parts, ids));
                let earlier = rules_of(policy, content, 0..parts / 2, ids);
                let later = later
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                vec![earlier, later]
            })
        };
        // The file's allows, then its denies, each in part order.
        for kind in [RuleKind::Allow, RuleKind::Deny] {
            for stretch in &mut stretches {
                let of_kind = std::mem::take(&mut stretch[usize::from(kind == RuleKind::Deny)]);
                let first = rules.len();
                fresh.extend(of_kind.fresh.into_iter().map(|(place, part)| FreshRule {
                    index: first + place,
                    file,
                    part,
                }));
                unchecked.extend(of_kind.unchecked.into_iter().map(|place| first + place));
                rules.extend(of_kind.rules);
                diagnostics.0.extend(of_kind.diagnostics.0);
            }
        }
    }
    (rules, fresh, unchecked)
}

/// From this many parts in a file, its rules are gathered on two threads. (Tests split from 4,
/// so that the policy tests' reloads go through both halves.)
const PARALLEL_PARTS: usize = if cfg!(test) { 4 } else { 8192 };

/// The rules of `content`'s parts `parts`, per kind (allow, deny).
fn rules_of(
    policy: &Policy,
    content: &FileContent<'_>,
    parts: Range<usize>,
    ids: &RuleIds,
) -> [KindRules; 2] {
    let mut by_kind: [KindRules; 2] = Default::default();
    by_kind[0].rules.reserve(parts.len());
    content.each_rule(parts, |kind, item| {
        let of_kind = &mut by_kind[usize::from(kind == RuleKind::Deny)];
        let place = of_kind.rules.len();
        let rule = match item {
            RuleItem::Built(rule) => Arc::clone(rule),
            RuleItem::Parsed { at, part, rule } => {
                let built = build_rule(policy, at, kind, rule, &mut of_kind.diagnostics);
                let Some(built) = built else { return };
                of_kind.fresh.push((place, part));
                Arc::new(built)
            }
        };
        if ids.take(&rule) {
            of_kind.unchecked.push(place);
        }
        of_kind.rules.push(rule);
    });
    by_kind
}

/// One file's rules of one kind, as [`build_rules`] gathers them; with the problems found
/// building them, reported in policy order.
#[derive(Default)]
struct KindRules {
    rules: Vec<Arc<Rule>>,
    fresh: Vec<(usize, usize)>,
    unchecked: Vec<usize>,
    diagnostics: Diagnostics,
}

/// A CIDR peer that is exactly a service's address is that service: say so instead of
/// silently creating a second identity for the same address. Only rules built just now
/// (`fresh`): those built before were checked against the same services.
fn check_cidr_peers(policy: &Policy, fresh: &[FreshRule], diagnostics: &mut Diagnostics) {
    for rule in fresh.iter().map(|fresh| &policy.rules[fresh.index]) {
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
}

pub(super) fn build_service(
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
        Some(value) => (declared_identity(source, &name, value, diagnostics)?, true),
        None => (identity::of_service_name(&name), false),
    };
    let addresses = valid_entries(source, &document.addresses, diagnostics, |text| {
        parse_cidr(text).map_err(|error| error.to_string())
    });
    let cgroups = valid_entries(source, &document.cgroups, diagnostics, |text| {
        let path = PathBuf::from(text);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(format!("cgroup \"{text}\" must be an absolute path"))
        }
    });
    let interfaces = valid_entries(source, &document.interfaces, diagnostics, |text| {
        if text.is_empty()
            || text.len() > 15
            || text.contains('/')
            || text.contains(char::is_whitespace)
        {
            Err(format!(
                "invalid interface name \"{text}\" (at most 15 characters, no '/' or spaces)"
            ))
        } else if let Err(error) = InterfaceSelector::new(text) {
            Err(format!("invalid interface pattern \"{text}\": {error}"))
        } else {
            Ok(text.to_owned())
        }
    });
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
    let interface_selectors = interfaces
        .iter()
        .filter_map(|entry| InterfaceSelector::new(entry).ok())
        .collect();
    Some(Service {
        name,
        identity,
        identity_declared,
        cgroups,
        interfaces,
        interface_selectors,
        addresses,
        mode,
        origin,
    })
}

/// An identity a service declares, if it is in the services' range.
fn declared_identity(
    source: At<'_>,
    name: &str,
    value: &Spanned<i64>,
    diagnostics: &mut Diagnostics,
) -> Option<u32> {
    use enforcer_common::identity::{FIRST_SERVICE, SERVICE_END};
    let number = *value.get_ref();
    if number < i64::from(FIRST_SERVICE) || number >= i64::from(SERVICE_END) {
        diagnostics.error(
            source.at(value),
            format!(
                "identity {number} of service \"{name}\" is out of range {FIRST_SERVICE}..{} (lower values are reserved)",
                SERVICE_END - 1
            ),
        );
        return None;
    }
    Some(number as u32)
}

/// The entries of a list that `parse` accepts; each one it refuses is reported where it is.
fn valid_entries<T, E: ToString>(
    source: At<'_>,
    entries: &[Spanned<String>],
    diagnostics: &mut Diagnostics,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Vec<T> {
    let mut valid = Vec::with_capacity(entries.len());
    for entry in entries {
        match parse(entry.get_ref()) {
            Ok(value) => valid.push(value),
            Err(message) => diagnostics.error(source.at(entry), message),
        }
    }
    valid
}

pub(super) fn check_identities(services: &[Service], diagnostics: &mut Diagnostics) {
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

pub(super) fn check_addresses(services: &[Service], diagnostics: &mut Diagnostics) {
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

pub(super) fn build_rule(
    policy: &Policy,
    source: At<'_>,
    kind: RuleKind,
    spanned: &Spanned<RuleDocument>,
    diagnostics: &mut Diagnostics,
) -> Option<Rule> {
    let document = spanned.get_ref();
    let origin = source.at(spanned);
    let mut peer = |text: &Spanned<Box<str>>| match policy.parse_peer(text.get_ref().trim()) {
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
    if document
        .ports
        .as_ref()
        .is_some_and(|ports| ports.is_empty())
    {
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
        Some(value) => Some(rate_limit(source, value, diagnostics)?),
        None => None,
    };
    let (from, to) = (from?, to?);
    if !ports_ok {
        return None;
    }
    let id_declared = document.id.is_some();
    let id = match &document.id {
        Some(id) => declared_rule_id(source, id, diagnostics)?,
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
        id: id.into(),
        id_declared,
        from,
        to,
        ports: ports.into(),
        max_new_per_sec,
        origin,
        seen: Seen::default(),
    })
}

fn rate_limit(source: At<'_>, value: &Spanned<i64>, diagnostics: &mut Diagnostics) -> Option<u32> {
    match u32::try_from(*value.get_ref()) {
        Ok(rate) if rate > 0 && rate <= 1_000_000_000 => Some(rate),
        _ => {
            diagnostics.error(
                source.at(value),
                format!(
                    "max_new_per_sec must be between 1 and 1000000000, not {}",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

/// A rule id the policy gives: one word, not a reserved rule's name.
fn declared_rule_id(
    source: At<'_>,
    id: &Spanned<Box<str>>,
    diagnostics: &mut Diagnostics,
) -> Option<String> {
    let text = id.get_ref().trim();
    if text.is_empty() || text.contains(char::is_whitespace) {
        diagnostics.error(
            source.at(id),
            format!("invalid rule id \"{text}\": use a non-empty word"),
        );
        return None;
    }
    if rule::is_reserved_name(text) {
        let reserved: Vec<&str> = rule::RESERVED_NAMES.iter().map(|(_, name)| *name).collect();
        diagnostics.error(
            source.at(id),
            format!(
                "invalid rule id \"{text}\": it is reserved for enforcer's own decisions ({})",
                reserved.join(", ")
            ),
        );
        return None;
    }
    Some(text.to_owned())
}

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}
