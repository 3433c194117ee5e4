//! The controller's state between events: the live generation, and how a policy (re)load or a
//! change of this host's interfaces and cgroups becomes a new one.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{PolicySource, RunError, RunOptions};
use crate::{
    compile::{self, Before, Compiled, HostView},
    datapath::{
        enforcement, host, loader,
        maps::{Installed, Installer, KernelMaps},
        pins::PinLayout,
        socket_hook::SocketHook,
    },
    endpoints::Registry,
    events::{Generations, names_file::NamesWriter},
    fleet::RemoteEndpoint,
    locks,
    outputs::{alert, audit::AuditLog, metrics::Metrics},
    policy::{self, ParseCache, Policy},
};

/// What a compile takes from outside the policy and this host's kernel: the endpoints
/// registered here, the fleet's, and the policy text etcd holds (with `--policy etcd:KEY`).
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub registry: &'a Registry,
    pub fleet: &'a [RemoteEndpoint],
    pub kvstore_policy: Option<&'a str>,
}

/// Reads and validates the policy from where it lives.
fn load_policy(
    source: &PolicySource,
    cache: &mut ParseCache,
    kvstore_policy: Option<&str>,
) -> Result<Policy, RunError> {
    match source {
        PolicySource::File(path) => {
            policy::check_writers(path)?;
            Ok(policy::load_cached(path, cache)?)
        }
        PolicySource::Kvstore(key) => {
            let text = kvstore_policy.ok_or_else(|| RunError::NoKvstorePolicy(key.clone()))?;
            let name = crate::fleet::policy_source_name(key);
            Ok(policy::parse_sources_cached(
                vec![(name, text.to_owned())],
                cache,
            )?)
        }
    }
}

/// Loads, validates and compiles the policy for this host, its registered endpoints and the
/// fleet's; after `before` (the policy in force), compiling only what changed.
pub(super) fn load_for_host(
    source: &PolicySource,
    cache: &mut ParseCache,
    before: Option<Before<'_>>,
    inputs: Inputs<'_>,
) -> Result<(Policy, HostView, Compiled), RunError> {
    let policy = load_policy(source, cache, inputs.kvstore_policy)?;
    let mut view = host::observe(&policy, inputs.registry);
    view.fleet = inputs.fleet.to_vec();
    let compiled = match before {
        Some(before) => compile::compile_change(&policy, &view, before)?,
        None => compile::compile(&policy, &view, None)?,
    };
    Ok((policy, view, compiled))
}

/// What set off a policy load, for logs and the audit log.
#[derive(Clone, Copy, Debug)]
pub(super) enum Trigger {
    Start,
    Signal,
    FileChange,
    HostChange,
    Registration,
    Fleet,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Signal => "sighup",
            Self::FileChange => "file-change",
            Self::HostChange => "host-change",
            Self::Registration => "registration",
            Self::Fleet => "fleet",
        }
    }
}

/// Owner and modification time of each policy file: the "who" of a file change.
fn file_provenance(files: &[PathBuf]) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt as _;
    let described: Vec<_> = files
        .iter()
        .map(|file| match std::fs::metadata(file) {
            // The policy in etcd: its revision is in etcd's own history.
            _ if file.to_string_lossy().starts_with("etcd:") => {
                json!({ "path": file, "source": "etcd" })
            }
            Ok(metadata) => {
                json!({ "path": file, "owner_uid": metadata.uid(), "modified": metadata.mtime() })
            }
            Err(error) => json!({ "path": file, "error": error.to_string() }),
        })
        .collect();
    serde_json::Value::Array(described)
}

pub(super) type SharedAudit = Arc<Mutex<Option<AuditLog>>>;

pub(super) fn audit(log: &SharedAudit, kind: &str, fields: serde_json::Value) {
    if let Some(log) = locks::lock(log).as_mut()
        && let Err(error) = log.append(kind, fields)
    {
        tracing::error!(
            "writing the audit log {} failed: {error}",
            log.path().display()
        );
    }
}

