//! No hoarding: an offer caps the share one buyer may hold, and contracts have a term that
//! the buyer renews with RENEW; an abandoned contract ends and its capacity comes back.

use fluidlet::config::OfferTerms;
use fluidlet::model::{Contract, ContractState, Id, IntentState, ReserveRequest, Resources};
use fluidlet::wire::{Body, ContractRef, ErrorCode, Message, PeerRequest};
use fluidlet_tests::{broker, config, eventually, flavours, fresh_domain, provider_config};
use fluidlet_tests::{start, want, BrokerKind, Rogue};
use std::time::Duration;

const GI: u64 = 1 << 30;

fn piece(cpu: u64, mem_gi: u64) -> Option<Resources> {
    Some(Resources {
        cpu,
        memory: mem_gi * GI,
        pods: 1,
        storage: 0,
    })
}

/// Sends a RESERVE_FLAVOUR for the provider's current flavour; returns the answer.
async fn reserve(
    rogue: &mut Rogue,
    prov: &fluidlet::Agent,
    tx: &str,
    part: Option<Resources>,
) -> Message {
    let flavour = flavours(prov)[0].id.clone();
    rogue
        .send(
            prov.node_id().as_str(),
            Body::ReserveFlavour(ReserveRequest {
                transaction: Id::new(tx).unwrap(),
                flavour,
                buyer: Id::new(&rogue.id).unwrap(),
                partition: part,
            }),
        )
        .await;
    rogue.recv().await
}

fn contract(m: Message) -> Contract {
    match m.body {
        Body::Reserved(c) | Body::Renewed(c) => *c,
        other => panic!("expected a contract, got {other:?}"),
    }
}

fn error(m: &Message) -> (ErrorCode, String) {
    match &m.body {
        Body::Error(e) => (e.code().unwrap(), e.text.to_string()),
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// Buys `part` and peers it (the provider's dry-run fabric grants it): an Active contract.
async fn buy_and_peer(rogue: &mut Rogue, prov: &fluidlet::Agent, tx: &str) -> Contract {
    let c = contract(reserve(rogue, prov, tx, piece(1000, 1)).await);
    rogue
        .send(
            prov.node_id().as_str(),
            Body::PeerRequest(PeerRequest {
                contract: c.id.clone(),
                cluster_id: Id::new(&format!("{}-cluster", rogue.id)).unwrap(),
                liqo_version: None,
                certificate: None,
            }),
        )
        .await;
    assert!(matches!(rogue.recv().await.body, Body::PeerAccept(_)));
    let state = prov.tables().contract(&c.id).unwrap().unwrap().state;
    assert_eq!(state, ContractState::Active);
    c
}

async fn renew(rogue: &mut Rogue, prov: &fluidlet::Agent, c: &Id) -> Message {
    rogue
        .send(
            prov.node_id().as_str(),
            Body::Renew(ContractRef {
                contract: c.clone(),
            }),
        )
        .await;
    rogue.recv().await
}

#[tokio::test]
async fn a_buyer_cannot_hold_more_than_the_offers_share_cap() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut pcfg = provider_config("prov", &domain, b.port, pd.path());
    let offer = pcfg.offers[0].id.clone();
    pcfg.offer_terms.insert(
        offer,
        OfferTerms {
            max_per_buyer: Some(50),
            contract_term: None,
        },
    );
    let prov = start(pcfg, None).await;
    let cons = start(config("cons", &domain, b.port, cd.path()), None).await;
    let mut eve = Rogue::connect(b.port, &domain, "eve").await;
    // Half of 4000m / 8 GiB / 110 pods: 2000m, 4 GiB, 55 pods.
    contract(reserve(&mut eve, &prov, "eve.t1", piece(1500, 3)).await);
    let (code, text) = error(&reserve(&mut eve, &prov, "eve.t2", piece(1000, 1)).await);
    assert_eq!(code, ErrorCode::ShareExceeded, "{text}");
    assert!(text.contains("50% of offer edge-pool"), "{text}");
    let (code, _) = error(&reserve(&mut eve, &prov, "eve.t3", None).await);
    assert_eq!(
        code,
        ErrorCode::ShareExceeded,
        "the whole rest is refused too"
    );
    contract(reserve(&mut eve, &prov, "eve.t4", piece(500, 1)).await);
    // Exactly at the cap now: 2000m, 4 GiB.
    let (code, _) = error(&reserve(&mut eve, &prov, "eve.t5", piece(500, 1)).await);
    assert_eq!(code, ErrorCode::ShareExceeded);
    // Another buyer is served from what is left.
    let c = cons.acquire(&want(1000, 1)).await.expect("cons buys");
    assert_eq!(c.seller.as_str(), "prov");
    cons.shutdown().await;
    prov.shutdown().await;
}

#[tokio::test]
async fn an_abandoned_active_contract_expires_and_its_capacity_comes_back() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut pcfg = provider_config("prov", &domain, b.port, pd.path());
    pcfg.contract_term = Duration::from_secs(2);
    let total = pcfg.offers[0].resources;
    let prov = start(pcfg, None).await;
    let watcher = start(config("cons", &domain, b.port, cd.path()), None).await;
    let mut eve = Rogue::connect(b.port, &domain, "eve").await;
    let c = buy_and_peer(&mut eve, &prov, "eve.t1").await;
    assert_eq!(c.term_ms, Some(2000), "the term is in the contract");
    assert!(c.ends_at.is_some_and(|e| e <= c.created_at + 2000));
    assert_eq!(flavours(&prov)[0].resources.cpu, total.cpu - 1000);
    // eve never renews.
    eventually("the abandoned contract to expire", || {
        prov.tables().contract(&c.id).unwrap().unwrap().state == ContractState::Expired
    })
    .await;
    assert_eq!(flavours(&prov)[0].resources, total, "capacity back");
    eventually("the whole offer re-advertised", || {
        let seen = watcher.candidates().all();
        seen.len() == 1 && seen[0].flavour.resources == total
    })
    .await;
    watcher.shutdown().await;
    prov.shutdown().await;
}

