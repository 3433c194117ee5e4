//! A flow record as a SIEM record, typed: every record the datapath sends becomes one, so it
//! is written straight from the record's fields, with no JSON tree built and dropped for each
//! (`cargo xtask bench`'s `pipeline` figure).

use std::{borrow::Cow, fmt, net::IpAddr};

use enforcer_common::verdict::{Reason, Verdict};
use serde::{Serialize, Serializer};

use super::{
    AlertFormat, Device, ECS_VERSION, OCSF_VERSION, PRODUCT, PRODUCT_FIELDS, Product, device,
    millis, rfc3339, severity_name,
};
use crate::events::FlowRecord;

/// A flow record as a SIEM record in the chosen format.
#[derive(Serialize)]
#[serde(untagged)]
pub enum FlowAlert<'a> {
    Ocsf(OcsfFlow<'a>),
    Ecs(EcsFlow<'a>),
}

impl FlowAlert<'_> {
    /// Its severity on the OCSF scale (ECS `event.severity` carries the same).
    pub fn severity(&self) -> u8 {
        match self {
            Self::Ocsf(flow) => flow.severity_id,
            Self::Ecs(flow) => flow.event.severity,
        }
    }
}

/// A flow record as a SIEM record.
pub fn flow_alert<'a>(record: &'a FlowRecord, format: AlertFormat, host: &'a str) -> FlowAlert<'a> {
    match format {
        AlertFormat::Ocsf => FlowAlert::Ocsf(ocsf_flow(record, host)),
        AlertFormat::Ecs => FlowAlert::Ecs(ecs_flow(record, host)),
    }
}

/// How a flow outcome reads in OCSF Network Activity terms.
struct Classification {
    activity_id: u8,
    activity: &'static str,
    action_id: u8,
    action: &'static str,
    disposition_id: u8,
    disposition: &'static str,
    severity_id: u8,
}

fn classify(record: &FlowRecord) -> Classification {
    let (severity_id, disposition_id, disposition) = match record.reason {
        reason if reason.is_spoof() => (4, 6, "Dropped"),
        Reason::RateLimited => (3, 6, "Dropped"),
        Reason::NoConnection => (2, 6, "Dropped"),
        Reason::ForgedIcmpError => (4, 6, "Dropped"),
        reason if reason.is_malformed() => (3, 6, "Dropped"),
        _ if record.rejudged => (3, 24, "Access Revoked"),
        _ => (2, 2, "Blocked"),
    };
    match record.verdict {
        Verdict::Allow => Classification {
            activity_id: 1,
            activity: "Open",
            action_id: 1,
            action: "Allowed",
            disposition_id: 1,
            disposition: "Allowed",
            severity_id: 1,
        },
        // Audit: policy would have dropped it, and it passed: detected, not blocked.
        Verdict::Audit => Classification {
            activity_id: 1,
            activity: "Open",
            action_id: 1,
            action: "Allowed",
            disposition_id: 15,
            disposition: "Detected",
            severity_id,
        },
        Verdict::Deny => Classification {
            activity_id: if record.rejudged { 3 } else { 5 },
            activity: if record.rejudged { "Reset" } else { "Refuse" },
            action_id: 2,
            action: "Denied",
            disposition_id,
            disposition,
            severity_id,
        },
    }
}

/// The line a person reads about a flow, written where it is needed rather than built first.
pub struct FlowMessage<'a>(pub &'a FlowRecord);

struct PortText<'a>(&'a FlowRecord);

impl fmt::Display for PortText<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let record = self.0;
        if record.has_ports() {
            write!(out, "{}/{}", record.dst.port, record.protocol)
        } else {
            out.write_str(&record.protocol)
        }
    }
}

impl fmt::Display for FlowMessage<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let record = self.0;
        let outcome = match record.verdict {
            Verdict::Allow => "allowed",
            Verdict::Deny if record.rejudged => "cut off",
            Verdict::Deny => "denied",
            Verdict::Audit => "would be denied (audit)",
        };
        let (src, rule, reason) = (&record.src.name, &record.rule, record.reason);
        if record.aggregated {
            write!(
                out,
                "{src} -> any destination {outcome} by {rule} [{reason}]"
            )?;
        } else {
            write!(
                out,
                "{src} -> {} {} {outcome} by {rule} [{reason}]",
                record.dst.name,
                PortText(record)
            )?;
        }
        if record.count > 1 {
            write!(out, " ({} packets)", record.count)?;
        }
        if record.aggregated {
            write!(
                out,
                ", aggregated per source under load (one was {} {})",
                record.dst.name,
                PortText(record)
            )?;
        }
        Ok(())
    }
}

impl Serialize for FlowMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The IANA keyword of a protocol number, as OCSF `protocol_name` and ECS `network.transport`
/// take it (ICMPv6 is `ipv6-icmp`, not the policy language's `icmp`).
fn iana_protocol_name(number: u8) -> Cow<'static, str> {
    match number {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "ipv6-icmp".into(),
        other => other.to_string().into(),
    }
}

