//! TLS to the domain broker: the rustls client configuration and the checks made at start.
//!
//! Mutual TLS only: the broker proves itself with a certificate from the domain CA (and the
//! name in `broker = "mqtts://NAME:PORT"`), the node proves itself with its own certificate,
//! whose subject CN is its node id. The broker turns that CN into the MQTT username and its
//! ACL binds every topic a node may write to that name, so a node's identity is its
//! certificate, not what it says in a message (docs/security.md).
//!
//! The crypto provider is *ring*: small (about 0.3 MB in an aarch64 build), pure C and
//! assembly that the `cc` crate compiles with the Debian cross compilers already used for
//! linking; aws-lc-rs would need CMake per target and adds more than twice the bytes.
//!
//! Checked at start, each with an error naming the file: every file can be read, is not
//! absurdly large and holds what it should; the certificate's CN equals `node_id`; the
//! certificate is within its validity period. A key file that others can read is a warning:
//! anyone who can read it can speak for this node.

use crate::config::{ReadError, TlsFiles};
use crate::model::Id;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use x509_cert::der::{Decode, Tag, Tagged};

/// Largest PEM file read: a chain of a few certificates is a few KiB.
const MAX_PEM_FILE: u64 = 64 * 1024;
/// A certificate that expires sooner than this gets a warning at start.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// X.520 commonName, 2.5.4.3.
const COMMON_NAME: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");

/// Why the TLS material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("tls: {path} is over {MAX_PEM_FILE} bytes; a PEM file is a few KiB")]
    TooLarge { path: PathBuf },
    #[error("tls: {path}: {problem}")]
    Pem { path: PathBuf, problem: String },
    #[error(
        "tls: the certificate {path} is for {cn:?} but node_id is {node:?}; \
         a node's id must equal its certificate's CN (the broker knows it by that name)"
    )]
    WrongNode {
        path: PathBuf,
        cn: String,
        node: String,
    },
    #[error("tls: the certificate {path} {problem}")]
    Validity { path: PathBuf, problem: String },
    #[error("tls: {0}")]
    Rustls(String),
}

/// What the node's certificate says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub common_name: String,
    /// Seconds since 1970 before which / after which the certificate is not valid.
    pub not_before: u64,
    pub not_after: u64,
}

/// The checked TLS material: a client config for rumqttc, plus the warnings to log.
pub struct Loaded {
    pub client: Arc<rustls::ClientConfig>,
    pub identity: Identity,
    pub warnings: Vec<String>,
    /// The node's own certificate (the first of its chain), its key and the domain CA: what
    /// sealed peering credentials need ([`crate::seal::Keys`]).
    pub certificate: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<rustls::RootCertStore>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::config::read_bounded(path, MAX_PEM_FILE).map_err(|e| match e {
        ReadError::Io(err) => TlsError::Io {
            path: path.to_owned(),
            err,
        },
        ReadError::TooLarge => TlsError::TooLarge {
            path: path.to_owned(),
        },
    })
}

fn pem_error(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            "holds no certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// Reads the subject CN and validity of a DER certificate.
/// Whether `der` is a CA certificate (basicConstraints with CA:TRUE).
fn is_ca(der: &[u8]) -> bool {
    use x509_cert::der::oid::AssociatedOid;
    use x509_cert::ext::pkix::BasicConstraints;
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return false;
    };
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == BasicConstraints::OID)
        .any(|e| BasicConstraints::from_der(e.extn_value.as_bytes()).is_ok_and(|b| b.ca))
}

pub fn identity(der: &[u8]) -> Result<Identity, String> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let tbs = &cert.tbs_certificate;
    let mut cn = None;
    for rdn in tbs.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid != COMMON_NAME {
                continue;
            }
            match atv.value.tag() {
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {}
                t => return Err(format!("the subject CN is a {t}, not a string")),
            }
            if cn.is_some() {
                return Err("the subject has more than one CN".into());
            }
            let text = std::str::from_utf8(atv.value.value())
                .map_err(|_| "the subject CN is not UTF-8".to_string())?;
            cn = Some(text.to_owned());
        }
    }
    let common_name = cn.ok_or("the subject has no CN")?;
    Ok(Identity {
        common_name,
        not_before: tbs.validity.not_before.to_unix_duration().as_secs(),
        not_after: tbs.validity.not_after.to_unix_duration().as_secs(),
    })
}

/// A warning when a key file can be read or written by anyone but its owner.
pub fn key_mode_warning(path: &Path, mode: u32) -> Option<String> {
    (mode & 0o077 != 0).then(|| {
        format!(
            "the private key {} has mode {:04o}: other users of this device can read it and \
             speak for this node; chmod 600 it",
            path.display(),
            mode & 0o7777
        )
    })
}

