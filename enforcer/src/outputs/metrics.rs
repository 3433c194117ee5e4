//! Prometheus metrics (DESIGN §8), via prometheus-client, served on `--metrics`.
//!
//! Counters the kernel keeps (packets per verdict and reason, lost events, per-edge volume) are
//! read from the per-CPU maps at scrape time; what the controller does (reloads, apply time,
//! flows, alerts) is counted as it happens.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use enforcer_common::verdict::{Verdict, reason_name};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{
    datapath::maps::{Fill, KernelMaps},
    events::Generations,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub src: String,
    pub dst: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabel {
    pub detector: String,
}

/// What the controller counts as it works.
pub struct Metrics {
    registry: Registry,
    pub policy_generation: Gauge,
    pub policy_reloads: Family<ResultLabel, Counter>,
    pub policy_apply_seconds: Histogram,
    pub flows: Family<FlowLabels, Counter>,
    pub alerts: Family<DetectorLabel, Counter>,
    pub syslog_dropped: Counter,
    /// Records the alerts file did not take.
    pub alerts_unwritten: Counter,
    /// Interfaces `--attach` or the policy names that exist and run no program of ours.
    pub interfaces_unenforced: Gauge,
    /// 1 while the fleet's etcd answers (0 also without `--kvstore`).
    pub kvstore_connected: Gauge,
}

impl Metrics {
    /// The metrics, reading kernel counters from `maps` and naming identities by `names`.
    pub fn new(maps: Arc<Mutex<KernelMaps>>, names: Arc<RwLock<Generations>>) -> Self {
        let mut registry = Registry::default();
        let policy_generation = Gauge::default();
        registry.register(
            "enforcer_policy_generation",
            "Policy generation the datapath enforces",
            policy_generation.clone(),
        );
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "enforcer_policy_reloads",
            "Policy loads by result (success, failure, unchanged)",
            policy_reloads.clone(),
        );
        // From 1 ms to about 65 s: a one-rule change up to a 100k-rule policy.
        let policy_apply_seconds = Histogram::new([
            0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
        ]);
        registry.register(
            "enforcer_policy_apply_seconds",
            "Time from a policy change (file event or SIGHUP) to the kernel switching to it",
            policy_apply_seconds.clone(),
        );
        let flows = Family::<FlowLabels, Counter>::default();
        registry.register("enforcer_flows", "Flows the datapath reported: new allowed flows, and denied or audited flows (one per flow and second)", flows.clone());
        let alerts = Family::<DetectorLabel, Counter>::default();
        registry.register(
            "enforcer_alerts",
            "Alert records written, by detector (flow for flow records)",
            alerts.clone(),
        );
        let syslog_dropped = Counter::default();
        registry.register(
            "enforcer_syslog_dropped",
            "Records not sent to the syslog collector because it was too slow or unreachable and its queue was full",
            syslog_dropped.clone(),
        );
        let alerts_unwritten = Counter::default();
        registry.register(
            "enforcer_alerts_unwritten",
            "Alert records that could not be written to the alerts file (a full disk, a failing file system)",
            alerts_unwritten.clone(),
        );
        let interfaces_unenforced = Gauge::default();
        registry.register(
            "enforcer_interfaces_unenforced",
            "Interfaces that --attach or the policy names, that exist, and that the controller could not attach its programs to",
            interfaces_unenforced.clone(),
        );
        let kvstore_connected = Gauge::default();
        registry.register(
            "enforcer_kvstore_connected",
            "1 while the fleet's etcd answers; 0 when it does not (the controller then enforces what it last knew) or without --kvstore",
            kvstore_connected.clone(),
        );
        registry.register_collector(Box::new(KernelCollector {
            maps,
            names,
            fill: Mutex::new(None),
        }));
        Self {
            registry,
            policy_generation,
            policy_reloads,
            policy_apply_seconds,
            flows,
            alerts,
            syslog_dropped,
            alerts_unwritten,
            interfaces_unenforced,
            kvstore_connected,
        }
    }

    pub fn count_reload(&self, result: &str) {
        self.policy_reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("encoding metrics failed: {error}");
        }
        text
    }
}

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites prometheus-client's OpenMetrics text as the Prometheus text format (0.0.4), for
/// scrapers and tools that do not ask for OpenMetrics (promtool, curl). The two differ in what
/// matters here only in that OpenMetrics declares a counter without its `_total` suffix (and
/// ends with `# EOF`); Prometheus text declares it with the name its samples carry.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let declaration = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        match declaration {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    text.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

