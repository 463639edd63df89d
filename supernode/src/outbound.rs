//! Outbound: fluidlet consumers buy from FLUIDOS reference nodes through the face
//! (docs/supernode.md, "Outbound").
//!
//! Each reference node of `[outbound]` is a provider of the domain under an id of its own,
//! `ref-{first 32 hex digits of SHA-256("provider:" endpoint)}` ([`provider_id`]), with a
//! certificate of that CN (`domain.sh refprovider`). The face connects to the broker once per
//! reference node with that certificate, so the broker's ordinary rules bind it: it writes
//! only that provider's catalog entry (its last will clears it) and mail from it, and reads
//! only mail to it. It polls the node's `GET /api/v2/flavors`, advertises the flavours it can
//! sell in fluidlet's terms, and maps RESERVE_FLAVOUR to the node's reserve, PEER_REQUEST to
//! its purchase (the kubeconfig sealed to the consumer), RELEASE to the face's own record.

use crate::client::{self, Limits};
use crate::config::{Config, Outbound};
use crate::quantity;
use crate::store::{OutRecord, OutState, Store};
use fluidlet::model::{
    Contract, ContractState, Flavour, FlavourList, Gpu, Id, Location, Partitionability, Price,
    Resources, Text,
};
use fluidlet::wire::{
    Body, Bytes, ContractRef, ErrorBody, ErrorCode, Flavours, Message, PeerAccept, PeerRequest,
    MAX_IDENTITY, MAX_PACKET, MAX_PAYLOAD, REVISION,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The provider id the face speaks as for the reference node at `endpoint`. The ids of
/// reference buyers hash a Liqo cluster id, which cannot contain `:`, so the two never meet.
pub fn provider_id(endpoint: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("provider:{endpoint}").as_bytes(),
    );
    format!("ref-{}", crate::domain::hex(&d.as_ref()[..16]))
}

/// Most unpeered reservations one consumer holds at one reference node through the face.
pub const PENDING_PER_BUYER: usize = 8;
/// Longest an unpeered reservation is held (the reference node's transaction lives 1 h).
const MAX_HOLD_MS: u64 = 3_600_000;
/// Most requests handled at once per reference node.
const MAX_IN_FLIGHT: usize = 16;
/// A re-advert even when nothing changed (fluidlet's default advert refresh).
const REFRESH: Duration = Duration::from_secs(300);

/// A flavour the face sells for a reference node: its id there, and what fluidlet sees.
#[derive(Clone, Debug)]
pub struct Listed {
    pub ref_id: String,
    pub flavour: Flavour,
}

/// What the face knows of one reference node.
#[derive(Default)]
struct NodeState {
    /// By fluidlet flavour id.
    flavours: HashMap<Id, Listed>,
    failures: u32,
    demoted_until: Option<Instant>,
    /// Why the node was last refused or demoted, for the log and tests.
    last_problem: Option<String>,
    /// Whether an advert (non-empty retained entry) stands for it.
    advertised: bool,
    last_advert: Option<Instant>,
    /// Whether a poll has answered since the face started (before it, the face knows
    /// nothing to advertise and leaves the retained entry as it is).
    polled: bool,
    /// Whether the broker acknowledged the subscription to this provider's mail on the
    /// current connection: no advert goes out before (a consumer could buy unheard).
    subscribed: bool,
}

/// One reference node sold from.
pub struct Reference {
    pub endpoint: String,
    pub id: Id,
    domain: Id,
    advertise: String,
    cfg: Outbound,
    keys: fluidlet::seal::Keys,
    client: AsyncClient,
    store: Store,
    state: Mutex<NodeState>,
    next_id: std::sync::atomic::AtomicU64,
    busy: Mutex<HashSet<String>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Stops this node's tasks (the face's stop, or the node forgotten).
    halt: watch::Sender<bool>,
}

/// What a test or an operator reads of a reference node.
#[derive(Clone, Debug)]
pub struct Status {
    pub endpoint: String,
    pub provider: String,
    pub flavours: usize,
    pub failures: u32,
    pub demoted: bool,
    pub advertised: bool,
    pub last_problem: Option<String>,
}

fn now_ms() -> u64 {
    fluidlet::unix_ms()
}

/// A decimal amount ("1.5") in millionths; at most 6 decimals.
pub fn millionths(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
        || int.len() > 12
    {
        return None;
    }
    let i: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let f: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    i.checked_mul(1_000_000)?.checked_add(f)
}

/// RFC 3339 ("2026-12-04T02:07:00+01:00", "...Z", fractions allowed) to Unix ms.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        rest = &r[n..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return None;
            }
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            let o = oh * 3600 + om * 60;
            if rb[0] == b'-' {
                -o
            } else {
                o
            }
        }
    };
    // Days from civil (Howard Hinnant).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    u64::try_from(secs).ok()?.checked_mul(1000)
}

/// A Kubernetes name, as the reference node's flavour ids are (its buyers make objects of them).
fn k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn text<const N: usize>(v: &Value) -> Option<Text<N>> {
    v.as_str()
        .filter(|s| !s.is_empty())
        .and_then(|s| Text::new(s).ok())
}

fn q_milli(v: &Value, what: &str) -> Result<u64, String> {
    let s = v.as_str().ok_or(format!("{what}: not a quantity string"))?;
    quantity::parse(s)
        .map_err(|e| format!("{what}: {e}"))?
        .millicores()
        .ok_or(format!("{what}: too large"))
}

fn q_units(v: &Value, what: &str) -> Result<u64, String> {
    let s = v.as_str().ok_or(format!("{what}: not a quantity string"))?;
    quantity::parse(s)
        .map_err(|e| format!("{what}: {e}"))?
        .units_ceil()
        .ok_or(format!("{what}: too large"))
}

fn q_u32(v: &Value, what: &str) -> Result<u32, String> {
    u32::try_from(q_units(v, what)?).map_err(|_| format!("{what}: too large"))
}

