//! Figures for fluidlet-supernode (docs/benchmarks.md, "Supernode"), over mosquitto with
//! mutual TLS on loopback, in one run:
//!
//! - the face's added latency: a reserve through the face (HTTP POST, the imitation
//!   reference-node client) against RESERVE_FLAVOUR sent directly by a fluidlet-speaking
//!   buyer, alternated, to the same provider;
//! - `GET /api/v2/flavors` with 1,000 providers in the catalog (adverts published through a
//!   site bridge's certificate, which may write any node's catalog entry).
//!
//! cargo run --release -p fluidlet-tests --example supernode_bench [-- ROUNDS]

use fluidlet::model::{Id, Resources};
use fluidlet::wire::{Body, Flavours, Message};
use fluidlet_supernode::{Config, Supernode};
use fluidlet_tests::refnode::{self, k8slice_configuration, Client};
use fluidlet_tests::{domain_sh, flavours, free_port, provider_config, start, Rogue, TlsDomain};
use std::time::{Duration, Instant};

const LIQO_ID: &str = "bench-consumer";

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[v.len() * 9 / 10]))
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let d = TlsDomain::start_with(|dir, _| {
        let d = dir.to_str().expect("utf-8");
        domain_sh(&["supernode", d, "sn1"]);
        domain_sh(&["refnode", d, "sn1", LIQO_ID]);
        domain_sh(&["site", d, "s1", "127.0.0.1", "1", "127.0.0.1"]);
    })
    .expect("mosquitto, openssl and gcc are needed");
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("alice", &d.domain, d.port, pd.path());
    pcfg.tls = Some(d.enrol("alice"));
    pcfg.limits.sender_rate = 1_000_000;
    pcfg.limits.sender_burst = 1_000_000;
    pcfg.limits.pending_per_buyer = 1_000_000;
    pcfg.limits.max_per_buyer = 100;
    if let Some(o) = pcfg.offers.first_mut() {
        o.resources = Resources {
            cpu: 10_000_000,
            memory: 1 << 50,
            pods: 1_000_000,
            storage: 0,
        };
    }
    let alice = start(pcfg, None).await;
    let flavour = flavours(&alice)[0].id.clone();

    let fd = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let addr = format!("127.0.0.1:{http_port}");
    let sn_dir = d.dir.path().join("supernodes/sn1");
    let toml = format!(
        "name = \"sn1\"\ndomain = \"{}\"\ndata_dir = \"{}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {}\nca = \"{s}/domain-ca.pem\"\ncert = \"{s}/supernode.pem\"\nkey = \"{s}/supernode.key\"\n[refs]\ndir = \"{s}/refs\"\n[http]\nlisten = \"{addr}\"\nadvertise = \"{addr}\"\ninsecure_plaintext = true\nrequests_per_second = 100000\nmax_connections = 4096\n",
        d.domain,
        fd.path().display(),
        d.port,
        s = sn_dir.display()
    );
    let sn = Supernode::start(Config::from_toml(&toml).unwrap())
        .await
        .unwrap();
    let me = Client {
        node_id: "bench-node".into(),
        ip: "10.0.0.1:3004".into(),
        domain: "fluidos.eu".into(),
        liqo_id: LIQO_ID.into(),
    };
    let mut f = None;
    for _ in 0..200 {
        if let Ok(l) = me.discover(&addr, None).await {
            if let Some(x) = l.into_iter().next() {
                f = Some(x);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let f = f.expect("the face lists the provider");

    let bob_files = d.enrol("bob");
    let mut bob = Rogue::connect_tls(d.port, &d.domain, "bob", &bob_files).await;
    let piece = Resources {
        cpu: 500,
        memory: 1 << 30,
        pods: 1,
        storage: 0,
    };
    let (mut direct, mut face) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let t = Instant::now();
        bob.send(
            "alice",
            Body::ReserveFlavour(fluidlet::model::ReserveRequest {
                transaction: Id::new(&format!("bob.t{i}")).unwrap(),
                flavour: flavour.clone(),
                buyer: Id::new("bob").unwrap(),
                partition: Some(piece),
            }),
        )
        .await;
        let m = bob.recv().await;
        assert!(matches!(m.body, Body::Reserved(_)), "{:?}", m.body);
        direct.push(t.elapsed());

        // A new transaction each time: another node id of the same reference node.
        let c = Client {
            node_id: format!("bench-node-{i}"),
            ..Client {
                node_id: String::new(),
                ip: me.ip.clone(),
                domain: me.domain.clone(),
                liqo_id: me.liqo_id.clone(),
            }
        };
        // The flavour's current face id (not timed): the face maps only the 64 newest
        // earlier ids of a provider, and every reservation changes the id.
        let cur = me
            .discover(&addr, None)
            .await
            .ok()
            .and_then(|l| l.into_iter().next())
            .unwrap_or_else(|| f.clone());
        let t = Instant::now();
        c.reserve(&cur, Some(k8slice_configuration("500m", "1Gi", "1")))
            .await
            .expect("reserved through the face");
        face.push(t.elapsed());
    }
    let (dm, d90) = stats(direct);
    let (fm, f90) = stats(face);
    println!("reserve, {rounds} rounds alternated, mosquitto with mutual TLS on loopback:");
    println!("  RESERVE_FLAVOUR direct:     median {dm:.2} ms, p90 {d90:.2} ms");
    println!("  POST /api/v2/reservations:  median {fm:.2} ms, p90 {f90:.2} ms");
    println!(
        "  added by the face:          {:.2} ms median ({:.2}x)",
        fm - dm,
        fm / dm
    );

    // 1,000 providers in the catalog, published through the site bridge's certificate.
    let site = d.dir.path().join("sites/s1");
    let bridge = fluidlet::config::TlsFiles {
        ca: site.join("domain-ca.pem"),
        cert: site.join("bridge.pem"),
        key: site.join("bridge.key"),
    };
    let pub_ = Rogue::connect_tls(d.port, &d.domain, "bridge-bench", &bridge).await;
    let mut template = flavours(&alice)[0].clone();
    for i in 0..1000 {
        let p = Id::new(&format!("p{i:04}")).unwrap();
        template.provider = p.clone();
        template.id = Id::new(&format!("pool.{i}")).unwrap();
        let mut list = Flavours::default();
        let _ = list.flavours.0.push(template.clone());
        let m = Message {
            id: i as u64 + 1,
            correlation: None,
            sent_at: fluidlet::unix_ms(),
            sender: p.clone(),
            body: Body::Advert(list),
        };
        pub_.publish(
            &format!("fluidos/v1/{}/catalog/{p}", d.domain),
            true,
            m.encode().unwrap(),
        )
        .await;
    }
    let mut n = 0;
    for _ in 0..400 {
        let a = refnode::request(&addr, "GET", "/api/v2/flavors", None).await;
        n = a.json().as_array().map_or(0, |l| l.len());
        if n >= 1001 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(n >= 1001, "the face lists {n} flavours");
    let mut lists = Vec::new();
    let mut bytes = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let a = refnode::request(&addr, "GET", "/api/v2/flavors", None).await;
        lists.push(t.elapsed());
        bytes = a.body.len();
    }
    let (lm, l90) = stats(lists);
    println!(
        "GET /api/v2/flavors, 1,001 providers: median {lm:.2} ms, p90 {l90:.2} ms, {bytes} bytes"
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    println!(
        "this process (face, provider, clients, 1,001 providers in the face's catalog): {rss}"
    );
    sn.shutdown().await;
    alice.shutdown().await;
}
