//! The domain broker as shipped in `broker-config/` (mosquitto, mutual TLS, the domain ACL,
//! certificates minted by `domain.sh`) with fluidlet nodes and a rogue node on it.
//!
//! A rogue here holds a real certificate of the domain (its own), which is the threat the
//! ACL exists for: an enrolled node that tries to speak for, or listen to, another.

use fluidlet::model::{FlavourSelector, Id};
use fluidlet::wire::{Body, ErrorCode, Message};
use fluidlet_tests::{eventually, flavours, provider_config, start, want, Rogue, TlsDomain, WAIT};
use std::time::Duration;

/// A provider config for `name` in the TLS domain (the demo's partitionable pool).
fn tls_provider(d: &TlsDomain, name: &str, data: &std::path::Path) -> fluidlet::Config {
    let mut cfg = provider_config(name, &d.domain, d.port, data);
    cfg.tls = Some(d.enrol(name));
    cfg
}

/// Provider bob and consumer carol on the TLS domain, carol having seen bob's advert.
async fn bob_and_carol(
    d: &TlsDomain,
) -> ([tempfile::TempDir; 2], fluidlet::Agent, fluidlet::Agent) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let bob = start(tls_provider(d, "bob", dirs[0].path()), None).await;
    let carol = start(d.config("carol", d.enrol("carol"), dirs[1].path()), None).await;
    eventually("carol to see bob's advert", || {
        carol.candidates().all().len() == 1
    })
    .await;
    (dirs, bob, carol)
}

#[tokio::test]
async fn full_workflow_runs_over_mutual_tls() {
    let Some(d) = TlsDomain::start() else { return };
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let provider = start(tls_provider(&d, "prov", pd.path()), None).await;
    let consumer = start(d.config("cons", d.enrol("cons"), cd.path()), None).await;
    let spec = fluidlet_tests::intent_spec("web", 1000, 1);
    let intent = consumer.submit_intent(spec).await.expect("intent accepted");
    eventually("the intent to be placed over TLS", || {
        consumer
            .tables()
            .intent(&intent.id)
            .ok()
            .flatten()
            .is_some_and(|i| i.state == fluidlet::model::IntentState::Placed)
    })
    .await;
    let bought = consumer.tables().contracts().unwrap();
    let sold = provider.tables().contracts().unwrap();
    assert_eq!(bought.len(), 1);
    assert_eq!(sold.len(), 1);
    assert_eq!(bought[0].id, sold[0].id);
    assert_eq!(sold[0].buyer.as_str(), "cons");
    consumer.shutdown().await;
    provider.shutdown().await;
}

#[tokio::test]
async fn a_node_cannot_publish_as_another() {
    let Some(d) = TlsDomain::start() else { return };
    let (_dirs, bob, carol) = bob_and_carol(&d).await;
    let offered = flavours(&bob)[0].clone();
    let eve_files = d.enrol("eve");
    let mut eve = Rogue::connect_tls(d.port, &d.domain, "eve", &eve_files).await;
    let dom = &d.domain;

    // Eve writes as carol: a reservation for bob's whole pool in carol's name, a
    // discovery broadcast, a wipe and a fake of bob's catalog entry.
    let forged = Message {
        id: 1,
        correlation: None,
        sent_at: fluidlet::unix_ms(),
        sender: Id::new("carol").unwrap(),
        body: Body::ReserveFlavour(fluidlet::model::ReserveRequest {
            transaction: Id::new("forged-tx").unwrap(),
            flavour: offered.id.clone(),
            buyer: Id::new("carol").unwrap(),
            partition: None,
        }),
    };
    eve.publish(
        &format!("fluidos/v1/{dom}/to/bob/from/carol"),
        false,
        forged.encode().unwrap(),
    )
    .await;
    eve.publish(&format!("fluidos/v1/{dom}/catalog/bob"), true, Vec::new())
        .await;
    // Eve's own catalog entry claiming bob's flavour: the ACL lets it through (it is
    // eve's entry), the agents ignore it (the flavour's provider is not the topic's node).
    let mut fake = offered.clone();
    fake.id = Id::new("cheap").unwrap();
    fake.price.amount = 1;
    let advert = Message {
        id: 2,
        correlation: None,
        sent_at: fluidlet::unix_ms(),
        sender: Id::new("eve").unwrap(),
        body: Body::Advert(fluidlet::wire::Flavours {
            flavours: fluidlet::model::Bounded::from_slice_truncated(&[fake]),
            ..Default::default()
        }),
    };
    eve.publish(
        &format!("fluidos/v1/{dom}/catalog/eve"),
        true,
        advert.encode().unwrap(),
    )
    .await;
    // Then a legitimate request under eve's own name: when its answer is back, everything
    // eve sent before it has been through the broker.
    let id = eve
        .send(
            "bob",
            Body::ReserveFlavour(fluidlet::model::ReserveRequest {
                transaction: Id::new("eve-tx").unwrap(),
                flavour: Id::new("no-such-flavour").unwrap(),
                buyer: Id::new("eve").unwrap(),
                partition: None,
            }),
        )
        .await;
    let answer = eve.recv().await;
    assert_eq!(answer.correlation, Some(id));
    assert!(matches!(answer.body, Body::Error(_)), "{:?}", answer.body);

    assert!(
        bob.tables().contracts().unwrap().is_empty(),
        "the reservation forged in carol's name reached bob"
    );
    assert_eq!(flavours(&bob)[0].id, offered.id, "bob's pool is untouched");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = carol.candidates().all();
    assert_eq!(
        seen.len(),
        1,
        "carol knows bob's real flavour only: {seen:?}"
    );
    assert_eq!(
        seen[0].flavour.id, offered.id,
        "bob's catalog entry survived eve's wipe"
    );
    assert_eq!(seen[0].flavour.provider.as_str(), "bob");
    carol.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test]