/// A reference node's listed Flavor (JSON, its struct tags) as a fluidlet flavour of
/// `provider`: `Ok(None)` when it is not available; `Err` names why it cannot be sold.
pub fn to_flavour(v: &Value, provider: &Id, currency: &str) -> Result<Option<Listed>, String> {
    let ref_id = v["flavorID"].as_str().unwrap_or_default().to_string();
    if !k8s_name(&ref_id) {
        return Err(format!("flavorID {ref_id:?} is not a Kubernetes name"));
    }
    let bad = |e: String| format!("flavour {ref_id}: {e}");
    if v["type"]["name"].as_str() != Some(crate::rear::K8SLICE) {
        return Err(bad(format!(
            "type {} is not k8slice (fluidlet buys K8Slice flavours only)",
            v["type"]["name"]
        )));
    }
    if v["availability"].as_bool() != Some(true) {
        return Ok(None);
    }
    // Sic: the reference node's key.
    let ch = &v["type"]["data"]["charateristics"];
    let architecture =
        text::<16>(&ch["architecture"]).ok_or_else(|| bad("no architecture".into()))?;
    let resources = Resources {
        cpu: q_milli(&ch["cpu"], "cpu").map_err(bad)?,
        memory: q_units(&ch["memory"], "memory").map_err(bad)?,
        pods: q_u32(&ch["pods"], "pods").map_err(bad)?,
        storage: if ch["storage"].is_null() {
            0
        } else {
            q_units(&ch["storage"], "storage").map_err(bad)?
        },
    };
    let gpu = match &ch["gpu"] {
        Value::Null => None,
        g => {
            let cores = q_u32(&g["cores"], "gpu.cores").unwrap_or(0);
            match text::<32>(&g["model"]) {
                Some(model) if cores > 0 => Some(Gpu {
                    model,
                    cores,
                    memory_bytes: q_units(&g["memory"], "gpu.memory").unwrap_or(0),
                }),
                _ => None,
            }
        }
    };
    let p = &v["type"]["data"]["policies"]["partitionability"];
    let partitionability = if p.is_null() {
        None
    } else {
        Some(Partitionability {
            cpu_min: q_milli(&p["cpuMin"], "cpuMin").map_err(bad)?,
            memory_min: q_units(&p["memoryMin"], "memoryMin").map_err(bad)?,
            pods_min: q_u32(&p["podsMin"], "podsMin").map_err(bad)?,
            cpu_step: q_milli(&p["cpuStep"], "cpuStep").map_err(bad)?,
            memory_step: q_units(&p["memoryStep"], "memoryStep").map_err(bad)?,
            pods_step: q_u32(&p["podsStep"], "podsStep").map_err(bad)?,
        })
    };
    let price = &v["price"];
    let cur = price["currency"].as_str().unwrap_or_default();
    if cur != currency {
        return Err(bad(format!(
            "priced in {cur:?}, not in the domain's currency {currency} (no exchange rate is configured: not listed)"
        )));
    }
    let amount = price["amount"]
        .as_str()
        .and_then(millionths)
        .ok_or_else(|| {
            bad(format!(
                "price amount {} is not a decimal with at most 6 decimals",
                price["amount"]
            ))
        })?;
    let period = text::<16>(&price["period"]).ok_or_else(|| bad("no price period".into()))?;
    let loc = &v["location"];
    let location = if loc.is_object() {
        let l = Location {
            // Sic: the country under `altitude`.
            country: text(&loc["altitude"]),
            city: text(&loc["city"]),
            notes: text(&loc["additionalNotes"]),
        };
        (l.country.is_some() || l.city.is_some() || l.notes.is_some()).then_some(l)
    } else {
        None
    };
    let mut flavour = Flavour {
        id: Id::new("x").map_err(|e| e.to_string())?,
        provider: provider.clone(),
        architecture,
        resources,
        gpu,
        partitionability,
        price: Price {
            amount,
            currency: Text::new(currency).map_err(|e| bad(e.to_string()))?,
            period,
        },
        available: true,
        location,
    };
    // The id changes whenever anything of the flavour does (as a fluidlet provider's): a
    // reference node that changes a flavour under the same flavorID makes a new fluidlet id,
    // and a reservation naming the old one is FLAVOUR_GONE.
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ref_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(&minicbor::to_vec(&flavour).map_err(|e| bad(e.to_string()))?);
    let h = crate::domain::hex(&ctx.finish().as_ref()[..12]);
    flavour.id = Id::new(&format!("rf-{h}")).map_err(|e| bad(e.to_string()))?;
    Ok(Some(Listed { ref_id, flavour }))
}

fn check_piece(name: &str, v: u64, min: u64, step: u64) -> Result<(), String> {
    if v < min {
        return Err(format!("{name} {v} is under the minimum {min}"));
    }
    if step > 0 && !v.is_multiple_of(step) {
        return Err(format!("{name} {v} is not a multiple of the step {step}"));
    }
    Ok(())
}

/// [`error`], boxed: an ERROR body is large, and a `Result` carries it on its error path only.
fn boxed_error(code: ErrorCode, text: &str) -> Box<Body> {
    Box::new(error(code, text))
}

fn error(code: ErrorCode, text: &str) -> Body {
    Body::Error(ErrorBody::new(code, text))
}

