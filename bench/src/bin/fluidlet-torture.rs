//! Torture runs with checked invariants: real `fluidlet` provider processes, a real broker
//! (mosquitto), many consumers, and `kill -9` at random moments.
//!
//! `cargo run --release -p fluidlet-bench --bin fluidlet-torture -- [--long]`
//!
//! After each scenario the provider is stopped and its tables are opened and checked:
//! - every reservation a consumer was answered RESERVED for exists on the provider, equal;
//! - a transaction answered twice (a retry after a crash) got the same contract both times;
//! - no transaction holds two contracts, and no capacity is sold twice;
//! - capacity is conserved: the flavour on offer plus the live allocations equal the offer.
//!
//! Exits non-zero if any invariant is broken.

use argh::FromArgs;
use fluidlet::model::{AllocationKind, AllocationStatus, Contract, ContractState, Id, Resources};
use fluidlet::wire::{Body, ErrorCode, Message};
use fluidlet_bench::*;
use fluidlet_tests::{broker, BrokerKind};
use rumqttc::QoS;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Torture runs: racing consumers, and kill -9 of the provider during reservations.
#[derive(FromArgs)]
struct Args {
    /// the long soak counts (100,000 attempts; 200 kills) instead of the quick ones
    #[argh(switch)]
    long: bool,
    /// the gateway binary to run as provider (built into target/bench-agent when absent)
    #[argh(option)]
    agent: Option<PathBuf>,
}

/// What consumers were told: transaction -> the contract answered (the first answer).
type Acked = Arc<Mutex<HashMap<String, Contract>>>;

#[derive(Default)]
struct Tally {
    attempts: u64,
    mismatched_retries: u64,
}

fn main() {
    let args: Args = argh::from_env();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("fluidlet-torture: runtime: {e}"),
    };
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("fluidlet-torture: {e}");
            std::process::exit(2);
        }
    }
}

fn provider_config(node: &str, domain: &str, port: u16, data: &Path, capacity: u64) -> String {
    format!(
        "node_id = \"{node}\"\ndomain = \"{domain}\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ndata_dir = \"{}\"\nlog = \"error\"\n\
         [[offer]]\nid = \"pool\"\narchitecture = \"amd64\"\ncpu_millicores = {capacity}\nmemory = {capacity}\npods = {capacity}\nprice = \"1\"\ncurrency = \"EUR\"\n\
         [offer.partition]\ncpu_min = 1\ncpu_step = 1\nmemory_min = 1\nmemory_step = 1\npods_min = 1\npods_step = 1\n",
        data.display()
    )
}

async fn spawn_provider(
    agent: &Path,
    cfg: &Path,
    node: &str,
    domain: &str,
    port: u16,
) -> Res<Child> {
    // Wait for an advert that this process published: subscribe first, then start it.
    let mut watcher = peer(
        port,
        &format!("w{}@{domain}", fluidlet::unix_ms()),
        &[format!("fluidos/v1/{domain}/catalog/{node}")],
    )
    .await?;
    // Drain what the broker retained from a previous process.
    tokio::time::sleep(Duration::from_millis(50)).await;
    while watcher.rx.try_recv().is_ok() {}
    let child = std::process::Command::new(agent)
        .args(["run", "-c"])
        .arg(cfg)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", agent.display()))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), watcher.rx.recv()).await {
            Ok(Some((_, p, _))) if !p.is_empty() => return Ok(child),
            Ok(Some(_)) => {}
            _ => return Err("restarted provider published no advert in 20 s".into()),
        }
    }
}

