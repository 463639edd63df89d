//! The face as a member of the fluidlet domain: one MQTT connection (mutual TLS, CN
//! `supernode:{name}`) that reads the retained catalog and exchanges addressed mail as the
//! reference nodes' buyers (`ref-...`), with fluidlet's own wire codec.

use crate::config::Config;
use fluidlet::model::{Flavour, Id};
use fluidlet::wire::{Body, Message, MAX_PACKET};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Most providers kept in the catalog (a domain has a few thousand at most).
pub const MAX_PROVIDERS: usize = 100_000;
/// Most requests waiting for an answer at once.
const MAX_PENDING: usize = 4096;

/// A provider's current advert.
#[derive(Clone, Debug)]
pub struct Advert {
    pub flavours: Vec<Flavour>,
    /// When the provider sent it (the envelope's `sent_at`), Unix ms.
    pub sent_at: u64,
}

/// Earlier flavour ids of one provider the face still maps (below).
const PAST_IDS: usize = 64;

/// The catalog: every provider's advert, and the face's flavour ids.
#[derive(Default)]
pub struct Catalog {
    pub providers: HashMap<Id, Advert>,
    /// Face flavour id -> (provider, fluidlet flavour id): the current flavours, and up to
    /// PAST_IDS earlier ones per provider. A fluidlet provider serves a reservation of a piece
    /// that names an earlier id of the same offer from its current flavour (docs/protocol.md,
    /// "Superseded flavour ids"), so a reference node that listed before another buyer's
    /// reservation can still reserve; the provider answers FLAVOUR_GONE when it cannot.
    pub index: HashMap<String, (Id, Id)>,
    past: HashMap<Id, std::collections::VecDeque<String>>,
}

/// The face's name for a provider's flavour: a Kubernetes name (the reference buyer makes a
/// Flavor object of that name), stable for as long as the flavour id is, and telling
/// providers apart: `fl-` and 24 hex digits of SHA-256(provider NUL flavour).
pub fn face_flavor_id(provider: &Id, flavour: &Id) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(provider.as_str().as_bytes());
    ctx.update(&[0]);
    ctx.update(flavour.as_str().as_bytes());
    format!("fl-{}", hex(&ctx.finish().as_ref()[..12]))
}

/// The buyer id the face speaks as for the reference node of Liqo cluster id `liqo_id`:
/// `ref-` and the first 32 hex digits of SHA-256(liqo_id), as `domain.sh refnode` computes.
pub fn buyer_id(liqo_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, liqo_id.as_bytes());
    format!("ref-{}", hex(&d.as_ref()[..16]))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Catalog {
    fn set(&mut self, provider: Id, advert: Option<Advert>) {
        let Some(a) = advert else {
            // The provider is gone (empty retained payload: its will, or a clean stop).
            self.providers.remove(&provider);
            for id in self.past.remove(&provider).unwrap_or_default() {
                self.index.remove(&id);
            }
            return;
        };
        if !self.providers.contains_key(&provider) && self.providers.len() >= MAX_PROVIDERS {
            return;
        }
        let past = self.past.entry(provider.clone()).or_default();
        let mut current = std::collections::HashSet::new();
        for f in &a.flavours {
            let id = face_flavor_id(&provider, &f.id);
            current.insert(id.clone());
            if self
                .index
                .insert(id.clone(), (provider.clone(), f.id.clone()))
                .is_none()
            {
                past.push_back(id);
            }
        }
        // Keep every current id and the PAST_IDS newest earlier ones.
        let earlier = past.iter().filter(|id| !current.contains(*id)).count();
        let mut drop = earlier.saturating_sub(PAST_IDS);
        let index = &mut self.index;
        past.retain(|id| {
            if drop > 0 && !current.contains(id) {
                drop -= 1;
                index.remove(id);
                false
            } else {
                true
            }
        });
        self.providers.insert(provider, a);
    }

    /// The provider and fluidlet flavour id a face flavour id names.
    pub fn lookup(&self, face_id: &str) -> Option<(Id, Id)> {
        self.index.get(face_id).cloned()
    }
}

type Waiters = HashMap<(String, u64), (String, oneshot::Sender<Message>)>;

