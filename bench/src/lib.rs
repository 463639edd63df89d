//! Shared pieces of the benchmark and torture tools: a bare MQTT peer, provider processes,
//! hand-built REAR messages.

use fluidlet::model::{Flavour, Id, ReserveRequest, Resources};
use fluidlet::wire::{Body, Flavours, Message};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

pub type Res<T> = Result<T, String>;

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
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(256 * 1024, 256 * 1024)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(200);
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = watch::channel(0usize);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
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
    let cfg = dir.join(format!("{node}.toml"));
    std::fs::write(
        &cfg,
        provider_toml(node, domain, port, &dir.join(node), group_commit, offers),
    )
    .map_err(|e| e.to_string())?;
    let mut watcher = peer(
        port,
        &format!("watch-{node}@{domain}"),
        &[format!("fluidos/v1/{domain}/catalog/{node}")],
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

pub fn advert_flavour(payload: &[u8], offer: &str) -> Option<Id> {
    let m = Message::decode(payload).ok()?;
    let Body::Advert(Flavours { flavours }) = m.body else {
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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
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
        .map_err(|e| format!("cannot run cargo to build the agent: {e}"))?;
    if !status.success() {
        return Err("building the agent failed".into());
    }
    Ok(PathBuf::from("target/bench-agent/release/fluidlet"))
}
