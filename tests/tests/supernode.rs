//! The REAR-over-HTTP face (fluidlet-supernode), inbound: an imitation of the FLUIDOS
//! reference node's client (tests/src/refnode.rs, written from fluidos-project/node 9018b69)
//! lists, reserves and purchases a fluidlet provider's flavour through the face, over the
//! domain broker as shipped (mosquitto, mutual TLS, the ACL and plugin) and the dry-run
//! fabric, and gets the peering kubeconfig; the provider's tables hold the contract, sold to
//! the reference node's own buyer id. No real reference node is run.

use fluidlet::model::{ContractState, Id};
use fluidlet_supernode::{Config, Supernode};
use fluidlet_tests::refnode::{self, base64_decode, fact, get, k8slice_configuration, s, Client};
use fluidlet_tests::{domain_sh, eventually, flavours, free_port, provider_config, start, Rogue};
use fluidlet_tests::{TlsDomain, WAIT};
use std::path::Path;

const DRY_IDENTITY: &str = "kubeconfig of Liqo's peering user";
const LIQO_ID: &str = "fluidos-consumer-1";
/// A second admitted reference node, and one never admitted.
const LIQO_B: &str = "fluidos-consumer-2";
const LIQO_STRANGER: &str = "fluidos-stranger";

fn face_config(d: &TlsDomain, data: &Path, http_port: u16) -> Config {
    face_config_with(d, data, http_port, "")
}

/// With more `[http]` keys.
fn face_config_with(d: &TlsDomain, data: &Path, http_port: u16, http: &str) -> Config {
    let sn = d.dir.path().join("supernodes/sn1");
    let toml = format!(
        r#"
name = "sn1"
domain = "{domain}"
data_dir = "{data}"
[broker]
host = "127.0.0.1"
port = {port}
ca = "{sn}/domain-ca.pem"
cert = "{sn}/supernode.pem"
key = "{sn}/supernode.key"
[refs]
dir = "{sn}/refs"
[http]
listen = "127.0.0.1:{http_port}"
advertise = "127.0.0.1:{http_port}"
insecure_plaintext = true
{http}
[timeouts]
reserve_secs = 5
peer_request_secs = 30
"#,
        domain = d.domain,
        data = data.display(),
        port = d.port,
        sn = sn.display(),
    );
    Config::from_toml(&toml).expect("face config")
}

/// A domain with supernode `sn1` and the reference node LIQO_ID admitted, in the ACL
/// before the broker starts.
fn domain() -> Option<TlsDomain> {
    TlsDomain::start_with(|dir, _| {
        let d = dir.to_str().expect("utf-8");
        domain_sh(&["supernode", d, "sn1"]);
        domain_sh(&["refnode", d, "sn1", LIQO_ID]);
        domain_sh(&["refnode", d, "sn1", LIQO_B]);
    })
}

async fn face(cfg: Config) -> Supernode {
    let s = Supernode::start(cfg).await.expect("face starts");
    eventually("the face to reach the broker", || s.ready()).await;
    s
}

/// Every key of the object `v` is one the reference node's struct has (the facts' list at
/// `path`), and every key the facts call `required` is there.
fn keys_within(v: &serde_json::Value, path: &str, required: &[&str]) {
    let allowed = refnode::facts();
    let mut a = &allowed;
    for k in path.split('.') {
        a = &a[k];
    }
    let allowed: Vec<&str> = a
        .as_array()
        .expect(path)
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{path}: not an object: {v}"));
    for k in obj.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{path}: key {k:?} is not the reference node's ({allowed:?})"
        );
    }
    for r in required {
        assert!(obj.contains_key(*r), "{path}: {r:?} missing from {v}");
    }
}

fn ref_client(addr: &str) -> Client {
    Client {
        node_id: "fluidos-node-a".into(),
        ip: addr.into(),
        domain: "fluidos.eu".into(),
        liqo_id: LIQO_ID.into(),
    }
}

