//! The MQTT session with the domain broker: connect, last will, reconnect with backoff,
//! subscriptions and the retained advert after every connect.
//!
//! One task owns rumqttc's `EventLoop` and does nothing but poll it, as rumqttc intends:
//! incoming publishes go to the node over a bounded channel with `try_send`, so a busy node
//! never stalls the poll loop (a stalled poll loop stops keepalives and every outgoing
//! publish, and the node, waiting for its own publish, would wait forever). When the
//! channel is full a message is dropped with a warning: requests are retried by their
//! senders and adverts are retained, so dropping under overload loses no state.
//!
//! The session is clean (no broker-side queue while the node is away): after a reconnect
//! the task subscribes again and re-publishes the current advert, which also repairs a
//! catalog entry cleared by the will during the outage.

use crate::config::Config;
use crate::metrics::Dropped;
use crate::wire::{Topics, MAX_PACKET};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Inbound messages waiting for the node. Bounded: at most this many payloads of at most
/// `MAX_PACKET` bytes are held, about 8 MiB in the worst case and a few KiB normally.
pub const INBOUND_QUEUE: usize = 128;
/// Outgoing requests rumqttc may hold while disconnected or busy.
const REQUEST_QUEUE: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection the broker closes sooner than this after accepting it counts as "short".
const SHORT_SESSION: Duration = Duration::from_secs(10);
/// Short sessions in a row that mean another client holds this node's identity.
const TAKEOVERS: u32 = 3;
/// How long a clean stop waits for the advert withdrawal and DISCONNECT to go out.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// A failed connection attempt is logged (WARN) when its cause changes, and otherwise at
/// most once in this long.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);
/// How long after its subscriptions a node waits for its own probe to come back before it
/// says that the broker delivers nothing it publishes (checked on the next event: at the
/// latest one keepalive later).
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// What every probe payload starts with ([`Session`]; docs/protocol.md section 1).
pub const PROBE_PREFIX: &[u8] = b"fluidlet-probe ";

/// A publish received from the broker.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The sender is over its rate limit: answer BUSY, do not serve. At most one message per
    /// [`BUSY_WINDOW`] arrives so marked; the others over the limit are dropped in the session
    /// task (those within it, as tokens refill, are served).
    pub limited: bool,
}

/// Most senders whose rate is tracked at once. Beyond it, idle ones are forgotten; if none
/// is idle, messages from senders not yet tracked are dropped until one is.
pub const MAX_TRACKED_SENDERS: usize = 4096;

/// What to do with a message, by its sender's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Over the limit and not told in the last [`BUSY_WINDOW`]: tell the sender (BUSY).
    Tell,
    /// Over the limit and already told in this window, or no room to track the sender: drop.
    Drop,
}

/// A sender over its rate limit is told BUSY at most once per window, however many of its
/// messages pass in between as tokens refill.
pub const BUSY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
    /// When this sender was last told BUSY.
    told: Option<std::time::Instant>,
}

/// Token buckets per sender: `rate` messages per second on average, `burst` at once.
pub struct SenderLimits {
    rate: f64,
    burst: f64,
    buckets: std::collections::HashMap<String, Bucket>,
}

impl SenderLimits {
    pub fn new(rate: u32, burst: u32) -> SenderLimits {
        SenderLimits {
            rate: rate.max(1) as f64,
            burst: burst.max(1) as f64,
            buckets: std::collections::HashMap::new(),
        }
    }

    /// Counts one message from `sender` at `now`.
    pub fn check(&mut self, sender: &str, now: std::time::Instant) -> Verdict {
        if !self.buckets.contains_key(sender) && self.buckets.len() >= MAX_TRACKED_SENDERS {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_TRACKED_SENDERS {
                return Verdict::Drop;
            }
        }
        let burst = self.burst;
        let b = self
            .buckets
            .entry(sender.to_owned())
            .or_insert_with(|| Bucket {
                tokens: burst,
                at: now,
                told: None,
            });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Pass
        } else if b
            .told
            .is_some_and(|t| now.saturating_duration_since(t) < BUSY_WINDOW)
        {
            Verdict::Drop
        } else {
            b.told = Some(now);
            Verdict::Tell
        }
    }
}