/// OCSF `direction_id` of a flow: between services or this host, Lateral; from outside to
/// them, Inbound; from them to outside, Outbound (CIDR peers and world are outside).
fn direction_of(record: &FlowRecord) -> (u8, &'static str) {
    use enforcer_common::identity::{FIRST_SERVICE, HOST, SERVICE_END};
    let inside =
        |identity: u32| identity == HOST || (FIRST_SERVICE..SERVICE_END).contains(&identity);
    match (inside(record.src.identity), inside(record.dst.identity)) {
        (true, true) => (3, "Lateral"),
        (false, true) => (1, "Inbound"),
        (true, false) => (2, "Outbound"),
        (false, false) => (0, "Unknown"),
    }
}

/// OCSF 1.3 Network Activity (`class_uid` 4001) with the `host` and `security_control`
/// profiles.
#[derive(Serialize)]
pub struct OcsfFlow<'a> {
    class_uid: u16,
    class_name: &'static str,
    category_uid: u8,
    category_name: &'static str,
    activity_id: u8,
    activity_name: &'static str,
    type_uid: u32,
    type_name: &'static str,
    time: u64,
    start_time: u64,
    end_time: u64,
    count: u32,
    severity_id: u8,
    severity: &'static str,
    action_id: u8,
    action: &'static str,
    disposition_id: u8,
    disposition: &'static str,
    message: FlowMessage<'a>,
    src_endpoint: OcsfEndpoint<'a>,
    dst_endpoint: OcsfEndpoint<'a>,
    connection_info: ConnectionInfo,
    firewall_rule: NamedId<'a>,
    device: Device<'a>,
    metadata: OcsfMetadata,
    unmapped: Unmapped<'a>,
}

#[derive(Serialize)]
struct OcsfEndpoint<'a> {
    ip: IpAddr,
    port: u16,
    svc_name: &'a str,
}

#[derive(Serialize)]
struct ConnectionInfo {
    protocol_num: u8,
    protocol_name: Cow<'static, str>,
    protocol_ver_id: u8,
    direction_id: u8,
    direction: &'static str,
}

#[derive(Serialize)]
struct NamedId<'a> {
    uid: &'a str,
    name: &'a str,
}

/// OCSF `metadata` of a flow: the `host` profile for `device`, `security_control` for
/// `action`, `disposition` and `firewall_rule` (a validator ignores or refuses them otherwise).
#[derive(Serialize)]
struct OcsfMetadata {
    version: &'static str,
    product: Product,
    profiles: [&'static str; 2],
    sequence: u64,
}

#[derive(Serialize)]
struct Unmapped<'a> {
    enforcer: EnforcerFields<'a>,
}

#[derive(Serialize)]
struct EnforcerFields<'a> {
    verdict: &'static str,
    reason: &'static str,
    generation: u32,
    hook: &'static str,
    interface: &'a str,
    src_identity: u32,
    dst_identity: u32,
    address_identity: u32,
    rejudged: bool,
    aggregated: bool,
    cgroup_id: u64,
    cpu: u32,
}

fn ocsf_type_name(activity_id: u8) -> &'static str {
    match activity_id {
        1 => "Network Activity: Open",
        3 => "Network Activity: Reset",
        _ => "Network Activity: Refuse",
    }
}

fn ocsf_endpoint(end: &crate::events::FlowEnd) -> OcsfEndpoint<'_> {
    OcsfEndpoint {
        ip: end.ip,
        port: end.port,
        svc_name: &end.name,
    }
}

fn ocsf_flow<'a>(record: &'a FlowRecord, host: &'a str) -> OcsfFlow<'a> {
    let class = classify(record);
    let (direction_id, direction) = direction_of(record);
    let time = millis(record.time);
    OcsfFlow {
        class_uid: 4001,
        class_name: "Network Activity",
        category_uid: 4,
        category_name: "Network Activity",
        activity_id: class.activity_id,
        activity_name: class.activity,
        type_uid: 400_100 + u32::from(class.activity_id),
        type_name: ocsf_type_name(class.activity_id),
        time,
        start_time: time,
        end_time: time,
        count: record.count,
        severity_id: class.severity_id,
        severity: severity_name(class.severity_id),
        action_id: class.action_id,
        action: class.action,
        disposition_id: class.disposition_id,
        disposition: class.disposition,
        message: FlowMessage(record),
        src_endpoint: ocsf_endpoint(&record.src),
        dst_endpoint: ocsf_endpoint(&record.dst),
        connection_info: ConnectionInfo {
            protocol_num: record.protocol_number,
            protocol_name: iana_protocol_name(record.protocol_number),
            protocol_ver_id: record.ip_version,
            direction_id,
            direction,
        },
        firewall_rule: NamedId {
            uid: &record.rule,
            name: &record.rule,
        },
        device: device(host),
        metadata: OcsfMetadata {
            version: OCSF_VERSION,
            product: PRODUCT_FIELDS,
            profiles: ["host", "security_control"],
            sequence: record.sequence,
        },
        unmapped: Unmapped {
            enforcer: EnforcerFields {
                verdict: record.verdict.as_str(),
                reason: record.reason.as_str(),
                generation: record.generation,
                hook: record.hook,
                interface: &record.interface,
                src_identity: record.src.identity,
                dst_identity: record.dst.identity,
                address_identity: record.address_identity,
                rejudged: record.rejudged,
                aggregated: record.aggregated,
                cgroup_id: record.cgroup_id,
                cpu: record.cpu,
            },
        },
    }
}

