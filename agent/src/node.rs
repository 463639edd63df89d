//! The running node: starts the tables, the broker session and the node's tasks, hands each
//! inbound request to the provider side of REAR ([`crate::rear::provider`]), routes answers to
//! the consumer flows waiting for them ([`crate::rear::consumer`]), and stops cleanly.
//!
//! [`Agent::start`] is the one place that starts the node's tasks: the broker session
//! ([`crate::broker::Session::run`]), the node task ([`serve`]), the resumption of purchases
//! left in flight, the expiry sweeper, the control socket (`control::serve`), the provider's
//! contract enforcement in Liqo (`rear::provider::enforce_sales`), the renewal of terms
//! (`rear::consumer::keep_renewed`), the metrics file writer (`metrics::export`, when `[metrics]
//! textfile` is set) and one task per intent a previous run left unfinished
//! (`orchestrator::own`), as each newly submitted intent has.
//!
//! The node task handles inbound messages one at a time. Handling them one at a time is deliberate:
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
use crate::control;
use crate::fabric::Fabric;
use crate::model::ContractState;
use crate::model::{Contract, FlavourSelector, Id};
use crate::orchestrator;
use crate::rear::provider::{self, answer_error, PendingReserve};
use crate::rear::{consumer, RearError};
use crate::shared::{Shared, Waiter};
use crate::tables::Tables;
use crate::wire::{Body, ErrorCode, Message, Route, Topics};
use crate::{unix_ms, AgentError, Observer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Most reservations made durable by one flush (group commit).
const MAX_BATCH: usize = 64;

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
        // The first line a node logs names its release, so a journal says what ran.
        info!(node = %cfg.node_id, version = %crate::version(), "fluidlet node starting");
        // Zero-touch first boot: no certificate yet but an enrolment token (crate::enrol).
        crate::enrol::first_boot(&cfg)
            .await
            .map_err(|e| AgentError::Other(e.to_string()))?;
        let (tls, sealing, identity) = prepare_transport(&cfg)?;
        crate::files::prepare_data_dir(&cfg.data_dir)
            .map_err(|e| AgentError::Other(format!("data_dir {}: {e}", cfg.data_dir.display())))?;
        for w in crate::files::mode_warnings(&cfg.data_dir) {
            warn!("{w}");
        }
        let tables = Tables::open_for(&cfg.data_dir, &cfg.node_id, cfg.retention).await?;
        let offers: Vec<_> = cfg
            .offers
            .iter()
            .map(|o| (o.clone(), crate::terms::sale_terms(&cfg, &o.id)))
            .collect();
        tables.sync_offers(&offers).await?;
        let topics = Topics::new(&cfg.domain, &cfg.node_id);
        let (client, events) = broker::connect(&cfg, &topics, tls);
        let (inbound_tx, inbound_rx) = mpsc::channel(broker::INBOUND_QUEUE);
        let catalog = Arc::new(broker::CatalogInbox::default());
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        // One rotated certificate at a time: the session takes it at once, and a rotation
        // happens once in a good part of the certificate's life.
        let (rotated_tx, rotated_rx) = mpsc::channel(1);
        let advert = AdvertSlot::default();
        let fabric = Fabric::new(cfg.fabric.clone(), &cfg.data_dir, &cfg.node_id);
        let mut shared = Shared::new(
            cfg,
            tables,
            client.clone(),
            advert.clone(),
            observer,
            status_rx,
            fabric,
            stop_rx.clone(),
        )?;
        shared.sealing = std::sync::RwLock::new(sealing.map(Arc::new));
        let shared = Arc::new(shared);
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
            metrics: shared.metrics.clone(),
            identity,
            rotated: Some(rotated_rx),
        };
        let session = tokio::spawn(session.run(stop_rx.clone()));
        let certificate = tokio::spawn(crate::enrol::keep_rotated(
            shared.clone(),
            rotated_tx,
            stop_rx.clone(),
        ));
        if !shared.cfg.offers.is_empty() {
            shared.publish_advert().await?;
        }
        let node = tokio::spawn(serve(shared.clone(), inbound_rx, catalog, stop_rx.clone()));
        let resumer = tokio::spawn(resume_when_connected(shared.clone(), stop_rx.clone()));
        let sweeper = tokio::spawn(sweep_lapsed(shared.clone(), stop_rx.clone()));
        let listener = control::bind(&shared.cfg.control_socket)?;
        let control = tokio::spawn(control::serve(shared.clone(), listener, stop_rx.clone()));
        let enforcer = tokio::spawn(crate::rear::provider::enforce_sales(
            shared.clone(),
            stop_rx.clone(),
        ));
        let renewer = tokio::spawn(crate::rear::consumer::keep_renewed(
            shared.clone(),
            stop_rx.clone(),
        ));
        let mut tasks = vec![resumer, sweeper, control, enforcer, renewer, certificate];
        if shared.cfg.advert_max_age.is_some()
            || (shared.cfg.advert_refresh.is_some() && !shared.cfg.offers.is_empty())
        {
            tasks.push(tokio::spawn(keep_adverts_fresh(
                shared.clone(),
                stop_rx.clone(),
            )));
        }
        if let Some(path) = shared.cfg.metrics.textfile.clone() {
            let (sh, node) = (shared.clone(), shared.me().to_string());
            let take = move || sh.metrics_snapshot();
            let interval = shared.cfg.metrics.interval;
            let export = crate::metrics::export(path, interval, node, take, stop_rx.clone());
            tasks.push(tokio::spawn(export));
        }
        for intent in orchestrator::unfinished(&shared)? {
            orchestrator::own(&shared, intent, None);
        }
        info!(
            node = %shared.me(),
            domain = %shared.cfg.domain,
            version = %crate::version(),
            revision = crate::wire::REVISION,
            "fluidlet node started"
        );
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

    /// The node's Peering Candidates (kept in memory), for inspection.
    pub fn candidates(&self) -> &crate::discovery::Candidates {
        &self.shared.candidates
    }

    /// The node's metrics now, as `fluidlet status --json` shows them.
    pub fn metrics(&self) -> crate::metrics::Snapshot {
        self.shared.metrics_snapshot()
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
        spec: orchestrator::IntentSpec,
    ) -> Result<crate::model::Intent, AgentError> {
        let (intent, done) = orchestrator::submit(&self.shared, spec).await?;
        done.await.map_err(|_| {
            AgentError::Other(format!(
                "the node stopped before intent {} ended; it resumes at the next start",
                intent.id
            ))
        })
    }

    /// Releases a contract this node bought (RELEASE to the seller, peering torn down).
    pub async fn release(&self, contract: &Id) -> Result<Contract, RearError> {
        consumer::release(&self.shared, contract).await
    }

    /// The consumer side of REAR for one selector: candidates, discovery if needed,
    /// reservation (workflow steps 5-20). Returns the durable contract.
    pub async fn acquire(&self, selector: &FlavourSelector) -> Result<Contract, RearError> {
        consumer::acquire(&self.shared, selector).await
    }

    /// Stops taking messages, finishes the one in hand, withdraws the advert, disconnects
    /// and flushes the tables.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut owned = self.shared.take_owned();
        while owned.join_next().await.is_some() {}
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
        self.shared.take_owned().abort_all();
    }
}

