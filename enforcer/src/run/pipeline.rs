//! The event pipeline: flow records from the ring buffer to every output and the detectors.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use super::controller::{SharedAudit, audit};
use crate::{
    datapath::{host, maps::KernelMaps},
    detect::{Detector, Detectors, Finding, baseline::EdgeBaseline},
    events::{self, Clock, FlowRecord, Generations, LossAccount, SequenceTracker},
    locks,
    outputs::{
        alert::{self, AlertFormat},
        alerts_file::AlertsFile,
        metrics::{DetectorLabel, FlowLabels, Metrics},
        observe,
        syslog::SyslogSink,
    },
};

/// Flow records aggregated over a window, for the audit log (`diff --replay` reads them).
#[derive(Default)]
pub(super) struct FlowSummary {
    since: Option<SystemTime>,
    counts: BTreeMap<(String, String, String, u16, &'static str, String), u64>,
}

impl FlowSummary {
    const WINDOW: Duration = Duration::from_secs(10);

    fn add(&mut self, record: &FlowRecord) {
        self.since.get_or_insert(record.time);
        let port = record.service_port();
        let key = (
            record.src.name.clone(),
            record.dst.name.clone(),
            record.protocol.clone(),
            port,
            record.verdict.as_str(),
            record.rule.clone(),
        );
        *self.counts.entry(key).or_default() += u64::from(record.count);
    }

    fn flush(&mut self, log: &SharedAudit) {
        let Some(since) = self.since.take() else {
            return;
        };
        let until = crate::outputs::alert::rfc3339(SystemTime::now());
        for ((src, dst, protocol, port, verdict, rule), count) in std::mem::take(&mut self.counts) {
            audit(
                log,
                "flow_summary",
                json!({ "src": src, "dst": dst, "protocol": protocol, "port": port, "verdict": verdict, "rule": rule, "count": count, "since": crate::outputs::alert::rfc3339(since), "until": until }),
            );
        }
    }
}

/// Everything that consumes flow records.
pub(super) struct Pipeline {
    pub(super) generations: Arc<RwLock<Generations>>,
    pub(super) clock: Clock,
    pub(super) sequences: SequenceTracker,
    pub(super) interfaces: HashMap<u32, String>,
    pub(super) sinks: Sinks,
    pub(super) format: AlertFormat,
    pub(super) host: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) hub: Arc<observe::Hub>,
    pub(super) audit: SharedAudit,
    pub(super) summary: FlowSummary,
    pub(super) detectors: Detectors,
    pub(super) edge_baseline: Option<EdgeBaseline>,
    /// Generation whose `[detection]` tuning the detectors run with.
    pub(super) detection_generation: u32,
    /// Records lost and not reported yet, and where the kernel counts them.
    pub(super) losses: Losses,
}

/// Where SIEM records go: the alerts file, syslog, both or neither.
pub(super) struct Sinks {
    pub(super) alerts: Option<AlertsFile>,
    pub(super) syslog: Option<SyslogSink>,
    /// The record being written, as JSON: kept to be written into again.
    pub(super) line: String,
}

impl Sinks {
    fn any(&self) -> bool {
        self.alerts.is_some() || self.syslog.is_some()
    }

    /// Writes a flow's record to the alerts file and syslog, encoded once for both.
    fn publish_flow(&mut self, record: &FlowRecord, format: AlertFormat, host: &str) {
        if !self.any() {
            return;
        }
        self.line.clear();
        alert::write_flow_alert(&mut self.line, record, format, host);
        self.send("flow", alert::flow_severity(record));
    }

    /// Writes a record built as a JSON tree (findings, heartbeats, losses: rare ones).
    fn publish_value(&mut self, msgid: &str, record: &serde_json::Value) {
        if !self.any() {
            return;
        }
        self.line.clear();
        // `Value` displays as compact JSON; writing into a `String` cannot fail.
        let _ = write!(self.line, "{record}");
        self.send(msgid, alert::severity_of(record));
    }

    /// Sends the record in `line`; `severity` is on the OCSF scale.
    fn send(&mut self, msgid: &str, severity: u8) {
        if let Some(alerts) = &mut self.alerts {
            alerts.write(&self.line);
        }
        if let Some(syslog) = &self.syslog {
            syslog.send(severity, msgid, &self.line);
        }
    }