/// The Liqo cluster id form the consumer requires (docs/protocol.md, PeerAccept).
fn liqo_cluster_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Standard base64 decoding, padded (Go's StdEncoding), `None` on anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

impl Reference {
    /// Connects as the reference node's provider id (its certificate under `outbound.dir`)
    /// and starts polling it and serving its mail.
    pub fn start(
        cfg: &Config,
        out: &Outbound,
        endpoint: &str,
        store: Store,
        mut face_stop: watch::Receiver<bool>,
    ) -> Result<Arc<Reference>, String> {
        let (halt, stop) = watch::channel(false);
        let fwd = halt.clone();
        tokio::spawn(async move {
            let _ = face_stop.changed().await;
            let _ = fwd.send(true);
        });
        let id_s = provider_id(endpoint);
        let id = Id::new(&id_s).map_err(|e| e.to_string())?;
        let dir = out.dir.join(&id_s);
        let files = fluidlet::config::TlsFiles {
            ca: dir.join("domain-ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        let loaded = fluidlet::tls::load(&files, &id).map_err(|e| {
            format!(
                "outbound.reference {endpoint}: {e} (domain.sh refprovider DIR {} {endpoint})",
                cfg.name
            )
        })?;
        let keys =
            fluidlet::seal::Keys::new(&loaded.certificate, &loaded.key, loaded.roots.clone())
                .map_err(|e| format!("outbound.reference {endpoint}: {e}"))?;
        let catalog = format!("fluidos/v1/{}/catalog/{id}", cfg.domain);
        let mut opts = MqttOptions::new(
            format!("{id}@{}", cfg.domain),
            cfg.broker_host.clone(),
            cfg.broker_port,
        );
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        // The broker clears this provider's advert if the face dies.
        opts.set_last_will(LastWill::new(
            catalog.clone(),
            Vec::new(),
            QoS::AtLeastOnce,
            true,
        ));
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(loaded.client.clone()),
        ));
        let (client, mut events) = AsyncClient::new(opts, 256);
        let r = Arc::new(Reference {
            endpoint: endpoint.to_string(),
            id,
            domain: cfg.domain.clone(),
            advertise: cfg.advertise.clone(),
            cfg: out.clone(),
            keys,
            client,
            store,
            state: Mutex::new(NodeState::default()),
            next_id: std::sync::atomic::AtomicU64::new(fluidlet::unix_ms().saturating_mul(1024)),
            busy: Mutex::new(HashSet::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            halt,
        });
        let me = r.clone();
        let mut stop_events = stop.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.poll() => ev,
                    _ = stop_events.changed() => {
                        // Drive the clean stop (the empty advert, then DISCONNECT) out.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while events.poll().await.is_ok() {}
                        }).await;
                        return;
                    }
                };
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let polled = me.state.lock().map(|mut s| {
                            s.subscribed = true;
                            s.polled
                        });
                        if polled.unwrap_or(false) {
                            let me = me.clone();
                            tokio::spawn(async move { me.advertise(true).await });
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Ok(mut s) = me.state.lock() {
                            s.subscribed = false;
                        }
                        let me = me.clone();
                        tokio::spawn(async move {
                            let mail = format!("fluidos/v1/{}/to/{}/from/+", me.domain, me.id);
                            // LIST_FLAVOURS broadcasts, answered as a provider answers them.
                            let disc = format!("fluidos/v1/{}/discovery/from/+", me.domain);
                            // One SUBSCRIBE for both (one SUBACK: then the advert, above).
                            let filters = [mail, disc]
                                .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                            if let Err(e) = me.client.subscribe_many(filters).await {
                                tracing::warn!("{}: subscribe: {e}", me.endpoint);
                            }
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        me.mail(&p.topic, p.payload.to_vec())
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("{}: domain broker: {e}", me.endpoint);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        let me = r.clone();
        let mut stop_poll = stop;
        tokio::spawn(async move {
            loop {
                let wait = me.poll().await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop_poll.changed() => return,
                }
            }
        });
        Ok(r)
    }

    fn limits(&self, whole: Duration) -> Limits {
        Limits {
            connect: self.cfg.connect_timeout,
            whole,
            max_bytes: self.cfg.max_answer_bytes,
        }
    }

    pub fn status(&self) -> Status {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Status {
            endpoint: self.endpoint.clone(),
            provider: self.id.to_string(),
            flavours: s.flavours.len(),
            failures: s.failures,
            demoted: s.demoted_until.is_some_and(|t| Instant::now() < t),
            advertised: s.advertised,
            last_problem: s.last_problem.clone(),
        }
    }

    fn demoted(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.demoted_until.is_some_and(|t| Instant::now() < t))
            .unwrap_or(true)
    }

    /// The reference node lied: not listed nor polled for `demote_secs`.
    async fn demote(&self, why: String) {
        tracing::warn!(
            "reference node {} ({}) demoted for {:?}: {why}",
            self.endpoint,
            self.id,
            self.cfg.demote
        );
        if let Ok(mut s) = self.state.lock() {
            s.demoted_until = Some(Instant::now() + self.cfg.demote);
            s.flavours.clear();
            s.last_problem = Some(why);
        }
        self.advertise(true).await;
    }

    /// One poll; returns how long to wait before the next.
    async fn poll(&self) -> Duration {
        if self.demoted() {
            return self.cfg.poll;
        }
        let got = client::request(
            &self.endpoint,
            "GET",
            "/api/v2/flavors",
            None,
            self.limits(self.cfg.request_timeout),
        )
        .await;
        let listed = match got {
            Ok(a) if a.status == 204 => Ok(Vec::new()),
            Ok(a) if a.status == 200 => match serde_json::from_slice::<Value>(&a.body) {
                Ok(Value::Array(list)) => Ok(list),
                Ok(_) => Err("the flavour list is not a JSON array".to_string()),
                Err(e) => Err(format!("the flavour list is not JSON: {e}")),
            },
            Ok(a) => Err(format!("GET /api/v2/flavors answered {}", a.status)),
            Err(e) => Err(format!("GET /api/v2/flavors: {e}")),
        };
        let list = match listed {
            Ok(l) => l,
            Err(why) => {
                let (failures, clear) = {
                    let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    s.failures = s.failures.saturating_add(1);
                    s.last_problem = Some(why.clone());
                    let clear = s.failures >= self.cfg.gone_after_failures;
                    if clear {
                        s.flavours.clear();
                    }
                    (s.failures, clear)
                };
                tracing::warn!(
                    "reference node {}: {why} (failure {failures})",
                    self.endpoint
                );
                if clear {
                    self.advertise(true).await;
                }
                let shift = failures.min(8);
                return (self.cfg.poll * 2u32.pow(shift)).min(self.cfg.max_backoff);
            }
        };
        let mut flavours = HashMap::new();
        for v in &list {
            if flavours.len() >= fluidlet::model::MAX_FLAVOURS {
                tracing::warn!(
                    "reference node {}: more than {} flavours; the rest is not listed",
                    self.endpoint,
                    fluidlet::model::MAX_FLAVOURS
                );
                break;
            }
            match to_flavour(v, &self.id, &self.cfg.currency) {
                Ok(Some(l)) => {
                    flavours.insert(l.flavour.id.clone(), l);
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::info!("reference node {}: not listed: {why}", self.endpoint);
                    if let Ok(mut s) = self.state.lock() {
                        s.last_problem = Some(why);
                    }
                }
            }
        }
        let changed = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.failures = 0;
            let first = !s.polled;
            s.polled = true;
            let mut old: Vec<&Id> = s.flavours.keys().collect();
            let mut new: Vec<&Id> = flavours.keys().collect();
            old.sort();
            new.sort();
            let changed = old != new;
            s.flavours = flavours;
            changed || first
        };
        self.advertise(changed).await;
        self.cfg.poll
    }

    /// Publishes the advert (retained) when `force`, when the flavours changed, or when the
    /// last one is older than the refresh period; an empty entry when there is nothing to sell.
    async fn advertise(&self, force: bool) {
        let (mut list, due) = {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !s.subscribed {
                // Published at the SUBACK instead.
                return;
            }
            let mut l: Vec<Flavour> = s.flavours.values().map(|l| l.flavour.clone()).collect();
            l.sort_by(|a, b| a.id.cmp(&b.id));
            let due = force || s.last_advert.is_none_or(|t| t.elapsed() >= REFRESH);
            (l, due)
        };
        if !due {
            return;
        }
        let topic = format!("fluidos/v1/{}/catalog/{}", self.domain, self.id);
        let payload = loop {
            if list.is_empty() {
                break Vec::new();
            }
            let m = Message {
                id: self.next(),
                correlation: None,
                sent_at: now_ms(),
                sender: self.id.clone(),
                body: Body::Advert(Flavours {
                    flavours: FlavourList::from_slice_truncated(&list),
                    agent: Text::new(&format!(
                        "fluidlet-supernode {} (for a FLUIDOS reference node)",
                        env!("CARGO_PKG_VERSION")
                    ))
                    .ok(),
                    revision: Some(REVISION),
                }),
            };
            match m.encode() {
                Ok(b) if b.len() <= MAX_PAYLOAD => break b,
                // Over a catalog entry's bound: one flavour fewer.
                _ => {
                    list.pop();
                }
            }
        };
        let empty = payload.is_empty();
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
        {
            Ok(()) => {
                if let Ok(mut s) = self.state.lock() {
                    s.advertised = !empty;
                    s.last_advert = Some(Instant::now());
                }
            }
            Err(e) => tracing::warn!("{}: advert: {e}", self.endpoint),
        }
    }

    /// Clears the advert, disconnects and ends this node's tasks (a clean stop).
    pub async fn stop(&self) {
        let topic = format!("fluidos/v1/{}/catalog/{}", self.domain, self.id);
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, true, Vec::new())
            .await;
        let _ = self.client.disconnect().await;
        let _ = self.halt.send(true);
    }

    fn next(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    fn mail(self: &Arc<Self>, topic: &str, payload: Vec<u8>) {
        let prefix = format!("fluidos/v1/{}/to/{}/from/", self.domain, self.id);
        let disc = format!("fluidos/v1/{}/discovery/from/", self.domain);
        if let Some(from) = topic.strip_prefix(&disc) {
            self.broadcast(from, &payload);
            return;
        }
        let Some(from) = topic.strip_prefix(&prefix) else {
            return;
        };
        let Ok(from) = Id::new(from) else { return };
        // ERRORs are never answered; anything undecodable is dropped (the consumer's own
        // time-out covers it).
        let Ok(m) = Message::decode(&payload) else {
            return;
        };
        if m.sender != from || matches!(m.body, Body::Error(_)) {
            return;
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let me = self.clone();
            tokio::spawn(async move {
                me.reply(
                    &from,
                    m.id,
                    error(ErrorCode::Busy, "too many requests in flight"),
                )
                .await;
            });
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let answer = match m.body {
                Body::ReserveFlavour(req) => me.reserve(&from, req).await,
                Body::PeerRequest(req) => me.peer(&from, req).await,
                Body::Release(r) => Some(me.release(&from, r).await),
                Body::ListFlavours(_) => Some(me.flavours()),
                Body::Renew(_) => Some(error(
                    ErrorCode::UnknownKind,
                    "contracts sold for a reference node have no term: nothing to renew",
                )),
                _ => Some(error(
                    ErrorCode::Unexpected,
                    "this kind has no meaning on an addressed topic",
                )),
            };
            if let Some(a) = answer {
                me.reply(&from, m.id, a).await;
            }
            drop(permit);
        });
    }

    /// A LIST_FLAVOURS broadcast: answered only when a flavour matches (protocol section 6).
    fn broadcast(self: &Arc<Self>, from: &str, payload: &[u8]) {
        let Ok(from) = Id::new(from) else { return };
        if from == self.id {
            return;
        }
        let Ok(m) = Message::decode(payload) else {
            return;
        };
        let Body::ListFlavours(req) = m.body else {
            return;
        };
        if m.sender != from {
            return;
        }
        let mut l: Vec<Flavour> = self
            .state
            .lock()
            .map(|s| {
                s.flavours
                    .values()
                    .filter(|l| fluidlet::discovery::fit(&l.flavour, &req.selector).is_some())
                    .map(|l| l.flavour.clone())
                    .collect()
            })
            .unwrap_or_default();
        if l.is_empty() || self.demoted() {
            return;
        }
        l.sort_by(|a, b| a.id.cmp(&b.id));
        let me = self.clone();
        tokio::spawn(async move {
            let body = Body::Flavours(Flavours {
                flavours: FlavourList::from_slice_truncated(&l),
                agent: None,
                revision: Some(REVISION),
            });
            me.reply(&from, m.id, body).await;
        });
    }

    async fn reply(&self, to: &Id, correlation: u64, body: Body) {
        let m = Message {
            id: self.next(),
            correlation: Some(correlation),
            sent_at: now_ms(),
            sender: self.id.clone(),
            body,
        };
        let Ok(bytes) = m.encode() else {
            tracing::warn!("{}: an answer does not encode", self.endpoint);
            return;
        };
        let topic = format!("fluidos/v1/{}/to/{to}/from/{}", self.domain, self.id);
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, bytes)
            .await
        {
            tracing::warn!("{}: answer: {e}", self.endpoint);
        }
    }

    fn flavours(&self) -> Body {
        let mut l: Vec<Flavour> = self
            .state
            .lock()
            .map(|s| s.flavours.values().map(|l| l.flavour.clone()).collect())
            .unwrap_or_default();
        l.sort_by(|a, b| a.id.cmp(&b.id));
        Body::Flavours(Flavours {
            flavours: FlavourList::from_slice_truncated(&l),
            agent: None,
            revision: Some(REVISION),
        })
    }

    /// Marks `key` busy; false when it already was (a resend while the first runs).
    fn claim(&self, key: &str) -> bool {
        self.busy
            .lock()
            .map(|mut b| b.insert(key.to_string()))
            .unwrap_or(false)
    }

    fn unclaim(&self, key: &str) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(key);
        }
    }

    /// RESERVE_FLAVOUR: the reference node's POST /api/v2/reservations. `None`: a resend
    /// of a request still running (its answer will come).
    async fn reserve(&self, from: &Id, req: fluidlet::model::ReserveRequest) -> Option<Body> {
        if &req.buyer != from {
            return Some(error(
                ErrorCode::Unexpected,
                "the buyer field is not the sender",
            ));
        }
        let key = format!("r\0{from}\0{}", req.transaction);
        if !self.claim(&key) {
            return None;
        }
        let out = self.reserve_inner(from, &req).await;
        self.unclaim(&key);
        Some(out)
    }

    async fn reserve_inner(&self, from: &Id, req: &fluidlet::model::ReserveRequest) -> Body {
        let storage = |e: crate::store::StoreError| error(ErrorCode::Storage, &e.to_string());
        // Idempotent by (buyer, transaction): the same contract again.
        match self.store.out_find(from.as_str(), req.transaction.as_str()) {
            Ok(Some(r)) => {
                return match minicbor::decode::<Contract>(&r.contract) {
                    Ok(c) => Body::Reserved(Box::new(c)),
                    Err(_) => error(ErrorCode::Storage, "the stored contract does not decode"),
                }
            }
            Ok(None) => {}
            Err(e) => return storage(e),
        }
        if self.demoted() {
            return error(
                ErrorCode::FlavourGone,
                "this reference node is demoted: it lied to the face",
            );
        }
        let listed = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.flavours.get(&req.flavour).cloned());
        let Some(listed) = listed else {
            return error(
                ErrorCode::FlavourGone,
                "no such flavour at this reference node now",
            );
        };
        let held: Vec<OutRecord> = self
            .store
            .out_all()
            .into_iter()
            .filter(|r| {
                r.provider == self.id.as_str()
                    && r.consumer == from.as_str()
                    && r.state == OutState::Reserved
                    && now_ms() <= r.expires_at
            })
            .collect();
        if held.len() >= PENDING_PER_BUYER {
            return error(
                ErrorCode::TooManyPending,
                &format!(
                    "{PENDING_PER_BUYER} unpeered reservations at this reference node already"
                ),
            );
        }
        if held.iter().any(|r| r.ref_flavor == listed.ref_id) {
            // The reference node keys a transaction by buyer id and flavour: a second one
            // would be the first again.
            return error(
                ErrorCode::TooManyPending,
                "an unpeered reservation of this reference flavour is held already: peer or let it lapse (the reference node gives one transaction per buyer and flavour)",
            );
        }
        let f = &listed.flavour;
        let piece = match (&req.partition, &f.partitionability) {
            (None, _) => f.resources,
            (Some(_), None) => {
                return error(ErrorCode::BadPartition, "this flavour is sold only whole")
            }
            (Some(p), Some(pp)) => {
                let checks = check_piece("cpu", p.cpu, pp.cpu_min, pp.cpu_step)
                    .and(check_piece(
                        "memory",
                        p.memory,
                        pp.memory_min,
                        pp.memory_step,
                    ))
                    .and(check_piece(
                        "pods",
                        u64::from(p.pods),
                        u64::from(pp.pods_min),
                        u64::from(pp.pods_step),
                    ));
                if let Err(e) = checks {
                    return error(ErrorCode::BadPartition, &e);
                }
                let r = &f.resources;
                if p.cpu > r.cpu || p.memory > r.memory || p.pods > r.pods || p.storage > r.storage
                {
                    return error(ErrorCode::NoFit, "the piece is larger than the flavour");
                }
                *p
            }
        };
        let mut data = serde_json::json!({
            "cpu": quantity::cpu(piece.cpu),
            "memory": quantity::bytes(piece.memory),
            "pods": quantity::count(u64::from(piece.pods)),
        });
        if piece.storage > 0 {
            data["storage"] = Value::String(quantity::bytes(piece.storage));
        }
        let body = serde_json::json!({
            "flavorID": listed.ref_id,
            "buyerID": {
                "ID": from.as_str(),
                "IP": self.advertise,
                "domain": self.domain.as_str(),
                // The consumer's Liqo cluster id comes only with PEER_REQUEST, after this:
                // the reference node labels its transaction and contract with this.
                "additionalInformation": { "liqoID": from.as_str() },
            },
            "configuration": { "type": crate::rear::K8SLICE, "data": data },
        });
        let answer = client::request(
            &self.endpoint,
            "POST",
            "/api/v2/reservations",
            Some(body.to_string().as_bytes()),
            self.limits(self.cfg.request_timeout),
        )
        .await;
        let a = match answer {
            Ok(a) => a,
            Err(e) => {
                self.failed(&format!("reserve: {e}"));
                return error(
                    ErrorCode::Busy,
                    &format!("the reference node did not answer the reserve: {e}"),
                );
            }
        };
        match a.status {
            200 => {}
            404 => {
                return error(
                    ErrorCode::FlavourGone,
                    "the reference node: Flavor not found",
                )
            }
            400 => {
                return error(
                    ErrorCode::BadPartition,
                    &format!("the reference node refused the piece: {}", snippet(&a.body)),
                )
            }
            s => {
                return error(
                    ErrorCode::Busy,
                    &format!("the reference node answered {s}: {}", snippet(&a.body)),
                )
            }
        }
        let t: Value = match serde_json::from_slice(&a.body) {
            Ok(t) => t,
            Err(e) => {
                self.demote(format!("its reserve answer is not JSON: {e}"))
                    .await;
                return error(
                    ErrorCode::FlavourGone,
                    "the reference node answered garbage; it is demoted",
                );
            }
        };
        let tid = t["transactionID"].as_str().unwrap_or_default().to_string();
        let tid_ok = !tid.is_empty()
            && tid.len() <= 128
            && tid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let expiry = t["expirationTime"].as_str().and_then(parse_rfc3339);
        let lie = if t["flavorID"].as_str() != Some(listed.ref_id.as_str()) {
            Some(format!(
                "it answered a reservation of {} for {}",
                t["flavorID"], listed.ref_id
            ))
        } else if !tid_ok {
            Some(format!(
                "its transaction id {:?} is not one",
                snippet(tid.as_bytes())
            ))
        } else if expiry.is_none_or(|e| e <= now_ms()) {
            Some(format!(
                "its transaction's expirationTime {} is not a future RFC 3339 time",
                t["expirationTime"]
            ))
        } else {
            None
        };
        if let Some(why) = lie {
            self.demote(why).await;
            return error(
                ErrorCode::FlavourGone,
                "the reference node answered a transaction not asked for; it is demoted",
            );
        }
        // The reference node keys transactions by buyer id and flavour and hands back an
        // earlier one unchanged (its piece included) for an hour: after a release or a lapse
        // on this side, a new reserve of another piece may get the old transaction. Not a
        // lie, but not this piece either.
        let c = &t["configuration"]["data"];
        let same_piece = q_milli(&c["cpu"], "cpu").ok() == Some(piece.cpu)
            && q_units(&c["memory"], "memory").ok() == Some(piece.memory)
            && q_u32(&c["pods"], "pods").ok() == Some(piece.pods);
        if !same_piece {
            return error(
                ErrorCode::TooManyPending,
                "the reference node holds an earlier transaction of this buyer for this flavour, for another piece (it keeps one per buyer and flavour for an hour); ask for that piece or wait",
            );
        }
        let now = now_ms();
        let expires_at = expiry.unwrap_or(now).min(now.saturating_add(MAX_HOLD_MS));
        let n = match self.store.next_number() {
            Ok(n) => n,
            Err(e) => return storage(e),
        };
        let Ok(cid) = Id::new(&format!("{}.c{n}", self.id)) else {
            return error(ErrorCode::Storage, "contract id");
        };
        let mut flavour = f.clone();
        flavour.id = req.flavour.clone();
        let contract = Contract {
            id: cid.clone(),
            transaction: req.transaction.clone(),
            price: fluidlet::discovery::price_of(&flavour, &piece),
            flavour,
            buyer: from.clone(),
            seller: self.id.clone(),
            resources: piece,
            created_at: now,
            expires_at,
            state: ContractState::Reserved,
            term_ms: None,
            ends_at: None,
        };
        let Ok(cbor) = minicbor::to_vec(&contract) else {
            return error(ErrorCode::Storage, "the contract does not encode");
        };
        let rec = OutRecord {
            contract_id: cid.to_string(),
            state: OutState::Reserved,
            consumer: from.to_string(),
            fluidlet_tx: req.transaction.to_string(),
            provider: self.id.to_string(),
            endpoint: self.endpoint.clone(),
            ref_flavor: listed.ref_id.clone(),
            ref_transaction: tid,
            contract: cbor,
            expires_at,
            created_at: now,
            ref_contract: None,
            cluster_id: None,
            kubeconfig: None,
        };
        if let Err(e) = self.store.out_put(&rec).await {
            return storage(e);
        }
        Body::Reserved(Box::new(contract))
    }

    fn failed(&self, why: &str) {
        tracing::warn!("reference node {}: {why}", self.endpoint);
        if let Ok(mut s) = self.state.lock() {
            s.last_problem = Some(why.to_string());
        }
    }

    /// PEER_REQUEST: the reference node's purchase; its kubeconfig sealed to the consumer.
    async fn peer(&self, from: &Id, req: PeerRequest) -> Option<Body> {
        let key = format!("p\0{}", req.contract);
        if !self.claim(&key) {
            return None;
        }
        let out = self.peer_inner(from, &req).await;
        self.unclaim(&key);
        Some(out)
    }

    async fn peer_inner(&self, from: &Id, req: &PeerRequest) -> Body {
        let no_contract = || {
            error(
                ErrorCode::NoContract,
                "no live contract of the sender matches",
            )
        };
        let mut r = match self.store.out_get(req.contract.as_str()) {
            Ok(Some(r)) if r.consumer == from.as_str() && r.provider == self.id.as_str() => r,
            Ok(_) => return no_contract(),
            Err(e) => return error(ErrorCode::Storage, &e.to_string()),
        };
        match r.state {
            OutState::Released | OutState::Expired => return no_contract(),
            OutState::Reserved if now_ms() > r.expires_at => {
                r.state = OutState::Expired;
                let _ = self.store.out_put(&r).await;
                return no_contract();
            }
            _ => {}
        }
        let cert = match &req.certificate {
            Some(c) => c.as_slice(),
            None => {
                return error(
                    ErrorCode::BadCertificate,
                    &fluidlet::seal::SealError::NoCertificate.to_string(),
                )
            }
        };
        let q = match self.keys.check(cert, from) {
            Ok(q) => q,
            Err(e) => return error(ErrorCode::BadCertificate, &e.to_string()),
        };
        if r.state == OutState::Reserved {
            if let Err(e) = self.purchase(&mut r).await {
                return *e;
            }
        }
        let (Some(kubeconfig), Some(cluster)) = (&r.kubeconfig, &r.cluster_id) else {
            return error(
                ErrorCode::Storage,
                "the purchased contract lost its credentials",
            );
        };
        let Ok(cluster) = Id::new(cluster) else {
            return error(
                ErrorCode::PeeringFailed,
                "the seller's cluster id is not an id",
            );
        };
        let ctx = fluidlet::seal::Context {
            contract: &req.contract,
            provider: &self.id,
            buyer: from,
        };
        let sealed = match fluidlet::seal::seal(&q, &ctx, kubeconfig.as_bytes()) {
            Ok(s) => s,
            Err(e) => return error(ErrorCode::PeeringFailed, &e.to_string()),
        };
        let Ok(sealed) = Bytes::new(&sealed) else {
            return error(
                ErrorCode::PeeringFailed,
                "the kubeconfig is too large to seal",
            );
        };
        Body::PeerAccept(PeerAccept {
            contract: req.contract.clone(),
            cluster_id: cluster,
            identity: None,
            liqo_version: None,
            sealed: Some(sealed),
        })
    }

    /// POST /api/v2/transactions/{id}/purchase; on success `r` is Active, durably.
    async fn purchase(&self, r: &mut OutRecord) -> Result<(), Box<Body>> {
        let path = format!("/api/v2/transactions/{}/purchase", r.ref_transaction);
        let a = client::request(
            &self.endpoint,
            "POST",
            &path,
            Some(b"{}"),
            self.limits(self.cfg.purchase_timeout),
        )
        .await
        .map_err(|e| {
            self.failed(&format!("purchase: {e}"));
            boxed_error(
                ErrorCode::PeeringFailed,
                &format!("the reference node did not answer the purchase: {e}"),
            )
        })?;
        match a.status {
            200 => {}
            408 => {
                r.state = OutState::Expired;
                let _ = self.store.out_put(r).await;
                return Err(boxed_error(
                    ErrorCode::NoContract,
                    "the reference node's transaction timed out (408)",
                ));
            }
            s => {
                return Err(boxed_error(
                    ErrorCode::PeeringFailed,
                    &format!(
                        "the reference node's purchase answered {s}: {}",
                        snippet(&a.body)
                    ),
                ))
            }
        }
        let c: Value = match serde_json::from_slice(&a.body) {
            Ok(c) => c,
            Err(e) => {
                self.demote(format!("its purchase answer is not JSON: {e}"))
                    .await;
                return Err(boxed_error(
                    ErrorCode::PeeringFailed,
                    "the reference node answered garbage; it is demoted",
                ));
            }
        };
        let creds = &c["peeringTargetCredentials"];
        let cluster = creds["clusterID"].as_str().unwrap_or_default().to_string();
        let kubeconfig = creds["kubeconfig"]
            .as_str()
            .and_then(base64_decode)
            .and_then(|k| String::from_utf8(k).ok());
        let lie = if c["transactionID"].as_str() != Some(r.ref_transaction.as_str()) {
            Some(format!(
                "its contract names transaction {} for {}",
                c["transactionID"], r.ref_transaction
            ))
        } else if c["flavor"]["flavorID"].as_str() != Some(r.ref_flavor.as_str()) {
            Some(format!(
                "its contract is for flavour {}, not {}",
                c["flavor"]["flavorID"], r.ref_flavor
            ))
        } else if !liqo_cluster_id(&cluster) || Id::new(&cluster).is_err() {
            Some(format!(
                "its cluster id {cluster:?} is not a Liqo cluster id"
            ))
        } else if kubeconfig
            .as_ref()
            .is_none_or(|k| k.is_empty() || k.len() > MAX_IDENTITY)
        {
            Some(format!(
                "its kubeconfig is not base64 of UTF-8 text of 1 to {MAX_IDENTITY} bytes"
            ))
        } else {
            None
        };
        if let Some(why) = lie {
            self.demote(why.clone()).await;
            return Err(boxed_error(
                ErrorCode::PeeringFailed,
                &format!(
                    "the reference node's contract is not the one bought ({why}); it is demoted"
                ),
            ));
        }
        r.state = OutState::Active;
        r.cluster_id = Some(cluster);
        r.kubeconfig = kubeconfig;
        r.ref_contract = c["contractID"]
            .as_str()
            .map(|s| s.chars().take(253).collect());
        self.store
            .out_put(r)
            .await
            .map_err(|e| boxed_error(ErrorCode::Storage, &e.to_string()))
    }

    /// RELEASE: the face's record ends; the reference node is not told (REAR over HTTP has
    /// no release).
    async fn release(&self, from: &Id, r: ContractRef) -> Body {
        let rec = match self.store.out_get(r.contract.as_str()) {
            Ok(Some(rec)) if rec.consumer == from.as_str() && rec.provider == self.id.as_str() => {
                rec
            }
            Ok(_) => return error(ErrorCode::NoContract, "no contract of the sender matches"),
            Err(e) => return error(ErrorCode::Storage, &e.to_string()),
        };
        if matches!(rec.state, OutState::Reserved | OutState::Active) {
            let mut rec = rec;
            rec.state = OutState::Released;
            rec.expires_at = rec.expires_at.max(now_ms());
            if let Err(e) = self.store.out_put(&rec).await {
                return error(ErrorCode::Storage, &e.to_string());
            }
            tracing::info!(
                "{} released by {from}; the reference node {} keeps its contract {:?} (REAR over HTTP has no release)",
                rec.contract_id,
                self.endpoint,
                rec.ref_contract
            );
        }
        Body::Released(r)
    }
}

