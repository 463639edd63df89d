//! The enrolment signer of a FLUIDOS domain (`fluidlet-signer`), run beside the domain broker
//! and never on a gateway (docs/security.md, "Enrolling with a token").
//!
//! It holds the enrolment CA (an intermediate of the domain CA, made by `domain.sh init`, so
//! the root key can stay offline) and answers one request per TLS connection: a one-time token
//! and a CSR (crate `fluidlet::enrol` has the wire format). Everything is checked before
//! anything is signed, each refusal with its reason in the log: the rate (per peer and in
//! all), the request's size, the token (known, in date, uses left, bound to the CSR's CN), the
//! CSR (PKCS#10, signed by its own key, ECDSA P-256 with SHA-256, one CN that is a node id, no
//! attributes and so no extension asking for CA rights), the node id (not revoked, not
//! enrolled before). A token's use is written and synced before the certificate leaves.
//!
//! A re-enrolment (a certificate rotation, [`Signer::renew`]) carries no token: the gateway
//! presents its current certificate over TLS (verified to the domain CA by the binary's TLS
//! layer), and the CSR must ask for that certificate's CN with a new key; the node id must
//! not be revoked. It is signed as an enrolment is.
//!
//! State lives in the domain directory: `enrol/tokens` (written by `domain.sh token`: one line
//! per token, its SHA-256, binding, expiry and uses; the token itself is never stored),
//! `enrol/used` (appended here), `revoked` (domain.sh revoke), and every certificate issued in
//! `nodes/ID/issued/SERIAL.pem`, where `domain.sh list` and `revoke` find it.

use fluidlet::enrol::{Request, Response, ECDSA_SHA256, EC_PUBLIC_KEY, SECP256R1};
use fluidlet::model::Id;
use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode, DecodePem, Encode};

/// PKCS#9 extensionRequest.
const EXTENSION_REQUEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
/// X.509 basicConstraints.
const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
/// The largest tokens file read (about 140 bytes a token).
const MAX_TOKENS_FILE: u64 = 8 * 1024 * 1024;

/// Why a request was refused. The text goes to the log and back to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    RateLimited,
    TooLarge(usize),
    Malformed(String),
    UnknownToken,
    TokenExpired,
    TokenUsed,
    WrongNode {
        bound: String,
        cn: String,
    },
    BadCsr(String),
    WeakKey(String),
    AsksForCa,
    Attributes(String),
    Revoked(String),
    AlreadyEnrolled(String),
    /// Re-enrolment: the CSR asks for another node id than the certificate presented.
    NotYours {
        cert: String,
        cn: String,
    },
    /// Re-enrolment: the CSR carries the key of the certificate it would replace.
    SameKey,
    /// Re-enrolment with a token (a token is for a first enrolment only).
    TokenOnRenewal,
    Internal(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::RateLimited => write!(f, "too many enrolment attempts; try again later"),
            Refusal::TooLarge(n) => write!(
                f,
                "a request of {n} bytes, at most {} accepted",
                fluidlet::enrol::MAX_REQUEST
            ),
            Refusal::Malformed(m) => write!(f, "malformed request: {m}"),
            Refusal::UnknownToken => write!(f, "unknown token (forged, or not minted here)"),
            Refusal::TokenExpired => write!(f, "the token has expired"),
            Refusal::TokenUsed => write!(f, "the token was already used"),
            Refusal::WrongNode { bound, cn } => {
                write!(f, "the token is for {bound:?}, the CSR asks for CN {cn:?}")
            }
            Refusal::BadCsr(m) => write!(f, "bad CSR: {m}"),
            Refusal::WeakKey(m) => write!(f, "key refused: {m}; only ECDSA P-256 is accepted"),
            Refusal::AsksForCa => write!(f, "the CSR asks for CA rights (basicConstraints cA)"),
            Refusal::Attributes(m) => write!(
                f,
                "the CSR carries attributes ({m}); none are accepted, the signer decides \
                 what the certificate says"
            ),
            Refusal::Revoked(n) => write!(f, "node id {n:?} was revoked"),
            Refusal::AlreadyEnrolled(n) => write!(
                f,
                "node id {n:?} already has a certificate (revoke it, or use a new id)"
            ),
            Refusal::NotYours { cert, cn } => write!(
                f,
                "re-enrolment: the certificate presented is {cert:?}'s, the CSR asks for CN {cn:?}"
            ),
            Refusal::SameKey => write!(
                f,
                "re-enrolment: the CSR carries the current certificate's key; a rotation needs a new key"
            ),
            Refusal::TokenOnRenewal => write!(
                f,
                "re-enrolment carries no token (the certificate presented is the credential)"
            ),
            Refusal::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

/// One token of `enrol/tokens`: `SHA256HEX BINDING NOT_AFTER USES`. BINDING is a node id,
/// or a prefix ending in `*` (a batch of gateways, one id each).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    hash: String,
    binding: String,
    not_after: u64,
    uses: u32,
}

