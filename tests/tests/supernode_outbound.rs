//! The REAR-over-HTTP face, outbound: fluidlet consumers buy from FLUIDOS reference nodes.
//! The reference nodes are imitations of the reference node's REAR gateway written from its
//! source (tests/src/refnode.rs, `Provider`); the face polls them, advertises their flavours
//! in the domain catalog under a provider id of each one's own, and maps RESERVE_FLAVOUR to
//! their reserve and PEER_REQUEST to their purchase, over the domain broker as shipped
//! (mosquitto, mutual TLS, the ACL and plugin) and the dry-run fabric. No real reference node
//! is run.

use fluidlet::model::{ContractState, Id, IntentState, ReserveRequest, Resources};
use fluidlet::wire::{Body, Bytes, ContractRef, ErrorCode, Message, PeerRequest};
use fluidlet_supernode::outbound::provider_id;
use fluidlet_supernode::store::OutState;
use fluidlet_supernode::{Config, Supernode};
use fluidlet_tests::refnode::{fact, get, s, Behaviour, Offer, Provider};
use fluidlet_tests::{domain_sh, eventually, files_under, free_port, intent_spec, start, Steps};
use fluidlet_tests::{Rogue, TlsDomain, WAIT};
use std::path::Path;
use std::time::Duration;

fn domain() -> Option<TlsDomain> {
    TlsDomain::start_with(|dir, _| {
        let d = dir.to_str().expect("utf-8");
        domain_sh(&["supernode", d, "sn1"]);
    })
}

/// Lets the face sell from the reference node at `endpoint` (its provider certificate).
fn admit(d: &TlsDomain, endpoint: &str) {
    let dir = d.dir.path().to_str().expect("utf-8");
    domain_sh(&["refprovider", dir, "sn1", endpoint]);
}

fn face_config(d: &TlsDomain, data: &Path, endpoints: &[&str], outbound: &str) -> Config {
    let sn = d.dir.path().join("supernodes/sn1");
    let http_port = free_port();
    let refs: String = endpoints
        .iter()
        .map(|e| format!("[[outbound.reference]]\nendpoint = \"{e}\"\n"))
        .collect();
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
[outbound]
dir = "{sn}/providers"
currency = "EUR"
poll_secs = 1
connect_timeout_secs = 2
request_timeout_secs = 2
{outbound}
{refs}
"#,
        domain = d.domain,
        data = data.display(),
        port = d.port,
        sn = sn.display(),
    );
    Config::from_toml(&toml).expect("face config")
}

async fn face(cfg: Config) -> Supernode {
    let s = Supernode::start(cfg).await.expect("face starts");
    eventually("the face to reach the broker", || s.ready()).await;
    s
}

fn arch() -> &'static str {
    fluidlet::demo::k8s_arch()
}

/// A seller with one partitionable 4-CPU / 8 GiB flavour at 1.2 EUR per hour.
async fn seller(name: &str) -> Provider {
    Provider::start(
        name,
        &format!("{name}-liqo"),
        vec![Offer::k8slice(
            &format!("{name}-k8slice-1"),
            arch(),
            "4",
            "8Gi",
            "1.2",
        )],
    )
    .await
}

fn advertised(sn: &Supernode, endpoint: &str) -> bool {
    sn.references()
        .iter()
        .any(|r| r.endpoint == endpoint && r.advertised && r.flavours > 0)
}

/// The flavours of `provider`'s advert, as the catalog holds it.
async fn catalog_flavours(
    rogue: &mut Rogue,
    domain: &str,
    provider: &str,
) -> Vec<fluidlet::model::Flavour> {
    rogue
        .subscribe(&format!("fluidos/v1/{domain}/catalog/{provider}"))
        .await;
    loop {
        let (topic, payload) = rogue.recv_within(WAIT).await.expect("the advert");
        if !topic.ends_with(provider) || payload.is_empty() {
            continue;
        }
        let m = Message::decode(&payload).expect("an advert");
        let Body::Advert(f) = m.body else {
            panic!("not an advert")
        };
        return f.flavours.0.iter().cloned().collect();
    }
}

fn der(files: &fluidlet::config::TlsFiles) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(&files.cert)
        .unwrap()
        .to_vec()
}

fn keys(files: &fluidlet::config::TlsFiles, id: &str) -> fluidlet::seal::Keys {
    let l = fluidlet::tls::load(files, &Id::new(id).unwrap()).unwrap();
    fluidlet::seal::Keys::new(&l.certificate, &l.key, l.roots).unwrap()
}

