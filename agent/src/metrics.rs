//! Metrics a gateway operator can scrape without a server on the device.
//!
//! The hot paths only touch atomics ([`Metrics`]): a reservation answered adds one to a
//! counter and one to a latency bucket, nothing is formatted or allocated. A [`Snapshot`] is
//! taken when someone asks: `fluidlet status --json` (over the control socket), and every
//! `metrics.interval_secs` by [`export`], which writes the Prometheus text exposition format
//! to `metrics.textfile` for node_exporter's textfile collector, atomically (a temporary file
//! in the same directory, then a rename), so the collector never reads half a file.
//!
//! Every metric, its type, labels and meaning are listed in docs/operations.md.

use crate::model::ContractState;
use crate::tables::Tables;
use crate::wire::ErrorCode;
use minicbor::{Decode, Encode};
use std::fmt::{Display, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

/// Upper bounds of the reservation latency buckets, in microseconds (the `le` labels, in
/// seconds, are these divided by 10^6); a last bucket `+Inf` takes the rest.
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// Error codes a refusal is counted under: every [`ErrorCode`] (1..=15), by its number.
const CODES: usize = 16;

/// Why a message was dropped by a bound instead of being handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The node's inbound queue (`broker::INBOUND_QUEUE`) was full.
    QueueFull,
    /// Its sender was over `limits.sender_rate` (and had already been told BUSY).
    RateLimit,
    /// The catalog backlog (`broker::CATALOG_BACKLOG_BYTES`) was full.
    CatalogBacklog,
}

const DROPS: [(Dropped, &str); 3] = [
    (Dropped::QueueFull, "queue_full"),
    (Dropped::RateLimit, "rate_limit"),
    (Dropped::CatalogBacklog, "catalog_backlog"),
];

/// The node's counters, updated with relaxed atomics where things happen.
#[derive(Default)]
pub struct Metrics {
    reservations: AtomicU64,
    repeats: AtomicU64,
    refusals: [AtomicU64; CODES],
    latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    latency_sum_us: AtomicU64,
    dropped: [AtomicU64; 3],
    /// The not-after of the certificate in use, unix seconds; 0 without TLS.
    certificate_not_after: AtomicU64,
    /// Certificates replaced by a rotation since start (crate::enrol).
    certificate_rotations: AtomicU64,
}

/// What a RESERVE_FLAVOUR was answered with, for [`Metrics::reservation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A new contract (RESERVED, durable).
    New,
    /// A repeated transaction: the first answer again.
    Repeat,
    /// ERROR with this code.
    Refused(ErrorCode),
}

impl Metrics {
    /// One RESERVE_FLAVOUR answered `answer`, `took` after it was taken from the queue.
    pub fn reservation(&self, answer: Answer, took: Duration) {
        match answer {
            Answer::New => self.reservations.fetch_add(1, Ordering::Relaxed),
            Answer::Repeat => self.repeats.fetch_add(1, Ordering::Relaxed),
            Answer::Refused(code) => {
                let i = (code as usize).min(CODES - 1);
                self.refusals[i].fetch_add(1, Ordering::Relaxed)
            }
        };
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// One message dropped by a bound.
    pub fn dropped(&self, why: Dropped) {
        let i = DROPS.iter().position(|(d, _)| *d == why).unwrap_or(0);
        self.dropped[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The certificate now in use ends at `not_after` (unix seconds).
    pub fn certificate(&self, not_after: u64) {
        self.certificate_not_after
            .store(not_after, Ordering::Relaxed);
    }

    /// A rotation replaced the certificate by one that ends at `not_after`.
    pub fn rotated(&self, not_after: u64) {
        self.certificate(not_after);
        self.certificate_rotations.fetch_add(1, Ordering::Relaxed);
    }

    fn counters(&self) -> Counters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let refusals = (1..CODES as u16)
            .filter_map(ErrorCode::from_u16)
            .map(|c| CodeCount {
                code: c.name().to_owned(),
                count: load(&self.refusals[c as usize]),
            })
            .collect();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_US.len() + 1);
        for (i, n) in self.latency.iter().enumerate() {
            cumulative += load(n);
            buckets.push(Bucket {
                le_us: LATENCY_BOUNDS_US.get(i).copied(),
                count: cumulative,
            });
        }
        Counters {
            reservations: load(&self.reservations),
            repeats: load(&self.repeats),
            refusals,
            latency: Histogram {
                buckets,
                sum_us: load(&self.latency_sum_us),
                count: cumulative,
            },
            dropped: DROPS
                .iter()
                .zip(&self.dropped)
                .map(|((_, name), n)| Named {
                    name: (*name).to_owned(),
                    value: load(n),
                })
                .collect(),
        }
    }
}

/// Refusals under one error code.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct CodeCount {
    #[n(0)]
    pub code: String,
    #[n(1)]
    pub count: u64,
}

