//! Revoking a node on the domain broker as shipped in `broker-config/`: `domain.sh revoke`
//! and `list`, a real CRL loaded by mosquitto (`crlfile`, re-read on SIGHUP), and the
//! retained-storage plugin cutting the revoked node's live session off and clearing its
//! catalog entry (docs/security.md, "Revoking a node").

use fluidlet::config::TlsFiles;
use fluidlet::model::Id;
use fluidlet_tests::{domain_script, eventually, provider_config, start, Rogue, TlsDomain, WAIT};
use std::process::Command;
use std::time::Duration;

/// Runs `domain.sh ARGS...`; returns (exit code, stdout, stderr).
fn domain_sh(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("sh")
        .arg(domain_script())
        .args(args)
        .output()
        .expect("run domain.sh");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dir(d: &TlsDomain) -> &str {
    d.dir.path().to_str().expect("utf-8 path")
}

/// `domain.sh list DIR` as (node, serial, status) rows.
fn list(d: &TlsDomain) -> Vec<(String, String, String)> {
    let (code, out, err) = domain_sh(&["list", dir(d)]);
    assert_eq!(code, Some(0), "list failed: {err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("node\tserial\tnot_after\tstatus"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 4, "{l}");
            (f[0].to_owned(), f[1].to_owned(), f[3].to_owned())
        })
        .collect()
}

/// The serial of a PEM certificate, as openssl prints it.
fn serial(files: &TlsFiles) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&files.cert)
        .output()
        .expect("openssl x509");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

/// The serials the CRL `DIR/crl.pem` lists, read back with `openssl crl`.
fn crl_serials(d: &TlsDomain) -> Vec<String> {
    let out = Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(d.dir.path().join("crl.pem"))
        .output()
        .expect("openssl crl");
    assert!(out.status.success(), "crl.pem is not a CRL");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Serial Number: "))
        .map(|s| s.trim().to_uppercase())
        .collect()
}

/// `kill -HUP` the broker: mosquitto re-reads its config, its CRL and the plugin its list.
fn reload(d: &TlsDomain) {
    let pid = d.broker_pid().expect("broker pid").to_string();
    let hup = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
}