fn parse_tokens(text: &str) -> Vec<Token> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [hash, binding, not_after, uses] => Some(Token {
                    hash: hash.to_ascii_lowercase(),
                    binding: (*binding).to_owned(),
                    not_after: not_after.parse().ok()?,
                    uses: uses.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `cn` is what `binding` allows.
fn binding_allows(binding: &str, cn: &str) -> bool {
    match binding.strip_suffix('*') {
        Some(prefix) => cn.len() > prefix.len() && cn.starts_with(prefix),
        None => binding == cn,
    }
}

/// Token buckets: one per peer address (at most `MAX_PEERS` tracked) and one for all.
pub struct Limiter {
    peers: HashMap<IpAddr, (f64, u64)>,
    all: (f64, u64),
    pub per_peer: (f64, f64),
    pub global: (f64, f64),
}

const MAX_PEERS: usize = 4096;

impl Limiter {
    /// `per_peer` and `global`: (requests per second, burst).
    pub fn new(per_peer: (f64, f64), global: (f64, f64)) -> Limiter {
        Limiter {
            peers: HashMap::new(),
            all: (global.1, 0),
            per_peer,
            global,
        }
    }

    fn take(bucket: &mut (f64, u64), (rate, burst): (f64, f64), now_ms: u64) -> bool {
        let dt = now_ms.saturating_sub(bucket.1) as f64 / 1000.0;
        bucket.0 = (bucket.0 + dt * rate).min(burst);
        bucket.1 = now_ms;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn allow(&mut self, peer: IpAddr, now_ms: u64) -> bool {
        if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&peer) {
            // Forget the full ones first; a table of busy peers refuses newcomers.
            let rate = self.per_peer;
            self.peers
                .retain(|_, b| b.0 + now_ms.saturating_sub(b.1) as f64 / 1000.0 * rate.0 < rate.1);
            if self.peers.len() >= MAX_PEERS {
                return false;
            }
        }
        let per_peer = self.per_peer;
        let bucket = self.peers.entry(peer).or_insert((per_peer.1, now_ms));
        if !Limiter::take(bucket, per_peer, now_ms) {
            return false;
        }
        let global = self.global;
        Limiter::take(&mut self.all, global, now_ms)
    }
}

/// The signer: the enrolment CA and the domain directory it keeps its state in.
pub struct Signer {
    domain_dir: PathBuf,
    ca: x509_cert::Certificate,
    ca_der: Vec<u8>,
    key: p256::ecdsa::SigningKey,
    validity: Duration,
    limiter: Mutex<Limiter>,
    /// One request decided at a time: a token's uses are read and written under it.
    decide: Mutex<()>,
}

impl Signer {
    /// Loads `DIR/enrol/enrol-ca.pem` and `enrol-ca.key`.
    pub fn open(domain_dir: &Path, validity: Duration, limiter: Limiter) -> Result<Signer, String> {
        let enrol = domain_dir.join("enrol");
        let read = |name: &str| {
            std::fs::read_to_string(enrol.join(name))
                .map_err(|e| format!("{}: {e}", enrol.join(name).display()))
        };
        let ca = x509_cert::Certificate::from_pem(read("enrol-ca.pem")?.as_bytes())
            .map_err(|e| format!("enrol-ca.pem: {e}"))?;
        let ca_der = ca.to_der().map_err(|e| e.to_string())?;
        use p256::pkcs8::DecodePrivateKey;
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&read("enrol-ca.key")?)
            .map_err(|e| format!("enrol-ca.key: {e}"))?;
        Ok(Signer {
            domain_dir: domain_dir.to_owned(),
            ca,
            ca_der,
            key,
            validity,
            limiter: Mutex::new(limiter),
            decide: Mutex::new(()),
        })
    }

    /// Decides one request from `peer` (the bytes of its frame): the chain, or why not.
    pub fn handle(&self, peer: IpAddr, frame: &[u8], now: u64) -> Result<Vec<Vec<u8>>, Refusal> {
        let allowed = self
            .limiter
            .lock()
            .map(|mut l| l.allow(peer, now.saturating_mul(1000)))
            .unwrap_or(false);
        if !allowed {
            return Err(Refusal::RateLimited);
        }
        self.handle_unlimited(frame, now)
    }

    /// [`Signer::handle`] without the rate limit (the limiter's own clock is real time).
    pub fn handle_unlimited(&self, frame: &[u8], now: u64) -> Result<Vec<Vec<u8>>, Refusal> {
        if frame.len() > fluidlet::enrol::MAX_REQUEST {
            return Err(Refusal::TooLarge(frame.len()));
        }
        let req: Request =
            minicbor::decode(frame).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let token = req.token.trim();
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Refusal::UnknownToken);
        }
        let hash = sha256_hex(token.to_ascii_lowercase().as_bytes());
        let csr = check_csr(&req.csr)?;
        let _one = self
            .decide
            .lock()
            .map_err(|_| Refusal::Internal("lock".into()))?;
        let t = self.token(&hash)?;
        if now > t.not_after {
            return Err(Refusal::TokenExpired);
        }
        if self.uses(&hash)? >= t.uses as usize {
            return Err(Refusal::TokenUsed);
        }
        if !binding_allows(&t.binding, &csr.cn) {
            return Err(Refusal::WrongNode {
                bound: t.binding,
                cn: csr.cn,
            });
        }
        if self.revoked(&csr.cn) {
            return Err(Refusal::Revoked(csr.cn));
        }
        let node_dir = self.domain_dir.join("nodes").join(&csr.cn);
        let issued = node_dir.join("issued");
        let enrolled = node_dir.join("node.pem").exists()
            || std::fs::read_dir(&issued).is_ok_and(|mut d| d.next().is_some());
        if enrolled {
            return Err(Refusal::AlreadyEnrolled(csr.cn));
        }
        let (cert, serial) = self.sign(&csr, now)?;
        // The use is on disk before the certificate leaves: a crash after this line burns the
        // token, never lets it sign twice.
        self.record_use(&hash, &csr.cn, now)?;
        self.keep_issued(&csr.cn, &cert, &serial)?;
        Ok(vec![cert, self.ca_der.clone()])
    }

    /// Decides one re-enrolment (a certificate rotation) from `peer`, which proved itself
    /// over TLS with the certificate `client` (DER, leaf): the chain, or why not.
    pub fn renew(
        &self,
        peer: IpAddr,
        client: &[u8],
        frame: &[u8],
        now: u64,
    ) -> Result<Vec<Vec<u8>>, Refusal> {
        let allowed = self
            .limiter
            .lock()
            .map(|mut l| l.allow(peer, now.saturating_mul(1000)))
            .unwrap_or(false);
        if !allowed {
            return Err(Refusal::RateLimited);
        }
        self.renew_unlimited(client, frame, now)
    }

    /// [`Signer::renew`] without the rate limit. `client` must be the leaf of a chain the
    /// TLS layer verified to the domain CA for client authentication, in date (the binary's
    /// verifier does; a library caller must too). Checked here: the CSR as at enrolment, its
    /// CN equal to the certificate's, a new key, the node id not revoked. No token, and no
    /// "already enrolled": renewing is what an enrolled node does.
    pub fn renew_unlimited(
        &self,
        client: &[u8],
        frame: &[u8],
        now: u64,
    ) -> Result<Vec<Vec<u8>>, Refusal> {
        if frame.len() > fluidlet::enrol::MAX_REQUEST {
            return Err(Refusal::TooLarge(frame.len()));
        }
        let req: Request =
            minicbor::decode(frame).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if !req.token.is_empty() {
            return Err(Refusal::TokenOnRenewal);
        }
        let csr = check_csr(&req.csr)?;
        let current = x509_cert::Certificate::from_der(client)
            .map_err(|e| Refusal::BadCsr(format!("the certificate presented: {e}")))?;
        let holder = fluidlet::tls::identity(client).map_err(Refusal::BadCsr)?;
        if holder.common_name != csr.cn {
            return Err(Refusal::NotYours {
                cert: holder.common_name,
                cn: csr.cn,
            });
        }
        if current.tbs_certificate.subject_public_key_info == csr.spki {
            return Err(Refusal::SameKey);
        }
        let _one = self
            .decide
            .lock()
            .map_err(|_| Refusal::Internal("lock".into()))?;
        if self.revoked(&csr.cn) {
            return Err(Refusal::Revoked(csr.cn));
        }
        let (cert, serial) = self.sign(&csr, now)?;
        self.keep_issued(&csr.cn, &cert, &serial)?;
        Ok(vec![cert, self.ca_der.clone()])
    }

    /// Writes an issued certificate to `nodes/ID/issued/SERIAL.pem` (domain.sh list and
    /// revoke read them there).
    fn keep_issued(&self, cn: &str, cert: &[u8], serial: &str) -> Result<(), Refusal> {
        let issued = self.domain_dir.join("nodes").join(cn).join("issued");
        std::fs::create_dir_all(&issued).map_err(|e| Refusal::Internal(e.to_string()))?;
        let pem = x509_cert::der::pem::encode_string(
            "CERTIFICATE",
            x509_cert::der::pem::LineEnding::LF,
            cert,
        )
        .map_err(|e| Refusal::Internal(e.to_string()))?;
        std::fs::write(issued.join(format!("{serial}.pem")), pem)
            .map_err(|e| Refusal::Internal(e.to_string()))
    }

    fn token(&self, hash: &str) -> Result<Token, Refusal> {
        let path = self.domain_dir.join("enrol/tokens");
        let text = read_small(&path)?;
        parse_tokens(&text)
            .into_iter()
            .find(|t| t.hash == hash)
            .ok_or(Refusal::UnknownToken)
    }

    fn uses(&self, hash: &str) -> Result<usize, Refusal> {
        let text = read_small(&self.domain_dir.join("enrol/used")).unwrap_or_default();
        Ok(text
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(hash))
            .count())
    }

    fn record_use(&self, hash: &str, cn: &str, now: u64) -> Result<(), Refusal> {
        let path = self.domain_dir.join("enrol/used");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Refusal::Internal(format!("{}: {e}", path.display())))?;
        writeln!(f, "{hash} {cn} {now}")
            .and_then(|_| f.sync_all())
            .map_err(|e| Refusal::Internal(format!("{}: {e}", path.display())))
    }

    fn revoked(&self, cn: &str) -> bool {
        read_small(&self.domain_dir.join("revoked"))
            .map(|t| t.lines().any(|l| l.trim() == cn))
            .unwrap_or(false)
    }

    /// Signs a client certificate for the checked CSR: CN only, the CSR's key, clientAuth,
    /// not a CA, valid from an hour ago (gateway clocks drift) for `validity`.
    fn sign(&self, csr: &CheckedCsr, now: u64) -> Result<(Vec<u8>, String), Refusal> {
        use x509_cert::builder::{Builder, CertificateBuilder, Profile};
        let internal = |e: String| Refusal::Internal(e);
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| internal("no randomness".into()))?;
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        let serial_hex: String = serial.iter().map(|b| format!("{b:02X}")).collect();
        let time = |secs: u64| {
            x509_cert::time::Time::try_from(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .map_err(|e| internal(e.to_string()))
        };
        let validity = x509_cert::time::Validity {
            not_before: time(now.saturating_sub(3600))?,
            not_after: time(now.saturating_add(self.validity.as_secs()))?,
        };
        let subject = x509_cert::name::Name::from_str(&format!("CN={}", csr.cn))
            .map_err(|e| internal(e.to_string()))?;
        let mut b = CertificateBuilder::new(
            Profile::Leaf {
                issuer: self.ca.tbs_certificate.subject.clone(),
                enable_key_agreement: false,
                enable_key_encipherment: false,
            },
            x509_cert::serial_number::SerialNumber::new(&serial)
                .map_err(|e| internal(e.to_string()))?,
            validity,
            subject,
            csr.spki.clone(),
            &self.key,
        )
        .map_err(|e| internal(e.to_string()))?;
        b.add_extension(&x509_cert::ext::pkix::ExtendedKeyUsage(vec![
            x509_cert::der::oid::db::rfc5280::ID_KP_CLIENT_AUTH,
        ]))
        .map_err(|e| internal(e.to_string()))?;
        let cert = b
            .build::<p256::ecdsa::DerSignature>()
            .map_err(|e| internal(e.to_string()))?;
        Ok((
            cert.to_der().map_err(|e| internal(e.to_string()))?,
            serial_hex,
        ))
    }
}

