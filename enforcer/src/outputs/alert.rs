//! Encoding records for a SIEM (DESIGN §7): OCSF 1.x by default, ECS for Elastic. One JSON
//! object per line; the same objects go to syslog.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::detect::{Detector, Finding};

mod flow;

pub use flow::{FlowMessage, flow_severity, write_flow_alert};

pub const OCSF_VERSION: &str = "1.3.0";
pub const ECS_VERSION: &str = "8.11.0";
const PRODUCT: &str = "enforcer";

/// OCSF `metadata.product`.
#[derive(serde::Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

const PRODUCT_FIELDS: Product = Product {
    name: PRODUCT,
    vendor_name: PRODUCT,
    version: env!("CARGO_PKG_VERSION"),
};

/// OCSF `device` (the `host` profile): this machine, a server.
#[derive(serde::Serialize)]
struct Device<'a> {
    hostname: &'a str,
    type_id: u8,
    #[serde(rename = "type")]
    kind: &'static str,
}

fn device(host: &str) -> Device<'_> {
    Device {
        hostname: host,
        type_id: 1,
        kind: "Server",
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AlertFormat {
    #[default]
    Ocsf,
    Ecs,
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let millis = millis(time);
    let secs = (millis / 1000) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        millis % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// This machine's name, for the `device`/`host` of every record.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn severity_name(id: u8) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        5 => "Critical",
        _ => "Unknown",
    }
}

/// The severity of a record in either format (OCSF `severity_id`, ECS `event.severity`, which
/// carry the same scale).
pub fn severity_of(record: &Value) -> u8 {
    record["severity_id"]
        .as_u64()
        .or_else(|| record["event"]["severity"].as_u64())
        .map_or(1, |severity| severity.min(6) as u8)
}

/// OCSF `metadata`. `profiles` names the profiles whose attributes the record uses: `host` for
/// `device`, `security_control` for `action`, `disposition` and `firewall_rule`; a validator
/// ignores (or refuses) those attributes otherwise.
fn ocsf_metadata(sequence: u64, profiles: &[&str]) -> Value {
    json!({
        "version": OCSF_VERSION,
        "product": PRODUCT_FIELDS,
        "profiles": profiles,
        "sequence": sequence,
    })
}

/// A detector's finding: OCSF Detection Finding (`class_uid` 2004), or an ECS alert.
pub fn finding_alert(finding: &Finding, format: AlertFormat, host: &str) -> Value {
    match format {
        AlertFormat::Ocsf => ocsf_finding(finding, host),
        AlertFormat::Ecs => ecs_finding(finding, host),
    }
}

/// An OCSF endpoint of a finding's party.
fn finding_endpoint(party: &crate::detect::Party, port: Option<u16>) -> Value {
    let mut endpoint = json!({ "svc_name": party.name });
    if let Some(ip) = party.ip {
        endpoint["ip"] = json!(ip.to_string());
    }
    if let Some(port) = port.filter(|port| *port != 0) {
        endpoint["port"] = json!(port);
    }
    endpoint
}

/// The flows a finding is about, as Detection Finding `evidences`: their source, and their
/// destination and protocol when there is one.
fn finding_evidence(finding: &Finding) -> Value {
    let mut evidence = json!({ "src_endpoint": finding_endpoint(&finding.src, None) });
    if let Some(dst) = &finding.dst {
        evidence["dst_endpoint"] = finding_endpoint(dst, finding.port);
    }
    if let Some(protocol) = &finding.protocol {
        // A finding names services, not identities: where the flows ran is not known here.
        evidence["connection_info"] =
            json!({ "protocol_name": protocol, "direction_id": 0, "direction": "Unknown" });
    }
    evidence
}

/// What the datapath did with the flows a detector reports: (action_id, action,
/// disposition_id, disposition) of the security_control profile.
fn finding_action(detector: Detector) -> (u8, &'static str, u8, &'static str) {
    match detector {
        // Allowed flows, reported because they are unusual.
        Detector::Spike | Detector::NewEdge => (1, "Allowed", 15, "Detected"),
        // Destinations reached and refused alike.
        Detector::Fanout => (0, "Unknown", 15, "Detected"),
        Detector::DenyBurst | Detector::RateLimit => (2, "Denied", 2, "Blocked"),
        Detector::Spoof => (2, "Denied", 6, "Dropped"),
        // Traffic through the interface passes unjudged.
        Detector::EnforcementGap => (1, "Allowed", 0, "Unknown"),
    }
}

