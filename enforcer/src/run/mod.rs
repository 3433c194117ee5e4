//! `enforcer run`: load and install the policy, attach, stream events, reload on change.

pub mod watch;

mod controller;
mod fleet;
pub(crate) mod interfaces;
mod pipeline;
mod registrations;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use self::{
    controller::{Controller, FleetState, Inputs, Timing, Trigger, load_for_host},
    interfaces::Interfaces,
    pipeline::{ControllerReport, FlowSummary, Losses, Pipeline, Sinks, read_events},
    registrations::RegistryRequest,
};
use crate::{
    compile::{CompileError, Compiled, HostView},
    datapath::{
        hook::{HostRouting, IngressHook, TcAttach},
        host,
        host_events::HostEvents,
        kernel::Features,
        loader::{self, Datapath, LoadError, LoadOptions},
        maps::{Installer, MapsError},
        pins::PinLayout,
    },
    detect::{
        Detectors, Edge,
        baseline::{BaselineError, EdgeBaseline},
    },
    endpoints::{PersistError, Registry},
    events::{
        Clock, Generations, SequenceTracker,
        names_file::{self, NamesWriter},
    },
    fleet::{KvstoreOptions, session::FleetUpdate},
    outputs::{
        alert::{self, AlertFormat},
        alerts_file::AlertsFile,
        audit::AuditLog,
        metrics::{self, Metrics},
        observe,
        syslog::{SyslogSink, SyslogTarget},
    },
    policy::{ParseCache, Policy, PolicyError},
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
    /// How packets between veth endpoints of this host get there.
    pub host_routing: HostRouting,
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
    /// The fleet's etcd, if this host is in one.
    pub kvstore: Option<KvstoreOptions>,
    /// This host's name in the fleet.
    pub node: String,
}

/// Where the policy comes from: `--policy PATH` or `--policy etcd:KEY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    File(PathBuf),
    Kvstore(String),
}

impl PolicySource {
    pub fn of(policy: &std::path::Path) -> Self {
        match policy.to_str().and_then(|text| text.strip_prefix("etcd:")) {
            Some("") => Self::Kvstore(crate::fleet::POLICY_KEY.to_owned()),
            Some(key) => Self::Kvstore(key.to_owned()),
            None => Self::File(policy.to_owned()),
        }
    }

