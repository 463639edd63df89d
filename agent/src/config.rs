//! The agent's TOML configuration: defaults, parsing and validation.
//!
//! A gateway's config is written by hand, often over a serial console, so every mistake is
//! reported with the field it concerns and what would be accepted: unknown fields are errors
//! (a misspelt `keepalive_sec` must not silently fall back to a default), sizes accept
//! Kubernetes-style suffixes (`512Mi`, `4Gi`), prices are decimal strings converted to exact
//! millionths. Parsing produces [`Config`], whose fields are already model types: nothing
//! downstream re-validates. See `docs/operations.md` for a commented example.

use crate::fabric::{Backend, FabricConfig};
use crate::model::{
    Flavour, Gpu, Id, Location, Partitionability, Price, Resources, Text, MAX_NODE_ID,
};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `fluidlet` looks for its config when `-c` is not given (the packaged path).
pub const DEFAULT_PATH: &str = "/etc/fluidlet/agent.toml";

/// Largest config file read, in bytes: a config is a few KiB; a huge file is a mistake.
pub const MAX_CONFIG_FILE: u64 = 256 * 1024;
/// Most offers one node may configure (each becomes at most one advertised flavour).
pub const MAX_OFFERS: usize = crate::model::MAX_FLAVOURS;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path} is over {max} bytes, the most accepted for it")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{0}")]
    Parse(String),
    #[error("field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
    /// An error in the file `path` (config or intent file).
    #[error("{}: {inner}", path.display())]
    InFile {
        path: PathBuf,
        inner: Box<ConfigError>,
    },
}

impl ConfigError {
    /// This error, as one in the file `path` (a read error names its file already).
    pub fn in_file(self, path: &Path) -> ConfigError {
        match self {
            e @ (ConfigError::Io { .. }
            | ConfigError::TooLarge { .. }
            | ConfigError::InFile { .. }) => e,
            e => ConfigError::InFile {
                path: path.to_owned(),
                inner: Box::new(e),
            },
        }
    }
}

pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Checks a log filter as `fluidlet run` reads it (tracing's targets syntax): a list of
/// `LEVEL` or `TARGET=LEVEL`, comma-separated. A bare word that is not a level would parse
/// as a target enabled at every level with everything else off, so the agent would log
/// nothing at all: it is refused.
pub fn log_filter(spec: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let level = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
    };
    if spec.trim().is_empty() {
        return Err("is empty: use a level (trace, debug, info, warn, error, off)".into());
    }
    for d in spec.split(',').map(str::trim) {
        let ok = match d.split_once('=') {
            Some((t, l)) => target(t) && level(l),
            None => level(d),
        };
        if !ok {
            return Err(format!(
                "\"{d}\" is not a level (trace, debug, info, warn, error, off) or TARGET=LEVEL \
                 (e.g. \"fluidlet=debug,info\")"
            ));
        }
    }
    Ok(())
}

/// Why [`read_bounded`] failed.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The file holds more than the limit.
    TooLarge,
}

/// Reads a whole file of at most `max` bytes. A longer one is refused without being read past
/// the limit (also if it grows while being read): files named by a config or on the command
/// line never cost more memory than their bound.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max.saturating_add(1)).read_to_end(&mut buf))
        .map_err(ReadError::Io)?;
    if buf.len() as u64 > max {
        return Err(ReadError::TooLarge);
    }
    Ok(buf)
}

