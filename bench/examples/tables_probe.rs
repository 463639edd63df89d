//! Probes the tables alone, without MQTT, to find where a provider's memory and a consumer's
//! discovery time go (issue 15). Prints figures; asserts nothing.
//!
//!   cargo run --release -p fluidlet-bench --example tables_probe -- reserve 27000
//!   cargo run --release -p fluidlet-bench --example tables_probe -- candidates 10000

use fluidlet::model::{Id, ReserveRequest, Resources};
use fluidlet::tables::{Reservation, Tables};
use std::time::Instant;

fn status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("reserve");
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    rt.block_on(async {
        let me = Id::new("prov").unwrap_or_default();
        let t = Tables::open_for(dir.path(), &me, fluidlet::config::DEFAULT_RETENTION)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{mode} {n}: open: VmRSS {} kB VmHWM {} kB",
            status("VmRSS:"),
            status("VmHWM:")
        );
        match mode {
            "candidates" => candidates(n),
            _ => reserve(&t, &me, n).await,
        }
        println!(
            "end: VmRSS {} kB VmHWM {} kB, on disk {} kB",
            status("VmRSS:"),
            status("VmHWM:"),
            du(dir.path()) / 1024
        );
    });
}

fn du(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => du(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn reserve(t: &Tables, me: &Id, n: usize) {
    let mut offers = Vec::new();
    for i in 0..16 {
        let mut f = fluidlet::demo::demo_offer(me);
        f.id = Id::new(&format!("o{i:02}")).unwrap_or_default();
        f.resources = Resources {
            cpu: 1 << 40,
            memory: 1 << 50,
            pods: 4_000_000_000,
            storage: 0,
        };
        if let Some(p) = f.partitionability.as_mut() {
            (
                p.cpu_min,
                p.cpu_step,
                p.memory_min,
                p.memory_step,
                p.pods_min,
                p.pods_step,
            ) = (1, 1, 1, 1, 1, 1);
        }
        offers.push(f);
    }
    // The default terms of sale: no share cap, one hour.
    let terms = fluidlet::tables::SaleTerms {
        max_per_buyer: 100,
        term_ms: 3_600_000,
    };
    let offers: Vec<_> = offers.into_iter().map(|f| (f, terms)).collect();
    t.sync_offers(&offers)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let piece = Resources {
        cpu: 1,
        memory: 1,
        pods: 1,
        storage: 0,
    };
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        // One group commit of 16, one per offer, as the benchmark's 16 consumers do.
        let own = t.flavours().unwrap_or_default();
        let reqs: Vec<ReserveRequest> = own
            .iter()
            .enumerate()
            .map(|(k, o)| ReserveRequest {
                transaction: Id::new(&format!("t{done}x{k}")).unwrap_or_default(),
                flavour: o.flavour.id.clone(),
                buyer: Id::new(&format!("tp{k:02}")).unwrap_or_default(),
                partition: Some(piece),
            })
            .collect();
        let d = t
            .reserve_batch(me, &reqs, fluidlet::unix_ms(), 600_000, u32::MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        d.written.unwrap_or_else(|e| panic!("{e}"));
        for a in d.answers {
            if !matches!(a, Reservation::New(_)) {
                panic!("{a:?}");
            }
        }
        t.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let before = done;
        done += own.len();
        if done / 3000 != before / 3000 {
            println!(
                "{done}: VmRSS {} kB VmHWM {} kB, {:.1} µs each",
                status("VmRSS:"),
                status("VmHWM:"),
                t0.elapsed().as_secs_f64() * 1e6 / done as f64
            );
        }
    }
}

fn candidates(n: usize) {
    let t = fluidlet::discovery::Candidates::default();
    let t0 = Instant::now();
    let mut last = Instant::now();
    // A scattered order, as the broker's retained messages arrive.
    for j in 0..n {
        let i = (j * 7919) % n;
        let node = Id::new(&format!("sim{i}")).unwrap_or_default();
        let mut f = fluidlet::demo::demo_offer(&node);
        f.id = Id::new(&format!("pool.{i}")).unwrap_or_default();
        t.replace(&node, &[f], fluidlet::unix_ms());
        if (j + 1) % 1000 == 0 {
            println!(
                "{}: {:.1} µs each for the last 1,000 ({:.1} overall), VmRSS {} kB",
                j + 1,
                last.elapsed().as_secs_f64() * 1e3,
                t0.elapsed().as_secs_f64() * 1e6 / (j + 1) as f64,
                status("VmRSS:")
            );
            last = Instant::now();
        }
    }
    let sel = fluidlet_tests::intent_spec("x", 1000, 1).selector;
    let r0 = Instant::now();
    let all = t.all();
    let decoded = r0.elapsed();
    let ranked = fluidlet::discovery::rank(all, &sel, fluidlet::unix_ms(), 60_000, |_| {
        fluidlet::discovery::Standing::default()
    });
    println!(
        "all(): {:.2} ms; rank: {:.2} ms for {} ({} B per Candidate in memory)",
        decoded.as_secs_f64() * 1e3,
        (r0.elapsed() - decoded).as_secs_f64() * 1e3,
        ranked.len(),
        std::mem::size_of::<fluidlet::model::Candidate>()
    );
    let c0 = Instant::now();
    let k = t.count();
    println!(
        "count() = {k} took {:.2} ms",
        c0.elapsed().as_secs_f64() * 1e3
    );
}
