//! The HTTP/1.1 server (hyper): routes as the reference node's gorilla/mux router has them,
//! with bounds: connections (a semaphore), header size and read time, body size and read
//! time, and one request rate for the whole face (a token bucket; over it: 429).

use crate::face::{Face, Reply};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Largest request head (request line and headers) hyper buffers.
const MAX_HEAD: usize = 16 * 1024;

struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn respond(r: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let ct = if r.json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(ct) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

async fn body(req: Request<Incoming>, max: usize, limit: Duration) -> Result<Vec<u8>, Reply> {
    let collected = tokio::time::timeout(limit, Limited::new(req.into_body(), max).collect()).await;
    match collected {
        Ok(Ok(b)) => Ok(b.to_bytes().to_vec()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Reply::error(413, &format!("request body over {max} bytes")))
        }
        Ok(Err(_)) => Err(Reply::error(400, "request body not read")),
        Err(_) => Err(Reply::error(408, "request body too slow")),
    }
}

async fn route(
    face: Arc<Face>,
    req: Request<Incoming>,
    bucket: Arc<Mutex<Bucket>>,
    max_body: usize,
    body_time: Duration,
) -> Reply {
    if !bucket.lock().map(|mut b| b.take()).unwrap_or(false) {
        return Reply::error(429, "too many requests");
    }
    // As the reference node's readiness middleware: 503 until the face can trade.
    if !face.ready() {
        return Reply {
            status: 503,
            json: false,
            body: Vec::new(),
        };
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let method = req.method().clone();
    let segments: Vec<&str> = path.split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["", "api", "v2", "flavors"]) => face.flavors(),
        (&Method::GET, ["", "api", "v2", "flavors", "k8slice"]) => face.k8slice(query.as_deref()),
        (&Method::POST, ["", "api", "v2", "reservations"]) => {
            match body(req, max_body, body_time).await {
                Ok(b) => face.reserve(&b).await,
                Err(r) => r,
            }
        }
        (&Method::POST, ["", "api", "v2", "transactions", tid, "purchase"]) if !tid.is_empty() => {
            let tid = tid.to_string();
            match body(req, max_body, body_time).await {
                Ok(b) => face.purchase(&tid, &b).await,
                Err(r) => r,
            }
        }
        // Routes the reference node has that fluidlet has nothing for: service flavours
        // (fluidlet sells K8Slice only) answer as no match.
        (&Method::GET, ["", "api", "v2", "flavors", "service"]) => Reply {
            status: 200,
            json: true,
            body: b"[]".to_vec(),
        },
        (_, ["", "api", "v2", "flavors"])
        | (_, ["", "api", "v2", "flavors", "k8slice" | "service"])
        | (_, ["", "api", "v2", "reservations"])
        | (_, ["", "api", "v2", "transactions", _, "purchase"]) => {
            Reply::error(405, "Method Not Allowed")
        }
        _ => Reply::error(404, "404 page not found"),
    }
}

/// The face's TLS acceptor from its HTTPS files: ring's provider, TLS 1.2 and 1.3, client
/// certificates required when a client CA is configured.
pub fn acceptor(h: &crate::config::Https) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| {
        fluidlet::config::read_bounded(p, 64 * 1024).map_err(|e| format!("{}: {e:?}", p.display()))
    };
    let chain = CertificateDer::pem_slice_iter(&read(&h.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("http.tls_cert {}: not PEM: {e}", h.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "http.tls_cert {}: no certificate",
            h.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&h.key)?)
        .map_err(|e| format!("http.tls_key {}: no private key: {e}", h.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &h.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca)?) {
                let c = c.map_err(|e| format!("http.client_ca {}: not PEM: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("http.client_ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("http.client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("http.tls_cert and tls_key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves until `stop` turns true; returns once the listener is closed (connections in
/// progress finish on their own tasks).
/// The face's HTTP bounds (docs/security.md, "Supernode").
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_connections: usize,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub rate: u32,
}

pub async fn serve(
    face: Arc<Face>,
    listener: TcpListener,
    bounds: Bounds,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let Bounds {
        max_connections,
        max_body,
        header_timeout,
        rate,
    } = bounds;
    let permits = Arc::new(Semaphore::new(max_connections));
    let bucket = Arc::new(Mutex::new(Bucket {
        tokens: f64::from(rate),
        at: Instant::now(),
        rate: f64::from(rate),
    }));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let face = face.clone();
        let bucket = bucket.clone();
        let conn_stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    connection(
                        TokioIo::new(stream),
                        face,
                        bucket,
                        max_body,
                        header_timeout,
                        conn_stop,
                    )
                    .await
                }
                // The handshake is bounded as the request head is.
                Some(a) => match tokio::time::timeout(header_timeout, a.accept(stream)).await {
                    Ok(Ok(s)) => {
                        connection(
                            TokioIo::new(s),
                            face,
                            bucket,
                            max_body,
                            header_timeout,
                            conn_stop,
                        )
                        .await
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                    Err(_) => tracing::debug!("TLS handshake: too slow"),
                },
            }
            drop(permit);
        });
    }
}

async fn connection<I>(
    io: TokioIo<I>,
    face: Arc<Face>,
    bucket: Arc<Mutex<Bucket>>,
    max_body: usize,
    header_timeout: Duration,
    mut conn_stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    {
        let service = hyper::service::service_fn(move |req| {
            let face = face.clone();
            let bucket = bucket.clone();
            async move {
                Ok::<_, std::convert::Infallible>(respond(
                    route(face, req, bucket, max_body, header_timeout).await,
                ))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD)
            .keep_alive(true);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = conn_stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        }
    }
}