async fn answer(rogue: &mut Rogue) -> Message {
    loop {
        let (topic, payload) = rogue.recv_within(WAIT).await.expect("an answer");
        if topic.contains("/catalog/") {
            continue;
        }
        return Message::decode(&payload).unwrap();
    }
}

fn refusal(m: &Message) -> (ErrorCode, String) {
    match &m.body {
        Body::Error(e) => (e.code().unwrap(), e.text.to_string()),
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// The face up (config `cfg`) selling the reference node at `endpoint`, and bob holding a
/// reservation (transaction `bob.t1`) of its first flavour: the face, the provider id, bob's
/// files and connection, the flavour and the contract.
async fn reserved_through_the_face(
    d: &TlsDomain,
    endpoint: &str,
    cfg: Config,
) -> (
    Supernode,
    String,
    fluidlet::config::TlsFiles,
    Rogue,
    Id,
    Box<fluidlet::model::Contract>,
) {
    admit(d, endpoint);
    let sn = face(cfg).await;
    let provider = provider_id(endpoint);
    eventually("advertised", || advertised(&sn, endpoint)).await;
    let bob_files = d.enrol("bob");
    let mut bob = Rogue::connect_tls(d.port, &d.domain, "bob", &bob_files).await;
    let flavour = catalog_flavours(&mut bob, &d.domain, &provider).await[0]
        .id
        .clone();
    bob.send(&provider, reserve("bob", "bob.t1", &flavour))
        .await;
    let Body::Reserved(contract) = answer(&mut bob).await.body else {
        panic!("no contract")
    };
    (sn, provider, bob_files, bob, flavour, contract)
}

fn reserve(buyer: &str, tx: &str, flavour: &Id) -> Body {
    Body::ReserveFlavour(ReserveRequest {
        transaction: Id::new(tx).unwrap(),
        flavour: flavour.clone(),
        buyer: Id::new(buyer).unwrap(),
        partition: Some(Resources {
            cpu: 1000,
            memory: 2 << 30,
            pods: 1,
            storage: 0,
        }),
    })
}

#[tokio::test]
async fn a_fluidlet_intent_is_placed_on_a_reference_nodes_flavour_through_the_face() {
    let Some(d) = domain() else { return };
    let refnode = seller("refnode-a").await;
    admit(&d, &refnode.addr);
    let fd = tempfile::tempdir().unwrap();
    let sn = face(face_config(&d, fd.path(), &[&refnode.addr], "")).await;
    let provider = provider_id(&refnode.addr);
    eventually("the reference node's flavours advertised", || {
        advertised(&sn, &refnode.addr)
    })
    .await;

    // What the catalog holds: the reference flavour in fluidlet's terms, under the face's
    // provider id for that node, the price in millionths of the domain's currency.
    let cdir = tempfile::tempdir().unwrap();
    let mut watcher = Rogue::connect_tls(d.port, &d.domain, "watcher", &d.enrol("watcher")).await;
    let listed = catalog_flavours(&mut watcher, &d.domain, &provider).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let f = &listed[0];
    assert_eq!(f.provider.as_str(), provider);
    assert_eq!(
        (f.resources.cpu, f.resources.memory, f.resources.pods),
        (4000, 8 << 30, 110)
    );
    assert_eq!(
        (f.price.amount, f.price.currency.as_str()),
        (1_200_000, "EUR")
    );
    assert_eq!(f.partitionability.as_ref().unwrap().cpu_step, 500);
    // Never listed back to reference nodes by the inbound face (they buy from each other).
    let back =
        fluidlet_tests::refnode::request(&sn.addr.to_string(), "GET", "/api/v2/flavors", None)
            .await;
    assert_eq!(back.status, 204, "{}", back.text());

    // A fluidlet consumer's intent, end to end.
    let steps = Steps::default();
    let mut ccfg = d.config("cons", d.enrol("cons"), cdir.path());
    ccfg.reserve_timeout = Duration::from_secs(3);
    // Discovery by LIST_FLAVOURS broadcast (steps 6-12), which the face answers for the
    // reference node, as the two-node workflow test does.
    ccfg.watch_catalog = false;
    let c = start(ccfg, Some(&steps)).await;
    let intent = c.submit_intent(intent_spec("cam", 1000, 2)).await.unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);

    // Every consumer step of the seed workflow; the provider's own steps (8, 9, 15-18,
    // 23-25) are the reference node's and the face's, which report none (26, PEER_ACCEPT,
    // is reported on both sides).
    let mut seen = steps.of("cons");
    seen.sort();
    seen.dedup();
    let provider_steps = [8, 9, 15, 16, 17, 18, 23, 24, 25];
    let consumer_steps: Vec<u8> = (1..=31).filter(|n| !provider_steps.contains(n)).collect();
    assert_eq!(
        seen, consumer_steps,
        "every consumer step of the seed workflow"
    );

    // The consumer bought from the reference node's provider id; its contract is Active.
    let contract_id = intent.contract.clone().unwrap();
    let k = c.tables().contract(&contract_id).unwrap().unwrap();
    assert_eq!(k.seller.as_str(), provider);
    assert_eq!(k.state, ContractState::Active);
    assert_eq!(k.resources.cpu, 1000);
    assert_eq!(
        k.price, 300_000,
        "a quarter of the CPU: a quarter of 1.2 EUR"
    );

    // The reference node: one reserve, one purchase, a Contract for the consumer's piece;
    // its transaction is gone (removed by the purchase, as there).
    refnode.with(|st| {
        assert_eq!(st.contracts.len(), 1);
        let rc = &st.contracts[0];
        assert_eq!(s(get(rc, &fact("json.contract.buyer_key")), "ID"), "cons");
        assert_eq!(s(get(get(rc, "configuration"), "data"), "cpu"), "1");
        assert!(st.transactions.is_empty());
    });
    // The face's own record.
    let recs = sn.outbound_contracts();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].contract_id, contract_id.as_str());
    assert_eq!(recs[0].state, OutState::Active);
    // The kubeconfig the reference node's Contract carried reached the consumer's fabric
    // (sealed across the broker, opened by the consumer).
    let files = files_under(&cdir.path().join("cons").join("fabric"));
    assert!(
        files
            .iter()
            .any(|(_, t)| t.contains("fluidos-peering-cons")),
        "the reference node's kubeconfig in the consumer's fabric: {:?}",
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );

    // The consumer releases: RELEASED; the reference node is not told (no release in REAR
    // over HTTP), the face's record says Released.
    let before = refnode.with(|st| st.requests.len());
    c.release(&contract_id).await.unwrap();
    assert_eq!(
        sn.outbound_contracts()[0].state,
        OutState::Released,
        "the face's record"
    );
    let posts = refnode.with(|st| {
        st.requests[before..]
            .iter()
            .filter(|(m, _)| m == "POST")
            .count()
    });
    assert_eq!(
        posts, 0,
        "nothing is sent to the reference node on a release"
    );

    // The reference node disappears: after `gone_after_failures` failed polls its advert
    // is cleared from the catalog.
    refnode.stop();
    eventually("the advert of a vanished reference node cleared", || {
        !sn.references()[0].advertised
    })
    .await;
    c.shutdown().await;
    sn.shutdown().await;
}