async fn a_node_cannot_read_another_nodes_mail() {
    let Some(d) = TlsDomain::start() else { return };
    let (_dirs, bob, carol) = bob_and_carol(&d).await;
    let mut eve = Rogue::connect_tls(d.port, &d.domain, "eve", &d.enrol("eve")).await;
    let dom = &d.domain;
    // mosquitto grants these subscriptions and filters at delivery: what matters is that
    // nothing addressed to bob or carol is delivered.
    for f in [
        format!("fluidos/v1/{dom}/to/bob/from/+"),
        format!("fluidos/v1/{dom}/to/+/from/+"),
        "fluidos/#".to_string(),
        "#".to_string(),
    ] {
        eve.subscribe(&f).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let contract = carol
        .acquire(&want(1000, 1))
        .await
        .expect("carol buys from bob");
    carol.release(&contract.id).await.expect("carol releases");
    let mut topics = Vec::new();
    while let Some((topic, _)) = eve.recv_within(Duration::from_millis(500)).await {
        topics.push(topic);
    }
    assert!(
        topics.iter().any(|t| t.ends_with("/catalog/bob")),
        "eve does see the catalog (the test's subscriptions work): {topics:?}"
    );
    let leaked: Vec<_> = topics.iter().filter(|t| t.contains("/to/")).collect();
    assert!(leaked.is_empty(), "eve read others' mail: {leaked:?}");
    carol.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test]
async fn clients_without_a_domain_certificate_are_refused() {
    let Some(d) = TlsDomain::start() else { return };
    let Some(other) = TlsDomain::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A node enrolled in another domain (another CA) pointed at this broker.
    let mut foreign = d.config("stranger", other.enrol("stranger"), dir.path());
    foreign.broker.port = d.port;
    let node = fluidlet::Agent::start(foreign, None).await.expect("starts");
    assert!(
        !node.connected(Duration::from_secs(2)).await,
        "a certificate from another CA was accepted"
    );
    let status = node.broker_status();
    assert!(
        status.connects == 0 && status.last_error.is_some(),
        "{status:?}"
    );
    node.shutdown().await;

    // No client certificate at all, and plain MQTT, each from a bare client.
    let files = d.enrol("probe");
    let roots = {
        use rustls::pki_types::pem::PemObject;
        let mut r = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&files.ca).unwrap() {
            r.add(c.unwrap()).unwrap();
        }
        r
    };
    let no_cert = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    assert!(
        connack(d.port, Some(no_cert)).await.is_err(),
        "no client certificate accepted"
    );
    assert!(connack(d.port, None).await.is_err(), "plain MQTT accepted");
    // The same probe with its certificate gets in: the refusals above are about identity.
    let ok = rogue_config(&files);
    connack(d.port, Some(ok))
        .await
        .expect("an enrolled node connects");
}

fn rogue_config(files: &fluidlet::config::TlsFiles) -> rustls::ClientConfig {
    let loaded = fluidlet::tls::load(files, &Id::new("probe").unwrap()).unwrap();
    (*loaded.client).clone()
}

