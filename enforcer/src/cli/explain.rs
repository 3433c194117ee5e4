//! `enforcer explain`: the verdict for a flow, and the rule that decides it.

use std::fmt::Write as _;

use enforcer_common::{
    identity::{HOST, IdentityInfo, WORLD},
    policy::{action, proto},
};

use crate::{
    compile::{self, Compiled},
    policy::{Peer, Policy, PortMatch, Protocol, ValueError},
};

#[derive(Debug, thiserror::Error)]
pub(super) enum ExplainError {
    #[error(transparent)]
    Peer(ValueError),
    #[error(transparent)]
    Port(ValueError),
    #[error("--port takes one port (e.g. 443/tcp) or icmp, not {0}")]
    NotOnePort(PortMatch),
}

/// The identity a peer written on the command line resolves to.
fn resolve_peer(
    policy: &Policy,
    compiled: &Compiled,
    text: &str,
) -> Result<IdentityInfo, ExplainError> {
    match policy.parse_peer(text).map_err(ExplainError::Peer)? {
        Peer::Service(index) => Ok(compiled
            .names
            .identity_info(policy.services[index].identity)),
        Peer::World => Ok(compiled.names.identity_info(WORLD)),
        Peer::Host => Ok(compiled.names.identity_info(HOST)),
        Peer::Cidr(net) => {
            let by_name = compiled
                .names
                .identities
                .values()
                .find(|(name, _)| *name == net.to_string())
                .map(|(_, info)| *info);
            Ok(by_name.unwrap_or_else(|| compiled.resolve_address(net.network())))
        }
    }
}

pub(super) fn explain(
    policy: &Policy,
    compiled: &Compiled,
    from: &str,
    to: &str,
    port: Option<&str>,
    json: bool,
) -> Result<String, ExplainError> {
    let src = resolve_peer(policy, compiled, from)?;
    let dst = resolve_peer(policy, compiled, to)?;
    let probes: Vec<(u8, u16, String)> = match port {
        Some(text) => match text.parse::<PortMatch>().map_err(ExplainError::Port)? {
            PortMatch::Port(protocol, number) => vec![(
                protocol.number(),
                number,
                format!("{number}/{}", protocol.as_str()),
            )],
            PortMatch::AnyPort(Protocol::Icmp) => vec![(proto::ICMP, 0, "icmp".to_owned())],
            other => return Err(ExplainError::NotOnePort(other)),
        },
        None => edge_probes(compiled, &src, &dst),
    };
    let mut out = String::new();
    let mut answers = Vec::new();
    for (protocol, number, label) in probes {
        let verdict = compiled.evaluate(&src, &dst, protocol, number);
        let allowed = verdict.action == action::ALLOW;
        let rule_id = compiled.names.rule_id(verdict.rule);
        let rule = compiled.names.rules.get(&verdict.rule);
        if json {
            answers.push(serde_json::json!({
                "from": compiled.names.identity_name(src.identity),
                "to": compiled.names.identity_name(dst.identity),
                "port": label,
                "verdict": if allowed { "allow" } else { "deny" },
                "rule": rule_id,
                "max_new_per_sec": verdict.max_new_per_sec,
            }));
            continue;
        }
        let _ = writeln!(
            out,
            "{} -> {} {label}: {} by {rule_id}",
            compiled.names.identity_name(src.identity),
            compiled.names.identity_name(dst.identity),
            if allowed { "allow" } else { "deny" },
        );
        match rule {
            Some(rule) => {
                let limit = rule
                    .max_new_per_sec
                    .map(|limit| format!(", at most {limit} new connections/s"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {} {} -> {} ports {}{limit}",
                    rule.kind.as_str(),
                    rule.from,
                    rule.to,
                    rule.ports
                );
            }
            None if !allowed => {
                let _ = writeln!(
                    out,
                    "  no rule allows it and a declared service is involved (default-deny)"
                );
            }
            None => {
                let _ = writeln!(out, "  neither side is a declared service (default-allow)");
            }
        }
    }
    if json {
        // `{:#}` is serde_json's pretty form, which cannot fail for a `Value`.
        out = format!("{:#}\n", serde_json::Value::Array(answers));
    }
    Ok(out)
}

/// One probe per distinct entry the compiled tables hold for this edge, plus a port no rule
/// names, so `explain` without `--port` shows everything that applies.
fn edge_probes(
    compiled: &Compiled,
    src: &IdentityInfo,
    dst: &IdentityInfo,
) -> Vec<(u8, u16, String)> {
    let mut probes = Vec::new();
    for key in compiled
        .tables
        .rules
        .keys()
        .filter(|key| key.src_identity == src.identity && key.dst_identity == dst.identity)
    {
        let label = match (key.proto, key.port) {
            (enforcer_common::policy::ANY_PROTO, _) => "any protocol".to_owned(),
            (protocol, 0) => compile::protocol_name(protocol),
            (protocol, port) => format!("{port}/{}", compile::protocol_name(protocol)),
        };
        probes.push((
            if key.proto == 0 {
                proto::UDP
            } else {
                key.proto
            },
            key.port,
            label,
        ));
    }
    for (key, ranges) in compiled
        .tables
        .ranges
        .iter()
        .filter(|(key, _)| key.src_identity == src.identity && key.dst_identity == dst.identity)
    {
        for range in &ranges.ranges[..ranges.count as usize] {
            probes.push((
                key.proto,
                range.lo,
                format!(
                    "{}-{}/{}",
                    range.lo,
                    range.hi,
                    compile::protocol_name(key.proto)
                ),
            ));
        }
    }
    probes.push((proto::TCP, 1, "other ports".to_owned()));
    probes
}
