//! The running node: starts the tables and the broker session, serves the provider side of
//! REAR, routes answers to the consumer flows waiting for them, and stops cleanly.
//!
//! Two tasks: the broker session ([`crate::broker::run`]) and the node task ([`serve`]),
//! which handles inbound messages one at a time. Handling them one at a time is deliberate:
//! a reservation's check and its durable write then never interleave with another one on
//! this node (the sled transaction would also catch it, but sequential handling means no
//! retry storms), and a reservation costs one flush, well under the broker round trip.
//! Consumer flows ([`Agent::acquire`]) run in the caller's task and meet their answers
//! through the bounded pending map: the node task hands each FLAVOURS, RESERVED or ERROR to
//! the flow whose request id it correlates with, if that flow is still waiting.
//!
//! Every refusal of a peer's message is answered with ERROR to the sender the topic names
//! and logged at warn, except ERROR messages themselves, which are never answered (two
//! agents that cannot understand each other would otherwise ping-pong forever).

use crate::broker::{self, AdvertSlot, Inbound, Status};
use crate::config::Config;
use crate::discovery;
use crate::fabric::Fabric;
use crate::model::ContractState;
use crate::model::{Contract, FlavourList, FlavourSelector, Id, ReserveRequest};
use crate::rear::{self, RearError};
use crate::tables::{Reservation, TableError, Tables};
use crate::wire::{Body, ErrorBody, ErrorCode, Flavours, Message, Route, Topics, WireError};
use crate::wire::{ContractRef, PeerAccept, PeerRequest};
use crate::{unix_ms, AgentError, Observer, Step};
use rumqttc::{AsyncClient, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Consumer requests waiting for answers at once (discoveries and reservations). A bound of
/// the protocol: beyond it a new request fails with `Busy` rather than growing a map.
pub const MAX_PENDING: usize = 64;

/// What the Network Manager does when a contract is signed (steps 18 and 19). With Liqo v1
/// there is nothing to deploy yet: `liqoctl peer` (steps 26-27) sets up the WireGuard
/// gateways that give the two clusters reachability. See docs/fabric.md.
pub(crate) const NETWORK_NOTE: &str =
    "informed of the contract: reachability comes with the Liqo peering (gateway set up at step 27)";

/// Most reservations made durable by one flush (group commit).
const MAX_BATCH: usize = 64;

/// Steps buffered for a control-socket client that reads slowly; older ones are dropped.
const STEP_QUEUE: usize = 64;
/// Provider-side peering set-ups running at once; more are refused with BUSY.
const MAX_PEERINGS: usize = 4;

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
    peerings: Arc<Semaphore>,
    /// Sealing material from the TLS files (`None` on a plain-MQTT loopback/demo domain,
    /// where peering identities travel in clear): see [`crate::seal`].
    pub sealing: Option<crate::seal::Keys>,
    /// Unpeered reservations per buyer (provider side), for `limits.pending_per_buyer`.
    /// Counted up at every new reservation and never down: a buyer that reaches the limit
    /// is counted again from the contracts table (peered, released and lapsed ones drop out).
    unpeered: Mutex<HashMap<Id, u32>>,
}

impl Shared {
    /// A fresh message id. Seeded from the clock so that ids keep growing across restarts.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
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

    /// `Some(limit)` when `buyer` holds `limits.pending_per_buyer` unpeered reservations.
    fn pending_full(&self, buyer: &Id) -> Option<u32> {
        let limit = self.cfg.limits.pending_per_buyer;
        let Ok(mut map) = self.unpeered.lock() else {
            return None;
        };
        if map.get(buyer).copied().unwrap_or(0) < limit {
            return None;
        }
        // At the limit by the running count: count again from the table.
        let n = match self.tables.unpeered_by_buyer(self.me()) {
            Ok(all) => all.get(buyer).copied().unwrap_or(0),
            Err(e) => {
                error!(error = %e, "cannot count unpeered reservations; assuming the limit");
                limit
            }
        };
        if n == 0 {
            map.remove(buyer);
        } else {
            map.insert(buyer.clone(), n);
        }
        (n >= limit).then_some(limit)
    }

    fn count_unpeered(&self, buyer: &Id) {
        if let Ok(mut map) = self.unpeered.lock() {
            *map.entry(buyer.clone()).or_insert(0) += 1;
        }
    }