/// Connects once: Ok on CONNACK accepted, Err with the error otherwise.
async fn connack(port: u16, tls: Option<rustls::ClientConfig>) -> Result<(), String> {
    use rumqttc::{Event, MqttOptions, Packet};
    let mut opts = MqttOptions::new("probe", "127.0.0.1", port);
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
        ));
    }
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 8);
    let attempt = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return match a.code {
                        rumqttc::ConnectReturnCode::Success => Ok(()),
                        c => Err(format!("{c:?}")),
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
}

#[tokio::test]
async fn node_id_that_is_not_the_certificates_cn_is_refused_at_start() {
    let Some(d) = TlsDomain::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = d.config("mallory", d.enrol("alice"), dir.path());
    let e = fluidlet::Agent::start(cfg, None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("\"alice\"") && e.contains("\"mallory\"") && e.contains("CN"),
        "{e}"
    );
}

#[tokio::test]
async fn last_will_clears_the_catalog_entry_under_tls() {
    let Some(d) = TlsDomain::start() else { return };
    let (_dirs, bob, carol) = bob_and_carol(&d).await;
    bob.abort(); // a crash: the TLS connection drops without DISCONNECT
    eventually("the will to clear bob's catalog entry", || {
        carol.candidates().all().is_empty()
    })
    .await;
    // And the retained entry is gone for a node arriving later.
    let mut late = Rogue::connect_tls(d.port, &d.domain, "late", &d.enrol("late")).await;
    late.subscribe(&format!("fluidos/v1/{}/catalog/+", d.domain))
        .await;
    assert_eq!(late.recv_within(Duration::from_millis(500)).await, None);
    carol.shutdown().await;
}

#[tokio::test]
async fn error_answers_reach_only_the_sender() {
    // A forged envelope (sender carol on eve's topic) is answered to eve, the topic's sender,
    // never to carol: a rogue cannot make a provider spam a third node.
    let Some(d) = TlsDomain::start() else { return };
    let pd = tempfile::tempdir().unwrap();
    let bob = start(tls_provider(&d, "bob", pd.path()), None).await;
    let mut eve = Rogue::connect_tls(d.port, &d.domain, "eve", &d.enrol("eve")).await;
    let mut carol = Rogue::connect_tls(d.port, &d.domain, "carol", &d.enrol("carol")).await;
    let lie = Message {
        id: 7,
        correlation: None,
        sent_at: fluidlet::unix_ms(),
        sender: Id::new("carol").unwrap(),
        body: Body::ListFlavours(fluidlet::wire::ListFlavours {
            selector: FlavourSelector::default(),
        }),
    };
    eve.send_raw("bob", lie.encode().unwrap()).await;
    let answer = eve.recv().await;
    match &answer.body {
        Body::Error(e) => assert_eq!(e.code(), Some(ErrorCode::Unexpected), "{e:?}"),
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert_eq!(carol.recv_within(Duration::from_millis(300)).await, None);
    bob.shutdown().await;
}

#[tokio::test]
async fn two_clients_with_one_certificate_are_reported_instead_of_flapping_silently() {
    // The same certificate on two devices (here: two data dirs): the broker keeps only the
    // newest session, so each kicks the other off. The agents say so in their status.
    let Some(d) = TlsDomain::start() else { return };
    let files = d.enrol("twin");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = fluidlet::Agent::start(d.config("twin", files.clone(), a.path()), None)
        .await
        .unwrap();
    let two = fluidlet::Agent::start(d.config("twin", files, b.path()), None)
        .await
        .unwrap();
    let told = |n: &fluidlet::Agent| {
        n.broker_status()
            .last_error
            .is_some_and(|e| e.contains("another process or device is probably connected as twin"))
    };
    eventually("an agent to report the identity clash", || {
        told(&one) || told(&two)
    })
    .await;
    one.shutdown().await;
    two.shutdown().await;
}

/// Resident memory of a process, in KiB (VmRSS in /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_node_cannot_make_the_broker_keep_retained_messages_outside_its_catalog_entry() {
    // Eve floods retained 60 KB messages onto addressed topics the ACL lets her write
    // (`to/+/from/eve`). The broker plugin (broker-config/fluidos_retain.c) refuses every
    // one: a late recipient gets none of them and the broker's memory stays flat. Without
    // the plugin mosquitto keeps them all (2,000 x 60 KB: over 100 MB).
    let Some(d) = TlsDomain::start() else { return };
    let pid = d.broker_pid().expect("broker pid");
    let dom = d.domain.clone();
    let mut eve = Rogue::connect_tls(d.port, &dom, "eve", &d.enrol("eve")).await;
    let before = rss_kib(pid);
    let parked = vec![0x5a_u8; 60_000];
    const N: usize = 2_000;
    for n in 0..N {
        eve.publish(
            &format!("fluidos/v1/{dom}/to/nobody{n}/from/eve"),
            true,
            parked.clone(),
        )
        .await;
    }
    // A message to herself, after the flood: when it is back, the broker has handled
    // every publish before it (one connection's publishes are handled in order).
    eve.publish(
        &format!("fluidos/v1/{dom}/to/eve/from/eve"),
        false,
        b"done".to_vec(),
    )
    .await;
    let (topic, _) = eve
        .recv_within(Duration::from_secs(120))
        .await
        .expect("the flood went through the broker in time");
    assert!(topic.ends_with("/to/eve/from/eve"), "{topic}");
    let after = rss_kib(pid);
    eprintln!(
        "broker VmRSS: {before} KiB before, {after} KiB after {N} retained publishes of {} bytes",
        parked.len()
    );
    assert!(
        after < before + 10 * 1024,
        "the broker grew from {before} KiB to {after} KiB: it kept eve's retained messages"
    );
    // The addressees, arriving later, find nothing retained for them.
    for n in [0, N - 1] {
        let id = format!("nobody{n}");
        let mut late = Rogue::connect_tls(d.port, &dom, &id, &d.enrol(&id)).await;
        assert_eq!(
            late.recv_within(Duration::from_millis(500)).await,
            None,
            "a retained message from eve was kept for {id}"
        );
    }
}

