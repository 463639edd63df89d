//! `fluidlet demo`: the seed workflow "two nodes, same domain" in one process, with no setup.
//!
//! An embedded MQTT broker (rumqttd) listens on a free loopback port; a provider and a
//! consumer, each with its own sled directory under a fresh temporary directory, run as two
//! [`Agent`]s that talk only through that broker, exactly as two gateways would. The
//! consumer acquires a flavour; every workflow step is printed as it happens, then a summary
//! of both nodes' tables. This module is behind the `demo` cargo feature: rumqttd adds about
//! 1.5 MB and ~190 crates, which a gateway build leaves out.
//!
//! The embedded broker is also what the integration tests use. rumqttd has no shutdown API,
//! so there is one broker per process, started on first use ([`embedded_broker`]); tests
//! isolate themselves by domain instead.

use crate::config::BrokerAddr;
use crate::model::{Flavour, FlavourSelector, Id, IntentState, LongText, Resources, Text};
use crate::orchestrator::IntentSpec;
use crate::wire::MAX_PACKET;
use crate::{Agent, AgentError, Config, Observer, Step};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `println!` that ignores a closed stdout: `fluidlet demo | head` must not panic (the demo
/// goes on to its end and exits as usual).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

static BROKER: OnceLock<Result<u16, String>> = OnceLock::new();

/// The process-wide embedded broker's loopback port, starting it on first call.
pub fn embedded_broker() -> Result<u16, AgentError> {
    BROKER
        .get_or_init(start_broker)
        .clone()
        .map_err(AgentError::Broker)
}

fn start_broker() -> Result<u16, String> {
    // rumqttd cannot report the port it bound for port 0: pick a free one first.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))?
        .port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: MAX_PACKET,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        // RouterConfig::default() allows zero connections: every limit is set here.
        router: rumqttd::RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 512,
            max_segment_size: 1 << 20,
            max_segment_count: 16,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| format!("cannot start the embedded broker thread: {e}"))?;
    // The listener comes up a few milliseconds after start().
    for _ in 0..200 {
        if TcpStream::connect(listen).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!(
        "embedded broker did not listen on {listen} within 2 s"
    ))
}

pub use crate::model::{demo_offer, k8s_arch};

/// A node config for the demo broker on `port`.
pub fn demo_config(node: &str, domain: &str, port: u16, dir: &Path) -> Result<Config, AgentError> {
    let id = |s: &str| Id::new(s).map_err(|e| AgentError::Other(format!("{s}: {e}")));
    let mut cfg = Config::new(
        id(node)?,
        id(domain)?,
        BrokerAddr {
            host: "127.0.0.1".into(),
            port,
        },
        dir.join(node),
    );
    cfg.keepalive = Duration::from_secs(5);
    Ok(cfg)
}