    fn flush(&mut self) {
        if let Some(alerts) = &mut self.alerts {
            alerts.flush();
        }
    }

    /// Starts a new alerts file if the one being written was rotated.
    fn follow_rotation(&mut self) {
        if let Some(alerts) = &mut self.alerts {
            alerts.follow_rotation();
        }
    }
}

/// What the pipeline needs to report losses once a second (see [`LossAccount`]).
pub(super) struct Losses {
    pub(super) account: LossAccount,
    pub(super) maps: Arc<Mutex<KernelMaps>>,
    /// Where the kernel's count as last reported is kept for a successor.
    pub(super) file: PathBuf,
}

impl Losses {
    /// Starts from the count the controller before this one reported, if one did.
    pub(super) fn resume(maps: Arc<Mutex<KernelMaps>>, file: PathBuf) -> Self {
        let reported = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        Self {
            account: LossAccount::resume(reported),
            maps,
            file,
        }
    }

    /// The records lost since the last report (0: none); the count is kept for a successor.
    fn settle(&mut self) -> u64 {
        let kernel_total = Some(locks::lock(&self.maps).events_lost());
        let lost = self.account.settle(kernel_total);
        if lost > 0
            && let Err(error) = std::fs::write(&self.file, self.account.reported().to_string())
        {
            tracing::warn!("keeping the loss count in {}: {error}", self.file.display());
        }
        lost
    }
}

impl Pipeline {
    fn interface_name(&mut self, ifindex: u32) -> String {
        self.interfaces
            .entry(ifindex)
            .or_insert_with(|| {
                host::interface_name(ifindex).unwrap_or_else(|| format!("if{ifindex}"))
            })
            .clone()
    }

    /// Runs the detectors with the latest generation's tuning. Called from the once-a-second
    /// tick, not per record: a reload's new thresholds apply within a second, without a lock
    /// taken for every flow record.
    fn tune_detectors(&mut self) {
        let generations = locks::read(&self.generations);
        if let Some(generation) = generations.latest_generation()
            && generation != self.detection_generation
        {
            self.detectors.configure(generations.detection());
            self.detection_generation = generation;
        }
    }

    fn report(&mut self, findings: Vec<Finding>) {
        for finding in findings {
            tracing::info!(detector = finding.detector.name(), "{}", finding.message);
            if finding.detector == Detector::NewEdge
                && let (Some(baseline), Some(edge)) = (&mut self.edge_baseline, finding.edge())
            {
                baseline.record(&edge);
            }
            let record = alert::finding_alert(&finding, self.format, &self.host);
            self.sinks.publish_value("finding", &record);
            self.metrics
                .alerts
                .get_or_create(&DetectorLabel {
                    detector: finding.detector.name().to_owned(),
                })
                .inc();
            audit(
                &self.audit,
                "finding",
                json!({
                    "detector": finding.detector.name(),
                    "src": finding.src.name,
                    "dst": finding.dst.as_ref().map(|dst| dst.name.clone()),
                    "port": finding.port,
                    "rule": finding.rule,
                    "count": finding.count,
                    "message": finding.message,
                }),
            );
        }
    }

    /// Closes detector windows that ended; reports what was lost since the last tick.
    fn tick(&mut self) {
        self.tune_detectors();
        let findings = self.detectors.tick(SystemTime::now());
        self.report(findings);
        self.report_losses();
    }

    /// One record for every record lost since the last report, whatever showed the loss.
    fn report_losses(&mut self) {
        let lost = self.losses.settle();
        if lost == 0 {
            return;
        }
        tracing::warn!(lost, "flow records lost: the ring buffer was full");
        let record = alert::lost_events_alert(lost, SystemTime::now(), self.format, &self.host);
        self.sinks.publish_value("lost", &record);
        audit(&self.audit, "events_lost", json!({ "count": lost }));
    }

    fn heartbeat(&mut self, heartbeat: &alert::Heartbeat) {
        let record = alert::heartbeat_alert(heartbeat, SystemTime::now(), self.format, &self.host);
        self.sinks.publish_value("heartbeat", &record);
    }