/// Catalog adverts waiting for the node, coalesced: only the newest advert of each provider
/// matters, so a newer one replaces an older one still waiting. This is what lets a node join
/// a domain of thousands of providers: the broker delivers every retained advert at once, far
/// faster than they can be stored, and a queue would have to drop some (retained messages are
/// not sent again). Bounded by [`CATALOG_BACKLOG_BYTES`]; beyond it new providers are dropped
/// with a warning until the node catches up.
#[derive(Default)]
pub struct CatalogInbox {
    pending: Mutex<(std::collections::HashMap<String, Vec<u8>>, usize)>,
    ready: tokio::sync::Notify,
}

/// Most advert bytes waiting in the [`CatalogInbox`] (about 50,000 typical adverts).
pub const CATALOG_BACKLOG_BYTES: usize = 8 * 1024 * 1024;

impl CatalogInbox {
    /// Stores the newest advert of a topic; false if it had to be dropped.
    fn put(&self, topic: String, payload: Vec<u8>) -> bool {
        let Ok(mut g) = self.pending.lock() else {
            return false;
        };
        let (map, bytes) = &mut *g;
        let old = map.get(&topic).map_or(0, |p| p.len() + topic.len());
        let new = payload.len() + topic.len();
        if *bytes - old + new > CATALOG_BACKLOG_BYTES {
            return false;
        }
        *bytes = *bytes - old + new;
        map.insert(topic, payload);
        drop(g);
        self.ready.notify_one();
        true
    }

    /// Waits until adverts are waiting.
    pub async fn wait(&self) {
        self.ready.notified().await
    }

    /// Takes every waiting advert.
    pub fn take(&self) -> Vec<Inbound> {
        let Ok(mut g) = self.pending.lock() else {
            return Vec::new();
        };
        g.1 = 0;
        g.0.drain()
            .map(|(topic, payload)| Inbound {
                topic,
                payload,
                limited: false,
            })
            .collect()
    }
}

/// What the node knows of its broker connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub connected: bool,
    /// The broker acknowledged this connection's subscriptions: mail reaches the node.
    pub subscribed: bool,
    /// Connections made since start (1 after the first).
    pub connects: u64,
    /// Unix ms of the current (or last) connection's CONNACK; 0 before the first. Whatever
    /// was heard before it belongs to an earlier session.
    pub since_ms: u64,
    /// Last connection error, if any, in words.
    pub last_error: Option<String>,
    /// This session's probe (a message to itself through the broker) came back: `None`
    /// until it did or [`PROBE_WAIT`] passed, then whether it did. `Some(false)` means the
    /// broker accepts this node but delivers nothing it publishes (an ACL for another
    /// domain, a certificate of another node).
    pub heard: Option<bool>,
}

/// The latest advert payload, re-published after every connect. Empty: nothing to advertise.
pub type AdvertSlot = Arc<Mutex<Vec<u8>>>;

