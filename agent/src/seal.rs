//! Sealed peering credentials: the kubeconfig a provider hands over in PEER_ACCEPT is
//! encrypted to the buyer's certificate key, so the broker (which terminates TLS and relays
//! every message) sees only ciphertext.
//!
//! The construction (docs/protocol.md, "Sealed identity", with a test vector):
//!
//! ```text
//! ctx  = "fluidlet-seal-v1" 0x00 contract 0x00 provider 0x00 buyer      (ASCII ids)
//! E    = e·G                       e: a fresh random P-256 scalar per seal (the provider's)
//! Z    = x(e·Q)                    Q: the P-256 public key of the buyer's certificate
//! K    = HKDF-SHA256(salt = E ‖ Q, ikm = Z, info = ctx, 32 bytes)
//! C    = AES-256-GCM(K, nonce = 12 zero bytes, aad = ctx, identity)   ciphertext ‖ 16-byte tag
//! sealed = E ‖ C                   E and Q as uncompressed SEC1 points (65 bytes)
//! ```
//!
//! The key is used once (a fresh `e` per seal), so a fixed nonce is safe. The ids in `ctx`
//! cannot contain 0x00 (section 2 of the protocol), so `ctx` is unambiguous; binding them in
//! both the key and the AAD means a sealed identity moved to another contract, provider or
//! buyer does not open.
//!
//! ECDH runs in RustCrypto's `p256` on both sides: the buyer's side needs its *static* node
//! key, which ring's `agreement` cannot load, and one code path for both sides lets the test
//! vector exercise exactly what runs. HKDF and the AEAD are ring's (already linked by rustls).
//!
//! The provider checks the certificate a PEER_REQUEST carries before it grants anything: it
//! must chain to the domain CA (webpki, as the broker checks client certificates), be valid
//! now, have the sender as its subject CN and hold a P-256 key.

use crate::model::Id;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::{aead, hkdf};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::sync::Arc;
use x509_cert::der::Decode;

pub use crate::wire::MAX_CERTIFICATE;
/// Bytes a seal adds to the identity: the ephemeral point and the AEAD tag. The wire's size
/// limit is declared in `wire` (below `seal`), so the two are checked to agree here.
pub const OVERHEAD: usize = POINT + TAG;
const _: () = assert!(OVERHEAD == crate::wire::SEAL_OVERHEAD);
const POINT: usize = 65;
const TAG: usize = 16;
const LABEL: &[u8] = b"fluidlet-seal-v1";
/// id-ecPublicKey (RFC 5480) and the P-256 curve (prime256v1).
const EC_PUBLIC_KEY: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const PRIME256V1: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// Why sealing, opening or checking a certificate failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("sealed identity is {0} bytes, too short to hold a point and a tag")]
    Short(usize),
    #[error("the sealed identity does not open with this node's key for this contract")]
    Open,
    #[error("the opened identity is not UTF-8 text")]
    NotText,
    #[error("no randomness: {0}")]
    Random(String),
    #[error(
        "a PEER_REQUEST on a TLS domain must carry the buyer's certificate (key 3), so that the \
         identity can be sealed to it"
    )]
    NoCertificate,
    #[error("the provider sent the peering identity in clear on a TLS domain; refused")]
    Clear,
    #[error("the provider sealed the identity but this node has no TLS key to open it")]
    NoKey,
}

/// What binds a sealed identity to one grant.
pub struct Context<'a> {
    pub contract: &'a Id,
    pub provider: &'a Id,
    pub buyer: &'a Id,
}

impl Context<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut v = LABEL.to_vec();
        for id in [self.contract, self.provider, self.buyer] {
            v.push(0);
            v.extend_from_slice(id.as_str().as_bytes());
        }
        v
    }
}