/// The first bytes of an answer, printable, for an error text.
fn snippet(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(120)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A reference node's multicast announcement (network-controller.go sendMulticastMessage:
/// json.Marshal of nodecore's NodeIdentity: `domain`, `nodeID`, `ip` = its REAR gateway's
/// `host:port`, `additionalInformation.liqoID`). `None` for anything else.
pub fn announcement(datagram: &[u8]) -> Option<(String, String)> {
    // The reference node reads at most 1024 bytes per datagram; so does the face.
    if datagram.len() > 1024 {
        return None;
    }
    let v: Value = serde_json::from_slice(datagram).ok()?;
    let node = v["nodeID"].as_str()?.to_string();
    let ip = v["ip"].as_str()?.to_string();
    let ok = ip.len() <= 255
        && ip.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty()
                && p.parse::<u16>().is_ok_and(|p| p > 0)
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    ok.then_some((node, ip))
}

/// The reference nodes sold from, static and found by multicast.
pub type Registry = Arc<Mutex<Vec<(Arc<Reference>, Option<Instant>)>>>;

/// Listens to reference nodes' announcements: an announced gateway whose provider
/// certificate is under `outbound.dir` (domain.sh refprovider) is sold from until it is not
/// heard for `multicast_expiry_secs`; one without is logged once and ignored.
pub async fn listen(
    cfg: Config,
    store: Store,
    registry: Registry,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> Result<(), String> {
    let Some(out) = cfg.outbound.clone() else {
        return Ok(());
    };
    let Some(group) = out.multicast else {
        return Ok(());
    };
    let bound = async {
        let sock = tokio::net::UdpSocket::bind(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            group.port(),
        ))
        .await
        .map_err(|e| format!("outbound.multicast {group}: {e}"))?;
        sock.join_multicast_v4(*group.ip(), out.multicast_interface)
            .map_err(|e| format!("outbound.multicast {group}: joining: {e}"))?;
        Ok::<_, String>(sock)
    }
    .await;
    let sock = match bound {
        Ok(s) => {
            if let Some(r) = ready {
                let _ = r.send(Ok(()));
            }
            s
        }
        Err(e) => {
            if let Some(r) = ready {
                let _ = r.send(Err(e.clone()));
            }
            return Err(e);
        }
    };
    tracing::info!("listening to reference nodes' announcements on {group}");
    let mut refused: HashSet<String> = HashSet::new();
    let mut buf = [0u8; 2048];
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = sweep.tick() => {
                let gone: Vec<Arc<Reference>> = {
                    let Ok(mut r) = registry.lock() else { continue };
                    let (keep, gone): (Vec<_>, Vec<_>) = r.drain(..).partition(|(_, heard)| {
                        heard.is_none_or(|h| h.elapsed() < out.multicast_expiry)
                    });
                    *r = keep;
                    gone.into_iter().map(|(x, _)| x).collect()
                };
                for g in gone {
                    tracing::info!("reference node {} not announced for {:?}: forgotten", g.endpoint, out.multicast_expiry);
                    g.stop().await;
                }
            }
            got = sock.recv_from(&mut buf) => {
                let Ok((n, _from)) = got else { continue };
                let Some((node, endpoint)) = announcement(&buf[..n]) else { continue };
                let known = registry.lock().ok().and_then(|mut r| {
                    r.iter_mut().find(|(x, _)| x.endpoint == endpoint).map(|(_, heard)| {
                        if heard.is_some() {
                            *heard = Some(Instant::now());
                        }
                    })
                });
                if known.is_some() {
                    continue;
                }
                let cert = out.dir.join(provider_id(&endpoint)).join("node.pem");
                if !cert.is_file() {
                    if refused.len() < 1024 && refused.insert(endpoint.clone()) {
                        tracing::warn!(
                            "reference node {node} announced at {endpoint}, not admitted: domain.sh refprovider DIR {} {endpoint}",
                            cfg.name
                        );
                    }
                    continue;
                }
                let full = registry.lock().map(|r| r.len() >= crate::config::MAX_REFERENCES).unwrap_or(true);
                if full {
                    continue;
                }
                match Reference::start(&cfg, &out, &endpoint, store.clone(), stop.clone()) {
                    Ok(r) => {
                        tracing::info!("reference node {node} announced at {endpoint}: sold from as {}", r.id);
                        if let Ok(mut reg) = registry.lock() {
                            reg.push((r, Some(Instant::now())));
                        }
                    }
                    Err(e) => tracing::warn!("reference node {node} at {endpoint}: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_times_and_ids_parse_as_the_reference_node_writes_them() {
        assert_eq!(millionths("1.5"), Some(1_500_000));
        assert_eq!(millionths("2"), Some(2_000_000));
        assert_eq!(millionths("0.000001"), Some(1));
        assert_eq!(millionths("1.0000001"), None);
        assert_eq!(millionths("-1"), None);
        assert_eq!(millionths(""), None);
        assert_eq!(millionths("1e3"), None);
        assert_eq!(
            parse_rfc3339("2026-01-01T00:00:00Z"),
            Some(1_767_225_600_000)
        );
        assert_eq!(
            parse_rfc3339("2026-01-01T01:00:00+01:00"),
            Some(1_767_225_600_000)
        );
        assert_eq!(
            parse_rfc3339("2025-12-31T23:00:00.123456789-01:00"),
            Some(1_767_225_600_000)
        );
        assert_eq!(parse_rfc3339("2026-01-01 00:00:00"), None);
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        let p = provider_id("10.0.0.7:3004");
        assert!(p.starts_with("ref-") && p.len() == 36, "{p}");
        assert_ne!(p, crate::domain::buyer_id("10.0.0.7:3004"));
        assert_eq!(base64_decode("Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(base64_decode("Zg=="), Some(b"f".to_vec()));
        assert_eq!(base64_decode("Zg="), None);
        assert_eq!(base64_decode("Z!=="), None);
        assert!(liqo_cluster_id("a1b2-c3") && !liqo_cluster_id("A1") && !liqo_cluster_id("-a"));
    }

    fn flavor(currency: &str) -> Value {
        serde_json::json!({
            "flavorID": "fl-node-a-1",
            "providerID": "node-a",
            "type": { "name": "k8slice", "data": {
                "charateristics": { "architecture": "amd64", "cpu": "4", "memory": "8Gi", "pods": "110" },
                "properties": {},
                "policies": { "partitionability": {
                    "cpuMin": "500m", "memoryMin": "1Gi", "podsMin": "1",
                    "cpuStep": "500m", "memoryStep": "1Gi", "podsStep": "1" } } } },
            "timestamp": "2026-12-04T10:00:00+01:00",
            "location": { "altitude": "IT", "city": "Turin" },
            "price": { "amount": "1.2", "currency": currency, "period": "hour" },
            "owner": { "ID": "node-a", "IP": "10.0.0.7:3004", "domain": "fluidos.eu" },
            "availability": true,
        })
    }

    #[test]
    fn a_reference_flavour_becomes_a_fluidlet_flavour_or_a_reason() {
        let p = Id::new(&provider_id("10.0.0.7:3004")).unwrap();
        let l = to_flavour(&flavor("EUR"), &p, "EUR").unwrap().unwrap();
        assert_eq!(l.ref_id, "fl-node-a-1");
        let f = &l.flavour;
        assert_eq!(
            (f.resources.cpu, f.resources.memory, f.resources.pods),
            (4000, 8 << 30, 110)
        );
        assert_eq!(f.partitionability.as_ref().unwrap().cpu_step, 500);
        assert_eq!(f.price.amount, 1_200_000);
        assert_eq!(
            f.location
                .as_ref()
                .unwrap()
                .country
                .as_ref()
                .unwrap()
                .as_str(),
            "IT"
        );
        assert_eq!(f.provider, p);
        // Any change of the flavour gives another id; the same flavour the same id.
        let mut changed = flavor("EUR");
        changed["type"]["data"]["charateristics"]["cpu"] = "2".into();
        let l2 = to_flavour(&changed, &p, "EUR").unwrap().unwrap();
        assert_ne!(l2.flavour.id, l.flavour.id);
        assert_eq!(
            to_flavour(&flavor("EUR"), &p, "EUR")
                .unwrap()
                .unwrap()
                .flavour
                .id,
            f.id
        );
        // Another currency, the correct spelling of the typo, another type: refused.
        let e = to_flavour(&flavor("USD"), &p, "EUR").unwrap_err();
        assert!(e.contains("USD") && e.contains("EUR"), "{e}");
        assert!(to_flavour(&flavor(""), &p, "EUR").is_err());
        let mut spelt = flavor("EUR");
        let ch = spelt["type"]["data"]["charateristics"].take();
        spelt["type"]["data"]["characteristics"] = ch;
        assert!(to_flavour(&spelt, &p, "EUR").is_err());
        let mut svc = flavor("EUR");
        svc["type"]["name"] = "service".into();
        assert!(to_flavour(&svc, &p, "EUR").unwrap_err().contains("k8slice"));
        let mut off = flavor("EUR");
        off["availability"] = false.into();
        assert!(to_flavour(&off, &p, "EUR").unwrap().is_none());
    }
}