/// Builds the client and its event loop, with the empty retained will on the catalog topic.
///
/// The client id is `{node}@{domain}`: unique across domains that share one broker
/// process (a mosquitto forced to `use_username_as_clientid` replaces it with the
/// certificate's CN, which is also unique).
/// With `tls`, the connection is mutual TLS (see [`crate::tls`]); the broker's certificate
/// must name `cfg.broker.host`.
pub fn connect(
    cfg: &Config,
    topics: &Topics,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> (AsyncClient, EventLoop) {
    let client_id = format!("{}@{}", cfg.node_id, cfg.domain);
    let mut opts = MqttOptions::new(client_id, &cfg.broker.host, cfg.broker.port);
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    opts.set_keep_alive(cfg.keepalive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_request_channel_capacity(REQUEST_QUEUE)
        .set_last_will(LastWill::new(
            topics.my_catalog(),
            Vec::new(),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut events) = AsyncClient::new(opts, REQUEST_QUEUE);
    // Small request/reply messages: without TCP_NODELAY, Nagle's algorithm meeting the
    // broker's delayed ACKs adds about 40 ms to every exchange.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    (client, events)
}

/// Everything the session task owns.
pub struct Session {
    pub events: EventLoop,
    pub client: AsyncClient,
    pub topics: Topics,
    /// Subscribe to the whole catalog (see `Config::watch_catalog`).
    pub watch_catalog: bool,
    pub inbound: mpsc::Sender<Inbound>,
    /// Catalog adverts go here instead, coalesced per provider.
    pub catalog: Arc<CatalogInbox>,
    pub advert: AdvertSlot,
    pub status: watch::Sender<Status>,
    /// Per-sender rate limits on addressed mail and discovery broadcasts.
    pub limits: SenderLimits,
    /// Counts the messages dropped by a bound.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The certificate CN on a mutual-TLS session, `None` on plain MQTT (for the log).
    pub identity: Option<String>,
    /// New TLS client configurations from a certificate rotation (crate::enrol): the next
    /// connection uses the newest, and the session makes that connection itself
    /// ([`Rotation`]).
    pub rotated: Option<mpsc::Receiver<Arc<rustls::ClientConfig>>>,
}

/// A reconnect the session makes to switch to a rotated certificate: at most one per
/// rotation, after the broker has acknowledged every QoS 1 publish in flight (as the clean
/// stop does), or after [`ROTATION_DRAIN`] if it never gets there under load.
struct Rotation {
    since: std::time::Instant,
    disconnecting: bool,
}

/// Longest wait for the in-flight PUBACKs before a rotation's DISCONNECT. What is still in
/// flight then is sent again on the new connection (QoS 1: at least once; a repeated
/// answer or request is recognised by its transaction id, docs/protocol.md).
const ROTATION_DRAIN: Duration = Duration::from_secs(5);

/// The next rotated configuration, or never when there is no rotation.
async fn next_rotation(
    rx: &mut Option<mpsc::Receiver<Arc<rustls::ClientConfig>>>,
) -> Option<Arc<rustls::ClientConfig>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// Drives the session until `stop` turns true, then withdraws the advert and disconnects.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        // Takeover flapping: two live clients with one identity (a second process, or the
        // same certificate on two devices) make the broker close the older session, whose
        // will clears the advert; both reconnect and kick each other forever. Sessions that
        // end right after their CONNACK, several in a row, are reported and slowed down.
        let mut connected_at: Option<std::time::Instant> = None;
        let mut short = 0u32;
        let mut failures = FailureLog::default();
        let (host, port) = self.events.mqtt_options.broker_address();
        let broker = format!("{host}:{port}");
        let mut probe = Probe::default();
        let mut rotation: Option<Rotation> = None;
        // Publishes queued when a rotation's DISCONNECT went out: sent on the new connection.
        let mut carried: Vec<rumqttc::Request> = Vec::new();
        loop {
            // Cancel safety: `poll` may be dropped only when `stop` fires, once, or when a
            // rotated configuration arrives; rumqttc keeps unsent requests in its state (the
            // next poll goes on with them), and `recv` on the channel is cancel-safe.
            let event = tokio::select! {
                _ = stop.changed() => break,
                cfg = next_rotation(&mut self.rotated) => {
                    match cfg {
                        Some(cfg) => {
                            self.events.mqtt_options.set_transport(rumqttc::Transport::tls_with_config(
                                rumqttc::TlsConfiguration::Rustls(cfg),
                            ));
                            if self.status.borrow().connected {
                                info!(%broker, "a rotated certificate: reconnecting with it once the broker has acknowledged what is in flight");
                                rotation = Some(Rotation { since: std::time::Instant::now(), disconnecting: false });
                                self.rotation_step(&mut rotation);
                            } else {
                                info!(%broker, "a rotated certificate: the next connection uses it");
                            }
                        }
                        None => self.rotated = None,
                    }
                    continue;
                }
                ev = self.events.poll() => ev,
            };
            if rotation.is_some() {
                if let Ok(Event::Outgoing(Outgoing::Disconnect)) = event {
                    // The DISCONNECT is out: drop this connection and connect again, with the
                    // new certificate. `clean` moves what was queued into `pending`, which a
                    // clean session would discard at the CONNACK: publishes are kept aside
                    // and given back after it.
                    self.events.clean();
                    carried = self
                        .events
                        .pending
                        .drain(..)
                        .filter(|r| matches!(r, rumqttc::Request::Publish(_)))
                        .collect();
                    rotation = None;
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.subscribed = false;
                    });
                    info!(%broker, carried = carried.len(), "disconnected for the certificate rotation; connecting with the new certificate");
                    continue;
                }
                self.rotation_step(&mut rotation);
            }
            if event.is_ok() && probe.overdue() {
                self.on_probe_silent(&broker);
                probe.deadline = None;
            }
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = BACKOFF_MIN;
                    connected_at = Some(std::time::Instant::now());
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.subscribed = false;
                        s.connects += 1;
                        s.since_ms = crate::model::unix_ms();
                        s.last_error = None;
                        s.heard = None;
                    });
                    match &self.identity {
                        Some(cn) => {
                            info!(%broker, "connected to the domain broker over mutual TLS as {cn}")
                        }
                        None => info!(%broker, "connected to the domain broker"),
                    }
                    if failures.attempts > 0 {
                        info!(%broker, "connected after {} failed attempts", failures.attempts);
                    }
                    failures = FailureLog::default();
                    probe = Probe::default();
                    // A connection lost while a rotation waited has reconnected with the new
                    // certificate already: nothing is left to do for that rotation.
                    rotation = None;
                    self.events.pending.extend(carried.drain(..));
                    self.on_connect();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    tracing::trace!(topic = %p.topic, bytes = p.payload.len(), "publish received");
                    if p.payload.starts_with(PROBE_PREFIX)
                        && p.topic == self.topics.to(self.topics.me())
                    {
                        if probe.answered(&p.payload) {
                            self.status.send_modify(|s| s.heard = Some(true));
                            if probe.warned {
                                info!(%broker, "the broker now delivers this node's messages");
                            } else {
                                debug!("probe came back: the broker delivers this node's messages");
                            }
                        }
                        continue;
                    }
                    if self.topics.is_catalog(&p.topic) {
                        let topic = p.topic.clone();
                        if !self.catalog.put(p.topic, p.payload.to_vec()) {
                            self.metrics.dropped(Dropped::CatalogBacklog);
                            warn!(%topic, "catalog backlog full, advert dropped");
                        }
                        continue;
                    }
                    let verdict = match self.topics.sender_of(&p.topic) {
                        Some(from) => self.limits.check(from, std::time::Instant::now()),
                        None => Verdict::Pass,
                    };
                    if verdict == Verdict::Drop {
                        self.metrics.dropped(Dropped::RateLimit);
                        tracing::debug!(topic = %p.topic, "sender over its rate limit: dropped");
                        continue;
                    }
                    let msg = Inbound {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        limited: verdict == Verdict::Tell,
                    };
                    if let Err(mpsc::error::TrySendError::Full(m)) = self.inbound.try_send(msg) {
                        self.metrics.dropped(Dropped::QueueFull);
                        warn!(topic = %m.topic, "node busy: inbound queue full, message dropped");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    self.status.send_modify(|s| s.subscribed = true);
                    if let Some(payload) = probe.start() {
                        let topic = self.topics.to(self.topics.me());
                        if let Err(e) =
                            self.client
                                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                        {
                            debug!(error = %e, "could not queue the probe");
                        }
                    }
                }
                Ok(ev) => tracing::trace!(?ev, "mqtt event"),
                Err(e) => {
                    let was = self.status.borrow().connected;
                    let mut error = in_words(&e, &broker, self.identity.is_some());
                    match connected_at.take() {
                        Some(t) if t.elapsed() < SHORT_SESSION => short += 1,
                        Some(_) => short = 0,
                        None => {}
                    }
                    if short >= TAKEOVERS {
                        error = format!(
                            "the broker closed this node's connection {short} times right after \
                             accepting it: another process or device is probably connected as \
                             {} (same certificate or client id); retrying slowly ({error})",
                            self.topics.me()
                        );
                        tracing::error!("{error}");
                        backoff = BACKOFF_MAX;
                    }
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.subscribed = false;
                        s.last_error = Some(error);
                    });
                    let (retry_in, words) = (
                        backoff.as_millis(),
                        self.status.borrow().last_error.clone().unwrap_or_default(),
                    );
                    if was {
                        warn!(%broker, "lost the domain broker ({words}); reconnecting");
                    } else if failures.should_log(&words) {
                        warn!(%broker, "cannot connect to the domain broker: {words} (attempt {}, next in {retry_in} ms)", failures.attempts);
                    } else {
                        debug!(%broker, retry_in_ms = retry_in, "cannot connect to the domain broker: {words}");
                    }
                    // Jitter spreads the reconnects of a whole domain after a broker restart.
                    let jitter =
                        Duration::from_nanos(unix_nanos() % (backoff.as_nanos() as u64 / 2 + 1));
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(backoff + jitter) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let connected = self.status.borrow().connected;
        if connected {
            self.stop_session().await;
        }
    }

    /// Sends a rotation's DISCONNECT once nothing is in flight (or [`ROTATION_DRAIN`] has
    /// passed). `try_disconnect`: this runs inside the poll loop.
    fn rotation_step(&self, rotation: &mut Option<Rotation>) {
        let Some(r) = rotation else { return };
        if r.disconnecting {
            return;
        }
        let drained = self.events.state.inflight() == 0;
        if drained || r.since.elapsed() >= ROTATION_DRAIN {
            if !drained {
                warn!(
                    in_flight = self.events.state.inflight(),
                    "certificate rotation: PUBACKs still owed after {} s; reconnecting anyway (they are sent again)",
                    ROTATION_DRAIN.as_secs()
                );
            }
            match self.client.try_disconnect() {
                Ok(()) => r.disconnecting = true,
                Err(e) => debug!(error = %e, "could not queue the rotation's DISCONNECT yet"),
            }
        }
    }

    /// Subscribes and re-publishes the advert. Uses `try_*`: this runs inside the poll
    /// loop, and awaiting the request channel here could wait on the loop itself.
    fn on_connect(&self) {
        let subs = self
            .topics
            .subscriptions(self.watch_catalog)
            .into_iter()
            .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
        if let Err(e) = self.client.try_subscribe_many(subs) {
            warn!(error = %e, "could not queue subscriptions");
        }
        let payload = self.advert.lock().map(|a| a.clone()).unwrap_or_default();
        if !payload.is_empty() {
            let topic = self.topics.my_catalog();
            if let Err(e) = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload)
            {
                warn!(error = %e, "could not queue the advert");
            }
        }
    }

    /// A clean stop: clear the catalog entry (a clean DISCONNECT does not fire the will)
    /// and disconnect, polling until both are out or the grace period ends.
    async fn stop_session(&mut self) {
        let topic = self.topics.my_catalog();
        let _ = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, Vec::new());
        let (events, client) = (&mut self.events, &self.client);
        // DISCONNECT only once the broker has acknowledged every QoS 1 publish (the advert
        // withdrawal last): mosquitto before 2.0.22 logs a client that leaves with a PUBACK
        // still owed as "disconnected due to out of memory" (eclipse-mosquitto/mosquitto#3253),
        // which made every clean stop look like a broker fault.
        let flush = async {
            let (mut published, mut disconnecting) = (false, false);
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => published = true,
                    Ok(_) => {}
                }
                if published && !disconnecting && events.state.inflight() == 0 {
                    disconnecting = true;
                    let _ = client.try_disconnect();
                }
            }
        };
        if tokio::time::timeout(STOP_GRACE, flush).await.is_err() {
            warn!("broker did not take the DISCONNECT in time");
        }
    }
}

