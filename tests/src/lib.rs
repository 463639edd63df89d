//! Test harness: real brokers on loopback, fluidlet nodes, and a raw MQTT peer ("rogue")
//! that sends exactly the bytes a test wants and reads exactly the bytes it gets back.
//!
//! Two brokers: the embedded rumqttd (one per test process, shared; tests isolate
//! themselves by using a fresh domain each) and a mosquitto process started per test on a
//! free loopback port. When mosquitto is not installed the mosquitto variant is skipped
//! with a message, except under CI (`CI` set), where it fails: CI must test both.

use fluidlet::config::TlsFiles;
use fluidlet::demo::{demo_config, demo_offer, embedded_broker};
use fluidlet::model::{Flavour, Id};
use fluidlet::wire::{Body, Message};
use fluidlet::{Agent, Config, Observer, Step};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub mod refnode;

/// Declares each named `async fn case(port: u16)` as two tests, one per broker: modules
/// `embedded` and `mosquitto`. A broker that cannot be had (mosquitto missing outside CI)
/// skips the case with a message.
#[macro_export]
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                if let Some(b) = $crate::broker($crate::BrokerKind::Embedded) {
                    super::$name(b.port).await;
                }
            })*
        }
        mod mosquitto {
            $(#[tokio::test]
            async fn $name() {
                if let Some(b) = $crate::broker($crate::BrokerKind::Mosquitto) {
                    super::$name(b.port).await;
                }
            })*
        }
    };
}

/// Upper bound for anything a test waits for; never a latency assertion.
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// A running broker; a mosquitto child is killed on drop.
pub struct Broker {
    pub port: u16,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// The broker process's pid (this process's own for the embedded broker, which runs in
    /// it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(std::process::id(), Child::id)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where mosquitto is installed, if it is.
pub fn mosquitto_path() -> Option<String> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .map(String::from)
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts (or reuses) a broker of `kind`; `None` means "skip this test" (mosquitto missing
/// outside CI).
pub fn broker(kind: BrokerKind) -> Option<Broker> {
    match kind {
        BrokerKind::Embedded => Some(Broker {
            port: embedded_broker().expect("embedded broker"),
            child: None,
            _dir: None,
        }),
        BrokerKind::Mosquitto => {
            let Some(bin) = mosquitto_path() else {
                if std::env::var_os("CI").is_some() {
                    panic!("mosquitto is not installed and CI is set: .ci/run must install it");
                }
                eprintln!("SKIPPED: mosquitto not installed (apt-get install mosquitto)");
                return None;
            };
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let child = start_mosquitto(&bin, dir.path(), port);
            Some(Broker {
                port,
                child: Some(child),
                _dir: Some(dir),
            })
        }
    }
}

fn start_mosquitto(bin: &str, dir: &Path, port: u16) -> Child {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_packet_size 65536\nset_tcp_nodelay true\nmax_queued_messages 20000\n\
             log_dest stderr\nlog_type error\n"
        ),
    )
    .expect("write mosquitto.conf");
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mosquitto");
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("mosquitto did not listen on port {port}");
}