#[tokio::test]
async fn a_reference_node_lists_reserves_and_purchases_a_fluidlet_flavour_through_the_face() {
    let Some(d) = domain() else { return };
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("alice", &d.domain, d.port, pd.path());
    pcfg.tls = Some(d.enrol("alice"));
    let alice = start(pcfg, None).await;
    let fd = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let addr = format!("127.0.0.1:{http_port}");
    let mut sn = face(face_config(&d, fd.path(), http_port)).await;
    let me = ref_client("10.0.0.9:3004");

    // Discovery: the provider's flavour, as the Go consumer forges it.
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = me.discover(&addr, None).await.expect("discovery");
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(listed.len(), 1, "{listed:?}");
    let f = listed[0].clone();
    assert_eq!(f.provider, "alice");
    assert_eq!(f.owner_ip, addr, "owner.IP is where the face is reached");
    // The demo offer: 4 CPUs, 8 GiB, 110 pods, pieces of 500m, in canonical quantities.
    assert_eq!(
        (f.cpu.as_str(), f.memory.as_str(), f.pods.as_str()),
        ("4", "8Gi", "110")
    );
    assert_eq!((f.cpu_min.as_str(), f.cpu_step.as_str()), ("500m", "500m"));
    let offered = flavours(&alice)[0].clone();
    assert_eq!(f.architecture, offered.architecture.as_str());
    // The typo keys are the ones written (the Go decoder matches keys case-insensitively,
    // so only a different spelling could be missed: it is absent).
    let data = get(get(&f.raw, "type"), "data");
    assert!(data.get("charateristics").is_some() && data.get("characteristics").is_none());
    assert_eq!(
        s(get(&f.raw, "type"), "name"),
        fact("json.flavor.type_name")
    );
    assert!(get(&f.raw, "price")
        .get("amount")
        .is_some_and(|a| a.is_string()));

    // Selector: a match, no match (200 []), a bad key (400).
    let hit = me
        .discover(
            &addr,
            Some("filter[cpu][range][min]=1&filter[memory][range][max]=16Gi"),
        )
        .await
        .unwrap();
    assert_eq!(hit.len(), 1);
    let none = refnode::request(
        &addr,
        "GET",
        "/api/v2/flavors/k8slice?filter[cpu][range][min]=64",
        None,
    )
    .await;
    assert_eq!((none.status, none.text().as_str()), (200, "[]"));
    let bad = refnode::request(&addr, "GET", "/api/v2/flavors/k8slice?cpu=1", None).await;
    assert_eq!(bad.status, 400, "{}", bad.text());

    // Reserve: without a liqoID 400, an unknown flavour 404, then a piece.
    let nobody = Client {
        liqo_id: String::new(),
        ..ref_client("10.0.0.8:3004")
    };
    assert_eq!(nobody.reserve(&f, None).await.unwrap_err().0, 400);
    let mut ghost = f.clone();
    ghost.id = "fl-000000000000000000000000".into();
    assert_eq!(me.reserve(&ghost, None).await.unwrap_err().0, 404);
    let piece = k8slice_configuration("1", "2Gi", "1");
    let t = me.reserve(&f, Some(piece.clone())).await.expect("reserved");
    let tid = s(&t, "transactionID");
    assert_eq!(s(&t, "flavorID"), f.id);
    assert_eq!(s(&t, "clusterID"), LIQO_ID);
    assert_eq!(
        s(get(&t, fact("json.transaction.buyer_key").as_str()), "ID"),
        "fluidos-node-a"
    );
    assert!(s(&t, "expirationTime").ends_with('Z'), "{t}");
    keys_within(
        &t,
        "json.transaction.keys",
        &[
            "transactionID",
            "flavorID",
            "buyer",
            "clusterID",
            "expirationTime",
        ],
    );
    // The same buyer and flavour again: the same transaction.
    let again = me.reserve(&f, Some(piece)).await.expect("repeat");
    assert_eq!(s(&again, "transactionID"), tid);

    // The provider sold it to the reference node's own buyer id, not to the face.
    let buyer = fluidlet_supernode::domain::buyer_id(LIQO_ID);
    let contracts = alice.tables().contracts().unwrap();
    assert_eq!(contracts.len(), 1, "{contracts:?}");
    assert_eq!(contracts[0].buyer.as_str(), buyer);
    assert_eq!(contracts[0].state, ContractState::Reserved);
    assert_eq!(contracts[0].resources.cpu, 1000);

    // The face restarts between reserve and purchase: nothing is lost.
    sn.shutdown().await;
    sn = face(face_config(&d, fd.path(), http_port)).await;

    let c = me.purchase(&addr, &tid).await.expect("purchased");
    assert_eq!(s(&c, "transactionID"), tid);
    assert_eq!(s(&c, "contractID"), contracts[0].id.as_str());
    assert_eq!(
        s(get(&c, fact("json.contract.buyer_key").as_str()), "ID"),
        "fluidos-node-a"
    );
    assert_eq!(s(&c, "buyerClusterID"), LIQO_ID);
    assert_eq!(s(get(&c, "seller"), "ID"), "alice");
    keys_within(
        &c,
        "json.contract.keys",
        &[
            "contractID",
            "transactionID",
            "flavor",
            "buyerID",
            "seller",
            "peeringTargetCredentials",
        ],
    );
    let creds = get(&c, "peeringTargetCredentials");
    keys_within(
        creds,
        "json.contract.credentials_keys",
        &["clusterID", "kubeconfig"],
    );
    assert!(!s(creds, "clusterID").is_empty(), "{c}");
    let kubeconfig = base64_decode(&s(creds, "kubeconfig")).expect("base64 kubeconfig");
    let kubeconfig = String::from_utf8(kubeconfig).unwrap();
    assert!(kubeconfig.contains(DRY_IDENTITY), "{kubeconfig}");
    assert!(
        kubeconfig.contains(LIQO_ID),
        "granted for the reference node's cluster: {kubeconfig}"
    );
    let active = alice.tables().contract(&contracts[0].id).unwrap().unwrap();
    assert_eq!(active.state, ContractState::Active);

    // A repeated purchase gets the contract again (the reference node would answer 500:
    // docs/supernode.md); an unknown transaction is 500 as there.
    let c2 = me.purchase(&addr, &tid).await.expect("repeat purchase");
    assert_eq!(s(&c2, "contractID"), s(&c, "contractID"));
    assert_eq!(me.purchase(&addr, "nope-1").await.unwrap_err().0, 500);
    let recs = sn.transactions();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].buyer, buyer);

    sn.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test]