/// The running controller's state.
pub(super) struct Controller {
    pub(super) options: RunOptions,
    pub(super) maps: Arc<Mutex<KernelMaps>>,
    pub(super) installer: Installer,
    pub(super) generations: Arc<RwLock<Generations>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) audit: SharedAudit,
    pub(super) live: Option<Arc<Compiled>>,
    /// The last policy that loaded, and the host it was compiled for: interfaces and cgroups
    /// that appear later are picked up without a reload.
    pub(super) policy: Option<(Policy, HostView)>,
    /// The last policy's parsed tables: a reload parses only what changed.
    pub(super) parse_cache: ParseCache,
    /// Keeps the live generation's rule names for a controller that may adopt it.
    pub(super) names_file: NamesWriter,
    /// Endpoints registered from outside the policy, and where they are kept.
    pub(super) registry: Registry,
    pub(super) registry_file: PathBuf,
    /// The fleet (with `--kvstore`): the other hosts' endpoints, the policy text etcd holds,
    /// and where this controller's own keys are asked for.
    pub(super) fleet: FleetState,
    /// Attached while the live generation has services identified by cgroup.
    pub(super) socket_hook: SocketHook,
}

/// What the controller knows of the fleet.
pub(super) struct FleetState {
    pub remote: Vec<RemoteEndpoint>,
    pub kvstore_policy: Option<String>,
    /// `None` without `--kvstore`.
    pub connected: Option<bool>,
    pub desired: Option<tokio::sync::watch::Sender<Option<crate::fleet::session::Desired>>>,
    /// The time this node's published status says (refreshed each heartbeat interval).
    pub status_time: std::time::SystemTime,
}

impl Default for FleetState {
    fn default() -> Self {
        Self {
            remote: Vec::new(),
            kvstore_policy: None,
            connected: None,
            desired: None,
            status_time: std::time::SystemTime::now(),
        }
    }
}

/// When applying a policy began, and how long reading and compiling it took: the log's
/// `took_ms` (from `started` to the switch) and `compile_ms`.
#[derive(Clone, Copy)]
pub(super) struct Timing {
    pub started: Instant,
    pub compiled_after: Duration,
}

impl Timing {
    /// For a policy compiled just now, whose reading began at `started`.
    pub(super) fn compiled_now(started: Instant) -> Self {
        Self {
            started,
            compiled_after: started.elapsed(),
        }
    }
}

impl Controller {
    pub(super) fn install(
        &mut self,
        policy: Policy,
        view: HostView,
        compiled: Compiled,
        trigger: Trigger,
        timing: Timing,
    ) -> Result<Option<Installed>, RunError> {
        let Timing {
            started,
            compiled_after,
        } = timing;
        let unchanged = self.live.as_ref().is_some_and(|live| {
            live.hash == compiled.hash
                && live.audit == compiled.audit
                && live.tables == compiled.tables
        });
        if unchanged {
            self.metrics.count_reload("unchanged");
            tracing::info!(trigger = trigger.as_str(), "policy unchanged");
            self.policy = Some((policy, view));
            release_freed_memory();
            return Ok(None);
        }
        for warning in &compiled.warnings {
            tracing::warn!("{warning}");
        }
        // Attached before a generation whose interface hooks hand packets over to it is in;
        // removed only once no such generation is and no packet it handed over is on its way.
        let needs_socket_hook = compiled.tables.cgroup_levels != 0;
        if needs_socket_hook {
            self.socket_hook.attach()?;
        }
        let compiled = Arc::new(compiled);
        let generation = self.installer.next_generation();
        locks::write(&self.generations).insert(generation, &compiled);
        let installed = {
            let mut maps = locks::lock(&self.maps);
            self.installer.install(&mut maps, &compiled)
        };
        let installed = installed.inspect_err(|_| {
            locks::write(&self.generations).remove(generation);
        })?;
        let seconds = started.elapsed().as_secs_f64();
        self.report_installed(
            &policy,
            &compiled,
            &installed,
            trigger,
            seconds,
            compiled_after,
        );
        let synced = {
            let mut maps = locks::lock(&self.maps);
            self.installer.sync_idle(&mut maps, &compiled)
        };
        match synced {
            Ok(writes) => {
                tracing::debug!(writes, "idle policy slot brought up to the live generation")
            }
            // Not fatal: the next install finds the slot in an unknown state and rewrites it.
            Err(error) => tracing::warn!("updating the idle policy slot failed: {error}"),
        }
        if !needs_socket_hook {
            // A packet handed over under the generation switched from is delivered in the
            // receive softirq whose interface hook handed it over, and the grace period after
            // the switch waits for every softirq running at the switch: then none is on its
            // way, and the socket hook has judged each under the live generation.
            self.installer.end_grace_period();
            self.socket_hook.detach();
        }
        self.live = Some(compiled);
        self.policy = Some((policy, view));
        release_freed_memory();
        Ok(Some(installed))
    }