    /// Registers a waiter for answers correlated with `id`; `Busy` when the map is full.
    pub fn wait_for(&self, id: u64, w: Waiter) -> Result<PendingGuard<'_>, RearError> {
        let mut p = self.pending.lock().map_err(|_| RearError::Busy)?;
        p.insert(id, w).map_err(|_| RearError::Busy)?;
        Ok(PendingGuard { shared: self, id })
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
            body: Body::Advert(Flavours {
                flavours: FlavourList::from_slice_truncated(&flavours),
            }),
        };
        let bytes = msg.encode()?;
        if let Ok(mut slot) = self.advert.lock() {
            slot.clone_from(&bytes);
        }
        self.client
            .publish(self.topics.my_catalog(), QoS::AtLeastOnce, true, bytes)
            .await
            .map_err(|e| AgentError::Broker(e.to_string()))?;
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

/// A running node. Dropping it without [`Agent::shutdown`] stops nothing cleanly; call it.
pub struct Agent {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Opens the tables, brings the offers in line with the config, connects to the broker
    /// and starts serving. Returns as soon as the tasks run; see [`Agent::connected`].
    pub async fn start(cfg: Config, observer: Option<Observer>) -> Result<Agent, AgentError> {
        let (tls, sealing) = prepare_transport(&cfg)?;
        let tables = Tables::open_for(&cfg.data_dir, &cfg.node_id).await?;
        tables.sync_offers(&cfg.offers).await?;
        let topics = Topics::new(&cfg.domain, &cfg.node_id);
        let (client, events) = broker::connect(&cfg, &topics, tls);
        let (inbound_tx, inbound_rx) = mpsc::channel(broker::INBOUND_QUEUE);
        let catalog = Arc::new(broker::CatalogInbox::default());
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let advert = AdvertSlot::default();
        let fabric = Fabric::new(cfg.fabric.clone(), &cfg.data_dir, &cfg.node_id);
        let unpeered = Mutex::new(tables.unpeered_by_buyer(&cfg.node_id)?);
        let (steps, _) = broadcast::channel(STEP_QUEUE);
        let shared = Arc::new(Shared {
            fabric,
            steps,
            peerings: Arc::new(Semaphore::new(MAX_PEERINGS)),
            sealing,
            unpeered,
            tables,
            topics: topics.clone(),
            client: client.clone(),
            pending: Mutex::new(heapless::index_map::FnvIndexMap::new()),
            next_id: AtomicU64::new(unix_ms().saturating_mul(1024)),
            advert: advert.clone(),
            observer,
            status: status_rx,
            cfg,
        });
        let session = broker::Session {
            events,
            client,
            topics,
            watch_catalog: shared.cfg.watch_catalog,
            inbound: inbound_tx,
            catalog: catalog.clone(),
            advert,
            status: status_tx,
            limits: broker::SenderLimits::new(
                shared.cfg.limits.sender_rate,
                shared.cfg.limits.sender_burst,
            ),
        };
        let session = tokio::spawn(session.run(stop_rx.clone()));
        if !shared.cfg.offers.is_empty() {
            shared.publish_advert().await?;
        }
        let node = tokio::spawn(serve(shared.clone(), inbound_rx, catalog, stop_rx.clone()));
        let resumer = tokio::spawn(resume_when_connected(shared.clone(), stop_rx.clone()));
        let sweeper = tokio::spawn(sweep_lapsed(shared.clone(), stop_rx.clone()));
        let renewer = tokio::spawn(crate::terms::keep_renewed(shared.clone(), stop_rx.clone()));
        let mut tasks = vec![resumer, sweeper, renewer];
        tasks.extend(crate::orchestrator::start(shared.clone(), stop_rx).await?);
        info!(node = %shared.me(), domain = %shared.cfg.domain, "fluidlet node started");
        Ok(Agent {
            shared,
            stop: stop_tx,
            tasks: {
                tasks.push(node);
                tasks.push(session);
                tasks
            },
        })
    }

    pub fn node_id(&self) -> &Id {
        self.shared.me()
    }

    /// The node's tables, for inspection (status, tests). Keep no clone past shutdown.
    pub fn tables(&self) -> &Tables {
        &self.shared.tables
    }