/// Loads and checks the TLS material (an error names the file and the problem), logs its
/// warnings, and warns about plain MQTT that leaves the machine.
type Transport = (
    Option<Arc<rustls::ClientConfig>>,
    Option<crate::seal::Keys>,
    Option<String>,
);

fn prepare_transport(cfg: &Config) -> Result<Transport, AgentError> {
    let Some(files) = &cfg.tls else {
        if !crate::config::is_loopback(&cfg.broker.host) {
            warn!(broker = %cfg.broker.host, "plain MQTT to another machine (insecure_plaintext = true): anyone on the path can read and forge this node's messages");
        }
        return Ok((None, None, None));
    };
    let loaded = crate::tls::load(files, &cfg.node_id)?;
    for w in &loaded.warnings {
        warn!("{w}");
    }
    info!(
        cn = %loaded.identity.common_name,
        "mutual TLS configured (certificate, key and CA loaded; the broker has not seen them yet)"
    );
    let keys = crate::seal::Keys::new(&loaded.certificate, &loaded.key, loaded.roots.clone())
        .map_err(|e| AgentError::Other(format!("{}: {e}", files.key.display())))?;
    let cn = loaded.identity.common_name.to_string();
    Ok((Some(loaded.client), Some(keys), Some(cn)))
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
                consumer::resume(&shared).await;
            }
        } => {}
    }
}

