//! Every bound on what another node can make this one do, exceeded on purpose: each time
//! the sender gets a clear error (or the excess is dropped and logged) and the node goes on
//! serving everyone else.

use fluidlet::model::{Flavour, FlavourSelector, Id, Resources};
use fluidlet::wire::{Body, ContractRef, ErrorCode, Kind, ListFlavours, Message};
use fluidlet_tests::{config, eventually, flavours, on_both_brokers, provider_config, start};
use fluidlet_tests::{fresh_domain, want, Rogue};
use std::time::Duration;

on_both_brokers!(
    a_sender_over_its_rate_limit_is_told_busy_and_others_are_served,
    a_sender_flooding_steadily_gets_one_busy_per_second_not_one_per_token,
    a_buyer_with_too_many_unpeered_reservations_is_refused_and_others_are_not,
    an_advert_with_too_many_flavours_is_refused_with_a_clear_error,
);

fn error_of(m: &Message) -> Option<(ErrorCode, String)> {
    match &m.body {
        Body::Error(e) => Some((e.code()?, e.text.to_string())),
        _ => None,
    }
}

async fn a_sender_over_its_rate_limit_is_told_busy_and_others_are_served(port: u16) {
    let domain = fresh_domain();
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut pcfg = provider_config("prov", &domain, port, pd.path());
    pcfg.limits.sender_rate = 10;
    pcfg.limits.sender_burst = 20;
    let provider = start(pcfg, None).await;
    let consumer = start(config("cons", &domain, port, cd.path()), None).await;
    let mut eve = Rogue::connect(port, &domain, "eve").await;
    let sent = 200u64;
    for _ in 0..sent {
        eve.send(
            "prov",
            Body::ListFlavours(ListFlavours {
                selector: FlavourSelector::default(),
            }),
        )
        .await;
    }
    let (mut answered, mut busy) = (0u64, Vec::new());
    while let Some((_, payload)) = eve.recv_within(Duration::from_millis(1500)).await {
        let m = Message::decode(&payload).unwrap();
        match error_of(&m) {
            Some((code, text)) => busy.push((code, text)),
            None => answered += 1,
        }
    }
    assert!(!busy.is_empty(), "no BUSY after {sent} requests");
    let (code, text) = &busy[0];
    assert_eq!(*code, ErrorCode::Busy);
    assert!(
        text.contains("rate limit") && text.contains("10 messages/s"),
        "{text}"
    );
    assert!(
        answered < sent / 2,
        "{answered} of {sent} requests served: the limit did not hold"
    );
    // Every request was served, told BUSY, or counted as dropped by a bound.
    let dropped = |reason: &str| {
        let m = provider.metrics();
        m.dropped
            .iter()
            .find(|d| d.name == reason)
            .map_or(0, |d| d.value)
    };
    let (limited, full) = (dropped("rate_limit"), dropped("queue_full"));
    assert!(limited > 0, "no drop counted under rate_limit");
    assert_eq!(answered + busy.len() as u64 + limited + full, sent);
    // A well-behaved node is served at once.
    let c = consumer.acquire(&want(1000, 1)).await.expect("cons buys");
    assert_eq!(c.seller.as_str(), "prov");
    consumer.shutdown().await;
    provider.shutdown().await;
}