    pub fn broker_status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// Waits until the broker session is up and its subscriptions are acknowledged (so
    /// requests addressed to this node reach it), at most `limit`.
    pub async fn connected(&self, limit: Duration) -> bool {
        let mut rx = self.shared.status.clone();
        tokio::time::timeout(limit, rx.wait_for(|s| s.connected && s.subscribed))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Workflow steps 1-31 for one intent: stores it, finds or buys capacity, peers, deploys.
    /// Returns the intent as it ended (Placed, or Failed with the reason).
    pub async fn submit_intent(
        &self,
        spec: crate::orchestrator::IntentSpec,
    ) -> Result<crate::model::Intent, AgentError> {
        crate::orchestrator::submit(&self.shared, spec).await
    }

    /// Releases a contract this node bought (RELEASE to the seller, peering torn down).
    pub async fn release(&self, contract: &Id) -> Result<Contract, RearError> {
        rear::release(&self.shared, contract).await
    }

    /// The consumer side of REAR for one selector: candidates, discovery if needed,
    /// reservation (workflow steps 5-20). Returns the durable contract.
    pub async fn acquire(&self, selector: &FlavourSelector) -> Result<Contract, RearError> {
        rear::acquire(&self.shared, selector).await
    }

    /// Stops taking messages, finishes the one in hand, withdraws the advert, disconnects
    /// and flushes the tables.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Err(e) = self.shared.tables.flush().await {
            error!(error = %e, "final flush failed");
        }
        info!(node = %self.shared.me(), "fluidlet node stopped");
    }

    /// Stops every task at once without a word to the broker, as a crash would: the
    /// connection drops without DISCONNECT (the broker fires the will) and nothing is
    /// flushed beyond what was already durable. For tests of crash behaviour.
    #[doc(hidden)]
    pub fn abort(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Loads and checks the TLS material (an error names the file and the problem), logs its
/// warnings, and warns about plain MQTT that leaves the machine.
type Transport = (Option<Arc<rustls::ClientConfig>>, Option<crate::seal::Keys>);

fn prepare_transport(cfg: &Config) -> Result<Transport, AgentError> {
    let Some(files) = &cfg.tls else {
        if !crate::config::is_loopback(&cfg.broker.host) {
            warn!(broker = %cfg.broker.host, "plain MQTT to another machine (insecure_plaintext = true): anyone on the path can read and forge this node's messages");
        }
        return Ok((None, None));
    };
    let loaded = crate::tls::load(files, &cfg.node_id)?;
    for w in &loaded.warnings {
        warn!("{w}");
    }
    info!(cn = %loaded.identity.common_name, "mutual TLS to the domain broker");
    let keys = crate::seal::Keys::new(&loaded.certificate, &loaded.key, loaded.roots.clone())
        .map_err(|e| AgentError::Other(format!("{}: {e}", files.key.display())))?;
    Ok((Some(loaded.client), Some(keys)))
}

/// Finishes purchases left in flight by a previous run, once the broker is reachable.
async fn resume_when_connected(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    if shared
        .tables
        .purchases_in_flight()
        .map_or(true, |p| p.is_empty())
    {
        return;
    }
    let mut status = shared.status.clone();
    // Cancel safety: the resume may stop between two attempts; the records stay in the
    // table and the next start resumes them again.
    tokio::select! {
        _ = stop.changed() => {}
        _ = async {
            if status.wait_for(|s| s.connected).await.is_ok() {
                rear::resume(&shared).await;
            }
        } => {}
    }
}

/// Contract Manager: ends reservations that were never peered before their expiry, on both
/// sides; a provider gets the capacity back and re-advertises it at once.
async fn sweep_lapsed(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.cfg.expiry_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Cancel safety: a tick has no state; an expiry in progress is not interrupted
        // because the work happens after select! has chosen.
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let lapsed = match shared.tables.lapsed(unix_ms()) {
            Ok(v) => v,
            Err(e) => {
                error!(error = %e, "cannot read contracts for expiry");
                continue;
            }
        };
        for c in lapsed {
            match shared
                .tables
                .end_contract(&c.id, ContractState::Expired, unix_ms())
                .await
            {
                Ok(Some(_)) => {
                    info!(contract = %c.id, buyer = %c.buyer, seller = %c.seller, "contract expired (unpeered, or its term ran out unrenewed); resources returned");
                    if &c.seller == shared.me() {
                        if let Err(e) = shared.publish_advert().await {
                            warn!(error = %e, "could not re-publish the advert");
                        }
                        crate::terms::expired_sold(&shared, &c).await;
                    } else {
                        rear::teardown_bought(&shared, &c).await;
                    }
                }
                Ok(None) => {}
                Err(e) => error!(contract = %c.id, error = %e, "expiry failed"),
            }
        }
    }
}