/// One consumer: buys unit pieces until the offer is sold out or `until`, retrying a
/// transaction that got no answer (a crash) under the same id.
async fn consumer(
    port: u16,
    domain: String,
    prov: String,
    buyer: String,
    acked: Acked,
    until: Instant,
) -> Res<Tally> {
    let subs = [
        format!("fluidos/v1/{domain}/to/{buyer}/from/{prov}"),
        format!("fluidos/v1/{domain}/catalog/{prov}"),
    ];
    let mut p = peer(port, &format!("{buyer}@{domain}"), &subs).await?;
    let to = format!("fluidos/v1/{domain}/to/{prov}/from/{buyer}");
    let mut tally = Tally::default();
    let mut current: Option<Id> = None;
    let mut sold_out = false;
    let mut tx = 0u64;
    let mut msg_id = 0u64;
    'tx: while Instant::now() < until {
        tx += 1;
        let txs = format!("{buyer}.t{tx}");
        loop {
            if Instant::now() >= until {
                break 'tx;
            }
            // The newest flavour id, from the adverts seen so far.
            while let Ok((topic, payload, _)) = p.rx.try_recv() {
                if topic.contains("/catalog/") {
                    if payload.is_empty() {
                        continue;
                    }
                    current = advert_flavour(&payload, "pool");
                    sold_out = current.is_none();
                }
            }
            if sold_out {
                break 'tx;
            }
            let Some(flavour) = current.clone() else {
                if let Ok(Some((topic, payload, _))) =
                    tokio::time::timeout(Duration::from_secs(2), p.rx.recv()).await
                {
                    if topic.contains("/catalog/") && !payload.is_empty() {
                        current = advert_flavour(&payload, "pool");
                        sold_out = current.is_none();
                    }
                }
                continue;
            };
            msg_id += 1;
            tally.attempts += 1;
            let bytes = reserve_msg(msg_id, &buyer, tx, &flavour);
            if p.client
                .publish(&to, QoS::AtLeastOnce, false, bytes)
                .await
                .is_err()
            {
                continue;
            }
            // The answer, or nothing within a second (the provider may be dead).
            let deadline = Instant::now() + Duration::from_secs(1);
            let answer = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, p.rx.recv()).await {
                    Ok(Some((topic, payload, _))) if topic.contains("/catalog/") => {
                        if !payload.is_empty() {
                            current = advert_flavour(&payload, "pool");
                            sold_out = current.is_none();
                        }
                    }
                    Ok(Some((_, payload, _))) => {
                        if let Ok(m) = Message::decode(&payload) {
                            if m.correlation == Some(msg_id) {
                                break Some(m.body);
                            }
                        }
                    }
                    _ => break None,
                }
            };
            match answer {
                Some(Body::Reserved(c)) => {
                    let mut a = acked.lock().map_err(|_| "poisoned")?;
                    match a.get(&txs) {
                        Some(first) if *first != *c => tally.mismatched_retries += 1,
                        Some(_) => {}
                        None => {
                            a.insert(txs.clone(), *c);
                        }
                    }
                    continue 'tx;
                }
                Some(Body::Error(e))
                    if e.code() == Some(ErrorCode::FlavourGone)
                        || e.code() == Some(ErrorCode::NoFit) =>
                {
                    // Nothing reserved; ask again with the newest flavour.
                    current = None;
                }
                Some(_) => continue 'tx,
                None => {} // no answer: retry the same transaction
            }
        }
    }
    Ok(tally)
}

struct Outcome {
    name: String,
    attempts: u64,
    acked: usize,
    kills: u32,
    violations: Vec<String>,
}

