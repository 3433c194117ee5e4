//! `enforcer run`: load and install the policy, attach, stream events, reload on change.

pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    compile::{self, CompileError, Compiled, HostView},
    datapath::host,
    datapath::maps::{Installed, Installer, KernelMaps, MapsError},
    datapath::{
        hook::{IngressHook, TcAttach},
        loader::{self, Datapath, LoadError, LoadOptions},
        pins::PinLayout,
    },
    detect::baseline::{BaselineError, EdgeBaseline},
    detect::{Detector, Detectors, Finding},
    events::names_file::{self, NamesWriter},
    events::{self, Clock, FlowRecord, Generations, SequenceTracker},
    outputs::alert::{self, AlertFormat},
    outputs::alerts_file::AlertsFile,
    outputs::audit::AuditLog,
    outputs::metrics::{self, DetectorLabel, FlowLabels, Metrics},
    outputs::observe,
    outputs::syslog::{SyslogSink, SyslogTarget},
    policy::{self, ParseCache, Policy, PolicyError},
};

/// Removes what a failed start pinned (see `run`).
struct UnpinOnFailure {
    /// `Some` until the start has succeeded.
    pins: Option<PinLayout>,
}

impl Drop for UnpinOnFailure {
    fn drop(&mut self) {
        if let Some(pins) = &self.pins {
            match loader::unload(pins) {
                Ok(removed) => tracing::info!(
                    "start failed: removed the {} pins it had made under {}",
                    removed.len(),
                    pins.root.display()
                ),
                Err(error) => tracing::warn!(
                    "start failed, and removing its pins under {} failed too: {error}",
                    pins.root.display()
                ),
            }
        }
    }
}

/// Options of `enforcer run` (DESIGN §6).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    pub attach: Vec<String>,
    /// Which program judges packets entering the host.
    pub ingress_hook: IngressHook,
    /// How TC programs are attached (TCX links or netlink filters).
    pub tc_attach: TcAttach,
    pub pin_path: PathBuf,
    /// Where alerts go: a file (appended), or stdout for `-`.
    pub alerts: Option<PathBuf>,
    pub alert_format: AlertFormat,
    /// Detach and unpin everything on SIGINT/SIGTERM instead of leaving enforcement in place.
    pub ephemeral: bool,
    pub metrics: Option<SocketAddr>,
    pub audit_log: Option<PathBuf>,
    pub observe_socket: PathBuf,
    /// Collector for the same records as the alerts.
    pub syslog: Option<SyslogTarget>,
    /// Seconds between heartbeat records.
    pub heartbeat_interval: Duration,
    /// Where the edges `new_edge` has reported are kept across restarts.
    pub edge_baseline: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Compile(#[from] CompileError),
    #[error("interface {0} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{0}")]
    Maps(#[from] MapsError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Baseline(#[from] BaselineError),
}

impl RunError {
    /// Whether the fault is in what the operator gave us (exit 1) rather than the system (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Policy(_)
                | Self::Compile(_)
                | Self::NoSuchInterface(_)
                | Self::Baseline(BaselineError::Malformed { .. })
        )
    }
}

/// Loads, validates and compiles the policy at `path` for this host.
fn load_for_host(
    path: &Path,
    cache: &mut ParseCache,
    live: Option<&Compiled>,
) -> Result<(Policy, HostView, Compiled), RunError> {
    let policy = policy::load_cached(path, cache)?;
    let view = host::observe(&policy);
    let compiled = compile::compile(&policy, &view, live)?;
    Ok((policy, view, compiled))
}

/// What set off a policy load, for logs and the audit log.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    Start,
    Signal,
    FileChange,
    HostChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Signal => "sighup",
            Self::FileChange => "file-change",
            Self::HostChange => "host-change",
        }
    }
}

