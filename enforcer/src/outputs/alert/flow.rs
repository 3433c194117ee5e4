//! A flow record as a SIEM record: every record the datapath sends becomes one, so it is written
//! straight from the record's fields into the line, as literal runs of JSON and the values
//! between them (see `outputs::json_line`, and `cargo xtask bench`'s `pipeline` figure). The
//! rarer records (findings, heartbeats, losses) are JSON trees, in `alert.rs`.

use std::{borrow::Cow, fmt};

use enforcer_common::verdict::{Reason, Verdict};

use super::{AlertFormat, ECS_VERSION, OCSF_VERSION, millis, rfc3339, severity_name};
use crate::{
    events::FlowRecord,
    outputs::json_line::{Line, Pieces},
};

/// OCSF `metadata.product` as JSON (a test holds it to `PRODUCT_FIELDS`, which the other
/// records carry).
pub(super) const OCSF_PRODUCT: &str = concat!(
    r#"{"name":"enforcer","vendor_name":"enforcer","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}"#
);

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

/// The line a person reads about a flow, written where it is needed rather than built first:
/// into an alert's `message` piece by piece ([`FlowMessage::write`]), or into a log line.
pub struct FlowMessage<'a>(pub &'a FlowRecord);

impl FlowMessage<'_> {
    /// `web -> api 443/tcp denied by default-deny [default-deny]`, with the packets a
    /// de-duplicated record stands for, and what an aggregated one covers.
    pub fn write(&self, out: &mut impl Pieces) {
        let record = self.0;
        out.text(&record.src.name);
        if record.aggregated {
            out.literal(" -> any destination ");
        } else {
            out.literal(" -> ");
            self.write_destination(out);
            out.literal(" ");
        }
        out.literal(match record.verdict {
            Verdict::Allow => "allowed",
            Verdict::Deny if record.rejudged => "cut off",
            Verdict::Deny => "denied",
            Verdict::Audit => "would be denied (audit)",
        });
        out.literal(" by ");
        out.text(&record.rule);
        out.literal(" [");
        out.literal(record.reason.as_str());
        out.literal("]");
        if record.count > 1 {
            out.literal(" (");
            out.integer(record.count);
            out.literal(" packets)");
        }
        if record.aggregated {
            out.literal(", aggregated per source under load (one was ");
            self.write_destination(out);
            out.literal(")");
        }
    }

    /// `api 443/tcp`, or `api icmp` for a protocol without ports.
    fn write_destination(&self, out: &mut impl Pieces) {
        let record = self.0;
        out.text(&record.dst.name);
        out.literal(" ");
        if record.has_ports() {
            out.integer(record.dst.port);
            out.literal("/");
        }
        out.text(&record.protocol);
    }
}

impl fmt::Display for FlowMessage<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = String::new();
        self.write(&mut line);
        out.write_str(&line)
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

fn ocsf_type_name(activity_id: u8) -> &'static str {
    match activity_id {
        1 => "Network Activity: Open",
        3 => "Network Activity: Reset",
        _ => "Network Activity: Refuse",
    }
}

/// Appends the SIEM record of a flow to `out` as one JSON line, without the line feed.
pub fn write_flow_alert(out: &mut String, record: &FlowRecord, format: AlertFormat, host: &str) {
    let mut line = Line::new(out);
    match format {
        AlertFormat::Ocsf => write_ocsf(&mut line, record, host),
        AlertFormat::Ecs => write_ecs(&mut line, record, host),
    }
}

/// The severity of a flow's record on the OCSF scale (ECS `event.severity` carries the same).
pub fn flow_severity(record: &FlowRecord) -> u8 {
    classify(record).severity_id
}