#[tokio::test]
async fn renew_extends_a_contract_idempotently_and_only_for_its_buyer() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("prov", &domain, b.port, pd.path());
    pcfg.contract_term = Duration::from_secs(3);
    let prov = start(pcfg, None).await;
    let mut bob = Rogue::connect(b.port, &domain, "bob").await;
    let mut eve = Rogue::connect(b.port, &domain, "eve").await;
    let c = buy_and_peer(&mut bob, &prov, "bob.t1").await;
    let first_end = c.ends_at.unwrap();

    let (code, text) = error(&renew(&mut eve, &prov, &c.id).await);
    assert_eq!(code, ErrorCode::NoContract, "{text}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r1 = contract(renew(&mut bob, &prov, &c.id).await);
    let r2 = contract(renew(&mut bob, &prov, &c.id).await);
    assert_eq!(r1.id, c.id);
    let (e1, e2) = (r1.ends_at.unwrap(), r2.ends_at.unwrap());
    assert!(e1 >= first_end + 1000, "extended: {first_end} -> {e1}");
    assert!(
        e2 >= e1 && e2 - e1 < 1000,
        "a repeated RENEW adds no second term: {e1} -> {e2}"
    );
    assert_eq!(r2.state, ContractState::Active);
    // Past the first end, the renewed contract still holds.
    tokio::time::sleep(Duration::from_millis(
        (first_end + 1000).saturating_sub(fluidlet::unix_ms()),
    ))
    .await;
    let now = prov.tables().contract(&c.id).unwrap().unwrap();
    assert_eq!(now.state, ContractState::Active);
    assert_eq!(now.ends_at, Some(e2));
    prov.shutdown().await;
}

#[tokio::test]
async fn a_consumer_agent_renews_its_contracts_before_they_end() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let (pd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut pcfg = provider_config("prov", &domain, b.port, pd.path());
    pcfg.contract_term = Duration::from_secs(2);
    let prov = start(pcfg, None).await;
    let cons = start(config("cons", &domain, b.port, cd.path()), None).await;
    let intent = cons
        .submit_intent(fluidlet_tests::intent_spec("web", 1000, 1))
        .await
        .unwrap();
    eventually("the intent to be placed", || {
        cons.tables()
            .intent(&intent.id)
            .unwrap()
            .is_some_and(|i| i.state == IntentState::Placed)
    })
    .await;
    let id = cons
        .tables()
        .intent(&intent.id)
        .unwrap()
        .unwrap()
        .contract
        .unwrap();
    let first_end = cons
        .tables()
        .contract(&id)
        .unwrap()
        .unwrap()
        .ends_at
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for side in [&prov, &cons] {
        let c = side.tables().contract(&id).unwrap().unwrap();
        assert_eq!(c.state, ContractState::Active, "{}", side.node_id());
        assert!(c.ends_at.unwrap() > first_end + 2000, "{c:?}");
    }
    cons.shutdown().await;
    prov.shutdown().await;
}

#[tokio::test]
async fn a_renewed_contract_ends_at_its_new_end_after_a_provider_restart() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let pd = tempfile::tempdir().unwrap();
    let mut pcfg = provider_config("prov", &domain, b.port, pd.path());
    pcfg.contract_term = Duration::from_secs(3);
    let total = pcfg.offers[0].resources;
    let prov = start(pcfg.clone(), None).await;
    let mut bob = Rogue::connect(b.port, &domain, "bob").await;
    let c = buy_and_peer(&mut bob, &prov, "bob.t1").await;
    let first_end = c.ends_at.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewed = contract(renew(&mut bob, &prov, &c.id).await);
    let new_end = renewed.ends_at.unwrap();
    assert!(new_end >= first_end + 1000, "{first_end} -> {new_end}");
    prov.shutdown().await;

    // The renewed end is what the restarted provider's sweeper finds in its index.
    let prov = start(pcfg, None).await;
    tokio::time::sleep(Duration::from_millis(
        (first_end + 500).saturating_sub(fluidlet::unix_ms()),
    ))
    .await;
    let now = prov.tables().contract(&c.id).unwrap().unwrap();
    assert_eq!(
        now.state,
        ContractState::Active,
        "not ended at the first end"
    );
    eventually("the renewed contract to end unrenewed", || {
        prov.tables().contract(&c.id).unwrap().unwrap().state == ContractState::Expired
    })
    .await;
    assert!(fluidlet::unix_ms() >= new_end, "not before its new end");
    assert_eq!(flavours(&prov)[0].resources, total, "capacity back");
    prov.shutdown().await;
}