#[tokio::test]
async fn a_face_restarted_between_reserve_and_purchase_completes_the_purchase() {
    let Some(d) = domain() else { return };
    let refnode = seller("refnode-b").await;
    // The reference node's purchase sleeps while it fetches the token.
    let sleep: u64 = fact("purchase.purchase_sleep_secs").parse().unwrap();
    refnode.with(|st| st.purchase_delay = Duration::from_secs(sleep));
    let fd = tempfile::tempdir().unwrap();
    let cfg = face_config(&d, fd.path(), &[&refnode.addr], "");
    let (mut sn, provider, bob_files, mut bob, flavour, contract) =
        reserved_through_the_face(&d, &refnode.addr, cfg.clone()).await;
    assert_eq!(contract.seller.as_str(), provider);
    assert!(contract.id.as_str().starts_with(&format!("{provider}.")));
    assert_eq!(contract.flavour.id, flavour);
    // The same transaction again: the same contract, nothing asked of the reference node.
    let reserves = |p: &Provider| {
        p.with(|st| {
            st.requests
                .iter()
                .filter(|(m, p)| m == "POST" && p == "/api/v2/reservations")
                .count()
        })
    };
    bob.send(&provider, reserve("bob", "bob.t1", &flavour))
        .await;
    let Body::Reserved(again) = answer(&mut bob).await.body else {
        panic!("no contract")
    };
    assert_eq!(again.id, contract.id);
    assert_eq!(reserves(&refnode), 1);
    // A second unpeered piece of the same reference flavour: the reference node would hand
    // back the same transaction (one per buyer and flavour), so the face refuses it.
    bob.send(&provider, reserve("bob", "bob.t2", &flavour))
        .await;
    assert_eq!(
        refusal(&answer(&mut bob).await).0,
        ErrorCode::TooManyPending
    );

    // The face restarts between reserve and purchase.
    sn.shutdown().await;
    sn = face(cfg).await;
    eventually("advertised again", || advertised(&sn, &refnode.addr)).await;

    let peer = |cert: Option<Vec<u8>>| {
        Body::PeerRequest(PeerRequest {
            contract: contract.id.clone(),
            cluster_id: Id::new("bob-cluster").unwrap(),
            liqo_version: None,
            certificate: cert.map(|c| Bytes::new(&c).unwrap()),
        })
    };
    // Without a certificate: refused, nothing bought.
    bob.send(&provider, peer(None)).await;
    assert_eq!(
        refusal(&answer(&mut bob).await).0,
        ErrorCode::BadCertificate
    );
    let started = std::time::Instant::now();
    bob.send(&provider, peer(Some(der(&bob_files)))).await;
    let m = answer(&mut bob).await;
    assert!(
        started.elapsed() >= Duration::from_secs(sleep),
        "the purchase took its seconds"
    );
    let Body::PeerAccept(grant) = m.body else {
        panic!("no PEER_ACCEPT: {:?}", m.body)
    };
    assert!(grant.identity.is_none(), "never in clear on a TLS domain");
    assert_eq!(grant.cluster_id.as_str(), "refnode-b-liqo");
    let bob_keys = keys(&bob_files, "bob");
    let ctx = fluidlet::seal::Context {
        contract: &contract.id,
        provider: &Id::new(&provider).unwrap(),
        buyer: &Id::new("bob").unwrap(),
    };
    let kubeconfig = bob_keys
        .open(&ctx, grant.sealed.as_ref().unwrap().as_slice())
        .expect("sealed to bob");
    assert!(kubeconfig.contains("fluidos-peering-bob"), "{kubeconfig}");
    // A repeated PEER_REQUEST: the same credentials, no second purchase (the reference node
    // would answer 500).
    bob.send(&provider, peer(Some(der(&bob_files)))).await;
    let Body::PeerAccept(again) = answer(&mut bob).await.body else {
        panic!("no PEER_ACCEPT")
    };
    assert_eq!(
        bob_keys
            .open(&ctx, again.sealed.as_ref().unwrap().as_slice())
            .unwrap(),
        kubeconfig
    );
    assert_eq!(refnode.with(|st| st.contracts.len()), 1);
    // Another node cannot peer, release or renew bob's contract.
    let eve_files = d.enrol("eve");
    let mut eve = Rogue::connect_tls(d.port, &d.domain, "eve", &eve_files).await;
    eve.send(&provider, peer(Some(der(&eve_files)))).await;
    assert_eq!(refusal(&answer(&mut eve).await).0, ErrorCode::NoContract);
    eve.send(
        &provider,
        Body::Release(ContractRef {
            contract: contract.id.clone(),
        }),
    )
    .await;
    assert_eq!(refusal(&answer(&mut eve).await).0, ErrorCode::NoContract);
    bob.send(
        &provider,
        Body::Renew(ContractRef {
            contract: contract.id.clone(),
        }),
    )
    .await;
    assert_eq!(refusal(&answer(&mut bob).await).0, ErrorCode::UnknownKind);
    sn.shutdown().await;
}