impl Broker {
    /// Stops a mosquitto broker (an outage); the embedded broker cannot be stopped.
    pub fn stop(&mut self) -> bool {
        match &mut self.child {
            Some(c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Starts a stopped mosquitto again on the same port (its retained messages are gone:
    /// persistence is off, as after a broker that lost its disk).
    pub fn restart(&mut self) {
        if let (Some(bin), Some(dir)) = (mosquitto_path(), &self._dir) {
            self.child = Some(start_mosquitto(&bin, dir.path(), self.port));
        }
    }
}

/// A domain name no other test in this process uses.
pub fn fresh_domain() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Config for a node `name` in `domain` on broker `port`, data under `dir`.
pub fn config(name: &str, domain: &str, port: u16, dir: &Path) -> Config {
    let mut cfg = demo_config(name, domain, port, dir).expect("config");
    cfg.reserve_timeout = Duration::from_millis(1500);
    cfg
}

/// A provider config offering the demo's partitionable 4-CPU pool.
pub fn provider_config(name: &str, domain: &str, port: u16, dir: &Path) -> Config {
    let mut cfg = config(name, domain, port, dir);
    cfg.offers.push(demo_offer(&cfg.node_id));
    cfg
}

/// A provider config offering one flavour sold only whole (2 CPUs, 4 GiB).
pub fn whole_provider_config(name: &str, domain: &str, port: u16, dir: &Path) -> Config {
    let mut cfg = config(name, domain, port, dir);
    let mut offer = demo_offer(&cfg.node_id);
    offer.id = Id::new("whole").expect("id");
    offer.partitionability = None;
    offer.resources.cpu = 2000;
    offer.resources.memory = 4 << 30;
    cfg.offers.push(offer);
    cfg
}

/// Records every workflow step a node reports.
#[derive(Clone, Default)]
pub struct Steps(pub Arc<Mutex<Vec<(String, u8)>>>);

impl Steps {
    pub fn observer(&self) -> Observer {
        let v = self.0.clone();
        Arc::new(move |s: &Step| {
            if let Ok(mut v) = v.lock() {
                v.push((s.node.to_string(), s.number));
            }
        })
    }

    /// Step numbers reported by `node`, in order.
    pub fn of(&self, node: &str) -> Vec<u8> {
        self.0
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(n, _)| n == node)
                    .map(|(_, s)| *s)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Starts a node and waits until it is connected.
pub async fn start(cfg: Config, steps: Option<&Steps>) -> Agent {
    let name = cfg.node_id.to_string();
    let agent = Agent::start(cfg, steps.map(|s| s.observer()))
        .await
        .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
    assert!(agent.connected(WAIT).await, "{name} did not connect");
    agent
}

/// The provider's current flavours (Available Resources).
pub fn flavours(a: &Agent) -> Vec<Flavour> {
    a.tables()
        .flavours()
        .expect("flavours")
        .into_iter()
        .map(|o| o.flavour)
        .collect()
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    assert!(within(WAIT, cond).await, "timed out waiting for {what}");
}

/// Polls `cond` until it holds (true) or `limit` passes (false).
pub async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A bare MQTT peer that speaks the protocol by hand.
pub struct Rogue {
    pub id: String,
    domain: String,
    client: AsyncClient,
    rx: mpsc::Receiver<(String, Vec<u8>)>,
    next: u64,
}

impl Rogue {
    /// Connects as `id` and subscribes to its own mail (waits for the SUBACK).
    pub async fn connect(port: u16, domain: &str, id: &str) -> Rogue {
        Rogue::connect_as(port, domain, id, &format!("{id}@{domain}")).await
    }

    /// Like [`Rogue::connect`] with another MQTT client id (to speak as a node that is
    /// itself connected, on a broker without ACLs).
    pub async fn connect_as(port: u16, domain: &str, id: &str, client_id: &str) -> Rogue {
        Rogue::connect_with(port, domain, id, client_id, None).await
    }

    /// Connects over mutual TLS with `files` (a certificate whose CN may differ from `id`:
    /// the rogue then claims a name that is not its own).
    pub async fn connect_tls(port: u16, domain: &str, id: &str, files: &TlsFiles) -> Rogue {
        let tls = rogue_tls(files);
        Rogue::connect_with(port, domain, id, &format!("{id}@{domain}"), Some(tls)).await
    }

    async fn connect_with(
        port: u16,
        domain: &str,
        id: &str,
        client_id: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Rogue {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_max_packet_size(128 * 1024, 128 * 1024);
        if let Some(tls) = tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let (tx, rx) = mpsc::channel(64);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        client
            .subscribe(
                format!("fluidos/v1/{domain}/to/{id}/from/+"),
                QoS::AtLeastOnce,
            )
            .await
            .expect("subscribe");
        tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("rogue SUBACK")
            .expect("rogue event loop");
        Rogue {
            id: id.into(),
            domain: domain.into(),
            client,
            rx,
            next: 1,
        }
    }

    /// Subscribes to any filter (waits until the broker took the request).
    pub async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }

    /// Publishes `payload` to any topic (QoS 1).
    pub async fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("publish");
    }

    /// The next publish received within `limit`, with its topic; `None` if none came.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes raw bytes to `to`'s mailbox, as this rogue.
    pub async fn send_raw(&self, to: &str, payload: Vec<u8>) {
        let topic = format!("fluidos/v1/{}/to/{to}/from/{}", self.domain, self.id);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }

    /// Sends a well-formed message; returns its id.
    pub async fn send(&mut self, to: &str, body: Body) -> u64 {
        let id = self.next;
        self.next += 1;
        let msg = Message {
            id,
            correlation: None,
            sent_at: fluidlet::unix_ms(),
            sender: Id::new(&self.id).expect("rogue id"),
            body,
        };
        self.send_raw(to, msg.encode().expect("encode")).await;
        id
    }

    /// The next message received, decoded (panics on timeout or undecodable bytes).
    pub async fn recv(&mut self) -> Message {
        let (topic, payload) = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("an answer in time")
            .expect("rogue channel open");
        Message::decode(&payload).unwrap_or_else(|e| panic!("undecodable answer on {topic}: {e}"))
    }
}

/// An intent for a small Deployment needing `cpu` millicores and `mem_gi` GiB on this
/// machine's architecture.
pub fn intent_spec(name: &str, cpu: u64, mem_gi: u64) -> fluidlet::orchestrator::IntentSpec {
    use fluidlet::model::LongText;
    fluidlet::orchestrator::IntentSpec {
        name: Id::new(name).expect("name"),
        namespace: Id::new(name).expect("namespace"),
        manifest: LongText::new(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n"
        ))
        .expect("manifest"),
        selector: want(cpu, mem_gi),
    }
}

/// A selector for at least `cpu` millicores, `mem_gi` GiB and one pod on this machine's
/// architecture.
pub fn want(cpu: u64, mem_gi: u64) -> fluidlet::model::FlavourSelector {
    use fluidlet::model::{FlavourSelector, Resources, Text};
    FlavourSelector {
        architecture: Some(Text::new(fluidlet::demo::k8s_arch()).expect("arch")),
        min: Some(Resources {
            cpu,
            memory: mem_gi << 30,
            pods: 1,
            storage: 0,
        }),
        ..Default::default()
    }
}

/// Every file under `dir`, recursively, with its contents.
pub fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                out.push((p, text));
            }
        }
    }
    out.sort();
    out
}