impl Session {
    /// The probe did not come back: the broker took this node's connection, subscriptions
    /// and publishes and delivers nothing.
    fn on_probe_silent(&self, broker: &str) {
        let why = format!(
            "connected to {broker}, but nothing this node publishes comes back to it: the broker \
             drops its messages (an ACL or a plugin). Check that `domain` ({}) is the domain the \
             broker's ACL and this node's certificate were made for, and that the certificate's \
             CN is `node_id` ({})",
            self.topics.domain(),
            self.topics.me()
        );
        tracing::error!("{why}");
        self.status.send_modify(|s| {
            s.heard = Some(false);
            s.last_error = Some(why);
        });
    }
}

/// Rate limit of the log of failed connection attempts.
#[derive(Default)]
struct FailureLog {
    attempts: u32,
    last: Option<(String, std::time::Instant)>,
}

impl FailureLog {
    /// Counts one failed attempt; true when it is to be logged.
    fn should_log(&mut self, words: &str) -> bool {
        self.attempts += 1;
        let now = std::time::Instant::now();
        let due = match &self.last {
            Some((w, at)) => w != words || now.duration_since(*at) >= FAILURE_LOG_EVERY,
            None => true,
        };
        if due {
            self.last = Some((words.to_owned(), now));
        }
        due
    }
}