    pub fn is_kvstore(&self) -> bool {
        matches!(self, Self::Kvstore(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("interface {0} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    #[error(transparent)]
    Registry(#[from] PersistError),
    #[error("etcd has no policy at {0} (write one with `enforcer fleet push`)")]
    NoKvstorePolicy(String),
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

/// How often the controller looks for interfaces and cgroups that appeared or went.
const HOST_RESYNC: Duration = Duration::from_secs(10);

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let started = Instant::now();
    // Everything that can be wrong with the input is found before the kernel is touched.
    let mut parse_cache = ParseCache::default();
    let pins = PinLayout::new(&options.pin_path);
    let registry = Registry::load(&pins.endpoints_file())?;
    let (fleet_updates, fleet) = fleet::start(&options, &pins).await?;
    let inputs = Inputs {
        registry: &registry,
        fleet: &fleet.remote,
        kvstore_policy: fleet.kvstore_policy.as_deref(),
    };
    let compiling = Instant::now();
    let first = load_for_host(
        &PolicySource::of(&options.policy),
        &mut parse_cache,
        None,
        inputs,
    )?;
    // The first policy's compile time, not the datapath's load that follows before its install.
    let timing = Timing {
        started,
        compiled_after: compiling.elapsed(),
    };
    if let Some(missing) = options
        .attach
        .iter()
        .find(|interface| host::interface_index(interface).is_none())
    {
        return Err(RunError::NoSuchInterface(missing.clone()));
    }
    let outputs = Outputs::open(&options).await?;
    // Subscribed before the first attach, so that no interface recreated meanwhile is missed.
    let host_events = HostEvents::subscribe().map_err(|source| RunError::Io {
        what: "subscribing to this host's link, address and route changes".to_owned(),
        source,
    })?;
    let (mut controller, mut datapath, mut interfaces, ring) = adopt_datapath(
        &options,
        &pins,
        (parse_cache, registry, fleet),
        outputs.audit_log,
        first,
        timing,
    )?;
    let (registry_requests, requests) = mpsc::unbounded_channel();
    let tasks = spawn_pipeline(&options, &controller, ring, outputs.rest, registry_requests);
    let mut host = Host {
        datapath: &mut datapath,
        interfaces: &mut interfaces,
        events: &host_events,
    };
    let mut inbox = Inbox {
        requests,
        fleet: fleet_updates,
    };
    event_loop(
        &options,
        &mut controller,
        &pins,
        &mut host,
        &tasks,
        &mut inbox,
    )
    .await?;
    shutdown(&options, controller, datapath, tasks, &pins).await
}

/// The outputs `run` opens before it touches the kernel, so that a wrong path or a taken port
/// changes nothing.
struct Outputs {
    audit_log: Option<AuditLog>,
    rest: PipelineOutputs,
}

/// The outputs the event pipeline writes to.
struct PipelineOutputs {
    alerts: Option<AlertsFile>,
    edge_baseline: Option<EdgeBaseline>,
    known_edges: Vec<Edge>,
    metrics_listener: Option<TcpListener>,
}

impl Outputs {
    async fn open(options: &RunOptions) -> Result<Self, RunError> {
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
        let metrics_listener = match options.metrics {
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| RunError::Io {
                            what: format!("binding metrics to {address}"),
                            source,
                        })?,
                )
            }
            None => None,
        };
        Ok(Self {
            audit_log,
            rest: PipelineOutputs {
                alerts,
                edge_baseline,
                known_edges,
                metrics_listener,
            },
        })
    }
}

/// Loads the datapath (adopting what an earlier controller pinned), installs the first policy,
/// then attaches: the programs fail closed until a policy is in.
fn adopt_datapath(
    options: &RunOptions,
    pins: &PinLayout,
    (parse_cache, registry, fleet): (ParseCache, Registry, FleetState),
    audit_log: Option<AuditLog>,
    (policy, view, compiled): (Policy, HostView, Compiled),
    timing: Timing,
) -> Result<(Controller, Datapath, Interfaces, RingBuf<MapData>), RunError> {
    // A start that fails before enforcing leaves nothing pinned, unless it was adopting what an
    // earlier controller pinned: that keeps enforcing (fail closed).
    let mut unpin_on_failure = UnpinOnFailure {
        pins: (!pins.exists()).then(|| pins.clone()),
    };
    let load_options = LoadOptions {
        tc_attach: options.tc_attach,
        host_routing: options.host_routing,
        ..LoadOptions::default()
    };
    let (mut datapath, maps, ring) = Datapath::load_with(pins.clone(), &load_options)?;
    let kernel = Features::current();
    tracing::info!(
        kernel = %kernel.release,
        tc = if options.tc_attach.uses_netlink() { "netlink filters on clsact" } else { "TCX links" },
        clock = if kernel.coarse_clock { "coarse" } else { "ktime_get_ns" },
        "datapath loaded"
    );
    let installer = Installer::adopt(&maps)?;
    let generations = adopted_generations(&installer, pins);
    let maps = Arc::new(Mutex::new(maps));
    let generations = Arc::new(RwLock::new(generations));
    let mut controller = Controller {
        options: options.clone(),
        metrics: Arc::new(Metrics::new(maps.clone(), generations.clone())),
        maps,
        installer,
        generations,
        audit: Arc::new(Mutex::new(audit_log)),
        live: None,
        policy: None,
        parse_cache,
        names_file: NamesWriter::start(pins.names_file()),
        registry,
        registry_file: pins.endpoints_file(),
        fleet,
        socket_hook: datapath.socket_hook()?,
    };
    let mut interfaces = Interfaces::new(options.ingress_hook, pins.interfaces_file());
    interfaces.select(&options.attach, &policy, &controller.registry);
    controller.install(policy, view, compiled, Trigger::Start, timing)?;
    interfaces.attach_at_start(&mut datapath)?;
    // What an earlier build's programs tracked until this build's took over.
    loader::take_over_flows_of_earlier_builds(&mut crate::locks::lock(&controller.maps));
    unpin_on_failure.pins = None;
    Ok((controller, datapath, interfaces, ring))
}

/// The rule names of an adopted generation: records still queued from it, and those judged
/// until this controller's first generation is in, name their rules as their controller did.
fn adopted_generations(installer: &Installer, pins: &PinLayout) -> Generations {
    let mut generations = Generations::default();
    if let Some(live) = installer.live() {
        tracing::info!(
            generation = live.generation,
            "adopting the datapath pinned at {}",
            pins.root.display()
        );
        if let Some(names) =
            names_file::read(&pins.names_file(), live.generation, &live.policy_hash)
        {
            generations.adopt(live.generation, Arc::new(names));
        }
    }
    generations
}

/// The tasks beside the controller's event loop, and how to reach them.
struct Tasks {
    events: JoinHandle<()>,
    stop_events: mpsc::Sender<()>,
    to_pipeline: mpsc::UnboundedSender<ControllerReport>,
    /// Whether anything receives heartbeats (an alerts file or syslog).
    reporting: bool,
    metrics: Option<JoinHandle<()>>,
    observe: JoinHandle<()>,
}

/// Starts the event pipeline, the metrics endpoint and the observe socket.
fn spawn_pipeline(
    options: &RunOptions,
    controller: &Controller,
    ring: RingBuf<MapData>,
    outputs: PipelineOutputs,
    registry_requests: mpsc::UnboundedSender<RegistryRequest>,
) -> Tasks {
    let metrics = &controller.metrics;
    let hub = Arc::new(observe::Hub::default());
    let (stop_events, stop_rx) = mpsc::channel(1);
    let (to_pipeline, from_controller) = mpsc::unbounded_channel();
    let host_name = alert::hostname();
    let syslog = options
        .syslog
        .clone()
        .map(|target| SyslogSink::start(target, host_name.clone(), metrics.syslog_dropped.clone()));
    let reporting = outputs.alerts.is_some() || syslog.is_some();
    let detection = controller
        .live
        .as_ref()
        .map(|compiled| compiled.detection.clone())
        .unwrap_or_default();
    let mut detectors = Detectors::new(detection);
    detectors.remember(outputs.known_edges);
    let pipeline = Pipeline {
        generations: controller.generations.clone(),
        clock: Clock::now(),
        sequences: SequenceTracker::default(),
        interfaces: HashMap::new(),
        sinks: Sinks {
            alerts: outputs
                .alerts
                .map(|alerts| alerts.counting_in(metrics.alerts_unwritten.clone())),
            syslog,
            line: String::new(),
        },
        format: options.alert_format,
        host: host_name,
        metrics: metrics.clone(),
        hub: hub.clone(),
        audit: controller.audit.clone(),
        summary: FlowSummary::default(),
        detectors,
        edge_baseline: outputs.edge_baseline,
        detection_generation: 0,
        losses: Losses::resume(
            controller.maps.clone(),
            PinLayout::new(&options.pin_path).lost_file(),
        ),
    };
    let events = tokio::spawn(read_events(ring, pipeline, stop_rx, from_controller));
    let metrics_task = outputs.metrics_listener.map(|listener| {
        tracing::info!(
            "metrics on http://{}/metrics",
            listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |address| address.to_string())
        );
        tokio::spawn(metrics::serve(listener, metrics.clone()))
    });
    let observe_path = options.observe_socket.clone();
    let observe = tokio::spawn(async move {
        if let Err(error) = observe::serve(observe_path.clone(), hub, registry_requests).await {
            tracing::error!(
                "controller socket {}: {error}; `enforcer observe` and `enforcer endpoint` will not work",
                observe_path.display()
            );
        }
    });
    Tasks {
        events,
        stop_events,
        to_pipeline,
        reporting,
        metrics: metrics_task,
        observe,
    }
}

/// What the event loop keeps in step with this host: where the programs are attached.
struct Host<'a> {
    datapath: &'a mut Datapath,
    interfaces: &'a mut Interfaces,
    events: &'a HostEvents,
}

