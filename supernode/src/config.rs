//! fluidlet-supernode's TOML configuration, checked at load like the agent's: unknown keys,
//! out-of-range numbers and missing files are errors that name the key.

use fluidlet::model::Id;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest config file read.
const MAX_CONFIG: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("config: {0}")]
    Toml(String),
    #[error("config: {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    domain: String,
    data_dir: PathBuf,
    broker: RawBroker,
    refs: RawRefs,
    http: RawHttp,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    outbound: Option<RawOutbound>,
}

/// `[outbound]`: reference nodes this face sells from, into the domain (docs/supernode.md,
/// "Outbound").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    dir: PathBuf,
    currency: String,
    #[serde(default = "default_poll")]
    poll_secs: u32,
    #[serde(default = "default_connect")]
    connect_timeout_secs: u32,
    #[serde(default = "default_request")]
    request_timeout_secs: u32,
    #[serde(default = "default_purchase")]
    purchase_timeout_secs: u32,
    #[serde(default = "default_answer_bytes")]
    max_answer_bytes: u32,
    #[serde(default = "default_gone")]
    gone_after_failures: u32,
    #[serde(default = "default_demote")]
    demote_secs: u32,
    #[serde(default = "default_backoff")]
    max_backoff_secs: u32,
    /// `GROUP:PORT` to hear reference nodes' announcements on (239.11.11.1:4000 is theirs).
    #[serde(default)]
    multicast: Option<String>,
    /// IPv4 address of the interface to join the group on (default: the system's choice).
    #[serde(default)]
    multicast_interface: Option<String>,
    #[serde(default = "default_mc_expiry")]
    multicast_expiry_secs: u32,
    #[serde(default)]
    reference: Vec<RawReference>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReference {
    endpoint: String,
}

fn default_poll() -> u32 {
    30
}
fn default_connect() -> u32 {
    5
}
fn default_request() -> u32 {
    10
}
fn default_purchase() -> u32 {
    60
}
fn default_answer_bytes() -> u32 {
    1 << 20
}
fn default_gone() -> u32 {
    3
}
fn default_demote() -> u32 {
    600
}
fn default_backoff() -> u32 {
    600
}
fn default_mc_expiry() -> u32 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn default_port() -> u16 {
    8883
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefs {
    dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    advertise: String,
    #[serde(default)]
    insecure_plaintext: bool,
    /// HTTPS: the face's certificate chain and key (PEM).
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    /// HTTPS with client certificates: the CA(s) a client's certificate must chain to.
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
    #[serde(default = "default_max_body")]
    max_body_bytes: u32,
    #[serde(default = "default_header_timeout")]
    header_timeout_secs: u32,
    #[serde(default = "default_rate")]
    requests_per_second: u32,
}

fn default_max_connections() -> u32 {
    64
}
fn default_max_body() -> u32 {
    64 * 1024
}
fn default_header_timeout() -> u32 {
    10
}
fn default_rate() -> u32 {
    50
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default = "default_reserve")]
    reserve_secs: u32,
    #[serde(default = "default_peer")]
    peer_request_secs: u32,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            reserve_secs: default_reserve(),
            peer_request_secs: default_peer(),
        }
    }
}

fn default_reserve() -> u32 {
    5
}
fn default_peer() -> u32 {
    120
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The certificate's CN is `supernode:{name}`.
    pub name: String,
    pub domain: Id,
    pub data_dir: PathBuf,
    pub broker_host: String,
    pub broker_port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// One folder per admitted reference node, `ref-{hash}/node.pem`, `node.key`,
    /// `domain-ca.pem` (domain.sh refnode).
    pub refs_dir: PathBuf,
    pub listen: SocketAddr,
    /// `host:port` where reference nodes reach this face: every flavour's `owner.IP`.
    pub advertise: String,
    /// HTTPS (certificate, key, optional client CA) when configured; plain HTTP otherwise.
    pub https: Option<Https>,
    pub max_connections: usize,
    pub max_body_bytes: usize,
    pub header_timeout: Duration,
    pub requests_per_second: u32,
    pub reserve_timeout: Duration,
    pub peer_request_timeout: Duration,
    /// The outbound side, when `[outbound]` is configured.
    pub outbound: Option<Outbound>,
}

