//! Two fluidlet nodes over a real broker: discovery, reservation, refusals, idempotency,
//! races, restart and hostile input. Every case runs against the embedded rumqttd broker
//! and against a mosquitto process.

use fluidlet::model::{AllocationKind, AllocationStatus, ContractState};
use fluidlet::model::{FlavourSelector, Id, ReserveRequest, Resources, Text};
use fluidlet::rear::RearError;
use fluidlet::tables::Outgoing;
use fluidlet::wire::{Body, ErrorCode, ListFlavours, Message, MAX_PAYLOAD};
use fluidlet_tests::*;

on_both_brokers!(
    discovery_finds_the_providers_flavour,
    catalog_advert_becomes_a_peering_candidate_without_discovery,
    the_advert_and_a_flavours_answer_name_the_release_and_the_protocol_revision,
    reservation_replaces_the_flavour_with_a_reduced_one_and_both_sides_hold_the_contract,
    reservation_that_no_longer_fits_is_refused,
    retried_transaction_returns_the_same_contract_without_reserving_twice,
    two_consumers_racing_for_the_last_capacity_exactly_one_wins,
    provider_restarted_after_ok_still_holds_the_contract_and_the_reduced_flavour,
    bad_messages_get_error_and_the_provider_keeps_serving,
    an_envelope_without_its_version_is_malformed_and_correlated_to_the_id_it_could_read,
    errors_are_never_answered_not_even_broken_ones,
    request_for_what_nobody_offers_ends_with_a_clear_error,
    consumer_restarted_mid_purchase_recovers_the_contract_the_provider_made,
);

/// rumqttd 0.20 forwards at most 100 retained messages per subscription (it truncates them to
/// its inflight slots), so the embedded broker is tested at 90 providers and mosquitto at 800.
#[tokio::test]
async fn embedded_broker_joining_a_domain_of_90_providers_sees_them_all() {
    if let Some(b) = broker(BrokerKind::Embedded) {
        a_node_joining_a_big_domain_sees_every_provider(b.port, 90).await;
    }
}

#[tokio::test]
async fn mosquitto_joining_a_domain_of_800_providers_sees_them_all() {
    if let Some(b) = broker(BrokerKind::Mosquitto) {
        a_node_joining_a_big_domain_sees_every_provider(b.port, 800).await;
    }
}

const GI: u64 = 1 << 30;

/// After a broker restart every node reconnects on its own backoff. A purchase that starts
/// on a consumer back before its provider must not spend its one attempt on the candidate
/// heard in the old session (the RESERVE would be lost and the provider taken for a liar),
/// nor fail at once: within its budget it waits for the provider's advert.
#[tokio::test]
async fn after_a_broker_restart_a_purchase_waits_for_the_provider_to_come_back() {
    let Some(mut b) = broker(BrokerKind::Mosquitto) else {
        return;
    };
    let port = b.port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let c = start(config("cons", &d, port, dir.path()), None).await;
    eventually("the provider's advert", || !c.candidates().all().is_empty()).await;
    // The broker restarts (without its retained messages); the provider is away longer.
    assert!(b.stop());
    p.shutdown().await;
    b.restart();
    eventually("the consumer reconnected", || {
        let s = c.broker_status();
        s.connected && s.connects >= 2
    })
    .await;
    let buy = tokio::spawn(async move {
        let r = c.acquire(&want(1000, 1)).await;
        (c, r)
    });
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let (c, r) = buy.await.unwrap();
    let contract = r.expect("bought from the provider once it was back");
    assert_eq!(contract.seller.as_str(), "prov");
    assert_eq!(
        c.tables()
            .rating(&Id::new("prov").unwrap())
            .unwrap()
            .map(|r| r.demoted(fluidlet::unix_ms())),
        Some(false),
        "the provider's absence was not taken for a lie"
    );
    c.shutdown().await;
    p.shutdown().await;
}