/// [`read_bounded`] for UTF-8 text, with errors naming the file (a config, an intent file
/// (bounded like a config), a manifest).
pub fn read_text(path: &Path, max: u64) -> Result<String, ConfigError> {
    let io = |err| ConfigError::Io {
        path: path.to_owned(),
        err,
    };
    let bytes = read_bounded(path, max).map_err(|e| match e {
        ReadError::Io(err) => io(err),
        ReadError::TooLarge => ConfigError::TooLarge {
            path: path.to_owned(),
            max,
        },
    })?;
    String::from_utf8(bytes)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Where the domain broker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

/// The PEM files of mutual TLS to the broker (`[tls]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The domain CA: the broker's certificate must chain to it.
    pub ca: PathBuf,
    /// This node's certificate (chain); its subject CN must be the node id.
    pub cert: PathBuf,
    /// This node's private key; should be readable by its owner only.
    pub key: PathBuf,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: Id,
    pub domain: Id,
    pub broker: BrokerAddr,
    /// Mutual TLS to the broker (`mqtts://`); `None`: plain MQTT (loopback or explicitly
    /// allowed with `insecure_plaintext`).
    pub tls: Option<TlsFiles>,
    /// `[enrol]`: get the certificate from the domain's signer with a one-time token when
    /// there is none yet (the enrol module).
    pub enrol: Option<EnrolConfig>,
    /// Plain MQTT to a broker that is not on loopback was allowed explicitly.
    pub insecure_plaintext: bool,
    pub data_dir: PathBuf,
    /// MQTT keepalive; the broker declares the node dead (and fires its will) after 1.5x.
    pub keepalive: Duration,
    /// `[provider] advert_refresh_secs`: how often the node re-publishes its advert even when
    /// nothing changed (`None`: only on a change and after each connect). Bridged domains need it: a broker cut off from the
    /// others catches up with the live adverts at the next refresh (docs/protocol.md).
    pub advert_refresh: Option<Duration>,
    /// `[consumer] advert_max_age_secs`: adverts older than this (by their `sent_at`) are ignored, and peering candidates not
    /// re-advertised within it are forgotten (`None`: adverts never age). Set it, larger than
    /// the providers' refresh, in a domain of bridged brokers.
    pub advert_max_age: Option<Duration>,
    /// How long to wait for RESERVED before retrying under the same transaction id.
    pub reserve_timeout: Duration,
    /// Attempts per request (first try included) under one id: RESERVE_FLAVOUR of a purchase
    /// resumed after a restart, PEER_REQUEST and RELEASE. A purchase flow sends each
    /// provider one RESERVE_FLAVOUR and moves on after `reserve_timeout` (see [`crate::rear`]).
    pub reserve_attempts: u32,
    /// How long one purchase flow (discovery and reservations) may go on trying providers.
    pub acquire_budget: Duration,
    /// How long a provider that lied to a purchase is ranked after honest ones.
    pub liar_demotion: Duration,
    /// Longest wait for FLAVOURS answers after a LIST_FLAVOURS broadcast.
    pub discovery_window: Duration,
    /// Discovery ends early once no new answer came for this long after the first one.
    pub discovery_settle: Duration,
    /// Keep every provider's retained advert as a peering candidate (the broker as Catalog).
    /// Off: candidates come from LIST_FLAVOURS answers only (less memory in big domains).
    pub watch_catalog: bool,
    /// How long a peering candidate counts as fresh.
    pub candidate_ttl: Duration,
    /// How long a reservation waits for peering before it lapses (provider side).
    pub reservation_ttl: Duration,
    /// Make reservations that arrive together durable with one flush (provider side).
    pub group_commit: bool,
    /// Log filter, `tracing` target syntax (`info`, `fluidlet=debug,info`); `RUST_LOG` wins.
    pub log: String,
    /// What this node sells: one template flavour per offer, id = offer id, total resources.
    pub offers: Vec<Flavour>,
    /// Per-offer terms set in `[[offer]]` (`max_per_buyer`, `contract_term_secs`); offers not
    /// listed, and unset fields, take the node-wide defaults ([`Config::terms_of`]).
    pub offer_terms: std::collections::HashMap<Id, OfferTerms>,
    /// Default length of a contract's term (`[provider] contract_term_secs`): an Active
    /// contract not renewed within it ends and its capacity returns.
    pub contract_term: Duration,
    /// The control socket `fluidlet intent`, `status` and `contract` talk to.
    pub control_socket: PathBuf,
    /// How often lapsed reservations are looked for.
    pub expiry_check: Duration,
    /// How long an ended (released or expired) contract and its transaction record are kept
    /// before they are deleted (docs/protocol.md, "Retention").
    pub retention: Duration,
    /// The Virtual Fabric Manager's backend and tools.
    pub fabric: FabricConfig,
    /// Bounds on what other nodes may make this node do.
    pub limits: Limits,
    /// The Prometheus text file for node_exporter (`[metrics]`).
    pub metrics: MetricsConfig,
}

/// Where and how often the metrics file is written (`[metrics]`, docs/operations.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The file node_exporter's textfile collector reads; `None`: no file is written.
    pub textfile: Option<PathBuf>,
    /// How often it is rewritten.
    pub interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            textfile: None,
            interval: Duration::from_secs(15),
        }
    }
}

/// Bounds on what other nodes may make this node do (`[limits]`). The protocol's own bounds
/// (message size, flavours per advert, candidates per provider) are constants in
/// [`crate::wire`] and [`crate::tables`]; these are policy, so they are configurable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Messages per second one sender may address to this node (discovery broadcasts
    /// included), on average; beyond it they are dropped and the sender is told BUSY once.
    pub sender_rate: u32,
    /// Messages one sender may send at once before the rate applies.
    pub sender_burst: u32,
    /// Reservations one buyer may hold unpeered at once (provider side); more are refused
    /// with TOO_MANY_PENDING until it peers, releases or they lapse.
    pub pending_per_buyer: u32,
    /// Default share of an offer one buyer may hold at once, in percent of the offer's total
    /// (each resource); `[offer] max_per_buyer` overrides it. 100: no cap.
    pub max_per_buyer: u8,
}

/// Terms of one offer (`[[offer]]`), each falling back to the node-wide default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfferTerms {
    /// Percent of the offer's total (each resource) one buyer may hold at once.
    pub max_per_buyer: Option<u8>,
    /// Length of a contract's term.
    pub contract_term: Option<Duration>,
}

/// How long ended contracts are kept by default: 7 days.
/// How often a node re-publishes an unchanged advert by default (`advert_refresh_secs`).
pub const DEFAULT_ADVERT_REFRESH: Duration = Duration::from_secs(300);

pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            sender_rate: 50,
            sender_burst: 100,
            pending_per_buyer: 8,
            max_per_buyer: 100,
        }
    }
}

impl Config {
    /// A consumer-only config with every default; tests and the demo start from it.
    pub fn new(node_id: Id, domain: Id, broker: BrokerAddr, data_dir: PathBuf) -> Config {
        Config {
            control_socket: data_dir.join("control.sock"),
            expiry_check: Duration::from_secs(1),
            retention: DEFAULT_RETENTION,
            fabric: FabricConfig::default(),
            limits: Limits::default(),
            metrics: MetricsConfig::default(),
            node_id,
            domain,
            broker,
            tls: None,
            enrol: None,
            insecure_plaintext: false,
            data_dir,
            keepalive: Duration::from_secs(30),
            advert_refresh: Some(DEFAULT_ADVERT_REFRESH),
            advert_max_age: None,
            reserve_timeout: Duration::from_secs(2),
            reserve_attempts: 3,
            acquire_budget: Duration::from_secs(30),
            liar_demotion: Duration::from_secs(600),
            discovery_window: Duration::from_millis(500),
            discovery_settle: Duration::from_millis(30),
            watch_catalog: true,
            candidate_ttl: Duration::from_secs(120),
            reservation_ttl: Duration::from_secs(600),
            group_commit: true,
            log: "info".into(),
            offers: Vec::new(),
            offer_terms: Default::default(),
            contract_term: Duration::from_secs(3600),
        }
    }