#[tokio::test]
async fn a_purchase_after_the_reference_transaction_expired_is_no_contract() {
    let Some(d) = domain() else { return };
    let refnode = seller("refnode-c").await;
    // Transactions that live 2 s (the reference node's live 1 h).
    refnode.with(|st| st.transaction_secs = 2);
    let fd = tempfile::tempdir().unwrap();
    let cfg = face_config(&d, fd.path(), &[&refnode.addr], "");
    let (sn, provider, bob_files, mut bob, _, contract) =
        reserved_through_the_face(&d, &refnode.addr, cfg).await;
    // The contract carries the reference transaction's expiry (RFC 3339 with an offset).
    let left = contract.expires_at.saturating_sub(fluidlet::unix_ms());
    assert!(
        left <= 2_000,
        "expires with the reference transaction: {left} ms"
    );
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    bob.send(
        &provider,
        Body::PeerRequest(PeerRequest {
            contract: contract.id.clone(),
            cluster_id: Id::new("bob-cluster").unwrap(),
            liqo_version: None,
            certificate: Some(Bytes::new(&der(&bob_files)).unwrap()),
        }),
    )
    .await;
    assert_eq!(refusal(&answer(&mut bob).await).0, ErrorCode::NoContract);
    assert_eq!(sn.outbound_contracts()[0].state, OutState::Expired);
    sn.shutdown().await;
}