fn want(cpu: u64, mem_gi: u64) -> FlavourSelector {
    FlavourSelector {
        min: Some(Resources {
            cpu,
            memory: mem_gi * GI,
            pods: 1,
            storage: 0,
        }),
        ..Default::default()
    }
}

fn discovery_only(mut cfg: fluidlet::Config) -> fluidlet::Config {
    cfg.watch_catalog = false;
    cfg
}

async fn discovery_finds_the_providers_flavour(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let steps = Steps::default();
    let p = start(provider_config("prov", &d, port, dir.path()), Some(&steps)).await;
    let c = start(
        discovery_only(config("cons", &d, port, dir.path())),
        Some(&steps),
    )
    .await;

    c.acquire(&want(1000, 1)).await.expect("a contract");

    let cands = c.candidates().all();
    assert!(
        cands.iter().any(|k| k.flavour.provider.as_str() == "prov"),
        "the provider's flavour is a peering candidate: {cands:?}"
    );
    // The seed workflow, in order, on each side.
    assert_eq!(steps.of("cons"), [5, 6, 7, 10, 11, 12, 13, 14, 19, 19, 20]);
    assert_eq!(steps.of("prov"), [8, 9, 15, 16, 17, 18, 18]);
    c.shutdown().await;
    p.shutdown().await;
}

/// docs/protocol.md section 9: a provider's advert and its FLAVOURS answers carry its release
/// (key 1) and protocol revision (key 2), as optional keys a decoder of an older build skips.
async fn the_advert_and_a_flavours_answer_name_the_release_and_the_protocol_revision(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    r.subscribe(&format!("fluidos/v1/{d}/catalog/prov")).await;
    let (topic, payload) = r.recv_within(WAIT).await.expect("the retained advert");
    assert!(topic.ends_with("/catalog/prov"), "{topic}");
    let Body::Advert(a) = Message::decode(&payload).unwrap().body else {
        panic!("not an advert");
    };
    assert_eq!(
        a.agent.as_ref().map(|t| t.as_str().to_owned()),
        Some(fluidlet::version())
    );
    assert_eq!(a.revision, Some(fluidlet::wire::REVISION));
    r.send("prov", Body::ListFlavours(ListFlavours::default()))
        .await;
    let Body::Flavours(f) = r.recv().await.body else {
        panic!("not a FLAVOURS answer");
    };
    assert_eq!(f.revision, Some(fluidlet::wire::REVISION));
    assert!(f.agent.is_some());
    p.shutdown().await;
}

async fn catalog_advert_becomes_a_peering_candidate_without_discovery(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let steps = Steps::default();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let c = start(config("cons", &d, port, dir.path()), Some(&steps)).await;
    eventually("the retained advert in the candidates table", || {
        c.candidates()
            .all()
            .iter()
            .any(|k| k.flavour.provider.as_str() == "prov")
    })
    .await;
    c.acquire(&want(500, 1)).await.expect("a contract");
    assert!(
        !steps.of("cons").contains(&7),
        "no LIST_FLAVOURS needed: {:?}",
        steps.of("cons")
    );
    // The provider's new advert replaces the candidate with the reduced flavour.
    let reduced = flavours(&p);
    eventually("the reduced flavour advertised", || {
        let cands = c.candidates().all();
        cands.len() == 1 && cands[0].flavour.id == reduced[0].id
    })
    .await;
    // A clean stop withdraws the advert; the consumer forgets the provider.
    p.shutdown().await;
    eventually("the withdrawn advert", || c.candidates().all().is_empty()).await;
    c.shutdown().await;
}

