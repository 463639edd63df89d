//! Enrolment: the gateway makes its own key, asks the domain's signer for a certificate with a
//! one-time token, and writes what it gets back (docs/security.md, "Enrolling with a token").
//!
//! Why here and why like this: a key made on the CA host has to be copied to the gateway, and
//! for a fleet flashed from one image that copy is the step operators stop at. So the key is
//! made on the device (P-256, by *ring*, written 0600 and never sent anywhere), and the only
//! secret the image carries is a token that the signer accepts once, for one node id (or a
//! prefix), until it expires. The request is a PKCS#10 CSR built from x509-cert's types
//! (DER-encoded by `der`, no ASN.1 by hand) and signed by ring, which the agent already links
//! for TLS: neither `p256`'s ECDSA nor x509-cert's builder goes into the gateway binary.
//!
//! The path is the signer's own TLS endpoint (server-authenticated by the broker's certificate
//! from the domain CA, which the image already trusts), one request and one answer, each a
//! length-prefixed CBOR item: no HTTP stack and no second broker listener. The answer is
//! checked before anything is written: the first certificate must carry this node id as CN,
//! this device's public key, and be in date.
//!
//! `fluidlet run` enrols by itself when `[enrol]` is configured and the certificate file does
//! not exist yet (zero-touch first boot); `fluidlet enrol` does the same by hand.

pub use crate::config::EnrolConfig;
use crate::config::{ReadError, TlsFiles};
use crate::model::Id;
use minicbor::{Decode, Encode};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use x509_cert::der::asn1::{BitString, ObjectIdentifier};
use x509_cert::der::{Any, Decode as _, Encode as _, Tag};

/// Largest request the signer reads (a CSR is about 250 bytes, a token 64).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Largest answer the agent reads (a chain of a few certificates).
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Largest certificate accepted in an answer.
const MAX_CERT: usize = 16 * 1024;
/// Connect, write and read timeouts of one enrolment.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// id-ecPublicKey, secp256r1 (P-256) and ecdsa-with-SHA256.
pub const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
pub const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
pub const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// X.520 commonName.
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// One enrolment request: the token and the CSR (DER).
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct Request {
    #[n(0)]
    pub token: String,
    #[n(1)]
    pub csr: minicbor::bytes::ByteVec,
}