/// Owner and modification time of each policy file: the "who" of a file change.
fn file_provenance(files: &[PathBuf]) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt as _;
    let described: Vec<_> = files
        .iter()
        .map(|file| match std::fs::metadata(file) {
            Ok(metadata) => {
                json!({ "path": file, "owner_uid": metadata.uid(), "modified": metadata.mtime() })
            }
            Err(error) => json!({ "path": file, "error": error.to_string() }),
        })
        .collect();
    serde_json::Value::Array(described)
}

type SharedAudit = Arc<Mutex<Option<AuditLog>>>;

fn audit(log: &SharedAudit, kind: &str, fields: serde_json::Value) {
    if let Some(log) = log
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .as_mut()
        && let Err(error) = log.append(kind, fields)
    {
        tracing::error!(
            "writing the audit log {} failed: {error}",
            log.path().display()
        );
    }
}

/// The running controller's state.
struct Controller {
    options: RunOptions,
    maps: Arc<Mutex<KernelMaps>>,
    installer: Installer,
    generations: Arc<RwLock<Generations>>,
    metrics: Arc<Metrics>,
    audit: SharedAudit,
    live: Option<Arc<Compiled>>,
    /// The last policy that loaded, and the host it was compiled for: interfaces and cgroups
    /// that appear later are picked up without a reload.
    policy: Option<(Policy, HostView)>,
    /// The last policy's parsed tables: a reload parses only what changed.
    parse_cache: ParseCache,
    /// Keeps the live generation's rule names for a controller that may adopt it.
    names_file: NamesWriter,
}

impl Controller {
    fn install(
        &mut self,
        policy: Policy,
        view: HostView,
        compiled: Compiled,
        trigger: Trigger,
        started: Instant,
    ) -> Result<Option<Installed>, RunError> {
        let compiled_after = started.elapsed();
        let unchanged = self.live.as_ref().is_some_and(|live| {
            live.hash == compiled.hash
                && live.audit == compiled.audit
                && live.tables == compiled.tables
        });
        if unchanged {
            self.metrics.count_reload("unchanged");
            tracing::info!(trigger = trigger.as_str(), "policy unchanged");
            self.policy = Some((policy, view));
            return Ok(None);
        }
        for warning in &compiled.warnings {
            tracing::warn!("{warning}");
        }
        let compiled = Arc::new(compiled);
        let generation = self.installer.next_generation();
        self.generations
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(generation, &compiled);
        let installed = {
            let mut maps = self
                .maps
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.installer.install(&mut maps, &compiled)
        };
        let installed = installed.inspect_err(|_| {
            self.generations
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(generation);
        })?;
        let seconds = started.elapsed().as_secs_f64();
        self.names_file.record(
            installed.generation,
            compiled.hash,
            Arc::clone(&compiled.names),
        );
        self.metrics.count_reload("success");
        self.metrics.policy_apply_seconds.observe(seconds);
        self.metrics
            .policy_generation
            .set(i64::from(installed.generation));
        tracing::info!(
            generation = installed.generation,
            slot = installed.slot,
            writes = installed.writes,
            took_ms = format!("{:.1}", seconds * 1000.0),
            compile_ms = format!("{:.1}", compiled_after.as_secs_f64() * 1000.0),
            switch_ms = format!("{:.1}", installed.took.as_secs_f64() * 1000.0),
            trigger = trigger.as_str(),
            policy = %hex::encode(compiled.hash),
            "policy installed"
        );
        audit(
            &self.audit,
            "policy_load",
            json!({
                "result": "success",
                "trigger": trigger.as_str(),
                "policy_sha256": hex::encode(compiled.hash),
                "generation": installed.generation,
                "map_writes": installed.writes,
                "files": file_provenance(&policy.files),
                "by_uid": nix::unistd::getuid().as_raw(),
            }),
        );
        let synced = {
            let mut maps = self
                .maps
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.installer.sync_idle(&mut maps, &compiled)
        };
        match synced {
            Ok(writes) => {
                tracing::debug!(writes, "idle policy slot brought up to the live generation")
            }
            // Not fatal: the next install finds the slot in an unknown state and rewrites it.
            Err(error) => tracing::warn!("updating the idle policy slot failed: {error}"),
        }
        self.live = Some(compiled);
        self.policy = Some((policy, view));
        Ok(Some(installed))
    }

