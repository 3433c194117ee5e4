//! Anomaly detectors over the flow records (DESIGN §7). Pure logic: records and the clock go
//! in, findings come out.
//!
//! * `spike`: new connections per edge (source, destination, protocol, port) per window against
//!   an exponentially weighted mean and variance of that edge's past windows; fires when the
//!   window's count is at least `spike_min_calls`, at least 3× the mean and `spike_z` standard
//!   deviations above it, once `spike_warmup_windows` windows have been seen; then stays quiet
//!   on that edge for [`SPIKE_COOLDOWN_WINDOWS`].
//! * `new_edge`: the first allowed flow on an edge not seen since the controller started.
//! * `fanout`: one source (service and address) reaching `fanout_distinct_peers` distinct
//!   (destination, port) pairs in a window, allowed or not: a scan, or lateral movement.
//! * `deny_burst`: `deny_burst` denied attempts from one source in a window.
//! * `spoof`, `rate_limit`: each such record from the kernel (already de-duplicated there).

pub mod baseline;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use enforcer_common::verdict::{Reason, Verdict};
use serde_json::{Value, json};

use crate::{events::FlowRecord, policy::Detection};

/// Windows an edge stays quiet after a spike.
pub const SPIKE_COOLDOWN_WINDOWS: u64 = 3;
/// Weight of the newest window in the edge baselines.
const EWMA_ALPHA: f64 = 0.3;
/// A baseline mean below this is an edge unused for a dozen windows or more: forgotten.
const FORGOTTEN_MEAN: f64 = 0.01;
/// Most edges and sources tracked at once; beyond it new ones are not (and that is logged).
const MAX_TRACKED: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Detector {
    Spike,
    NewEdge,
    Fanout,
    DenyBurst,
    Spoof,
    RateLimit,
    /// Not a detector of the flow stream: the controller, about an interface the policy names
    /// that runs no program of ours.
    EnforcementGap,
}

impl Detector {
    /// The name in `finding_info.analytic.name` and the metrics' `detector` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Spike => "spike",
            Self::NewEdge => "new_edge",
            Self::Fanout => "fanout",
            Self::DenyBurst => "deny_burst",
            Self::Spoof => "spoof",
            Self::RateLimit => "rate_limit",
            Self::EnforcementGap => "enforcement_gap",
        }
    }

    /// OCSF severity: what each one means for the person on call.
    pub fn severity_id(self) -> u8 {
        match self {
            Self::NewEdge => 2,
            Self::Spike | Self::DenyBurst | Self::RateLimit => 3,
            Self::Fanout | Self::Spoof | Self::EnforcementGap => 4,
        }
    }
}

/// One side of a finding.
#[derive(Clone, Debug, PartialEq)]
pub struct Party {
    pub name: String,
    pub ip: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub detector: Detector,
    pub src: Party,
    /// None when the finding is about many destinations (fanout, deny burst).
    pub dst: Option<Party>,
    pub protocol: Option<String>,
    pub port: Option<u16>,
    /// The rule behind the flows (`default-deny` included), when one rule is.
    pub rule: Option<String>,
    pub count: u64,
    pub start: SystemTime,
    pub end: SystemTime,
    pub message: String,
    /// Detector specifics (baseline, z-score, peers seen, ...).
    pub details: Value,
}

/// Who called whom on what: the unit of `spike` and `new_edge`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub src: String,
    pub dst: String,
    pub protocol: String,
    /// 0 for protocols without ports.
    pub port: u16,
}