/// Most `deadlines` entries one tick of the sweeper handles; the rest wait for the next tick.
const SWEEP_BATCH: usize = 256;

/// Contract Manager: ends reservations that were never peered before their expiry and
/// contracts whose term ran out unrenewed, on both sides (a provider gets the capacity back
/// and re-advertises it at once), and deletes ended contracts whose retention is over. Each
/// tick reads only the `deadlines` entries due ([`Tables::due`]), never the whole contracts
/// table.
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
        sweep_due(&shared, unix_ms()).await;
    }
}

/// Discovery Manager, for domains of bridged brokers (docs/protocol.md, "Advert freshness"):
/// re-publishes this node's advert every `advert_refresh` (a provider with offers), and
/// forgets the peering candidates of providers not heard from within `advert_max_age`.
async fn keep_adverts_fresh(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let refresh = shared
        .cfg
        .advert_refresh
        .filter(|_| !shared.cfg.offers.is_empty());
    let max_age = shared.cfg.advert_max_age;
    // Ages are checked a few times per max age; the refresh runs on its own period.
    let period = match (refresh, max_age) {
        (Some(r), Some(a)) => r.min(a / 4),
        (Some(r), None) => r,
        (None, Some(a)) => a / 4,
        (None, None) => return,
    };
    let mut tick = tokio::time::interval(period.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_refresh = tokio::time::Instant::now();
    let mut last_connects = shared.status.borrow().connects;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // Not while disconnected. After a reconnect the session re-publishes the advert it
        // last sent, with its old sent_at: a fresh one follows at the next tick.
        let (connected, connects) = {
            let st = shared.status.borrow();
            (st.connected, st.connects)
        };
        if let Some(r) = refresh.filter(|_| connected) {
            let reconnected = connects != last_connects;
            last_connects = connects;
            if reconnected || last_refresh.elapsed() + Duration::from_millis(50) >= r {
                last_refresh = tokio::time::Instant::now();
                // Cancel safety: an advert half-handed to the client is simply not sent.
                tokio::select! {
                    _ = stop.changed() => return,
                    r = shared.publish_advert() => if let Err(e) = r {
                        debug!(error = %e, "could not refresh the advert");
                    }
                }
            }
        }
        if let Some(a) = max_age {
            let cutoff = unix_ms().saturating_sub(a.as_millis() as u64);
            let gone = shared.candidates.forget_seen_before(cutoff);
            if gone > 0 {
                info!(
                    candidates = gone,
                    "forgot peering candidates not re-advertised within advert_max_age"
                );
            }
        }
    }
}

/// One pass of the sweeper over the `deadlines` entries due at `now`: the contract of each is
/// read and what is due is done, by its state.
async fn sweep_due(shared: &Arc<Shared>, now: u64) {
    let due = match shared.tables.due(now, SWEEP_BATCH) {
        Ok(v) => v,
        Err(e) => {
            error!(error = %e, "cannot read the deadlines index");
            return;
        }
    };
    for (deadline, id) in due {
        let c = match shared.tables.contract(&id) {
            Ok(Some(c)) => c,
            Ok(None) => {
                if let Err(e) = shared.tables.drop_deadline(deadline, &id) {
                    error!(contract = %id, error = %e, "cannot drop a stale deadline");
                }
                continue;
            }
            Err(e) => {
                error!(contract = %id, error = %e, "cannot read a contract due");
                continue;
            }
        };
        let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
        let result = match c.state {
            ContractState::Reserved if deadline == c.expires_at => {
                expire(shared, &c, "reservation expired unpeered").await;
                Ok(())
            }
            _ if live && c.ends_at == Some(deadline) => {
                expire(shared, &c, "contract term ran out unrenewed").await;
                Ok(())
            }
            // The retention's entry (an entry the end removed, read before it, is left alone
            // by prune).
            ContractState::Released | ContractState::Expired => {
                shared.tables.prune(deadline, &c.id).map(|pruned| {
                    if pruned {
                        debug!(contract = %c.id, "retention over: contract and its records deleted");
                    }
                })
            }
            // Nothing of this contract is due at this deadline any more.
            _ => shared.tables.drop_deadline(deadline, &c.id),
        };
        if let Err(e) = result {
            error!(contract = %c.id, error = %e, "cannot handle a deadline");
        }
    }
}