/// One MQTT connection attempt with `files`: Ok on an accepted CONNACK, Err otherwise.
async fn connack(port: u16, node: &str, files: &TlsFiles) -> Result<(), String> {
    use rumqttc::{Event, MqttOptions, Packet};
    let loaded = fluidlet::tls::load(files, &Id::new(node).unwrap()).unwrap();
    let mut opts = MqttOptions::new(format!("probe-{node}"), "127.0.0.1", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(loaded.client),
    ));
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
async fn domain_sh_lists_nodes_and_revoke_puts_the_serial_in_the_crl() {
    let Some(d) = TlsDomain::start() else { return };
    let alice = d.enrol("alice");
    let bob = d.enrol("bob");
    let rows = list(&d);
    assert_eq!(
        rows,
        [
            ("alice".to_owned(), serial(&alice), "valid".to_owned()),
            ("bob".to_owned(), serial(&bob), "valid".to_owned()),
        ]
    );
    assert!(crl_serials(&d).is_empty(), "a fresh domain revokes nothing");

    let (code, out, err) = domain_sh(&["revoke", dir(&d), "alice"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("revoked") && out.contains("kill -HUP"),
        "{out}"
    );
    assert_eq!(list(&d)[0].2, "revoked");
    assert_eq!(list(&d)[1].2, "valid");
    assert_eq!(crl_serials(&d), [serial(&alice)]);
    let revoked = std::fs::read_to_string(d.dir.path().join("revoked")).unwrap();
    assert_eq!(revoked, "alice\n");

    // Again: nothing new, the CRL unchanged, the list file without a duplicate.
    let (code, out, _) = domain_sh(&["revoke", dir(&d), "alice"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("already revoked"), "{out}");
    assert_eq!(crl_serials(&d), [serial(&alice)]);
    let revoked = std::fs::read_to_string(d.dir.path().join("revoked")).unwrap();
    assert_eq!(revoked, "alice\n");

    // A node never enrolled, an id no certificate can have: refused, exit 2.
    let (code, _, err) = domain_sh(&["revoke", dir(&d), "nobody"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no certificate of node 'nobody'"), "{err}");
    assert_eq!(domain_sh(&["revoke", dir(&d), "a/b"]).0, Some(2));
    // A revoked id is retired: it cannot be enrolled again.
    std::fs::remove_dir_all(d.dir.path().join("nodes/alice")).unwrap();
    let (code, _, err) = domain_sh(&["node", dir(&d), "alice"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("was revoked"), "{err}");
}

#[tokio::test]
async fn a_revoked_node_is_cut_off_its_advert_cleared_and_refused_on_reconnect() {
    let Some(d) = TlsDomain::start() else { return };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let bob_files = d.enrol("bob");
    let mut bob_cfg = provider_config("bob", &d.domain, d.port, dirs[0].path());
    bob_cfg.tls = Some(bob_files.clone());
    let bob = start(bob_cfg, None).await;
    let carol = start(d.config("carol", d.enrol("carol"), dirs[1].path()), None).await;
    eventually("carol to see bob's advert", || {
        carol.candidates().all().len() == 1
    })
    .await;
    // eve is a bare client with a retained advert and no will: only the plugin can clear it.
    let eve_files = d.enrol("eve");
    let eve = Rogue::connect_tls(d.port, &d.domain, "eve", &eve_files).await;
    let eve_topic = format!("fluidos/v1/{}/catalog/eve", d.domain);
    eve.publish(&eve_topic, true, b"eve's advert".to_vec())
        .await;
    let mut watcher = Rogue::connect_tls(d.port, &d.domain, "watcher", &d.enrol("watcher")).await;
    watcher
        .subscribe(&format!("fluidos/v1/{}/catalog/+", d.domain))
        .await;
    let mut seen = std::collections::BTreeMap::new();
    while let Some((t, p)) = watcher.recv_within(Duration::from_millis(500)).await {
        seen.insert(t, p);
    }
    assert_eq!(
        seen.get(&eve_topic).map(Vec::as_slice),
        Some(&b"eve's advert"[..])
    );

    for node in ["bob", "eve"] {
        let (code, _, err) = domain_sh(&["revoke", dir(&d), node]);
        assert_eq!(code, Some(0), "{err}");
    }
    reload(&d);

    // Cut off at once: bob's session drops (its will clears its advert at carol) and eve's
    // retained advert is cleared by the broker.
    eventually("bob's advert to leave carol's catalog", || {
        carol.candidates().all().is_empty()
    })
    .await;
    eventually("bob to be disconnected", || !bob.broker_status().connected).await;
    let mut cleared = false;
    while let Some((t, p)) = watcher.recv_within(WAIT).await {
        if t == eve_topic && p.is_empty() {
            cleared = true;
            break;
        }
    }
    assert!(cleared, "eve's retained advert was not cleared");
    // Nothing of either is retained for a node arriving later.
    let mut late = Rogue::connect_tls(d.port, &d.domain, "late", &d.enrol("late")).await;
    late.subscribe(&format!("fluidos/v1/{}/catalog/+", d.domain))
        .await;
    assert_eq!(late.recv_within(Duration::from_millis(500)).await, None);

    // And refused at the handshake from now on (the CRL), while others still get in.
    let e = connack(d.port, "bob", &bob_files).await.unwrap_err();
    assert!(!e.is_empty());
    assert!(connack(d.port, "eve", &eve_files).await.is_err());
    assert!(
        !bob.connected(Duration::from_secs(2)).await,
        "bob got back in"
    );
    assert!(bob.broker_status().last_error.is_some());
    connack(d.port, "fresh", &d.enrol("fresh"))
        .await
        .expect("a node not revoked connects");
    assert!(carol.connected(WAIT).await, "carol was cut off too");
    carol.shutdown().await;
    bob.shutdown().await;
}