/// The domain connection: catalog and request/answer.
#[cfg(test)]
mod tests {
    use super::*;
    use fluidlet::model::{Price, Resources, Text};

    fn flavour(p: &str, id: &str) -> Flavour {
        Flavour {
            id: Id::new(id).unwrap(),
            provider: Id::new(p).unwrap(),
            architecture: Text::new("amd64").unwrap(),
            resources: Resources::default(),
            gpu: None,
            partitionability: None,
            price: Price::default(),
            available: true,
            location: None,
        }
    }

    #[test]
    fn earlier_ids_stay_mapped_within_a_bound_and_current_ones_always() {
        let mut c = Catalog::default();
        let p = Id::new("p").unwrap();
        let advert = |ids: &[String]| Advert {
            flavours: ids.iter().map(|i| flavour("p", i)).collect(),
            sent_at: 0,
        };
        let stable = "stable.1".to_string();
        for n in 0..(PAST_IDS + 10) {
            c.set(
                p.clone(),
                Some(advert(&[stable.clone(), format!("churn.{n}")])),
            );
        }
        let face = |id: &str| face_flavor_id(&p, &Id::new(id).unwrap());
        assert!(
            c.lookup(&face(&stable)).is_some(),
            "a current id was evicted"
        );
        assert!(c
            .lookup(&face(&format!("churn.{}", PAST_IDS + 9)))
            .is_some());
        assert!(
            c.lookup(&face("churn.10")).is_some(),
            "the newest earlier ids stay"
        );
        assert!(c.lookup(&face("churn.8")).is_none(), "older ones go");
        assert!(c.index.len() <= PAST_IDS + 2);
        c.set(p.clone(), None);
        assert!(c.index.is_empty() && c.providers.is_empty());
    }
}

#[derive(Clone)]
pub struct Domain {
    pub catalog: Arc<Mutex<Catalog>>,
    client: AsyncClient,
    domain: Id,
    waiters: Arc<Mutex<Waiters>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    connected: Arc<std::sync::atomic::AtomicBool>,
}

