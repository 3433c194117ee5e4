//! The controller's link to etcd, as a task: it keeps a lease alive, publishes what the
//! controller asks ([`Desired`]), watches the fleet's keys and the policy key, and sends the
//! controller what changed ([`FleetUpdate`]). A broken connection is retried forever, with
//! back-off; the controller meanwhile keeps what it last received (fail static).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions, WatchStream};
use tokio::sync::{mpsc, watch};

use super::{
    KvstoreOptions, LEASE_TTL_SECS, NodeStatus, PublishedEndpoint, RemoteEndpoint,
    client::{FleetError, connect},
    endpoint_key, endpoints_prefix, node_key,
    view::FleetView,
};

/// What the controller wants published under its node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub endpoints: BTreeMap<IpAddr, PublishedEndpoint>,
    pub status: Option<NodeStatus>,
}

/// What the session tells the controller.
#[derive(Clone, Debug, PartialEq)]
pub enum FleetUpdate {
    /// The other hosts' endpoints, all of them, after a change.
    Endpoints {
        remote: Vec<RemoteEndpoint>,
        conflicts: Vec<String>,
    },
    /// The policy key's text, after a change (`None`: the key was deleted).
    Policy(Option<String>),
    Connected(bool),
}

/// The controller's side of a running session.
pub struct FleetLink {
    pub updates: mpsc::UnboundedReceiver<FleetUpdate>,
    /// What to publish; `None` until the controller has said. Until then nothing is written
    /// or deleted: a restarted controller must not withdraw its host's endpoints from the
    /// fleet before it knows them.
    pub desired: watch::Sender<Option<Desired>>,
}

/// Starts the session task for node `node`; with `policy_key`, the policy is followed too.
pub fn start(options: KvstoreOptions, node: String, policy_key: Option<String>) -> FleetLink {
    let (updates_tx, updates) = mpsc::unbounded_channel();
    let (desired, desired_rx) = watch::channel(None);
    tokio::spawn(run(
        options,
        Session {
            node,
            policy_key,
            view: FleetView::default(),
            revision: 0,
            policy_revision: 0,
            reported: None,
            updates: updates_tx,
        },
        desired_rx,
    ));
    FleetLink { updates, desired }
}

/// What a session keeps across reconnections.
struct Session {
    node: String,
    policy_key: Option<String>,
    view: FleetView,
    /// The store revision the view is at; 0 before the first listing (or after a compaction
    /// made resuming impossible).
    revision: i64,
    /// The policy key's revision last sent.
    policy_revision: i64,
    /// The remote endpoints last sent, to send only changes.
    reported: Option<Vec<RemoteEndpoint>>,
    updates: mpsc::UnboundedSender<FleetUpdate>,
}

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(3);

async fn run(
    options: KvstoreOptions,
    mut session: Session,
    mut desired: watch::Receiver<Option<Desired>>,
) {
    let mut retry = RETRY_FIRST;
    loop {
        let error = session.connected(&options, &mut desired).await;
        if session.updates.send(FleetUpdate::Connected(false)).is_err() {
            return;
        }
        tracing::warn!(
            "etcd: {error}; enforcing what was last known, retrying in {} ms",
            retry.as_millis()
        );
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
        if desired.has_changed().is_err() {
            return;
        }
    }
}

impl Session {
    /// One connection, until it fails.
    async fn connected(
        &mut self,
        options: &KvstoreOptions,
        desired: &mut watch::Receiver<Option<Desired>>,
    ) -> FleetError {
        match self.serve(options, desired).await {
            Ok(never) => match never {},
            Err(error) => error,
        }
    }