fn ocsf_finding(finding: &Finding, host: &str) -> Value {
    let uid = finding_uid(finding);
    let (action_id, action, disposition_id, disposition) = finding_action(finding.detector);
    let mut alert = json!({
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_uid": 200_401,
        "type_name": "Detection Finding: Create",
        "time": millis(finding.end),
        "start_time": millis(finding.start),
        "end_time": millis(finding.end),
        "count": finding.count,
        "severity_id": finding.detector.severity_id(),
        "severity": severity_name(finding.detector.severity_id()),
        "status_id": 1,
        "status": "New",
        "message": finding.message,
        "finding_info": {
            "uid": uid,
            "title": format!("{}: {}", finding.detector.name(), finding.src.name),
            "desc": finding.message,
            "first_seen_time": millis(finding.start),
            "last_seen_time": millis(finding.end),
            "analytic": { "name": finding.detector.name(), "type_id": 1, "type": "Rule", "uid": finding.detector.name() },
        },
        "evidences": [finding_evidence(finding)],
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
        "device": device(host),
        "metadata": ocsf_metadata(0, &["host", "security_control"]),
        "unmapped": { "enforcer": { "detector": finding.detector.name(), "details": finding.details } },
    });
    if let Some(rule) = &finding.rule {
        alert["firewall_rule"] = json!({ "uid": rule, "name": rule });
    }
    alert
}

fn ecs_finding(finding: &Finding, host: &str) -> Value {
    let uid = finding_uid(finding);
    let mut alert = json!({
        "@timestamp": rfc3339(finding.end),
        "ecs": { "version": ECS_VERSION },
        "message": finding.message,
        "event": {
            "kind": "alert",
            "category": ["network", "intrusion_detection"],
            "type": ["info"],
            "action": finding.detector.name(),
            "severity": finding.detector.severity_id(),
            "start": rfc3339(finding.start),
            "end": rfc3339(finding.end),
            "id": uid,
            "module": PRODUCT,
            "dataset": "enforcer.finding",
        },
        "rule": { "name": finding.detector.name(), "ruleset": PRODUCT },
        "service": { "origin": { "name": finding.src.name } },
        "host": { "hostname": host },
        "enforcer": { "detector": finding.detector.name(), "count": finding.count, "details": finding.details, "policy_rule": finding.rule },
    });
    if let Some(ip) = finding.src.ip {
        alert["source"] = json!({ "ip": ip.to_string() });
    }
    if let Some(dst) = &finding.dst {
        alert["service"]["target"] = json!({ "name": dst.name });
        let mut destination = json!({});
        if let Some(ip) = dst.ip {
            destination["ip"] = json!(ip.to_string());
        }
        if let Some(port) = finding.port.filter(|port| *port != 0) {
            destination["port"] = json!(port);
        }
        alert["destination"] = destination;
    }
    if let Some(protocol) = &finding.protocol {
        alert["network"] = json!({ "transport": protocol });
    }
    alert
}

/// A stable id for a finding: the same finding reported twice has the same id.
fn finding_uid(finding: &Finding) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(finding.detector.name());
    hasher.update(&finding.src.name);
    hasher.update(finding.src.ip.map(|ip| ip.to_string()).unwrap_or_default());
    hasher.update(
        finding
            .dst
            .as_ref()
            .map(|dst| dst.name.as_str())
            .unwrap_or_default(),
    );
    hasher.update(finding.port.unwrap_or(0).to_be_bytes());
    hasher.update(millis(finding.start).to_be_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// What a heartbeat says: enough for a SIEM to notice a silent unload, a swapped program or an
/// audit log cut at its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub policy_sha256: String,
    pub generation: u32,
    /// Tags of the programs the attached links run, by link.
    pub programs: std::collections::BTreeMap<String, String>,
    /// Tags this build's programs have; a link running another tag runs someone else's code.
    pub expected_programs: std::collections::BTreeMap<String, String>,
    pub audit_chain_head: Option<String>,
    pub interval_secs: u64,
    /// Each interface named, and whether it is `enforced`, `missing` or `defunct`.
    pub interfaces: std::collections::BTreeMap<String, String>,
    /// Whether the fleet's etcd answers; `None` without `--kvstore`.
    pub kvstore_connected: Option<bool>,
}