async fn the_supernode_certificate_speaks_and_hears_only_as_reference_buyers() {
    let Some(d) = domain() else { return };
    let sn = d.dir.path().join("supernodes/sn1");
    let files = fluidlet::config::TlsFiles {
        ca: sn.join("domain-ca.pem"),
        cert: sn.join("supernode.pem"),
        key: sn.join("supernode.key"),
    };
    let mut face = Rogue::connect_tls(d.port, &d.domain, "ref-0123", &files).await;
    face.subscribe(&format!("fluidos/v1/{}/to/+/from/+", d.domain))
        .await;
    let mut bob = Rogue::connect_tls(d.port, &d.domain, "bob", &d.enrol("bob")).await;
    let mut carol = Rogue::connect_tls(d.port, &d.domain, "carol", &d.enrol("carol")).await;
    let dom = &d.domain;

    // Writing: as a ref- buyer it reaches bob; as carol (a fluidlet node) it does not.
    face.publish(
        &format!("fluidos/v1/{dom}/to/bob/from/carol"),
        false,
        b"forged".to_vec(),
    )
    .await;
    face.publish(
        &format!("fluidos/v1/{dom}/to/bob/from/ref-0123"),
        false,
        b"as-ref".to_vec(),
    )
    .await;
    let (topic, payload) = bob
        .recv_within(WAIT)
        .await
        .expect("bob hears the ref- buyer");
    assert_eq!(payload, b"as-ref", "{topic}");
    assert!(topic.ends_with("/from/ref-0123"));

    // Reading: mail for carol never reaches it; mail for a ref- buyer does.
    bob.publish(
        &format!("fluidos/v1/{dom}/to/carol/from/bob"),
        false,
        b"private".to_vec(),
    )
    .await;
    let (t, p) = carol.recv_within(WAIT).await.expect("carol gets her mail");
    assert_eq!(p, b"private", "{t}");
    bob.publish(
        &format!("fluidos/v1/{dom}/to/ref-0123/from/bob"),
        false,
        b"for-ref".to_vec(),
    )
    .await;
    // Everything the face receives, in order: only the ref- mail (the forged publish to bob
    // was never delivered, so bob got nothing else either).
    let (t, p) = face
        .recv_within(WAIT)
        .await
        .expect("the face hears ref- mail");
    assert_eq!(p, b"for-ref", "the face heard {t}");

    // And no node can be enrolled under a ref- id.
    let out = std::process::Command::new("sh")
        .arg(fluidlet_tests::domain_script())
        .args(["node", d.dir.path().to_str().unwrap(), "ref-0123"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn a_purchase_after_the_providers_reservation_lapsed_is_a_timeout() {
    let Some(d) = domain() else { return };
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("alice", &d.domain, d.port, pd.path());
    pcfg.tls = Some(d.enrol("alice"));
    pcfg.reservation_ttl = std::time::Duration::from_secs(1);
    let alice = start(pcfg, None).await;
    let fd = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let addr = format!("127.0.0.1:{http_port}");
    let sn = face(face_config(&d, fd.path(), http_port)).await;
    let me = ref_client("10.0.0.9:3004");
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = me.discover(&addr, None).await.expect("discovery");
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let f = listed.first().expect("a flavour").clone();
    let t = me
        .reserve(&f, Some(k8slice_configuration("500m", "1Gi", "1")))
        .await
        .expect("reserved");
    let tid = s(&t, "transactionID");
    eventually("the provider to expire the reservation", || {
        alice
            .tables()
            .contracts()
            .unwrap()
            .iter()
            .all(|c| c.state == ContractState::Expired)
    })
    .await;
    // 408 as the reference node answers past a transaction's expiry; the transaction is
    // then gone (500), as there.
    let (status, text) = me.purchase(&addr, &tid).await.unwrap_err();
    assert_eq!(status, 408, "{text}");
    assert_eq!(me.purchase(&addr, &tid).await.unwrap_err().0, 500);
    sn.shutdown().await;
    alice.shutdown().await;
}

/// Lists the face until it shows a flavour (the catalog arrives after the face connects).
async fn first_flavour(me: &Client, addr: &str) -> refnode::Flavor {
    for _ in 0..100 {
        if let Some(f) = me.discover(addr, None).await.expect("discovery").first() {
            return f.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the face listed nothing");
}

#[tokio::test]
async fn each_reference_node_is_a_buyer_of_its_own_at_the_provider() {
    let Some(d) = domain() else { return };
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("alice", &d.domain, d.port, pd.path());
    pcfg.tls = Some(d.enrol("alice"));
    pcfg.limits.pending_per_buyer = 1;
    let alice = start(pcfg, None).await;
    let fd = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let addr = format!("127.0.0.1:{http_port}");
    let sn = face(face_config(&d, fd.path(), http_port)).await;
    let a = ref_client("10.0.0.9:3004");
    let f = first_flavour(&a, &addr).await;
    let piece = || Some(k8slice_configuration("500m", "1Gi", "1"));

    a.reserve(&f, piece()).await.expect("A's first reservation");
    // A second transaction of A (another node id, same Liqo cluster: the same buyer) is over
    // the provider's pending limit for that buyer...
    let a2 = Client {
        node_id: "fluidos-node-a2".into(),
        ..ref_client("10.0.0.9:3004")
    };
    let (status, text) = a2.reserve(&f, piece()).await.unwrap_err();
    assert_eq!(status, 429, "{text}");
    // ...while B, another reference node, is a buyer of its own.
    let b = Client {
        node_id: "fluidos-node-b".into(),
        liqo_id: LIQO_B.into(),
        ..ref_client("10.0.0.7:3004")
    };
    b.reserve(&f, piece()).await.expect("B's reservation");
    let mut buyers: Vec<String> = alice
        .tables()
        .contracts()
        .unwrap()
        .into_iter()
        .map(|c| c.buyer.to_string())
        .collect();
    buyers.sort();
    let mut want = vec![
        fluidlet_supernode::domain::buyer_id(LIQO_ID),
        fluidlet_supernode::domain::buyer_id(LIQO_B),
    ];
    want.sort();
    assert_eq!(buyers, want);
    // A reference node nobody admitted (domain.sh refnode) cannot buy: 403, nothing sent.
    let stranger = Client {
        liqo_id: LIQO_STRANGER.into(),
        ..ref_client("10.0.0.6:3004")
    };
    let (status, text) = stranger.reserve(&f, piece()).await.unwrap_err();
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("domain.sh refnode"), "{text}");
    assert_eq!(alice.tables().contracts().unwrap().len(), 2);
    sn.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test]
async fn a_purchase_cut_by_a_restart_of_the_face_is_completed_by_the_retry() {
    let Some(d) = domain() else { return };
    let pd = tempfile::tempdir().unwrap();
    let alice_files = d.enrol("alice");
    let alice_cfg = || {
        let mut c = provider_config("alice", &d.domain, d.port, pd.path());
        c.tls = Some(alice_files.clone());
        c
    };
    let alice = start(alice_cfg(), None).await;
    let fd = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let addr = format!("127.0.0.1:{http_port}");
    let sn = face(face_config(&d, fd.path(), http_port)).await;
    let me = ref_client("10.0.0.9:3004");
    let f = first_flavour(&me, &addr).await;
    let t = me
        .reserve(&f, Some(k8slice_configuration("1", "1Gi", "1")))
        .await
        .expect("reserved");
    let tid = s(&t, "transactionID");

    // The provider is away, so the purchase waits for PEER_ACCEPT; the face stops meanwhile.
    alice.shutdown().await;
    let cut = {
        let addr = addr.clone();
        let tid = tid.clone();
        tokio::spawn(async move { ref_client("10.0.0.9:3004").purchase(&addr, &tid).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sn.shutdown().await;
    // The cut request got no contract (its connection closed without an answer).
    assert!(
        !matches!(cut.await, Ok(Ok(_))),
        "the cut purchase was answered"
    );
    // Both come back; the reference node retries its purchase and gets the contract.
    let alice = start(alice_cfg(), None).await;
    let sn = face(face_config(&d, fd.path(), http_port)).await;
    let c = me
        .purchase(&addr, &tid)
        .await
        .expect("the retried purchase");
    let creds = get(&c, "peeringTargetCredentials");
    let kubeconfig = String::from_utf8(base64_decode(&s(creds, "kubeconfig")).unwrap()).unwrap();
    assert!(kubeconfig.contains(DRY_IDENTITY), "{kubeconfig}");
    let contract = Id::new(&s(&c, "contractID")).unwrap();
    let held = alice.tables().contract(&contract).unwrap().unwrap();
    assert_eq!(held.state, ContractState::Active);
    sn.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test]
async fn connections_heads_and_the_request_rate_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(d) = domain() else { return };
    let fd = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let addr = format!("127.0.0.1:{http_port}");
    let extra = "max_connections = 2\nheader_timeout_secs = 1\nrequests_per_second = 5";
    let sn = face(face_config_with(&d, fd.path(), http_port, extra)).await;

    // Two connections that never finish their request head hold both places...
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /api/v2/flavors HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        idle.push(c);
    }
    // ...so a third request is served only once the face has closed them (head timeout).
    let a = refnode::request(&addr, "GET", "/api/v2/flavors", None).await;
    assert!(matches!(a.status, 200 | 204), "{a:?}");
    // The idle two were already closed when the third was served: reading them does not
    // block (with a larger max_connections they would still be open, and this fails).
    // (A read with a short wait, not try_read: try_read answers WouldBlock until the
    // reactor has seen the close, which a loaded machine may not have yet. The wait is well
    // under the head timeout, so a connection still open fails it.)
    for mut c in idle {
        let mut buf = [0u8; 1024];
        let r = tokio::time::timeout(std::time::Duration::from_millis(400), c.read(&mut buf)).await;
        assert!(
            r.is_ok(),
            "an idle connection was still open when the third request was served"
        );
        let n = r.ok().and_then(Result::ok).unwrap_or(0);
        assert!(
            n == 0 || buf.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    // A head over 16 KiB is refused, not buffered.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let long = format!(
        "GET /api/v2/flavors HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = c.write_all(long.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut buf))
        .await
        .expect("answered or closed");
    assert!(
        !buf.starts_with(b"HTTP/1.1 2"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );

    // The rate: 5 a second for the whole face; 40 at once get some 429s.
    let mut limited = 0;
    for _ in 0..40 {
        if refnode::request(&addr, "GET", "/api/v2/flavors", None)
            .await
            .status
            == 429
        {
            limited += 1;
        }
    }
    assert!(limited > 0, "no request was limited");
    sn.shutdown().await;
}