fn tls_config(cfg: &Config) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| {
        fluidlet::config::read_bounded(p, 64 * 1024).map_err(|e| format!("{}: {e:?}", p.display()))
    };
    let chain = CertificateDer::pem_slice_iter(&read(&cfg.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM: {e}", cfg.cert.display()))?;
    let first = chain
        .first()
        .ok_or_else(|| format!("{}: no certificate", cfg.cert.display()))?;
    let id = fluidlet::tls::identity(first).map_err(|e| format!("{}: {e}", cfg.cert.display()))?;
    if id.common_name != cfg.common_name() {
        return Err(format!(
            "{}: its CN is {:?}, not {:?} (domain.sh supernode DIR {})",
            cfg.cert.display(),
            id.common_name,
            cfg.common_name(),
            cfg.name
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&cfg.key)?)
        .map_err(|e| format!("{}: no private key: {e}", cfg.key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&cfg.ca)?) {
        let ca = ca.map_err(|e| format!("{}: not PEM: {e}", cfg.ca.display()))?;
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", cfg.ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

impl Domain {
    /// Connects (in the background, reconnecting) and starts reading.
    pub fn start(cfg: &Config) -> Result<Domain, String> {
        let tls = tls_config(cfg)?;
        let mut opts = MqttOptions::new(
            format!("{}@{}", cfg.common_name(), cfg.domain),
            cfg.broker_host.clone(),
            cfg.broker_port,
        );
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        let (client, mut events) = AsyncClient::new(opts, 256);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let d = Domain {
            catalog: Arc::new(Mutex::new(Catalog::default())),
            client,
            domain: cfg.domain.clone(),
            waiters: Arc::new(Mutex::new(HashMap::new())),
            next_id: Arc::new(std::sync::atomic::AtomicU64::new(
                fluidlet::unix_ms().saturating_mul(1024),
            )),
            connected: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let me = d.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        me.connected
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        let c = me.client.clone();
                        let dom = me.domain.clone();
                        tokio::spawn(async move {
                            for f in [
                                format!("fluidos/v1/{dom}/catalog/+"),
                                // The broker's plugin delivers only mail to ref- buyers.
                                format!("fluidos/v1/{dom}/to/+/from/+"),
                            ] {
                                if let Err(e) = c.subscribe(f, QoS::AtLeastOnce).await {
                                    tracing::warn!("subscribe: {e}");
                                }
                            }
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => me.incoming(&p.topic, &p.payload),
                    Ok(_) => {}
                    Err(e) => {
                        if me
                            .connected
                            .swap(false, std::sync::atomic::Ordering::SeqCst)
                        {
                            tracing::warn!("domain broker: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(d)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn incoming(&self, topic: &str, payload: &[u8]) {
        let prefix = format!("fluidos/v1/{}/", self.domain);
        let Some(rest) = topic.strip_prefix(&prefix) else {
            return;
        };
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            ["catalog", node] => self.advert(node, payload),
            ["to", to, "from", from] if to.starts_with("ref-") => self.answer(to, from, payload),
            _ => {}
        }
    }

    fn advert(&self, node: &str, payload: &[u8]) {
        // A reference node's flavours (outbound, this face or another) are never listed back
        // to reference nodes: they buy from each other directly.
        if node.starts_with("ref-") {
            return;
        }
        let Ok(node) = Id::new(node) else { return };
        let advert = if payload.is_empty() {
            None
        } else {
            let Ok(m) = Message::decode(payload) else {
                return;
            };
            let Body::Advert(fl) = m.body else { return };
            if m.sender != node || fl.flavours.0.iter().any(|f| f.provider != node) {
                return;
            }
            Some(Advert {
                flavours: fl.flavours.0.iter().cloned().collect(),
                sent_at: m.sent_at,
            })
        };
        if let Ok(mut c) = self.catalog.lock() {
            c.set(node, advert);
        }
    }

    fn answer(&self, to: &str, from: &str, payload: &[u8]) {
        let Ok(m) = Message::decode(payload) else {
            return;
        };
        if m.sender.as_str() != from {
            return;
        }
        let Some(corr) = m.correlation else { return };
        let key = (to.to_string(), corr);
        let waiter = self.waiters.lock().ok().and_then(|mut w| {
            if w.get(&key).is_some_and(|(expected, _)| expected == from) {
                w.remove(&key)
            } else {
                None
            }
        });
        if let Some((_, w)) = waiter {
            let _ = w.send(m);
        }
    }

    /// Sends `body` as `buyer` to `to` and waits for the answer correlated to it from `to`,
    /// resending the same message (same id) every `resend` until `timeout`.
    pub async fn request(
        &self,
        buyer: &Id,
        to: &Id,
        body: Body,
        timeout: Duration,
        resend: Option<Duration>,
    ) -> Result<Message, String> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let msg = Message {
            id,
            correlation: None,
            sent_at: fluidlet::unix_ms(),
            sender: buyer.clone(),
            body,
        };
        let bytes = msg.encode().map_err(|e| format!("encode: {e}"))?;
        let (tx, mut rx) = oneshot::channel();
        {
            let mut w = self.waiters.lock().map_err(|_| "poisoned".to_string())?;
            if w.len() >= MAX_PENDING {
                return Err("too many requests in flight".into());
            }
            w.insert((buyer.to_string(), id), (to.to_string(), tx));
        }
        let topic = format!("fluidos/v1/{}/to/{to}/from/{buyer}", self.domain);
        let deadline = tokio::time::Instant::now() + timeout;
        let result = loop {
            // The client's queue may be full while the broker is away: bounded by the deadline.
            let sent = tokio::time::timeout_at(
                deadline,
                self.client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, bytes.clone()),
            )
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Err(format!("publish: {e}")),
                Err(_) => break Err("the domain broker is not reachable".into()),
            }
            let wait_until = match resend {
                Some(r) => (tokio::time::Instant::now() + r).min(deadline),
                None => deadline,
            };
            match tokio::time::timeout_at(wait_until, &mut rx).await {
                Ok(Ok(m)) => break Ok(m),
                Ok(Err(_)) => break Err("answer lost".into()),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    break Err(format!("{to} did not answer within {timeout:?}"))
                }
                Err(_) => continue,
            }
        };
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&(buyer.to_string(), id));
        }
        result
    }

    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}