/// This node's sealing material, from its TLS files: its certificate (sent in PEER_REQUEST),
/// its static key (opens what providers seal to it) and the domain CA (checks buyers'
/// certificates).
#[derive(Clone)]
pub struct Keys {
    pub certificate: Vec<u8>,
    secret: p256::SecretKey,
    roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

impl Keys {
    /// From the loaded TLS material; the node key must be a P-256 key (PKCS#8 or SEC1).
    pub fn new(
        certificate: &CertificateDer<'_>,
        key: &PrivateKeyDer<'_>,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Keys, SealError> {
        use p256::pkcs8::DecodePrivateKey;
        let secret = match key {
            PrivateKeyDer::Pkcs8(k) => p256::SecretKey::from_pkcs8_der(k.secret_pkcs8_der())
                .map_err(|e| SealError::Key(format!("not a P-256 PKCS#8 key: {e}")))?,
            PrivateKeyDer::Sec1(k) => p256::SecretKey::from_sec1_der(k.secret_sec1_der())
                .map_err(|e| SealError::Key(format!("not a P-256 SEC1 key: {e}")))?,
            _ => return Err(SealError::Key("not an elliptic-curve key".into())),
        };
        if roots.is_empty() {
            return Err(SealError::Certificate("no domain CA".into()));
        }
        Ok(Keys {
            certificate: certificate.to_vec(),
            secret,
            roots,
        })
    }

    /// Provider side: checks a buyer's certificate (chains to the domain CA, valid now,
    /// subject CN = `sender`, P-256 key) and returns its public key.
    pub fn check(&self, der: &[u8], sender: &Id) -> Result<p256::PublicKey, SealError> {
        let bad = |s: String| SealError::Certificate(s);
        // The check a TLS server makes of a client certificate (rustls' WebPkiClientVerifier
        // does the same through more code): path to a domain CA root, validity now, the
        // clientAuth usage if the certificate names usages, signatures with ring.
        let cert = CertificateDer::from(der);
        let not_domain =
            |e: webpki::Error| bad(format!("not issued by the domain CA or not valid now: {e}"));
        let ee = webpki::EndEntityCert::try_from(&cert).map_err(not_domain)?;
        let algs = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        ee.verify_for_usage(
            algs,
            &self.roots.roots,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(not_domain)?;
        let id = crate::tls::identity(der).map_err(bad)?;
        if id.common_name != sender.as_str() {
            return Err(bad(format!(
                "it is {:?}'s, not the sender's ({sender})",
                id.common_name
            )));
        }
        public_key(der)
    }

    /// Buyer side: opens an identity sealed to this node's key.
    pub fn open(&self, ctx: &Context<'_>, sealed: &[u8]) -> Result<String, SealError> {
        open(&self.secret, ctx, sealed)
    }
}

/// Provider side of a PEER_REQUEST from `from`: the key to seal the identity to, checked
/// against the domain CA; `None` on a plain-MQTT domain (no TLS files: the identity goes in
/// clear, as it did before sealing existed).
pub fn recipient(
    keys: Option<&Keys>,
    req: &crate::wire::PeerRequest,
    from: &Id,
) -> Result<Option<p256::PublicKey>, SealError> {
    let Some(keys) = keys else {
        return Ok(None);
    };
    let cert = req.certificate.as_ref().ok_or(SealError::NoCertificate)?;
    keys.check(cert.as_slice(), from).map(Some)
}

/// Provider side: the PEER_ACCEPT fields for `identity`: sealed to `recipient` when there is
/// one, else in clear.
pub fn protect(
    recipient: Option<&p256::PublicKey>,
    ctx: &Context<'_>,
    identity: Option<crate::model::LongText<{ crate::wire::MAX_IDENTITY }>>,
) -> Result<Sealed, SealError> {
    match (recipient, identity) {
        (Some(q), Some(text)) => {
            let sealed = seal(q, ctx, text.as_str().as_bytes())?;
            let bytes = crate::wire::Bytes::new(&sealed).map_err(|_| SealError::Short(0))?;
            Ok((None, Some(bytes)))
        }
        (_, identity) => Ok((identity, None)),
    }
}

/// PEER_ACCEPT's `identity` and `sealed` fields.
pub type Sealed = (
    Option<crate::model::LongText<{ crate::wire::MAX_IDENTITY }>>,
    Option<crate::wire::Bytes<{ crate::wire::MAX_SEALED }>>,
);

/// Buyer side: the identity a PEER_ACCEPT carries, opened. A TLS node refuses an identity in
/// clear (only a plain-MQTT loopback/demo domain sends one).
pub fn receive(
    keys: Option<&Keys>,
    ctx: &Context<'_>,
    grant: &crate::wire::PeerAccept,
) -> Result<Option<String>, SealError> {
    match (&grant.sealed, &grant.identity, keys) {
        (Some(sealed), _, Some(keys)) => keys.open(ctx, sealed.as_slice()).map(Some),
        (Some(_), _, None) => Err(SealError::NoKey),
        (None, Some(_), Some(_)) => Err(SealError::Clear),
        (None, Some(text), None) => Ok(Some(text.as_str().to_owned())),
        (None, None, _) => Ok(None),
    }
}

/// The P-256 public key of a DER certificate.
pub fn public_key(der: &[u8]) -> Result<p256::PublicKey, SealError> {
    let bad = |s: &str| SealError::Certificate(s.into());
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| SealError::Certificate(format!("not an X.509 certificate: {e}")))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok());
    if spki.algorithm.oid != EC_PUBLIC_KEY || curve != Some(PRIME256V1) {
        return Err(bad("its key is not a P-256 key"));
    }
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| bad("its key is not a whole number of bytes"))?;
    p256::PublicKey::from_sec1_bytes(point).map_err(|_| bad("its key is not a valid P-256 point"))
}

