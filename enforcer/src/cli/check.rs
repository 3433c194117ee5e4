//! `enforcer check`: a policy's services, identities and rule counts.

use std::fmt::Write as _;

use crate::{
    compile::Compiled,
    policy::{Policy, RuleKind, Service},
};

pub(super) fn report(policy: &Policy, compiled: &Compiled) -> String {
    let mut out = String::new();
    let files: Vec<String> = policy
        .files
        .iter()
        .map(|file| file.display().to_string())
        .collect();
    let _ = writeln!(out, "policy {} is valid", files.join(", "));
    let _ = writeln!(out, "sha256 {}", policy.hash_hex());
    let _ = writeln!(
        out,
        "mode {}, manage_host {}",
        policy.mode.as_str(),
        policy.manage_host
    );
    let _ = writeln!(out, "\n{} services:", policy.services.len());
    let _ = writeln!(
        out,
        "  {:<20} {:>10}  {:<8} {:<8} MEMBERS",
        "NAME", "IDENTITY", "FROM", "MODE"
    );
    for service in &policy.services {
        let _ = writeln!(out, "  {}", service_line(policy, service));
    }
    let allows = policy
        .rules
        .iter()
        .filter(|rule| rule.kind == RuleKind::Allow)
        .count();
    let limited = policy
        .rules
        .iter()
        .filter(|rule| rule.max_new_per_sec.is_some())
        .count();
    let _ = writeln!(
        out,
        "\n{} rules: {allows} allow ({limited} rate-limited), {} deny",
        policy.rules.len(),
        policy.rules.len() - allows
    );
    let entries: Vec<String> = compiled
        .tables
        .entry_counts()
        .iter()
        .map(|(table, count)| format!("{table} {count}"))
        .collect();
    let _ = writeln!(
        out,
        "compiled entries: {} (interfaces and cgroups resolve when `run` starts)",
        entries.join(", ")
    );
    out
}

/// A service's row: name, identity and where it comes from, mode, members.
fn service_line(policy: &Policy, service: &Service) -> String {
    let mut members: Vec<String> = service.addresses.iter().map(ToString::to_string).collect();
    members.extend(
        service
            .interfaces
            .iter()
            .map(|name| format!("iface:{name}")),
    );
    members.extend(
        service
            .cgroups
            .iter()
            .map(|path| format!("cgroup:{}", path.display())),
    );
    format!(
        "{:<20} {:>10}  {:<8} {:<8} {}",
        service.name,
        service.identity,
        if service.identity_declared {
            "declared"
        } else {
            "hashed"
        },
        policy.service_mode(service).as_str(),
        if members.is_empty() {
            "-".to_owned()
        } else {
            members.join(" ")
        }
    )
}