#[tokio::test]
async fn a_catalog_entry_over_the_size_bound_is_refused_and_adverts_and_wills_still_work() {
    let Some(d) = TlsDomain::start() else { return };
    let dom = d.domain.clone();
    let eve = Rogue::connect_tls(d.port, &dom, "eve", &d.enrol("eve")).await;
    let catalog = format!("fluidos/v1/{dom}/catalog/eve");
    // The bound is the protocol's payload limit: exactly 16384 bytes is kept, one more is not.
    let at_bound = vec![1_u8; fluidlet::wire::MAX_PAYLOAD];
    eve.publish(&catalog, true, at_bound.clone()).await;
    eve.publish(&catalog, true, vec![2_u8; fluidlet::wire::MAX_PAYLOAD + 1])
        .await;
    let mut late = Rogue::connect_tls(d.port, &dom, "late", &d.enrol("late")).await;
    late.subscribe(&format!("fluidos/v1/{dom}/catalog/+")).await;
    let (topic, kept) = late
        .recv_within(WAIT)
        .await
        .expect("eve's catalog entry at the bound is kept");
    assert_eq!(topic, catalog);
    assert_eq!(
        kept, at_bound,
        "the oversized entry replaced the one at the bound"
    );
    assert_eq!(late.recv_within(Duration::from_millis(300)).await, None);

    // A real node's advert is retained and its will (an empty retained payload on its
    // own entry) clears it.
    let (_dirs, bob, carol) = bob_and_carol(&d).await;
    let mut later = Rogue::connect_tls(d.port, &dom, "later", &d.enrol("later")).await;
    later
        .subscribe(&format!("fluidos/v1/{dom}/catalog/bob"))
        .await;
    let (_, advert) = later
        .recv_within(WAIT)
        .await
        .expect("bob's advert retained");
    assert!(matches!(
        Message::decode(&advert).map(|m| m.body),
        Ok(Body::Advert(_))
    ));
    bob.abort();
    eventually("bob's will to clear his catalog entry", || {
        carol.candidates().all().is_empty()
    })
    .await;
    carol.shutdown().await;
}