    /// Tells the names file, the metrics, the log and the audit log about a generation just
    /// switched to.
    fn report_installed(
        &mut self,
        policy: &Policy,
        compiled: &Compiled,
        installed: &Installed,
        trigger: Trigger,
        seconds: f64,
        compiled_after: Duration,
    ) {
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
    }

    /// Reloads the policy; a policy that does not load changes nothing.
    pub(super) fn reload(&mut self, trigger: Trigger, started: Instant) {
        let inputs = Inputs {
            registry: &self.registry,
            fleet: &self.fleet.remote,
            kvstore_policy: self.fleet.kvstore_policy.as_deref(),
        };
        let before = match (&self.policy, self.live.as_deref()) {
            (Some((policy, host)), Some(compiled)) => Some(Before {
                policy,
                host,
                compiled,
            }),
            _ => None,
        };
        let result = load_for_host(
            &PolicySource::of(&self.options.policy),
            &mut self.parse_cache,
            before,
            inputs,
        )
        .and_then(|(policy, view, compiled)| {
            self.install(
                policy,
                view,
                compiled,
                trigger,
                Timing::compiled_now(started),
            )
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
    pub(super) fn heartbeat(
        &self,
        pins: &PinLayout,
        expected: &std::collections::BTreeMap<&'static str, String>,
    ) -> Option<alert::Heartbeat> {
        let live = self.installer.live()?;
        let linked = loader::pinned_programs(pins).linked;
        let interfaces = enforcement::interface_states(
            pins,
            &enforcement::read_selectors(&pins.interfaces_file()),
            &linked,
        )
        .into_iter()
        .map(|(name, state)| (name, state.as_str().to_owned()))
        .collect();
        let programs = linked
            .into_iter()
            .map(|(link, info)| (link, format!("{:016x}", info.tag())))
            .collect();
        let audit_chain_head = locks::lock(&self.audit)
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
            kvstore_connected: self.fleet.connected,
            interfaces,
        })
    }

    /// Recompiles when the host's interfaces or cgroups the policy names have changed.
    pub(super) fn resync_host(&mut self) {
        if let Err(error) = self.recompile_for_host(Trigger::HostChange) {
            tracing::error!(
                "recompiling for this host's changed interfaces or cgroups failed: {error}"
            );
        }
    }

    /// Compiles the live policy again for this host as it is now and its registered endpoints;
    /// installs the result if it differs.
    pub(super) fn recompile_for_host(&mut self, trigger: Trigger) -> Result<(), RunError> {
        let Some((policy, view)) = &self.policy else {
            return Ok(());
        };
        let mut current = host::observe(policy, &self.registry);
        current.fleet = self.fleet.remote.clone();
        if current == *view {
            return Ok(());
        }
        let policy = policy.clone();
        let started = Instant::now();
        let compiled = compile::compile(&policy, &current, self.live.as_deref())?;
        self.install(
            policy,
            current,
            compiled,
            trigger,
            Timing::compiled_now(started),
        )?;
        Ok(())
    }
}

/// Gives the memory a reload freed back to the system now, rather than when the allocator's
/// purge delay runs out: 10-15 MiB a second after a 100 000-rule load. Purging on every free
/// instead (no delay) made one-rule changes 15% slower.
/// The binary's allocator is mimalloc (`main.rs`); under another one this collects nothing.
fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