impl Finding {
    /// The edge a `new_edge` or `spike` finding is about.
    pub fn edge(&self) -> Option<Edge> {
        Some(Edge {
            src: self.src.name.clone(),
            dst: self.dst.as_ref()?.name.clone(),
            protocol: self.protocol.clone()?,
            port: self.port?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Source {
    name: String,
    ip: IpAddr,
}

/// An edge's baseline of new connections per window.
#[derive(Clone, Debug, Default)]
struct Baseline {
    mean: f64,
    variance: f64,
    windows: u64,
    quiet_until: u64,
    rule: String,
}

/// Windows over which a scan spread thinner than one window's threshold is looked for.
const SCAN_HORIZON_WINDOWS: u64 = 30;

/// What one source was denied since its horizon began, at most [`SCAN_HORIZON_WINDOWS`] ago:
/// one new port a window stays under `fanout_distinct_peers` in every window and adds up here.
/// Only denials count (reaching more allowed peers over time is what services do), and no more
/// peers than the threshold are kept, so memory stays bounded.
struct Horizon {
    peers: HashSet<(IpAddr, u16)>,
    first_window: u64,
    first_seen: SystemTime,
    reported: bool,
}

#[derive(Default)]
struct SourceWindow {
    peers: HashSet<(IpAddr, u16)>,
    denied: u64,
    fanout_reported: bool,
    burst_reported: bool,
    rules: HashSet<String>,
}

/// The detectors' state.
pub struct Detectors {
    config: Detection,
    window_start: Option<SystemTime>,
    window_index: u64,
    calls: HashMap<Edge, u64>,
    baselines: HashMap<Edge, Baseline>,
    seen_edges: HashSet<Edge>,
    sources: HashMap<Source, SourceWindow>,
    horizons: HashMap<Source, Horizon>,
    saturated: bool,
}

fn service_text(protocol: &str, port: u16) -> String {
    if port == 0 {
        protocol.to_owned()
    } else {
        format!("{port}/{protocol}")
    }
}

impl Detectors {
    pub fn new(config: Detection) -> Self {
        Self {
            config,
            window_start: None,
            window_index: 0,
            calls: HashMap::new(),
            baselines: HashMap::new(),
            seen_edges: HashSet::new(),
            sources: HashMap::new(),
            horizons: HashMap::new(),
            saturated: false,
        }
    }

    /// Edges seen before this controller started (`--edge-baseline`): not new.
    pub fn remember(&mut self, edges: impl IntoIterator<Item = Edge>) {
        self.seen_edges.extend(edges);
    }

    /// Takes new tuning (a policy reload); baselines are kept.
    pub fn configure(&mut self, config: Detection) {
        self.config = config;
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_secs.max(1))
    }

    fn room_for(&mut self, tracked: usize) -> bool {
        if tracked < MAX_TRACKED {
            return true;
        }
        if !self.saturated {
            tracing::warn!(
                "anomaly detectors track {MAX_TRACKED} edges or sources; new ones are not tracked until windows close"
            );
            self.saturated = true;
        }
        false
    }

    /// Feeds one flow record; returns what it makes the detectors find.
    pub fn observe(&mut self, record: &FlowRecord) -> Vec<Finding> {
        let mut findings = self.tick(record.time);
        let start = *self.window_start.get_or_insert(record.time);
        findings.extend(record_finding(record));
        if record.verdict != Verdict::Deny && record.reason == Reason::PolicyAllow {
            findings.extend(self.count_new_connection(record));
        }
        findings.extend(self.count_for_source(record, start));
        findings.extend(self.count_over_horizon(record));
        findings
    }

    /// Counts a denial in its source's long horizon; the distinct peers denied there reaching
    /// `fanout_distinct_peers` is a fan-out too (a slow scan), reported once per horizon and
    /// not when the source's window already reported one.
    fn count_over_horizon(&mut self, record: &FlowRecord) -> Option<Finding> {
        if record.verdict == Verdict::Allow {
            return None;
        }
        let source = Source {
            name: record.src.name.clone(),
            ip: record.src.ip,
        };
        let tracked = self.horizons.len();
        if !self.horizons.contains_key(&source) && !self.room_for(tracked) {
            return None;
        }
        let threshold = self.config.fanout_distinct_peers;
        let window_reported = self
            .sources
            .get(&source)
            .is_some_and(|window| window.fanout_reported);
        let first_window = self.window_index;
        let horizon = self.horizons.entry(source).or_insert_with(|| Horizon {
            peers: HashSet::new(),
            first_window,
            first_seen: record.time,
            reported: false,
        });
        horizon.reported |= window_reported;
        if horizon.reported {
            return None;
        }
        if (horizon.peers.len() as u64) < threshold {
            horizon.peers.insert((record.dst.ip, record.service_port()));
        }
        if (horizon.peers.len() as u64) < threshold {
            return None;
        }
        horizon.reported = true;
        let peers = peer_list(&horizon.peers);
        let windows = self.window_index - horizon.first_window + 1;
        Some(Finding {
            detector: Detector::Fanout,
            src: Party {
                name: record.src.name.clone(),
                ip: Some(record.src.ip),
            },
            dst: None,
            protocol: None,
            port: None,
            rule: None,
            count: peers.len() as u64,
            start: horizon.first_seen,
            end: record.time,
            message: format!(
                "{} ({}) was denied at {} distinct destinations and ports over {windows} windows: a scan spread thin",
                record.src.name,
                record.src.ip,
                peers.len()
            ),
            details: json!({ "distinct_peers": peers.len(), "threshold": threshold, "horizon_windows": SCAN_HORIZON_WINDOWS, "windows": windows, "peers": peers }),
        })
    }

    /// Counts a new connection on its edge (for spikes); the first on an edge is a finding.
    fn count_new_connection(&mut self, record: &FlowRecord) -> Option<Finding> {
        let port = record.service_port();
        let edge = Edge {
            src: record.src.name.clone(),
            dst: record.dst.name.clone(),
            protocol: record.protocol.clone(),
            port,
        };
        // Every edge counted in a window has a baseline, so the baselines bound both.
        let tracked = self.baselines.len();
        if self.baselines.contains_key(&edge) || self.room_for(tracked) {
            *self.calls.entry(edge.clone()).or_default() += u64::from(record.count);
            self.baselines.entry(edge.clone()).or_default().rule = record.rule.clone();
        }
        let tracked = self.seen_edges.len();
        if self.seen_edges.contains(&edge) || !self.room_for(tracked) {
            return None;
        }
        self.seen_edges.insert(edge);
        Some(flow_finding(
            record,
            Detector::NewEdge,
            1,
            format!(
                "first {} -> {} {} since the controller started",
                record.src.name,
                record.dst.name,
                service_text(&record.protocol, port)
            ),
            json!({}),
        ))
    }

    /// Counts the record in its source's window: distinct destinations (fan-out) and denials
    /// (deny bursts), each reported once per window.
    fn count_for_source(&mut self, record: &FlowRecord, start: SystemTime) -> Vec<Finding> {
        let source = Source {
            name: record.src.name.clone(),
            ip: record.src.ip,
        };
        let tracked = self.sources.len();
        if !self.sources.contains_key(&source) && !self.room_for(tracked) {
            return Vec::new();
        }
        let window_end = start + self.window();
        let (fanout_threshold, burst_threshold, window_secs) = (
            self.config.fanout_distinct_peers,
            self.config.deny_burst,
            self.config.window_secs,
        );
        let window = self.sources.entry(source).or_default();
        window.peers.insert((record.dst.ip, record.service_port()));
        if record.verdict != Verdict::Allow {
            window.denied += u64::from(record.count);
            window.rules.insert(record.rule.clone());
        }
        let window_finding =
            |detector: Detector, count: u64, message: String, details: Value| Finding {
                detector,
                src: Party {
                    name: record.src.name.clone(),
                    ip: Some(record.src.ip),
                },
                dst: None,
                protocol: None,
                port: None,
                rule: None,
                count,
                start,
                end: record.time.max(start).min(window_end),
                message,
                details,
            };
        let mut findings = Vec::new();
        if !window.fanout_reported && window.peers.len() as u64 >= fanout_threshold {
            window.fanout_reported = true;
            let peers = peer_list(&window.peers);
            findings.push(window_finding(
                Detector::Fanout,
                window.peers.len() as u64,
                format!("{} ({}) reached {} distinct destinations and ports within {window_secs} s", record.src.name, record.src.ip, window.peers.len()),
                json!({ "distinct_peers": window.peers.len(), "threshold": fanout_threshold, "peers": peers }),
            ));
        }
        if !window.burst_reported && window.denied >= burst_threshold {
            window.burst_reported = true;
            let mut rules: Vec<&String> = window.rules.iter().collect();
            rules.sort();
            let mut burst = window_finding(
                Detector::DenyBurst,
                window.denied,
                format!(
                    "{} ({}) was denied {} times within {window_secs} s",
                    record.src.name, record.src.ip, window.denied
                ),
                json!({ "denied": window.denied, "threshold": burst_threshold, "rules": rules }),
            );
            burst.rule = (rules.len() == 1).then(|| rules[0].clone());
            findings.push(burst);
        }
        findings
    }

    /// Closes every window that ended by `now`, evaluating spikes; call it periodically so quiet
    /// windows close too.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Finding> {
        let mut findings = Vec::new();
        while let Some(start) = self.window_start {
            let end = start + self.window();
            if now < end {
                break;
            }
            findings.extend(self.close_window(start, end));
            // Skip over silent windows in one step, but let the baselines see them as empty.
            self.window_start = Some(end);
        }
        findings
    }

    fn close_window(&mut self, start: SystemTime, end: SystemTime) -> Vec<Finding> {
        let mut findings = Vec::new();
        let calls = std::mem::take(&mut self.calls);
        self.sources.clear();
        self.saturated = false;
        let index = self.window_index;
        self.window_index += 1;
        self.horizons
            .retain(|_, horizon| index + 1 - horizon.first_window < SCAN_HORIZON_WINDOWS);
        let config = &self.config;
        for (edge, baseline) in &mut self.baselines {
            let count = calls.get(edge).copied().unwrap_or(0);
            let observed = count as f64;
            let spread = baseline.variance.sqrt().max(1.0);
            let z = (observed - baseline.mean) / spread;
            let warm = baseline.windows >= config.spike_warmup_windows;
            if warm
                && index >= baseline.quiet_until
                && count >= config.spike_min_calls
                && observed >= 3.0 * baseline.mean
                && z >= config.spike_z
            {
                baseline.quiet_until = index + 1 + SPIKE_COOLDOWN_WINDOWS;
                findings.push(Finding {
                    detector: Detector::Spike,
                    src: Party { name: edge.src.clone(), ip: None },
                    dst: Some(Party { name: edge.dst.clone(), ip: None }),
                    protocol: Some(edge.protocol.clone()),
                    port: Some(edge.port),
                    rule: Some(baseline.rule.clone()),
                    count,
                    start,
                    end,
                    message: format!(
                        "{} -> {} {}: {count} new connections in {} s, against a usual {:.1} (z = {z:.1})",
                        edge.src,
                        edge.dst,
                        service_text(&edge.protocol, edge.port),
                        config.window_secs,
                        baseline.mean
                    ),
                    details: json!({ "baseline_mean": baseline.mean, "baseline_stddev": baseline.variance.sqrt(), "z": z, "windows_seen": baseline.windows }),
                });
            }
            let difference = observed - baseline.mean;
            let increment = EWMA_ALPHA * difference;
            baseline.mean += increment;
            baseline.variance = (1.0 - EWMA_ALPHA) * (baseline.variance + difference * increment);
            baseline.windows += 1;
        }
        // An edge quiet long enough to have no baseline left starts over (with a warm-up) when
        // it is used again; forgetting it keeps short-lived edges from piling up.
        self.baselines
            .retain(|edge, baseline| baseline.mean >= FORGOTTEN_MEAN || calls.contains_key(edge));
        findings
    }
}

/// The (destination, port) pairs a source reached, as findings list them: sorted, `ip:port`,
/// or the bare address for protocols without ports.
fn peer_list(peers: &HashSet<(IpAddr, u16)>) -> Vec<String> {
    let mut listed: Vec<String> = peers
        .iter()
        .map(|(ip, port)| {
            if *port == 0 {
                ip.to_string()
            } else {
                format!("{ip}:{port}")
            }
        })
        .collect();
    listed.sort();
    listed
}

/// What one record shows on its own: a spoof, or a connection over its rule's limit.
fn record_finding(record: &FlowRecord) -> Option<Finding> {
    match record.reason {
        Reason::Spoofed | Reason::IdentityMismatch => Some(flow_finding(
            record,
            Detector::Spoof,
            u64::from(record.count),
            format!(
                "{} sent as {} ({}) from where it cannot be",
                record.src.name, record.src.ip, record.reason
            ),
            json!({ "reason": record.reason.as_str(), "address_identity": record.address_identity }),
        )),
        Reason::RateLimited => Some(flow_finding(
            record,
            Detector::RateLimit,
            u64::from(record.count),
            format!(
                "{} -> {} {} over the new-connection limit of {}",
                record.src.name,
                record.dst.name,
                service_text(&record.protocol, record.service_port()),
                record.rule
            ),
            json!({}),
        )),
        _ => None,
    }
}

/// A finding about one flow.
fn flow_finding(
    record: &FlowRecord,
    detector: Detector,
    count: u64,
    message: String,
    details: Value,
) -> Finding {
    Finding {
        detector,
        src: Party {
            name: record.src.name.clone(),
            ip: Some(record.src.ip),
        },
        dst: Some(Party {
            name: record.dst.name.clone(),
            ip: Some(record.dst.ip),
        }),
        protocol: Some(record.protocol.clone()),
        port: Some(record.service_port()),
        rule: Some(record.rule.clone()),
        count,
        start: record.time,
        end: record.time,
        message,
        details,
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::events::FlowEnd;

    fn config() -> Detection {
        Detection {
            window_secs: 10,
            spike_z: 4.0,
            spike_min_calls: 20,
            spike_warmup_windows: 3,
            fanout_distinct_peers: 5,
            deny_burst: 10,
        }
    }

    fn record(
        at_secs: f64,
        src: &str,
        dst: &str,
        dst_ip: [u8; 4],
        port: u16,
        verdict: Verdict,
        reason: Reason,
    ) -> FlowRecord {
        FlowRecord {
            time: UNIX_EPOCH + Duration::from_secs_f64(1_000_000.0 + at_secs),
            verdict,
            reason,
            rule: if verdict == Verdict::Allow {
                "r".to_owned()
            } else {
                "default-deny".to_owned()
            },
            src: FlowEnd {
                ip: IpAddr::from([10, 0, 0, 1]),
                port: 40000,
                identity: 1001,
                name: src.to_owned(),
            },
            dst: FlowEnd {
                ip: IpAddr::from(dst_ip),
                port,
                identity: 1002,
                name: dst.to_owned(),
            },
            address_identity: 1001,
            protocol: "tcp".to_owned(),
            protocol_number: 6,
            ip_version: 4,
            generation: 1,
            interface: "v".to_owned(),
            hook: "tc-ingress",
            count: 1,
            rejudged: false,
            aggregated: false,
            cgroup_id: 0,
            cpu: 0,
            sequence: 0,
        }
    }

    fn allowed(at: f64) -> FlowRecord {
        record(
            at,
            "frontend",
            "api",
            [10, 0, 0, 2],
            8080,
            Verdict::Allow,
            Reason::PolicyAllow,
        )
    }

    fn detected(findings: &[Finding], detector: Detector) -> Vec<&Finding> {
        findings
            .iter()
            .filter(|finding| finding.detector == detector)
            .collect()
    }

    /// Feeds `calls[i]` allowed connections in window `i`, then closes the last window.
    fn windows(detectors: &mut Detectors, calls: &[u64]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for (window, count) in calls.iter().enumerate() {
            for call in 0..*count {
                findings.extend(detectors.observe(&allowed(
                    window as f64 * 10.0 + call as f64 * 9.0 / *count as f64,
                )));
            }
        }
        findings.extend(
            detectors.tick(UNIX_EPOCH + Duration::from_secs(1_000_000 + 10 * calls.len() as u64)),
        );
        findings
    }

    #[test]
    fn a_call_rate_spike_is_found_after_warm_up_and_then_the_edge_cools_down() {
        let mut detectors = Detectors::new(config());
        let findings = windows(&mut detectors, &[5, 6, 5, 4, 5, 60, 70, 5]);
        let spikes = detected(&findings, Detector::Spike);
        assert_eq!(
            spikes.len(),
            1,
            "one spike, then the cool-down holds the next window back: {spikes:#?}"
        );
        assert_eq!(
            (spikes[0].count, spikes[0].port, spikes[0].src.name.as_str()),
            (60, Some(8080), "frontend")
        );
        assert_eq!(spikes[0].start, UNIX_EPOCH + Duration::from_secs(1_000_050));
        assert_eq!(spikes[0].end, UNIX_EPOCH + Duration::from_secs(1_000_060));
    }

    #[test]
    fn no_spike_during_warm_up_below_the_minimum_or_within_the_normal_spread() {
        assert!(
            detected(
                &windows(&mut Detectors::new(config()), &[5, 80]),
                Detector::Spike
            )
            .is_empty(),
            "still warming up"
        );
        assert!(
            detected(
                &windows(&mut Detectors::new(config()), &[2, 2, 2, 2, 15]),
                Detector::Spike
            )
            .is_empty(),
            "below spike_min_calls"
        );
        assert!(
            detected(
                &windows(&mut Detectors::new(config()), &[40, 10, 45, 12, 44, 50]),
                Detector::Spike
            )
            .is_empty(),
            "a noisy edge is judged by its spread"
        );
    }

    #[test]
    fn the_first_allowed_flow_of_an_edge_is_a_new_edge_once() {
        let mut detectors = Detectors::new(config());
        let first = detectors.observe(&allowed(0.0));
        assert_eq!(detected(&first, Detector::NewEdge).len(), 1);
        assert!(detected(&detectors.observe(&allowed(1.0)), Detector::NewEdge).is_empty());
        let denied = record(
            2.0,
            "frontend",
            "db",
            [10, 0, 0, 3],
            5432,
            Verdict::Deny,
            Reason::DefaultDeny,
        );
        assert!(
            detected(&detectors.observe(&denied), Detector::NewEdge).is_empty(),
            "a denied flow opens no edge"
        );
    }

    #[test]
    fn an_edge_unused_for_long_is_forgotten_and_must_warm_up_again() {
        let busy_then_idle = [[5; 4].as_slice(), &[0; 20]].concat();
        let mut detectors = Detectors::new(config());
        windows(&mut detectors, &busy_then_idle);
        assert!(
            detectors.baselines.is_empty(),
            "the idle edge is no longer tracked"
        );
        // Remembered, its near-zero mean would make this an extreme spike.
        let then_busy_again = [busy_then_idle.as_slice(), &[40]].concat();
        let findings = windows(&mut Detectors::new(config()), &then_busy_again);
        assert!(
            detected(&findings, Detector::Spike).is_empty(),
            "a forgotten edge warms up again before it can spike"
        );
    }

    #[test]
    fn a_remembered_edge_is_not_new_and_the_finding_names_the_edge_to_remember() {
        let mut detectors = Detectors::new(config());
        let findings = detectors.observe(&allowed(0.0));
        let edge = detected(&findings, Detector::NewEdge)[0].edge().unwrap();
        assert_eq!(
            edge,
            Edge {
                src: "frontend".to_owned(),
                dst: "api".to_owned(),
                protocol: "tcp".to_owned(),
                port: 8080
            }
        );
        let mut restarted = Detectors::new(config());
        restarted.remember([edge]);
        assert!(detected(&restarted.observe(&allowed(0.0)), Detector::NewEdge).is_empty());
        let other = record(
            1.0,
            "frontend",
            "api",
            [10, 0, 0, 2],
            9090,
            Verdict::Allow,
            Reason::PolicyAllow,
        );
        assert_eq!(
            detected(&restarted.observe(&other), Detector::NewEdge).len(),
            1,
            "other edges still are"
        );
    }

    #[test]
    fn a_scan_across_destinations_is_a_fanout_once_per_window() {
        let mut detectors = Detectors::new(config());
        let mut findings = Vec::new();
        for port in 1..=8 {
            findings.extend(detectors.observe(&record(
                f64::from(port) * 0.1,
                "frontend",
                "api",
                [10, 0, 0, 2],
                1000 + port,
                Verdict::Deny,
                Reason::DefaultDeny,
            )));
        }
        let fanouts = detected(&findings, Detector::Fanout);
        assert_eq!(fanouts.len(), 1);
        assert_eq!(
            fanouts[0].count, 5,
            "reported when the fifth distinct peer came"
        );
        assert!(fanouts[0].dst.is_none());
        // The next window starts counting afresh.
        let later = detectors.observe(&record(
            11.0,
            "frontend",
            "api",
            [10, 0, 0, 2],
            2000,
            Verdict::Deny,
            Reason::DefaultDeny,
        ));
        assert!(detected(&later, Detector::Fanout).is_empty());
    }

    #[test]
    fn repeated_denials_from_one_source_are_a_burst() {
        let mut detectors = Detectors::new(config());
        let mut denied = record(
            0.0,
            "world",
            "db",
            [10, 0, 0, 3],
            5432,
            Verdict::Deny,
            Reason::DefaultDeny,
        );
        denied.count = 4;
        let mut findings = Vec::new();
        for at in 0..3 {
            denied.time = UNIX_EPOCH + Duration::from_secs(1_000_000 + at);
            findings.extend(detectors.observe(&denied));
        }
        let bursts = detected(&findings, Detector::DenyBurst);
        assert_eq!(bursts.len(), 1);
        assert_eq!(
            (bursts[0].count, bursts[0].rule.as_deref()),
            (12, Some("default-deny"))
        );
    }

    #[test]
    fn spoofed_and_rate_limited_records_are_findings_as_they_come() {
        let mut detectors = Detectors::new(config());
        let spoofed = record(
            0.0,
            "frontend",
            "api",
            [10, 0, 0, 2],
            53,
            Verdict::Deny,
            Reason::Spoofed,
        );
        assert_eq!(
            detected(&detectors.observe(&spoofed), Detector::Spoof).len(),
            1
        );
        let limited = record(
            0.5,
            "frontend",
            "api",
            [10, 0, 0, 2],
            8080,
            Verdict::Deny,
            Reason::RateLimited,
        );
        assert_eq!(
            detected(&detectors.observe(&limited), Detector::RateLimit).len(),
            1
        );
    }

    /// Feeds `records` (in time order) and then closes every window; every finding.
    fn run(detectors: &mut Detectors, records: &[FlowRecord]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for record in records {
            findings.extend(detectors.observe(record));
        }
        let last = records.last().map_or(UNIX_EPOCH, |record| record.time);
        findings.extend(detectors.tick(last + Duration::from_secs(3600)));
        findings
    }

    #[test]
    fn a_scan_of_one_port_a_window_is_found_over_the_horizon() {
        let mut records = Vec::new();
        for window in 0..12u16 {
            let at = f64::from(window) * 10.0;
            // Steady allowed traffic all along...
            for call in 0..5 {
                records.push(allowed(at + f64::from(call) * 2.0));
            }
            // ...and one new port of db probed a window: never 5 peers, nor 10 denials, in one.
            records.push(record(
                at + 1.0,
                "frontend",
                "db",
                [10, 0, 0, 3],
                5000 + window,
                Verdict::Deny,
                Reason::DefaultDeny,
            ));
            records.sort_by_key(|record| record.time);
        }
        let findings = run(&mut Detectors::new(config()), &records);
        let fanouts = detected(&findings, Detector::Fanout);
        assert_eq!(fanouts.len(), 1, "once per horizon: {fanouts:#?}");
        let slow = fanouts[0];
        assert_eq!(slow.src.name, "frontend");
        assert_eq!(slow.details["distinct_peers"], 5);
        assert_eq!(
            slow.details["windows"], 5,
            "found at the fifth port, in the fifth window"
        );
        assert_eq!(slow.details["horizon_windows"], SCAN_HORIZON_WINDOWS);
        assert!(detected(&findings, Detector::DenyBurst).is_empty());
    }

    #[test]
    fn benign_traffic_that_ramps_up_with_one_denied_retry_finds_nothing_new() {
        let mut records = Vec::new();
        for window in 0..40u32 {
            let at = f64::from(window) * 10.0;
            // More calls every window, to the same three allowed peers...
            for call in 0..(window / 4 + 1) {
                for (peer, ip) in [("api", 2u8), ("cache", 4), ("auth", 5)] {
                    let mut call_record = allowed(at + f64::from(call) * 0.2);
                    call_record.dst.name = peer.to_owned();
                    call_record.dst.ip = IpAddr::from([10, 0, 0, ip]);
                    records.push(call_record);
                }
            }
            // ...and a misconfigured health check denied on the same port every window.
            records.push(record(
                at + 5.0,
                "frontend",
                "db",
                [10, 0, 0, 3],
                9999,
                Verdict::Deny,
                Reason::DefaultDeny,
            ));
        }
        records.sort_by_key(|record| record.time);
        let findings = run(&mut Detectors::new(config()), &records);
        let unexpected: Vec<&Finding> = findings
            .iter()
            .filter(|finding| finding.detector != Detector::NewEdge)
            .collect();
        assert!(unexpected.is_empty(), "{unexpected:#?}");
    }
}
