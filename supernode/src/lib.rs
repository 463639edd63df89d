//! fluidlet-supernode: a REAR-over-HTTP face for a fluidlet domain (docs/supernode.md).
//!
//! It runs beside the domain broker, never on a gateway. FLUIDOS reference nodes
//! (fluidos-project/node) list the domain's flavours, reserve and purchase through it as
//! they would at another reference node's gateway; it speaks fluidlet's REAR over MQTT to
//! the providers on their behalf, each reference node as a buyer of its own (`ref-{hash}`).
//! Only the inbound direction (a reference node buys from a fluidlet provider) is built.

pub mod config;
pub mod domain;
pub mod face;
pub mod http;
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
            }
        });
        let server = tokio::spawn(http::serve(
            face.clone(),
            listener,
            cfg.max_connections,
            cfg.max_body_bytes,
            cfg.header_timeout,
            cfg.requests_per_second,
            rx,
        ));
        Ok(Supernode {
            addr,
            face,
            domain,
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

    /// Stops serving, disconnects and flushes the tables.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.domain.disconnect().await;
        // Let connection tasks holding the face finish, so the tables close (sled's lock).
        for _ in 0..100 {
            if Arc::strong_count(&self.face) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
