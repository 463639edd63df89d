//! Shared pieces of the benchmark and torture tools: a bare MQTT peer, provider processes,
//! hand-built REAR messages.

use fluidlet::model::{Flavour, Id, ReserveRequest, Resources};
use fluidlet::wire::{Body, Flavours, Message};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

pub type Res<T> = Result<T, String>;

/// The runtime both tools run on: two workers, as many cores as the project's machines have.
pub fn runtime() -> Res<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

pub fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn rss_kb(pid: u32) -> Option<u64> {
    proc_status(pid, "VmRSS:")
}

pub fn hwm_kb(pid: u32) -> Option<u64> {
    proc_status(pid, "VmHWM:")
}

pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// A bare MQTT client that hands every publish it receives to a channel, stamped.
pub struct Peer {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>, Instant)>,
}

pub async fn peer(port: u16, client_id: &str, subs: &[String]) -> Res<Peer> {
    peer_with(port, client_id, subs, None).await
}

/// TLS material for the benchmark's nodes on a `broker-config/` domain broker: each node
/// gets its own certificate (the broker forces the client id to the CN).
pub struct BenchTls {
    pub domain: fluidlet_tests::TlsDomain,
}

impl BenchTls {
    /// The node's PEM files, minted on first use.
    pub fn files(&self, node: &str) -> fluidlet::config::TlsFiles {
        let n = self.domain.dir.path().join("nodes").join(node);
        if !n.join("node.pem").exists() {
            return self.domain.enrol(node);
        }
        fluidlet::config::TlsFiles {
            ca: n.join("domain-ca.pem"),
            cert: n.join("node.pem"),
            key: n.join("node.key"),
        }
    }

    pub fn client(&self, node: &str) -> Res<Arc<rustls::ClientConfig>> {
        let id = Id::new(node).map_err(|e| e.to_string())?;
        Ok(fluidlet::tls::load(&self.files(node), &id)
            .map_err(|e| e.to_string())?
            .client)
    }
}

/// A [`peer`], over mutual TLS when `tls` is given.
pub async fn peer_with(
    port: u16,
    client_id: &str,
    subs: &[String],
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Res<Peer> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    opts.set_max_packet_size(256 * 1024, 256 * 1024)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(200);
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = watch::channel(0usize);
    // The connection lives until the Peer (its receiver) is dropped: then the socket closes.
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => ready_tx.send_modify(|n| *n += 1),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send((p.topic, p.payload.to_vec(), Instant::now()))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    for s in subs {
        client
            .subscribe(s, QoS::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
    }
    let want = subs.len();
    tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|n| *n >= want))
        .await
        .map_err(|_| "no SUBACK in 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Peer { client, rx })
}

/// Benchmarks and torture measure capacity, not policy: the per-sender limits a gateway
/// applies by default (docs/security.md) are lifted for them.
pub const NO_LIMITS: &str =
    "[limits]\nsender_rate = 4000000000\nsender_burst = 4000000000\npending_per_buyer = 4000000000\n";

pub fn provider_toml(
    node: &str,
    domain: &str,
    port: u16,
    data: &Path,
    group_commit: bool,
    offers: usize,
) -> String {
    let mut s = format!(
        "node_id = \"{node}\"\ndomain = \"{domain}\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ndata_dir = \"{}\"\nlog = \"warn\"\n[provider]\ngroup_commit = {group_commit}\n{NO_LIMITS}",
        data.display()
    );
    for i in 0..offers {
        s.push_str(&format!(
            "[[offer]]\nid = \"o{i:02}\"\narchitecture = \"amd64\"\ncpu_millicores = 1000000000000\nmemory = 1000000000000000\npods = 4000000000\nprice = \"1\"\ncurrency = \"EUR\"\n[offer.partition]\ncpu_min = 1\ncpu_step = 1\nmemory_min = 1\nmemory_step = 1\npods_min = 1\npods_step = 1\n"
        ));
    }
    s
}

/// Starts a provider process and returns it with the time until its advert was on the broker.
pub async fn start_provider(
    agent: &Path,
    dir: &Path,
    node: &str,
    domain: &str,
    port: u16,
    group_commit: bool,
    offers: usize,
) -> Res<(Child, Duration)> {
    let toml = provider_toml(node, domain, port, &dir.join(node), group_commit, offers);
    start_provider_with(agent, dir, node, domain, port, toml, None).await
}

/// The same provider on a mutual-TLS domain broker.
pub async fn start_tls_provider(
    agent: &Path,
    dir: &Path,
    node: &str,
    tls: &BenchTls,
    offers: usize,
) -> Res<(Child, Duration)> {
    let (domain, port) = (&tls.domain.domain, tls.domain.port);
    let f = tls.files(node);
    let toml = provider_toml(node, domain, port, &dir.join(node), true, offers)
        .replacen("mqtt://", "mqtts://", 1)
        .replacen(
            "[provider]",
            &format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[provider]",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            ),
            1,
        );
    let watcher = format!("watch-{node}");
    let client = tls.client(&watcher)?;
    start_provider_with(
        agent,
        dir,
        node,
        domain,
        port,
        toml,
        Some((watcher, client)),
    )
    .await
}