impl Host<'_> {
    /// Attaches to the interfaces the live policy and `--attach` name, as they are now.
    fn follow(&mut self, options: &RunOptions, controller: &Controller) {
        if let Some((policy, _)) = &controller.policy {
            self.interfaces
                .select(&options.attach, policy, &controller.registry);
        }
        self.interfaces.reconcile(self.datapath);
        controller
            .metrics
            .interfaces_unenforced
            .set(self.interfaces.unenforced() as i64);
    }

    /// Retries the interfaces that could not be attached; reports those unenforced for
    /// longer than the grace period as `enforcement_gap` findings, once each.
    fn close_gaps(&mut self, options: &RunOptions, controller: &Controller, tasks: &Tasks) {
        if !self.interfaces.has_gaps() {
            return;
        }
        self.follow(options, controller);
        let host = alert::hostname();
        for gap in self.interfaces.overdue_gaps(Instant::now()) {
            let finding = interfaces::gap_finding(gap, &host);
            controller::audit(
                &controller.audit,
                "enforcement_gap",
                serde_json::json!({ "interface": gap.interface, "error": gap.error }),
            );
            let _ = tasks.to_pipeline.send(ControllerReport::Finding(finding));
        }
    }
}

/// What reaches the event loop from other tasks: registry requests from the socket, updates
/// from the etcd session.
struct Inbox {
    requests: mpsc::UnboundedReceiver<RegistryRequest>,
    fleet: Option<mpsc::UnboundedReceiver<FleetUpdate>>,
}

impl Inbox {
    /// `first` and the fleet updates queued behind it: one compile for a burst of changes.
    fn with_queued(&mut self, first: FleetUpdate) -> Vec<FleetUpdate> {
        let mut updates = vec![first];
        if let Some(fleet) = &mut self.fleet {
            while let Ok(more) = fleet.try_recv() {
                updates.push(more);
            }
        }
        updates
    }
}

/// The signals `run` acts on.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, RunError> {
        let signal_error = |source| RunError::Io {
            what: "installing signal handlers".to_owned(),
            source,
        };
        Ok(Self {
            hangup: signal(SignalKind::hangup()).map_err(signal_error)?,
            interrupt: signal(SignalKind::interrupt()).map_err(signal_error)?,
            terminate: signal(SignalKind::terminate()).map_err(signal_error)?,
        })
    }
}

