//! What every part of a running node shares: the config, the tables, the MQTT client, the
//! pending map where consumer flows wait for their answers, the workflow-step reporting and the
//! advert. Below everything that uses it ([`crate::rear`], [`crate::orchestrator`],
//! [`crate::control`], [`crate::node`]); it uses none of them.
//!
//! [`RearError`] lives here because sending a message (`Shared::send`) and waiting for its
//! answer (`Shared::wait_for`) already fail with it; [`crate::rear`] re-exports it.

use crate::broker::{AdvertSlot, Status};
use crate::config::Config;
use crate::contracts::BadAnswer;
use crate::fabric::Fabric;
use crate::model::{FlavourList, Id};
use crate::tables::{TableError, Tables};
use crate::wire::{Body, ErrorCode, Flavours, Message, Topics, WireError};
use crate::{unix_ms, AgentError, Observer, Step};
use rumqttc::{AsyncClient, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tracing::debug;

/// Consumer requests waiting for answers at once (discoveries and reservations). A bound of
/// the protocol: beyond it a new request fails with `Busy` rather than growing a map.
pub const MAX_PENDING: usize = 64;

/// Steps buffered for a control-socket client that reads slowly; older ones are dropped.
const STEP_QUEUE: usize = 64;
/// Provider-side peering set-ups running at once; more are refused with BUSY.
const MAX_PEERINGS: usize = 4;
/// Requests one grant in progress answers or queues (repeats of its request, and requests
/// for other contracts of the same consumer cluster); more are refused with BUSY.
pub(crate) const MAX_GRANT_WAITERS: usize = 16;

/// A grant in progress for one consumer cluster ([`Shared::flights`]). Liqo keeps one
/// peering user per consumer cluster and a second `liqoctl generate peering-user` fails
/// while the first runs (on the CSR the first one made), so grants for one cluster run one
/// after the other, in one task: a repeated request joins the grant of its contract and
/// gets its answer; a request for another contract waits its turn.
pub(crate) struct Flight {
    /// The contract being granted now, and who asked for it (envelope sender and id).
    pub contract: Id,
    pub answer: Vec<(Id, u64)>,
    /// Requests for other contracts of this cluster, in arrival order.
    pub queued: Vec<QueuedGrant>,
}

/// A PEER_REQUEST that passed its checks, waiting for its cluster's grant in progress.
pub(crate) struct QueuedGrant {
    pub from: Id,
    pub id: u64,
    pub request: crate::wire::PeerRequest,
    pub recipient: Option<p256::PublicKey>,
}

impl Flight {
    pub fn waiters(&self) -> usize {
        self.answer.len() + self.queued.len()
    }
}

/// Longest wait for room in the MQTT client's request queue.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Who waits for answers to one request id.
pub(crate) enum Waiter {
    /// A discovery: every FLAVOURS answer, from anyone, until the window closes.
    Collect(mpsc::Sender<(Id, FlavourList)>),
    /// A reservation: the one answer from `from`.
    Reply { from: Id, tx: oneshot::Sender<Body> },
}

/// What the node task and the consumer flows share.
pub(crate) struct Shared {
    pub cfg: Config,
    pub tables: Tables,
    pub topics: Topics,
    pub client: AsyncClient,
    pub pending: Mutex<heapless::index_map::FnvIndexMap<u64, Waiter, MAX_PENDING>>,
    next_id: AtomicU64,
    advert: AdvertSlot,
    observer: Option<Observer>,
    pub status: watch::Receiver<Status>,
    /// The Virtual Fabric Manager.
    pub fabric: Fabric,
    /// Every workflow step, for control-socket clients following an intent.
    pub steps: broadcast::Sender<Step>,
    /// Provider-side peerings set up at once (each may run kubectl/liqoctl for seconds).
    pub peerings: Arc<Semaphore>,
    /// Provider: the grant in progress per consumer cluster (at most one each; an entry
    /// exists only while its task holds a `peerings` permit, so at most `MAX_PEERINGS`).
    pub flights: Mutex<HashMap<Id, Flight>>,
    /// Provider: consumer clusters whose peering user is to be deleted once the grace after
    /// an expiry is over (one waiting task per cluster, at most one per buyer).
    pub teardowns: Mutex<std::collections::HashSet<Id>>,
    /// Sealing material from the TLS files (`None` on a plain-MQTT loopback/demo domain,
    /// where peering identities travel in clear): see [`crate::seal`]. Set by
    /// [`crate::Agent::start`], replaced by a certificate rotation ([`crate::enrol`]): read it
    /// with [`Shared::sealing`], once per exchange, so a peering that began with one key ends
    /// with it.
    pub sealing: std::sync::RwLock<Option<Arc<crate::seal::Keys>>>,
    /// The Peering Candidates table (in memory: see [`crate::discovery::Candidates`]).
    pub candidates: crate::discovery::Candidates,
    /// Counters for `fluidlet status --json` and the metrics file (atomics only).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The node's stop signal, for tasks the node starts while it runs.
    pub stop: watch::Receiver<bool>,
    /// Tasks started while the node runs that must end before it stops: one per intent
    /// being driven (an intent belongs to the node, not to the control client that
    /// submitted it), and, ended at the stop ([`Shared::own_until_stop`]), one per control
    /// client, per peering grant in progress and per deferred teardown. No task of a running
    /// node is untracked. [`crate::Agent::shutdown`] joins them; finished ones are reaped on
    /// every new spawn, so the set holds only tasks still running.
    pub owned: Mutex<tokio::task::JoinSet<()>>,
    /// The task driving each intent in [`Shared::owned`], for `intent cancel`.
    pub intent_tasks: Mutex<HashMap<Id, tokio::task::AbortHandle>>,
}

impl Shared {
    /// The state of a node about to start (each argument is a part only the node's start
    /// makes; grouping them would only rename them).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        tables: Tables,
        client: AsyncClient,
        advert: AdvertSlot,
        observer: Option<Observer>,
        status: watch::Receiver<Status>,
        fabric: Fabric,
        stop: watch::Receiver<bool>,
    ) -> Result<Shared, TableError> {
        let (steps, _) = broadcast::channel(STEP_QUEUE);
        Ok(Shared {
            metrics: Arc::default(),
            fabric,
            steps,
            peerings: Arc::new(Semaphore::new(MAX_PEERINGS)),
            flights: Mutex::new(HashMap::new()),
            teardowns: Mutex::new(std::collections::HashSet::new()),
            sealing: std::sync::RwLock::new(None),
            candidates: Default::default(),
            tables,
            topics: Topics::new(&cfg.domain, &cfg.node_id),
            client,
            pending: Mutex::new(heapless::index_map::FnvIndexMap::new()),
            next_id: AtomicU64::new(unix_ms().saturating_mul(1024)),
            advert,
            observer,
            status,
            cfg,
            stop,
            owned: Mutex::new(tokio::task::JoinSet::new()),
            intent_tasks: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `task` as one of the node's own tasks ([`Shared::owned`]).
    pub fn own(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let mut set = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(task)
    }

    /// Runs `task` as one of the node's own tasks, ended at its next await when the node
    /// stops (a control client, a peering grant, a deferred teardown: work that a restart
    /// redoes or no longer needs). The shutdown joins it like the others.
    pub fn own_until_stop(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let mut stop = self.stop.clone();
        self.own(async move {
            // Cancel safety: dropping `task` at the stop is what the runtime's end did to
            // these tasks before they were tracked.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = task => {}
            }
        })
    }

    /// Takes the node's own tasks, for the shutdown to join.
    pub fn take_owned(&self) -> tokio::task::JoinSet<()> {
        std::mem::take(&mut *self.owned.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A fresh message id. Seeded from the clock so that ids keep growing across restarts.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The node's metrics now (`fluidlet status --json`, the metrics file).
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let status = self.status.borrow().clone();
        crate::metrics::snapshot(
            &self.metrics,
            &self.tables,
            self.candidates.count(),
            status.connected,
            status.connects,
        )
    }

    /// The sealing material now (see [`Shared::sealing`] the field).
    pub fn sealing(&self) -> Option<Arc<crate::seal::Keys>> {
        self.sealing.read().ok().and_then(|k| k.clone())
    }

    pub fn me(&self) -> &Id {
        &self.cfg.node_id
    }

    /// Reports a workflow step to the observer (the demo prints them) and the log.
    /// Reports a workflow step to the observer, control-socket followers and the debug log;
    /// when none of them listens (a busy provider's normal case) it costs no formatting.
    pub fn step(&self, number: u8, element: &'static str, text: impl std::fmt::Display) {
        if self.observer.is_none()
            && self.steps.receiver_count() == 0
            && !tracing::enabled!(tracing::Level::DEBUG)
        {
            return;
        }
        let step = Step {
            number,
            element,
            node: self.me().clone(),
            text: text.to_string(),
        };
        debug!(step = number, element, "{}", step.text);
        if let Some(o) = &self.observer {
            o(&step);
        }
        // No receiver is the normal case; a slow one loses old steps, never blocks the node.
        let _ = self.steps.send(step);
    }

    /// Builds and publishes a message for `to` (QoS 1).
    pub async fn send(
        &self,
        to: &Id,
        correlation: Option<u64>,
        body: Body,
    ) -> Result<u64, RearError> {
        let msg = Message {
            id: self.next_id(),
            correlation,
            sent_at: unix_ms(),
            sender: self.me().clone(),
            body,
        };
        let topic = self.topics.to(to);
        self.publish(topic, false, &msg).await?;
        Ok(msg.id)
    }

    pub async fn publish(
        &self,
        topic: String,
        retain: bool,
        msg: &Message,
    ) -> Result<(), RearError> {
        let bytes = msg.encode().map_err(RearError::Wire)?;
        // The request queue only drains while the session polls; during a long outage it
        // fills up, and a publish would wait for the broker's return. Give up instead.
        let queued = self.client.publish(topic, QoS::AtLeastOnce, retain, bytes);
        match tokio::time::timeout(PUBLISH_TIMEOUT, queued).await {
            Ok(r) => r.map_err(|e| RearError::Broker(e.to_string())),
            Err(_) => Err(RearError::PublishTimeout),
        }
    }

    /// Registers a waiter for answers correlated with `id`; `Busy` when the map is full.
    pub fn wait_for(&self, id: u64, w: Waiter) -> Result<PendingGuard<'_>, RearError> {
        let mut p = self.pending.lock().map_err(|_| RearError::Busy)?;
        p.insert(id, w).map_err(|_| RearError::Busy)?;
        Ok(PendingGuard { shared: self, id })
    }

    /// [`crate::contracts::peering_in_use`] on this node's tables: the one rule, both sides,
    /// for a grant (reuse the peering or make a user), a release and an expiry (keep it or
    /// tear it down). A table that cannot be read is an error, never "not in use": that
    /// would tear down a peering another contract still uses.
    pub(crate) fn peering_in_use(&self, c: &crate::model::Contract) -> Result<bool, TableError> {
        let mut candidates = Vec::new();
        self.tables.each_contract(|o| {
            if crate::contracts::could_share_peering(c, &o) {
                candidates.push(o.id);
            }
        })?;
        for id in candidates {
            if self.tables.peer_grant(&id)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Publishes the current flavours as this node's retained catalog entry.
    pub(crate) async fn publish_advert(&self) -> Result<(), AgentError> {
        let own = self.tables.flavours()?;
        let flavours: Vec<_> = own.into_iter().map(|o| o.flavour).collect();
        let msg = Message {
            id: self.next_id(),
            correlation: None,
            sent_at: unix_ms(),
            sender: self.me().clone(),
            body: Body::Advert(Flavours::own(FlavourList::from_slice_truncated(&flavours))),
        };
        let bytes = msg.encode()?;
        if let Ok(mut slot) = self.advert.lock() {
            slot.clone_from(&bytes);
        }
        // The same bound as every other publish: during an outage the request queue does not
        // drain, and the advert (kept above for the next connect) must not hold its caller.
        let queued = self
            .client
            .publish(self.topics.my_catalog(), QoS::AtLeastOnce, true, bytes);
        match tokio::time::timeout(PUBLISH_TIMEOUT, queued).await {
            Ok(r) => r.map_err(|e| AgentError::Broker(e.to_string()))?,
            Err(_) => return Err(AgentError::Broker(RearError::PublishTimeout.to_string())),
        }
        debug!(flavours = flavours.len(), "advert published");
        Ok(())
    }
}

/// Removes a pending entry when the waiting flow ends, however it ends.
pub(crate) struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.swap_remove(&self.id);
        }
    }
}

/// Why a consumer flow ended without a contract.
#[derive(Debug, thiserror::Error)]
pub enum RearError {
    #[error("no provider offers {0}")]
    NoProvider(String),
    #[error("provider {provider} refused: {text}{}", code.map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused {
        provider: String,
        code: Option<ErrorCode>,
        text: String,
    },
    #[error("provider {0} did not answer RESERVE_FLAVOUR in time")]
    Timeout(String),
    #[error(transparent)]
    BadAnswer(#[from] BadAnswer),
    #[error("too many requests in flight; try again")]
    Busy,
    #[error("broker: {0}")]
    Broker(String),
    #[error("not connected to the domain broker ({0})")]
    Disconnected(String),
    #[error("the MQTT client could not queue a message in time (broker unreachable?)")]
    PublishTimeout,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("peering: {0}")]
    Fabric(#[from] crate::fabric::FabricError),
    #[error("no contract {0} on this node")]
    NoContract(String),
    #[error("contract {0} was sold by this node: only its buyer releases it")]
    SoldHere(String),
}
