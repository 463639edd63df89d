//! fluidlet-limits: what one mosquitto domain broker of `broker-config/` (mutual TLS, the
//! domain ACL, the retained-storage plugin) holds on this machine, and discovery at domain
//! scale through bridges: simulated providers on two site brokers, the consumer on a third,
//! the three bridged to a core over mutual TLS, each site made by `domain.sh site`. Every
//! broker is a mosquitto process on loopback that this tool starts and stops.
//!
//! `cargo run --release -p fluidlet-bench --bin fluidlet-limits` (`-- --quick` for a run of
//! seconds). It prints figures and writes JSON (`target/fluidlet-limits.json`); it asserts
//! nothing about speed. Needs what the security tests need: mosquitto, openssl, gcc and the
//! mosquitto headers (Debian: mosquitto mosquitto-dev libmosquitto-dev openssl gcc).
//!
//! Each simulated node has its own certificate (CN = node id, signed by the domain CA), as
//! the broker forces the client id to the CN; all of them share one P-256 key, because
//! minting 10,000 keys would only slow the setup (the broker sees distinct certificates and
//! CNs either way).

use argh::FromArgs;
use fluidlet::config::TlsFiles;
use fluidlet::model::Id;
use fluidlet_bench::*;
use rumqttc::QoS;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits of one mosquitto domain broker (connections, retained adverts, request/reply
/// messages/s) and discovery through bridged site brokers.
#[derive(FromArgs)]
struct Args {
    /// short run: 100 connections, 100 providers, 1 s of request/reply
    #[argh(switch)]
    quick: bool,
    /// concurrent mutual-TLS clients held by the single broker, each with a retained advert
    /// (10000 by default)
    #[argh(option)]
    connections: Option<usize>,
    /// simulated providers spread over the two provider sites (10000 by default)
    #[argh(option)]
    providers: Option<usize>,
    /// seconds of request/reply traffic (5 by default)
    #[argh(option)]
    secs: Option<u64>,
    /// where to write the JSON results
    #[argh(option, default = "PathBuf::from(\"target/fluidlet-limits.json\")")]
    out: PathBuf,
}

fn main() {
    let args: Args = argh::from_env();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return eprintln!("fluidlet-limits: {e}"),
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("fluidlet-limits: {e}");
        std::process::exit(1);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The soft limit on open files of process `pid` ("self" for this one), from /proc.
fn open_files_limit(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into())
}

/// The 1-minute load average: the machines are shared, and every figure here depends on it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(err)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// mosquitto started as root drops to the `mosquitto` user: give it `path` by group.
fn give_to_mosquitto(path: &Path, mode: &str) {
    if is_root() {
        let _ = Command::new("chgrp").arg("mosquitto").arg(path).status();
        let _ = Command::new("chmod").arg(mode).arg(path).status();
    }
}

fn domain_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/domain.sh")
}