    /// The share cap (percent) and contract term of offer `offer`.
    pub fn terms_of(&self, offer: &Id) -> (u8, Duration) {
        let t = self.offer_terms.get(offer);
        (
            t.and_then(|t| t.max_per_buyer)
                .unwrap_or(self.limits.max_per_buyer),
            t.and_then(|t| t.contract_term)
                .unwrap_or(self.contract_term),
        )
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::from_toml(&read_text(path, MAX_CONFIG_FILE)?).map_err(|e| e.in_file(path))
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        raw.validate()
    }
}

/// A size in bytes: an integer, or a string with a `Ki`/`Mi`/`Gi`/`Ti` (or `k`/`M`/`G`/`T`)
/// suffix.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub(crate) enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    pub(crate) fn bytes(&self, field: &str) -> Result<u64, ConfigError> {
        let s = match self {
            Size::Bytes(b) => return Ok(*b),
            Size::Text(s) => s.trim(),
        };
        let units: [(&str, u64); 8] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ];
        let (num, mult) = units
            .iter()
            .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
            .unwrap_or((s, 1));
        num.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("{s:?} is not a size (bytes, or a number with Ki, Mi, Gi or Ti)"),
                )
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: String,
    domain: String,
    broker: String,
    #[serde(default)]
    insecure_plaintext: bool,
    tls: Option<RawTls>,
    enrol: Option<RawEnrol>,
    data_dir: PathBuf,
    keepalive_secs: Option<u64>,
    retention_secs: Option<u64>,
    log: Option<String>,
    #[serde(default)]
    consumer: RawConsumer,
    #[serde(default)]
    provider: RawProvider,
    #[serde(default, rename = "offer")]
    offers: Vec<RawOffer>,
    control_socket: Option<PathBuf>,
    #[serde(default)]
    fabric: RawFabric,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    textfile: Option<PathBuf>,
    interval_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    sender_rate: Option<u32>,
    sender_burst: Option<u32>,
    pending_per_buyer: Option<u32>,
    max_per_buyer: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// `[enrol]`: where the signer is and where the token is (the enrol module).
#[derive(Clone, Debug, PartialEq)]
pub struct EnrolConfig {
    /// `HOST:PORT` of the signer; HOST must be a name in the broker's certificate.
    pub signer_host: String,
    pub signer_port: u16,
    /// A file holding the one-time token (hex).
    pub token: PathBuf,
    /// The fraction of the certificate's life (from its not-before to its not-after) after
    /// which the running agent gets a new one (crate::enrol::keep_rotated).
    pub renew_at: f64,
}

/// [`EnrolConfig::renew_at`] when the config does not say: two thirds of the life, so that a
/// signer that is down for a while still leaves a third of it to retry in.
pub const RENEW_AT: f64 = 0.66;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrol {
    signer: String,
    token: PathBuf,
    renew_at: Option<f64>,
}

