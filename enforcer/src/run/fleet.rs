//! The controller's side of the fleet (DESIGN §12): starting the etcd session, taking in what
//! it reports (the other hosts' endpoints, the policy in etcd, whether etcd is reachable), and
//! telling it what to publish for this host. What the controller last knew of the fleet is
//! kept beside its pins, so a restarted controller enforces it before etcd answers.

use std::{
    collections::BTreeMap,
    time::{Duration, UNIX_EPOCH},
};

use tokio::sync::mpsc;

use super::{
    PolicySource, RunError, RunOptions,
    controller::{Controller, FleetState, Trigger},
};
use crate::{
    compile::HostView,
    datapath::pins::PinLayout,
    fleet::{
        NodeStatus, PublishedEndpoint, RemoteEndpoint,
        session::{self, Desired, FleetUpdate},
    },
    policy::Policy,
};

/// How long a start with the policy in etcd waits for it before using the copy kept beside
/// the pins.
const POLICY_WAIT: Duration = Duration::from_secs(10);

/// Starts the session (with `--kvstore`); with the policy in etcd, waits for it.
pub(super) async fn start(
    options: &RunOptions,
    pins: &PinLayout,
) -> Result<(Option<mpsc::UnboundedReceiver<FleetUpdate>>, FleetState), RunError> {
    let Some(kvstore) = &options.kvstore else {
        return Ok((None, FleetState::default()));
    };
    let policy_key = match PolicySource::of(&options.policy) {
        PolicySource::Kvstore(key) => Some(key),
        PolicySource::File(_) => None,
    };
    let mut link = session::start(kvstore.clone(), options.node.clone(), policy_key.clone());
    let mut state = FleetState {
        remote: read_json(&pins.fleet_file()).unwrap_or_default(),
        connected: Some(false),
        desired: Some(link.desired),
        ..FleetState::default()
    };
    if let Some(key) = policy_key {
        let deadline = tokio::time::Instant::now() + POLICY_WAIT;
        while let Ok(Some(update)) = tokio::time::timeout_at(deadline, link.updates.recv()).await {
            let policy = matches!(update, FleetUpdate::Policy(_));
            state.take(update);
            if policy {
                break;
            }
        }
        if state.kvstore_policy.is_none() {
            let kept = std::fs::read_to_string(pins.kvstore_policy_file()).ok();
            if kept.is_some() {
                tracing::warn!(
                    "etcd did not give the policy at {key}; enforcing the copy kept at {}",
                    pins.kvstore_policy_file().display()
                );
            }
            state.kvstore_policy = kept;
        }
    }
    Ok((Some(link.updates), state))
}

impl FleetState {
    /// Takes in an update; returns what the controller must do about it.
    fn take(&mut self, update: FleetUpdate) -> Follow {
        match update {
            FleetUpdate::Endpoints { remote, .. } => {
                self.remote = remote;
                Follow::Recompile
            }
            FleetUpdate::Policy(Some(text)) => {
                if self.kvstore_policy.as_deref() == Some(&text) {
                    return Follow::Nothing;
                }
                self.kvstore_policy = Some(text);
                Follow::Reload
            }
            FleetUpdate::Policy(None) => {
                tracing::warn!("the policy key was deleted from etcd; the policy in force stays");
                Follow::Nothing
            }
            FleetUpdate::Connected(connected) => {
                self.connected = Some(connected);
                Follow::Nothing
            }
        }
    }
}

enum Follow {
    Nothing,
    Recompile,
    Reload,
}

impl Controller {
    /// Acts on updates from the session: at most one recompile and one reload for them all.
    pub(super) fn on_fleet_updates(&mut self, updates: Vec<FleetUpdate>, pins: &PinLayout) {
        let (mut recompile, mut reload) = (false, false);
        for update in updates {
            match self.fleet.take(update) {
                Follow::Nothing => {}
                Follow::Recompile => recompile = true,
                Follow::Reload => reload = true,
            }
        }
        if reload {
            let before = self.live.as_ref().map(|live| live.hash);
            self.reload(Trigger::Fleet, std::time::Instant::now());
            let installed = self.live.as_ref().map(|live| live.hash);
            if installed != before
                && let Some(text) = &self.fleet.kvstore_policy
                && let Err(error) = std::fs::write(pins.kvstore_policy_file(), text)
            {
                tracing::warn!("keeping a copy of etcd's policy failed: {error}");
            }
        }
        if recompile {
            write_json(&pins.fleet_file(), &self.fleet.remote);
            // A reload compiled the fleet's endpoints in already; this is then a no-op.
            if let Err(error) = self.recompile_for_host(Trigger::Fleet) {
                tracing::error!("recompiling for the fleet's endpoints failed: {error}");
            }
        }
        if let Some(connected) = self.fleet.connected {
            self.metrics.kvstore_connected.set(i64::from(connected));
        }
    }

    /// Tells the session what to publish now: this host's endpoints and its status.
    pub(super) fn publish_to_fleet(&self, programs: &BTreeMap<&'static str, String>) {
        let (Some(desired), Some((policy, view)), Some(live)) =
            (&self.fleet.desired, &self.policy, self.installer.live())
        else {
            return;
        };
        let wanted = Desired {
            endpoints: local_endpoints(policy, view),
            status: Some(NodeStatus {
                policy_sha256: hex::encode(live.policy_hash),
                generation: live.generation,
                programs: programs
                    .iter()
                    .map(|(name, tag)| ((*name).to_owned(), tag.clone()))
                    .collect(),
                time: self
                    .fleet
                    .status_time
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |time| time.as_secs()),
                interval_secs: self.options.heartbeat_interval.as_secs(),
                kvstore_connected: true,
            }),
        };
        desired.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&wanted);
            *current = Some(wanted);
            changed
        });
    }
}

/// This host's endpoints as the fleet sees them: the registered ones, and each declared
/// address this host routes through an interface of its service.
pub(super) fn local_endpoints(
    policy: &Policy,
    view: &HostView,
) -> BTreeMap<std::net::IpAddr, PublishedEndpoint> {
    let mut endpoints = BTreeMap::new();
    for registration in &view.registered {
        let Some(service) = policy.service(&registration.service) else {
            continue;
        };
        for address in &registration.addresses {
            endpoints.insert(
                *address,
                PublishedEndpoint {
                    service: service.name.clone(),
                    identity: service.identity,
                    addresses: registration.addresses.clone(),
                    interface: registration.interface.clone(),
                },
            );
        }
    }
    for service in &policy.services {
        for net in &service.addresses {
            if !view.is_local_endpoint_address(service, net) {
                continue;
            }
            let address = net.addr();
            endpoints
                .entry(address)
                .or_insert_with(|| PublishedEndpoint {
                    service: service.name.clone(),
                    identity: service.identity,
                    addresses: vec![address],
                    interface: view.routes[&address].clone(),
                });
        }
    }
    endpoints
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_json(path: &std::path::Path, remote: &[RemoteEndpoint]) {
    let text = serde_json::to_string(remote).expect("plain data serialises");
    let temporary = path.with_extension("json.tmp");
    if let Err(error) =
        std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, path))
    {
        tracing::warn!(
            "keeping the fleet view in {} failed: {error}",
            path.display()
        );
    }
}