fn read_small(path: &Path) -> Result<String, Refusal> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Refusal::Internal(format!("{}: {e}", path.display())))?;
    if meta.len() > MAX_TOKENS_FILE {
        return Err(Refusal::Internal(format!(
            "{} is too large",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| Refusal::Internal(format!("{}: {e}", path.display())))
}

/// A CSR that passed every check.
struct CheckedCsr {
    cn: String,
    spki: x509_cert::spki::SubjectPublicKeyInfoOwned,
}

/// PKCS#10, self-signed with ECDSA P-256/SHA-256, subject exactly one CN that is a node id,
/// no attributes.
fn check_csr(der: &[u8]) -> Result<CheckedCsr, Refusal> {
    let req = x509_cert::request::CertReq::from_der(der)
        .map_err(|e| Refusal::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    let spki = &req.info.public_key;
    if spki.algorithm.oid != EC_PUBLIC_KEY {
        return Err(Refusal::WeakKey(format!("a {} key", spki.algorithm.oid)));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if curve != Some(SECP256R1) {
        return Err(Refusal::WeakKey(format!("an EC key on curve {curve:?}")));
    }
    if req.algorithm.oid != ECDSA_SHA256 {
        return Err(Refusal::WeakKey(format!(
            "signed with {}",
            req.algorithm.oid
        )));
    }
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes())
        .map_err(|_| Refusal::BadCsr("the public key is not a P-256 point".into()))?;
    let sig = p256::ecdsa::DerSignature::from_bytes(req.signature.raw_bytes())
        .map_err(|_| Refusal::BadCsr("the signature is not an ECDSA signature".into()))?;
    let info = req
        .info
        .to_der()
        .map_err(|e| Refusal::BadCsr(e.to_string()))?;
    use p256::ecdsa::signature::Verifier;
    key.verify(&info, &sig)
        .map_err(|_| Refusal::BadCsr("its signature does not verify with its own key".into()))?;
    // Any attribute is refused; one asking for CA rights is named as such.
    for attr in req.info.attributes.iter() {
        if attr.oid != EXTENSION_REQUEST {
            continue;
        }
        for v in attr.values.iter() {
            let exts: x509_cert::ext::Extensions = v
                .decode_as()
                .map_err(|e| Refusal::BadCsr(format!("extensionRequest: {e}")))?;
            let ca = exts.iter().any(|ext| {
                ext.extn_id == BASIC_CONSTRAINTS
                    && x509_cert::ext::pkix::BasicConstraints::from_der(ext.extn_value.as_bytes())
                        .is_ok_and(|bc| bc.ca)
            });
            if ca {
                return Err(Refusal::AsksForCa);
            }
        }
    }
    if let Some(attr) = req.info.attributes.iter().next() {
        return Err(Refusal::Attributes(if attr.oid == EXTENSION_REQUEST {
            "extensionRequest".into()
        } else {
            attr.oid.to_string()
        }));
    }
    let mut cn = None;
    for rdn in req.info.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid != COMMON_NAME || cn.is_some() {
                return Err(Refusal::BadCsr(
                    "the subject must be exactly one CN (the node id)".into(),
                ));
            }
            let text = std::str::from_utf8(atv.value.value())
                .map_err(|_| Refusal::BadCsr("the CN is not UTF-8".into()))?;
            cn = Some(text.to_owned());
        }
    }
    let cn = cn.ok_or_else(|| Refusal::BadCsr("no CN".into()))?;
    if Id::new(&cn).is_err() || cn.len() > 48 {
        return Err(Refusal::BadCsr(format!(
            "CN {cn:?} is not a node id (A-Z a-z 0-9 . _ -, at most 48)"
        )));
    }
    Ok(CheckedCsr {
        cn,
        spki: spki.clone(),
    })
}

/// The answer for a decision.
pub fn response(decision: &Result<Vec<Vec<u8>>, Refusal>) -> Response {
    match decision {
        Ok(chain) => Response {
            ok: true,
            reason: String::new(),
            chain: chain.iter().map(|c| c.clone().into()).collect(),
        },
        Err(r) => Response {
            ok: false,
            reason: r.to_string(),
            chain: Vec::new(),
        },
    }
}