async fn a_sender_flooding_steadily_gets_one_busy_per_second_not_one_per_token(port: u16) {
    // 50 requests/s for about 3 s against a limit of 10/s: tokens refill all along, so some
    // requests pass; BUSY comes once per second (BUSY_WINDOW), not after each passed one.
    let domain = fresh_domain();
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("prov", &domain, port, pd.path());
    pcfg.limits.sender_rate = 10;
    pcfg.limits.sender_burst = 5;
    let provider = start(pcfg, None).await;
    let mut eve = Rogue::connect(port, &domain, "eve").await;
    let started = std::time::Instant::now();
    for _ in 0..150 {
        eve.send("prov", Body::ListFlavours(ListFlavours::default()))
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flood = started.elapsed();
    let (mut answered, mut busy) = (0, 0);
    while let Some((_, payload)) = eve.recv_within(Duration::from_millis(1500)).await {
        match error_of(&Message::decode(&payload).unwrap()) {
            Some((ErrorCode::Busy, _)) => busy += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => answered += 1,
        }
    }
    // One per started window of the flood, plus one: its last messages may be handled a
    // little after the loop ended.
    let windows = flood.as_secs() + 2;
    assert!(busy >= 1, "no BUSY at all");
    assert!(
        busy <= windows,
        "{busy} BUSY answers in {windows} s (and {answered} requests served): one per \
         refilled token instead of one per second"
    );
    assert!(
        answered >= 20,
        "only {answered} served: refilled tokens must pass"
    );
    provider.shutdown().await;
}

fn reserve(tx: &str, flavour: &Id, buyer: &str) -> Body {
    Body::ReserveFlavour(fluidlet::model::ReserveRequest {
        transaction: Id::new(tx).unwrap(),
        flavour: flavour.clone(),
        buyer: Id::new(buyer).unwrap(),
        partition: Some(Resources {
            cpu: 500,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        }),
    })
}

async fn a_buyer_with_too_many_unpeered_reservations_is_refused_and_others_are_not(port: u16) {
    let domain = fresh_domain();
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut pcfg = provider_config("prov", &domain, port, pd.path());
    pcfg.limits.pending_per_buyer = 3;
    let provider = start(pcfg, None).await;
    let consumer = start(config("cons", &domain, port, cd.path()), None).await;
    let mut eve = Rogue::connect(port, &domain, "eve").await;
    let mut held = Vec::new();
    for i in 0..3 {
        let flavour = flavours(&provider)[0].id.clone();
        eve.send("prov", reserve(&format!("eve.t{i}"), &flavour, "eve"))
            .await;
        match eve.recv().await.body {
            Body::Reserved(c) => held.push(c),
            other => panic!("reservation {i} refused: {other:?}"),
        }
    }
    let flavour = flavours(&provider)[0].id.clone();
    eve.send("prov", reserve("eve.t3", &flavour, "eve")).await;
    let (code, text) = error_of(&eve.recv().await).expect("an ERROR");
    assert_eq!(code, ErrorCode::TooManyPending, "{text}");
    assert!(text.contains("3 reservations not yet peered"), "{text}");
    // A retry of a transaction already answered still gets its contract.
    eve.send("prov", reserve("eve.t0", &flavour, "eve")).await;
    match eve.recv().await.body {
        Body::Reserved(c) => assert_eq!(c.id, held[0].id),
        other => panic!("retry of an acknowledged transaction refused: {other:?}"),
    }
    // Another buyer is not affected.
    let c = consumer.acquire(&want(500, 1)).await.expect("cons buys");
    assert_eq!(c.buyer.as_str(), "cons");
    // Releasing one makes room again: the count follows the contracts table.
    eve.send(
        "prov",
        Body::Release(ContractRef {
            contract: held[1].id.clone(),
        }),
    )
    .await;
    assert!(matches!(eve.recv().await.body, Body::Released(_)));
    let flavour = flavours(&provider)[0].id.clone();
    eve.send("prov", reserve("eve.t4", &flavour, "eve")).await;
    assert!(
        matches!(eve.recv().await.body, Body::Reserved(_)),
        "room after a release"
    );
    consumer.shutdown().await;
    provider.shutdown().await;
}

async fn an_advert_with_too_many_flavours_is_refused_with_a_clear_error(port: u16) {
    let domain = fresh_domain();
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let provider = start(provider_config("prov", &domain, port, pd.path()), None).await;
    let consumer = start(config("cons", &domain, port, cd.path()), None).await;
    let mut eve = Rogue::connect(port, &domain, "eve").await;
    let n = fluidlet::model::MAX_FLAVOURS + 1;
    let mut body = minicbor::Encoder::new(Vec::new());
    body.map(1).unwrap().u8(0).unwrap().array(n as u64).unwrap();
    for i in 0..n {
        let mut f: Flavour = fluidlet::demo::demo_offer(&Id::new("eve").unwrap());
        f.id = Id::new(&format!("f{i}")).unwrap();
        body.encode(&f).unwrap();
    }
    let payload = Message::envelope(
        Kind::Advert as u16,
        1,
        &Id::new("eve").unwrap(),
        body.writer(),
    );
    eve.publish(&format!("fluidos/v1/{domain}/catalog/eve"), true, payload)
        .await;
    let (code, text) = error_of(&eve.recv().await).expect("an ERROR");
    assert_eq!(code, ErrorCode::Malformed);
    assert!(
        text.contains(&format!("list of {n} items, at most {} allowed", n - 1)),
        "{text}"
    );
    eventually("cons to keep prov's advert only", || {
        let c = consumer.candidates().all();
        c.len() == 1 && c[0].flavour.provider.as_str() == "prov"
    })
    .await;
    let c = consumer.acquire(&want(1000, 1)).await.expect("cons buys");
    assert_eq!(c.seller.as_str(), "prov");
    // Clear the retained advert so it does not linger on the shared embedded broker.
    eve.publish(
        &format!("fluidos/v1/{domain}/catalog/eve"),
        true,
        Vec::new(),
    )
    .await;
    consumer.shutdown().await;
    provider.shutdown().await;
}