/// OCSF 1.3 Network Activity (`class_uid` 4001) with the `host` profile (for `device`) and the
/// `security_control` one (for `action`, `disposition` and `firewall_rule`; a validator ignores
/// or refuses them otherwise).
fn write_ocsf(line: &mut Line, record: &FlowRecord, host: &str) {
    let class = classify(record);
    let time = millis(record.time);
    line.raw(r#"{"class_uid":4001,"class_name":"Network Activity","category_uid":4,"category_name":"Network Activity","activity_id":"#)
        .integer(class.activity_id)
        .raw(r#","activity_name":"#)
        .string(class.activity)
        .raw(r#","type_uid":"#)
        .integer(400_100 + u32::from(class.activity_id))
        .raw(r#","type_name":"#)
        .string(ocsf_type_name(class.activity_id))
        .raw(r#","time":"#)
        .integer(time)
        .raw(r#","start_time":"#)
        .integer(time)
        .raw(r#","end_time":"#)
        .integer(time)
        .raw(r#","count":"#)
        .integer(record.count)
        .raw(r#","severity_id":"#)
        .integer(class.severity_id)
        .raw(r#","severity":"#)
        .string(severity_name(class.severity_id))
        .raw(r#","action_id":"#)
        .integer(class.action_id)
        .raw(r#","action":"#)
        .string(class.action)
        .raw(r#","disposition_id":"#)
        .integer(class.disposition_id)
        .raw(r#","disposition":"#)
        .string(class.disposition)
        .raw(r#","message":"#)
        .text(|message| FlowMessage(record).write(message))
        .raw(r#","src_endpoint":"#);
    write_ocsf_endpoint(line, &record.src);
    line.raw(r#","dst_endpoint":"#);
    write_ocsf_endpoint(line, &record.dst);
    write_ocsf_context(line, record, host);
    write_ocsf_unmapped(line, record);
}

/// `connection_info`, `firewall_rule`, `device` and `metadata`.
fn write_ocsf_context(line: &mut Line, record: &FlowRecord, host: &str) {
    let (direction_id, direction) = direction_of(record);
    line.raw(r#","connection_info":{"protocol_num":"#)
        .integer(record.protocol_number)
        .raw(r#","protocol_name":"#)
        .string(&iana_protocol_name(record.protocol_number))
        .raw(r#","protocol_ver_id":"#)
        .integer(record.ip_version)
        .raw(r#","direction_id":"#)
        .integer(direction_id)
        .raw(r#","direction":"#)
        .string(direction)
        .raw(r#"},"firewall_rule":{"uid":"#)
        .string(&record.rule)
        .raw(r#","name":"#)
        .string(&record.rule)
        .raw(r#"},"device":{"hostname":"#)
        .string(host)
        .raw(r#","type_id":1,"type":"Server"},"metadata":{"version":""#)
        .raw(OCSF_VERSION)
        .raw(r#"","product":"#)
        .raw(OCSF_PRODUCT)
        .raw(r#","profiles":["host","security_control"],"sequence":"#)
        .integer(record.sequence)
        .raw("}");
}

/// enforcer's own fields, and the record's closing brace.
fn write_ocsf_unmapped(line: &mut Line, record: &FlowRecord) {
    line.raw(r#","unmapped":{"enforcer":{"verdict":"#)
        .string(record.verdict.as_str())
        .raw(r#","reason":"#)
        .string(record.reason.as_str())
        .raw(r#","generation":"#)
        .integer(record.generation)
        .raw(r#","hook":"#)
        .string(record.hook)
        .raw(r#","interface":"#)
        .string(&record.interface);
    write_identities_and_flags(line, record);
    line.raw(r#","cgroup_id":"#)
        .integer(record.cgroup_id)
        .raw(r#","cpu":"#)
        .integer(record.cpu)
        .raw("}}}");
}

fn write_ocsf_endpoint(line: &mut Line, end: &crate::events::FlowEnd) {
    line.raw(r#"{"ip":"#)
        .ip(&end.ip)
        .raw(r#","port":"#)
        .integer(end.port)
        .raw(r#","svc_name":"#)
        .string(&end.name)
        .raw("}");
}

/// ECS 8.11: an `event.kind` of `event` for allowed flows, `alert` for the rest.
fn write_ecs(line: &mut Line, record: &FlowRecord, host: &str) {
    let timestamp = rfc3339(record.time);
    line.raw(r#"{"@timestamp":"#)
        .string(&timestamp)
        .raw(r#","ecs":{"version":""#)
        .raw(ECS_VERSION)
        .raw(r#""},"message":"#)
        .text(|message| FlowMessage(record).write(message));
    write_ecs_event(line, record, &timestamp);
    line.raw(r#","source":{"ip":"#)
        .ip(&record.src.ip)
        .raw(r#","port":"#)
        .integer(record.src.port)
        .raw(r#"},"destination":{"ip":"#)
        .ip(&record.dst.ip)
        .raw(r#","port":"#)
        .integer(record.dst.port)
        .raw(r#"},"service":{"origin":{"name":"#)
        .string(&record.src.name)
        .raw(r#"},"target":{"name":"#)
        .string(&record.dst.name)
        .raw(r#"}},"network":{"transport":"#)
        .string(&iana_protocol_name(record.protocol_number))
        .raw(r#","iana_number":""#)
        .integer(record.protocol_number)
        .raw(r#"","type":"#)
        .string(if record.ip_version == 6 {
            "ipv6"
        } else {
            "ipv4"
        })
        .raw(r#"},"rule":{"id":"#)
        .string(&record.rule)
        .raw(r#","name":"#)
        .string(&record.rule)
        .raw(r#"},"observer":{"hostname":"#)
        .string(host)
        .raw(r#","product":"enforcer","type":"firewall","ingress":{"interface":{"name":"#)
        .string(&record.interface)
        .raw(r#"}}},"host":{"hostname":"#)
        .string(host)
        .raw("}");
    write_ecs_enforcer(line, record);
}

/// ECS `event`: the categorisation fields.
fn write_ecs_event(line: &mut Line, record: &FlowRecord, timestamp: &str) {
    let (kind, types, action, outcome) = match record.verdict {
        Verdict::Allow => (
            "event",
            r#"["connection","start","allowed"]"#,
            "flow-allow",
            "success",
        ),
        Verdict::Audit => (
            "alert",
            r#"["connection","start","allowed"]"#,
            "flow-audit",
            "success",
        ),
        Verdict::Deny => (
            "alert",
            r#"["connection","denied"]"#,
            "flow-deny",
            "failure",
        ),
    };
    line.raw(r#","event":{"kind":"#)
        .string(kind)
        .raw(r#","category":["network"],"type":"#)
        .raw(types)
        .raw(r#","action":"#)
        .string(action)
        .raw(r#","outcome":"#)
        .string(outcome)
        .raw(r#","reason":"#)
        .string(record.reason.as_str())
        .raw(r#","severity":"#)
        .integer(flow_severity(record))
        .raw(r#","sequence":"#)
        .integer(record.sequence)
        .raw(r#","start":"#)
        .string(timestamp)
        .raw(r#","end":"#)
        .string(timestamp)
        .raw(r#","module":"enforcer","dataset":"enforcer.flow"}"#);
}

/// enforcer's own fields (a custom field set), and the record's closing brace.
fn write_ecs_enforcer(line: &mut Line, record: &FlowRecord) {
    line.raw(r#","enforcer":{"count":"#)
        .integer(record.count)
        .raw(r#","generation":"#)
        .integer(record.generation)
        .raw(r#","hook":"#)
        .string(record.hook);
    write_identities_and_flags(line, record);
    line.raw("}}");
}

/// The identities and flags both formats carry among enforcer's own fields, in this order.
fn write_identities_and_flags(line: &mut Line, record: &FlowRecord) {
    line.raw(r#","src_identity":"#)
        .integer(record.src.identity)
        .raw(r#","dst_identity":"#)
        .integer(record.dst.identity)
        .raw(r#","address_identity":"#)
        .integer(record.address_identity)
        .raw(r#","rejudged":"#)
        .boolean(record.rejudged)
        .raw(r#","aggregated":"#)
        .boolean(record.aggregated);
}
