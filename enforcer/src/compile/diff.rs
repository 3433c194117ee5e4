//! `enforcer diff OLD NEW`: what changes between two policies, edge by edge, computed from the
//! compiled tables with the datapath's own lookup (`Compiled::evaluate`), so it says what the
//! kernel will do rather than what the rules look like.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{self, BufRead as _},
    path::Path,
};

use enforcer_common::{
    identity::IdentityInfo,
    policy::{ANY_PORT, action, proto},
};
use serde_json::{Value, json};

use crate::compile::Compiled;

/// What an edge allows: `(what, rule)` pairs such as `("8000-8100/tcp", "fe-api")`.
pub type Allowed = BTreeSet<(String, String)>;

/// Allowed traffic per edge `(source name, destination name)`, for every edge a rule names.
pub fn edges(compiled: &Compiled) -> BTreeMap<(String, String), Allowed> {
    boundaries(compiled)
        .into_iter()
        .map(|((src, dst), ports)| {
            let allowed = allowed_on(
                compiled,
                &compiled.names.identity_info(src),
                &compiled.names.identity_info(dst),
                &ports,
            );
            (
                (
                    compiled.names.identity_name(src),
                    compiled.names.identity_name(dst),
                ),
                allowed,
            )
        })
        .collect()
}

/// The ports where a verdict can change, by protocol.
type Boundaries = BTreeMap<u8, BTreeSet<u32>>;

/// Every identity pair with entries, and where its entries start and end: one pass over the
/// tables (looking at every entry for every pair took a minute at 100 000 rules).
fn boundaries(compiled: &Compiled) -> BTreeMap<(u32, u32), Boundaries> {
    let mut pairs: BTreeMap<(u32, u32), Boundaries> = BTreeMap::new();
    for key in compiled.tables.rules.keys() {
        let ports = pairs
            .entry((key.src_identity, key.dst_identity))
            .or_default();
        if key.port != ANY_PORT {
            let port = u32::from(key.port);
            ports.entry(key.proto).or_default().extend([port, port + 1]);
        }
    }
    for (key, ranges) in &compiled.tables.ranges {
        let starts = pairs
            .entry((key.src_identity, key.dst_identity))
            .or_default()
            .entry(key.proto)
            .or_default();
        for range in &ranges.ranges[..ranges.count as usize] {
            starts.extend([u32::from(range.lo), u32::from(range.hi) + 1]);
        }
    }
    pairs
}

/// Everything allowed from `src` to `dst`, as port intervals per protocol with their rule.
fn allowed_on(
    compiled: &Compiled,
    src: &IdentityInfo,
    dst: &IdentityInfo,
    boundaries: &Boundaries,
) -> Allowed {
    let mut allowed = Allowed::new();
    for (protocol, name) in [(proto::TCP, "tcp"), (proto::UDP, "udp")] {
        // The verdict only changes where some entry starts or ends.
        let mut starts: BTreeSet<u32> = BTreeSet::from([1, 65536]);
        if let Some(found) = boundaries.get(&protocol) {
            starts.extend(found);
        }
        let starts: Vec<u32> = starts.into_iter().collect();
        let mut run: Option<(u32, u32, String)> = None;
        for window in starts.windows(2) {
            let (lo, hi) = (window[0], window[1] - 1);
            let verdict = compiled.evaluate(src, dst, protocol, lo as u16);
            let rule =
                (verdict.action == action::ALLOW).then(|| compiled.names.rule_id(verdict.rule));
            run = match (run, rule) {
                (Some((start, _, current)), Some(rule)) if current == rule => {
                    Some((start, hi, current))
                }
                (previous, rule) => {
                    if let Some((start, end, rule)) = previous {
                        allowed.insert((ports_text(start, end, name), rule));
                    }
                    rule.map(|rule| (lo, hi, rule))
                }
            };
        }
        if let Some((start, end, rule)) = run {
            allowed.insert((ports_text(start, end, name), rule));
        }
    }
    let icmp = compiled.evaluate(src, dst, proto::ICMP, 0);
    if icmp.action == action::ALLOW {
        allowed.insert(("icmp".to_owned(), compiled.names.rule_id(icmp.rule)));
    }
    // Any protocol the policy has no name for (GRE, SCTP, ...): what the any-protocol entry says.
    let other = compiled.evaluate(src, dst, 47, 0);
    if other.action == action::ALLOW {
        allowed.insert((
            "other protocols".to_owned(),
            compiled.names.rule_id(other.rule),
        ));
    }
    allowed
}