/// The node task: one inbound message at a time until told to stop.
async fn serve(
    shared: Arc<Shared>,
    mut inbound: mpsc::Receiver<Inbound>,
    catalog: Arc<broker::CatalogInbox>,
    mut stop: watch::Receiver<bool>,
) {
    // A message taken from the queue while a batch was being gathered, handled next.
    let mut held: Option<Sorted> = None;
    loop {
        let sorted = match held.take() {
            Some(m) => m,
            None => {
                // Cancel safety: neither branch mutates state before it completes; a message
                // is handled in the body, after select! has chosen, so it is never
                // half-handled.
                let m = tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    m = inbound.recv() => m,
                    _ = catalog.wait() => {
                        for advert in catalog.take() {
                            handle(&shared, advert).await;
                        }
                        continue;
                    }
                };
                let Some(m) = m else { break };
                sort(&shared, m)
            }
        };
        let first = match sorted {
            Sorted::Reserve(r) => r,
            Sorted::Mail(from, m) => {
                on_addressed(&shared, from, m).await;
                continue;
            }
            Sorted::Other(m) => {
                handle(&shared, m).await;
                continue;
            }
        };
        // Group commit: take the RESERVE_FLAVOURs already queued behind this one (never
        // waiting for more), stopping at the first other message, which keeps its place.
        let mut batch = vec![first];
        while shared.cfg.group_commit && batch.len() < MAX_BATCH {
            match inbound.try_recv() {
                Ok(m) => match sort(&shared, m) {
                    Sorted::Reserve(r) => batch.push(r),
                    other => {
                        held = Some(other);
                        break;
                    }
                },
                Err(_) => break,
            }
        }
        on_reserve_batch(&shared, batch).await;
    }
}

async fn handle(
    shared: &Arc<Shared>,
    Inbound {
        topic,
        payload,
        limited,
    }: Inbound,
) {
    let Some(route) = shared.topics.parse(&topic) else {
        warn!(%topic, "message on a topic outside this node's scheme ignored");
        return;
    };
    if limited {
        if let Route::Addressed { from, .. } | Route::Discovery { from } = &route {
            return over_rate(shared, from, &payload).await;
        }
    }
    match route {
        Route::Catalog { node } => on_catalog(shared, node, &payload).await,
        Route::Addressed { to, from } => {
            if &to != shared.me() {
                warn!(%topic, "mail for another node delivered here; broker ACLs are wrong");
                return;
            }
            if let Some(msg) = decode_or_answer(shared, &from, &payload).await {
                on_addressed(shared, from, msg).await;
            }
        }
        Route::Discovery { from } => {
            if &from == shared.me() {
                return;
            }
            if let Some(msg) = decode_or_answer(shared, &from, &payload).await {
                match msg.body {
                    Body::ListFlavours(l) => {
                        answer_list(shared, &from, msg.id, &l.selector, false).await
                    }
                    other => unexpected(shared, &from, msg.id, other.kind(), "discovery").await,
                }
            }
        }
    }
}

/// The first message of a sender over its rate limit: answered BUSY (the ones after it are
/// dropped by the session task until the sender slows down).
async fn over_rate(shared: &Shared, from: &Id, payload: &[u8]) {
    let l = &shared.cfg.limits;
    warn!(%from, rate = l.sender_rate, burst = l.sender_burst, "sender over its rate limit; its messages are dropped until it slows down");
    let msg = Message::decode(payload).ok();
    if msg
        .as_ref()
        .is_some_and(|m| matches!(m.body, Body::Error(_)))
    {
        return;
    }
    let text = format!(
        "rate limit: at most {} messages/s (bursts of {}) per sender; \
         this and further messages are dropped until the rate falls",
        l.sender_rate, l.sender_burst
    );
    answer_error(shared, from, msg.map(|m| m.id), ErrorCode::Busy, &text).await;
}

/// Decodes a payload from `from`; on failure answers ERROR and returns `None`. Also refuses
/// a message whose envelope names a sender other than the topic's.
async fn decode_or_answer(shared: &Shared, from: &Id, payload: &[u8]) -> Option<Message> {
    match Message::decode(payload) {
        Ok(msg) if &msg.sender != from => {
            warn!(%from, sender = %msg.sender, "envelope sender contradicts the topic");
            if !matches!(msg.body, Body::Error(_)) {
                let text = format!("envelope sender {} but topic says {from}", msg.sender);
                answer_error(shared, from, Some(msg.id), ErrorCode::Unexpected, &text).await;
            }
            None
        }
        Ok(msg) => Some(msg),
        Err(e) => {
            warn!(%from, error = %e, "refused a message");
            answer_wire_error(shared, from, &e).await;
            None
        }
    }
}

async fn answer_wire_error(shared: &Shared, to: &Id, e: &WireError) {
    answer_error(shared, to, e.message_id(), e.code(), &e.to_string()).await;
}