/// Runs `domain.sh ARGS` with umask 022: the agent run in this process sets its umask to
/// 077, and directories made under it would be closed to the `mosquitto` user.
fn domain_sh(args: &[&str]) -> Res<()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"umask 022; exec sh "$0" "$@""#)
        .arg(domain_script())
        .args(args)
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(format!(
            "domain.sh {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// One FLUIDOS domain made by `broker-config/domain.sh init` (CA, broker certificate, ACL,
/// plugin, mosquitto.conf), and the certificates of its simulated nodes.
struct Domain {
    dir: tempfile::TempDir,
    name: String,
}

impl Domain {
    fn init() -> Res<Domain> {
        let dir = tempfile::tempdir().map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(err)?;
        let name = format!("lim{}", std::process::id());
        let d = dir.path().to_str().ok_or("non-UTF-8 temporary directory")?;
        domain_sh(&["init", d, &name, "8883", "127.0.0.1"])?;
        let key = dir.path().join("sim.key");
        let ok = Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&key)
            .status()
            .map_err(err)?
            .success();
        if !ok {
            return Err("openssl ecparam failed".into());
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        std::fs::create_dir_all(dir.path().join("sims")).map_err(err)?;
        Ok(Domain { dir, name })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Mints a certificate per name (CN = name, client authentication, signed by the domain
    /// CA, the shared key), in two openssl loops at once.
    fn mint(&self, names: &[String]) -> Res<()> {
        let script = r#"set -e; cd "$1"; shift
for n in "$@"; do
  openssl req -new -key sim.key -subj "/O=FLUIDOS/CN=$n" -x509 -CA domain-ca.pem \
    -CAkey domain-ca.key -days 2 -addext basicConstraints=critical,CA:FALSE \
    -addext keyUsage=critical,digitalSignature -addext extendedKeyUsage=clientAuth \
    -out "sims/$n.pem" 2>/dev/null
done"#;
        let todo: Vec<&String> = names
            .iter()
            .filter(|n| !self.path().join("sims").join(format!("{n}.pem")).exists())
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let mut kids = Vec::new();
        for chunk in todo.chunks(todo.len().div_ceil(2)) {
            kids.push(
                Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .arg("mint")
                    .arg(self.path())
                    .args(chunk.iter().map(|s| s.as_str()))
                    .spawn()
                    .map_err(err)?,
            );
        }
        for mut k in kids {
            if !k.wait().map_err(err)?.success() {
                return Err("minting node certificates with openssl failed".into());
            }
        }
        Ok(())
    }

    fn files(&self, node: &str) -> TlsFiles {
        TlsFiles {
            ca: self.path().join("domain-ca.pem"),
            cert: self.path().join("sims").join(format!("{node}.pem")),
            key: self.path().join("sim.key"),
        }
    }

    fn client(&self, node: &str) -> Res<Arc<rustls::ClientConfig>> {
        let id = Id::new(node).map_err(err)?;
        Ok(fluidlet::tls::load(&self.files(node), &id)
            .map_err(err)?
            .client)
    }
}

/// A mosquitto process of the domain, killed on drop.
struct Broker {
    port: u16,
    child: Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// Starts a broker from the domain's mosquitto.conf (as `domain.sh init` wrote it) on
    /// `port` with its own data directory; `acl_extra` is appended to a copy of the ACL,
    /// `plugin: false` leaves out the retained-storage plugin, `conf_extra` is appended to
    /// the configuration (a bridge). The open-files limit is raised to the hard limit.
    fn start(
        dom: &Domain,
        name: &str,
        port: u16,
        acl_extra: &str,
        plugin: bool,
        conf_extra: &str,
    ) -> Res<Broker> {
        let p = dom.path();
        let data = p.join(format!("{name}-data"));
        std::fs::create_dir_all(&data).map_err(err)?;
        give_to_mosquitto(&data, "0770");
        let acl = p.join(format!("{name}.acl"));
        let base_acl = std::fs::read_to_string(p.join("acl")).map_err(err)?;
        std::fs::write(&acl, format!("{base_acl}{acl_extra}")).map_err(err)?;
        give_to_mosquitto(&acl, "0640");
        let base = std::fs::read_to_string(p.join("mosquitto.conf")).map_err(err)?;
        let mut conf = String::new();
        for line in base.lines() {
            if line.starts_with("listener ") {
                conf.push_str(&format!("listener {port} 127.0.0.1\n"));
            } else if line.starts_with("persistence_location ") {
                conf.push_str(&format!("persistence_location {}/\n", data.display()));
            } else if line.starts_with("acl_file ") {
                conf.push_str(&format!("acl_file {}\n", acl.display()));
            } else if !plugin && line.starts_with("plugin") {
                conf.push_str(&format!("# (left out here) {line}\n"));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        conf.push_str(conf_extra);
        let conf_path = p.join(format!("{name}.conf"));
        std::fs::write(&conf_path, conf).map_err(err)?;
        Broker::run(&conf_path, port, &p.join(format!("{name}.log")))
    }

    /// Runs mosquitto with the configuration `conf` (listening on `port`), its log in `log`.
    fn run(conf_path: &Path, port: u16, log_path: &Path) -> Res<Broker> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or("mosquitto is not installed (apt-get install mosquitto)")?;
        let log = std::fs::File::create(log_path).map_err(err)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" -c "$1""#)
            .arg(bin)
            .arg(conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(err)?;
        let b = Broker { port, child };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(b);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        Err(format!(
            "mosquitto -c {} did not listen on port {port}; its log:\n{log}",
            conf_path.display(),
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss(&self) -> u64 {
        rss_kb(self.pid()).unwrap_or(0)
    }
}

fn catalog(dom: &Domain) -> String {
    format!("fluidos/v1/{}/catalog/+", dom.name)
}

fn mail(dom: &Domain, node: &str) -> String {
    format!("fluidos/v1/{}/to/{node}/from/+", dom.name)
}

/// Connects `names` over mutual TLS (32 handshakes at a time), each subscribed to its own
/// mail like a node; returns once every SUBACK is in.
async fn connect_all(dom: &Arc<Domain>, port: u16, names: &[String]) -> Res<Vec<Peer>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::with_capacity(names.len());
    for n in names {
        let permit = sem.clone().acquire_owned().await.map_err(err)?;
        let (dom, n) = (dom.clone(), n.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let tls = dom.client(&n)?;
            peer_with(port, &n, &[mail(&dom, &n)], Some(tls)).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.map_err(err)??);
    }
    Ok(out)
}

/// Each peer publishes its retained advert on its own catalog entry.
async fn publish_adverts(dom: &Domain, peers: &[Peer], names: &[String]) -> Res<()> {
    for (i, (p, n)) in peers.iter().zip(names).enumerate() {
        p.client
            .publish(
                format!("fluidos/v1/{}/catalog/{n}", dom.name),
                QoS::AtLeastOnce,
                true,
                sim_advert(n, i),
            )
            .await
            .map_err(err)?;
    }
    Ok(())
}

/// Reads catalog messages from `p` until `n` distinct entries hold an advert (30 s at most
/// between two messages); returns how many messages that took.
async fn until_adverts(p: &mut Peer, n: usize, what: &str) -> Res<usize> {
    let mut seen = HashSet::new();
    let mut got = 0;
    while seen.len() < n {
        let Ok(Some((topic, payload, _))) =
            tokio::time::timeout(Duration::from_secs(30), p.rx.recv()).await
        else {
            return Err(format!("{what}: {} of {n} adverts", seen.len()));
        };
        got += 1;
        if payload.is_empty() {
            seen.remove(&topic);
        } else {
            seen.insert(topic);
        }
    }
    Ok(got)
}

/// A bare mutual-TLS client `name`: from its connect to the `n`-th retained advert.
async fn bare_reader(dom: &Arc<Domain>, port: u16, name: &str, n: usize) -> Res<Duration> {
    let t0 = Instant::now();
    let mut p = peer_with(port, name, &[catalog(dom)], Some(dom.client(name)?)).await?;
    until_adverts(&mut p, n, name).await?;
    Ok(t0.elapsed())
}

/// A consumer node (the agent, in this process) over mutual TLS: from its start to the
/// chosen candidate among `n` (of which ranking).
async fn consumer(
    dom: &Domain,
    port: u16,
    name: &str,
    n: usize,
    data: &Path,
) -> Res<(Duration, Duration)> {
    let mut cfg = fluidlet_tests::config(name, &dom.name, port, data);
    cfg.tls = Some(dom.files(name));
    let t0 = Instant::now();
    let agent = fluidlet::Agent::start(cfg, None).await.map_err(err)?;
    let r = chosen_candidate(&agent, n, t0).await;
    agent.shutdown().await;
    r
}

/// [`qos1_round_trips`] on this domain's broker, over mutual TLS.
async fn request_reply(
    dom: &Arc<Domain>,
    b: &Broker,
    pairs: usize,
    window: usize,
    span: Duration,
) -> Res<(f64, f64, f64)> {
    let tls = |node: &str| dom.client(node).map(Some);
    qos1_round_trips(b.port, b.pid(), &dom.name, &tls, pairs, window, span).await
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

async fn run(args: Args) -> Res<()> {
    let q = args.quick;
    let conns = args.connections.unwrap_or(if q { 100 } else { 10_000 });
    let provs = args.providers.unwrap_or(if q { 100 } else { 10_000 });
    let secs = args.secs.unwrap_or(if q { 1 } else { 5 });
    let pairs = if q { 4 } else { 16 };
    let window = 32;
    let mut json = serde_json::Map::new();
    let mut rows: Vec<(String, String)> = Vec::new();

    let t = Instant::now();
    let dom = Arc::new(Domain::init()?);
    let sims = names("sim", conns.max(provs));
    let mut extra: Vec<String> = vec![
        "probe1".into(),
        "bare1".into(),
        "cons1".into(),
        "probeC".into(),
        "bareC".into(),
        "consC".into(),
        "canaryA".into(),
        "canaryB".into(),
    ];
    extra.extend(names("echo", pairs));
    extra.extend(names("ask", pairs));
    dom.mint(&extra)?;
    dom.mint(&sims)?;
    let advert_bytes = sim_advert("sim0", 0).len();
    println!(
        "fluidlet-limits{}: domain {} in {}; {} node certificates minted in {:.1} s; \
         open files: this process {}, brokers raised to the hard limit; load average {} on {} cores",
        if q { " (quick)" } else { "" },
        dom.name,
        dom.path().display(),
        sims.len() + extra.len(),
        t.elapsed().as_secs_f64(),
        open_files_limit("self"),
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    // ---- B. One domain broker: connections, retained adverts, request/reply. ----
    let one = Broker::start(&dom, "one", free_port()?, "", true, "")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = one.rss();
    println!(
        "\none broker (pid {}, open files {}): RSS at start {rss0} kB",
        one.pid(),
        open_files_limit(&one.pid().to_string())
    );
    let mut steps: Vec<usize> = [100, 1000, 2000, 5000, 10_000, 20_000, 50_000]
        .into_iter()
        .filter(|&s| s < conns)
        .collect();
    steps.push(conns);
    let mut peers: Vec<Peer> = Vec::with_capacity(conns);
    let mut conn_json = Vec::new();
    let t0 = Instant::now();
    for &s in &steps {
        let more = connect_all(&dom, one.port, &sims[peers.len()..s]).await?;
        peers.extend(more);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = one.rss();
        let el = t0.elapsed();
        println!(
            "  {s:>6} mutual-TLS clients connected and subscribed: broker RSS {rss} kB \
             ({:.1} kB per connection), {:.0} connections/s so far",
            (rss.saturating_sub(rss0)) as f64 / s as f64,
            s as f64 / el.as_secs_f64()
        );
        conn_json.push(json!({"connections": s, "rss_kb": rss, "seconds": el.as_secs_f64()}));
    }
    let rss_conn = one.rss();
    let per_conn = rss_conn.saturating_sub(rss0) as f64 / conns as f64;
    rows.push((
        format!("one broker: {conns} mutual-TLS clients held (each subscribed to its mail)"),
        format!(
            "RSS {rss0} kB -> {rss_conn} kB: {per_conn:.1} kB per connection; {:.0} handshakes/s",
            conns as f64 / t0.elapsed().as_secs_f64()
        ),
    ));
    json.insert(
        "connections".into(),
        json!({"steps": conn_json, "rss0_kb": rss0, "per_connection_kb": per_conn}),
    );

    // Retained adverts: every client publishes its own.
    let mut probe = peer_with(
        one.port,
        "probe1",
        &[catalog(&dom)],
        Some(dom.client("probe1")?),
    )
    .await?;
    let t1 = Instant::now();
    publish_adverts(&dom, &peers, &sims[..conns]).await?;
    until_adverts(&mut probe, conns, "probe1").await?;
    let stored = t1.elapsed();
    drop(probe);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_ret = one.rss();
    let per_ret = rss_ret.saturating_sub(rss_conn) as f64 / conns as f64;
    let bare = bare_reader(&dom, one.port, "bare1", conns).await?;
    let data = tempfile::tempdir().map_err(err)?;
    let (chosen, rank) = consumer(&dom, one.port, "cons1", conns, data.path()).await?;
    rows.push((
        format!("one broker: {conns} retained adverts ({advert_bytes} B each) from their providers"),
        format!(
            "RSS {rss_conn} kB -> {rss_ret} kB: {per_ret:.2} kB per advert; all {conns} on a subscriber {:.0} ms after the first publish",
            ms(stored)
        ),
    ));
    rows.push((
        format!("one broker: a new subscriber receives the {conns} retained adverts"),
        format!(
            "bare client {:.0} ms; consumer node to chosen candidate {:.0} ms (ranking {:.1} ms)",
            ms(bare),
            ms(chosen),
            ms(rank)
        ),
    ));
    json.insert("retained".into(), json!({"n": conns, "advert_bytes": advert_bytes, "rss_before_kb": rss_conn, "rss_after_kb": rss_ret, "per_advert_kb": per_ret, "publish_to_all_stored_ms": ms(stored), "bare_subscriber_ms": ms(bare), "consumer_chosen_ms": ms(chosen), "rank_ms": ms(rank)}));

    // Request/reply with the clients and adverts still there.
    let (rt, cpu, bench_cpu) =
        request_reply(&dom, &one, pairs, window, Duration::from_secs(secs)).await?;
    rows.push((
        format!("one broker: QoS 1 request/reply, {pairs} pairs x {window} in flight, 256 B, {secs} s"),
        format!(
            "{rt:.0} round trips/s = {:.0} publishes/s into the broker (and as many out); CPU: broker {:.0}% of one core, the clients (this process) {:.0}%",
            2.0 * rt,
            cpu * 100.0,
            bench_cpu * 100.0
        ),
    ));
    json.insert("request_reply".into(), json!({"pairs": pairs, "window": window, "payload_bytes": 256, "seconds": secs, "round_trips_per_s": rt, "broker_cpu": cpu, "clients_cpu": bench_cpu}));
    let peak_one = hwm_kb(one.pid()).unwrap_or(0);
    drop(peers);
    drop(one);
    println!("one broker: peak RSS {peak_one} kB; stopped");

    // ---- C. Discovery through bridges: sites A and B with the providers, C with the consumer. ----
    // The sites as `domain.sh site` makes them (each bridged to the core over mutual TLS,
    // CN bridge:SITE; the core's ACL gains the bridges' lines), then the core, then the sites.
    let d = &dom.name;
    let core_port = free_port()?;
    let mut site_ports = Vec::new();
    for s in ["A", "B", "C"] {
        let port = free_port()?;
        let dir = dom.path().to_str().ok_or("non-UTF-8 path")?;
        let core = format!("127.0.0.1:{core_port}");
        domain_sh(&["site", dir, s, &core, &port.to_string(), "127.0.0.1"])?;
        site_ports.push((s, port));
    }
    let core = Broker::start(&dom, "core", core_port, "", true, "")?;
    let mut sites = Vec::new();
    for (s, port) in site_ports {
        let site = dom.path().join("sites").join(s);
        sites.push(Broker::run(
            &site.join("mosquitto.conf"),
            port,
            &dom.path().join(format!("site{s}.log")),
        )?);
    }
    let (a, b, c) = (&sites[0], &sites[1], &sites[2]);
    // Bridges up: a canary advert from A and one from B reach C; then both are wiped again.
    let mut probe = peer_with(
        c.port,
        "probeC",
        &[catalog(&dom)],
        Some(dom.client("probeC")?),
    )
    .await?;
    let ca = peer_with(a.port, "canaryA", &[], Some(dom.client("canaryA")?)).await?;
    let cb = peer_with(b.port, "canaryB", &[], Some(dom.client("canaryB")?)).await?;
    let t2 = Instant::now();
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        if t2.elapsed() > Duration::from_secs(30) {
            return Err(
                "the bridges did not carry a canary advert from A and B to C in 30 s".into(),
            );
        }
        for (p, n) in [(&ca, "canaryA"), (&cb, "canaryB")] {
            p.client
                .publish(
                    format!("fluidos/v1/{d}/catalog/{n}"),
                    QoS::AtLeastOnce,
                    true,
                    sim_advert(n, 0),
                )
                .await
                .map_err(err)?;
        }
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Some((topic, payload, _))) =
            tokio::time::timeout_at(until.into(), probe.rx.recv()).await
        {
            if !payload.is_empty() {
                seen.insert(topic);
            }
        }
    }
    let bridges_up = t2.elapsed();
    for (p, n) in [(&ca, "canaryA"), (&cb, "canaryB")] {
        p.client
            .publish(
                format!("fluidos/v1/{d}/catalog/{n}"),
                QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await
            .map_err(err)?;
    }
    let mut wiped = 0;
    while wiped < 2 {
        let Ok(Some((_, payload, _))) =
            tokio::time::timeout(Duration::from_secs(30), probe.rx.recv()).await
        else {
            return Err("the canaries' wipes did not reach C".into());
        };
        if payload.is_empty() {
            wiped += 1;
        }
    }
    drop((ca, cb));
    println!(
        "\nbridged (domain.sh site): core :{}, sites A :{}, B :{}, C :{}; bridges carried a canary A->C and B->C {:.0} ms after the brokers started",
        core.port, a.port, b.port, c.port, ms(bridges_up)
    );
    let rss_start: Vec<u64> = [&core, a, b, c].iter().map(|x| x.rss()).collect();
    let half = provs / 2;
    let pa = connect_all(&dom, a.port, &sims[..half]).await?;
    let pb = connect_all(&dom, b.port, &sims[half..provs]).await?;
    let t3 = Instant::now();
    publish_adverts(&dom, &pa, &sims[..half]).await?;
    // The providers of B publish with their global index, so that prices stay spread.
    for (i, (p, n)) in pb.iter().zip(&sims[half..provs]).enumerate() {
        p.client
            .publish(
                format!("fluidos/v1/{d}/catalog/{n}"),
                QoS::AtLeastOnce,
                true,
                sim_advert(n, half + i),
            )
            .await
            .map_err(err)?;
    }
    let mut delivered = until_adverts(&mut probe, provs, "probeC").await?;
    let crossed = t3.elapsed();
    // Anything more within 2 s would be a duplicate or a loop through the bridges.
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(_)) = tokio::time::timeout_at(until.into(), probe.rx.recv()).await {
        delivered += 1;
    }
    drop(probe);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bare_c = bare_reader(&dom, c.port, "bareC", provs).await?;
    let (chosen_c, rank_c) = consumer(&dom, c.port, "consC", provs, data.path()).await?;
    let rss_end: Vec<u64> = [&core, a, b, c].iter().map(|x| x.rss()).collect();
    drop((pa, pb));
    let labels = ["core", "site A", "site B", "site C"];
    let rss_txt = labels
        .iter()
        .zip(rss_start.iter().zip(&rss_end))
        .map(|(l, (s, e))| format!("{l} {s} -> {e} kB"))
        .collect::<Vec<_>>()
        .join("; ");
    rows.push((
        format!("bridged: {provs} providers ({half} on site A, {} on site B) publish; all adverts on a subscriber of site C", provs - half),
        format!(
            "{:.0} ms after the first publish (one broker, N = {conns}: {:.0} ms); the subscriber on C got {delivered} messages for {provs} adverts in that time and the 2 s after",
            ms(crossed),
            ms(stored)
        ),
    ));
    rows.push((
        format!("bridged: a new subscriber on site C receives the {provs} retained adverts"),
        format!(
            "bare client {:.0} ms; consumer node to chosen candidate {:.0} ms (ranking {:.1} ms); one broker, N = {conns}: {:.0} ms, {:.0} ms",
            ms(bare_c),
            ms(chosen_c),
            ms(rank_c),
            ms(bare),
            ms(chosen)
        ),
    ));
    rows.push((
        "bridged: broker RSS before the providers -> with their connections and adverts".into(),
        rss_txt,
    ));
    json.insert("bridged".into(), json!({
        "providers": provs, "site_a": half, "site_b": provs - half,
        "bridges_up_ms": ms(bridges_up), "publish_to_all_on_c_ms": ms(crossed), "delivered_on_c": delivered,
        "bare_subscriber_c_ms": ms(bare_c), "consumer_chosen_c_ms": ms(chosen_c), "rank_ms": ms(rank_c),
        "rss_start_kb": {"core": rss_start[0], "a": rss_start[1], "b": rss_start[2], "c": rss_start[3]},
        "rss_end_kb": {"core": rss_end[0], "a": rss_end[1], "b": rss_end[2], "c": rss_end[3]},
        "single_broker": {"n": conns, "publish_to_all_stored_ms": ms(stored), "bare_subscriber_ms": ms(bare), "consumer_chosen_ms": ms(chosen)},
    }));
    drop(sites);
    drop(core);

    println!("\nload average at the end: {}", loadavg());
    println!("\n| figure | measured |\n| --- | --- |");
    for (f, v) in &rows {
        println!("| {f} | {v} |");
    }
    json.insert("quick".into(), json!(q));
    json.insert("open_files_limit".into(), json!(open_files_limit("self")));
    if let Some(parent) = args.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&Value::Object(json)).unwrap_or_default(),
    )
    .map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!("\nJSON written to {}", args.out.display());
    Ok(())
}