impl RawEnrol {
    fn validate(self, tls: bool) -> Result<EnrolConfig, ConfigError> {
        let bad = |m: String| invalid("enrol", m);
        if !tls {
            return Err(bad(
                "[enrol] needs mqtts:// and a [tls] table (the files it writes)".into(),
            ));
        }
        let (host, port) = self
            .signer
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("signer {:?} is not HOST:PORT", self.signer)))?;
        let port: u16 = port.parse().map_err(|_| {
            bad(format!(
                "signer {:?}: the port is not a number",
                self.signer
            ))
        })?;
        if host.is_empty() || rustls::pki_types::ServerName::try_from(host.to_owned()).is_err() {
            return Err(bad(format!("signer {:?}: not a host name", self.signer)));
        }
        let renew_at = self.renew_at.unwrap_or(RENEW_AT);
        if !(0.1..=0.95).contains(&renew_at) {
            return Err(invalid(
                "enrol.renew_at",
                format!(
                    "{renew_at} is not a fraction of the certificate's life between 0.1 and \
                     0.95 (0.66: a new certificate after two thirds of it)"
                ),
            ));
        }
        Ok(EnrolConfig {
            signer_host: host.to_owned(),
            signer_port: port,
            token: self.token,
            renew_at,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFabric {
    backend: Option<String>,
    kubeconfig: Option<PathBuf>,
    kubectl: Option<PathBuf>,
    liqoctl: Option<PathBuf>,
    command_timeout_secs: Option<u64>,
    peering_timeout_secs: Option<u64>,
    peer_request_timeout_secs: Option<u64>,
    teardown_grace_secs: Option<u64>,
    cluster_id: Option<String>,
    enforce_interval_secs: Option<u64>,
    gateway_service_type: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    reserve_timeout_ms: Option<u64>,
    reserve_attempts: Option<u32>,
    acquire_budget_secs: Option<u64>,
    liar_demotion_secs: Option<u64>,
    discovery_window_ms: Option<u64>,
    discovery_settle_ms: Option<u64>,
    candidate_ttl_secs: Option<u64>,
    watch_catalog: Option<bool>,
    advert_max_age_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    advert_refresh_secs: Option<u64>,
    reservation_ttl_secs: Option<u64>,
    contract_term_secs: Option<u64>,
    group_commit: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOffer {
    id: String,
    architecture: String,
    cpu_millicores: u64,
    memory: Size,
    pods: u32,
    storage: Option<Size>,
    price: String,
    currency: String,
    period: Option<String>,
    partition: Option<RawPartition>,
    gpu: Option<RawGpu>,
    location: Option<RawLocation>,
    max_per_buyer: Option<u8>,
    contract_term_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartition {
    cpu_min: u64,
    cpu_step: u64,
    memory_min: Size,
    memory_step: Size,
    pods_min: u32,
    pods_step: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    model: String,
    cores: u32,
    memory: Size,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocation {
    country: Option<String>,
    city: Option<String>,
    notes: Option<String>,
}

pub(crate) fn text<const N: usize>(field: &str, s: &str) -> Result<Text<N>, ConfigError> {
    Text::new(s).map_err(|e| invalid(field, e.to_string()))
}

fn opt_text<const N: usize>(
    field: &str,
    s: &Option<String>,
) -> Result<Option<Text<N>>, ConfigError> {
    s.as_deref().map(|s| text(field, s)).transpose()
}

pub(crate) fn node_id(field: &str, s: &str) -> Result<Id, ConfigError> {
    if s.len() > MAX_NODE_ID {
        return Err(invalid(
            field,
            format!("{} bytes long, at most {MAX_NODE_ID} allowed", s.len()),
        ));
    }
    Id::new(s).map_err(|e| invalid(field, e.to_string()))
}

fn percent(field: &str, v: u8) -> Result<u8, ConfigError> {
    if !(1..=100).contains(&v) {
        return Err(invalid(field, "a percentage: 1 to 100"));
    }
    Ok(v)
}

fn positive(field: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        return Err(invalid(field, "must be greater than 0"));
    }
    Ok(v)
}

/// Architectures as Kubernetes names them (the node label `kubernetes.io/arch`, GOARCH).
pub const ARCHITECTURES: [&str; 7] = [
    "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64",
];

/// An architecture as Kubernetes names it; the names people also type (`uname -m`, Debian)
/// are taken for the Kubernetes one: x86_64 is amd64, aarch64 is arm64, armv7l / armhf is arm.
pub fn architecture<const N: usize>(field: &str, v: &str) -> Result<Text<N>, ConfigError> {
    let k8s = match v {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" | "arm64v8" => "arm64",
        "armv7" | "armv7l" | "armhf" | "armv6l" => "arm",
        "i386" | "i686" | "x86" => "386",
        other => other,
    };
    if !ARCHITECTURES.contains(&k8s) {
        return Err(invalid(
            field,
            format!(
                "\"{v}\" is not an architecture Kubernetes knows: one of {} (aarch64, x86_64 and armv7l are taken for arm64, amd64 and arm)",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    text(field, k8s)
}

/// An ISO 4217 currency code: three capital letters (`EUR`, `USD`, `CHF`), as the protocol's
/// Price says (docs/protocol.md); buyers compare prices only in one currency.
fn currency(field: &str, v: &str) -> Result<Text<8>, ConfigError> {
    if v.len() != 3 || !v.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            field,
            format!(
                "\"{v}\" is not an ISO 4217 currency code: three capital letters, e.g. \"EUR\""
            ),
        ));
    }
    text(field, v)
}

/// Parses a decimal price (`"1.50"`) into millionths of the currency unit.
pub(crate) fn price_micros(field: &str, s: &str) -> Result<u64, ConfigError> {
    let bad = || {
        invalid(
            field,
            format!("{s:?} is not a price (a decimal number like \"1.50\", at most 6 decimals)"),
        )
    };
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if int.is_empty()
        || frac.len() > 6
        || !(int.chars().chain(frac.chars())).all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    int.checked_mul(1_000_000)
        .and_then(|v| v.checked_add(frac))
        .ok_or_else(bad)
}

/// Parses `mqtt://host[:port]` (port 1883 by default) or `mqtts://host[:port]` (TLS, port
/// 8883 by default); IPv6 hosts in brackets. Returns the address and whether it is TLS.
fn broker_addr(s: &str) -> Result<(BrokerAddr, bool), ConfigError> {
    let (rest, tls) = if let Some(r) = s.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = s.strip_prefix("mqtt://") {
        (r, false)
    } else {
        return Err(invalid(
            "broker",
            format!("{s:?}: expected mqtts://HOST[:PORT] (TLS) or mqtt://HOST[:PORT]"),
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid("broker", "unclosed [ in IPv6 address"))?;
        (h, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("broker", "no host"));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("broker", format!("{p:?} is not a port (1-65535)")))?,
    };
    let addr = BrokerAddr {
        host: host.to_owned(),
        port,
    };
    Ok((addr, tls))
}

/// Whether `host` names this machine (plain MQTT to it never crosses a network).
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl RawOffer {
    fn validate(&self, node: &Id, i: usize) -> Result<Flavour, ConfigError> {
        let f = |name: &str| format!("offer[{i}].{name}");
        let partitionability = match &self.partition {
            None => None,
            Some(p) => Some(Partitionability {
                cpu_min: p.cpu_min,
                memory_min: p.memory_min.bytes(&f("partition.memory_min"))?,
                pods_min: p.pods_min,
                cpu_step: p.cpu_step,
                memory_step: p.memory_step.bytes(&f("partition.memory_step"))?,
                pods_step: p.pods_step,
            }),
        };
        let resources = Resources {
            cpu: positive(&f("cpu_millicores"), self.cpu_millicores)?,
            memory: positive(&f("memory"), self.memory.bytes(&f("memory"))?)?,
            pods: positive(&f("pods"), self.pods as u64)? as u32,
            storage: match &self.storage {
                Some(s) => s.bytes(&f("storage"))?,
                None => 0,
            },
        };
        if let Some(p) = &partitionability {
            if p.cpu_min > resources.cpu
                || p.memory_min > resources.memory
                || p.pods_min > resources.pods
            {
                return Err(invalid(
                    f("partition"),
                    "a minimum piece is larger than the offer itself",
                ));
            }
        }
        Ok(Flavour {
            id: node_id(&f("id"), &self.id)?,
            provider: node.clone(),
            architecture: architecture(&f("architecture"), &self.architecture)?,
            resources,
            gpu: match &self.gpu {
                None => None,
                Some(g) => Some(Gpu {
                    model: text(&f("gpu.model"), &g.model)?,
                    cores: g.cores,
                    memory_bytes: g.memory.bytes(&f("gpu.memory"))?,
                }),
            },
            partitionability,
            price: Price {
                amount: price_micros(&f("price"), &self.price)?,
                currency: currency(&f("currency"), &self.currency)?,
                period: text(&f("period"), self.period.as_deref().unwrap_or("hour"))?,
            },
            available: true,
            location: match &self.location {
                None => None,
                Some(l) => Some(Location {
                    country: opt_text(&f("location.country"), &l.country)?,
                    city: opt_text(&f("location.city"), &l.city)?,
                    notes: opt_text(&f("location.notes"), &l.notes)?,
                }),
            },
        })
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let node = node_id("node_id", &self.node_id)?;
        let (broker, tls) = broker_addr(&self.broker)?;
        let plain_ok = self.insecure_plaintext || is_loopback(&broker.host);
        let mut cfg = Config::new(
            node.clone(),
            node_id("domain", &self.domain)?,
            broker,
            self.data_dir,
        );
        cfg.insecure_plaintext = self.insecure_plaintext;
        match (tls, self.tls) {
            (true, Some(t)) => {
                cfg.tls = Some(TlsFiles {
                    ca: t.ca,
                    cert: t.cert,
                    key: t.key,
                })
            }
            (true, None) => {
                return Err(invalid(
                    "tls",
                    "mqtts:// needs a [tls] table with ca, cert and key (PEM files)",
                ))
            }
            (false, Some(_)) => {
                return Err(invalid(
                    "tls",
                    "a [tls] table was given but the broker is mqtt:// (plain); use mqtts://",
                ))
            }
            (false, None) if !plain_ok => {
                return Err(invalid(
                    "broker",
                    format!(
                        "{:?} is plain MQTT to another machine: anyone on the path can read \
                         and forge this node's messages. Use mqtts:// with a [tls] table, or \
                         set insecure_plaintext = true to accept that",
                        self.broker
                    ),
                ))
            }
            (false, None) => {}
        }
        if let Some(e) = self.enrol {
            cfg.enrol = Some(e.validate(cfg.tls.is_some())?);
        }
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        if let Some(v) = self.keepalive_secs {
            if !(5..=3600).contains(&v) {
                return Err(invalid("keepalive_secs", "must be between 5 and 3600"));
            }
            cfg.keepalive = secs(v);
        }
        if let Some(v) = self.provider.advert_refresh_secs {
            if v != 0 && !(5..=86_400).contains(&v) {
                return Err(invalid(
                    "provider.advert_refresh_secs",
                    "must be 0 (never) or between 5 and 86400",
                ));
            }
            cfg.advert_refresh = (v != 0).then(|| secs(v));
        }
        if let Some(v) = self.consumer.advert_max_age_secs {
            if v != 0 && !(10..=604_800).contains(&v) {
                return Err(invalid(
                    "consumer.advert_max_age_secs",
                    "must be 0 (adverts never age) or between 10 and 604800",
                ));
            }
            cfg.advert_max_age = (v != 0).then(|| secs(v));
        }
        if let (Some(r), Some(a)) = (cfg.advert_refresh, cfg.advert_max_age) {
            if a <= r {
                return Err(invalid(
                    "consumer.advert_max_age_secs",
                    "must be longer than provider.advert_refresh_secs (or a live provider's advert would age out between two refreshes)",
                ));
            }
        }
        if let Some(v) = self.log {
            log_filter(&v).map_err(|why| invalid("log", why))?;
            cfg.log = v;
        }
        let c = &self.consumer;
        if let Some(v) = c.reserve_timeout_ms {
            cfg.reserve_timeout = ms(positive("consumer.reserve_timeout_ms", v)?);
        }
        if let Some(v) = c.reserve_attempts {
            if !(1..=20).contains(&v) {
                return Err(invalid(
                    "consumer.reserve_attempts",
                    "must be between 1 and 20",
                ));
            }
            cfg.reserve_attempts = v;
        }
        if let Some(v) = c.acquire_budget_secs {
            cfg.acquire_budget = secs(positive("consumer.acquire_budget_secs", v)?);
        }
        if let Some(v) = c.liar_demotion_secs {
            cfg.liar_demotion = secs(v);
        }
        if let Some(v) = c.discovery_window_ms {
            cfg.discovery_window = ms(positive("consumer.discovery_window_ms", v)?);
        }
        if let Some(v) = c.discovery_settle_ms {
            cfg.discovery_settle = ms(v);
        }
        if let Some(v) = c.candidate_ttl_secs {
            cfg.candidate_ttl = secs(positive("consumer.candidate_ttl_secs", v)?);
        }
        if let Some(v) = c.watch_catalog {
            cfg.watch_catalog = v;
        }
        if let Some(v) = self.provider.group_commit {
            cfg.group_commit = v;
        }
        if let Some(v) = self.provider.contract_term_secs {
            cfg.contract_term = secs(positive("provider.contract_term_secs", v)?);
        }
        if let Some(v) = self.retention_secs {
            cfg.retention = secs(positive("retention_secs", v)?);
        }
        if let Some(v) = self.provider.reservation_ttl_secs {
            cfg.reservation_ttl = secs(positive("provider.reservation_ttl_secs", v)?);
        }
        if let Some(p) = self.control_socket {
            cfg.control_socket = p;
        }
        let f = &self.fabric;
        match f.backend.as_deref() {
            None | Some("dry-run") => cfg.fabric.backend = Backend::DryRun,
            Some("liqo") => cfg.fabric.backend = Backend::Liqo,
            Some(other) => {
                return Err(invalid(
                    "fabric.backend",
                    format!("{other:?}: expected \"dry-run\" or \"liqo\""),
                ))
            }
        }
        if let Some(v) = &f.kubeconfig {
            cfg.fabric.kubeconfig = v.clone();
        }
        if let Some(v) = &f.kubectl {
            cfg.fabric.kubectl = v.clone();
        }
        if let Some(v) = &f.liqoctl {
            cfg.fabric.liqoctl = v.clone();
        }
        if let Some(v) = f.command_timeout_secs {
            cfg.fabric.command_timeout = secs(positive("fabric.command_timeout_secs", v)?);
        }
        if let Some(v) = f.peering_timeout_secs {
            cfg.fabric.peering_timeout = secs(positive("fabric.peering_timeout_secs", v)?);
        }
        if let Some(v) = f.peer_request_timeout_secs {
            if !(1..=3600).contains(&v) {
                return Err(invalid(
                    "fabric.peer_request_timeout_secs",
                    "must be between 1 and 3600 (seconds)",
                ));
            }
            cfg.fabric.peer_request_timeout = secs(v);
        }
        if let Some(v) = f.teardown_grace_secs {
            if v > 604_800 {
                return Err(invalid(
                    "fabric.teardown_grace_secs",
                    "must be at most 604800 (seconds, one week)",
                ));
            }
            cfg.fabric.teardown_grace = secs(v);
        }
        if let Some(v) = f.enforce_interval_secs {
            cfg.fabric.enforce_every = secs(positive("fabric.enforce_interval_secs", v)?);
        }
        if let Some(v) = &f.gateway_service_type {
            if !crate::fabric::liqo::GATEWAY_SERVICE_TYPES.contains(&v.as_str()) {
                return Err(invalid(
                    "fabric.gateway_service_type",
                    format!(
                        "{v:?} is not one of {:?}",
                        crate::fabric::liqo::GATEWAY_SERVICE_TYPES
                    ),
                ));
            }
            cfg.fabric.gateway_service_type = v.clone();
        }
        if let Some(v) = &f.cluster_id {
            cfg.fabric.cluster_id =
                Some(Id::new(v).map_err(|e| invalid("fabric.cluster_id", e.to_string()))?);
        }
        let l = &self.limits;
        if let Some(v) = l.sender_rate {
            cfg.limits.sender_rate = positive("limits.sender_rate", v.into())? as u32;
        }
        if let Some(v) = l.sender_burst {
            cfg.limits.sender_burst = positive("limits.sender_burst", v.into())? as u32;
        }
        if let Some(v) = l.pending_per_buyer {
            cfg.limits.pending_per_buyer = positive("limits.pending_per_buyer", v.into())? as u32;
        }
        if let Some(v) = l.max_per_buyer {
            cfg.limits.max_per_buyer = percent("limits.max_per_buyer", v)?;
        }
        if let Some(v) = self.metrics.interval_secs {
            if !(1..=3600).contains(&v) {
                return Err(invalid(
                    "metrics.interval_secs",
                    "must be between 1 and 3600",
                ));
            }
            cfg.metrics.interval = secs(v);
        }
        cfg.metrics.textfile = self.metrics.textfile;
        if self.offers.len() > MAX_OFFERS {
            return Err(invalid(
                "offer",
                format!("{} offers, at most {MAX_OFFERS} allowed", self.offers.len()),
            ));
        }
        for (i, o) in self.offers.iter().enumerate() {
            let flavour = o.validate(&node, i)?;
            if cfg.offers.iter().any(|f| f.id == flavour.id) {
                return Err(invalid(
                    format!("offer[{i}].id"),
                    format!("{} is used twice", flavour.id),
                ));
            }
            let terms = OfferTerms {
                max_per_buyer: o
                    .max_per_buyer
                    .map(|v| percent(&format!("offer[{i}].max_per_buyer"), v))
                    .transpose()?,
                contract_term: o
                    .contract_term_secs
                    .map(|v| positive(&format!("offer[{i}].contract_term_secs"), v))
                    .transpose()?
                    .map(secs),
            };
            cfg.offer_terms.insert(flavour.id.clone(), terms);
            cfg.offers.push(flavour);
        }
        // A cap below 100% on an offer sold only whole would make it unsellable.
        for o in &cfg.offers {
            if o.partitionability.is_none() && cfg.terms_of(&o.id).0 < 100 {
                return Err(invalid(
                    "max_per_buyer",
                    format!(
                        "offer {} is sold only whole, so a buyer's share of it is always 100%; \
                         give it a [offer.partition] or max_per_buyer = 100",
                        o.id
                    ),
                ));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn log_filters_that_would_silence_the_agent_are_refused() {
        for ok in ["info", "fluidlet=debug,info", "WARN", "rumqttc=off,debug"] {
            assert_eq!(log_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["verbose+++", "", "fluidlet", "info,chatty", "fluidlet=loud"] {
            let e = log_filter(bad).unwrap_err();
            assert!(e.contains("level") || e.contains("empty"), "{bad}: {e}");
        }
    }

    #[test]
    fn currencies_are_iso_4217_codes_and_architectures_kubernetes_names() {
        assert!(currency("c", "EUR").is_ok());
        for bad in ["euro!", "eur", "EURO", "€"] {
            let e = currency("c", bad).unwrap_err().to_string();
            assert!(e.contains("ISO 4217"), "{bad}: {e}");
        }
        for (typed, k8s) in [
            ("aarch64", "arm64"),
            ("x86_64", "amd64"),
            ("armv7l", "arm"),
            ("arm64", "arm64"),
        ] {
            assert_eq!(architecture::<16>("a", typed).unwrap().as_str(), k8s);
        }
        let e = architecture::<16>("a", "sparc").unwrap_err().to_string();
        assert!(e.contains("amd64, arm64, arm"), "{e}");
    }
    use super::*;

    const GOOD: &str = r#"
node_id = "gw-1"
domain = "d1"
broker = "mqtt://127.0.0.1:1884"
data_dir = "/tmp/x"
keepalive_secs = 10

[consumer]
reserve_timeout_ms = 500

[[offer]]
id = "small"
architecture = "arm64"
cpu_millicores = 2000
memory = "4Gi"
pods = 20
price = "1.5"
currency = "EUR"
[offer.partition]
cpu_min = 500
cpu_step = 250
memory_min = "512Mi"
memory_step = "256Mi"
pods_min = 1
pods_step = 1
"#;

    fn err_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_units_and_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.node_id.as_str(), "gw-1");
        assert_eq!(c.broker.port, 1884);
        assert_eq!(c.keepalive, Duration::from_secs(10));
        assert_eq!(c.reserve_timeout, Duration::from_millis(500));
        assert_eq!(c.reserve_attempts, 3, "default");
        let o = &c.offers[0];
        assert_eq!(o.resources.memory, 4 << 30);
        assert_eq!(o.price.amount, 1_500_000);
        assert_eq!(o.price.period.as_str(), "hour");
        assert_eq!(o.partitionability.as_ref().unwrap().memory_step, 256 << 20);
        assert_eq!(o.provider.as_str(), "gw-1");
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let c = Config::from_toml(include_str!("../../packaging/agent.toml")).unwrap();
        assert_eq!(c.offers.len(), 1);
        assert_eq!(c.offers[0].price.amount, 900_000);
        assert!(c.watch_catalog);
        assert_eq!(
            c.retention, DEFAULT_RETENTION,
            "the example shows the default"
        );
    }

    #[test]
    fn advert_freshness_is_read_and_a_max_age_within_the_refresh_is_refused() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(
            (c.advert_refresh, c.advert_max_age),
            (Some(DEFAULT_ADVERT_REFRESH), None)
        );
        // refresh: [provider] advert_refresh_secs; max age: [consumer] advert_max_age_secs.
        let set = |refresh: &str, max_age: &str| {
            let mut t = GOOD.replace(
                "reserve_timeout_ms = 500",
                &format!("reserve_timeout_ms = 500\n{max_age}"),
            );
            t.push_str(&format!("\n[provider]\n{refresh}\n"));
            t
        };
        let c =
            Config::from_toml(&set("advert_refresh_secs = 5", "advert_max_age_secs = 20")).unwrap();
        assert_eq!(c.advert_refresh, Some(Duration::from_secs(5)));
        assert_eq!(c.advert_max_age, Some(Duration::from_secs(20)));
        let c = Config::from_toml(&set("advert_refresh_secs = 0", "")).unwrap();
        assert_eq!(c.advert_refresh, None);
        let e = err_of(&set("advert_refresh_secs = 60", "advert_max_age_secs = 60"));
        assert!(e.contains("consumer.advert_max_age_secs"), "{e}");
        let e = err_of(&set("advert_refresh_secs = 2", ""));
        assert!(e.contains("provider.advert_refresh_secs"), "{e}");
    }

    #[test]
    fn retention_is_read_and_zero_is_refused() {
        let c = Config::from_toml(&GOOD.replace(
            "keepalive_secs = 10",
            "keepalive_secs = 10\nretention_secs = 60",
        ))
        .unwrap();
        assert_eq!(c.retention, Duration::from_secs(60));
        let e = err_of(&GOOD.replace(
            "keepalive_secs = 10",
            "keepalive_secs = 10\nretention_secs = 0",
        ));
        assert!(e.contains("retention_secs"), "{e}");
    }

    #[test]
    fn metrics_file_is_off_by_default_and_its_interval_is_bounded() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.metrics.textfile, None);
        assert_eq!(c.metrics.interval, Duration::from_secs(15));
        let with = format!("{GOOD}\n[metrics]\ntextfile = \"/m/f.prom\"\ninterval_secs = 5\n");
        let c = Config::from_toml(&with).unwrap();
        assert_eq!(c.metrics.textfile.as_deref(), Some(Path::new("/m/f.prom")));
        assert_eq!(c.metrics.interval, Duration::from_secs(5));
        let e = err_of(&with.replace("interval_secs = 5", "interval_secs = 0"));
        assert!(e.contains("metrics.interval_secs"), "{e}");
    }

    #[test]
    fn misspelt_field_is_an_error_naming_it() {
        let e = err_of(&GOOD.replace("keepalive_secs", "keepalive_sec"));
        assert!(e.contains("keepalive_sec"), "{e}");
    }

    #[test]
    fn node_id_with_a_slash_is_refused_with_the_field_name() {
        let e = err_of(&GOOD.replace("\"gw-1\"", "\"gw/1\""));
        assert!(e.contains("`node_id`") && e.contains("'/'"), "{e}");
    }

    #[test]
    fn bad_size_names_the_offer_field() {
        let e = err_of(&GOOD.replace("\"4Gi\"", "\"4Gx\""));
        assert!(e.contains("offer[0].memory"), "{e}");
    }

    #[test]
    fn bad_price_and_broker_are_explained() {
        assert!(err_of(&GOOD.replace("\"1.5\"", "\"1,5\"")).contains("offer[0].price"));
        assert!(err_of(&GOOD.replace("mqtt://127.0.0.1:1884", "tcp://x")).contains("`broker`"));
        assert!(err_of(&GOOD.replace("1884", "99999")).contains("not a port"));
    }

    #[test]
    fn partition_minimum_above_the_offer_is_refused() {
        let e = err_of(&GOOD.replace("cpu_min = 500", "cpu_min = 5000"));
        assert!(e.contains("offer[0].partition"), "{e}");
    }

    #[test]
    fn offer_terms_fall_back_to_the_node_defaults_and_a_whole_offer_cannot_be_capped() {
        let c = Config::from_toml(&GOOD.replace(
            "currency = \"EUR\"",
            "currency = \"EUR\"\nmax_per_buyer = 25\ncontract_term_secs = 60",
        ))
        .unwrap();
        let small = Id::new("small").unwrap();
        assert_eq!(c.terms_of(&small), (25, Duration::from_secs(60)));
        let other = Id::new("other").unwrap();
        assert_eq!(c.terms_of(&other), (100, Duration::from_secs(3600)));
        let e = err_of(&GOOD.replace(
            "currency = \"EUR\"",
            "currency = \"EUR\"\nmax_per_buyer = 0",
        ));
        assert!(e.contains("offer[0].max_per_buyer"), "{e}");
        let whole = GOOD[..GOOD.find("[offer.partition]").unwrap()].replace(
            "currency = \"EUR\"",
            "currency = \"EUR\"\nmax_per_buyer = 50",
        );
        assert!(err_of(&whole).contains("sold only whole"));
    }

    #[test]
    fn peering_timeouts_are_checked_and_name_their_field() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.fabric.peering_timeout, Duration::from_secs(300));
        assert_eq!(c.fabric.peer_request_timeout, Duration::from_secs(120));
        assert_eq!(c.fabric.teardown_grace, Duration::from_secs(600));
        let with = |f: &str| format!("{GOOD}\n[fabric]\n{f}\n");
        let c = Config::from_toml(&with(
            "peer_request_timeout_secs = 90\nteardown_grace_secs = 0",
        ))
        .unwrap();
        assert_eq!(c.fabric.peer_request_timeout, Duration::from_secs(90));
        assert_eq!(c.fabric.teardown_grace, Duration::ZERO);
        let e = err_of(&with("peer_request_timeout_secs = 0"));
        assert!(
            e.contains("fabric.peer_request_timeout_secs") && e.contains("seconds"),
            "{e}"
        );
        let e = err_of(&with("teardown_grace_secs = 700000"));
        assert!(e.contains("fabric.teardown_grace_secs"), "{e}");
    }

    #[test]
    fn duplicate_offer_ids_are_refused() {
        let twice = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[offer]]").unwrap()..]);
        assert!(err_of(&twice).contains("used twice"));
    }

    #[test]
    fn files_over_their_bound_are_refused_without_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![b'x'; 101]).unwrap();
        assert!(matches!(read_bounded(&p, 100), Err(ReadError::TooLarge)));
        assert_eq!(read_bounded(&p, 101).unwrap().len(), 101);
        let e = read_text(&p, 100).unwrap_err().to_string();
        assert!(e.contains("is over 100 bytes"), "{e}");
        let e = read_text(&dir.path().join("none"), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn prices_are_exact_millionths() {
        assert_eq!(price_micros("p", "0.000001").unwrap(), 1);
        assert_eq!(price_micros("p", "12").unwrap(), 12_000_000);
        assert!(price_micros("p", "1.0000001").is_err());
        assert!(price_micros("p", "-1").is_err());
        assert!(price_micros("p", "99999999999999999").is_err(), "overflow");
    }

    #[test]
    fn broker_addresses_parse_with_default_port_and_ipv6() {
        assert_eq!(broker_addr("mqtt://gw").unwrap().0.port, 1883);
        assert_eq!(
            broker_addr("mqtts://gw").unwrap(),
            (
                BrokerAddr {
                    host: "gw".into(),
                    port: 8883
                },
                true
            )
        );
        let (v6, _) = broker_addr("mqtt://[::1]:1999").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1999));
    }

    const TLS: &str = "\n[tls]\nca = \"/e/ca.pem\"\ncert = \"/e/n.pem\"\nkey = \"/e/n.key\"\n";

    #[test]
    fn plain_mqtt_to_another_machine_is_refused_unless_explicitly_allowed() {
        let remote = GOOD.replace("mqtt://127.0.0.1:1884", "mqtt://broker.lan");
        let e = err_of(&remote);
        assert!(
            e.contains("insecure_plaintext") && e.contains("mqtts://"),
            "{e}"
        );
        let allowed = remote.replace(
            "keepalive_secs = 10",
            "keepalive_secs = 10\ninsecure_plaintext = true",
        );
        let c = Config::from_toml(&allowed).unwrap();
        assert!(c.insecure_plaintext && c.tls.is_none());
        for local in ["mqtt://localhost", "mqtt://127.0.0.2:1883", "mqtt://[::1]"] {
            assert!(
                Config::from_toml(&GOOD.replace("mqtt://127.0.0.1:1884", local)).is_ok(),
                "{local}"
            );
        }
    }

    #[test]
    fn mqtts_needs_the_tls_table_and_the_tls_table_needs_mqtts() {
        let tls = GOOD.replace("mqtt://127.0.0.1:1884", "mqtts://broker.lan");
        assert!(err_of(&tls).contains("[tls]"));
        let with = tls.replace("keepalive_secs = 10", &format!("keepalive_secs = 10{TLS}"));
        // The [tls] table must come before other tables: put it right after the top keys.
        let c = Config::from_toml(&with).unwrap();
        assert_eq!(c.broker.port, 8883);
        assert_eq!(c.tls.unwrap().key, PathBuf::from("/e/n.key"));
        let plain = GOOD.replace("keepalive_secs = 10", &format!("keepalive_secs = 10{TLS}"));
        assert!(err_of(&plain).contains("mqtts://"));
    }
}
