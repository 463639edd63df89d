//! The floor of the gateway binary's size: a program that uses every crate of the mission's
//! stack for real (a TLS MQTT session, a sled tree written and flushed, a CBOR round trip, a
//! heapless vector, a log line) and nothing else. `cross/gateway-build.sh TARGET
//! fluidlet-size-floor` builds it with the gateway's flags; the benchmark prints the gateway
//! binary's size against it (docs/benchmarks.md, "Gateway binary size").
//!
//! Usage: `fluidlet-size-floor HOST PORT DIR`: connects to an MQTT broker over TLS (trusting
//! no root, so the handshake fails; the code is linked all the same), stores a record in DIR.

use minicbor::{Decode, Encode};
use std::sync::Arc;

#[derive(Encode, Decode, Debug, PartialEq)]
#[cbor(map)]
struct Record {
    #[n(0)]
    id: String,
    #[n(1)]
    value: u64,
}

fn main() {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::level_filters::LevelFilter::INFO);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let (host, port, dir) = match args.as_slice() {
        [_, h, p, d] => (h.clone(), p.parse().unwrap_or(8883), d.clone()),
        _ => ("127.0.0.1".into(), 8883, "floor-db".into()),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("runtime: {e}"),
    };
    rt.block_on(run(host, port, dir));
}

async fn run(host: String, port: u16, dir: String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let record = Record {
        id: "floor".into(),
        value: 1,
    };
    let bytes = minicbor::to_vec(&record).unwrap_or_default();
    let back: Option<Record> = minicbor::decode(&bytes).ok();
    let mut ids: heapless::Vec<u64, 8> = heapless::Vec::new();
    let _ = ids.push(back.map_or(0, |r| r.value));
    match sled::Config::new().path(&dir).open() {
        Ok(db) => {
            let _ = db.insert(b"floor", bytes.as_slice());
            let _ = db.flush_async().await;
        }
        Err(e) => tracing::warn!(error = %e, "sled"),
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut opts = rumqttc::MqttOptions::new("floor", host, port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 8);
    let _ = client
        .publish("floor", rumqttc::QoS::AtLeastOnce, false, bytes)
        .await;
    for _ in 0..3 {
        tokio::select! {
            e = events.poll() => tracing::info!(event = ?e, ids = ids.len(), "mqtt"),
            _ = tokio::signal::ctrl_c() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => return,
        }
    }
}