async fn answer_error(
    shared: &Shared,
    to: &Id,
    correlation: Option<u64>,
    code: ErrorCode,
    text: &str,
) {
    let body = Body::Error(ErrorBody::new(code, text));
    if let Err(e) = shared.send(to, correlation, body).await {
        warn!(%to, error = %e, "could not send ERROR");
    }
}

async fn unexpected(shared: &Shared, from: &Id, id: u64, kind: crate::wire::Kind, place: &str) {
    warn!(%from, ?kind, place, "message kind has no meaning here");
    let text = format!("{kind:?} is not accepted on {place} topics");
    answer_error(shared, from, Some(id), ErrorCode::Unexpected, &text).await;
}

async fn on_catalog(shared: &Shared, node: Id, payload: &[u8]) {
    if &node == shared.me() {
        return;
    }
    if payload.is_empty() {
        debug!(%node, "catalog entry cleared: provider gone");
        if let Err(e) = shared.tables.replace_candidates(&node, &[], unix_ms()) {
            error!(error = %e, "peering candidates update failed");
        }
        return;
    }
    let Some(msg) = decode_or_answer(shared, &node, payload).await else {
        return;
    };
    let Body::Advert(a) = msg.body else {
        return unexpected(shared, &node, msg.id, msg.body.kind(), "catalog").await;
    };
    if let Some(f) = a.flavours.iter().find(|f| f.provider != node) {
        warn!(%node, provider = %f.provider, "advert offers another node's flavour; ignored");
        return;
    }
    let flavours: Vec<_> = a.flavours.iter().cloned().collect();
    if let Err(e) = shared
        .tables
        .replace_candidates(&node, &flavours, unix_ms())
    {
        error!(error = %e, "peering candidates update failed");
    }
    debug!(%node, flavours = flavours.len(), "catalog advert stored as peering candidates");
}

async fn on_addressed(shared: &Arc<Shared>, from: Id, msg: Message) {
    match msg.body {
        Body::ListFlavours(l) => answer_list(shared, &from, msg.id, &l.selector, true).await,
        Body::ReserveFlavour(req) => {
            if req.buyer != from {
                let text = format!("buyer {} but sent by {from}", req.buyer);
                return answer_error(shared, &from, Some(msg.id), ErrorCode::Unexpected, &text)
                    .await;
            }
            on_reserve_batch(shared, vec![(from, msg.id, req)]).await
        }
        Body::PeerRequest(req) => on_peer_request(shared, from, msg.id, req).await,
        Body::Release(r) => on_release(shared, &from, msg.id, r).await,
        Body::Renew(r) => crate::terms::on_renew(shared, &from, msg.id, r).await,
        Body::Flavours(_)
        | Body::Reserved(_)
        | Body::Error(_)
        | Body::PeerAccept(_)
        | Body::Released(_)
        | Body::Renewed(_) => deliver(shared, from, msg),
        Body::Advert(_) => unexpected(shared, &from, msg.id, msg.body.kind(), "addressed").await,
    }
}

/// Hands an answer to the flow waiting for it, if any.
fn deliver(shared: &Shared, from: Id, msg: Message) {
    let Some(corr) = msg.correlation else {
        if let Body::Error(e) = &msg.body {
            warn!(%from, code = e.code, text = %e.text, "uncorrelated ERROR received");
        }
        return;
    };
    let Ok(mut pending) = shared.pending.lock() else {
        return;
    };
    match (pending.get(&corr), msg.body) {
        (Some(Waiter::Collect(tx)), Body::Flavours(f)) => {
            if tx.try_send((from, f.flavours)).is_err() {
                debug!("discovery answer after its window or over its queue; dropped");
            }
        }
        (Some(Waiter::Reply { from: want, .. }), body) if *want == from => {
            if let Some(Waiter::Reply { tx, .. }) = pending.swap_remove(&corr) {
                let _ = tx.send(body);
            }
        }
        (_, Body::Error(e)) => {
            debug!(%from, code = e.code, text = %e.text, "ERROR for no waiting request");
        }
        _ => debug!(%from, corr, "late or unexpected answer dropped"),
    }
}