fn ports_text(lo: u32, hi: u32, protocol: &str) -> String {
    match (lo, hi) {
        (1, 65535) => protocol.to_owned(),
        (lo, hi) if lo == hi => format!("{lo}/{protocol}"),
        (lo, hi) => format!("{lo}-{hi}/{protocol}"),
    }
}

fn describe(allowed: &Allowed) -> String {
    allowed
        .iter()
        .map(|(what, rule)| format!("{what} ({rule})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The differences between two compiled policies.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<((String, String), Allowed)>,
    pub removed: Vec<((String, String), Allowed)>,
    pub changed: Vec<((String, String), Allowed, Allowed)>,
    pub services_added: Vec<String>,
    pub services_removed: Vec<String>,
    /// Recorded flows whose verdict differs: (src, dst, what, old verdict, new verdict, flows seen).
    pub replayed: Vec<(String, String, String, &'static str, &'static str, u64)>,
}

pub fn diff(old: &Compiled, new: &Compiled) -> Diff {
    let (before, after) = (edges(old), edges(new));
    let mut result = Diff::default();
    for (edge, allowed) in &after {
        match before.get(edge) {
            None if !allowed.is_empty() => result.added.push((edge.clone(), allowed.clone())),
            Some(previous) if previous.is_empty() && !allowed.is_empty() => {
                result.added.push((edge.clone(), allowed.clone()))
            }
            Some(previous) if !previous.is_empty() && allowed.is_empty() => {
                result.removed.push((edge.clone(), previous.clone()))
            }
            Some(previous) if previous != allowed => {
                result
                    .changed
                    .push((edge.clone(), previous.clone(), allowed.clone()))
            }
            _ => {}
        }
    }
    for (edge, allowed) in &before {
        if !after.contains_key(edge) && !allowed.is_empty() {
            result.removed.push((edge.clone(), allowed.clone()));
        }
    }
    let services = |compiled: &Compiled| -> BTreeSet<String> {
        compiled
            .names
            .identities
            .values()
            .filter(|(_, info)| {
                info.is_service() && info.identity >= enforcer_common::identity::FIRST_SERVICE
            })
            .map(|(name, _)| name.clone())
            .collect()
    };
    let (old_services, new_services) = (services(old), services(new));
    result.services_added = new_services.difference(&old_services).cloned().collect();
    result.services_removed = old_services.difference(&new_services).cloned().collect();
    result
}

/// The identity a name from a flow record has under `compiled` (world if it names nothing).
fn by_name(compiled: &Compiled, name: &str) -> IdentityInfo {
    compiled
        .names
        .identities
        .values()
        .find(|(candidate, _)| candidate == name)
        .map_or(IdentityInfo::WORLD, |(_, info)| *info)
}

/// Adds to `result` the flows recorded in an audit log whose verdict differs under `new`.
pub fn replay(
    result: &mut Diff,
    old: &Compiled,
    new: &Compiled,
    audit_log: &Path,
) -> io::Result<()> {
    let mut flows: BTreeMap<(String, String, String, u16), u64> = BTreeMap::new();
    for line in io::BufReader::new(std::fs::File::open(audit_log)?).lines() {
        let Ok(record) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        if record["kind"] != "flow_summary" {
            continue;
        }
        let text = |field: &str| record[field].as_str().unwrap_or_default().to_owned();
        let key = (
            text("src"),
            text("dst"),
            text("protocol"),
            record["port"].as_u64().unwrap_or(0) as u16,
        );
        *flows.entry(key).or_default() += record["count"].as_u64().unwrap_or(1);
    }
    for ((src, dst, protocol, port), seen) in flows {
        let number = match protocol.as_str() {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "icmp" => proto::ICMP,
            other => other.parse().unwrap_or(0),
        };
        let verdict = |compiled: &Compiled| {
            if compiled
                .evaluate(
                    &by_name(compiled, &src),
                    &by_name(compiled, &dst),
                    number,
                    port,
                )
                .action
                == action::ALLOW
            {
                "allow"
            } else {
                "deny"
            }
        };
        let (before, after) = (verdict(old), verdict(new));
        if before != after {
            let what = if port == 0 {
                protocol.clone()
            } else {
                format!("{port}/{protocol}")
            };
            result.replayed.push((src, dst, what, before, after, seen));
        }
    }
    Ok(())
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.services_added.is_empty()
            && self.services_removed.is_empty()
            && self.replayed.is_empty()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for ((src, dst), allowed) in &self.added {
            let _ = writeln!(out, "+ {src} -> {dst}: {}", describe(allowed));
        }
        for ((src, dst), allowed) in &self.removed {
            let _ = writeln!(out, "- {src} -> {dst}: {}", describe(allowed));
        }
        for ((src, dst), before, after) in &self.changed {
            let _ = writeln!(
                out,
                "~ {src} -> {dst}: {} => {}",
                describe(before),
                describe(after)
            );
        }
        for service in &self.services_added {
            let _ = writeln!(out, "+ service {service} (its traffic is now default-deny)");
        }
        for service in &self.services_removed {
            let _ = writeln!(
                out,
                "- service {service} (its traffic is no longer default-deny)"
            );
        }
        for (src, dst, what, _, after, seen) in &self.replayed {
            let change = if *after == "allow" {
                "newly allowed"
            } else {
                "newly denied"
            };
            let _ = writeln!(
                out,
                "! recorded {src} -> {dst} {what} ({seen} seen): {change}"
            );
        }
        if out.is_empty() {
            out.push_str("no differences\n");
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let edge = |(src, dst): &(String, String), allowed: &Allowed| json!({ "from": src, "to": dst, "allowed": allowed.iter().map(|(what, rule)| json!({ "traffic": what, "rule": rule })).collect::<Vec<_>>() });
        json!({
            "added": self.added.iter().map(|(key, allowed)| edge(key, allowed)).collect::<Vec<_>>(),
            "removed": self.removed.iter().map(|(key, allowed)| edge(key, allowed)).collect::<Vec<_>>(),
            "changed": self.changed.iter().map(|(key, before, after)| json!({ "before": edge(key, before), "after": edge(key, after) })).collect::<Vec<_>>(),
            "services_added": self.services_added,
            "services_removed": self.services_removed,
            "replayed": self.replayed.iter().map(|(src, dst, what, before, after, seen)| json!({ "from": src, "to": dst, "traffic": what, "before": before, "after": after, "seen": seen })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{
        compile::{HostView, compile},
        policy::parse_sources,
    };

    fn compiled(text: &str) -> Compiled {
        compile(
            &parse_sources(vec![(PathBuf::from("p.toml"), text.to_owned())]).unwrap(),
            &HostView::default(),
            None,
        )
        .unwrap()
    }

    const SERVICES: &str =
        "[[service]]\nname = \"a\"\n[[service]]\nname = \"b\"\n[[service]]\nname = \"c\"\n";

    #[test]
    fn edges_show_effective_ports_after_denies() {
        let policy = compiled(&format!(
            "{SERVICES}[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"8000-8100/tcp\", \"icmp\"]\nid = \"r\"\n[[deny]]\nfrom = \"a\"\nto = \"b\"\nports = [\"8050/tcp\"]\nid = \"d\"\n"
        ));
        let edges = edges(&policy);
        let allowed = &edges[&("a".to_owned(), "b".to_owned())];
        let what: Vec<&str> = allowed.iter().map(|(what, _)| what.as_str()).collect();
        assert_eq!(what, vec!["8000-8049/tcp", "8051-8100/tcp", "icmp"]);
    }

    #[test]
    fn added_removed_and_changed_edges() {
        let old = compiled(&format!(
            "{SERVICES}[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"80/tcp\"]\nid = \"ab\"\n[[allow]]\nfrom = \"b\"\nto = \"c\"\nports = [\"5432/tcp\"]\nid = \"bc\"\n"
        ));
        let new = compiled(&format!(
            "{SERVICES}[[allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"80/tcp\", \"443/tcp\"]\nid = \"ab\"\n[[allow]]\nfrom = \"a\"\nto = \"c\"\nports = [\"udp\"]\nid = \"ac\"\n"
        ));
        let result = diff(&old, &new);
        assert_eq!(
            result.to_text(),
            "+ a -> c: udp (ac)\n- b -> c: 5432/tcp (bc)\n~ a -> b: 80/tcp (ab) => 443/tcp (ab), 80/tcp (ab)\n"
        );
        assert!(diff(&old, &old).is_empty());
    }
}