async fn start_provider_with(
    agent: &Path,
    dir: &Path,
    node: &str,
    domain: &str,
    port: u16,
    toml: String,
    tls_watcher: Option<(String, Arc<rustls::ClientConfig>)>,
) -> Res<(Child, Duration)> {
    let cfg = dir.join(format!("{node}.toml"));
    std::fs::write(&cfg, toml).map_err(|e| e.to_string())?;
    let (watcher_id, tls) = match tls_watcher {
        Some((id, tls)) => (id, Some(tls)),
        None => (format!("watch-{node}@{domain}"), None),
    };
    let mut watcher = peer_with(
        port,
        &watcher_id,
        &[format!("fluidos/v1/{domain}/catalog/{node}")],
        tls,
    )
    .await?;
    let t0 = Instant::now();
    let child = Command::new(agent)
        .args(["run", "-c"])
        .arg(&cfg)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", agent.display()))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), watcher.rx.recv()).await {
            Ok(Some((_, payload, at))) if !payload.is_empty() => return Ok((child, at - t0)),
            Ok(Some(_)) => continue,
            _ => return Err(format!("provider {node} published no advert in 20 s")),
        }
    }
}

/// Tracks the provider's current flavour id per offer from its retained adverts.
pub fn offer_of(f: &Flavour) -> String {
    f.id.as_str()
        .rsplit_once('.')
        .map_or(f.id.as_str(), |(o, _)| o)
        .to_owned()
}

pub fn reserve_msg(id: u64, buyer: &str, tx: u64, flavour: &Id) -> Vec<u8> {
    let me = Id::new(buyer).unwrap_or_default();
    Message {
        id,
        correlation: None,
        sent_at: 0,
        sender: me.clone(),
        body: Body::ReserveFlavour(ReserveRequest {
            transaction: Id::new(&format!("{buyer}.t{tx}")).unwrap_or_default(),
            flavour: flavour.clone(),
            buyer: me,
            partition: Some(Resources {
                cpu: 1,
                memory: 1,
                pods: 1,
                storage: 0,
            }),
        }),
    }
    .encode()
    .unwrap_or_default()
}

/// A buyer `buyer` of provider `prov`: a [`peer_with`] subscribed to `prov`'s answers and its
/// catalog entry, and the topic its requests go to.
pub async fn buyer_peer(
    port: u16,
    domain: &str,
    buyer: &str,
    prov: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Res<(Peer, String)> {
    let subs = [
        format!("fluidos/v1/{domain}/to/{buyer}/from/{prov}"),
        format!("fluidos/v1/{domain}/catalog/{prov}"),
    ];
    let p = peer_with(port, &format!("{buyer}@{domain}"), &subs, tls).await?;
    Ok((p, format!("fluidos/v1/{domain}/to/{prov}/from/{buyer}")))
}

/// Waits (5 s at most for each message) for an advert carrying `offer` and returns the id of
/// its flavour; other messages are skipped.
pub async fn first_flavour(p: &mut Peer, offer: &str) -> Res<Id> {
    loop {
        let Ok(Some((topic, payload, _))) =
            tokio::time::timeout(Duration::from_secs(5), p.rx.recv()).await
        else {
            return Err("no advert".into());
        };
        if topic.contains("/catalog/") {
            if let Some(f) = advert_flavour(&payload, offer) {
                return Ok(f);
            }
        }
    }
}

pub fn advert_flavour(payload: &[u8], offer: &str) -> Option<Id> {
    let m = Message::decode(payload).ok()?;
    let Body::Advert(Flavours { flavours, .. }) = m.body else {
        return None;
    };
    flavours
        .iter()
        .find(|f| offer_of(f) == offer)
        .map(|f| f.id.clone())
}

/// The gateway binary: the one given, or built now with cargo into target/bench-agent.
pub fn agent_binary(given: Option<PathBuf>) -> Res<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    // The gateway build as shipped (static musl) when the target is installed: memory figures
    // depend on the allocator, and glibc's takes about 1 MB more than musl's at idle.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = |target: Option<&str>| {
        let mut c = Command::new(&cargo);
        c.args([
            "build",
            "--release",
            "-p",
            "fluidlet",
            "--no-default-features",
        ])
        .args(["--target-dir", "target/bench-agent"]);
        if let Some(t) = target {
            c.args(["--target", t]);
        }
        c.status()
            .map_err(|e| format!("cannot run cargo to build the agent: {e}"))
    };
    let musl = "x86_64-unknown-linux-musl";
    if cfg!(target_arch = "x86_64") && build(Some(musl))?.success() {
        return Ok(PathBuf::from(format!(
            "target/bench-agent/{musl}/release/fluidlet"
        )));
    }
    eprintln!("fluidlet-bench: no {musl} build (rustup target add {musl}; apt-get install musl-tools); measuring the glibc build");
    if !build(None)?.success() {
        return Err("building the agent failed".into());
    }
    Ok(PathBuf::from("target/bench-agent/release/fluidlet"))
}