/// A rustls client config from PEM files without the node-id check (a rogue may lie).
fn rogue_tls(files: &TlsFiles) -> Arc<rustls::ClientConfig> {
    let cert = std::fs::read(&files.cert).expect("read cert");
    let cn = fluidlet::tls::identity(&pem_first_der(&cert))
        .expect("cert")
        .common_name;
    match Id::new(&cn) {
        Ok(id) => {
            fluidlet::tls::load(files, &id)
                .expect("tls material")
                .client
        }
        // A CN no node can have (a site broker's bridge, `bridge:SITE`): the same client
        // config, built here without the agent's node-id check.
        Err(_) => raw_client_tls(files),
    }
}

fn raw_client_tls(files: &TlsFiles) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("read cert")
        .collect::<Result<_, _>>()
        .expect("PEM certificates");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("PEM key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).expect("read CA") {
        roots.add(ca.expect("PEM CA")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("certificate and key");
    Arc::new(config)
}

fn pem_first_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .expect("PEM certificate")
        .to_vec()
}

/// The shipped `broker-config/domain.sh`.
pub fn domain_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/domain.sh")
}

/// A domain broker as shipped in `broker-config/`: a mosquitto on a free loopback port with
/// mutual TLS and the domain ACL, and freshly minted certificates. Killed on drop.
pub struct TlsDomain {
    pub domain: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Drop for TlsDomain {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the shipped `broker-config/domain.sh` with `args` (panics when it fails).
pub fn domain_sh(args: &[&str]) {
    run_script(args)
}

fn run_script(args: &[&str]) {
    let out = Command::new("sh")
        .arg(domain_script())
        .args(args)
        .output()
        .expect("run domain.sh");
    assert!(
        out.status.success(),
        "domain.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TlsDomain {
    /// Mints a domain and starts its broker; `None` (skip) when mosquitto or openssl is
    /// missing outside CI.
    pub fn start() -> Option<TlsDomain> {
        TlsDomain::start_with(|_, _| {})
    }

    /// Like [`TlsDomain::start`], running `prepare(dir, domain)` after `domain.sh init` and
    /// before the broker starts (to enrol what must be in the ACL from the start).
    pub fn start_with(prepare: impl FnOnce(&Path, &str)) -> Option<TlsDomain> {
        TlsDomain::start_at("127.0.0.1", &[], prepare)
    }

    /// Like [`TlsDomain::start`], listening on every address, with `host` among the names of
    /// the broker's certificate (for clients in containers that reach this host by `host`).
    pub fn start_public(host: &str) -> Option<TlsDomain> {
        TlsDomain::start_at("0.0.0.0", &[host], |_, _| {})
    }

    fn start_at(
        bind: &str,
        hosts: &[&str],
        prepare: impl FnOnce(&Path, &str),
    ) -> Option<TlsDomain> {
        let bin = mosquitto_path();
        let openssl = Command::new("openssl").arg("version").output().is_ok();
        // domain.sh init builds the broker plugin (broker-config/fluidos_retain.c).
        let plugin = ["mosquitto_broker.h", "mosquitto_plugin.h", "mosquitto.h"]
            .iter()
            .all(|h| Path::new("/usr/include").join(h).exists())
            && Command::new("gcc").arg("--version").output().is_ok();
        let (Some(bin), true, true) = (bin, openssl, plugin) else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "mosquitto, openssl, gcc or the mosquitto headers (mosquitto-dev, \
                     libmosquitto-dev) missing and CI is set: .ci/run must install them"
                );
            }
            eprintln!(
                "SKIPPED: mosquitto, openssl, gcc or the mosquitto headers (apt-get install \
                 mosquitto-dev libmosquitto-dev) not installed"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        // mosquitto started as root drops to its own user, which must reach the files.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let domain = fresh_domain();
        let port = free_port();
        let d = dir.path().to_str().expect("utf-8 path");
        let port_text = port.to_string();
        let mut args = vec!["init", d, &domain, &port_text, bind];
        args.extend_from_slice(hosts);
        run_script(&args);
        prepare(dir.path(), &domain);
        let conf = dir.path().join("mosquitto.conf");
        // Its log (connections at notice level) for tests that count them: broker_log.
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log file");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        let mut me = TlsDomain {
            domain,
            port,
            dir,
            child: Some(child),
        };
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(me);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(c) = &mut me.child {
            let _ = c.kill();
        }
        panic!("the TLS mosquitto did not listen on port {port}");
    }

    /// What the broker logged so far (mosquitto.conf's log types: errors to notices, which
    /// include every accepted connection: `New client connected from ... as ID@DOMAIN`).
    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The broker's process id (to read its memory use in /proc).
    pub fn broker_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Enrols `node` (mints its certificate) and returns its PEM files.
    pub fn enrol(&self, node: &str) -> TlsFiles {
        let d = self.dir.path().to_str().expect("utf-8 path");
        run_script(&["node", d, node]);
        let n = self.dir.path().join("nodes").join(node);
        TlsFiles {
            ca: n.join("domain-ca.pem"),
            cert: n.join("node.pem"),
            key: n.join("node.key"),
        }
    }

    /// A node config for `name` over mutual TLS with `files`.
    pub fn config(&self, name: &str, files: TlsFiles, data: &Path) -> Config {
        let mut cfg = config(name, &self.domain, self.port, data);
        cfg.tls = Some(files);
        cfg
    }
}

/// `docker ARGS...` with no input, its output kept (tests that run containers).
pub fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

/// A command's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