/// `domain.sh site DIR SITE ...` on the test domain's directory: the site's bridge
/// certificate (CN `bridge:SITE`) and the core ACL's `user bridge:SITE` lines.
fn site_bridge(d: &TlsDomain, site: &str) -> fluidlet::config::TlsFiles {
    let dir = d.dir.path();
    let out = std::process::Command::new("sh")
        .arg(fluidlet_tests::domain_script())
        .arg("site")
        .arg(dir)
        .args([site, &format!("127.0.0.1:{}", d.port), "18884", "127.0.0.1"])
        .output()
        .expect("run domain.sh site");
    assert!(
        out.status.success(),
        "domain.sh site failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = dir.join("sites").join(site);
    fluidlet::config::TlsFiles {
        ca: s.join("domain-ca.pem"),
        cert: s.join("bridge.pem"),
        key: s.join("bridge.key"),
    }
}

#[tokio::test]
async fn a_site_bridge_may_retain_any_nodes_catalog_entry_within_the_bound_and_nothing_else() {
    // A site broker's bridge forwards every advert of its site's nodes, so the plugin lets a
    // `bridge:SITE` client retain on any node's catalog entry; still only there (one entry
    // per node id, none elsewhere) and within the size bound.
    let Some(d) = TlsDomain::start() else { return };
    let dom = d.domain.clone();
    let s1 = site_bridge(&d, "s1");
    let s2 = site_bridge(&d, "s2");
    // No node can be enrolled under a bridge's name.
    let out = std::process::Command::new("sh")
        .arg(fluidlet_tests::domain_script())
        .arg("node")
        .arg(d.dir.path())
        .arg("bridge:s1")
        .output()
        .expect("run domain.sh node");
    assert_eq!(out.status.code(), Some(2), "a node id with ':' is refused");
    // mosquitto re-reads its ACL file on SIGHUP.
    let pid = d.broker_pid().expect("broker pid").to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let bridge = Rogue::connect_tls(d.port, &dom, "bridge-s1", &s1).await;
    let t = |rest: &str| format!("fluidos/v1/{dom}/{rest}");
    bridge
        .publish(&t("catalog/gw-a"), true, b"advert of gw-a".to_vec())
        .await;
    let at_bound = vec![1_u8; fluidlet::wire::MAX_PAYLOAD];
    bridge
        .publish(&t("catalog/gw-b"), true, at_bound.clone())
        .await;
    bridge
        .publish(
            &t("catalog/gw-c"),
            true,
            vec![2_u8; fluidlet::wire::MAX_PAYLOAD + 1],
        )
        .await;
    bridge
        .publish(&t("catalog/gw:d"), true, b"not a node id".to_vec())
        .await;
    bridge
        .publish(&t("catalog/gw-e/x"), true, b"two levels".to_vec())
        .await;
    bridge
        .publish(&t("to/gw-f/from/gw-a"), true, b"parked mail".to_vec())
        .await;
    // Outside the domain's topics the ACL refuses the bridge anything.
    bridge
        .publish("fluidos/v1/other/catalog/gw-a", true, b"x".to_vec())
        .await;
    // Not retained, the bridge's mail goes through (the ACL gives it the domain's topics).
    let mut gw_f = Rogue::connect_tls(d.port, &dom, "gw-f", &d.enrol("gw-f")).await;
    bridge
        .publish(&t("to/gw-f/from/gw-a"), false, b"live mail".to_vec())
        .await;
    let (topic, live) = gw_f
        .recv_within(WAIT)
        .await
        .expect("the bridge's mail delivered");
    assert_eq!(
        (topic, live),
        (t("to/gw-f/from/gw-a"), b"live mail".to_vec())
    );

    // Another site's bridge, subscribing late to everything, finds exactly what was kept.
    let mut reader = Rogue::connect_tls(d.port, &dom, "bridge-s2", &s2).await;
    reader.subscribe("fluidos/#").await;
    let mut kept = std::collections::BTreeMap::new();
    while let Some((topic, payload)) = reader.recv_within(Duration::from_millis(800)).await {
        kept.insert(topic, payload);
    }
    assert_eq!(
        kept.keys().cloned().collect::<Vec<_>>(),
        [t("catalog/gw-a"), t("catalog/gw-b")],
        "retained: only node catalog entries within the bound"
    );
    assert_eq!(kept[&t("catalog/gw-b")], at_bound);
}

/// Runs `openssl s_client` against the broker with TLS 1.2 and one cipher suite; returns the
/// suite negotiated, or `None` if the handshake failed.
fn tls12_handshake(d: &TlsDomain, cipher: &str) -> Option<String> {
    let files = d.enrol(&format!("probe-{}", cipher.to_lowercase()));
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{}", d.port)])
        .args(["-tls1_2", "-cipher", cipher, "-CAfile"])
        .arg(&files.ca)
        .arg("-cert")
        .arg(&files.cert)
        .arg("-key")
        .arg(&files.key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let suite = text
        .lines()
        .find_map(|l| l.split_once("Cipher is ").map(|(_, c)| c.trim().to_owned()))?;
    (suite != "(NONE)").then_some(suite)
}

#[tokio::test]
async fn the_broker_accepts_only_aead_cipher_suites_for_tls_1_2() {
    let Some(d) = TlsDomain::start() else { return };
    for cbc in [
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-ECDSA-AES256-SHA384",
    ] {
        assert_eq!(tls12_handshake(&d, cbc), None, "{cbc} accepted");
    }
    for aead in [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ] {
        assert_eq!(
            tls12_handshake(&d, aead).as_deref(),
            Some(aead),
            "{aead} refused"
        );
    }
}
