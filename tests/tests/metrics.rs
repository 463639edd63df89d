//! The metrics a running provider exports: the Prometheus text file node_exporter reads,
//! parsed with a real text-format parser (`prometheus-parse`), and `fluidlet status --json`.

use fluidlet::model::{Id, ReserveRequest, Resources};
use fluidlet::wire::{Body, ErrorCode};
use fluidlet_tests::*;
use prometheus_parse::{LineInfo, Scrape, Value};
use std::path::Path;
use std::time::Duration;

const GI: u64 = 1 << 30;

fn reserve(tx: &str, flavour: &Id, cpu: u64) -> Body {
    Body::ReserveFlavour(ReserveRequest {
        transaction: Id::new(tx).unwrap(),
        flavour: flavour.clone(),
        buyer: Id::new("rogue").unwrap(),
        partition: Some(Resources {
            cpu,
            memory: GI,
            pods: 1,
            storage: 0,
        }),
    })
}

/// Parses the file; every line must be a comment or a sample the parser understands.
fn scrape(path: &Path) -> Option<Scrape> {
    let text = std::fs::read_to_string(path).ok()?;
    for line in text.lines() {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "line the Prometheus parser cannot read: {line:?}"
        );
    }
    Some(Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses"))
}

/// The value of the sample `metric` whose labels include `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<Value> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| x.value.clone())
}

#[tokio::test]
async fn the_metrics_file_counts_what_the_provider_did() {
    let Some(b) = broker(BrokerKind::Mosquitto).or_else(|| broker(BrokerKind::Embedded)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let prom = dir.path().join("collector").join("fluidlet.prom");
    std::fs::create_dir_all(prom.parent().unwrap()).unwrap();
    let mut cfg = provider_config("prov", &d, b.port, dir.path());
    cfg.metrics.textfile = Some(prom.clone());
    cfg.metrics.interval = Duration::from_secs(1);
    let socket = cfg.control_socket.clone();
    let p = start(cfg, None).await;
    let mut r = Rogue::connect(b.port, &d, "rogue").await;

    // Two reservations, the first one repeated, and one that does not fit (4 CPUs offered).
    let f = flavours(&p)[0].clone();
    r.send("prov", reserve("rogue.t1", &f.id, 1000)).await;
    assert!(matches!(r.recv().await.body, Body::Reserved(_)));
    r.send("prov", reserve("rogue.t1", &f.id, 1000)).await;
    assert!(matches!(r.recv().await.body, Body::Reserved(_)));
    let f = flavours(&p)[0].clone();
    r.send("prov", reserve("rogue.t2", &f.id, 1000)).await;
    assert!(matches!(r.recv().await.body, Body::Reserved(_)));
    let f = flavours(&p)[0].clone();
    r.send("prov", reserve("rogue.t3", &f.id, 4000)).await;
    let Body::Error(e) = r.recv().await.body else {
        panic!("4 CPUs of the 2 left were not refused")
    };
    assert_eq!(e.code(), Some(ErrorCode::NoFit));

    // The file is rewritten every second: wait for one written after the four answers.
    let mut got = None;
    for _ in 0..100 {
        if let Some(s) = scrape(&prom) {
            let answered = value(&s, "fluidlet_reservation_duration_seconds", &[]);
            if matches!(&answered, Some(Value::Histogram(h)) if h.last().is_some_and(|b| b.count == 4.0))
            {
                got = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = got.expect("a metrics file counting 4 answered reservations");
    let node = [("node", "prov")];
    assert_eq!(
        value(&s, "fluidlet_reservations_total", &node),
        Some(Value::Counter(2.0))
    );
    assert_eq!(
        value(&s, "fluidlet_reservation_repeats_total", &node),
        Some(Value::Counter(1.0))
    );
    assert_eq!(
        value(
            &s,
            "fluidlet_reservation_refusals_total",
            &[("code", "NO_FIT")]
        ),
        Some(Value::Counter(1.0))
    );
    assert_eq!(
        value(
            &s,
            "fluidlet_reservation_refusals_total",
            &[("code", "FLAVOUR_GONE")]
        ),
        Some(Value::Counter(0.0))
    );
    assert_eq!(
        value(&s, "fluidlet_contracts", &[("state", "reserved")]),
        Some(Value::Gauge(2.0))
    );
    assert_eq!(
        value(&s, "fluidlet_table_records", &[("table", "contracts")]),
        Some(Value::Gauge(2.0))
    );
    assert_eq!(
        value(&s, "fluidlet_broker_connected", &node),
        Some(Value::Gauge(1.0))
    );
    assert_eq!(
        value(
            &s,
            "fluidlet_messages_dropped_total",
            &[("reason", "queue_full")]
        ),
        Some(Value::Counter(0.0))
    );
    let Some(Value::Gauge(rss)) = value(&s, "fluidlet_resident_memory_bytes", &node) else {
        panic!("no RSS gauge")
    };
    assert!(rss > 0.0);
    // Buckets are cumulative and end with +Inf.
    let Some(Value::Histogram(h)) = value(&s, "fluidlet_reservation_duration_seconds", &node)
    else {
        panic!("no latency histogram")
    };
    assert!(h.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(h.last().map(|b| b.less_than), Some(f64::INFINITY));
    // No temporary file is left in the collector's directory.
    let names: Vec<_> = std::fs::read_dir(prom.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["fluidlet.prom"]);

    // `fluidlet status --json` shows the same counters.
    let mut out = Vec::new();
    fluidlet::cli::status(Path::new("unused"), Some(&socket), true, &mut out)
        .await
        .expect("status");
    let json: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    let m = &json["metrics"];
    assert_eq!(m["reservations"], 2);
    assert_eq!(m["reservation_repeats"], 1);
    let no_fit = m["reservation_refusals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == "NO_FIT")
        .unwrap();
    assert_eq!(no_fit["count"], 1);
    assert_eq!(m["reservation_latency"]["count"], 4);
    p.shutdown().await;
}