/// The heartbeat record: OCSF Application Lifecycle (`class_uid` 6002), or ECS state.
pub fn heartbeat_alert(
    heartbeat: &Heartbeat,
    at: SystemTime,
    format: AlertFormat,
    host: &str,
) -> Value {
    let state = json!({
        "policy_sha256": heartbeat.policy_sha256,
        "generation": heartbeat.generation,
        "programs": heartbeat.programs,
        "expected_programs": heartbeat.expected_programs,
        "interfaces": heartbeat.interfaces,
        "kvstore_connected": heartbeat.kvstore_connected,
        "audit_chain_head": heartbeat.audit_chain_head,
        "interval_secs": heartbeat.interval_secs,
    });
    match format {
        AlertFormat::Ocsf => json!({
            "class_uid": 6002,
            "class_name": "Application Lifecycle",
            "category_uid": 6,
            "category_name": "Application Activity",
            "activity_id": 99,
            "activity_name": "Heartbeat",
            "type_uid": 600_299,
            "type_name": "Application Lifecycle: Other",
            "time": millis(at),
            "severity_id": 1,
            "severity": "Informational",
            "message": format!("enforcing generation {} of policy {}", heartbeat.generation, heartbeat.policy_sha256),
            "app": { "name": PRODUCT, "vendor_name": PRODUCT, "version": env!("CARGO_PKG_VERSION") },
            "device": device(host),
            "metadata": ocsf_metadata(0, &["host"]),
            "unmapped": { "enforcer": state },
        }),
        AlertFormat::Ecs => json!({
            "@timestamp": rfc3339(at),
            "ecs": { "version": ECS_VERSION },
            "message": format!("enforcing generation {} of policy {}", heartbeat.generation, heartbeat.policy_sha256),
            "event": { "kind": "state", "category": ["configuration"], "type": ["info"], "action": "heartbeat", "severity": 1, "module": PRODUCT, "dataset": "enforcer.heartbeat" },
            "host": { "hostname": host },
            "enforcer": state,
        }),
    }
}