/// One session's probe: a message the node sends to itself through the broker once its
/// subscriptions are acknowledged.
#[derive(Default)]
struct Probe {
    nonce: Option<u64>,
    deadline: Option<std::time::Instant>,
    warned: bool,
}

impl Probe {
    /// The payload to send, the first time only.
    fn start(&mut self) -> Option<Vec<u8>> {
        if self.nonce.is_some() {
            return None;
        }
        let nonce = crate::model::unix_ms() ^ unix_nanos();
        self.nonce = Some(nonce);
        self.deadline = Some(std::time::Instant::now() + PROBE_WAIT);
        let mut v = PROBE_PREFIX.to_vec();
        v.extend_from_slice(nonce.to_string().as_bytes());
        Some(v)
    }

    /// Whether `payload` is this session's probe.
    fn answered(&mut self, payload: &[u8]) -> bool {
        let Some(n) = self.nonce else { return false };
        let mine = payload.strip_prefix(PROBE_PREFIX) == Some(n.to_string().as_bytes());
        if mine {
            self.deadline = None;
        }
        mine
    }

    fn overdue(&mut self) -> bool {
        let due = self
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d);
        if due {
            self.warned = true;
        }
        due
    }
}

/// A failed connection in words an operator acts on, not rumqttc's or rustls' Debug text.
pub(crate) fn in_words(e: &rumqttc::ConnectionError, broker: &str, tls: bool) -> String {
    use rumqttc::ConnectionError as C;
    match e {
        C::Io(io) => io_words(io, broker, tls),
        C::Tls(rumqttc::TlsError::Io(io)) => io_words(io, broker, tls),
        C::Tls(rumqttc::TlsError::TLS(r)) => tls_words(r, broker),
        C::Tls(t) => format!("TLS set-up failed: {t}"),
        C::ConnectionRefused(code) => {
            use rumqttc::ConnectReturnCode as R;
            let why = match code {
                R::NotAuthorized => "not authorized (the broker or its plugin refused this node)",
                R::BadUserNamePassword => "bad user name or password",
                R::BadClientId => "client id refused",
                R::ServiceUnavailable => "service unavailable",
                R::RefusedProtocolVersion => "MQTT 3.1.1 not accepted",
                R::Success => "refused without a reason",
            };
            format!("the broker at {broker} refused the connection: {why}")
        }
        C::NetworkTimeout => format!("no answer from {broker} in time (network timeout)"),
        C::FlushTimeout => format!("could not send to {broker} in time"),
        C::MqttState(s) => format!("MQTT session with {broker} broke: {s}"),
        C::NotConnAck(_) => format!("{broker} answered CONNECT with something else than CONNACK"),
        C::RequestsDone => "the node is stopping".to_owned(),
    }
}