    /// Reloads the policy; a policy that does not load changes nothing.
    fn reload(&mut self, trigger: Trigger, started: Instant) {
        let result = load_for_host(
            &self.options.policy,
            &mut self.parse_cache,
            self.live.as_deref(),
        )
        .and_then(|(policy, view, compiled)| {
            self.install(policy, view, compiled, trigger, started)
        });
        if let Err(error) = result {
            self.metrics.count_reload("failure");
            tracing::error!(
                trigger = trigger.as_str(),
                "policy reload refused, the previous policy stays in force:\n{error}"
            );
            let files = policy::policy_files(&self.options.policy).unwrap_or_default();
            audit(
                &self.audit,
                "policy_load",
                json!({ "result": "failure", "trigger": trigger.as_str(), "error": error.to_string(), "files": file_provenance(&files) }),
            );
        }
    }

    /// What the heartbeat says now: the live generation, the programs the links run next to
    /// this build's, the audit chain head.
    fn heartbeat(
        &self,
        pins: &PinLayout,
        expected: &std::collections::BTreeMap<&'static str, String>,
    ) -> Option<alert::Heartbeat> {
        let live = self.installer.live()?;
        let programs = loader::pinned_programs(pins)
            .linked
            .into_iter()
            .map(|(link, info)| (link, format!("{:016x}", info.tag())))
            .collect();
        let audit_chain_head = self
            .audit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map(|log| log.head().to_owned());
        Some(alert::Heartbeat {
            policy_sha256: hex::encode(live.policy_hash),
            generation: live.generation,
            programs,
            expected_programs: expected
                .iter()
                .map(|(name, tag)| ((*name).to_owned(), tag.clone()))
                .collect(),
            audit_chain_head,
            interval_secs: self.options.heartbeat_interval.as_secs(),
        })
    }

    /// Recompiles when the host's interfaces or cgroups the policy names have changed.
    fn resync_host(&mut self) {
        let Some((policy, view)) = &self.policy else {
            return;
        };
        let current = host::observe(policy);
        if current == *view {
            return;
        }
        let policy = policy.clone();
        let result = compile::compile(&policy, &current, self.live.as_deref())
            .map_err(RunError::from)
            .and_then(|compiled| {
                self.install(
                    policy,
                    current,
                    compiled,
                    Trigger::HostChange,
                    Instant::now(),
                )
            });
        if let Err(error) = result {
            tracing::error!(
                "recompiling for this host's changed interfaces or cgroups failed: {error}"
            );
        }
    }
}

/// Flow records aggregated over a window, for the audit log (`diff --replay` reads them).
#[derive(Default)]
struct FlowSummary {
    since: Option<SystemTime>,
    counts: BTreeMap<(String, String, String, u16, &'static str, String), u64>,
}

impl FlowSummary {
    const WINDOW: Duration = Duration::from_secs(10);

