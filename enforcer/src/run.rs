//! `enforcer run`: load and install the policy, attach, stream events, reload on change.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    io::{self, BufWriter, Write},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    alert::{self, AlertFormat},
    compile::{self, CompileError, Compiled},
    events::{self, Clock, FlowRecord, Generations, SequenceTracker},
    host,
    loader::{self, Datapath, LoadError, PinLayout},
    maps::{Installed, Installer, KernelMaps, MapsError},
    policy::{self, PolicyError},
};

/// Options of `enforcer run` (DESIGN §6).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    pub attach: Vec<String>,
    pub pin_path: PathBuf,
    /// Where alerts go: a file (appended), or stdout for `-`.
    pub alerts: Option<PathBuf>,
    pub alert_format: AlertFormat,
    /// Detach and unpin everything on SIGINT/SIGTERM instead of leaving enforcement in place.
    pub ephemeral: bool,
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
}

impl RunError {
    /// Whether the fault is in what the operator gave us (exit 1) rather than the system (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::Policy(_) | Self::Compile(_) | Self::NoSuchInterface(_))
    }
}

/// Loads, validates and compiles the policy at `path` for this host.
pub fn load_and_compile(path: &std::path::Path) -> Result<Compiled, RunError> {
    let policy = policy::load(path)?;
    let compiled = compile::compile(&policy, &host::observe(&policy))?;
    for warning in &compiled.warnings {
        tracing::warn!("{warning}");
    }
    Ok(compiled)
}

/// Where flow records go.
struct AlertSink {
    writer: Box<dyn Write + Send>,
    format: AlertFormat,
    host: String,
}

impl AlertSink {
    fn open(target: &PathBuf, format: AlertFormat) -> Result<Self, RunError> {
        let writer: Box<dyn Write + Send> = if target.as_os_str() == "-" {
            Box::new(io::stdout())
        } else {
            let file = File::options()
                .create(true)
                .append(true)
                .open(target)
                .map_err(|source| RunError::Io { what: format!("opening alerts file {}", target.display()), source })?;
            Box::new(BufWriter::new(file))
        };
        Ok(Self { writer, format, host: alert::hostname() })
    }

    fn write(&mut self, value: &serde_json::Value) {
        let line = serde_json::to_string(value).unwrap_or_default() + "\n";
        if let Err(error) = self.writer.write_all(line.as_bytes()) {
            tracing::error!("writing an alert failed: {error}");
        }
    }

    fn flush(&mut self) {
        if let Err(error) = self.writer.flush() {
            tracing::error!("flushing alerts failed: {error}");
        }
    }
}

/// Everything that consumes flow records.
struct Pipeline {
    generations: Arc<RwLock<Generations>>,
    clock: Clock,
    sequences: SequenceTracker,
    interfaces: HashMap<u32, String>,
    alerts: Option<AlertSink>,
}

impl Pipeline {
    fn interface_name(&mut self, ifindex: u32) -> String {
        self.interfaces
            .entry(ifindex)
            .or_insert_with(|| host::interface_name(ifindex).unwrap_or_else(|| format!("if{ifindex}")))
            .clone()
    }

    fn handle(&mut self, event: &enforcer_common::event::FlowEvent) {
        let lost = self.sequences.observe(event.cpu, event.seq);
        if lost > 0 {
            tracing::warn!(lost, cpu = event.cpu, "flow records lost: the ring buffer was full");
            if let Some(sink) = &mut self.alerts {
                sink.write(&alert::lost_events_alert(lost, SystemTime::now(), sink.format, &sink.host));
            }
        }
        let interface_name = self.interface_name(event.ifindex);
        let record = {
            let generations = self.generations.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            events::describe(event, &generations, &self.clock, |_| interface_name.clone())
        };
        match record {
            Some(record) => self.emit(&record),
            None => tracing::warn!(verdict = event.verdict, "flow record with an unknown verdict code (datapath from another build?)"),
        }
    }

    fn emit(&mut self, record: &FlowRecord) {
        tracing::debug!("{}", alert::flow_message(record));
        if let Some(sink) = &mut self.alerts {
            sink.write(&alert::flow_alert(record, sink.format, &sink.host));
        }
    }