fn io_words(io: &std::io::Error, broker: &str, tls: bool) -> String {
    use std::io::ErrorKind as K;
    if let Some(r) = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return tls_words(r, broker);
    }
    match io.kind() {
        K::ConnectionRefused => format!(
            "nothing listens at {broker} (connection refused): is the broker running, and is \
             the port right?"
        ),
        K::TimedOut => format!("no answer from {broker} (timed out)"),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted if tls => format!(
            "{broker} closed the connection during the TLS handshake: it may not speak TLS on \
             this port, or it refused this node's certificate"
        ),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted => format!(
            "{broker} closed the connection: it may want TLS on this port ([tls] in the config)"
        ),
        K::NotFound => format!("cannot resolve the broker's host name ({broker})"),
        _ => format!("network error with {broker}: {io}"),
    }
}

fn tls_words(r: &rustls::Error, broker: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as CE, Error as E};
    match r {
        E::InvalidCertificate(CE::UnknownIssuer) => format!(
            "the certificate of {broker} is not signed by the CA this node trusts ([tls] ca): a \
             broker of another domain, or the wrong ca file"
        ),
        E::InvalidCertificate(CE::NotValidForName | CE::NotValidForNameContext { .. }) => format!(
            "the certificate of {broker} does not name that host: set [broker] host to a name in \
             the broker's certificate"
        ),
        E::InvalidCertificate(CE::Expired | CE::ExpiredContext { .. }) => {
            format!("the certificate of {broker} has expired")
        }
        E::InvalidCertificate(CE::NotValidYet | CE::NotValidYetContext { .. }) => {
            format!("the certificate of {broker} is not valid yet (is this machine's clock right?)")
        }
        E::InvalidCertificate(_) => format!("the certificate of {broker} is not acceptable: {r}"),
        E::AlertReceived(a) => {
            let why = match a {
                A::UnknownCA => "this node's certificate is not signed by a CA the broker trusts",
                A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown => {
                    "the broker does not accept this node's certificate"
                }
                A::CertificateExpired => "this node's certificate has expired",
                A::CertificateRevoked => "this node's certificate is revoked",
                A::CertificateRequired => "the broker wants a client certificate ([tls] cert, key)",
                A::AccessDenied => "access denied",
                A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity => {
                    "no TLS version or cipher in common"
                }
                _ => "TLS alert",
            };
            format!("the broker at {broker} refused the TLS session: {why}")
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            format!("{broker} does not speak TLS on this port (plain MQTT?), or spoke it wrongly")
        }
        other => format!("TLS with {broker} failed: {other}"),
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_sender_over_its_rate_is_told_once_then_dropped_and_others_pass() {
        let mut l = SenderLimits::new(10, 5);
        let t = Instant::now();
        for _ in 0..5 {
            assert_eq!(l.check("eve", t), Verdict::Pass);
        }
        assert_eq!(l.check("eve", t), Verdict::Tell);
        assert_eq!(l.check("eve", t), Verdict::Drop);
        assert_eq!(
            l.check("carol", t),
            Verdict::Pass,
            "others are not affected"
        );
        // 100 ms at 10/s refills one token: it passes, and the next one is dropped without
        // a second BUSY (one per window, not one per refilled token).
        let later = t + Duration::from_millis(100);
        assert_eq!(l.check("eve", later), Verdict::Pass);
        assert_eq!(
            l.check("eve", later),
            Verdict::Drop,
            "told twice in a window"
        );
        // A window later, over the limit again: told again, once.
        let next = t + BUSY_WINDOW;
        let verdicts: Vec<_> = (0..10).map(|_| l.check("eve", next)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Tell).count(),
            1,
            "{verdicts:?}"
        );
    }

    #[test]
    fn a_steady_flood_gets_one_busy_per_window() {
        // 100 messages/s against a limit of 10/s (bursts of 5) for 3 s.
        let mut l = SenderLimits::new(10, 5);
        let t = Instant::now();
        let (mut passed, mut told) = (0, 0);
        for i in 0..300 {
            match l.check("eve", t + Duration::from_millis(10 * i)) {
                Verdict::Pass => passed += 1,
                Verdict::Tell => told += 1,
                Verdict::Drop => {}
            }
        }
        assert_eq!(told, 3, "one BUSY per second of flooding");
        assert!((30..=36).contains(&passed), "{passed} passed");
    }

    #[test]
    fn the_sender_table_is_bounded_and_forgets_idle_senders() {
        let mut l = SenderLimits::new(1, 2);
        let t = Instant::now();
        for i in 0..MAX_TRACKED_SENDERS {
            assert_eq!(l.check(&format!("n{i}"), t), Verdict::Pass);
        }
        assert_eq!(
            l.check("new", t),
            Verdict::Drop,
            "table full of busy senders"
        );
        assert_eq!(l.buckets.len(), MAX_TRACKED_SENDERS);
        // After a second everyone's bucket is full again: idle senders are forgotten.
        assert_eq!(l.check("new", t + Duration::from_secs(2)), Verdict::Pass);
        assert_eq!(l.buckets.len(), 1);
    }
}