/// Discovery Manager, provider side (workflow steps 8-9). Broadcast requests are answered
/// only when something matches, so a large domain does not answer each one N times.
async fn answer_list(
    shared: &Shared,
    from: &Id,
    id: u64,
    sel: &crate::model::FlavourSelector,
    always: bool,
) {
    let own = match shared.tables.flavours() {
        Ok(v) => v,
        Err(e) => {
            error!(error = %e, "cannot read available resources");
            return answer_error(
                shared,
                from,
                Some(id),
                ErrorCode::Storage,
                "cannot read flavours",
            )
            .await;
        }
    };
    let found = discovery::matching(own.iter().map(|o| &o.flavour), sel);
    shared.step(
        8,
        "Discovery Manager",
        format_args!(
            "LIST_FLAVOURS from {from}: {} local flavour(s) match",
            found.len()
        ),
    );
    if found.is_empty() && !always {
        return;
    }
    let body = Body::Flavours(Flavours {
        flavours: FlavourList::from_slice_truncated(&found),
    });
    match shared.send(from, Some(id), body).await {
        Ok(_) => shared.step(
            9,
            "Discovery Manager",
            format_args!("FLAVOURS sent to {from}"),
        ),
        Err(e) => warn!(%from, error = %e, "could not answer LIST_FLAVOURS"),
    }
}

/// A RESERVE_FLAVOUR waiting in a group commit: who asked, the request id, the request.
type PendingReserve = (Id, u64, ReserveRequest);

/// Contract Manager and REAR Manager, provider side (workflow steps 15-18), for a batch of
/// requests that arrived together (group commit): each is checked and written in its own sled
/// transaction, then ONE flush makes them all durable, then they are answered. No OK leaves
/// before the flush that covers it has returned; if the flush fails, every new reservation of
/// the batch is answered STORAGE instead (it may survive in the tables, unpeered, and lapse at
/// expiry, so it is never sold twice nor acknowledged without being on disk).
async fn on_reserve_batch(shared: &Shared, batch: Vec<PendingReserve>) {
    let ttl = shared.cfg.reservation_ttl.as_millis() as u64;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (from, id, req) in batch {
        shared.step(
            15,
            "Contract Manager",
            format_args!(
                "RESERVE_FLAVOUR from {from} for {} (transaction {})",
                req.flavour, req.transaction
            ),
        );
        let admit = crate::terms::admission(shared, &req, shared.pending_full(&req.buyer));
        let outcome = shared
            .tables
            .reserve_unflushed(shared.me(), &req, unix_ms(), ttl, &admit);
        if let Ok(Reservation::New(_)) = &outcome {
            shared.count_unpeered(&req.buyer);
        }
        outcomes.push((from, id, req, outcome));
    }
    let any_new = outcomes
        .iter()
        .any(|(.., o)| matches!(o, Ok(Reservation::New(_))));
    let durable = if any_new {
        shared.tables.flush().await.map_err(|e| e.to_string())
    } else {
        Ok(())
    };
    for (from, id, req, outcome) in outcomes {
        let body = match (outcome, &durable) {
            (Ok(Reservation::New(c)), Ok(())) => {
                shared.step(
                    16,
                    "REAR Manager",
                    format_args!(
                        "flavour {} removed, reduced flavour created, Node allocation {} inactive",
                        req.flavour, c.id
                    ),
                );
                shared.step(
                    17,
                    "REAR Manager",
                    format_args!("resources reserved; contract {} flushed to disk", c.id),
                );
                info!(contract = %c.id, buyer = %from, "reservation made");
                Body::Reserved(Box::new(c))
            }
            (Ok(Reservation::Repeat(c)), _) => {
                info!(contract = %c.id, tx = %req.transaction, "repeated transaction: first answer sent again");
                Body::Reserved(Box::new(c))
            }
            (Ok(Reservation::Refused(r)), _) => {
                info!(%from, flavour = %req.flavour, reason = %r, "reservation refused");
                Body::Error(ErrorBody::new(r.code(), &r.to_string()))
            }
            (Ok(Reservation::New(c)), Err(e)) => {
                error!(contract = %c.id, error = %e, "flush failed: reservation not acknowledged");
                Body::Error(ErrorBody::new(
                    ErrorCode::Storage,
                    "the provider could not make the reservation durable; retry later",
                ))
            }
            (Err(e), _) => {
                error!(error = %e, "reservation could not be stored; refused");
                Body::Error(ErrorBody::new(
                    ErrorCode::Storage,
                    "the provider could not store the reservation; nothing was reserved",
                ))
            }
        };
        let ok = matches!(body, Body::Reserved(_));
        match shared.send(&from, Some(id), body).await {
            Ok(_) if ok => {
                shared.step(
                    18,
                    "Contract Manager",
                    format_args!("OK (RESERVED) sent to {from}"),
                );
                shared.step(18, "Network Manager", NETWORK_NOTE);
            }
            Ok(_) => {}
            Err(e) => warn!(%from, error = %e, "could not answer RESERVE_FLAVOUR"),
        }
    }
    // The new advert goes out after the answers: buyers wait on the answer, the catalog
    // only informs.
    if any_new && durable.is_ok() {
        if let Err(e) = shared.publish_advert().await {
            warn!(error = %e, "could not re-publish the advert");
        }
    }
}