    fn flush(&mut self) {
        if let Some(sink) = &mut self.alerts {
            sink.flush();
        }
    }
}

/// Reads the ring buffer until the channel closes.
async fn read_events(ring: RingBuf<MapData>, mut pipeline: Pipeline, mut stop: mpsc::Receiver<()>) {
    // SAFETY: the ring buffer owns its map fd and keeps it open and unchanged until dropped,
    // which only happens when the AsyncFd is dropped.
    let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(ring) => ring,
        Err(error) => {
            tracing::error!("cannot poll the event ring buffer: {error}; no flow events will be reported");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.recv() => break,
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
}

/// The running controller's state.
struct Controller {
    options: RunOptions,
    maps: KernelMaps,
    installer: Installer,
    generations: Arc<RwLock<Generations>>,
}

impl Controller {
    fn install(&mut self, compiled: Compiled) -> Result<Installed, RunError> {
        let compiled = Arc::new(compiled);
        let installed = self.installer.install(&mut self.maps, &compiled)?;
        self.generations.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(installed.generation, compiled.clone());
        tracing::info!(
            generation = installed.generation,
            slot = installed.slot,
            writes = installed.writes,
            took_ms = installed.took.as_secs_f64() * 1000.0,
            policy = %hex::encode(compiled.hash),
            "policy installed"
        );
        Ok(installed)
    }

    /// Reloads the policy; a policy that does not load changes nothing.
    fn reload(&mut self, trigger: &str) {
        match load_and_compile(&self.options.policy).and_then(|compiled| self.install(compiled)) {
            Ok(_) => {}
            Err(error) => tracing::error!(trigger, "policy reload refused, the previous policy stays in force:\n{error}"),
        }
    }
}

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    // Everything that can be wrong with the input is found before the kernel is touched.
    let compiled = load_and_compile(&options.policy)?;
    if let Some(missing) = options.attach.iter().find(|interface| host::interface_index(interface).is_none()) {
        return Err(RunError::NoSuchInterface(missing.clone()));
    }
    let alerts = options.alerts.as_ref().map(|target| AlertSink::open(target, options.alert_format)).transpose()?;

    let pins = PinLayout::new(&options.pin_path);
    let (mut datapath, maps, ring) = Datapath::load(pins.clone())?;
    let installer = Installer::adopt(&maps)?;
    if let Some(live) = installer.live() {
        tracing::info!(generation = live.generation, "adopting the datapath pinned at {}", pins.root.display());
    }
    let generations = Arc::new(RwLock::new(Generations::default()));
    let mut controller = Controller { options: options.clone(), maps, installer, generations: generations.clone() };
    // The policy goes in before any interface is attached: the programs fail closed without one.
    controller.install(compiled)?;
    for interface in &options.attach {
        datapath.attach(interface)?;
        tracing::info!(interface, "attached (XDP ingress, TC egress)");
    }
    datapath.detach_others(&options.attach.iter().cloned().collect::<BTreeSet<_>>());

    let (stop_events, stop_rx) = mpsc::channel(1);
    let pipeline = Pipeline { generations, clock: Clock::now(), sequences: SequenceTracker::default(), interfaces: HashMap::new(), alerts };
    let events_task = tokio::spawn(read_events(ring, pipeline, stop_rx));

    let signal_error = |source| RunError::Io { what: "installing signal handlers".to_owned(), source };
    let mut hangup = signal(SignalKind::hangup()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    tracing::info!(pins = %pins.root.display(), "enforcing");
    loop {
        tokio::select! {
            _ = hangup.recv() => controller.reload("SIGHUP"),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }

    let _ = stop_events.send(()).await;
    let _ = events_task.await;
    if options.ephemeral {
        drop(datapath);
        let removed = loader::unload(&pins).map_err(|source| RunError::Io { what: format!("unloading {}", pins.root.display()), source })?;
        tracing::info!(removed = removed.len(), "detached and unpinned (--ephemeral)");
    } else {
        tracing::info!("stopping; enforcement stays in place (pinned at {}); `enforcer unload` removes it", pins.root.display());
    }
    Ok(())
}