/// Checks the provider's tables against what consumers were told.
fn check(data: &Path, capacity: u64, acked: &HashMap<String, Contract>) -> Res<Vec<String>> {
    let tables = fluidlet::tables::Tables::open(data).map_err(|e| e.to_string())?;
    let mut v = Vec::new();
    let contracts = tables.contracts().map_err(|e| e.to_string())?;
    let by_id: HashMap<&str, &Contract> = contracts.iter().map(|c| (c.id.as_str(), c)).collect();
    for (tx, c) in acked {
        match by_id.get(c.id.as_str()) {
            Some(k)
                if k.transaction == c.transaction
                    && k.resources == c.resources
                    && k.buyer == c.buyer => {}
            Some(_) => v.push(format!(
                "acknowledged contract {} ({tx}) differs on the provider",
                c.id
            )),
            None => v.push(format!(
                "acknowledged contract {} ({tx}) LOST on the provider",
                c.id
            )),
        }
    }
    let mut per_tx: HashMap<(String, String), u32> = HashMap::new();
    for c in &contracts {
        *per_tx
            .entry((c.buyer.to_string(), c.transaction.to_string()))
            .or_default() += 1;
    }
    for ((b, t), n) in per_tx {
        if n > 1 {
            v.push(format!("transaction {t} of {b} holds {n} contracts"));
        }
    }
    let mut held = Resources::default();
    for a in tables.allocations().map_err(|e| e.to_string())? {
        if a.kind == AllocationKind::Node && a.status != AllocationStatus::Released {
            held = held.saturating_add(&a.resources);
        }
    }
    let live = contracts
        .iter()
        .filter(|c| matches!(c.state, ContractState::Reserved | ContractState::Active))
        .count() as u64;
    if held.cpu != live {
        v.push(format!(
            "{live} live contracts but {} units held by allocations",
            held.cpu
        ));
    }
    let on_offer = tables
        .flavours()
        .map_err(|e| e.to_string())?
        .into_iter()
        .fold(Resources::default(), |a, f| {
            a.saturating_add(&f.flavour.resources)
        });
    let total = on_offer.saturating_add(&held);
    let expect = Resources {
        cpu: capacity,
        memory: capacity,
        pods: capacity as u32,
        storage: 0,
    };
    if total != expect {
        v.push(format!(
            "capacity not conserved: on offer {on_offer:?} + held {held:?} != offered {expect:?}"
        ));
    }
    if held.cpu > capacity {
        v.push(format!("OVERBOOKED: {} units sold of {capacity}", held.cpu));
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    name: &str,
    agent: &Path,
    dir: &Path,
    port: u16,
    capacity: u64,
    consumers: usize,
    kills: u32,
    span: Duration,
) -> Res<Outcome> {
    let domain = name.to_owned();
    let node = "prov";
    let data = dir.join(name);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, provider_config(node, &domain, port, &data, capacity))
        .map_err(|e| e.to_string())?;
    let mut child = spawn_provider(agent, &cfg, node, &domain, port).await?;
    let acked: Acked = Arc::default();
    let until = Instant::now() + span;
    let mut tasks = Vec::new();
    for i in 0..consumers {
        let acked = acked.clone();
        let domain = domain.clone();
        tasks.push(tokio::spawn(consumer(
            port,
            domain,
            node.into(),
            format!("c{i}"),
            acked,
            until,
        )));
    }
    // The killer: kill -9 at random moments, restart at once.
    let mut seed = fluidlet::unix_ms() | 1;
    let mut killed = 0;
    while killed < kills && Instant::now() < until {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let pause = Duration::from_millis(20 + seed % 180);
        tokio::time::sleep(pause).await;
        let _ = child.kill();
        let _ = child.wait();
        killed += 1;
        child = spawn_provider(agent, &cfg, node, &domain, port).await?;
    }
    let mut attempts = 0;
    let mut mismatched = 0;
    for t in tasks {
        let tally = t.await.map_err(|e| e.to_string())??;
        attempts += tally.attempts;
        mismatched += tally.mismatched_retries;
    }
    stop(&mut child);
    let acked = acked.lock().map_err(|_| "poisoned")?.clone();
    let mut violations = check(&data, capacity, &acked)?;
    if mismatched > 0 {
        violations.push(format!(
            "{mismatched} retried transactions got a different contract"
        ));
    }
    Ok(Outcome {
        name: name.into(),
        attempts,
        acked: acked.len(),
        kills: killed,
        violations,
    })
}

async fn run(args: Args) -> Res<bool> {
    let agent = match args.agent {
        Some(a) => a,
        None => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "fluidlet",
                    "--no-default-features",
                    "--target-dir",
                    "target/bench-agent",
                ])
                .status()
                .map_err(|e| e.to_string())?
                .success();
            if !ok {
                return Err("building the agent failed".into());
            }
            PathBuf::from("target/bench-agent/release/fluidlet")
        }
    };
    let b =
        broker(BrokerKind::Mosquitto).ok_or("mosquitto is required (apt-get install mosquitto)")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (race_cap, race_span, kills, kill_cap, kill_span) = if args.long {
        (
            110_000,
            Duration::from_secs(700),
            200,
            1_000_000,
            Duration::from_secs(900),
        )
    } else {
        (
            1_500,
            Duration::from_secs(20),
            5,
            1_000_000,
            Duration::from_secs(8),
        )
    };
    println!(
        "fluidlet-torture ({}): mosquitto on 127.0.0.1:{}",
        if args.long { "long" } else { "quick" },
        b.port
    );
    let outcomes = vec![
        scenario(
            "racing",
            &agent,
            dir.path(),
            b.port,
            race_cap,
            8,
            0,
            race_span,
        )
        .await?,
        scenario(
            "kill9",
            &agent,
            dir.path(),
            b.port,
            kill_cap,
            8,
            kills,
            kill_span,
        )
        .await?,
    ];
    println!("\n| scenario | attempts | acknowledged | kills | invariants |\n| --- | --- | --- | --- | --- |");
    let mut ok = true;
    for o in &outcomes {
        let verdict = if o.violations.is_empty() {
            "all hold".to_owned()
        } else {
            ok = false;
            o.violations.join("; ")
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            o.name, o.attempts, o.acked, o.kills, verdict
        );
    }
    Ok(ok)
}