#[tokio::test]
async fn a_hostile_reference_node_is_bounded_timed_out_and_demoted_while_the_good_one_sells() {
    let Some(d) = domain() else { return };
    let good = seller("good").await;
    let bad = seller("bad").await;
    admit(&d, &good.addr);
    admit(&d, &bad.addr);
    let fd = tempfile::tempdir().unwrap();
    let sn = face(face_config(
        &d,
        fd.path(),
        &[&good.addr, &bad.addr],
        "gone_after_failures = 2\ndemote_secs = 3600\nmax_answer_bytes = 1048576\nmax_backoff_secs = 2",
    ))
    .await;
    let (gp, bp) = (provider_id(&good.addr), provider_id(&bad.addr));
    eventually("both advertised", || {
        advertised(&sn, &good.addr) && advertised(&sn, &bad.addr)
    })
    .await;
    let bob_files = d.enrol("bob");
    let mut bob = Rogue::connect_tls(d.port, &d.domain, "bob", &bob_files).await;
    let good_flavour = catalog_flavours(&mut bob, &d.domain, &gp).await[0]
        .id
        .clone();
    let status = |sn: &Supernode, e: &str| {
        sn.references()
            .into_iter()
            .find(|r| r.endpoint == e)
            .unwrap()
    };
    let mut n = 0;
    let mut buy_from_good = async |bob: &mut Rogue| {
        n += 1;
        let started = std::time::Instant::now();
        bob.send(&gp, reserve("bob", &format!("bob.g{n}"), &good_flavour))
            .await;
        let m = answer(bob).await;
        assert!(
            matches!(m.body, Body::Reserved(_)),
            "the good one sells: {:?}",
            m.body
        );
        assert!(started.elapsed() < Duration::from_secs(2), "served at once");
        // Release it, so the next one is not a second pending piece of the same flavour.
        let Body::Reserved(c) = m.body else {
            unreachable!()
        };
        bob.send(&gp, Body::Release(ContractRef { contract: c.id }))
            .await;
        assert!(matches!(answer(bob).await.body, Body::Released(_)));
    };

    // It hangs: each poll ends at the time-out; after two its advert is cleared.
    bad.set_behaviour(Behaviour::Hang);
    buy_from_good(&mut bob).await;
    eventually("the hanging node's advert cleared", || {
        !status(&sn, &bad.addr).advertised
    })
    .await;
    let st = status(&sn, &bad.addr);
    assert!(st.failures >= 2);
    assert!(
        st.last_problem.as_deref().unwrap_or("").contains("within"),
        "{st:?}"
    );
    buy_from_good(&mut bob).await;

    // Garbage, then 10 MB: refused, bounded (the cap is 1 MiB), still cleared.
    bad.set_behaviour(Behaviour::Garbage);
    eventually("garbage seen", || {
        status(&sn, &bad.addr)
            .last_problem
            .is_some_and(|p| p.contains("not JSON"))
    })
    .await;
    bad.set_behaviour(Behaviour::Huge);
    eventually("a 10 MB answer cut at the cap", || {
        status(&sn, &bad.addr)
            .last_problem
            .is_some_and(|p| p.contains("over 1048576 bytes"))
    })
    .await;
    assert!(!status(&sn, &bad.addr).advertised);
    buy_from_good(&mut bob).await;

    // Honest again: listed again.
    bad.set_behaviour(Behaviour::Honest);
    eventually("listed again", || advertised(&sn, &bad.addr)).await;
    let bad_flavours = catalog_flavours(&mut bob, &d.domain, &bp).await;
    let old = bad_flavours[0].id.clone();

    // Its flavour changes under the same flavorID: a new fluidlet id; the old one is gone.
    bad.with(|st| st.offers[0].cpu = "2".into());
    let new = loop {
        let f = catalog_flavours(&mut bob, &d.domain, &bp).await;
        if f[0].id != old {
            break f[0].clone();
        }
    };
    assert_eq!(new.resources.cpu, 2000);
    bob.send(&bp, reserve("bob", "bob.b1", &old)).await;
    assert_eq!(refusal(&answer(&mut bob).await).0, ErrorCode::FlavourGone);

    // It lies: a reservation answer for another flavour. Refused, demoted, cleared.
    bad.set_behaviour(Behaviour::WrongFlavor);
    bob.send(&bp, reserve("bob", "bob.b2", &new.id)).await;
    let (code, text) = refusal(&answer(&mut bob).await);
    assert_eq!(code, ErrorCode::FlavourGone, "{text}");
    assert!(text.contains("demoted"), "{text}");
    let st = status(&sn, &bad.addr);
    assert!(st.demoted && !st.advertised, "{st:?}");
    assert!(st.last_problem.unwrap().contains("for"), "names the lie");
    assert!(sn.outbound_contracts().iter().all(|r| r.provider != bp));
    // Demoted: not polled, not sold from, even when honest again.
    bad.set_behaviour(Behaviour::Honest);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!status(&sn, &bad.addr).advertised);
    bob.send(&bp, reserve("bob", "bob.b3", &new.id)).await;
    assert_eq!(refusal(&answer(&mut bob).await).0, ErrorCode::FlavourGone);
    buy_from_good(&mut bob).await;
    // The good node still holds bob's earlier (released on this side) transaction, and hands
    // it back, piece and all, for another piece: refused, not taken as a lie.
    let mut other = reserve("bob", "bob.g-other", &good_flavour);
    if let Body::ReserveFlavour(r) = &mut other {
        r.partition = Some(Resources {
            cpu: 500,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        });
    }
    bob.send(&gp, other).await;
    let (code, text) = refusal(&answer(&mut bob).await);
    assert_eq!(code, ErrorCode::TooManyPending, "{text}");
    assert!(text.contains("earlier transaction"), "{text}");
    assert!(!status(&sn, &good.addr).demoted);
    sn.shutdown().await;
}