/// ECS 8.11: an `event.kind` of `event` for allowed flows, `alert` for the rest.
#[derive(Serialize)]
pub struct EcsFlow<'a> {
    #[serde(rename = "@timestamp")]
    timestamp: String,
    ecs: EcsVersion,
    message: FlowMessage<'a>,
    event: EcsEvent,
    source: EcsEndpoint,
    destination: EcsEndpoint,
    service: EcsServices<'a>,
    network: EcsNetwork,
    rule: EcsRule<'a>,
    observer: EcsObserver<'a>,
    host: EcsHost<'a>,
    enforcer: EcsEnforcerFields,
}

#[derive(Serialize)]
struct EcsVersion {
    version: &'static str,
}

#[derive(Serialize)]
struct EcsEvent {
    kind: &'static str,
    category: [&'static str; 1],
    #[serde(rename = "type")]
    types: &'static [&'static str],
    action: &'static str,
    outcome: &'static str,
    reason: &'static str,
    severity: u8,
    sequence: u64,
    start: String,
    end: String,
    module: &'static str,
    dataset: &'static str,
}

#[derive(Serialize)]
struct EcsEndpoint {
    ip: IpAddr,
    port: u16,
}

#[derive(Serialize)]
struct EcsServices<'a> {
    origin: EcsName<'a>,
    target: EcsName<'a>,
}

#[derive(Serialize)]
struct EcsName<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct EcsNetwork {
    transport: Cow<'static, str>,
    iana_number: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct EcsRule<'a> {
    id: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct EcsObserver<'a> {
    hostname: &'a str,
    product: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    ingress: EcsIngress<'a>,
}

#[derive(Serialize)]
struct EcsIngress<'a> {
    interface: EcsName<'a>,
}

#[derive(Serialize)]
struct EcsHost<'a> {
    hostname: &'a str,
}

#[derive(Serialize)]
struct EcsEnforcerFields {
    count: u32,
    generation: u32,
    hook: &'static str,
    src_identity: u32,
    dst_identity: u32,
    address_identity: u32,
    rejudged: bool,
    aggregated: bool,
}

fn ecs_event(record: &FlowRecord, timestamp: &str) -> EcsEvent {
    let (kind, types, action, outcome): (_, &'static [&'static str], _, _) = match record.verdict {
        Verdict::Allow => (
            "event",
            &["connection", "start", "allowed"],
            "flow-allow",
            "success",
        ),
        Verdict::Audit => (
            "alert",
            &["connection", "start", "allowed"],
            "flow-audit",
            "success",
        ),
        Verdict::Deny => ("alert", &["connection", "denied"], "flow-deny", "failure"),
    };
    EcsEvent {
        kind,
        category: ["network"],
        types,
        action,
        outcome,
        reason: record.reason.as_str(),
        severity: classify(record).severity_id,
        sequence: record.sequence,
        start: timestamp.to_owned(),
        end: timestamp.to_owned(),
        module: PRODUCT,
        dataset: "enforcer.flow",
    }
}

fn ecs_flow<'a>(record: &'a FlowRecord, host: &'a str) -> EcsFlow<'a> {
    let timestamp = rfc3339(record.time);
    EcsFlow {
        ecs: EcsVersion {
            version: ECS_VERSION,
        },
        message: FlowMessage(record),
        event: ecs_event(record, &timestamp),
        source: EcsEndpoint {
            ip: record.src.ip,
            port: record.src.port,
        },
        destination: EcsEndpoint {
            ip: record.dst.ip,
            port: record.dst.port,
        },
        service: EcsServices {
            origin: EcsName {
                name: &record.src.name,
            },
            target: EcsName {
                name: &record.dst.name,
            },
        },
        network: EcsNetwork {
            transport: iana_protocol_name(record.protocol_number),
            iana_number: record.protocol_number.to_string(),
            kind: if record.ip_version == 6 {
                "ipv6"
            } else {
                "ipv4"
            },
        },
        rule: EcsRule {
            id: &record.rule,
            name: &record.rule,
        },
        observer: EcsObserver {
            hostname: host,
            product: PRODUCT,
            kind: "firewall",
            ingress: EcsIngress {
                interface: EcsName {
                    name: &record.interface,
                },
            },
        },
        host: EcsHost { hostname: host },
        enforcer: EcsEnforcerFields {
            count: record.count,
            generation: record.generation,
            hook: record.hook,
            src_identity: record.src.identity,
            dst_identity: record.dst.identity,
            address_identity: record.address_identity,
            rejudged: record.rejudged,
            aggregated: record.aggregated,
        },
        timestamp,
    }
}