/// Runs the demo and prints it; returns the number of workflow steps seen.
pub async fn run() -> Result<usize, AgentError> {
    let t0 = Instant::now();
    // FLUIDLET_DEMO_BROKER_PORT: run the demo through another broker on loopback (to compare
    // brokers); by default the embedded one.
    let port = match std::env::var("FLUIDLET_DEMO_BROKER_PORT") {
        Ok(p) => p.parse().map_err(|_| {
            AgentError::Other(format!("FLUIDLET_DEMO_BROKER_PORT={p:?} is not a port"))
        })?,
        Err(_) => embedded_broker()?,
    };
    say!("fluidlet demo: two nodes, same domain (the seed workflow's 31 steps, dry-run fabric)");
    say!("embedded MQTT broker on 127.0.0.1:{port} (the domain's Supernode / Catalog)\n");
    let dir = std::env::temp_dir().join(format!(
        "fluidlet-demo-{}-{}",
        std::process::id(),
        crate::unix_ms()
    ));
    let result = run_in(&dir, port, t0).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &Path, port: u16, t0: Instant) -> Result<usize, AgentError> {
    let steps: Arc<Mutex<Vec<(u8, Duration)>>> = Arc::default();
    let seen = steps.clone();
    let observer: Observer = Arc::new(move |s: &Step| {
        let at = t0.elapsed();
        say!(
            "[{:>8.2} ms] step {:>2}  {:<9} {:<22} {}",
            at.as_secs_f64() * 1e3,
            s.number,
            s.node.as_str(),
            s.element,
            s.text
        );
        if let Ok(mut v) = seen.lock() {
            v.push((s.number, at));
        }
    });
    let mut pcfg = demo_config("provider", "demo", port, dir)?;
    let offer = demo_offer(&pcfg.node_id);
    pcfg.offers.push(offer.clone());
    let mut ccfg = demo_config("consumer", "demo", port, dir)?;
    // The consumer finds providers by LIST_FLAVOURS only, as in the seed workflow; with
    // the catalog on, the provider's retained advert would make discovery unnecessary.
    ccfg.watch_catalog = false;

    let provider = Agent::start(pcfg, Some(observer.clone())).await?;
    let consumer = Agent::start(ccfg, Some(observer)).await?;
    for a in [&provider, &consumer] {
        if !a.connected(Duration::from_secs(5)).await {
            return Err(AgentError::Broker(format!(
                "{} could not connect",
                a.node_id()
            )));
        }
    }
    say!(
        "provider offers {}; consumer submits an intent needing 1 CPU and 2 GiB on {}\n",
        describe_flavour(&offer),
        k8s_arch()
    );
    let spec = IntentSpec {
        name: Id::new("camera-analytics").unwrap_or_default(),
        namespace: Id::new("camera-analytics").unwrap_or_default(),
        manifest: LongText::new(DEMO_MANIFEST).unwrap_or_default(),
        selector: FlavourSelector {
            architecture: Some(Text::new(k8s_arch()).unwrap_or_default()),
            min: Some(Resources {
                cpu: 1000,
                memory: 2 << 30,
                pods: 1,
                storage: 0,
            }),
            max_price: Some(1_000_000),
            ..Default::default()
        },
    };
    let started = Instant::now();
    let outcome = consumer.submit_intent(spec).await;
    let took = started.elapsed();
    let summary = match &outcome {
        Ok(i) if i.state == IntentState::Placed => {
            say!(
                "\nintent {} placed on {} in {:.2} ms",
                i.id,
                i.placement.as_ref().map_or("?", |p| p.as_str()),
                took.as_secs_f64() * 1e3
            );
            if let Some(c) = i
                .contract
                .as_ref()
                .and_then(|c| consumer.tables().contract(c).ok().flatten())
            {
                say!(
                    "contract {}: {} buys {} from {} for {} millionths EUR/hour",
                    c.id,
                    c.buyer,
                    describe(&c.resources),
                    c.seller,
                    c.price
                );
            }
            print_tables("provider", &provider);
            print_tables("consumer", &consumer);
            print_phases(&steps);
            print_fabric_record(dir);
            Ok(())
        }
        Ok(i) => Err(AgentError::Other(format!(
            "the demo's intent ended {}: {}",
            i.state,
            i.error.as_ref().map_or("", |e| e.as_str())
        ))),
        Err(e) => Err(AgentError::Other(format!("the demo's intent failed: {e}"))),
    };
    consumer.shutdown().await;
    provider.shutdown().await;
    summary?;
    let n = steps.lock().map(|v| v.len()).unwrap_or(0);
    say!(
        "\n{n} workflow steps in {:.1} ms (including broker start)",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(n)
}

/// The workload the demo's intent deploys.
const DEMO_MANIFEST: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: camera-analytics
spec:
  replicas: 1
  selector:
    matchLabels: {app: camera-analytics}
  template:
    metadata:
      labels: {app: camera-analytics}
    spec:
      containers:
      - name: analytics
        image: registry.example/camera-analytics:1.0
        resources:
          limits: {cpu: 1000m, memory: 2Gi}
";

/// Lists what the dry-run fabric wrote: the exact objects and commands a cluster would get.
fn print_fabric_record(dir: &Path) {
    say!("\nthe dry-run fabric wrote (what the liqo backend would apply and run):");
    for node in ["provider", "consumer"] {
        let mut files = Vec::new();
        collect(&dir.join(node).join("fabric"), &mut files);
        files.sort();
        for f in files {
            say!("  {}", f.strip_prefix(dir).unwrap_or(&f).display());
        }
    }
    let mut scripts = Vec::new();
    collect(&dir.join("consumer").join("fabric"), &mut scripts);
    scripts.retain(|p| p.ends_with("commands.sh"));
    scripts.sort();
    for p in scripts {
        say!("\n{}:", p.strip_prefix(dir).unwrap_or(&p).display());
        for line in std::fs::read_to_string(&p).unwrap_or_default().lines() {
            say!("  {line}");
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn describe(r: &Resources) -> String {
    format!("{}m cpu, {} MiB, {} pods", r.cpu, r.memory >> 20, r.pods)
}

fn describe_flavour(f: &Flavour) -> String {
    format!(
        "{} ({}, {} millionths {}/{})",
        f.id,
        describe(&f.resources),
        f.price.amount,
        f.price.currency,
        f.price.period
    )
}

fn print_tables(name: &str, a: &Agent) {
    say!("\n{name} tables:");
    for f in a.tables().flavours().unwrap_or_default() {
        say!("  available   {}", describe_flavour(&f.flavour));
    }
    for al in a.tables().allocations().unwrap_or_default() {
        say!(
            "  allocation  {} {:?} {:?} ({}) with {}",
            al.contract,
            al.kind,
            al.status,
            describe(&al.resources),
            al.peer
        );
    }
    for c in a.tables().contracts().unwrap_or_default() {
        say!(
            "  contract    {} {:?} buyer {} seller {}",
            c.id,
            c.state,
            c.buyer,
            c.seller
        );
    }
}

fn print_phases(steps: &Mutex<Vec<(u8, Duration)>>) {
    let Ok(v) = steps.lock() else { return };
    let span = |from: u8, to: u8| {
        let a = v.iter().find(|(n, _)| *n == from)?.1;
        let b = v.iter().rev().find(|(n, _)| *n == to)?.1;
        Some(b.saturating_sub(a))
    };
    say!("\ntime per phase:");
    for (name, from, to) in [
        ("intent and local lookup (1-4)", 1, 4),
        ("candidates and discovery (5-12)", 5, 12),
        ("reservation (13-20)", 13, 20),
        ("peering (21-28)", 21, 28),
        ("workload placement (29-31)", 29, 31),
        ("whole workflow (1-31)", 1, 31),
    ] {
        if let Some(d) = span(from, to) {
            say!("  {name:<30} {:>8.2} ms", d.as_secs_f64() * 1e3);
        }
    }
}