    fn add(&mut self, record: &FlowRecord) {
        self.since.get_or_insert(record.time);
        let port = if record.protocol == "tcp" || record.protocol == "udp" {
            record.dst.port
        } else {
            0
        };
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
struct Pipeline {
    generations: Arc<RwLock<Generations>>,
    clock: Clock,
    sequences: SequenceTracker,
    interfaces: HashMap<u32, String>,
    alerts: Option<AlertsFile>,
    syslog: Option<SyslogSink>,
    format: AlertFormat,
    host: String,
    metrics: Arc<Metrics>,
    hub: Arc<observe::Hub>,
    audit: SharedAudit,
    summary: FlowSummary,
    detectors: Detectors,
    edge_baseline: Option<EdgeBaseline>,
    /// Generation whose `[detection]` tuning the detectors run with.
    detection_generation: u32,
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

    /// Writes a record to the alerts file and syslog.
    fn publish(&mut self, msgid: &str, record: &serde_json::Value) {
        if let Some(alerts) = &mut self.alerts {
            alerts.write(record);
        }
        if let Some(syslog) = &self.syslog {
            syslog.send(alert::severity_of(record), msgid, record);
        }
    }

    /// Runs the detectors with the latest generation's tuning. Called from the once-a-second
    /// tick, not per record: a reload's new thresholds apply within a second, without a lock
    /// taken for every flow record.
    fn tune_detectors(&mut self) {
        let generations = self
            .generations
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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
            self.publish("finding", &record);
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

    /// Closes detector windows that ended.
    fn tick(&mut self) {
        self.tune_detectors();
        let findings = self.detectors.tick(SystemTime::now());
        self.report(findings);
    }

    fn heartbeat(&mut self, heartbeat: &alert::Heartbeat) {
        let record = alert::heartbeat_alert(heartbeat, SystemTime::now(), self.format, &self.host);
        self.publish("heartbeat", &record);
    }

    fn handle(&mut self, event: &enforcer_common::event::FlowEvent) {
        let lost = self.sequences.observe(event.cpu, event.seq);
        if lost > 0 {
            tracing::warn!(
                lost,
                cpu = event.cpu,
                "flow records lost: the ring buffer was full"
            );
            let record = alert::lost_events_alert(lost, SystemTime::now(), self.format, &self.host);
            self.publish("lost", &record);
            audit(
                &self.audit,
                "events_lost",
                json!({ "count": lost, "cpu": event.cpu }),
            );
        }
        let interface_name = self.interface_name(event.ifindex);
        let record = {
            let generations = self
                .generations
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            events::describe(event, &generations, &self.clock, |_| interface_name.clone())
        };
        match record {
            Some(record) => self.emit(&record),
            None => tracing::warn!(
                verdict = event.verdict,
                "flow record with an unknown verdict code (datapath from another build?)"
            ),
        }
    }

    fn emit(&mut self, record: &FlowRecord) {
        tracing::debug!("{}", alert::flow_message(record));
        self.metrics
            .flows
            .get_or_create(&FlowLabels {
                src: record.src.name.clone(),
                dst: record.dst.name.clone(),
                verdict: record.verdict.as_str().to_owned(),
            })
            .inc();
        if self.alerts.is_some() || self.syslog.is_some() {
            let alert = alert::flow_alert(record, self.format, &self.host);
            self.publish("flow", &alert);
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
        if let Some(alerts) = &mut self.alerts {
            alerts.flush();
        }
    }

    /// Once a second: follow a rotated alerts file.
    fn follow_rotation(&mut self) {
        if let Some(alerts) = &mut self.alerts {
            alerts.follow_rotation();
        }
    }
}

/// Reads the ring buffer until told to stop; heartbeats come from the controller.
async fn read_events(
    ring: RingBuf<MapData>,
    mut pipeline: Pipeline,
    mut stop: mpsc::Receiver<()>,
    mut heartbeats: mpsc::UnboundedReceiver<alert::Heartbeat>,
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
            Some(heartbeat) = heartbeats.recv() => {
                pipeline.heartbeat(&heartbeat);
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
                let buffer = guard.get_inner_mut();
                while let Some(item) = buffer.next() {
                    if let Some(event) = events::decode(&item) {
                        pipeline.handle(&event);
                    }
                }
                pipeline.flush();
                guard.clear_ready();
            }
        }
    }
    // Drain what arrived before the stop.
    let buffer = ring.get_mut();
    while let Some(item) = buffer.next() {
        if let Some(event) = events::decode(&item) {
            pipeline.handle(&event);
        }
    }
    pipeline.flush();
    pipeline.summary.flush(&pipeline.audit);
}

/// How often the controller looks for interfaces and cgroups that appeared or went.
const HOST_RESYNC: Duration = Duration::from_secs(10);
/// A save is often several file events in a burst: reload once no event came for this long...
const QUIET_AFTER_CHANGE: Duration = Duration::from_millis(20);
/// ...or this long after the first, whichever is sooner.
const MAX_CHANGE_SETTLE: Duration = Duration::from_millis(500);

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let started = Instant::now();
    // Everything that can be wrong with the input is found before the kernel is touched.
    let mut parse_cache = ParseCache::default();
    let (policy, view, compiled) = load_for_host(&options.policy, &mut parse_cache, None)?;
    if let Some(missing) = options
        .attach
        .iter()
        .find(|interface| host::interface_index(interface).is_none())
    {
        return Err(RunError::NoSuchInterface(missing.clone()));
    }
    let alerts = options
        .alerts
        .as_ref()
        .map(|target| {
            AlertsFile::open(target).map_err(|source| RunError::Io {
                what: format!("opening alerts file {}", target.display()),
                source,
            })
        })
        .transpose()?;
    let audit_log = options
        .audit_log
        .as_ref()
        .map(|path| {
            AuditLog::open(path).map_err(|source| RunError::Io {
                what: format!("opening audit log {}", path.display()),
                source,
            })
        })
        .transpose()?;
    let (edge_baseline, known_edges) = match &options.edge_baseline {
        Some(path) => {
            let (baseline, known) = EdgeBaseline::open(path)?;
            tracing::info!(
                edges = known.len(),
                "edges already seen, from {}",
                path.display()
            );
            (Some(baseline), known)
        }
        None => (None, Vec::new()),
    };
    let metrics_listener =
        match options.metrics {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.map_err(
                |source| RunError::Io {
                    what: format!("binding metrics to {address}"),
                    source,
                },
            )?),
            None => None,
        };