/// Ends a live contract whose peering deadline passed unpeered, or whose term ran out
/// unrenewed, as Expired, on either side: a seller re-advertises the capacity and removes the
/// buyer's peering user after a grace ([`crate::terms::expired_sold`]); a buyer tears its
/// side down and then tells the seller ([`consumer::expired_bought`]).
async fn expire(shared: &Arc<Shared>, c: &Contract, why: &str) {
    match shared
        .tables
        .end_contract(&c.id, ContractState::Expired, unix_ms())
        .await
    {
        Ok(Some(_)) => {
            info!(contract = %c.id, buyer = %c.buyer, seller = %c.seller, "{why}; resources returned");
            if &c.seller == shared.me() {
                if let Err(e) = shared.publish_advert().await {
                    warn!(error = %e, "could not re-publish the advert");
                }
                crate::terms::expired_sold(shared, c).await;
            } else {
                consumer::expired_bought(shared, c).await;
            }
        }
        Ok(None) => {}
        Err(e) => error!(contract = %c.id, error = %e, "expiry failed"),
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
    let mut held: Option<Event> = None;
    loop {
        let event = match held.take() {
            Some(e) => e,
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
                            let event = Event::of(&shared, advert);
                            dispatch(&shared, event).await;
                        }
                        continue;
                    }
                };
                let Some(m) = m else { break };
                Event::of(&shared, m)
            }
        };
        let first = match event {
            Event::Reserve(r) => r,
            other => {
                dispatch(&shared, other).await;
                continue;
            }
        };
        // Group commit: take the RESERVE_FLAVOURs already queued behind this one (never
        // waiting for more), stopping at the first other message, which keeps its place.
        let mut batch = vec![first];
        while shared.cfg.group_commit && batch.len() < MAX_BATCH {
            match inbound.try_recv() {
                Ok(m) => match Event::of(&shared, m) {
                    Event::Reserve(r) => batch.push(r),
                    other => {
                        held = Some(other);
                        break;
                    }
                },
                Err(_) => break,
            }
        }
        provider::on_reserve_batch(&shared, batch).await;
    }
}

/// An inbound message, routed by its topic and decoded once, as the node task acts on it.
/// Only one or two exist at a time (the message in hand and one held back), so the inline
/// request is not worth a box.
#[allow(clippy::large_enum_variant)]
enum Event {
    /// A well-formed RESERVE_FLAVOUR for this node whose envelope sender and buyer are the
    /// topic's sender: goes into a group commit.
    Reserve(PendingReserve),
    /// Any other well-formed mail for this node from the sender its topic names.
    Mail(Id, Message),
    /// LIST_FLAVOURS broadcast by another node.
    Discovery(Id, Message),
    /// A provider's catalog entry: its advert, or `None` when the entry was cleared.
    Catalog(Id, Option<Message>),
    /// The first message of a sender over its rate limit, to be answered BUSY.
    OverRate(Id, Vec<u8>),
    /// Refused on its way in: answered with an ERROR unless it is one.
    Refused(Box<Refused>),
    /// Nothing to do (this node's own broadcasts and catalog entry).
    Ignored,
}

/// A message refused before any part of the node saw it.
struct Refused {
    to: Id,
    /// The refused message's id, when its envelope could be read.
    id: Option<u64>,
    code: ErrorCode,
    text: String,
    /// The refused message is an ERROR (or looks like one): never answered.
    was_error: bool,
}