/// A labelled value (a table's records, a contract state's count, a drop reason's count).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Named {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub value: u64,
}

/// One cumulative histogram bucket: observations at most `le_us` microseconds (`None`: all).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Bucket {
    #[n(0)]
    pub le_us: Option<u64>,
    #[n(1)]
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Histogram {
    #[n(0)]
    pub buckets: Vec<Bucket>,
    #[n(1)]
    pub sum_us: u64,
    #[n(2)]
    pub count: u64,
}

struct Counters {
    reservations: u64,
    repeats: u64,
    refusals: Vec<CodeCount>,
    latency: Histogram,
    dropped: Vec<Named>,
}

/// Every metric at one moment, as `fluidlet status --json` shows it under `metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Snapshot {
    /// New contracts acknowledged (provider side).
    #[n(0)]
    pub reservations: u64,
    /// Repeated transactions answered with their first contract again.
    #[n(1)]
    pub reservation_repeats: u64,
    /// RESERVE_FLAVOURs answered with ERROR, by code.
    #[n(2)]
    pub reservation_refusals: Vec<CodeCount>,
    /// From RESERVE_FLAVOUR taken from the inbound queue to its answer handed to the client.
    #[n(3)]
    pub reservation_latency: Histogram,
    /// Contracts in the table, by state (both sides).
    #[n(4)]
    pub contracts: Vec<Named>,
    /// Records per table.
    #[n(5)]
    pub tables: Vec<Named>,
    /// VmRSS and VmHWM of the agent, in bytes (`None` where /proc is missing).
    #[n(6)]
    pub rss_bytes: Option<u64>,
    #[n(7)]
    pub rss_peak_bytes: Option<u64>,
    #[n(8)]
    pub broker_connected: bool,
    /// Connections made to the broker since start.
    #[n(9)]
    pub broker_connects: u64,
    /// Messages dropped by a bound, by reason.
    #[n(10)]
    pub dropped: Vec<Named>,
    /// When the certificate in use expires, unix seconds (`None` without TLS).
    #[n(11)]
    pub certificate_not_after: Option<u64>,
    /// Certificates replaced by a rotation since start.
    #[n(12)]
    pub certificate_rotations: u64,
}