/// Reads the kernel's counters at scrape time.
struct KernelCollector {
    maps: Arc<Mutex<KernelMaps>>,
    names: Arc<RwLock<Generations>>,
    /// Map fill is counted by walking the maps: kept for a few seconds.
    fill: Mutex<Option<(Instant, BTreeMap<&'static str, Fill>)>>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

/// A metric family read from samples of `T`: its name, its help, and the value of a sample.
type FamilyOf<T, V> = (&'static str, &'static str, fn(&T) -> V);

const FILL_REFRESH: Duration = Duration::from_secs(5);

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = crate::locks::lock(&self.maps);
        encode_packets(&maps, &mut encoder)?;
        self.encode_edges(&maps, &mut encoder)?;
        ConstCounter::new(maps.events_lost()).encode(encoder.encode_descriptor(
            "enforcer_events_lost",
            "Flow records the kernel could not put in the ring buffer",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?)?;
        ConstCounter::new(maps.events_lost_packets()).encode(encoder.encode_descriptor(
            "enforcer_events_lost_packets",
            "Packets the flow records the kernel could not put in the ring buffer stood for",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?)?;
        ConstGauge::new(maps.denied_packets_unreported() as i64).encode(
            encoder.encode_descriptor(
                "enforcer_denied_packets_unreported",
                "Denied packets counted under a de-duplicated flow shape and not yet in a record",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?,
        )?;
        encode_flow_tables(&maps, &mut encoder)?;
        self.encode_fill(&maps, &mut encoder)
    }
}

/// New flows (entering the unanswered table) and answered ones (moving to the established
/// table). Opened flows that are never answered are what a spoofed-source flood makes; with
/// the unanswered table full (`enforcer_map_entries{map="UNANSWERED4"}`, `"UNANSWERED"` for
/// IPv6) each new one pushes out the oldest unanswered flow, never an answered one.
fn encode_flow_tables(
    maps: &KernelMaps,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let counts = maps.flow_table_counts();
    let mut family = encoder.encode_descriptor(
        "enforcer_conntrack_flows",
        "Flows tracked as new (unanswered) and flows answered (moved to the established table)",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (state, value) in [("opened", counts.opened), ("answered", counts.answered)] {
        ConstCounter::new(value).encode(family.encode_family(&[("state", state.to_owned())])?)?;
    }
    Ok(())
}

impl KernelCollector {
    /// Packets per (source, destination, verdict), the identities named by the latest
    /// generation.
    fn encode_edges(
        &self,
        maps: &KernelMaps,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let names = crate::locks::read(&self.names);
        let latest = names.latest();
        let name = |identity: u32| {
            latest.map_or_else(
                || identity.to_string(),
                |names| names.identity_name(identity),
            )
        };
        let mut family = encoder.encode_descriptor(
            "enforcer_edge_packets",
            "Packets per source and destination identity and verdict",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let mut edges: BTreeMap<(String, String, &'static str), u64> = BTreeMap::new();
        for (key, counter) in maps.flow_counts() {
            let verdict = Verdict::from_code(key.verdict).map_or("unknown", Verdict::as_str);
            *edges
                .entry((name(key.src_identity), name(key.dst_identity), verdict))
                .or_default() += counter.packets;
        }
        for ((src, dst, verdict), packets) in edges {
            let labels = [("src", src), ("dst", dst), ("verdict", verdict.to_owned())];
            ConstCounter::new(packets).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// Entries and capacity per map; counting entries walks the maps, so the figures are
    /// cached for [`FILL_REFRESH`].
    fn encode_fill(
        &self,
        maps: &KernelMaps,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let fill = {
            let mut cached = crate::locks::lock(&self.fill);
            match &*cached {
                Some((at, fill)) if at.elapsed() < FILL_REFRESH => fill.clone(),
                _ => {
                    let fill = maps.fill();
                    *cached = Some((Instant::now(), fill.clone()));
                    fill
                }
            }
        };
        let fill_families: [FamilyOf<Fill, i64>; 2] = [
            (
                "enforcer_map_entries",
                "Entries in each datapath map",
                |fill| fill.entries as i64,
            ),
            (
                "enforcer_map_capacity",
                "Capacity of each datapath map",
                |fill| i64::from(fill.capacity),
            ),
        ];
        for (name, help, value) in fill_families {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, fill) in &fill {
                ConstGauge::new(value(fill))
                    .encode(family.encode_family(&[("map", (*map).to_owned())])?)?;
            }
        }
        Ok(())
    }
}

/// Packets and bytes per (verdict, reason).
fn encode_packets(
    maps: &KernelMaps,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let packets = maps.packet_counts().unwrap_or_default();
    let packet_families: [FamilyOf<enforcer_common::counters::Counter, u64>; 2] = [
        (
            "enforcer_packets",
            "Packets judged by the datapath, by verdict and reason",
            |counter| counter.packets,
        ),
        (
            "enforcer_packet_bytes",
            "Bytes of the packets judged by the datapath, by verdict and reason",
            |counter| counter.bytes,
        ),
    ];
    for (name, help, value) in packet_families {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (verdict, reason, counter) in &packets {
            let verdict = Verdict::from_code(*verdict).map_or("unknown", Verdict::as_str);
            let labels = [
                ("verdict", verdict.to_owned()),
                ("reason", reason_name(*reason).to_owned()),
            ];
            ConstCounter::new(value(counter)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A `--metrics` value that is no address to listen on.
#[derive(Debug, thiserror::Error)]
#[error("invalid --metrics address \"{0}\": expected PORT or HOST:PORT")]
pub struct ListenAddressError(String);

/// Parses `--metrics`: `PORT`, `:PORT`, `HOST:PORT` or `[V6]:PORT`; without a host it binds
/// 127.0.0.1, so metrics are only exposed beyond the host when asked.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, ListenAddressError> {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if let Ok(port) = text.trim_start_matches(':').parse::<u16>() {
        return Ok(SocketAddr::new(localhost, port));
    }
    text.parse::<SocketAddr>()
        .map_err(|_| ListenAddressError(text.to_owned()))
}

/// Serves `GET /metrics` until the task is dropped: OpenMetrics to scrapers that accept it
/// (Prometheus asks for it), the Prometheus text format to everyone else.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::{
        Router,
        http::{HeaderMap, header},
        routing::get,
    };
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let metrics = metrics.clone();
            async move {
                let wants_openmetrics = headers
                    .get(header::ACCEPT)
                    .and_then(|accept| accept.to_str().ok())
                    .is_some_and(|accept| accept.contains("application/openmetrics-text"));
                let text = metrics.encode();
                if wants_openmetrics {
                    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text)
                } else {
                    (
                        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
                        to_prometheus_text(&text),
                    )
                }
            }
        }),
    );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!("metrics server stopped: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_are_declared_with_their_total_name_in_prometheus_text() {
        let openmetrics = "# HELP enforcer_flows Flows.\n# TYPE enforcer_flows counter\nenforcer_flows_total{src=\"a\"} 3\n# HELP enforcer_policy_generation Generation.\n# TYPE enforcer_policy_generation gauge\nenforcer_policy_generation 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP enforcer_flows_total Flows.\n# TYPE enforcer_flows_total counter\nenforcer_flows_total{src=\"a\"} 3\n# HELP enforcer_policy_generation Generation.\n# TYPE enforcer_policy_generation gauge\nenforcer_policy_generation 2\n"
        );
    }

    #[test]
    fn metrics_bind_to_localhost_unless_told_otherwise() {
        assert_eq!(
            parse_listen_address("9100").unwrap(),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address(":9100").unwrap(),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("0.0.0.0:9100").unwrap(),
            "0.0.0.0:9100".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("[::1]:9100").unwrap(),
            "[::1]:9100".parse().unwrap()
        );
        assert!(parse_listen_address("localhost").is_err());
    }
}