async fn reservation_replaces_the_flavour_with_a_reduced_one_and_both_sides_hold_the_contract(
    port: u16,
) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let c = start(discovery_only(config("cons", &d, port, dir.path())), None).await;
    let before = flavours(&p);
    assert_eq!(before.len(), 1);

    let contract = c.acquire(&want(1500, 3)).await.expect("a contract");

    // 1500m rounds up to the 500m step: 1500; 3 GiB is on the 1 GiB step.
    assert_eq!(contract.resources.cpu, 1500);
    assert_eq!(contract.resources.memory, 3 * GI);
    assert_eq!(contract.flavour.id, before[0].id);
    let after = flavours(&p);
    assert_eq!(after.len(), 1, "one reduced flavour");
    assert_ne!(
        after[0].id, before[0].id,
        "the old flavour is deleted, the reduced one is new"
    );
    assert_eq!(after[0].resources.cpu, 2500);
    assert_eq!(after[0].resources.memory, 5 * GI);
    assert_eq!(after[0].resources.pods, 109);
    // Capacity is conserved: advertised + reserved = offered.
    let total = after[0].resources.saturating_add(&contract.resources);
    assert_eq!(total, before[0].resources);

    for (side, kind) in [
        (&p, AllocationKind::Node),
        (&c, AllocationKind::VirtualNode),
    ] {
        let contracts = side.tables().contracts().unwrap();
        assert_eq!(contracts.len(), 1);
        assert_eq!(contracts[0].id, contract.id);
        assert_eq!(contracts[0].state, ContractState::Reserved);
        let allocs = side.tables().allocations().unwrap();
        assert_eq!(allocs.len(), 1);
        assert_eq!(allocs[0].kind, kind);
        assert_eq!(allocs[0].status, AllocationStatus::Inactive);
        assert_eq!(allocs[0].resources, contract.resources);
    }
    assert_eq!(
        c.tables()
            .rating(&Id::new("prov").unwrap())
            .unwrap()
            .unwrap()
            .reservations_ok,
        1
    );
    c.shutdown().await;
    p.shutdown().await;
}

fn reserve(tx: &str, flavour: &Id, buyer: &str, partition: Option<Resources>) -> Body {
    Body::ReserveFlavour(ReserveRequest {
        transaction: Id::new(tx).unwrap(),
        flavour: flavour.clone(),
        buyer: Id::new(buyer).unwrap(),
        partition,
    })
}

fn error_code(m: &Message) -> Option<ErrorCode> {
    match &m.body {
        Body::Error(e) => e.code(),
        _ => None,
    }
}

async fn reservation_that_no_longer_fits_is_refused(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let f = flavours(&p)[0].clone();
    let big = Resources {
        cpu: 4500,
        memory: GI,
        pods: 1,
        storage: 0,
    };
    let id = r
        .send("prov", reserve("rogue.t1", &f.id, "rogue", Some(big)))
        .await;
    let m = r.recv().await;
    assert_eq!(m.correlation, Some(id));
    assert_eq!(error_code(&m), Some(ErrorCode::NoFit));

    // Take 3 of the 4 CPUs; then 1.5 CPUs no longer fit in what is left.
    let three = Resources { cpu: 3000, ..big };
    r.send("prov", reserve("rogue.t2", &f.id, "rogue", Some(three)))
        .await;
    let Body::Reserved(_) = r.recv().await.body else {
        panic!("first reservation refused")
    };
    let left = flavours(&p)[0].clone();
    let more = Resources { cpu: 1500, ..big };
    r.send("prov", reserve("rogue.t3", &left.id, "rogue", Some(more)))
        .await;
    assert_eq!(error_code(&r.recv().await), Some(ErrorCode::NoFit));
    // The old flavour id is superseded under unchanged terms: a piece that fits in what is
    // left is served from the current flavour (docs/protocol.md, "Superseded flavour ids").
    r.send(
        "prov",
        reserve(
            "rogue.t4",
            &f.id,
            "rogue",
            Some(Resources { cpu: 500, ..big }),
        ),
    )
    .await;
    let Body::Reserved(c) = r.recv().await.body else {
        panic!("a piece that fits, under a superseded id, refused")
    };
    assert_eq!(c.flavour.id, f.id);
    assert_eq!(flavours(&p)[0].resources.cpu, 500);
    // A piece off the step is refused as such.
    r.send(
        "prov",
        reserve(
            "rogue.t5",
            &left.id,
            "rogue",
            Some(Resources { cpu: 700, ..big }),
        ),
    )
    .await;
    assert_eq!(error_code(&r.recv().await), Some(ErrorCode::BadPartition));
    assert_eq!(
        p.tables().contracts().unwrap().len(),
        2,
        "only the ones that fitted"
    );
    p.shutdown().await;
}