/// An inbound message, decoded once and sorted for the node task. Only one or two exist at a
/// time (the message in hand and one held back), so the inline request is not worth a box.
#[allow(clippy::large_enum_variant)]
enum Sorted {
    /// A well-formed RESERVE_FLAVOUR for this node whose envelope sender and buyer are the
    /// topic's sender: goes into a group commit.
    Reserve(PendingReserve),
    /// Any other well-formed mail for this node from the sender its topic names.
    Mail(Id, Message),
    /// Everything else (catalog, discovery, errors to answer): [`handle`] deals with it.
    Other(Inbound),
}

fn sort(shared: &Shared, msg: Inbound) -> Sorted {
    if msg.limited {
        return Sorted::Other(msg);
    }
    let Some(Route::Addressed { to, from }) = shared.topics.parse(&msg.topic) else {
        return Sorted::Other(msg);
    };
    if &to != shared.me() {
        return Sorted::Other(msg);
    }
    match Message::decode(&msg.payload) {
        Ok(m) if m.sender == from => match m.body {
            Body::ReserveFlavour(req) if req.buyer == from => Sorted::Reserve((from, m.id, req)),
            _ => Sorted::Mail(from, m),
        },
        _ => Sorted::Other(msg),
    }
}

/// Finds the contract `id` that this node sold to `buyer`, or says why not.
fn sold_to(shared: &Shared, id: &Id, buyer: &Id) -> Result<crate::model::Contract, String> {
    match shared.tables.contract(id) {
        Ok(Some(c)) if &c.seller == shared.me() && &c.buyer == buyer => Ok(c),
        Ok(_) => Err(format!("no contract {id} sold to {buyer}")),
        Err(e) => Err(format!("cannot read contracts: {e}")),
    }
}

/// Virtual Fabric Manager, provider side (workflow steps 23-26): a peering is granted only for
/// a signed, live contract of the node asking; anything else is refused. A repeated request
/// gets the first grant again (the peering user cannot be generated twice).
async fn on_peer_request(shared: &Arc<Shared>, from: Id, id: u64, req: PeerRequest) {
    let c = match sold_to(shared, &req.contract, &from) {
        Ok(c) if matches!(c.state, ContractState::Reserved | ContractState::Active) => c,
        Ok(c) => {
            let text = format!("contract {} is {:?}", c.id, c.state);
            return answer_error(shared, &from, Some(id), ErrorCode::NoContract, &text).await;
        }
        Err(text) => {
            warn!(%from, contract = %req.contract, "peering refused: {text}");
            return answer_error(shared, &from, Some(id), ErrorCode::NoContract, &text).await;
        }
    };
    let recipient = match crate::seal::recipient(shared.sealing.as_ref(), &req, &from) {
        Ok(r) => r,
        Err(e) => {
            warn!(%from, contract = %req.contract, error = %e, "peering refused");
            let text = e.to_string();
            return answer_error(shared, &from, Some(id), ErrorCode::BadCertificate, &text).await;
        }
    };
    if let Ok(Some(grant)) = shared.tables.peer_grant(&c.id) {
        if let Err(e) = shared.send(&from, Some(id), Body::PeerAccept(grant)).await {
            warn!(%from, error = %e, "could not answer PEER_REQUEST");
        }
        return;
    }
    let Ok(permit) = shared.peerings.clone().try_acquire_owned() else {
        return answer_error(
            shared,
            &from,
            Some(id),
            ErrorCode::Busy,
            "too many peerings in progress",
        )
        .await;
    };
    let shared = shared.clone();
    // The fabric may take seconds: the node task goes on serving meanwhile.
    tokio::spawn(async move {
        let _permit = permit;
        shared.step(
            23,
            "Virtual Fabric Manager",
            format_args!(
                "contract {} signed with {from} found: granting the peering to cluster {}",
                c.id, req.cluster_id
            ),
        );
        let grant = match grant_peering(&shared, &c, &req, recipient.as_ref()).await {
            Ok(g) => g,
            Err((code, text)) => {
                error!(contract = %c.id, "peering grant failed: {text}");
                return answer_error(&shared, &from, Some(id), code, &text).await;
            }
        };
        shared.step(
            24,
            "Virtual Fabric Manager",
            format_args!("peering for {} granted; REAR Manager informed", c.id),
        );
        shared.step(
            25,
            "REAR Manager",
            format_args!("Node allocation {} active", c.id),
        );
        match shared.send(&from, Some(id), Body::PeerAccept(grant)).await {
            Ok(_) => shared.step(
                26,
                "Virtual Fabric Manager",
                format_args!("peering artefacts (Liqo ResourceOffer) sent to {from}"),
            ),
            Err(e) => warn!(%from, error = %e, "could not send PEER_ACCEPT"),
        }
    });
}