/// The face's HTTPS files.
#[derive(Clone, Debug)]
pub struct Https {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Most reference nodes one face sells from.
pub const MAX_REFERENCES: usize = 256;

/// The checked `[outbound]` section.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// One folder per reference seller, `ref-{hash}/node.pem`, `node.key`, `domain-ca.pem`
    /// (domain.sh refprovider).
    pub dir: PathBuf,
    /// The domain's currency: a flavour priced in another is not listed (logged).
    pub currency: String,
    pub poll: Duration,
    pub connect_timeout: Duration,
    /// Whole-request limit of a listing and of a reserve.
    pub request_timeout: Duration,
    /// Whole-request limit of a purchase (the reference node sleeps seconds in it).
    pub purchase_timeout: Duration,
    pub max_answer_bytes: usize,
    /// Consecutive failed polls after which a reference node's advert is cleared.
    pub gone_after_failures: u32,
    /// How long a reference node that lied is not listed nor polled.
    pub demote: Duration,
    /// Longest wait between polls of a failing reference node (the wait doubles per
    /// consecutive failure from `poll`).
    pub max_backoff: Duration,
    /// The multicast group and port reference nodes announce themselves on, when listened to.
    pub multicast: Option<std::net::SocketAddrV4>,
    pub multicast_interface: std::net::Ipv4Addr,
    /// A reference node found by multicast and not heard for this long is forgotten.
    pub multicast_expiry: Duration,
    /// `host:port` of each reference node's REAR gateway.
    pub references: Vec<String>,
}

/// Whether `s` is `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 one).
fn host_port(s: &str) -> bool {
    s.len() <= 255
        && s.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty()
                && p.parse::<u16>().is_ok_and(|p| p > 0)
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
}