/// The imitation itself against the pinned facts (no broker): what the face is tested
/// against is the reference node's behaviour as read in its source.
#[tokio::test]
async fn the_imitated_reference_seller_keeps_the_reference_nodes_codes_and_quirks() {
    use fluidlet_tests::refnode::request;
    let p = seller("imit").await;
    let n = |k: &str| -> u16 { fact(k).parse().unwrap() };
    let a = request(&p.addr, "GET", &fact("routes.flavors.path"), None).await;
    assert_eq!(a.status, n("list_flavors.ok_status"));
    let list = a.json();
    let f = &list.as_array().unwrap()[0];
    assert!(get(get(f, "type"), "data").get("charateristics").is_some());
    assert_eq!(
        s(get(f, "location"), "altitude"),
        "IT",
        "the country under altitude"
    );
    // /flavors/k8slice: a match, no match (200 []), a bad key (400).
    let k = fact("routes.k8slice.path");
    let hit = request(
        &p.addr,
        "GET",
        &format!("{k}?filter[cpu][range][min]=1&filter[memory][range][max]=16Gi"),
        None,
    )
    .await;
    assert_eq!((hit.status, hit.json().as_array().unwrap().len()), (200, 1));
    let none = request(
        &p.addr,
        "GET",
        &format!("{k}?filter[cpu][range][min]=64"),
        None,
    )
    .await;
    assert_eq!(
        (none.status, none.text().as_str()),
        (n("k8slice_flavors.no_match_status"), "[]")
    );
    for bad in [
        "cpu=1",
        "filter[cpu][range]=1",
        "filter[cpu][range][regex]=1",
        "filter[gpu][match]=1",
    ] {
        let a = request(&p.addr, "GET", &format!("{k}?{bad}"), None).await;
        assert_eq!(a.status, n("k8slice_flavors.bad_selector_status"), "{bad}");
    }
    // Reserve: unknown flavour 404, no liqoID 400, then a Transaction; a repeat by the same
    // buyer id is the same transaction (refreshed) whatever else it says.
    let r = fact("routes.reserve.path");
    let body = |flavor: &str, liqo: &str| {
        serde_json::json!({"flavorID": flavor, "buyerID": {"ID": "b1", "IP": "x:1", "domain": "d",
            "additionalInformation": {"liqoID": liqo}}})
        .to_string()
    };
    let a = request(&p.addr, "POST", &r, Some(body("nope", "l1").as_bytes())).await;
    assert_eq!(a.status, n("reserve.unknown_flavor_status"));
    let a = request(
        &p.addr,
        "POST",
        &r,
        Some(body("imit-k8slice-1", "").as_bytes()),
    )
    .await;
    assert_eq!(
        (a.status, a.text().trim()),
        (
            n("reserve.missing_liqo_id_status"),
            "Error: LiqoID not provided"
        )
    );
    let t = request(
        &p.addr,
        "POST",
        &r,
        Some(body("imit-k8slice-1", "l1").as_bytes()),
    )
    .await
    .json();
    let tid = s(&t, "transactionID");
    assert!(tid.contains('-') && !s(&t, "expirationTime").is_empty());
    assert!(
        get(&t, "buyer").is_object() && get(&t, "buyerID").is_null(),
        "buyer, not buyerID"
    );
    let again = request(
        &p.addr,
        "POST",
        &r,
        Some(body("imit-k8slice-1", "").as_bytes()),
    )
    .await;
    assert_eq!(
        s(&again.json(), "transactionID"),
        tid,
        "the repeat is not checked for a liqoID"
    );
    // Purchase: 500 unknown, 200 Contract (base64 kubeconfig), then 500 (removed).
    let purchase = |id: &str| fact("routes.purchase.path").replace("{transactionID}", id);
    let a = request(&p.addr, "POST", &purchase("nope-1"), Some(b"{}")).await;
    assert_eq!(a.status, n("purchase.unknown_transaction_status"));
    let c = request(&p.addr, "POST", &purchase(&tid), Some(b"{}")).await;
    assert_eq!(c.status, n("purchase.ok_status"));
    let creds = get(&c.json(), "peeringTargetCredentials").clone();
    assert_eq!(s(&creds, "clusterID"), "imit-liqo");
    let kc = fluidlet_tests::refnode::base64_decode(&s(&creds, "kubeconfig")).unwrap();
    assert!(String::from_utf8(kc).unwrap().contains("kind: Config"));
    let a = request(&p.addr, "POST", &purchase(&tid), Some(b"{}")).await;
    assert_eq!(a.status, 500, "{}", fact("purchase.repeat_reference"));
    // Expiry: 408 and the transaction deleted (then 500).
    p.with(|st| st.transaction_secs = 0);
    let t = request(
        &p.addr,
        "POST",
        &r,
        Some(body("imit-k8slice-1", "l2").replace("b1", "b2").as_bytes()),
    )
    .await
    .json();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let id = s(&t, "transactionID");
    let a = request(&p.addr, "POST", &purchase(&id), Some(b"{}")).await;
    assert_eq!(a.status, n("purchase.expired_status"));
    let a = request(&p.addr, "POST", &purchase(&id), Some(b"{}")).await;
    assert_eq!(a.status, 500);
    // Nothing available: 204 and no body.
    p.with(|st| st.offers[0].available = false);
    let a = request(&p.addr, "GET", &fact("routes.flavors.path"), None).await;
    assert_eq!(
        (a.status, a.body.len()),
        (n("list_flavors.empty_status"), 0)
    );
}