/// Step 23's work: the peering user (unless the buyer already peers with us), this cluster's
/// id, and the record of both, with the contract activated (steps 24-25).
async fn grant_peering(
    shared: &Shared,
    c: &Contract,
    req: &PeerRequest,
    recipient: Option<&p256::PublicKey>,
) -> Result<PeerAccept, (ErrorCode, String)> {
    let failed = |e: &dyn std::fmt::Display| (ErrorCode::PeeringFailed, e.to_string());
    let reuse = shared
        .tables
        .contracts()
        .unwrap_or_default()
        .iter()
        .any(|o| o.id != c.id && o.buyer == c.buyer && o.state == ContractState::Active);
    let plan = crate::fabric::plan_grant(&req.cluster_id, reuse);
    let out = shared
        .fabric
        .execute(c.id.as_str(), &plan)
        .await
        .map_err(|e| failed(&e))?;
    let identity = match plan.is_empty() {
        true => None,
        false => Some(
            crate::model::LongText::new(&out)
                .map_err(|e| failed(&format!("peering identity too large: {e}")))?,
        ),
    };
    let ctx = crate::seal::Context {
        contract: &c.id,
        provider: shared.me(),
        buyer: &c.buyer,
    };
    let (identity, sealed) =
        crate::seal::protect(recipient, &ctx, identity).map_err(|e| failed(&e))?;
    let grant = PeerAccept {
        contract: c.id.clone(),
        cluster_id: shared.fabric.cluster_id().await.map_err(|e| failed(&e))?,
        identity,
        sealed,
    };
    let storage = |e: TableError| {
        (
            ErrorCode::Storage,
            format!("could not record the peering: {e}"),
        )
    };
    shared.tables.put_peer_grant(&grant).map_err(storage)?;
    shared
        .tables
        .put_peer_cluster(&c.id, &req.cluster_id)
        .map_err(storage)?;
    shared
        .tables
        .activate(&c.id, unix_ms())
        .await
        .map_err(storage)?;
    Ok(grant)
}

/// Contract Manager, provider side of a release: the capacity goes back into the offer (and
/// the advert), the peering user goes when no other contract of that consumer needs it.
/// Releasing an already released contract is answered RELEASED again.
async fn on_release(shared: &Shared, from: &Id, id: u64, r: ContractRef) {
    let c = match sold_to(shared, &r.contract, from) {
        Ok(c) => c,
        Err(text) => {
            return answer_error(shared, from, Some(id), ErrorCode::NoContract, &text).await
        }
    };
    match shared
        .tables
        .end_contract(&c.id, ContractState::Released, unix_ms())
        .await
    {
        Ok(Some(_)) => {
            info!(contract = %c.id, buyer = %from, "contract released; resources returned");
            if let Err(e) = shared.publish_advert().await {
                warn!(error = %e, "could not re-publish the advert");
            }
            let others = shared
                .tables
                .contracts()
                .unwrap_or_default()
                .iter()
                .any(|o| {
                    o.id != c.id
                        && o.buyer == c.buyer
                        && matches!(o.state, ContractState::Reserved | ContractState::Active)
                });
            let consumer_cluster = shared.tables.peer_cluster(&c.id).ok().flatten();
            if let Some(cluster) = consumer_cluster {
                let plan = crate::fabric::plan_teardown_provider(&cluster, !others);
                if let Err(e) = shared.fabric.execute(c.id.as_str(), &plan).await {
                    warn!(contract = %c.id, error = %e, "peering teardown failed");
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            error!(contract = %c.id, error = %e, "release failed");
            return answer_error(
                shared,
                from,
                Some(id),
                ErrorCode::Storage,
                "could not store the release",
            )
            .await;
        }
    }
    let body = Body::Released(ContractRef { contract: c.id });
    if let Err(e) = shared.send(from, Some(id), body).await {
        warn!(%from, error = %e, "could not send RELEASED");
    }
}

/// Runs a node until `shutdown` completes (the binary passes ctrl-c / SIGTERM).
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let agent = Agent::start(cfg, None).await?;
    shutdown.await;
    info!("stop requested");
    agent.shutdown().await;
    Ok(())
}