/// Refuses a certificate outside its validity period; warns when it ends within
/// [`EXPIRY_WARNING`].
pub fn check_validity(id: &Identity, now: u64) -> Result<Option<String>, String> {
    if now < id.not_before {
        return Err(format!(
            "is not valid before unix time {} (now {now}): is the clock set?",
            id.not_before
        ));
    }
    if now > id.not_after {
        return Err(format!("expired at unix time {} (now {now})", id.not_after));
    }
    let left = id.not_after - now;
    Ok((left < EXPIRY_WARNING.as_secs()).then(|| format!("expires in {} days", left / 86_400)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads and checks the CA, certificate and key for `node`, and builds the client config.
pub fn load(files: &TlsFiles, node: &Id) -> Result<Loaded, TlsError> {
    let mut warnings = Vec::new();
    let chain = certificates(&files.cert)?;
    let id = identity(&chain[0]).map_err(|p| pem_error(&files.cert, p))?;
    if id.common_name != node.as_str() {
        return Err(TlsError::WrongNode {
            path: files.cert.clone(),
            cn: id.common_name,
            node: node.to_string(),
        });
    }
    let validity = |problem: String| TlsError::Validity {
        path: files.cert.clone(),
        problem,
    };
    warnings.extend(
        check_validity(&id, unix_now())
            .map_err(validity)?
            .map(|w| format!("the certificate {} {w}", files.cert.display())),
    );

    let key_bytes = read(&files.key)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(&files.key) {
            warnings.extend(key_mode_warning(&files.key, m.permissions().mode()));
        }
    }
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        pem_error(
            &files.key,
            format!("no private key (PKCS#8, PKCS#1 or SEC1 PEM expected): {e}"),
        )
    })?;

    let mut roots = rustls::RootCertStore::empty();
    let cas = certificates(&files.ca)?;
    if let Some(leaf) = cas.iter().find(|c| !is_ca(c)) {
        let cn = identity(leaf).map(|i| i.common_name).unwrap_or_default();
        return Err(pem_error(
            &files.ca,
            format!(
                "holds a certificate that is not a CA (\"{cn}\", without basicConstraints CA:TRUE): \
                 `ca` is the domain CA (domain-ca.pem), not a node's or the broker's certificate"
            ),
        ));
    }
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(pem_error(&files.ca, "holds no usable CA certificate"));
    }
    // The broker checks the node's certificate against its CA: check it here too, so that
    // `fluidlet check` and the start say it rather than a refused handshake later.
    {
        let ee = webpki::EndEntityCert::try_from(&chain[0])
            .map_err(|e| pem_error(&files.cert, format!("is not a usable certificate: {e}")))?;
        let algs = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        ee.verify_for_usage(
            algs,
            &roots.roots,
            &chain[1..],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            let why = match e {
                webpki::Error::UnknownIssuer => format!(
                    "is not signed by the CA in {} (the broker would refuse it): mint it with that \
                     domain's `domain.sh node`, or point `ca` at the CA that signed it",
                    files.ca.display()
                ),
                other => format!(
                    "does not chain to the CA in {}: {other}",
                    files.ca.display()
                ),
            };
            pem_error(&files.cert, why)
        })?;
    }

    let roots = Arc::new(roots);
    let certificate = chain[0].clone();
    let own_key = key.clone_key();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .map_err(|e| pem_error(&files.key, format!("does not go with the certificate: {e}")))?;
    Ok(Loaded {
        client: Arc::new(client),
        identity: id,
        warnings,
        certificate,
        key: own_key,
        roots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_only_keys_pass_and_shared_keys_are_warned_about() {
        let p = Path::new("/k.pem");
        assert_eq!(key_mode_warning(p, 0o100600), None);
        assert_eq!(key_mode_warning(p, 0o100400), None);
        let w = key_mode_warning(p, 0o100644).unwrap();
        assert!(w.contains("0644") && w.contains("chmod 600"), "{w}");
        assert!(key_mode_warning(p, 0o100640).is_some(), "group-readable");
    }

    #[test]
    fn certificates_out_of_date_are_refused_and_near_expiry_warned_about() {
        let id = Identity {
            common_name: "n".into(),
            not_before: 1_000,
            not_after: 1_000 + 365 * 86_400,
        };
        assert!(check_validity(&id, 999).unwrap_err().contains("clock"));
        assert!(check_validity(&id, id.not_after + 1)
            .unwrap_err()
            .contains("expired"));
        assert_eq!(check_validity(&id, 2_000), Ok(None));
        let w = check_validity(&id, id.not_after - 3 * 86_400)
            .unwrap()
            .unwrap();
        assert!(w.contains("expires in 3 days"), "{w}");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(identity(b"\x30\x03\x02\x01\x01").is_err());
        assert!(identity(&[]).is_err());
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/node.pem".into(),
            key: "/nonexistent/node.key".into(),
        };
        let e = load(&files, &Id::new("n").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/node.pem"), "{e}");
    }
}