impl Event {
    fn of(
        shared: &Shared,
        Inbound {
            topic,
            payload,
            limited,
        }: Inbound,
    ) -> Event {
        let Some(route) = shared.topics.parse(&topic) else {
            warn!(%topic, "message on a topic outside this node's scheme ignored");
            return Event::Ignored;
        };
        match route {
            Route::Addressed { to, from } => {
                if &to != shared.me() {
                    warn!(%topic, "mail for another node delivered here; broker ACLs are wrong");
                    return Event::Ignored;
                }
                if limited {
                    return Event::OverRate(from, payload);
                }
                match decode(&from, &payload) {
                    Err(r) => Event::Refused(r),
                    Ok(m) => match m.body {
                        Body::ReserveFlavour(req) if req.buyer == from => {
                            Event::Reserve((from, m.id, req))
                        }
                        Body::ReserveFlavour(req) => Event::Refused(Box::new(Refused {
                            text: format!("buyer {} but sent by {from}", req.buyer),
                            to: from,
                            id: Some(m.id),
                            code: ErrorCode::Unexpected,
                            was_error: false,
                        })),
                        Body::Advert(_) => unexpected(from, &m, "addressed"),
                        _ => Event::Mail(from, m),
                    },
                }
            }
            Route::Discovery { from } => {
                if limited {
                    return Event::OverRate(from, payload);
                }
                if &from == shared.me() {
                    return Event::Ignored;
                }
                match decode(&from, &payload) {
                    Err(r) => Event::Refused(r),
                    Ok(m) if matches!(m.body, Body::ListFlavours(_)) => Event::Discovery(from, m),
                    Ok(m) => unexpected(from, &m, "discovery"),
                }
            }
            Route::Catalog { node } => {
                if &node == shared.me() {
                    return Event::Ignored;
                }
                if payload.is_empty() {
                    return Event::Catalog(node, None);
                }
                match decode(&node, &payload) {
                    Err(r) => Event::Refused(r),
                    Ok(m) if matches!(m.body, Body::Advert(_)) => Event::Catalog(node, Some(m)),
                    Ok(m) => unexpected(node, &m, "catalog"),
                }
            }
        }
    }
}

/// Acts on one event (a RESERVE_FLAVOUR outside a batch is a batch of one).
async fn dispatch(shared: &Arc<Shared>, event: Event) {
    match event {
        Event::Reserve(r) => provider::on_reserve_batch(shared, vec![r]).await,
        Event::Mail(from, m) => on_mail(shared, from, m).await,
        Event::Discovery(from, m) => {
            if let Body::ListFlavours(l) = m.body {
                provider::answer_list(shared, &from, m.id, &l.selector, false).await
            }
        }
        Event::Catalog(node, advert) => on_catalog(shared, node, advert),
        Event::OverRate(from, payload) => over_rate(shared, &from, &payload).await,
        Event::Refused(r) => {
            if !r.was_error {
                answer_error(shared, &r.to, r.id, r.code, &r.text).await;
            }
        }
        Event::Ignored => {}
    }
}

/// The first message of a sender over its rate limit: answered BUSY (the ones after it are
/// dropped by the session task until the sender slows down).
async fn over_rate(shared: &Shared, from: &Id, payload: &[u8]) {
    let l = &shared.cfg.limits;
    warn!(%from, rate = l.sender_rate, burst = l.sender_burst, "sender over its rate limit; its messages are dropped until it slows down");
    if crate::wire::is_error(payload) {
        return;
    }
    let msg = Message::decode(payload).ok();
    let text = format!(
        "rate limit: at most {} messages/s (bursts of {}) per sender; \
         this and further messages are dropped until the rate falls",
        l.sender_rate, l.sender_burst
    );
    answer_error(shared, from, msg.map(|m| m.id), ErrorCode::Busy, &text).await;
}