/// A record saying that `count` flow records never reached the controller.
pub fn lost_events_alert(count: u64, at: SystemTime, format: AlertFormat, host: &str) -> Value {
    let message = format!(
        "{count} flow records were lost between the kernel and the controller (ring buffer full)"
    );
    match format {
        // Event Log Activity: the records about the event logging itself.
        AlertFormat::Ocsf => json!({
            "class_uid": 1008,
            "class_name": "Event Log Activity",
            "category_uid": 1,
            "category_name": "System Activity",
            "activity_id": 99,
            "activity_name": "Events Lost",
            "type_uid": 100_899,
            "type_name": "Event Log Activity: Other",
            "time": millis(at),
            "count": count,
            "severity_id": 3,
            "severity": "Medium",
            "status_id": 2,
            "status": "Failure",
            "status_detail": "ring buffer full",
            "message": message,
            "log_name": "flow records",
            "log_provider": PRODUCT,
            "device": device(host),
            "metadata": ocsf_metadata(0, &["host"]),
            "unmapped": { "enforcer": { "events_lost": count } },
        }),
        AlertFormat::Ecs => json!({
            "@timestamp": rfc3339(at),
            "ecs": { "version": ECS_VERSION },
            "message": message,
            "event": { "kind": "pipeline_error", "category": ["network"], "type": ["info"], "action": "events-lost", "severity": 3, "module": PRODUCT, "dataset": "enforcer.flow" },
            "host": { "hostname": host },
            "enforcer": { "events_lost": count },
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use super::*;
    use enforcer_common::verdict::{Reason, Verdict};

    use crate::events::{FlowEnd, FlowRecord};

    fn flow_line(record: &FlowRecord, format: AlertFormat, host: &str) -> String {
        let mut line = String::new();
        write_flow_alert(&mut line, record, format, host);
        line
    }

    fn flow_value(record: &FlowRecord, format: AlertFormat, host: &str) -> Value {
        serde_json::from_str(&flow_line(record, format, host)).expect("a flow alert is JSON")
    }

    fn record(verdict: Verdict, reason: Reason, rule: &str) -> FlowRecord {
        FlowRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            verdict,
            reason,
            rule: rule.to_owned(),
            src: FlowEnd {
                ip: "10.10.0.2".parse::<IpAddr>().unwrap(),
                port: 40000,
                identity: 1001,
                name: "frontend".to_owned(),
            },
            dst: FlowEnd {
                ip: "10.10.2.2".parse::<IpAddr>().unwrap(),
                port: 5432,
                identity: 1003,
                name: "db".to_owned(),
            },
            address_identity: 1001,
            protocol: "tcp".to_owned(),
            protocol_number: 6,
            ip_version: 4,
            generation: 3,
            interface: "veth-fe".to_owned(),
            hook: "xdp-ingress",
            count: 4,
            rejudged: false,
            aggregated: false,
            cgroup_id: 0,
            cpu: 1,
            sequence: 99,
        }
    }

    #[test]
    fn denied_flow_is_ocsf_network_activity_with_action_denied() {
        let alert = flow_value(
            &record(Verdict::Deny, Reason::DefaultDeny, "default-deny"),
            AlertFormat::Ocsf,
            "node-1",
        );
        assert_eq!(alert["class_uid"], 4001);
        assert_eq!(alert["activity_id"], 5);
        assert_eq!(alert["type_uid"], 400_105);
        assert_eq!(alert["action_id"], 2);
        assert_eq!(alert["disposition_id"], 2);
        assert_eq!(alert["src_endpoint"]["svc_name"], "frontend");
        assert_eq!(alert["dst_endpoint"]["svc_name"], "db");
        assert_eq!(alert["dst_endpoint"]["port"], 5432);
        assert_eq!(alert["firewall_rule"]["uid"], "default-deny");
        assert_eq!(alert["count"], 4);
        assert_eq!(alert["time"], 1_700_000_000_123u64);
        assert_eq!(alert["start_time"], alert["end_time"]);
        assert_eq!(
            alert["message"],
            "frontend -> db 5432/tcp denied by default-deny [default_deny] (4 packets)"
        );
    }

    /// The message reads the same in both formats and in a log line, whatever it covers.
    #[test]
    fn a_flows_message_says_what_it_covers() {
        let mut scan = record(Verdict::Deny, Reason::DefaultDeny, "default-deny");
        (scan.aggregated, scan.count) = (true, 5000);
        let mut icmp = record(Verdict::Allow, Reason::Related, "r");
        (icmp.protocol, icmp.count) = ("icmp".to_owned(), 1);
        let mut revoked = record(Verdict::Deny, Reason::DefaultDeny, "default-deny");
        (revoked.rejudged, revoked.count, revoked.src.name) = (true, 1, "front\"end".to_owned());
        let audited = record(Verdict::Audit, Reason::PolicyDeny, "no-db");
        let expected = [
            (
                &scan,
                "frontend -> any destination denied by default-deny [default_deny] (5000 packets), \
                 aggregated per source under load (one was db 5432/tcp)",
            ),
            (&icmp, "frontend -> db icmp allowed by r [related]"),
            (
                &revoked,
                "front\"end -> db 5432/tcp cut off by default-deny [default_deny]",
            ),
            (
                &audited,
                "frontend -> db 5432/tcp would be denied (audit) by no-db [policy_deny] (4 packets)",
            ),
        ];
        for (flow, message) in expected {
            assert_eq!(flow::FlowMessage(flow).to_string(), message);
            for format in [AlertFormat::Ocsf, AlertFormat::Ecs] {
                assert_eq!(flow_value(flow, format, "h")["message"], message);
            }
        }
    }

    #[test]
    fn allowed_audited_spoofed_and_revoked_flows_classify_distinctly() {
        let allowed = flow_value(
            &record(Verdict::Allow, Reason::PolicyAllow, "fe-to-db"),
            AlertFormat::Ocsf,
            "h",
        );
        assert_eq!(
            (
                allowed["activity_id"].as_u64(),
                allowed["action_id"].as_u64(),
                allowed["disposition_id"].as_u64()
            ),
            (Some(1), Some(1), Some(1))
        );
        let audited = flow_value(
            &record(Verdict::Audit, Reason::DefaultDeny, "default-deny"),
            AlertFormat::Ocsf,
            "h",
        );
        assert_eq!(
            (
                audited["action_id"].as_u64(),
                audited["disposition_id"].as_u64()
            ),
            (Some(1), Some(15))
        );
        let spoofed = flow_value(
            &record(Verdict::Deny, Reason::Spoofed, "anti-spoofing"),
            AlertFormat::Ocsf,
            "h",
        );
        assert_eq!(
            (
                spoofed["severity_id"].as_u64(),
                spoofed["disposition_id"].as_u64()
            ),
            (Some(4), Some(6))
        );
        let mut revoked = record(Verdict::Deny, Reason::DefaultDeny, "default-deny");
        revoked.rejudged = true;
        let revoked = flow_value(&revoked, AlertFormat::Ocsf, "h");
        assert_eq!(
            (
                revoked["activity_id"].as_u64(),
                revoked["disposition_id"].as_u64()
            ),
            (Some(3), Some(24))
        );
    }

    #[test]
    fn ecs_flow_uses_ecs_field_names() {
        let alert = flow_value(
            &record(Verdict::Deny, Reason::PolicyDeny, "no-db"),
            AlertFormat::Ecs,
            "node-1",
        );
        assert_eq!(alert["@timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(alert["event"]["category"][0], "network");
        assert_eq!(alert["event"]["outcome"], "failure");
        assert_eq!(alert["source"]["ip"], "10.10.0.2");
        assert_eq!(alert["destination"]["port"], 5432);
        assert_eq!(alert["service"]["target"]["name"], "db");
        assert_eq!(alert["network"]["transport"], "tcp");
        assert_eq!(alert["rule"]["id"], "no-db");
    }

    #[test]
    fn a_record_has_the_same_severity_in_both_formats() {
        for (verdict, reason) in [
            (Verdict::Allow, Reason::PolicyAllow),
            (Verdict::Deny, Reason::PolicyDeny),
            (Verdict::Deny, Reason::Spoofed),
        ] {
            let flow = record(verdict, reason, "r");
            let [ocsf, ecs] = [AlertFormat::Ocsf, AlertFormat::Ecs]
                .map(|format| severity_of(&flow_value(&flow, format, "node-1")));
            assert_eq!(ocsf, ecs, "{reason}");
        }
        assert_eq!(
            severity_of(&flow_value(
                &record(Verdict::Deny, Reason::Spoofed, "r"),
                AlertFormat::Ecs,
                "n"
            )),
            4
        );
        let lost = [AlertFormat::Ocsf, AlertFormat::Ecs]
            .map(|format| severity_of(&lost_events_alert(3, UNIX_EPOCH, format, "n")));
        assert_eq!(lost, [3, 3]);
    }

    fn spike() -> Finding {
        Finding {
            detector: crate::detect::Detector::Spike,
            src: crate::detect::Party {
                name: "frontend".to_owned(),
                ip: None,
            },
            dst: Some(crate::detect::Party {
                name: "api".to_owned(),
                ip: None,
            }),
            protocol: Some("tcp".to_owned()),
            port: Some(8080),
            rule: Some("fe-api".to_owned()),
            count: 60,
            start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            end: UNIX_EPOCH + Duration::from_secs(1_700_000_010),
            message: "frontend -> api 8080/tcp: 60 new connections".to_owned(),
            details: serde_json::json!({ "z": 11.0 }),
        }
    }

    #[test]
    fn findings_are_ocsf_detection_findings_with_the_contract_fields() {
        let alert = finding_alert(&spike(), AlertFormat::Ocsf, "node-1");
        assert_eq!(alert["class_uid"], 2004);
        assert_eq!(alert["finding_info"]["analytic"]["name"], "spike");
        let evidence = &alert["evidences"][0];
        assert_eq!(evidence["src_endpoint"]["svc_name"], "frontend");
        assert_eq!(evidence["dst_endpoint"]["svc_name"], "api");
        assert_eq!(evidence["dst_endpoint"]["port"], 8080);
        assert_eq!(alert["firewall_rule"]["uid"], "fe-api");
        assert_eq!(
            (
                alert["count"].as_u64(),
                alert["start_time"].as_u64(),
                alert["end_time"].as_u64()
            ),
            (Some(60), Some(1_700_000_000_000), Some(1_700_000_010_000))
        );
        assert_eq!(
            alert["finding_info"]["uid"],
            finding_alert(&spike(), AlertFormat::Ocsf, "other")["finding_info"]["uid"],
            "stable ids"
        );
        let ecs = finding_alert(&spike(), AlertFormat::Ecs, "node-1");
        assert_eq!(
            (
                ecs["event"]["kind"].as_str(),
                ecs["rule"]["name"].as_str(),
                ecs["service"]["target"]["name"].as_str()
            ),
            (Some("alert"), Some("spike"), Some("api"))
        );
    }

    #[test]
    fn heartbeat_carries_what_a_siem_checks() {
        let heartbeat = Heartbeat {
            policy_sha256: "ab".repeat(32),
            generation: 7,
            programs: [("xdp-eth1".to_owned(), "1234".to_owned())].into(),
            expected_programs: [("enf_xdp_ingress".to_owned(), "1234".to_owned())].into(),
            audit_chain_head: Some("cd".repeat(32)),
            interval_secs: 10,
            interfaces: [("eth1".to_owned(), "defunct".to_owned())].into(),
            kvstore_connected: None,
        };
        let alert = heartbeat_alert(&heartbeat, UNIX_EPOCH, AlertFormat::Ocsf, "h");
        assert_eq!(alert["activity_name"], "Heartbeat");
        assert_eq!(alert["unmapped"]["enforcer"]["generation"], 7);
        assert_eq!(
            alert["unmapped"]["enforcer"]["interfaces"]["eth1"],
            "defunct"
        );
        assert_eq!(
            alert["unmapped"]["enforcer"]["programs"]["xdp-eth1"],
            "1234"
        );
        assert_eq!(
            alert["unmapped"]["enforcer"]["audit_chain_head"],
            "cd".repeat(32)
        );
    }

    #[test]
    fn lost_events_are_a_record_of_their_own() {
        let alert = lost_events_alert(12, UNIX_EPOCH, AlertFormat::Ocsf, "h");
        assert_eq!(alert["count"], 12);
        assert_eq!(alert["activity_name"], "Events Lost");
    }

    /// Runs the project's OCSF 1.3.0 / ECS 8.11 validator (`tests/siem`) on `records`, in both
    /// formats each; fails with its report on any error or warning.
    fn assert_conform(kind: &str, records: impl Fn(AlertFormat) -> Vec<Value>) {
        assert_lines_conform(kind, |format| {
            records(format).iter().map(Value::to_string).collect()
        });
    }

    /// Validates the lines as they would be written, against the official schemas.
    fn assert_lines_conform(kind: &str, lines: impl Fn(AlertFormat) -> Vec<String>) {
        for format in [AlertFormat::Ocsf, AlertFormat::Ecs] {
            let file = crate::ScratchFile::new(&format!("{kind}-{format:?}.jsonl"));
            std::fs::write(&file.0, lines(format).join("\n") + "\n").unwrap();
            enforcer_testbed::assert_conform(&file.0);
        }
    }

    /// Parses a JSON line, refusing an object that names a field twice (a JSON tree keeps the
    /// last one silently, so a field written twice by mistake would pass the other checks).
    fn assert_no_field_repeated(line: &str) {
        use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

        struct Checked;
        impl<'de> serde::Deserialize<'de> for Checked {
            fn deserialize<D: Deserializer<'de>>(from: D) -> Result<Self, D::Error> {
                from.deserialize_any(CheckedVisitor)
            }
        }
        struct CheckedVisitor;
        impl<'de> Visitor<'de> for CheckedVisitor {
            type Value = Checked;
            fn expecting(&self, out: &mut std::fmt::Formatter) -> std::fmt::Result {
                out.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!("field {name:?} repeated")));
                    }
                    map.next_value::<Checked>()?;
                }
                Ok(Checked)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_unit<E>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
        }
        if let Err(error) = serde_json::from_str::<Checked>(line) {
            panic!("{error} in {line}");
        }
    }

    /// A flow of every verdict and reason, re-judged ones, aggregated ones, every direction,
    /// every protocol, every hook's name.
    fn every_flow() -> Vec<FlowRecord> {
        let mut flows = Vec::new();
        for reason in Reason::ALL {
            for verdict in [Verdict::Allow, Verdict::Deny, Verdict::Audit] {
                let mut flow = record(verdict, reason, "r");
                flows.push(flow.clone());
                flow.rejudged = true;
                flows.push(flow);
            }
        }
        let mut icmpv6 = record(Verdict::Deny, Reason::DefaultDeny, "default-deny");
        (icmpv6.protocol, icmpv6.protocol_number, icmpv6.ip_version) = ("icmp".to_owned(), 58, 6);
        icmpv6.src.ip = "fd00::2".parse().unwrap();
        icmpv6.dst.ip = "fd00::3".parse().unwrap();
        let mut inbound = record(Verdict::Allow, Reason::PolicyAllow, "world-to-web");
        (inbound.src.identity, inbound.src.name) =
            (enforcer_common::identity::WORLD, "world".to_owned());
        let mut outbound = record(Verdict::Deny, Reason::PolicyDeny, "no-office");
        (outbound.dst.identity, outbound.dst.name) = (1 << 24, "192.0.2.0/24".to_owned());
        let mut scan = record(Verdict::Deny, Reason::DefaultDeny, "default-deny");
        (scan.aggregated, scan.count) = (true, 5000);
        let mut icmp = record(Verdict::Allow, Reason::Related, "r");
        (
            icmp.protocol,
            icmp.protocol_number,
            icmp.src.port,
            icmp.dst.port,
        ) = ("icmp".to_owned(), 1, 0, 0);
        for hook in ["tc-ingress", "tc-egress", "socket-ingress"] {
            let mut flow = record(Verdict::Allow, Reason::PolicyAllow, "r");
            flow.hook = hook;
            flows.insert(0, flow);
        }
        flows.extend([scan, icmpv6, inbound, outbound, icmp]);
        flows
    }

    #[test]
    fn flows_of_every_verdict_and_reason_conform_to_ocsf_and_ecs() {
        assert_lines_conform("flows", |format| {
            every_flow()
                .iter()
                .map(|flow| flow_line(flow, format, "node-1"))
                .collect()
        });
        let flows = every_flow();
        let scan = flow_value(&flows[flows.len() - 5], AlertFormat::Ocsf, "h");
        assert_eq!(scan["unmapped"]["enforcer"]["aggregated"], true);
        assert!(
            scan["message"]
                .as_str()
                .is_some_and(|message| message.contains("any destination")),
            "{scan}"
        );
        let icmpv6 = flow_value(&flows[flows.len() - 4], AlertFormat::Ocsf, "h");
        assert_eq!(icmpv6["connection_info"]["protocol_name"], "ipv6-icmp");
        let directions: Vec<Value> = flows[flows.len() - 3..flows.len() - 1]
            .iter()
            .map(|flow| {
                flow_value(flow, AlertFormat::Ocsf, "h")["connection_info"]["direction_id"].clone()
            })
            .collect();
        assert_eq!(directions, [1, 2], "inbound from world, outbound to a CIDR");
        let lateral = flow_value(
            &record(Verdict::Allow, Reason::PolicyAllow, "r"),
            AlertFormat::Ocsf,
            "h",
        );
        assert_eq!(lateral["connection_info"]["direction_id"], 3);
        assert_eq!(lateral["firewall_rule"]["uid"], "r");
        let ecs = flow_value(&flows[flows.len() - 4], AlertFormat::Ecs, "h");
        assert_eq!(ecs["network"]["transport"], "ipv6-icmp");
    }

    #[test]
    fn flows_name_the_product_as_the_other_records_do() {
        assert_eq!(
            flow::OCSF_PRODUCT,
            serde_json::to_string(&PRODUCT_FIELDS).unwrap()
        );
        let flow = record(Verdict::Deny, Reason::DefaultDeny, "default-deny");
        let ecs = flow_value(&flow, AlertFormat::Ecs, "h");
        assert_eq!(ecs["event"]["module"], PRODUCT);
        assert_eq!(ecs["observer"]["product"], PRODUCT);
        assert_eq!(ecs["ecs"]["version"], ECS_VERSION);
        let ocsf = flow_value(&flow, AlertFormat::Ocsf, "h");
        assert_eq!(ocsf["metadata"]["version"], OCSF_VERSION);
    }

    /// Flow lines are written by hand (see `outputs::json_line`): each must be one JSON object
    /// with every field once, whatever its names and interface hold.
    #[test]
    fn flow_lines_are_json_with_every_field_once_and_names_escaped() {
        let mut flows = every_flow();
        for flow in &mut flows {
            flow.src.name = "quote\" backslash\\ tab\t é".to_owned();
            flow.rule = "line\nfeed \u{1}".to_owned();
            flow.interface = "v\"eth".to_owned();
        }
        for format in [AlertFormat::Ocsf, AlertFormat::Ecs] {
            for flow in &flows {
                let line = flow_line(flow, format, "host \"quoted\"");
                assert_no_field_repeated(&line);
                let value: Value = serde_json::from_str(&line).unwrap();
                let message = value["message"].as_str().unwrap();
                assert!(message.starts_with(&flow.src.name), "{line}");
                assert!(!line.contains('\n'), "one line: {line}");
            }
        }
        assert_no_field_repeated(r#"{"a":{"b":1,"c":[{"d":2}]}}"#);
        let repeated =
            std::panic::catch_unwind(|| assert_no_field_repeated(r#"{"a":{"b":1,"b":2}}"#));
        assert!(repeated.is_err(), "the check sees a repeated field");
    }

    #[test]
    fn findings_of_every_detector_conform_to_ocsf_and_ecs() {
        let findings: Vec<Finding> = [
            Detector::Spike,
            Detector::NewEdge,
            Detector::Fanout,
            Detector::DenyBurst,
            Detector::Spoof,
            Detector::RateLimit,
            Detector::EnforcementGap,
        ]
        .into_iter()
        .map(|detector| {
            let mut finding = spike();
            finding.detector = detector;
            if matches!(
                detector,
                Detector::Fanout | Detector::DenyBurst | Detector::EnforcementGap
            ) {
                (finding.dst, finding.protocol, finding.port) = (None, None, None);
                finding.src.ip = Some("10.10.0.2".parse().unwrap());
            }
            if matches!(detector, Detector::Fanout | Detector::EnforcementGap) {
                finding.rule = None;
            }
            finding
        })
        .collect();
        assert_conform("findings", |format| {
            findings
                .iter()
                .map(|finding| finding_alert(finding, format, "node-1"))
                .collect()
        });
    }

    #[test]
    fn heartbeats_conform_to_ocsf_and_ecs() {
        let heartbeat = Heartbeat {
            policy_sha256: "ab".repeat(32),
            generation: 7,
            programs: [("xdp-eth1".to_owned(), "1234".to_owned())].into(),
            expected_programs: [("enf_xdp_ingress".to_owned(), "1234".to_owned())].into(),
            audit_chain_head: None,
            interval_secs: 10,
            interfaces: [("eth1".to_owned(), "enforced".to_owned())].into(),
            kvstore_connected: Some(false),
        };
        assert_conform("heartbeats", |format| {
            vec![heartbeat_alert(
                &heartbeat,
                UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                format,
                "node-1",
            )]
        });
    }

    #[test]
    fn loss_reports_conform_to_ocsf_and_ecs() {
        assert_conform("losses", |format| {
            vec![lost_events_alert(
                12,
                UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                format,
                "node-1",
            )]
        });
        let ocsf = lost_events_alert(12, UNIX_EPOCH, AlertFormat::Ocsf, "h");
        assert_eq!(
            (ocsf["class_uid"].as_u64(), ocsf["count"].as_u64()),
            (Some(1008), Some(12))
        );
    }

    #[test]
    fn civil_dates_are_right_around_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