/// The next update from the etcd session, or never without one.
async fn next_fleet_update(
    fleet: &mut Option<mpsc::UnboundedReceiver<FleetUpdate>>,
) -> Option<FleetUpdate> {
    match fleet {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}

/// Reloads for a change to the policy's files first seen at `first`. Each event ends a change
/// (see `watch`), so the file is whole now: it is loaded at once rather than after the rest of a
/// burst (a save is often several events: a rename is seen under both names). Events already
/// queued are the same change; those that come during the load make one more, which finds the
/// policy unchanged unless it changed again.
fn reload_on_change(
    controller: &mut Controller,
    first: Instant,
    changes: &mut mpsc::UnboundedReceiver<Instant>,
) {
    let mut next = Some(first);
    while let Some(mut changed) = next.take() {
        while let Ok(queued) = changes.try_recv() {
            changed = queued;
        }
        controller.reload(Trigger::FileChange, changed);
        next = changes.try_recv().ok();
    }
}

/// How often interfaces that could not be attached are tried again.
const GAP_RETRY: Duration = Duration::from_millis(250);

/// Reloads on SIGHUP and file changes, follows the host, sends heartbeats; returns on SIGINT
/// or SIGTERM.
async fn event_loop(
    options: &RunOptions,
    controller: &mut Controller,
    pins: &PinLayout,
    host: &mut Host<'_>,
    tasks: &Tasks,
    inbox: &mut Inbox,
) -> Result<(), RunError> {
    let expected_programs: BTreeMap<&'static str, String> = host.datapath.program_tags();
    let mut heartbeat_tick = tokio::time::interval(options.heartbeat_interval);
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let _watch = match watch::watch(&options.policy, changes_tx) {
        _ if PolicySource::of(&options.policy).is_kvstore() => None,
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::warn!(
                "cannot watch {} for changes ({error}); reload with SIGHUP",
                options.policy.display()
            );
            None
        }
    };
    let mut signals = Signals::install()?;
    let mut host_resync = tokio::time::interval(HOST_RESYNC);
    host_resync.reset();
    let mut gap_retry = tokio::time::interval(GAP_RETRY);
    let mut following = true;
    tracing::info!(pins = %pins.root.display(), observe = %options.observe_socket.display(), "enforcing");
    loop {
        tokio::select! {
            _ = signals.hangup.recv() => {
                controller.reload(Trigger::Signal, Instant::now());
                host.follow(options, controller);
            }
            Some(first) = changes.recv() => {
                reload_on_change(controller, first, &mut changes);
                host.follow(options, controller);
            }
            changed = host.events.changed(), if following => {
                if let Err(error) = changed {
                    tracing::error!("reading link events failed ({error}); interfaces are followed every {} s", HOST_RESYNC.as_secs());
                    following = false;
                }
                // The identities first (a recreated endpoint's new index), then the programs.
                controller.resync_host();
                host.follow(options, controller);
            }
            _ = host_resync.tick() => {
                controller.resync_host();
                host.follow(options, controller);
            }
            _ = gap_retry.tick() => host.close_gaps(options, controller, tasks),
            Some((request, reply)) = inbox.requests.recv() => {
                let _ = reply.send(registrations::answer(request, options, controller, host));
            }
            Some(update) = next_fleet_update(&mut inbox.fleet) => {
                controller.on_fleet_updates(inbox.with_queued(update), pins);
                host.follow(options, controller);
            }
            _ = heartbeat_tick.tick() => {
                controller.fleet.status_time = SystemTime::now();
                if tasks.reporting
                    && let Some(heartbeat) = controller.heartbeat(pins, &expected_programs)
                {
                    let _ = tasks.to_pipeline.send(ControllerReport::Heartbeat(heartbeat));
                }
            }
            _ = signals.interrupt.recv() => return Ok(()),
            _ = signals.terminate.recv() => return Ok(()),
        }
        controller.publish_to_fleet(&expected_programs);
    }
}

/// Drains the pipeline, stops the tasks; with `--ephemeral`, detaches and unpins everything.
async fn shutdown(
    options: &RunOptions,
    mut controller: Controller,
    datapath: Datapath,
    tasks: Tasks,
    pins: &PinLayout,
) -> Result<(), RunError> {
    controller.names_file.finish();
    let _ = tasks.stop_events.send(()).await;
    let _ = tasks.events.await;
    tasks.observe.abort();
    let _ = std::fs::remove_file(&options.observe_socket);
    if let Some(task) = tasks.metrics {
        task.abort();
    }
    if options.ephemeral {
        drop(datapath);
        let removed = loader::unload(pins).map_err(|source| RunError::Io {
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
