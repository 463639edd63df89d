//! The control socket: how `fluidlet intent`, `fluidlet status` and `fluidlet contract`
//! talk to the running agent.
//!
//! A unix socket (owner-only, mode 0600, in the data directory by default) carrying frames of
//! a 4-byte big-endian length and a CBOR [`Request`] or [`Response`]. Requests are at most
//! [`MAX_REQUEST`] bytes (an intent with its manifest), responses at most [`MAX_RESPONSE`];
//! a longer frame is refused before it is read. A submitted intent streams one
//! [`Response::Step`] per workflow step on this node, then the intent as it ended.

use crate::model::{Allocation, Contract, Flavour, Id, Intent, Text};
use crate::orchestrator::IntentSpec;
use crate::shared::Shared;
use crate::AgentError;
use minicbor::{Decode, Encode};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

/// Largest request frame: an intent with a 64 KiB manifest fits.
pub const MAX_REQUEST: usize = 96 * 1024;
/// Largest response frame (a status of a busy node).
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// Clients served at once; more wait in the listen queue.
const MAX_CLIENTS: usize = 4;

#[derive(Clone, Debug, Encode, Decode)]
pub enum Request {
    #[n(0)]
    Submit(#[n(0)] Box<IntentSpec>),
    #[n(1)]
    ListIntents,
    #[n(2)]
    ShowIntent(#[n(0)] Id),
    #[n(3)]
    Status,
    #[n(4)]
    Release(#[n(0)] Id),
    #[n(5)]
    Catalog,
    #[n(6)]
    CancelIntent(#[n(0)] Id),
    #[n(7)]
    RetryIntent(#[n(0)] Id),
}

/// What `fluidlet catalog` shows: the flavours this node has heard of (its Peering
/// Candidates) and what it knows of each provider.
#[derive(Clone, Debug, Encode, Decode)]
#[cbor(map)]
pub struct CatalogView {
    /// Unix ms when the view was taken (ages are against it).
    #[n(0)]
    pub now: u64,
    /// At most [`MAX_CATALOG_VIEW`], by provider then flavour id.
    #[n(1)]
    pub flavours: Vec<crate::model::Candidate>,
    #[n(2)]
    pub providers: Vec<ProviderView>,
    /// More candidates than [`MAX_CATALOG_VIEW`] are held.
    #[n(3)]
    pub truncated: bool,
}

/// One provider in [`CatalogView`].
#[derive(Clone, Debug, Encode, Decode)]
#[cbor(map)]
pub struct ProviderView {
    #[n(0)]
    pub id: Id,
    #[n(1)]
    pub flavours: u32,
    /// Unix ms its freshest flavour was heard.
    #[n(2)]
    pub seen_at: u64,
    #[n(3)]
    pub rating: Option<crate::tables::Rating>,
}

/// Most flavours one catalog view carries (well inside [`MAX_RESPONSE`]).
pub const MAX_CATALOG_VIEW: usize = 2000;

/// What `fluidlet status` shows.
#[derive(Clone, Debug, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct StatusReport {
    #[n(0)]
    pub node: Id,
    #[n(1)]
    pub domain: Id,
    #[n(2)]
    pub connected: bool,
    #[n(3)]
    pub connects: u64,
    #[n(4)]
    pub last_error: Option<String>,
    #[n(5)]
    pub flavours: Vec<Flavour>,
    #[n(6)]
    pub contracts: Vec<Contract>,
    #[n(7)]
    pub allocations: Vec<Allocation>,
    /// Without their manifests.
    #[n(8)]
    pub intents: Vec<Intent>,
    #[n(9)]
    pub fabric: String,
    /// Counters and gauges (docs/operations.md, "Metrics"); absent from older agents.
    #[n(10)]
    pub metrics: Option<crate::metrics::Snapshot>,
    /// The agent's release, as `fluidlet --version` prints it; absent from older agents.
    #[n(11)]
    pub version: Option<String>,
    /// The protocol revision it implements (docs/protocol.md section 9); absent: older.
    #[n(12)]
    pub protocol_revision: Option<u16>,
    /// The certificate is close to its expiry (fewer than 30 days left, crate::tls) or
    /// past it, in words; the expiry itself is `metrics.certificate_not_after`.
    #[n(13)]
    pub certificate_warning: Option<String>,
}

#[derive(Clone, Debug, Encode, Decode)]
pub enum Response {
    #[n(0)]
    Step {
        #[n(0)]
        number: u8,
        #[n(1)]
        element: Text<32>,
        #[n(2)]
        text: String,
    },
    #[n(1)]
    Intent(#[n(0)] Box<Intent>),
    #[n(2)]
    Intents(#[n(0)] Vec<Intent>),
    #[n(3)]
    Status(#[n(0)] Box<StatusReport>),
    #[n(4)]
    Released(#[n(0)] Box<Contract>),
    #[n(5)]
    Error(#[n(0)] String),
    #[n(6)]
    Catalog(#[n(0)] Box<CatalogView>),
}

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("control frame: {0}")]
    Decode(String),
}

async fn write_frame<T: Encode<()>>(
    s: &mut (impl tokio::io::AsyncWrite + Unpin),
    v: &T,
) -> Result<(), ControlError> {
    let bytes = minicbor::to_vec(v).unwrap_or_default();
    let len = u32::try_from(bytes.len()).map_err(|_| ControlError::TooLarge {
        len: bytes.len(),
        max: u32::MAX as usize,
    })?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame; `None` at a clean end of stream.
async fn read_frame<T: for<'a> Decode<'a, ()>>(
    s: &mut UnixStream,
    max: usize,
) -> Result<Option<T>, ControlError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ControlError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    minicbor::decode(&buf)
        .map(Some)
        .map_err(|e| ControlError::Decode(e.to_string()))
}

/// Binds the socket (owner-only) at `path`, replacing a socket file left by a crashed run.
/// [`serve`] then answers on it.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let err =
        |e: std::io::Error| AgentError::Other(format!("control socket {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket file left by a crashed run: nobody answers on it, so it can go.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    info!(socket = %path.display(), "control socket ready");
    Ok(listener)
}

/// Serves the socket [`bind`] made until `stop`, then removes the socket file. The node
/// ([`crate::node`]) runs it as one of its tasks.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: UnixListener,
    mut stop: watch::Receiver<bool>,
) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        // Cancel safety: accept is cancel-safe; a client being served runs in its task.
        let conn = tokio::select! {
            _ = stop.changed() => break,
            c = listener.accept() => c,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                continue;
            }
        };
        let Ok(permit) = clients.clone().acquire_owned().await else {
            break;
        };
        let sh = shared.clone();
        shared.own_until_stop(async move {
            let _permit = permit;
            if let Err(e) = client(&sh, stream).await {
                debug!(error = %e, "control client ended");
            }
        });
    }
    let _ = std::fs::remove_file(&shared.cfg.control_socket);
}

async fn client(shared: &Arc<Shared>, mut s: UnixStream) -> Result<(), ControlError> {
    while let Some(req) = read_frame::<Request>(&mut s, MAX_REQUEST).await? {
        match req {
            Request::Submit(spec) => submit(shared, &mut s, *spec).await?,
            Request::ListIntents => {
                let mut v = shared.tables.intents().unwrap_or_default();
                for i in &mut v {
                    i.manifest = Default::default();
                }
                write_frame(&mut s, &Response::Intents(v)).await?
            }
            Request::ShowIntent(id) => {
                let r = match shared.tables.intent(&id) {
                    Ok(Some(i)) => Response::Intent(Box::new(i)),
                    Ok(None) => Response::Error(format!("no intent {id}")),
                    Err(e) => Response::Error(e.to_string()),
                };
                write_frame(&mut s, &r).await?
            }
            Request::Status => {
                write_frame(&mut s, &Response::Status(Box::new(status(shared)))).await?
            }
            Request::Catalog => {
                write_frame(&mut s, &Response::Catalog(Box::new(catalog(shared)))).await?
            }
            Request::CancelIntent(id) => {
                let r = match crate::orchestrator::cancel(shared, &id).await {
                    Ok(i) => Response::Intent(Box::new(i)),
                    Err(e) => Response::Error(e),
                };
                write_frame(&mut s, &r).await?
            }
            Request::RetryIntent(id) => {
                let r = match crate::orchestrator::retry(shared, &id).await {
                    Ok(i) => Response::Intent(Box::new(i)),
                    Err(e) => Response::Error(e),
                };
                write_frame(&mut s, &r).await?
            }
            Request::Release(id) => {
                let r = match crate::rear::consumer::release(shared, &id).await {
                    Ok(c) => Response::Released(Box::new(c)),
                    Err(e) => Response::Error(e.to_string()),
                };
                write_frame(&mut s, &r).await?
            }
        }
    }
    Ok(())
}

/// Submits an intent and follows it: one frame per workflow step, then the intent as it
/// ended. The intent belongs to the node ([`crate::orchestrator::submit`]): a client that
/// goes away only stops the following.
async fn submit(
    shared: &Arc<Shared>,
    s: &mut UnixStream,
    spec: IntentSpec,
) -> Result<(), ControlError> {
    let mut steps = shared.steps.subscribe();
    let (intent, mut done) = match crate::orchestrator::submit(shared, spec).await {
        Ok(r) => r,
        Err(e) => return write_frame(s, &Response::Error(e.to_string())).await,
    };
    let followed = follow(s, &mut steps, &mut done).await;
    if let Err(e) = &followed {
        info!(
            intent = %intent.id,
            "the control client stopped following ({e}); the node finishes the intent (fluidlet intent show {})",
            intent.id
        );
    }
    followed
}

async fn follow(
    s: &mut UnixStream,
    steps: &mut tokio::sync::broadcast::Receiver<crate::Step>,
    done: &mut tokio::sync::oneshot::Receiver<crate::model::Intent>,
) -> Result<(), ControlError> {
    let step_frame = |st: crate::Step| Response::Step {
        number: st.number,
        element: Text::new(st.element).unwrap_or_default(),
        text: st.text,
    };
    let (mut rd, mut s) = s.split();
    let mut probe = [0u8; 1];
    let result = loop {
        // Cancel safety: `done` is a oneshot receiver, polled again until it answers; a step
        // received is written before the next one is taken; the probe read only learns
        // that the client hung up (it sends nothing while it follows).
        tokio::select! {
            r = &mut *done => break r,
            step = steps.recv() => {
                if let Ok(st) = step {
                    write_frame(&mut s, &step_frame(st)).await?;
                }
            }
            n = rd.read(&mut probe) => {
                let why = match n? {
                    0 => "the client hung up",
                    _ => "the client sent a request while following an intent",
                };
                return Err(ControlError::Io(std::io::Error::other(why)));
            }
        }
    };
    // Steps reported just before the end.
    while let Ok(st) = steps.try_recv() {
        write_frame(&mut s, &step_frame(st)).await?;
    }
    let r = match result {
        Ok(i) => Response::Intent(Box::new(i)),
        Err(_) => Response::Error(
            "the node is stopping; the intent resumes where it is at the next start".into(),
        ),
    };
    write_frame(&mut s, &r).await
}

fn catalog(shared: &Shared) -> CatalogView {
    let mut flavours = shared.candidates.all();
    let truncated = flavours.len() > MAX_CATALOG_VIEW;
    let mut providers: Vec<ProviderView> = Vec::new();
    for c in &flavours {
        match providers.last_mut() {
            Some(p) if p.id == c.flavour.provider => {
                p.flavours += 1;
                p.seen_at = p.seen_at.max(c.seen_at);
            }
            _ => providers.push(ProviderView {
                id: c.flavour.provider.clone(),
                flavours: 1,
                seen_at: c.seen_at,
                rating: shared.tables.rating(&c.flavour.provider).ok().flatten(),
            }),
        }
    }
    flavours.truncate(MAX_CATALOG_VIEW);
    CatalogView {
        now: crate::model::unix_ms(),
        flavours,
        providers,
        truncated,
    }
}

pub(crate) fn status(shared: &Shared) -> StatusReport {
    let st = shared.status.borrow().clone();
    let t = &shared.tables;
    let mut intents = t.intents().unwrap_or_default();
    for i in &mut intents {
        i.manifest = Default::default();
    }
    let metrics = shared.metrics_snapshot();
    let certificate_warning = metrics.certificate_not_after.and_then(|t| {
        let id = crate::tls::Identity {
            common_name: String::new(),
            not_before: 0,
            not_after: t,
        };
        match crate::tls::check_validity(&id, crate::model::unix_ms() / 1000) {
            Ok(w) => w.map(|w| format!("the certificate {w}")),
            Err(e) => Some(format!("the certificate {e}")),
        }
    });
    StatusReport {
        certificate_warning,
        node: shared.me().clone(),
        domain: shared.cfg.domain.clone(),
        connected: st.connected,
        connects: st.connects,
        last_error: st.last_error,
        flavours: t
            .flavours()
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.flavour)
            .collect(),
        contracts: t.contracts().unwrap_or_default(),
        allocations: t.allocations().unwrap_or_default(),
        intents,
        fabric: shared.fabric.backend().name().to_owned(),
        metrics: Some(metrics),
        version: Some(crate::version()),
        protocol_revision: Some(crate::wire::REVISION),
    }
}

/// A client of the control socket (the CLI side).
pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|err| ControlError::Connect {
                path: path.display().to_string(),
                err,
            })?;
        Ok(Client { stream })
    }

    pub async fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        write_frame(&mut self.stream, req).await
    }

    /// The next response; `None` when the agent closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Response>, ControlError> {
        read_frame(&mut self.stream, MAX_RESPONSE).await
    }
}
