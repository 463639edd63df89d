//! `fluidlet-signer`: the enrolment endpoint of one domain (see the crate docs). One TLS
//! connection per request, one thread per connection, at most `MAX_CONNECTIONS` at once.

use argh::FromArgs;
use fluidlet::enrol::{read_frame, write_frame, MAX_REQUEST};
use fluidlet_signer::{response, Limiter, Refusal, Signer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more are closed at accept (a flood costs a socket each).
const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request in this time is closed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// fluidlet-signer: signs gateways' CSRs against one-time tokens (run beside the broker).
#[derive(FromArgs)]
struct Args {
    /// the domain directory made by `domain.sh init` (enrol/, nodes/, revoked, broker.pem)
    #[argh(option)]
    dir: PathBuf,
    /// address to listen on, 0.0.0.0:8884 by default
    #[argh(option, default = "String::from(\"0.0.0.0:8884\")")]
    listen: String,
    /// days a certificate is valid, 365 by default
    #[argh(option, default = "365")]
    days: u64,
    /// seconds a certificate is valid, instead of --days (short-lived certificates, tests)
    #[argh(option)]
    seconds: Option<u64>,
    /// requests per second per peer address (1 by default; burst 5)
    #[argh(option, default = "1.0")]
    peer_rate: f64,
    /// requests per second in all (10 by default; burst 20)
    #[argh(option, default = "10.0")]
    rate: f64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() -> std::process::ExitCode {
    let args: Args = argh::from_env();
    match serve(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluidlet-signer: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(args: Args) -> Result<(), String> {
    let limiter = Limiter::new((args.peer_rate, 5.0), (args.rate, 20.0));
    let signer = Arc::new(Signer::open(
        &args.dir,
        Duration::from_secs(
            args.seconds
                .unwrap_or_else(|| args.days.saturating_mul(86_400)),
        ),
        limiter,
    )?);
    // The broker's certificate (serverAuth, the broker host's names, from the domain CA):
    // the signer runs on the same host, and gateways already trust that CA.
    let certs = CertificateDer::pem_file_iter(args.dir.join("broker.pem"))
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("broker.pem: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(args.dir.join("broker.key"))
        .map_err(|e| format!("broker.key: {e}"))?;
    // A client certificate is optional: a first enrolment has none (it has a token), a
    // re-enrolment proves itself with its current one, which must chain to the domain CA
    // (DIR/domain-ca.pem, root of the enrolment CA too) for client authentication, in date.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(args.dir.join("domain-ca.pem"))
        .map_err(|e| format!("domain-ca.pem: {e}"))?
    {
        roots
            .add(c.map_err(|e| format!("domain-ca.pem: {e}"))?)
            .map_err(|e| format!("domain-ca.pem: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("client verifier: {e}"))?;
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| format!("broker.pem/broker.key: {e}"))?,
    );
    let listener =
        std::net::TcpListener::bind(&args.listen).map_err(|e| format!("{}: {e}", args.listen))?;
    eprintln!("fluidlet-signer: listening on {}", args.listen);
    let busy = Arc::new(AtomicUsize::new(0));
    for sock in listener.incoming() {
        let Ok(sock) = sock else { continue };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            busy.fetch_sub(1, Ordering::SeqCst);
            eprintln!("fluidlet-signer: refused a connection: {MAX_CONNECTIONS} in progress");
            continue;
        }
        let (signer, tls, busy) = (signer.clone(), tls.clone(), busy.clone());
        std::thread::spawn(move || {
            one(&signer, tls, sock);
            busy.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// Serves one connection: reads one request, answers, logs the decision.
fn one(signer: &Signer, tls: Arc<rustls::ServerConfig>, sock: std::net::TcpStream) {
    let Ok(peer) = sock.peer_addr() else { return };
    let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
    let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(conn) = rustls::ServerConnection::new(tls) else {
        return;
    };
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let mut renewal = None;
    let decision = match read_frame(&mut stream, MAX_REQUEST) {
        Ok(frame) => match stream.conn.peer_certificates().and_then(|c| c.first()) {
            Some(client) => {
                let holder = fluidlet::tls::identity(client)
                    .map(|i| i.common_name)
                    .unwrap_or_default();
                renewal = Some(holder);
                signer.renew(peer.ip(), client, &frame, unix_now())
            }
            None => signer.handle(peer.ip(), &frame, unix_now()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(Refusal::Malformed(e.to_string()))
        }
        Err(e) => {
            eprintln!("fluidlet-signer: {peer}: no request read: {e}");
            return;
        }
    };
    match (&decision, &renewal) {
        (Ok(_), None) => eprintln!("fluidlet-signer: {peer}: signed"),
        (Err(r), None) => eprintln!("fluidlet-signer: {peer}: refused: {r}"),
        (Ok(_), Some(cn)) => eprintln!("fluidlet-signer: {peer}: re-enrolment of {cn}: signed"),
        (Err(r), Some(cn)) => {
            eprintln!("fluidlet-signer: {peer}: re-enrolment of {cn}: refused: {r}")
        }
    }
    if let Ok(bytes) = minicbor::to_vec(response(&decision)) {
        let _ = write_frame(&mut stream, &bytes);
        stream.conn.send_close_notify();
        let _ = std::io::Write::flush(&mut stream);
    }
}