async fn retried_transaction_returns_the_same_contract_without_reserving_twice(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let f = flavours(&p)[0].clone();
    let piece = Some(Resources {
        cpu: 1000,
        memory: GI,
        pods: 1,
        storage: 0,
    });
    r.send("prov", reserve("rogue.t7", &f.id, "rogue", piece))
        .await;
    let Body::Reserved(first) = r.recv().await.body else {
        panic!("refused")
    };
    let after_first = flavours(&p);
    // The retry names the old flavour id, which no longer exists: it still gets the first
    // answer, because the transaction id decides.
    r.send("prov", reserve("rogue.t7", &f.id, "rogue", piece))
        .await;
    let Body::Reserved(second) = r.recv().await.body else {
        panic!("retry refused")
    };
    assert_eq!(first, second);
    assert_eq!(flavours(&p), after_first, "nothing reserved twice");
    assert_eq!(p.tables().contracts().unwrap().len(), 1);
    p.shutdown().await;
}

async fn two_consumers_racing_for_the_last_capacity_exactly_one_wins(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(whole_provider_config("prov", &d, port, dir.path()), None).await;
    let a = start(discovery_only(config("cons-a", &d, port, dir.path())), None).await;
    let b = start(discovery_only(config("cons-b", &d, port, dir.path())), None).await;
    let sel = want(1000, 1);
    let (ra, rb) = tokio::join!(a.acquire(&sel), b.acquire(&sel));
    let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one winner: {ra:?} / {rb:?}");
    let loser = if ra.is_ok() { rb } else { ra };
    assert!(
        matches!(
            loser,
            Err(RearError::Refused {
                code: Some(ErrorCode::FlavourGone),
                ..
            }) | Err(RearError::NoProvider(_))
        ),
        "{loser:?}"
    );
    assert_eq!(p.tables().contracts().unwrap().len(), 1);
    assert!(flavours(&p).is_empty(), "the whole flavour is sold");

    // Many raw buyers at once for the same flavour of a fresh provider: one wins.
    let p2 = start(whole_provider_config("prov2", &d, port, dir.path()), None).await;
    let f = flavours(&p2)[0].clone();
    let mut rogues = Vec::new();
    for i in 0..6 {
        rogues.push(Rogue::connect(port, &d, &format!("buyer{i}")).await);
    }
    for (i, r) in rogues.iter_mut().enumerate() {
        let buyer = format!("buyer{i}");
        r.send(
            "prov2",
            reserve(&format!("{buyer}.t1"), &f.id, &buyer, None),
        )
        .await;
    }
    let mut ok = 0;
    for r in rogues.iter_mut() {
        match r.recv().await.body {
            Body::Reserved(_) => ok += 1,
            Body::Error(e) => assert_eq!(e.code(), Some(ErrorCode::FlavourGone)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(p2.tables().contracts().unwrap().len(), 1);
    for n in [a, b, p, p2] {
        n.shutdown().await;
    }
}

async fn provider_restarted_after_ok_still_holds_the_contract_and_the_reduced_flavour(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let f = flavours(&p)[0].clone();
    let piece = Some(Resources {
        cpu: 2000,
        memory: 2 * GI,
        pods: 1,
        storage: 0,
    });
    r.send("prov", reserve("rogue.t1", &f.id, "rogue", piece))
        .await;
    let Body::Reserved(contract) = r.recv().await.body else {
        panic!("refused")
    };
    let reduced = flavours(&p);
    p.shutdown().await;

    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    assert_eq!(
        flavours(&p),
        reduced,
        "the reduced flavour survives; full capacity is not re-created"
    );
    let contracts = p.tables().contracts().unwrap();
    assert_eq!(contracts, [(*contract).clone()]);
    // The same transaction after the restart: the first answer, nothing new.
    r.send("prov", reserve("rogue.t1", &f.id, "rogue", piece))
        .await;
    let Body::Reserved(again) = r.recv().await.body else {
        panic!("retry refused")
    };
    assert_eq!(again, contract);
    assert_eq!(p.tables().contracts().unwrap().len(), 1);
    p.shutdown().await;
}

/// docs/protocol.md section 5, step 2: key 0 missing (or not an unsigned integer) is
/// MALFORMED, correlated to key 2 when a walk of the top-level map reaches it; whatever the
/// other keys hold (here a body that is an empty map).
async fn an_envelope_without_its_version_is_malformed_and_correlated_to_the_id_it_could_read(
    port: u16,
) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    // {1: 1, 2: 42, 4: 0, 5: "rogue", 6: h'a0'}
    let mut no_version = vec![0xa5, 0x01, 0x01, 0x02, 0x18, 0x2a, 0x04, 0x00, 0x05, 0x65];
    no_version.extend_from_slice(b"rogue");
    no_version.extend_from_slice(&[0x06, 0x41, 0xa0]);
    r.send_raw("prov", no_version).await;
    let m = r.recv().await;
    assert_eq!(error_code(&m), Some(ErrorCode::Malformed));
    assert_eq!(m.correlation, Some(42));
    // {0: "1", 1: 1, 2: 43}: a version that is not an unsigned integer.
    r.send_raw(
        "prov",
        vec![0xa3, 0x00, 0x61, b'1', 0x01, 0x01, 0x02, 0x18, 0x2b],
    )
    .await;
    let m = r.recv().await;
    assert_eq!(error_code(&m), Some(ErrorCode::Malformed));
    assert_eq!(m.correlation, Some(43));
    // {1: 1, "x": 0, 2: 44}: the walk stops at the text key, before key 2: no correlation.
    r.send_raw(
        "prov",
        vec![0xa3, 0x01, 0x01, 0x61, b'x', 0x00, 0x02, 0x18, 0x2c],
    )
    .await;
    let m = r.recv().await;
    assert_eq!(error_code(&m), Some(ErrorCode::Malformed));
    assert_eq!(m.correlation, None);
    p.shutdown().await;
}

async fn bad_messages_get_error_and_the_provider_keeps_serving(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;

    r.send_raw("prov", b"\xff\x00 definitely not cbor".to_vec())
        .await;
    let m = r.recv().await;
    assert_eq!(error_code(&m), Some(ErrorCode::Malformed));
    assert_eq!(m.sender.as_str(), "prov");

    r.send_raw("prov", vec![0u8; MAX_PAYLOAD + 1024]).await;
    assert_eq!(error_code(&r.recv().await), Some(ErrorCode::TooLarge));

    // {0: 9, 1: 1, 2: 42}: a version-9 header.
    r.send_raw("prov", vec![0xa3, 0x00, 0x09, 0x01, 0x01, 0x02, 0x18, 0x2a])
        .await;
    let m = r.recv().await;
    assert_eq!(error_code(&m), Some(ErrorCode::UnsupportedVersion));
    assert_eq!(m.correlation, Some(42));

    // A valid envelope with kind 99.
    let mut bytes = Message {
        id: 77,
        correlation: None,
        sent_at: 0,
        sender: Id::new("rogue").unwrap(),
        body: Body::ListFlavours(ListFlavours::default()),
    }
    .encode()
    .unwrap();
    bytes[4] = 0x18;
    bytes.insert(5, 99);
    r.send_raw("prov", bytes).await;
    let m = r.recv().await;
    assert_eq!(error_code(&m), Some(ErrorCode::UnknownKind));
    assert_eq!(m.correlation, Some(77));

    // An envelope that claims another sender than the topic.
    let forged = Message {
        id: 5,
        correlation: None,
        sent_at: 0,
        sender: Id::new("someone-else").unwrap(),
        body: Body::ListFlavours(ListFlavours::default()),
    };
    r.send_raw("prov", forged.encode().unwrap()).await;
    assert_eq!(error_code(&r.recv().await), Some(ErrorCode::Unexpected));

    // A RESERVE_FLAVOUR whose buyer is not the sender.
    let f = flavours(&p)[0].clone();
    r.send("prov", reserve("x.t1", &f.id, "victim", None)).await;
    assert_eq!(error_code(&r.recv().await), Some(ErrorCode::Unexpected));

    // And the provider still serves a good request.
    let sel = FlavourSelector {
        architecture: Some(Text::new(fluidlet::demo::k8s_arch()).unwrap()),
        ..Default::default()
    };
    let id = r
        .send("prov", Body::ListFlavours(ListFlavours { selector: sel }))
        .await;
    let m = r.recv().await;
    assert_eq!(m.correlation, Some(id));
    let Body::Flavours(list) = m.body else {
        panic!("expected FLAVOURS, got {:?}", m.body)
    };
    assert_eq!(list.flavours.len(), 1);
    assert!(
        p.tables().contracts().unwrap().is_empty(),
        "nothing was reserved by bad input"
    );
    p.shutdown().await;
}

async fn errors_are_never_answered_not_even_broken_ones(port: u16) {
    use fluidlet::wire::Kind;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let me = Id::new("rogue").unwrap();
    let error = |body: &[u8]| Message::envelope(Kind::Error as u16, 3, &me, body);
    let mut long_text = vec![0xa2, 0x00, 0x06, 0x01, 0x79, 0x01, 0x2c];
    long_text.extend(std::iter::repeat_n(b'a', 300));
    let mut trailing = error(&[0xa2, 0x00, 0x06, 0x01, 0x61, b'x']);
    trailing.push(0);
    let mut oversized = error(&[0xa2, 0x00, 0x06, 0x01, 0x61, b'x']);
    oversized.resize(MAX_PAYLOAD + 100, 0);
    let forged = Message {
        id: 4,
        correlation: None,
        sent_at: 0,
        sender: Id::new("someone-else").unwrap(),
        body: Body::Error(fluidlet::wire::ErrorBody::new(ErrorCode::NoFit, "x")),
    };
    for (what, payload) in [
        (
            "code as text",
            error(&[0xa2, 0x00, 0x61, b'6', 0x01, 0x61, b'x']),
        ),
        ("300-byte text", error(&long_text)),
        ("empty body", error(&[])),
        ("trailing byte", trailing),
        ("oversized", oversized),
        // {0: 2, 1: 5, 2: 9}: an ERROR of a future version.
        ("version 2", vec![0xa3, 0x00, 0x02, 0x01, 0x05, 0x02, 0x09]),
        ("another sender", forged.encode().unwrap()),
    ] {
        r.send_raw("prov", payload.clone()).await;
        // The same on the discovery topic, where an ERROR has no meaning.
        r.publish(
            &format!("fluidos/v1/{d}/discovery/from/rogue"),
            false,
            payload,
        )
        .await;
        eprintln!("sent an ERROR with {what}");
    }
    // Handled in order: the first thing back is the answer to this request, nothing before.
    let id = r
        .send("prov", Body::ListFlavours(ListFlavours::default()))
        .await;
    let m = r.recv().await;
    assert_eq!(
        m.correlation,
        Some(id),
        "an ERROR was answered: {:?}",
        m.body
    );
    assert!(matches!(m.body, Body::Flavours(_)), "{:?}", m.body);
    assert_eq!(
        r.recv_within(std::time::Duration::from_millis(300)).await,
        None
    );
    p.shutdown().await;
}

async fn request_for_what_nobody_offers_ends_with_a_clear_error(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut cfg = discovery_only(config("cons", &d, port, dir.path()));
    cfg.discovery_window = std::time::Duration::from_millis(300);
    let c = start(cfg, None).await;
    let err = c.acquire(&want(64_000, 1)).await.unwrap_err();
    assert!(matches!(err, RearError::NoProvider(_)), "{err:?}");
    assert!(err.to_string().starts_with("no provider offers"), "{err}");
    assert!(c.tables().contracts().unwrap().is_empty());
    c.shutdown().await;
    p.shutdown().await;
}

async fn consumer_restarted_mid_purchase_recovers_the_contract_the_provider_made(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let f = flavours(&p)[0].clone();
    let piece = Some(Resources {
        cpu: 1000,
        memory: GI,
        pods: 1,
        storage: 0,
    });
    // The consumer's first run: it recorded the purchase, its RESERVE_FLAVOUR reached the
    // provider, which reserved and answered; then the consumer died before storing the answer.
    let ccfg = config("cons", &d, port, dir.path());
    let out = Outgoing {
        request: ReserveRequest {
            transaction: Id::new("cons.t41").unwrap(),
            flavour: f.id.clone(),
            buyer: Id::new("cons").unwrap(),
            partition: piece,
        },
        seller: Id::new("prov").unwrap(),
        started_at: 0,
    };
    {
        let t = fluidlet::tables::Tables::open(&ccfg.data_dir).unwrap();
        t.begin_purchase(&out).unwrap();
        t.flush().await.unwrap();
    }
    let mut first_run = Rogue::connect_as(port, &d, "cons", &format!("cons-first-run@{d}")).await;
    first_run
        .send("prov", Body::ReserveFlavour(out.request.clone()))
        .await;
    let Body::Reserved(made) = first_run.recv().await.body else {
        panic!("refused")
    };
    drop(first_run);

    // The restarted consumer asks again under the same transaction and keeps the contract.
    let c = start(ccfg, None).await;
    eventually("the recovered contract", || {
        c.tables().contracts().unwrap().len() == 1
    })
    .await;
    assert_eq!(c.tables().contracts().unwrap()[0], *made);
    assert!(c.tables().purchases_in_flight().unwrap().is_empty());
    let allocs = c.tables().allocations().unwrap();
    assert_eq!(allocs[0].kind, AllocationKind::VirtualNode);
    assert_eq!(p.tables().contracts().unwrap().len(), 1, "reserved once");
    c.shutdown().await;
    p.shutdown().await;
}

/// A node joining a domain receives every retained advert at once, faster than it can store
/// them; none may be lost (retained messages are not sent again).
async fn a_node_joining_a_big_domain_sees_every_provider(port: u16, n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut opts = rumqttc::MqttOptions::new(format!("sim@{d}"), "127.0.0.1", port);
    opts.set_inflight(100);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 1000);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut acks = 0;
        while let Ok(ev) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev {
                acks += 1;
                if acks == n {
                    let _ = done_tx.send(()).await;
                }
            }
        }
    });
    for i in 0..n {
        let node = format!("sim{i}");
        let mut f = fluidlet::demo::demo_offer(&Id::new(&node).unwrap());
        f.id = Id::new(&format!("pool.{i}")).unwrap();
        let msg = Message {
            id: i,
            correlation: None,
            sent_at: 0,
            sender: Id::new(&node).unwrap(),
            body: Body::Advert(fluidlet::wire::Flavours {
                flavours: fluidlet::model::FlavourList::from_slice_truncated(&[f]),
                ..Default::default()
            }),
        };
        let topic = format!("fluidos/v1/{d}/catalog/{node}");
        client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                true,
                msg.encode().unwrap(),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, done_rx.recv())
        .await
        .expect("all adverts retained");
    let c = start(config("cons", &d, port, dir.path()), None).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while (c.candidates().count() as u64) < n {
        let got = c.candidates().count();
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {got} of {n} providers became candidates"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    c.shutdown().await;
}