    let pins = PinLayout::new(&options.pin_path);
    // A start that fails before enforcing leaves nothing pinned, unless it was adopting what an
    // earlier controller pinned: that keeps enforcing (fail closed).
    let mut unpin_on_failure = UnpinOnFailure {
        pins: (!pins.exists()).then(|| pins.clone()),
    };
    let load_options = LoadOptions {
        tc_attach: options.tc_attach,
        ..LoadOptions::default()
    };
    let (mut datapath, maps, ring) = Datapath::load_with(pins.clone(), &load_options)?;
    let kernel = crate::datapath::kernel::Features::current();
    tracing::info!(
        kernel = %kernel.release,
        tc = if options.tc_attach.uses_netlink() { "netlink filters on clsact" } else { "TCX links" },
        clock = if kernel.coarse_clock { "coarse" } else { "ktime_get_ns" },
        "datapath loaded"
    );
    let installer = Installer::adopt(&maps)?;
    let mut generations = Generations::default();
    if let Some(live) = installer.live() {
        tracing::info!(
            generation = live.generation,
            "adopting the datapath pinned at {}",
            pins.root.display()
        );
        // Records still queued from the adopted generation, and those judged until this
        // controller's first generation is in, name their rules as their controller did.
        if let Some(names) =
            names_file::read(&pins.names_file(), live.generation, &live.policy_hash)
        {
            generations.adopt(live.generation, Arc::new(names));
        }
    }
    let maps = Arc::new(Mutex::new(maps));
    let generations = Arc::new(RwLock::new(generations));
    let metrics = Arc::new(Metrics::new(maps.clone(), generations.clone()));
    let audit_log: SharedAudit = Arc::new(Mutex::new(audit_log));
    let mut controller = Controller {
        options: options.clone(),
        maps,
        installer,
        generations: generations.clone(),
        metrics: metrics.clone(),
        audit: audit_log.clone(),
        live: None,
        policy: None,
        parse_cache,
        names_file: NamesWriter::start(pins.names_file()),
    };
    // The policy goes in before any interface is attached: the programs fail closed without one.
    controller.install(policy, view, compiled, Trigger::Start, started)?;
    for interface in &options.attach {
        let ingress = datapath.attach(interface, options.ingress_hook)?;
        tracing::info!(
            interface,
            ingress = ingress.program(),
            egress = loader::TC_EGRESS_PROGRAM,
            "attached"
        );
    }
    datapath.detach_others(&options.attach.iter().cloned().collect::<BTreeSet<_>>());
    unpin_on_failure.pins = None;