/// Reads a `kB` field of /proc/self/status, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .get(field.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Takes a snapshot of a running node's metrics (scans the contracts and counts each table:
/// for the status command and the exporter, never on the reservation path).
/// `connected` and `connects` are the broker session's (`broker::Status`); passed in so that
/// this module imports neither the broker nor `Shared` (which both hold a [`Metrics`]).
pub(crate) fn snapshot(
    metrics: &Metrics,
    tables: &Tables,
    candidates: usize,
    connected: bool,
    connects: u64,
) -> Snapshot {
    let c = metrics.counters();
    let mut by_state = [0u64; 4];
    // One contract decoded at a time: a long history is not materialised every interval.
    if let Err(e) = tables.each_contract(|c| by_state[c.state as usize] += 1) {
        warn!(error = %e, "cannot count contracts for the metrics");
    }
    let states = [
        (ContractState::Reserved, "reserved"),
        (ContractState::Active, "active"),
        (ContractState::Released, "released"),
        (ContractState::Expired, "expired"),
    ];
    Snapshot {
        reservations: c.reservations,
        reservation_repeats: c.repeats,
        reservation_refusals: c.refusals,
        reservation_latency: c.latency,
        contracts: states
            .iter()
            .map(|(s, name)| Named {
                name: (*name).to_owned(),
                value: by_state[*s as usize],
            })
            .collect(),
        tables: tables
            .sizes(candidates)
            .into_iter()
            .map(|(name, n)| Named {
                name: name.to_owned(),
                value: n as u64,
            })
            .collect(),
        rss_bytes: proc_status_bytes("VmRSS:"),
        rss_peak_bytes: proc_status_bytes("VmHWM:"),
        broker_connected: connected,
        broker_connects: connects,
        dropped: c.dropped,
        certificate_not_after: Some(metrics.certificate_not_after.load(Ordering::Relaxed))
            .filter(|t| *t != 0),
        certificate_rotations: metrics.certificate_rotations.load(Ordering::Relaxed),
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Seconds from microseconds, printed exactly (no float rounding): `1500` -> `0.0015`.
fn seconds(us: u64) -> String {
    let s = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The snapshot in the Prometheus text exposition format (version 0.0.4), with the node's
/// id as label `node` on every sample.
pub fn render(s: &Snapshot, node: &str) -> String {
    let mut o = String::with_capacity(4096);
    // Ids are A-Z a-z 0-9 . _ - (crate::model::Id): nothing in them needs escaping.
    let n = node;
    let o = &mut o;
    single(
        o,
        n,
        "fluidlet_reservations_total",
        "counter",
        "New contracts this node acknowledged as a provider (RESERVED, durable).",
        s.reservations,
    );
    single(
        o,
        n,
        "fluidlet_reservation_repeats_total",
        "counter",
        "Repeated RESERVE_FLAVOUR transactions answered with their first contract again.",
        s.reservation_repeats,
    );
    labelled(
        o,
        n,
        "fluidlet_reservation_refusals_total",
        "counter",
        "RESERVE_FLAVOUR requests answered with ERROR, by error code.",
        "code",
        s.reservation_refusals.iter().map(|r| (&r.code, r.count)),
    );
    family(
        o,
        "fluidlet_reservation_duration_seconds",
        "histogram",
        "From a RESERVE_FLAVOUR taken from the inbound queue to its answer queued for the broker (flush included).",
    );
    let h = &s.reservation_latency;
    for b in &h.buckets {
        let le = b.le_us.map_or_else(|| "+Inf".to_owned(), seconds);
        let _ = writeln!(
            o,
            "fluidlet_reservation_duration_seconds_bucket{{node=\"{n}\",le=\"{le}\"}} {}",
            b.count
        );
    }
    let _ = writeln!(
        o,
        "fluidlet_reservation_duration_seconds_sum{{node=\"{n}\"}} {}",
        seconds(h.sum_us)
    );
    let _ = writeln!(
        o,
        "fluidlet_reservation_duration_seconds_count{{node=\"{n}\"}} {}",
        h.count
    );
    labelled(
        o,
        n,
        "fluidlet_contracts",
        "gauge",
        "Contracts in this node's table (bought and sold), by state.",
        "state",
        s.contracts.iter().map(|c| (&c.name, c.value)),
    );
    labelled(
        o,
        n,
        "fluidlet_table_records",
        "gauge",
        "Records in each of this node's tables.",
        "table",
        s.tables.iter().map(|t| (&t.name, t.value)),
    );
    if let Some(v) = s.rss_bytes {
        single(
            o,
            n,
            "fluidlet_resident_memory_bytes",
            "gauge",
            "Resident set size of the agent (VmRSS).",
            v,
        );
    }
    if let Some(v) = s.rss_peak_bytes {
        single(
            o,
            n,
            "fluidlet_resident_memory_peak_bytes",
            "gauge",
            "Largest resident set size of the agent since it started (VmHWM).",
            v,
        );
    }
    single(
        o,
        n,
        "fluidlet_broker_connected",
        "gauge",
        "1 while the MQTT session with the domain broker is up, else 0.",
        u8::from(s.broker_connected),
    );
    single(
        o,
        n,
        "fluidlet_broker_reconnects_total",
        "counter",
        "Connections to the domain broker after the first one.",
        s.broker_connects.saturating_sub(1),
    );
    labelled(
        o,
        n,
        "fluidlet_messages_dropped_total",
        "counter",
        "Inbound messages dropped by a bound instead of handled, by reason.",
        "reason",
        s.dropped.iter().map(|d| (&d.name, d.value)),
    );
    if let Some(t) = s.certificate_not_after {
        single(
            o,
            n,
            "fluidlet_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the certificate this node connects with expires (its not-after), unix seconds.",
            t,
        );
        single(
            o,
            n,
            "fluidlet_certificate_rotations_total",
            "counter",
            "Certificates replaced by a rotation (a new key and certificate from the signer) since start.",
            s.certificate_rotations,
        );
    }
    std::mem::take(o)
}

/// A family with one sample, labelled with the node only.
fn single(out: &mut String, node: &str, name: &str, kind: &str, help: &str, v: impl Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name}{{node=\"{node}\"}} {v}");
}

/// A family with one sample per item, labelled with the node and `label`.
fn labelled<'a>(
    out: &mut String,
    node: &str,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    items: impl Iterator<Item = (&'a String, u64)>,
) {
    family(out, name, kind, help);
    for (value, count) in items {
        let _ = writeln!(out, "{name}{{node=\"{node}\",{label}=\"{value}\"}} {count}");
    }
}

/// Writes `text` to `path` atomically: a temporary file in the same directory (a dot name
/// without the `.prom` suffix, so node_exporter never reads it), readable by others (the
/// collector runs as another user), then renamed over `path`.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        // The agent's umask is 077 (owner-only files); the collector must read this one.
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        }
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes the metrics of node `node`, as `take` gives them, to `path` every `interval` until
/// `stop`, and once more at the end.
pub(crate) async fn export(
    path: PathBuf,
    interval: Duration,
    node: String,
    take: impl Fn() -> Snapshot,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        // Cancel safety: a tick has no state; the write happens after select! has chosen.
        let last = tokio::select! {
            _ = stop.changed() => true,
            _ = tick.tick() => false,
        };
        let text = render(&take(), &node);
        match write_atomically(&path, &text) {
            Ok(()) => failing = false,
            // Said once per run of failures, not every interval.
            Err(e) if !failing => {
                failing = true;
                warn!(file = %path.display(), error = %e, "cannot write the metrics file");
            }
            Err(_) => {}
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_whose_bound_covers_it() {
        let m = Metrics::default();
        m.reservation(Answer::New, Duration::from_micros(250));
        m.reservation(Answer::New, Duration::from_micros(251));
        m.reservation(Answer::Refused(ErrorCode::NoFit), Duration::from_secs(5));
        let c = m.counters();
        assert_eq!(c.latency.buckets[0].count, 1, "250 µs is within le=0.00025");
        assert_eq!(
            c.latency.buckets[1].count, 2,
            "cumulative: 251 µs within 0.0005"
        );
        let inf = c.latency.buckets.last().unwrap();
        assert_eq!((inf.le_us, inf.count), (None, 3));
        assert_eq!(c.latency.sum_us, 250 + 251 + 5_000_000);
        assert_eq!(c.reservations, 2);
        let no_fit = c.refusals.iter().find(|r| r.code == "NO_FIT").unwrap();
        assert_eq!(no_fit.count, 1);
    }

    #[test]
    fn seconds_are_printed_exactly() {
        assert_eq!(seconds(250), "0.00025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(1_500_000), "1.5");
        assert_eq!(seconds(0), "0");
    }

    #[test]
    fn every_error_code_has_a_refusal_series() {
        let c = Metrics::default().counters();
        assert_eq!(c.refusals.len(), 15);
        assert!(c.refusals.iter().any(|r| r.code == "TOO_MANY_PENDING"));
    }

    #[test]
    fn the_file_is_replaced_whole_and_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fluidlet.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["fluidlet.prom"], "no temporary file left behind");
    }
}
