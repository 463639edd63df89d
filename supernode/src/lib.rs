//! fluidlet-supernode: a REAR-over-HTTP face for a fluidlet domain (docs/supernode.md).
//!
//! It runs beside the domain broker, never on a gateway. FLUIDOS reference nodes
//! (fluidos-project/node) list the domain's flavours, reserve and purchase through it as
//! they would at another reference node's gateway; it speaks fluidlet's REAR over MQTT to
//! the providers on their behalf, each reference node as a buyer of its own (`ref-{hash}`).
//! Outbound, the face also sells reference nodes' flavours to fluidlet consumers, each
//! reference node a provider of its own (`outbound`).

pub mod client;
pub mod config;
pub mod domain;
pub mod face;
pub mod http;
pub mod outbound;
pub mod quantity;
pub mod rear;
pub mod store;

pub use config::Config;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// A transaction never answered, or reserved and expired, is deleted this long after (1 h,
/// as long as a reference node keeps a transaction).
pub const STALE_MS: u64 = 3_600_000;
/// A purchased transaction is kept this long after its contract's end (7 days, the
/// providers' default retention), for repeated purchases.
pub const KEEP_MS: u64 = 7 * 86_400_000;

/// A running face.
pub struct Supernode {
    pub addr: SocketAddr,
    face: Arc<face::Face>,
    domain: domain::Domain,
    references: outbound::Registry,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Supernode {
    /// Opens the tables, connects to the domain broker and starts serving HTTP.
    pub async fn start(cfg: Config) -> Result<Supernode, String> {
        let store = store::Store::open(&cfg.data_dir).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("http.listen {}: {e}", cfg.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let domain = domain::Domain::start(&cfg)?;
        let face = Arc::new(face::Face::new(cfg.clone(), domain.clone(), store.clone()));
        let (stop, rx) = watch::channel(false);
        let mut references = Vec::new();
        if let Some(out) = &cfg.outbound {
            for e in &out.references {
                references.push((
                    outbound::Reference::start(&cfg, out, e, store.clone(), rx.clone())?,
                    None,
                ));
            }
        }
        let references: outbound::Registry = Arc::new(std::sync::Mutex::new(references));
        if cfg.outbound.as_ref().is_some_and(|o| o.multicast.is_some()) {
            let (c, s, r, x) = (cfg.clone(), store.clone(), references.clone(), rx.clone());
            // Bind and join now, so a bad group or port is an error at start.
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let res = outbound::listen(c, s, r, x, Some(ready_tx)).await;
                if let Err(e) = res {
                    tracing::warn!("{e}");
                }
            });
            match ready_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the multicast listener ended".into()),
            }
        }
        // The sweeper: what can no longer be used leaves the tables (store::Store::prune).
        let mut sweep_stop = rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
                    _ = sweep_stop.changed() => return,
                }
                match store.prune(fluidlet::unix_ms(), STALE_MS, KEEP_MS).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("pruned {n} transactions"),
                    Err(e) => tracing::warn!("pruning: {e}"),
                }
                match store.out_sweep(fluidlet::unix_ms(), KEEP_MS).await {
                    Ok((0, 0)) => {}
                    Ok((x, d)) => {
                        tracing::info!("outbound: {x} reservations expired, {d} records pruned")
                    }
                    Err(e) => tracing::warn!("outbound sweep: {e}"),
                }
            }
        });
        let tls = match &cfg.https {
            Some(h) => Some(http::acceptor(h)?),
            None => None,
        };
        let server = tokio::spawn(http::serve(
            face.clone(),
            listener,
            http::Bounds {
                max_connections: cfg.max_connections,
                max_body: cfg.max_body_bytes,
                header_timeout: cfg.header_timeout,
                rate: cfg.requests_per_second,
            },
            tls,
            rx,
        ));
        Ok(Supernode {
            addr,
            face,
            domain,
            references,
            stop,
            server,
        })
    }

    /// Whether the domain connection is up (the face answers 503 until it is).
    pub fn ready(&self) -> bool {
        self.face.ready()
    }

    /// The transactions in the face's tables.
    pub fn transactions(&self) -> Vec<store::TxRecord> {
        self.face.transactions()
    }

    /// The reference nodes sold from (outbound), as the face sees them now.
    pub fn references(&self) -> Vec<outbound::Status> {
        self.references
            .lock()
            .map(|r| r.iter().map(|(x, _)| x.status()).collect())
            .unwrap_or_default()
    }

    /// The contracts sold for reference nodes (outbound).
    pub fn outbound_contracts(&self) -> Vec<store::OutRecord> {
        self.face.store().out_all()
    }

    /// Stops serving, clears the reference nodes' adverts, disconnects and flushes the
    /// tables.
    pub async fn shutdown(self) {
        let all: Vec<Arc<outbound::Reference>> = self
            .references
            .lock()
            .map(|mut r| r.drain(..).map(|(x, _)| x).collect())
            .unwrap_or_default();
        for r in &all {
            r.stop().await;
        }
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.domain.disconnect().await;
        // Let connection tasks holding the face finish, so the tables close (sled's lock).
        let refs: Vec<std::sync::Weak<outbound::Reference>> =
            all.iter().map(Arc::downgrade).collect();
        drop(all);
        for _ in 0..100 {
            if Arc::strong_count(&self.face) == 1 && refs.iter().all(|r| r.upgrade().is_none()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