/// Decodes a payload from `from`, or says how to refuse it. A message whose envelope names a
/// sender other than the topic's is refused too.
fn decode(from: &Id, payload: &[u8]) -> Result<Message, Box<Refused>> {
    match Message::decode(payload) {
        Ok(msg) if &msg.sender != from => {
            warn!(%from, sender = %msg.sender, "envelope sender contradicts the topic");
            Err(Box::new(Refused {
                text: format!("envelope sender {} but topic says {from}", msg.sender),
                to: from.clone(),
                id: Some(msg.id),
                code: ErrorCode::Unexpected,
                was_error: matches!(msg.body, Body::Error(_)),
            }))
        }
        Ok(msg) => Ok(msg),
        Err(e) => {
            warn!(%from, error = %e, "refused a message");
            Err(Box::new(Refused {
                to: from.clone(),
                id: e.message_id(),
                code: e.code(),
                text: e.to_string(),
                // Never answer an ERROR, not even a broken one (docs/protocol.md section 5).
                was_error: crate::wire::is_error(payload),
            }))
        }
    }
}

/// A kind that has no meaning on the topic it came on.
fn unexpected(from: Id, m: &Message, place: &str) -> Event {
    let kind = m.body.kind();
    warn!(%from, %kind, place, "message kind has no meaning here");
    Event::Refused(Box::new(Refused {
        text: format!("{kind} is not accepted on {place} topics"),
        to: from,
        id: Some(m.id),
        code: ErrorCode::Unexpected,
        was_error: kind == crate::wire::Kind::Error,
    }))
}

/// A provider's catalog entry (`advert` is an ADVERT, or `None`: the provider is gone).
fn on_catalog(shared: &Shared, node: Id, advert: Option<Message>) {
    let Some(msg) = advert else {
        debug!(%node, "catalog entry cleared: provider gone");
        shared.candidates.replace(&node, &[], unix_ms());
        return;
    };
    let Body::Advert(a) = msg.body else {
        return;
    };
    // A stale advert: one a broker kept (or got back from another broker over a bridge) after
    // its provider stopped refreshing it. Ignored; what a fresher advert said stays until it
    // ages out in its turn (keep_adverts_fresh).
    if let Some(max) = shared.cfg.advert_max_age {
        let now = unix_ms();
        if msg.sent_at.saturating_add(max.as_millis() as u64) < now {
            debug!(%node, age_ms = now - msg.sent_at, "advert older than advert_max_age; ignored");
            return;
        }
    }
    if let Some(f) = a.flavours.iter().find(|f| f.provider != node) {
        warn!(%node, provider = %f.provider, "advert offers another node's flavour; ignored");
        return;
    }
    let flavours: Vec<_> = a.flavours.iter().cloned().collect();
    shared.candidates.replace(&node, &flavours, unix_ms());
    if !flavours.is_empty() {
        shared.candidates.note_revision(&node, a.revision);
    }
    debug!(%node, flavours = flavours.len(), "catalog advert stored as peering candidates");
}

/// Mail for this node that is not a RESERVE_FLAVOUR: requests go to the provider side,
/// answers to the consumer flow waiting for them.
async fn on_mail(shared: &Arc<Shared>, from: Id, msg: Message) {
    match msg.body {
        Body::ListFlavours(l) => {
            provider::answer_list(shared, &from, msg.id, &l.selector, true).await
        }
        Body::PeerRequest(req) => provider::on_peer_request(shared, from, msg.id, req).await,
        Body::Release(r) => provider::on_release(shared, &from, msg.id, r).await,
        Body::Renew(r) => crate::terms::on_renew(shared, &from, msg.id, r).await,
        Body::Flavours(_)
        | Body::Reserved(_)
        | Body::Error(_)
        | Body::PeerAccept(_)
        | Body::Released(_)
        | Body::Renewed(_) => deliver(shared, from, msg),
        // Event::of routes every RESERVE_FLAVOUR to the group commit (or refuses it) and
        // refuses an ADVERT on mail topics: neither is Mail.
        Body::ReserveFlavour(_) | Body::Advert(_) => {}
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
            if !f.flavours.is_empty() {
                shared.candidates.note_revision(&from, f.revision);
            }
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