#[tokio::test]
async fn a_reference_node_announced_by_multicast_is_sold_from_until_it_falls_silent() {
    let Some(d) = domain() else { return };
    let refnode = seller("refnode-m").await;
    admit(&d, &refnode.addr);
    let stranger = seller("stranger").await; // announced, never admitted
    let port = free_port();
    let group: std::net::SocketAddrV4 = format!("{}:{port}", fact("multicast.group"))
        .parse()
        .unwrap();
    let fd = tempfile::tempdir().unwrap();
    let sn = face(face_config(
        &d,
        fd.path(),
        &[],
        &format!("multicast = \"{group}\"\nmulticast_expiry_secs = 6"),
    ))
    .await;
    assert!(sn.references().is_empty());
    let period = Duration::from_secs(fact("multicast.period_secs").parse().unwrap());
    let a = fluidlet_tests::refnode::announce("refnode-m", &refnode.addr, "m-liqo", group, period);
    let _b = fluidlet_tests::refnode::announce("stranger", &stranger.addr, "s-liqo", group, period);
    assert!(
        fluidlet_tests::within(Duration::from_secs(30), || advertised(&sn, &refnode.addr)).await,
        "the announced reference node is sold from: {:?}",
        sn.references()
    );
    let provider = provider_id(&refnode.addr);
    let mut bob = Rogue::connect_tls(d.port, &d.domain, "bob", &d.enrol("bob")).await;
    let f = catalog_flavours(&mut bob, &d.domain, &provider).await;
    assert_eq!(f.len(), 1);
    // Several announcements later: the stranger (no certificate) is not sold from, and the
    // admitted one is there once.
    tokio::time::sleep(period * 2).await;
    let refs = sn.references();
    assert_eq!(refs.len(), 1, "{refs:?}");
    assert_eq!(refs[0].endpoint, refnode.addr);
    // Silent: forgotten after the expiry, its advert cleared.
    drop(a);
    assert!(
        fluidlet_tests::within(Duration::from_secs(20), || sn.references().is_empty()).await,
        "forgotten when silent"
    );
    loop {
        let (topic, payload) = bob.recv_within(WAIT).await.expect("the advert cleared");
        if topic.ends_with(&provider) && payload.is_empty() {
            break;
        }
    }
    sn.shutdown().await;
}