fn uncompressed(p: &p256::PublicKey) -> Vec<u8> {
    p.to_encoded_point(false).as_bytes().to_vec()
}

/// The AEAD key for ephemeral point `e_point`, recipient `q` and shared secret `z`.
fn key(
    e_point: &[u8],
    q: &p256::PublicKey,
    z: &[u8],
    ctx: &[u8],
) -> Result<aead::LessSafeKey, SealError> {
    let mut salt = e_point.to_vec();
    salt.extend_from_slice(&uncompressed(q));
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(z);
    let info = [ctx];
    let okm = prk
        .expand(&info, &aead::AES_256_GCM)
        .map_err(|_| SealError::Open)?;
    Ok(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
}

/// Seals `identity` to `recipient` with the ephemeral scalar `e` (32 bytes, big-endian):
/// deterministic, for the test vector; [`seal`] draws `e` at random.
pub fn seal_with(
    e: &[u8],
    recipient: &p256::PublicKey,
    ctx: &Context<'_>,
    identity: &[u8],
) -> Result<Vec<u8>, SealError> {
    let e = p256::SecretKey::from_slice(e).map_err(|_| SealError::Key("bad ephemeral".into()))?;
    let e_point = uncompressed(&e.public_key());
    let z = p256::ecdh::diffie_hellman(e.to_nonzero_scalar(), recipient.as_affine());
    let ctx = ctx.bytes();
    let k = key(&e_point, recipient, z.raw_secret_bytes(), &ctx)?;
    let mut out = identity.to_vec();
    k.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key([0; 12]),
        aead::Aad::from(&ctx),
        &mut out,
    )
    .map_err(|_| SealError::Open)?;
    let mut sealed = e_point;
    sealed.extend_from_slice(&out);
    Ok(sealed)
}

/// Seals `identity` to `recipient` under a fresh random ephemeral key.
pub fn seal(
    recipient: &p256::PublicKey,
    ctx: &Context<'_>,
    identity: &[u8],
) -> Result<Vec<u8>, SealError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    // A random 32-byte string is a valid scalar (0 < e < n) but with probability ~2^-32.
    for _ in 0..8 {
        let mut e = [0u8; 32];
        rng.fill(&mut e)
            .map_err(|_| SealError::Random("the system RNG failed".into()))?;
        if p256::SecretKey::from_slice(&e).is_ok() {
            return seal_with(&e, recipient, ctx, identity);
        }
    }
    Err(SealError::Random("no valid scalar drawn".into()))
}