    async fn serve(
        &mut self,
        options: &KvstoreOptions,
        desired: &mut watch::Receiver<Option<Desired>>,
    ) -> Result<std::convert::Infallible, FleetError> {
        let mut client = connect(options).await?;
        let lease = client.lease_grant(LEASE_TTL_SECS, None).await?.id();
        let (mut keeper, mut keep_alive) = client.lease_keep_alive(lease).await?;
        let mut stream = self.catch_up(&mut client).await?;
        let mut policy_stream = self.follow_policy(&mut client).await?;
        let _ = self.updates.send(FleetUpdate::Connected(true));
        tracing::info!(
            revision = self.revision,
            "etcd: connected, fleet view current"
        );
        let mut published = BTreeMap::new();
        let wanted = desired.borrow_and_update().clone();
        if let Some(wanted) = wanted {
            self.publish(&mut client, lease, &wanted, &mut published)
                .await?;
        }
        let mut renew = tokio::time::interval(Duration::from_secs(LEASE_TTL_SECS as u64 / 3));
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    keeper.keep_alive().await?;
                    match keep_alive.message().await? {
                        Some(answer) if answer.ttl() > 0 => {}
                        _ => return Err(FleetError::Session("the lease expired".to_owned())),
                    }
                }
                message = stream.message() => {
                    let response = message?.ok_or_else(|| FleetError::Session("the watch ended".to_owned()))?;
                    self.apply_watch(&response)?;
                }
                message = next_policy(&mut policy_stream) => {
                    let response = message?.ok_or_else(|| FleetError::Session("the policy watch ended".to_owned()))?;
                    self.apply_policy(&response)?;
                }
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Err(FleetError::Session("the controller stopped".to_owned()));
                    }
                    let wanted = desired.borrow_and_update().clone();
                    if let Some(wanted) = wanted {
                        self.publish(&mut client, lease, &wanted, &mut published).await?;
                    }
                }
            }
        }
    }

    /// Takes in a response of the endpoints watch; a cancelled watch ends the session (after a
    /// compaction, with the view to be listed again).
    fn apply_watch(&mut self, response: &etcd_client::WatchResponse) -> Result<(), FleetError> {
        if response.canceled() {
            if response.compact_revision() > 0 {
                // Resuming from our revision is impossible: list again.
                tracing::warn!(
                    "etcd: revision {} is compacted (now from {}); listing every endpoint again",
                    self.revision + 1,
                    response.compact_revision()
                );
                self.revision = 0;
            }
            return Err(FleetError::Session(format!(
                "the watch was cancelled: {}",
                response.cancel_reason()
            )));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = kv.key_str().unwrap_or_default();
            if event.event_type() == EventType::Delete {
                self.view.delete(key);
            } else if let Err(error) = self.view.put(key, kv.value(), kv.create_revision()) {
                tracing::warn!("etcd: {error}");
            }
            self.revision = self.revision.max(kv.mod_revision());
        }
        if let Some(header) = response.header() {
            self.revision = self.revision.max(header.revision());
        }
        self.report();
        Ok(())
    }

    /// Takes in a response of the policy key's watch.
    fn apply_policy(&mut self, response: &etcd_client::WatchResponse) -> Result<(), FleetError> {
        if response.canceled() {
            return Err(FleetError::Session(
                "the policy watch was cancelled".to_owned(),
            ));
        }
        if let Some(event) = response.events().last() {
            let text = (event.event_type() == EventType::Put)
                .then(|| {
                    event
                        .kv()
                        .and_then(|kv| kv.value_str().ok())
                        .map(str::to_owned)
                })
                .flatten();
            if let Some(kv) = event.kv() {
                self.policy_revision = kv.mod_revision();
            }
            let _ = self.updates.send(FleetUpdate::Policy(text));
        }
        Ok(())
    }

    /// Brings the view up to date and returns a watch from there: from the revision it had
    /// (every change since, none twice), or, the first time or after a compaction, from a
    /// full listing.
    async fn catch_up(&mut self, client: &mut Client) -> Result<WatchStream, FleetError> {
        if self.revision == 0 {
            self.list(client).await?;
        }
        let (_, stream) = client
            .watch(
                endpoints_prefix(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.revision + 1),
                ),
            )
            .await?;
        Ok(stream)
    }

    /// Replaces the view with every endpoint key, as of the listing's revision.
    async fn list(&mut self, client: &mut Client) -> Result<(), FleetError> {
        let listing = client
            .get(endpoints_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        self.view.clear();
        for kv in listing.kvs() {
            let key = kv.key_str().unwrap_or_default();
            if let Err(error) = self.view.put(key, kv.value(), kv.create_revision()) {
                tracing::warn!("etcd: {error}");
            }
        }
        self.revision = listing.header().map_or(0, |header| header.revision());
        self.report();
        Ok(())
    }

    /// Reads the policy key (if the policy lives in etcd) and watches it from there.
    async fn follow_policy(
        &mut self,
        client: &mut Client,
    ) -> Result<Option<WatchStream>, FleetError> {
        let Some(key) = self.policy_key.clone() else {
            return Ok(None);
        };
        let current = client.get(key.as_str(), None).await?;
        let revision = current.header().map_or(0, |header| header.revision());
        let kv = current.kvs().first();
        let mod_revision = kv.map_or(0, |kv| kv.mod_revision());
        if mod_revision != self.policy_revision || self.policy_revision == 0 {
            self.policy_revision = mod_revision;
            let text = kv.and_then(|kv| kv.value_str().ok()).map(str::to_owned);
            let _ = self.updates.send(FleetUpdate::Policy(text));
        }
        let (_, stream) = client
            .watch(
                key.as_str(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await?;
        Ok(Some(stream))
    }

    /// Sends the remote endpoints if they changed since last sent.
    fn report(&mut self) {
        let (remote, conflicts) = self.view.remote(&self.node);
        if self.reported.as_ref() == Some(&remote) {
            return;
        }
        for conflict in &conflicts {
            tracing::warn!("etcd: {conflict}");
        }
        self.reported = Some(remote.clone());
        let _ = self
            .updates
            .send(FleetUpdate::Endpoints { remote, conflicts });
    }

    /// Writes what differs from what this session has written under `lease`; removes this
    /// node's endpoint keys that are no longer wanted (those of an earlier run included).
    async fn publish(
        &mut self,
        client: &mut Client,
        lease: i64,
        wanted: &Desired,
        published: &mut BTreeMap<String, Vec<u8>>,
    ) -> Result<(), FleetError> {
        let mut keys: BTreeMap<String, Vec<u8>> = wanted
            .endpoints
            .iter()
            .map(|(address, endpoint)| {
                let value = serde_json::to_vec(endpoint).expect("plain data serialises");
                (endpoint_key(&self.node, *address), value)
            })
            .collect();
        if let Some(status) = &wanted.status {
            let value = serde_json::to_vec(status).expect("plain data serialises");
            keys.insert(node_key(&self.node), value);
        }
        for (key, value) in &keys {
            if published.get(key) != Some(value) {
                client
                    .put(
                        key.as_str(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                published.insert(key.clone(), value.clone());
            }
        }
        let stale: BTreeSet<String> = self
            .view
            .keys_of(&self.node)
            .into_iter()
            .chain(published.keys().cloned())
            .filter(|key| !keys.contains_key(key))
            .collect();
        for key in stale {
            client.delete(key.as_str(), None).await?;
            published.remove(&key);
        }
        Ok(())
    }
}

/// The next message of the policy watch, or never when there is none.
async fn next_policy(
    stream: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}