fn outbound(
    o: RawOutbound,
    range: impl Fn(&'static str, u32, u32, u32) -> Result<u32, ConfigError>,
) -> Result<Outbound, ConfigError> {
    let cur_ok =
        (1..=8).contains(&o.currency.len()) && o.currency.bytes().all(|b| b.is_ascii_uppercase());
    if !cur_ok {
        return Err(invalid(
            "outbound.currency",
            "the domain's currency, an ISO 4217 code such as EUR",
        ));
    }
    let poll = range("outbound.poll_secs", o.poll_secs, 1, 3600)?;
    let connect = range(
        "outbound.connect_timeout_secs",
        o.connect_timeout_secs,
        1,
        60,
    )?;
    let request = range(
        "outbound.request_timeout_secs",
        o.request_timeout_secs,
        1,
        120,
    )?;
    let purchase = range(
        "outbound.purchase_timeout_secs",
        o.purchase_timeout_secs,
        10,
        600,
    )?;
    let bytes = range(
        "outbound.max_answer_bytes",
        o.max_answer_bytes,
        4096,
        16 << 20,
    )?;
    let gone = range(
        "outbound.gone_after_failures",
        o.gone_after_failures,
        1,
        100,
    )?;
    let demote = range("outbound.demote_secs", o.demote_secs, 1, 86_400)?;
    let backoff = range("outbound.max_backoff_secs", o.max_backoff_secs, 1, 3600)?;
    let multicast = match &o.multicast {
        None => None,
        Some(m) => {
            let a: std::net::SocketAddrV4 = m.parse().map_err(|_| {
                invalid(
                    "outbound.multicast",
                    format!("{m:?}: GROUP:PORT (the reference nodes' is 239.11.11.1:4000)"),
                )
            })?;
            if !a.ip().is_multicast() || a.port() == 0 {
                return Err(invalid(
                    "outbound.multicast",
                    format!("{m}: not an IPv4 multicast group with a port"),
                ));
            }
            Some(a)
        }
    };
    let multicast_interface = match &o.multicast_interface {
        None => std::net::Ipv4Addr::UNSPECIFIED,
        Some(i) => i.parse().map_err(|_| {
            invalid(
                "outbound.multicast_interface",
                format!("{i:?}: the IPv4 address of an interface"),
            )
        })?,
    };
    let mc_expiry = range(
        "outbound.multicast_expiry_secs",
        o.multicast_expiry_secs,
        6,
        3600,
    )?;
    if o.reference.len() > MAX_REFERENCES {
        return Err(invalid(
            "outbound.reference",
            format!("at most {MAX_REFERENCES} reference nodes"),
        ));
    }
    let mut references: Vec<String> = Vec::new();
    for r in o.reference {
        if !host_port(&r.endpoint) {
            return Err(invalid(
                "outbound.reference.endpoint",
                format!(
                    "{:?}: HOST:PORT of the reference node's REAR gateway (its --http-port, 3004 by default)",
                    r.endpoint
                ),
            ));
        }
        if references.contains(&r.endpoint) {
            return Err(invalid(
                "outbound.reference.endpoint",
                format!("{} is listed twice", r.endpoint),
            ));
        }
        references.push(r.endpoint);
    }
    Ok(Outbound {
        dir: o.dir,
        currency: o.currency,
        poll: Duration::from_secs(u64::from(poll)),
        connect_timeout: Duration::from_secs(u64::from(connect)),
        request_timeout: Duration::from_secs(u64::from(request)),
        purchase_timeout: Duration::from_secs(u64::from(purchase)),
        max_answer_bytes: bytes as usize,
        gone_after_failures: gone,
        demote: Duration::from_secs(u64::from(demote)),
        max_backoff: Duration::from_secs(u64::from(backoff)),
        multicast,
        multicast_interface,
        multicast_expiry: Duration::from_secs(u64::from(mc_expiry)),
        references,
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes =
            fluidlet::config::read_bounded(path, MAX_CONFIG).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                problem: format!("{e:?}"),
            })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::File {
            path: path.to_owned(),
            problem: "not UTF-8".into(),
        })?;
        let cfg = Config::from_toml(&text)?;
        for (key, p) in [
            ("broker.ca", &cfg.ca),
            ("broker.cert", &cfg.cert),
            ("broker.key", &cfg.key),
        ] {
            if !p.is_file() {
                return Err(invalid(key, format!("{} is not a file", p.display())));
            }
        }
        if let Some(h) = &cfg.https {
            for (key, p) in [
                ("http.tls_cert", Some(&h.cert)),
                ("http.tls_key", Some(&h.key)),
                ("http.client_ca", h.client_ca.as_ref()),
            ] {
                if let Some(p) = p {
                    if !p.is_file() {
                        return Err(invalid(key, format!("{} is not a file", p.display())));
                    }
                }
            }
        }
        if let Some(o) = &cfg.outbound {
            if !o.dir.is_dir() {
                return Err(invalid(
                    "outbound.dir",
                    format!("{} is not a directory", o.dir.display()),
                ));
            }
            for e in &o.references {
                let id = crate::outbound::provider_id(e);
                let cert = o.dir.join(&id).join("node.pem");
                if !cert.is_file() {
                    return Err(invalid(
                        "outbound.reference",
                        format!(
                            "{e}: {} is not a file: mint it with domain.sh refprovider DIR {} {e}",
                            cert.display(),
                            cfg.name
                        ),
                    ));
                }
            }
        }
        if !cfg.refs_dir.is_dir() {
            return Err(invalid(
                "refs.dir",
                format!("{} is not a directory", cfg.refs_dir.display()),
            ));
        }
        Ok(cfg)
    }

    /// Parses and checks everything but the files.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= 48
            && raw
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(invalid("name", "use A-Z a-z 0-9 . _ - (at most 48)"));
        }
        let domain = Id::new(&raw.domain)
            .ok()
            .filter(|d| d.as_str().len() <= 48)
            .ok_or_else(|| invalid("domain", "use A-Z a-z 0-9 . _ - (at most 48)"))?;
        if raw.broker.host.is_empty() || raw.broker.host.contains(['/', ' ']) {
            return Err(invalid("broker.host", "a host name or address"));
        }
        if raw.broker.port == 0 {
            return Err(invalid("broker.port", "1..65535"));
        }
        let listen: SocketAddr = raw
            .http
            .listen
            .parse()
            .map_err(|e| invalid("http.listen", format!("not ADDRESS:PORT: {e}")))?;
        if !host_port(&raw.http.advertise) {
            return Err(invalid(
                "http.advertise",
                "HOST:PORT where reference nodes reach this face (their client sends reserve and purchase to http://{owner.IP})",
            ));
        }
        let https = match (raw.http.tls_cert, raw.http.tls_key) {
            (Some(cert), Some(key)) => {
                if raw.http.insecure_plaintext {
                    return Err(invalid(
                        "http.insecure_plaintext",
                        "tls_cert and tls_key make the face serve HTTPS only: drop insecure_plaintext",
                    ));
                }
                Some(Https {
                    cert,
                    key,
                    client_ca: raw.http.client_ca,
                })
            }
            (None, None) => {
                if raw.http.client_ca.is_some() {
                    return Err(invalid(
                        "http.client_ca",
                        "client certificates need HTTPS: set tls_cert and tls_key",
                    ));
                }
                None
            }
            _ => {
                return Err(invalid(
                    "http.tls_cert",
                    "HTTPS needs both tls_cert and tls_key",
                ))
            }
        };
        if https.is_none() && !raw.http.insecure_plaintext {
            return Err(invalid(
                "http.insecure_plaintext",
                "without tls_cert and tls_key the face serves plain HTTP, which the reference node's client (http:// only) needs: set insecure_plaintext = true, knowing what then travels in clear (docs/security.md, \"Supernode\"), or configure HTTPS",
            ));
        }
        let range = |key: &'static str, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(key, format!("{v} is not in {lo}..={hi}")))
            }
        };
        let max_connections = range("http.max_connections", raw.http.max_connections, 1, 4096)?;
        let max_body = range(
            "http.max_body_bytes",
            raw.http.max_body_bytes,
            1024,
            1 << 20,
        )?;
        let header = range(
            "http.header_timeout_secs",
            raw.http.header_timeout_secs,
            1,
            300,
        )?;
        let rate = range(
            "http.requests_per_second",
            raw.http.requests_per_second,
            1,
            100_000,
        )?;
        let reserve = range("timeouts.reserve_secs", raw.timeouts.reserve_secs, 1, 60)?;
        let peer = range(
            "timeouts.peer_request_secs",
            raw.timeouts.peer_request_secs,
            10,
            600,
        )?;
        let outbound = match raw.outbound {
            None => None,
            Some(o) => Some(outbound(o, range)?),
        };
        Ok(Config {
            outbound,
            name: raw.name,
            domain,
            data_dir: raw.data_dir,
            broker_host: raw.broker.host,
            broker_port: raw.broker.port,
            ca: raw.broker.ca,
            cert: raw.broker.cert,
            key: raw.broker.key,
            refs_dir: raw.refs.dir,
            listen,
            advertise: raw.http.advertise,
            https,
            max_connections: max_connections as usize,
            max_body_bytes: max_body as usize,
            header_timeout: Duration::from_secs(u64::from(header)),
            requests_per_second: rate,
            reserve_timeout: Duration::from_secs(u64::from(reserve)),
            peer_request_timeout: Duration::from_secs(u64::from(peer)),
        })
    }

    /// The certificate CN this supernode connects with.
    pub fn common_name(&self) -> String {
        format!("supernode:{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "sn1"
domain = "d1"
data_dir = "/tmp/x"
[broker]
host = "127.0.0.1"
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
[refs]
dir = "refs"
[http]
listen = "127.0.0.1:3004"
advertise = "10.0.0.5:3004"
insecure_plaintext = true
"#;

    #[test]
    fn a_good_config_loads_with_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.broker_port, 8883);
        assert_eq!(c.common_name(), "supernode:sn1");
        assert_eq!(c.max_connections, 64);
        assert_eq!(c.peer_request_timeout, Duration::from_secs(120));
    }

    #[test]
    fn the_packaged_example_is_a_good_config() {
        let c = Config::from_toml(include_str!("../../packaging/supernode.toml")).unwrap();
        assert_eq!(c.listen.port(), 3004);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/fluidlet-supernode"));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("name = \"sn1\"", "name = \"sn:1\"", "name"),
            ("domain = \"d1\"", "domain = \"d/1\"", "domain"),
            (
                "advertise = \"10.0.0.5:3004\"",
                "advertise = \"10.0.0.5\"",
                "http.advertise",
            ),
            (
                "insecure_plaintext = true",
                "insecure_plaintext = false",
                "http.insecure_plaintext",
            ),
            (
                "listen = \"127.0.0.1:3004\"",
                "listen = \"nowhere\"",
                "http.listen",
            ),
            (
                "insecure_plaintext = true",
                "insecure_plaintext = true\nmax_connections = 0",
                "http.max_connections",
            ),
        ];
        for (from, to, key) in cases {
            let err = Config::from_toml(&GOOD.replace(from, to)).unwrap_err();
            assert!(err.to_string().contains(key), "{to}: {err}");
        }
        let out = "[outbound]\ndir = \"out\"\ncurrency = \"EUR\"\n[[outbound.reference]]\nendpoint = \"10.0.0.7:3004\"\n";
        let c = Config::from_toml(&format!("{GOOD}{out}")).unwrap();
        let o = c.outbound.unwrap();
        assert_eq!(o.references, ["10.0.0.7:3004"]);
        assert_eq!(o.max_answer_bytes, 1 << 20);
        assert_eq!(o.purchase_timeout, Duration::from_secs(60));
        for (from, to, key) in [
            ("10.0.0.7:3004", "10.0.0.7", "outbound.reference.endpoint"),
            (
                "10.0.0.7:3004",
                "http://10.0.0.7:3004",
                "outbound.reference.endpoint",
            ),
            ("\"EUR\"", "\"euro\"", "outbound.currency"),
            (
                "\"EUR\"",
                "\"EUR\"\nmulticast = \"10.0.0.1:4000\"",
                "outbound.multicast",
            ),
            ("\"EUR\"", "\"EUR\"\npoll_secs = 0", "outbound.poll_secs"),
            (
                "\"EUR\"",
                "\"EUR\"\nmax_answer_bytes = 100",
                "outbound.max_answer_bytes",
            ),
            (
                "\"EUR\"",
                "\"EUR\"\npurchase_timeout_secs = 1",
                "outbound.purchase_timeout_secs",
            ),
        ] {
            let err = Config::from_toml(&format!("{GOOD}{}", out.replace(from, to))).unwrap_err();
            assert!(err.to_string().contains(key), "{to}: {err}");
        }
        let twice = format!("{out}[[outbound.reference]]\nendpoint = \"10.0.0.7:3004\"\n");
        let err = Config::from_toml(&format!("{GOOD}{twice}")).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = Config::from_toml(&format!("{GOOD}\n[extra]\nx = 1\n")).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