/// Opens a sealed identity with the recipient's static key.
pub fn open(
    secret: &p256::SecretKey,
    ctx: &Context<'_>,
    sealed: &[u8],
) -> Result<String, SealError> {
    if sealed.len() < OVERHEAD {
        return Err(SealError::Short(sealed.len()));
    }
    let (e_point, c) = sealed.split_at(POINT);
    let e = p256::PublicKey::from_sec1_bytes(e_point).map_err(|_| SealError::Open)?;
    let z = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), e.as_affine());
    let ctx = ctx.bytes();
    let k = key(
        &uncompressed(&e),
        &secret.public_key(),
        z.raw_secret_bytes(),
        &ctx,
    )?;
    let mut buf = c.to_vec();
    let plain = k
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(&ctx),
            &mut buf,
        )
        .map_err(|_| SealError::Open)?;
    String::from_utf8(plain.to_vec()).map_err(|_| SealError::NotText)
}

/// The test vector of docs/protocol.md: (recipient secret, ephemeral secret, ids, plaintext).
pub fn vector() -> ([u8; 32], [u8; 32], [&'static str; 3], &'static str) {
    let mut d = [0u8; 32];
    let mut e = [0u8; 32];
    for i in 0..32 {
        d[i] = 0x10 + i as u8;
        e[i] = 0x40 + i as u8;
    }
    (
        d,
        e,
        ["provider-1.c9", "provider-1", "consumer-1"],
        "apiVersion: v1\nkind: Config\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (Id, Id, Id) {
        let [c, p, b] = vector().2;
        (
            Id::new(c).unwrap(),
            Id::new(p).unwrap(),
            Id::new(b).unwrap(),
        )
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The vector in docs/protocol.md is what the code produces, and it opens.
    #[test]
    fn seal_reproduces_the_documented_test_vector() {
        let (d, e, _, plain) = vector();
        let (c, p, b) = ids();
        let ctx = Context {
            contract: &c,
            provider: &p,
            buyer: &b,
        };
        let recipient = p256::SecretKey::from_slice(&d).unwrap();
        let sealed = seal_with(&e, &recipient.public_key(), &ctx, plain.as_bytes()).unwrap();
        assert_eq!(sealed.len(), plain.len() + OVERHEAD);
        let doc = include_str!("../../docs/protocol.md");
        let marker = "<!-- vector: SEALED -->\n```text\n";
        let start = doc.find(marker).expect("docs/protocol.md has the vector") + marker.len();
        let end = start + doc[start..].find("```").unwrap();
        let documented: String = doc[start..end].split_whitespace().collect();
        assert_eq!(documented, hex(&sealed));
        assert_eq!(open(&recipient, &ctx, &sealed).unwrap(), plain);
    }

    #[test]
    fn a_sealed_identity_opens_only_for_its_recipient_and_context() {
        let (c, p, b) = ids();
        let ctx = Context {
            contract: &c,
            provider: &p,
            buyer: &b,
        };
        let d = p256::SecretKey::from_slice(&vector().0).unwrap();
        let sealed = seal(&d.public_key(), &ctx, b"secret").unwrap();
        assert_eq!(open(&d, &ctx, &sealed).unwrap(), "secret");
        assert_ne!(
            seal(&d.public_key(), &ctx, b"secret").unwrap(),
            sealed,
            "fresh e"
        );
        let other = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        assert_eq!(open(&other, &ctx, &sealed), Err(SealError::Open));
        let c2 = Id::new("provider-1.c10").unwrap();
        let moved = Context {
            contract: &c2,
            ..ctx
        };
        assert_eq!(open(&d, &moved, &sealed), Err(SealError::Open));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(open(&d, &ctx, &flipped), Err(SealError::Open));
        assert_eq!(open(&d, &ctx, &sealed[..40]), Err(SealError::Short(40)));
        let mut bad_point = sealed;
        bad_point[1] ^= 1;
        assert_eq!(open(&d, &ctx, &bad_point), Err(SealError::Open));
    }
}