    fn handle(&mut self, event: &enforcer_common::event::FlowEvent) {
        let lost = self.sequences.observe(event.cpu, event.seq);
        self.losses.account.gap(lost);
        let interface_name = self.interface_name(event.ifindex);
        let record = {
            let generations = locks::read(&self.generations);
            events::describe(event, &generations, &self.clock, |_| interface_name.clone())
        };
        match record {
            Some(record) => self.emit(&record),
            None => tracing::warn!(
                verdict = event.verdict,
                reason = event.reason,
                "flow record with an unknown verdict or reason code (datapath from another build?)"
            ),
        }
    }

    fn emit(&mut self, record: &FlowRecord) {
        tracing::debug!("{}", alert::FlowMessage(record));
        self.metrics
            .flows
            .get_or_create(&FlowLabels {
                src: record.src.name.clone(),
                dst: record.dst.name.clone(),
                verdict: record.verdict.as_str().to_owned(),
            })
            .inc();
        if self.sinks.any() {
            self.sinks.publish_flow(record, self.format, &self.host);
            self.metrics
                .alerts
                .get_or_create(&DetectorLabel {
                    detector: "flow".to_owned(),
                })
                .inc();
        }
        self.hub.publish(record);
        self.summary.add(record);
        let findings = self.detectors.observe(record);
        self.report(findings);
    }

    fn flush(&mut self) {
        self.sinks.flush();
    }

    /// Once a second: follow a rotated alerts file.
    fn follow_rotation(&mut self) {
        self.sinks.follow_rotation();
    }
}

/// What the controller itself reports through the pipeline's outputs.
pub(super) enum ControllerReport {
    Heartbeat(alert::Heartbeat),
    Finding(Finding),
}

/// Reads the ring buffer until told to stop; heartbeats and the controller's own findings come
/// from the controller.
pub(super) async fn read_events(
    ring: RingBuf<MapData>,
    mut pipeline: Pipeline,
    mut stop: mpsc::Receiver<()>,
    mut from_controller: mpsc::UnboundedReceiver<ControllerReport>,
) {
    // SAFETY: the ring buffer owns its map fd and keeps it open and unchanged until dropped,
    // which only happens when the AsyncFd is dropped.
    let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(ring) => ring,
        Err(error) => {
            tracing::error!(
                "cannot poll the event ring buffer: {error}; no flow events will be reported"
            );
            return;
        }
    };
    let mut sweep_tick = tokio::time::interval(RING_SWEEP);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut summary_tick = tokio::time::interval(FlowSummary::WINDOW);
    let mut detector_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = summary_tick.tick() => pipeline.summary.flush(&pipeline.audit),
            _ = detector_tick.tick() => {
                pipeline.tick();
                pipeline.flush();
                pipeline.follow_rotation();
            }
            Some(report) = from_controller.recv() => {
                match report {
                    ControllerReport::Heartbeat(heartbeat) => pipeline.heartbeat(&heartbeat),
                    ControllerReport::Finding(finding) => pipeline.report(vec![finding]),
                }
                pipeline.flush();
            }
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(error) => {
                        tracing::error!("polling the event ring buffer failed: {error}");
                        return;
                    }
                };
                drain(guard.get_inner_mut(), &mut pipeline);
                guard.clear_ready();
            }
            _ = sweep_tick.tick() => drain(ring.get_mut(), &mut pipeline),
        }
    }
    // Drain what arrived before the stop.
    drain(ring.get_mut(), &mut pipeline);
    pipeline.summary.flush(&pipeline.audit);
}

/// How long a record may wait in the ring buffer: the datapath wakes this reader at most once a
/// millisecond per CPU (see `enforcer_common::event::may_wake_reader`), and records committed
/// in between without a wakeup are read with the next one, or at the latest by this sweep.
const RING_SWEEP: Duration = Duration::from_millis(10);

/// Handles every record the ring buffer holds, then flushes the outputs.
fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) {
    let mut read = false;
    while let Some(item) = ring.next() {
        if let Some(event) = events::decode(&item) {
            pipeline.handle(&event);
        }
        read = true;
    }
    if read {
        pipeline.flush();
    }
}