    let hub = Arc::new(observe::Hub::default());
    let (stop_events, stop_rx) = mpsc::channel(1);
    let (heartbeats, heartbeat_rx) = mpsc::unbounded_channel();
    let host_name = alert::hostname();
    let syslog = options
        .syslog
        .clone()
        .map(|target| SyslogSink::start(target, host_name.clone(), metrics.syslog_dropped.clone()));
    let reporting = alerts.is_some() || syslog.is_some();
    let detection = controller
        .live
        .as_ref()
        .map(|compiled| compiled.detection.clone())
        .unwrap_or_default();
    let mut detectors = Detectors::new(detection);
    detectors.remember(known_edges);
    let pipeline = Pipeline {
        generations,
        clock: Clock::now(),
        sequences: SequenceTracker::default(),
        interfaces: HashMap::new(),
        alerts: alerts.map(|alerts| alerts.counting_in(metrics.alerts_unwritten.clone())),
        syslog,
        format: options.alert_format,
        host: host_name,
        metrics: metrics.clone(),
        hub: hub.clone(),
        audit: audit_log.clone(),
        summary: FlowSummary::default(),
        detectors,
        edge_baseline,
        detection_generation: 0,
    };
    let events_task = tokio::spawn(read_events(ring, pipeline, stop_rx, heartbeat_rx));
    let expected_programs = datapath.program_tags();
    let mut heartbeat_tick = tokio::time::interval(options.heartbeat_interval);
    let metrics_task = metrics_listener.map(|listener| {
        tracing::info!(
            "metrics on http://{}/metrics",
            listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |address| address.to_string())
        );
        tokio::spawn(metrics::serve(listener, metrics.clone()))
    });
    let observe_path = options.observe_socket.clone();
    let observe_task = tokio::spawn(async move {
        if let Err(error) = observe::serve(observe_path.clone(), hub).await {
            tracing::error!(
                "observe socket {}: {error}; `enforcer observe` will not work",
                observe_path.display()
            );
        }
    });

    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let _watch = match watch::watch(&options.policy, changes_tx) {
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::warn!(
                "cannot watch {} for changes ({error}); reload with SIGHUP",
                options.policy.display()
            );
            None
        }
    };
    let signal_error = |source| RunError::Io {
        what: "installing signal handlers".to_owned(),
        source,
    };
    let mut hangup = signal(SignalKind::hangup()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut host_resync = tokio::time::interval(HOST_RESYNC);
    host_resync.reset();
    tracing::info!(pins = %pins.root.display(), observe = %options.observe_socket.display(), "enforcing");
    loop {
        tokio::select! {
            _ = hangup.recv() => controller.reload(Trigger::Signal, Instant::now()),
            Some(first) = changes.recv() => {
                let deadline = tokio::time::Instant::from_std(first + MAX_CHANGE_SETTLE);
                while let Ok(Some(_)) = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + QUIET_AFTER_CHANGE), changes.recv()).await {}
                controller.reload(Trigger::FileChange, first);
            }
            _ = host_resync.tick() => controller.resync_host(),
            _ = heartbeat_tick.tick(), if reporting => {
                if let Some(heartbeat) = controller.heartbeat(&pins, &expected_programs) {
                    let _ = heartbeats.send(heartbeat);
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }

    controller.names_file.finish();
    let _ = stop_events.send(()).await;
    let _ = events_task.await;
    observe_task.abort();
    let _ = std::fs::remove_file(&options.observe_socket);
    if let Some(task) = metrics_task {
        task.abort();
    }
    if options.ephemeral {
        drop(datapath);
        let removed = loader::unload(&pins).map_err(|source| RunError::Io {
            what: format!("unloading {}", pins.root.display()),
            source,
        })?;
        tracing::info!(
            removed = removed.len(),
            "detached and unpinned (--ephemeral)"
        );
    } else {
        tracing::info!(
            "stopping; enforcement stays in place (pinned at {}); `enforcer unload` removes it",
            pins.root.display()
        );
    }
    Ok(())
}