/// The retained advert of simulated provider `node` (the `i`-th): the demo's 4-CPU offer under
/// flavour id `pool.{i}`, with prices spread so that ranking has work to do.
pub fn sim_advert(node: &str, i: usize) -> Vec<u8> {
    let mut f = fluidlet::demo::demo_offer(&Id::new(node).unwrap_or_default());
    f.id = Id::new(&format!("pool.{i}")).unwrap_or_default();
    f.price.amount = 1_000_000 + (i as u64 * 7919) % 1_000_000;
    Message {
        id: i as u64,
        correlation: None,
        sent_at: 0,
        sender: Id::new(node).unwrap_or_default(),
        body: Body::Advert(Flavours {
            flavours: fluidlet::model::FlavourList::from_slice_truncated(&[f]),
            ..Default::default()
        }),
    }
    .encode()
    .unwrap_or_default()
}

/// Waits (60 s at most) until `agent` holds `n` peering candidates, then ranks them for a
/// 1-CPU intent. Returns (from `t0` to the chosen candidate, of which ranking).
pub async fn chosen_candidate(
    agent: &fluidlet::Agent,
    n: usize,
    t0: Instant,
) -> Res<(Duration, Duration)> {
    let sel = fluidlet_tests::intent_spec("x", 1000, 1).selector;
    loop {
        if agent.candidates().count() >= n {
            let r0 = Instant::now();
            let ranked = fluidlet::discovery::rank(
                agent.candidates().all(),
                &sel,
                fluidlet::unix_ms(),
                60_000,
                |_| fluidlet::discovery::Standing::default(),
            );
            let rank = r0.elapsed();
            if ranked.is_empty() {
                return Err("no candidate chosen".into());
            }
            return Ok((t0.elapsed(), rank));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "only {} of {n} candidates after 60 s",
                agent.candidates().count()
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// User plus system CPU time of `pid` in clock ticks (/proc/PID/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // rest starts at field 3, so fields 14 and 15 are at 11 and 12.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Client TLS for a node of the benchmark's domain (`None`: plain MQTT).
pub type TlsFor<'a> = dyn Fn(&str) -> Res<Option<Arc<rustls::ClientConfig>>> + 'a;

/// The broker's ceiling for QoS 1 request/reply, the traffic REAR is made of: `pairs`
/// askers, each keeping `window` requests of 256 bytes in flight on REAR's addressed topics
/// of `domain` to its own echo node, which answers each. Returns round trips/s and the CPU
/// use over the span of the broker (`broker_pid`) and of this process, whose clients drive
/// it (1.0 = one core).
pub async fn qos1_round_trips(
    port: u16,
    broker_pid: u32,
    domain: &str,
    tls: &TlsFor<'_>,
    pairs: usize,
    window: usize,
    span: Duration,
) -> Res<(f64, f64, f64)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let ok = Arc::new(AtomicU64::new(0));
    let mail = |node: &str| format!("fluidos/v1/{domain}/to/{node}/from/+");
    let mut askers = Vec::new();
    for k in 0..pairs {
        let (echo_n, ask_n) = (format!("echo{k}"), format!("ask{k}"));
        let mut echo = peer_with(port, &echo_n, &[mail(&echo_n)], tls(&echo_n)?).await?;
        let asker = peer_with(port, &ask_n, &[mail(&ask_n)], tls(&ask_n)?).await?;
        let reply = format!("fluidos/v1/{domain}/to/{ask_n}/from/{echo_n}");
        let echo_client = echo.client.clone();
        tokio::spawn(async move {
            while let Some((_, payload, _)) = echo.rx.recv().await {
                if echo_client
                    .publish(&reply, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        askers.push((
            asker,
            format!("fluidos/v1/{domain}/to/{echo_n}/from/{ask_n}"),
        ));
    }
    let start = Instant::now() + Duration::from_millis(300);
    let deadline = start + span;
    let mut tasks = Vec::new();
    for (mut asker, to) in askers {
        let ok = ok.clone();
        tasks.push(tokio::spawn(async move {
            let payload = vec![7u8; 256];
            let mut in_flight = 0usize;
            loop {
                let open = Instant::now() < deadline;
                while open && in_flight < window {
                    asker
                        .client
                        .publish(&to, QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return Ok::<(), String>(());
                }
                if tokio::time::timeout(Duration::from_secs(5), asker.rx.recv())
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                {
                    return Err("no reply in 5 s".into());
                }
                in_flight -= 1;
                let now = Instant::now();
                if now >= start && now < deadline {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let me = std::process::id();
    let (c0, m0) = (cpu_ticks(broker_pid), cpu_ticks(me));
    tokio::time::sleep_until(deadline.into()).await;
    let (c1, m1) = (cpu_ticks(broker_pid), cpu_ticks(me));
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / clock_ticks() / span.as_secs_f64();
    Ok((
        ok.load(Ordering::Relaxed) as f64 / span.as_secs_f64(),
        per_s(c0, c1),
        per_s(m0, m1),
    ))
}