/// A request over HTTPS to the face (synchronous rustls, on a blocking thread): the text
/// of the answer, or the TLS or I/O error.
fn https_get(
    port: u16,
    ca: &Path,
    client: Option<&fluidlet::config::TlsFiles>,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some(f) => {
            let chain = CertificateDer::pem_file_iter(&f.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&f.key).unwrap())
                .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let sock = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"GET /api/v2/flavors HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let r = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    match r {
        Ok(_) => Ok(text),
        Err(_) if text.starts_with("HTTP/1.1") => Ok(text),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn the_face_serves_https_and_requires_client_certificates_when_configured() {
    let Some(d) = domain() else { return };
    let fd = tempfile::tempdir().unwrap();
    let dir = d.dir.path();
    let ca = dir.join("domain-ca.pem");
    // HTTPS with the broker's certificate (its SAN names 127.0.0.1), client certificates
    // from the domain CA.
    let toml_https = |client_ca: bool| {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
            dir.join("broker.pem").display(),
            dir.join("broker.key").display(),
            if client_ca {
                format!("client_ca = \"{}\"\n", ca.display())
            } else {
                String::new()
            }
        )
    };
    let sn_dir = dir.join("supernodes/sn1");
    let base = |https: &str, port: u16| {
        format!(
            r#"
name = "sn1"
domain = "{domain}"
data_dir = "{data}"
[broker]
host = "127.0.0.1"
port = {bport}
ca = "{sn}/domain-ca.pem"
cert = "{sn}/supernode.pem"
key = "{sn}/supernode.key"
[refs]
dir = "{sn}/refs"
[http]
listen = "127.0.0.1:{port}"
advertise = "127.0.0.1:{port}"
{https}
"#,
            domain = d.domain,
            data = fd.path().display(),
            bport = d.port,
            sn = sn_dir.display(),
        )
    };
    // Neither HTTPS nor plain HTTP said: refused, naming the key.
    let e = Config::from_toml(&base("", 1)).unwrap_err().to_string();
    assert!(e.contains("insecure_plaintext"), "{e}");
    let e = Config::from_toml(&base(
        &format!("{}insecure_plaintext = true\n", toml_https(false)),
        1,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("insecure_plaintext"), "{e}");
    let port = free_port();
    let cfg = Config::from_toml(&base(&toml_https(true), port)).expect("https config");
    let sn = face(cfg).await;
    let bob = d.enrol("bob");
    let (ca2, bob2) = (ca.clone(), bob.clone());
    let ok = tokio::task::spawn_blocking(move || https_get(port, &ca2, Some(&bob2)))
        .await
        .unwrap()
        .expect("an HTTPS answer with a client certificate");
    assert!(ok.starts_with("HTTP/1.1 204"), "{ok}");
    let ca3 = ca.clone();
    let without = tokio::task::spawn_blocking(move || https_get(port, &ca3, None))
        .await
        .unwrap();
    assert!(
        without.is_err(),
        "no client certificate, no answer: {without:?}"
    );
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(12))).unwrap();
            let _ = s.write_all(b"GET /api/v2/flavors HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            out
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        !plain.starts_with(b"HTTP/1.1 2"),
        "{:?}",
        String::from_utf8_lossy(&plain)
    );
    sn.shutdown().await;
}