/// The signer's answer: the chain (leaf first, DER) or why not.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct Response {
    #[n(0)]
    pub ok: bool,
    #[n(1)]
    pub reason: String,
    #[n(2)]
    pub chain: Vec<minicbor::bytes::ByteVec>,
}

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("enrol: {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("enrol: the signer {signer}: {err}")]
    Signer { signer: String, err: String },
    #[error("enrol: the signer refused: {0}")]
    Refused(String),
    #[error("enrol: the signer's answer is wrong: {0}")]
    BadAnswer(String),
    #[error("enrol: {0}")]
    Other(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EnrolError + '_ {
    move |err| EnrolError::Io {
        path: path.to_owned(),
        err,
    }
}

/// The node's key: read from `path`, or made there (P-256, PKCS#8 PEM, mode 0600) if there is
/// none. Returns the PKCS#8 DER.
pub fn ensure_key(path: &Path) -> Result<Vec<u8>, EnrolError> {
    if path.exists() {
        let pem = crate::config::read_bounded(path, 64 * 1024).map_err(|e| match e {
            ReadError::Io(err) => EnrolError::Io {
                path: path.to_owned(),
                err,
            },
            ReadError::TooLarge => EnrolError::Other(format!("{} is too large", path.display())),
        })?;
        return match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(PrivateKeyDer::Pkcs8(k)) => Ok(k.secret_pkcs8_der().to_vec()),
            _ => Err(EnrolError::Other(format!(
                "{}: not a PKCS#8 private key",
                path.display()
            ))),
        };
    }
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| EnrolError::Other("cannot make a P-256 key".into()))?;
    let pem = x509_cert::der::pem::encode_string(
        "PRIVATE KEY",
        x509_cert::der::pem::LineEnding::LF,
        pkcs8.as_ref(),
    )
    .map_err(|e| EnrolError::Other(format!("PEM: {e}")))?;
    write_private(path, pem.as_bytes(), 0o600)?;
    Ok(pkcs8.as_ref().to_vec())
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode` from the
/// start (a key is never readable by others, not even for a moment).
fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EnrolError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A PKCS#10 request for CN = `node`, signed with `pkcs8` (P-256). No attributes, no
/// extensions: the signer decides what the certificate says.
pub fn csr(node: &Id, pkcs8: &[u8]) -> Result<Vec<u8>, EnrolError> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
        .map_err(|e| EnrolError::Other(format!("the node key is not a P-256 key: {e}")))?;
    let der = |e: x509_cert::der::Error| EnrolError::Other(format!("CSR: {e}"));
    // The name built from its parts: `Name::from_str` would link const-oid's whole table of
    // attribute names to look up "CN" (148,784 bytes of an x86_64 release build).
    let cn = x509_cert::attr::AttributeTypeAndValue {
        oid: COMMON_NAME,
        value: Any::new(Tag::Utf8String, node.as_str().as_bytes()).map_err(der)?,
    };
    let rdn = x509_cert::name::RelativeDistinguishedName::try_from(vec![cn]).map_err(der)?;
    let subject = x509_cert::name::RdnSequence(vec![rdn]);
    let public_key = x509_cert::spki::SubjectPublicKeyInfoOwned {
        algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
            oid: EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&SECP256R1).map_err(der)?),
        },
        subject_public_key: BitString::from_bytes(key.public_key().as_ref()).map_err(der)?,
    };
    let info = x509_cert::request::CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject,
        public_key,
        attributes: Default::default(),
    };
    let signature = key
        .sign(&rng, &info.to_der().map_err(der)?)
        .map_err(|_| EnrolError::Other("cannot sign the CSR".into()))?;
    x509_cert::request::CertReq {
        info,
        algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
            oid: ECDSA_SHA256,
            parameters: None,
        },
        signature: BitString::from_bytes(signature.as_ref()).map_err(der)?,
    }
    .to_der()
    .map_err(der)
}

/// Writes one length-prefixed frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Reads one length-prefixed frame of at most `max` bytes (the length is checked before
/// anything is allocated).
pub fn read_frame(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes, at most {max} accepted"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Reads the token file: hex, surrounding white space ignored.
fn read_token(path: &Path) -> Result<String, EnrolError> {
    let raw = crate::config::read_bounded(path, 4096).map_err(|e| match e {
        ReadError::Io(err) => EnrolError::Io {
            path: path.to_owned(),
            err,
        },
        ReadError::TooLarge => EnrolError::Other(format!("{} is not a token", path.display())),
    })?;
    let token = String::from_utf8_lossy(&raw).trim().to_owned();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) || token.len() > 128 {
        return Err(EnrolError::Other(format!(
            "{} does not hold a token (hex)",
            path.display()
        )));
    }
    Ok(token)
}

/// This node's current certificate chain and key, presented to the signer on re-enrolment.
type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// One round trip to the signer, blocking: TLS (the signer's certificate must chain to the
/// domain CA in `ca` and name `host`; with `client`, this node proves itself with its current
/// certificate, as EST's simplereenroll does), one request, one answer.
fn ask_signer(
    e: &EnrolConfig,
    ca: &Path,
    client: Option<ClientAuth>,
    request: &[u8],
) -> Result<Response, EnrolError> {
    let signer = format!("{}:{}", e.signer_host, e.signer_port);
    let fail = |err: String| EnrolError::Signer {
        signer: signer.clone(),
        err,
    };
    let ca_pem = crate::config::read_bounded(ca, 64 * 1024)
        .map_err(|_| fail(format!("cannot read {}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| fail(format!("{}: {e}", ca.display())))?;
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(fail(format!("{} holds no CA certificate", ca.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| fail(format!("this node's certificate and key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(e.signer_host.clone()).map_err(|e| fail(e.to_string()))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| fail(e.to_string()))?;
    use std::net::ToSocketAddrs;
    let addr = (e.signer_host.as_str(), e.signer_port)
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))?;
    let sock =
        std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| fail(e.to_string()))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| fail(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write_frame(&mut tls, request).map_err(|e| fail(e.to_string()))?;
    let answer = read_frame(&mut tls, MAX_RESPONSE).map_err(|e| fail(e.to_string()))?;
    minicbor::decode::<Response>(&answer)
        .map_err(|e| EnrolError::BadAnswer(format!("not an answer: {e}")))
}

/// Checks the chain against this node and key; returns it as PEM.
fn check_chain(
    node: &Id,
    pkcs8: &[u8],
    chain: &[minicbor::bytes::ByteVec],
) -> Result<String, EnrolError> {
    let bad = |s: String| EnrolError::BadAnswer(s);
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    if chain.len() > 4 || chain.iter().any(|c| c.len() > MAX_CERT) {
        return Err(bad("a chain over 4 certificates or 16 KiB each".into()));
    }
    let id = crate::tls::identity(leaf).map_err(bad)?;
    if id.common_name != node.as_str() {
        return Err(bad(format!(
            "the certificate is for {:?}, not {node:?}",
            id.common_name
        )));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::tls::check_validity(&id, now).map_err(|p| bad(format!("the certificate {p}")))?;
    let cert = x509_cert::Certificate::from_der(leaf).map_err(|e| bad(e.to_string()))?;
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
        .map_err(|e| EnrolError::Other(e.to_string()))?;
    if cert
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes()
        != key.public_key().as_ref()
    {
        return Err(bad("the certificate is not for this device's key".into()));
    }
    let mut pem = String::new();
    for c in chain {
        pem.push_str(
            &x509_cert::der::pem::encode_string(
                "CERTIFICATE",
                x509_cert::der::pem::LineEnding::LF,
                c,
            )
            .map_err(|e| bad(e.to_string()))?,
        );
    }
    Ok(pem)
}

/// Enrols: makes (or reuses) the key at `files.key`, sends a CSR with the token, checks the
/// answer and writes the chain to `files.cert`. Blocking: call it off the runtime.
///
/// Both files are owner-only (0600, in directories made 0700): they usually live in
/// `data_dir`, every file of which the agent expects to be private (crate::files).
pub fn enrol(node: &Id, files: &TlsFiles, e: &EnrolConfig) -> Result<(), EnrolError> {
    let token = read_token(&e.token)?;
    let pkcs8 = ensure_key(&files.key)?;
    let request = Request {
        token,
        csr: csr(node, &pkcs8)?.into(),
    };
    let bytes = minicbor::to_vec(&request).map_err(|e| EnrolError::Other(e.to_string()))?;
    let answer = ask_signer(e, &files.ca, None, &bytes)?;
    if !answer.ok {
        return Err(EnrolError::Refused(answer.reason));
    }
    let pem = check_chain(node, &pkcs8, &answer.chain)?;
    write_private(&files.cert, pem.as_bytes(), 0o600)
}

/// `PATH.next`: where a rotation writes the new key and certificate before either replaces
/// the one in use.
fn next(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".next");
    PathBuf::from(s)
}

/// Re-enrolment (a certificate rotation, EST's simplereenroll): a new P-256 key made here, a
/// CSR for the same node id, sent over TLS on which this node proves itself with its current
/// certificate (no token: the signer checks that certificate instead), the answer checked as
/// at enrolment, then the key and certificate replaced ([`commit_rotation`]). Returns what the
/// new certificate says. Blocking: call it off the runtime.
pub fn renew(
    node: &Id,
    files: &TlsFiles,
    e: &EnrolConfig,
) -> Result<crate::tls::Identity, EnrolError> {
    let read = |path: &Path| {
        crate::config::read_bounded(path, 64 * 1024).map_err(|err| match err {
            ReadError::Io(err) => EnrolError::Io {
                path: path.to_owned(),
                err,
            },
            ReadError::TooLarge => EnrolError::Other(format!("{} is too large", path.display())),
        })
    };
    let chain = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| EnrolError::Other(format!("{}: {err}", files.cert.display())))?;
    let current = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|err| EnrolError::Other(format!("{}: {err}", files.key.display())))?;
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| EnrolError::Other("cannot make a P-256 key".into()))?;
    let request = Request {
        token: String::new(),
        csr: csr(node, pkcs8.as_ref())?.into(),
    };
    let bytes = minicbor::to_vec(&request).map_err(|e| EnrolError::Other(e.to_string()))?;
    let answer = ask_signer(e, &files.ca, Some((chain, current)), &bytes)?;
    if !answer.ok {
        return Err(EnrolError::Refused(answer.reason));
    }
    let pem = check_chain(node, pkcs8.as_ref(), &answer.chain)?;
    let id = crate::tls::identity(&answer.chain[0]).map_err(EnrolError::BadAnswer)?;
    let key_pem = x509_cert::der::pem::encode_string(
        "PRIVATE KEY",
        x509_cert::der::pem::LineEnding::LF,
        pkcs8.as_ref(),
    )
    .map_err(|e| EnrolError::Other(format!("PEM: {e}")))?;
    write_private(&next(&files.key), key_pem.as_bytes(), 0o600)?;
    write_private(&next(&files.cert), pem.as_bytes(), 0o600)?;
    commit_rotation(files)?;
    Ok(id)
}

/// Puts a rotation's `key.next` and `cert.next` in place of the key and certificate, the key
/// first. Both were written and synced before the first rename, so a rotation cut short
/// (a crash, a power cut) is finished here at the next start and never leaves a key beside a
/// certificate that is not its own. A `key.next` without `cert.next` is a rotation that
/// stopped before it had its certificate: removed, the old pair is still whole. Returns
/// whether it replaced anything.
pub fn commit_rotation(files: &TlsFiles) -> Result<bool, EnrolError> {
    let (key, cert) = (next(&files.key), next(&files.cert));
    if !cert.exists() {
        let _ = std::fs::remove_file(&key);
        return Ok(false);
    }
    if key.exists() {
        std::fs::rename(&key, &files.key).map_err(io(&files.key))?;
    }
    std::fs::rename(&cert, &files.cert).map_err(io(&files.cert))?;
    for dir in [&files.key, &files.cert].iter().filter_map(|p| p.parent()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(true)
}

/// When a certificate is due for rotation: `renew_at` of its life after its not-before.
pub fn rotation_due(id: &crate::tls::Identity, renew_at: f64) -> u64 {
    let life = id.not_after.saturating_sub(id.not_before) as f64;
    id.not_before.saturating_add((life * renew_at) as u64)
}

/// First wait after a failed rotation; doubled after each failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(30 * 60);
/// How often a certificate close to its expiry is warned about while the node runs.
const EXPIRY_LOG_EVERY: u64 = 24 * 3600;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The node's certificate while it runs: a WARN once a day when it is close to its expiry
/// ([`crate::tls::EXPIRY_WARNING`]) and, with `[enrol]`, its rotation at `renew_at` of its
/// life. A new certificate goes to the broker session over `rotated` (which switches to it
/// on a reconnect it schedules itself, `broker::Session`) and to the sealing of peering
/// credentials. A failed rotation is logged in words and retried with backoff while the
/// current certificate is valid; the node keeps trading with the current one meanwhile.
pub(crate) async fn keep_rotated(
    shared: Arc<crate::shared::Shared>,
    rotated: tokio::sync::mpsc::Sender<Arc<rustls::ClientConfig>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(files) = shared.cfg.tls.clone() else {
        return;
    };
    let enrol = shared.cfg.enrol.clone();
    let node = shared.me().clone();
    let mut retry = RETRY_MIN;
    let mut id = match crate::tls::load(&files, &node) {
        Ok(l) => l.identity,
        Err(e) => return tracing::warn!("certificate watch stopped: {e}"),
    };
    shared.metrics.certificate(id.not_after);
    let mut warned_at = 0u64;
    loop {
        let now = unix_now();
        if let Ok(Some(w)) = crate::tls::check_validity(&id, now) {
            if now.saturating_sub(warned_at) >= EXPIRY_LOG_EVERY {
                warned_at = now;
                tracing::warn!(
                    "the certificate {} {w} (unix time {}){}",
                    files.cert.display(),
                    id.not_after,
                    if enrol.is_some() {
                        ""
                    } else {
                        ": replace it (domain.sh node, or [enrol] to have it rotated)"
                    }
                );
            }
        }
        let warn_from = id
            .not_after
            .saturating_sub(crate::tls::EXPIRY_WARNING.as_secs());
        let until_warning = match warn_from.checked_sub(now) {
            Some(s) if s > 0 => s,
            _ => EXPIRY_LOG_EVERY,
        };
        let wake = match &enrol {
            Some(e) => rotation_due(&id, e.renew_at).saturating_sub(now),
            None => u64::MAX,
        };
        let sleep = wake.min(until_warning).min(EXPIRY_LOG_EVERY);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(sleep)) => {}
        }
        let Some(e) = enrol.clone() else { continue };
        if unix_now() < rotation_due(&id, e.renew_at) {
            continue;
        }
        tracing::info!(signer = %e.signer_host, port = e.signer_port, "rotating the certificate: a new key, a CSR, the signer over mutual TLS");
        let (n, f) = (node.clone(), files.clone());
        let outcome = tokio::task::spawn_blocking(move || renew(&n, &f, &e))
            .await
            .map_err(|j| EnrolError::Other(j.to_string()))
            .and_then(|r| r);
        let loaded = outcome.and_then(|_| {
            crate::tls::load(&files, &node)
                .map_err(|e| EnrolError::Other(format!("the rotated files do not load: {e}")))
        });
        match loaded {
            Ok(l) => {
                retry = RETRY_MIN;
                id = l.identity;
                shared.metrics.rotated(id.not_after);
                match crate::seal::Keys::new(&l.certificate, &l.key, l.roots.clone()) {
                    Ok(k) => {
                        if let Ok(mut s) = shared.sealing.write() {
                            *s = Some(Arc::new(k));
                        }
                    }
                    Err(e) => tracing::warn!("the rotated key cannot seal: {e}"),
                }
                tracing::info!(
                    cert = %files.cert.display(),
                    not_after = id.not_after,
                    "certificate rotated: new key and certificate written; the broker session switches to them on its next connection"
                );
                if rotated.send(l.client).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                let left = id.not_after.saturating_sub(unix_now());
                tracing::warn!(
                    "certificate rotation failed: {err}; the current certificate stays in use \
                     ({left} s left), next attempt in {} s",
                    retry.as_secs()
                );
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Zero-touch first boot: with `[enrol]` and no certificate file yet, enrols before the TLS
/// files are loaded. Returns whether it enrolled.
pub async fn first_boot(cfg: &crate::Config) -> Result<bool, EnrolError> {
    // A rotation cut short by the last stop is finished (or undone) whether or not the node
    // still enrols: a config without `[enrol]` must not meet a key that is not its
    // certificate's.
    if let Some(files) = &cfg.tls {
        if commit_rotation(files)? {
            tracing::warn!(cert = %files.cert.display(), "finished a certificate rotation cut short by the last stop");
        }
    }
    let (Some(e), Some(files)) = (cfg.enrol.clone(), cfg.tls.clone()) else {
        return Ok(false);
    };
    if files.cert.exists() {
        return Ok(false);
    }
    let node = cfg.node_id.clone();
    tracing::info!(signer = %e.signer_host, port = e.signer_port, "no certificate yet: enrolling with the token");
    tokio::task::spawn_blocking(move || enrol(&node, &files, &e))
        .await
        .map_err(|j| EnrolError::Other(j.to_string()))??;
    tracing::info!(cert = %cfg.tls.as_ref().map(|f| f.cert.display().to_string()).unwrap_or_default(), "enrolled: certificate written");
    Ok(true)
}

/// `fluidlet enrol`: the first-boot enrolment by hand. Refuses when the certificate file
/// already exists (move it away to enrol again, with a new token).
pub fn cli(config: &Path, out: &mut dyn Write) -> Result<(), crate::AgentError> {
    let cfg = crate::Config::load(config)?;
    let other = crate::AgentError::Other;
    let (Some(e), Some(files)) = (&cfg.enrol, &cfg.tls) else {
        return Err(other(format!(
            "{}: no [enrol] table (signer, token) and [tls] table (where to write)",
            config.display()
        )));
    };
    if files.cert.exists() {
        return Err(other(format!(
            "{} exists: this node is enrolled (move it away to enrol again with a new token)",
            files.cert.display()
        )));
    }
    enrol(&cfg.node_id, files, e).map_err(|e| other(e.to_string()))?;
    writeln!(
        out,
        "enrolled {}: key {} (made here, 0600), certificate {}",
        cfg.node_id,
        files.key.display(),
        files.cert.display()
    )
    .map_err(|e| other(format!("cannot write the output: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_carries_the_node_id_and_the_devices_key_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls/node.key");
        let pkcs8 = ensure_key(&key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            ensure_key(&key).unwrap(),
            pkcs8,
            "an existing key is reused"
        );
        let der = csr(&Id::new("gw-1").unwrap(), &pkcs8).unwrap();
        let req = x509_cert::request::CertReq::from_der(&der).unwrap();
        assert_eq!(req.info.subject.to_string(), "CN=gw-1");
        assert_eq!(req.algorithm.oid, ECDSA_SHA256);
        let public = req.info.public_key.subject_public_key.raw_bytes();
        let verify = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            public,
        );
        verify
            .verify(&req.info.to_der().unwrap(), req.signature.raw_bytes())
            .expect("the CSR's signature verifies with its own key");
    }

    #[test]
    fn an_enrol_table_needs_tls_and_a_signer_address() {
        let top = "node_id = \"gw-1\"\ndomain = \"d\"\ndata_dir = \"/tmp/x\"\n";
        let tls = "[tls]\nca = \"/e/ca.pem\"\ncert = \"/e/n.pem\"\nkey = \"/e/n.key\"\n";
        let enrol = |signer: &str| format!("[enrol]\nsigner = \"{signer}\"\ntoken = \"/e/t\"\n");
        let ok = format!(
            "{top}broker = \"mqtts://b.lan\"\n{tls}{}",
            enrol("b.lan:8884")
        );
        let c = crate::Config::from_toml(&ok).unwrap();
        assert_eq!(
            c.enrol,
            Some(EnrolConfig {
                signer_host: "b.lan".into(),
                signer_port: 8884,
                token: "/e/t".into(),
                renew_at: crate::config::RENEW_AT,
            })
        );
        let with = |renew: &str| {
            format!(
                "{top}broker = \"mqtts://b.lan\"\n{tls}{}renew_at = {renew}\n",
                enrol("b.lan:8884")
            )
        };
        let c = crate::Config::from_toml(&with("0.8")).unwrap();
        assert_eq!(c.enrol.map(|e| e.renew_at), Some(0.8));
        for bad in ["0", "1.0", "0.05", "2"] {
            let e = crate::Config::from_toml(&with(bad))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("enrol.renew_at") && e.contains("fraction"),
                "{e}"
            );
        }
        let e = crate::Config::from_toml(&with("\"soon\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("renew_at") && e.contains("line"), "{e}");
        for (bad, why) in [
            (
                format!(
                    "{top}broker = \"mqtt://127.0.0.1\"\n{}",
                    enrol("b.lan:8884")
                ),
                "[tls]",
            ),
            (
                format!("{top}broker = \"mqtts://b.lan\"\n{tls}{}", enrol("b.lan")),
                "HOST:PORT",
            ),
            (
                format!("{top}broker = \"mqtts://b.lan\"\n{tls}{}", enrol("b.lan:x")),
                "port",
            ),
            (
                format!("{top}broker = \"mqtts://b.lan\"\n{tls}{}", enrol(":8884")),
                "host",
            ),
        ] {
            let e = crate::Config::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains("enrol") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_rotation_cut_short_is_finished_or_undone_never_half_done() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("node.pem"),
            key: dir.path().join("node.key"),
        };
        let put = |p: &Path, t: &str| std::fs::write(p, t).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        put(&files.key, "old key");
        put(&files.cert, "old cert");
        // Stopped before the certificate was written: the new key is dropped.
        put(&next(&files.key), "new key");
        assert!(!commit_rotation(&files).unwrap());
        assert_eq!(
            (read(&files.key), read(&files.cert)),
            ("old key".into(), "old cert".into())
        );
        assert!(!next(&files.key).exists());
        // Stopped between the two renames (the key is in place): the certificate follows.
        put(&files.key, "new key");
        put(&next(&files.cert), "new cert");
        assert!(commit_rotation(&files).unwrap());
        assert_eq!(
            (read(&files.key), read(&files.cert)),
            ("new key".into(), "new cert".into())
        );
        // Both written, neither renamed: both go in.
        put(&next(&files.key), "third key");
        put(&next(&files.cert), "third cert");
        assert!(commit_rotation(&files).unwrap());
        assert_eq!(
            (read(&files.key), read(&files.cert)),
            ("third key".into(), "third cert".into())
        );
        assert!(!next(&files.key).exists() && !next(&files.cert).exists());
    }

    #[test]
    fn rotation_is_due_at_its_fraction_of_the_life() {
        let id = crate::tls::Identity {
            common_name: "n".into(),
            not_before: 1_000,
            not_after: 1_000 + 3_000,
        };
        assert_eq!(rotation_due(&id, 0.66), 1_000 + 1_980);
        assert_eq!(rotation_due(&id, 0.1), 1_300);
    }

    #[test]
    fn frames_over_the_bound_are_refused_before_allocation() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &[7u8; 10]).unwrap();
        assert_eq!(read_frame(&mut buf.as_slice(), 10).unwrap(), vec![7u8; 10]);
        let e = read_frame(&mut buf.as_slice(), 9).unwrap_err();
        assert!(e.to_string().contains("at most 9"), "{e}");
        let huge = (u32::MAX).to_be_bytes();
        assert!(read_frame(&mut huge.as_slice(), MAX_RESPONSE).is_err());
    }
}
