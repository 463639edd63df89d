//! Superseded flavour ids and retention, from the wire (docs/protocol.md, "Superseded flavour
//! ids" and "Retention").

use fluidlet::model::{Id, ReserveRequest, Resources};
use fluidlet::wire::{Body, ErrorCode};
use fluidlet_tests::*;

fn reserve(tx: &str, flavour: &Id) -> Body {
    Body::ReserveFlavour(ReserveRequest {
        transaction: Id::new(tx).unwrap(),
        flavour: flavour.clone(),
        buyer: Id::new("rogue").unwrap(),
        partition: Some(Resources {
            cpu: 500,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        }),
    })
}

/// Many requests naming the flavour id first advertised, sent without waiting for any answer
/// or advert: each is served while capacity lasts (8 pieces of 500m / 1 GiB fit the demo
/// offer), the rest get FLAVOUR_GONE (what is left, pods only, does not fit; NO_FIT is only
/// for the id on offer, which a buyer takes as a lie), and nothing is sold twice.
#[tokio::test]
async fn reservations_naming_one_superseded_id_are_served_while_capacity_lasts() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut cfg = provider_config("prov", &d, port, dir.path());
    cfg.limits.pending_per_buyer = 100;
    let p = start(cfg, None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let first = flavours(&p)[0].id.clone();
    for i in 0..10 {
        r.send("prov", reserve(&format!("rogue.t{i}"), &first))
            .await;
    }
    let (mut ok, mut gone) = (0, 0);
    for _ in 0..10 {
        match r.recv().await.body {
            Body::Reserved(c) => {
                assert_eq!(c.flavour.id, first, "the contract names the id asked for");
                ok += 1;
            }
            Body::Error(e) if e.code == ErrorCode::FlavourGone as u16 => {
                assert!(e.text.as_str().contains("was cut since"), "{}", e.text);
                gone += 1
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((ok, gone), (8, 2));
    let sold: u64 = p
        .tables()
        .contracts()
        .unwrap()
        .iter()
        .map(|c| c.resources.cpu)
        .sum();
    assert_eq!(sold, 4000, "exactly the offer, no more");
    assert_eq!(flavours(&p)[0].resources.cpu, 0, "no CPU left on offer");
    p.shutdown().await;
}

/// A flavour id issued before the offer's configuration changed is FLAVOUR_GONE after it,
/// even though the offer still has capacity; the current id sells.
#[tokio::test]
async fn a_superseded_id_after_the_terms_changed_is_flavour_gone() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut cfg = provider_config("prov", &d, port, dir.path());
    let p = start(cfg.clone(), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let first = flavours(&p)[0].id.clone();
    r.send("prov", reserve("rogue.t1", &first)).await;
    assert!(matches!(r.recv().await.body, Body::Reserved(_)));
    p.shutdown().await;

    cfg.offers[0].price.amount *= 2;
    let p = start(cfg, None).await;
    r.send("prov", reserve("rogue.t2", &first)).await;
    match r.recv().await.body {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::FlavourGone as u16, "{}", e.text),
        other => panic!("unexpected answer {other:?}"),
    }
    let now = flavours(&p)[0].id.clone();
    r.send("prov", reserve("rogue.t3", &now)).await;
    assert!(matches!(r.recv().await.body, Body::Reserved(_)));
    p.shutdown().await;
}

/// A restart that changes only a node-wide sale term the offer inherits (`[provider]
/// contract_term_secs`, then `[limits] max_per_buyer`) supersedes the advertised flavour id
/// too: the id current before the restart is FLAVOUR_GONE after it, the provider advertises
/// a new one, and that one sells under the new terms.
#[tokio::test]
async fn a_restart_that_changes_only_an_inherited_sale_term_supersedes_the_current_id() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut cfg = provider_config("prov", &d, port, dir.path());
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let p = start(cfg.clone(), None).await;
    let mut before = flavours(&p)[0].id.clone();
    p.shutdown().await;
    type Change = (&'static str, fn(&mut fluidlet::Config));
    let changes: [Change; 2] = [
        ("contract_term_secs", |c| {
            c.contract_term += std::time::Duration::from_secs(60)
        }),
        ("max_per_buyer", |c| {
            c.limits.max_per_buyer = if c.limits.max_per_buyer == 50 { 60 } else { 50 }
        }),
    ];
    for (i, (what, change)) in changes.into_iter().enumerate() {
        change(&mut cfg);
        let p = start(cfg.clone(), None).await;
        let now = flavours(&p)[0].id.clone();
        assert_ne!(
            now, before,
            "{what} changed: the current id must be superseded"
        );
        r.send("prov", reserve(&format!("rogue.g{i}"), &before))
            .await;
        match r.recv().await.body {
            Body::Error(e) => assert_eq!(e.code, ErrorCode::FlavourGone as u16, "{}", e.text),
            other => panic!("{what}: the id from before was sold: {other:?}"),
        }
        r.send("prov", reserve(&format!("rogue.n{i}"), &now)).await;
        let Body::Reserved(c) = r.recv().await.body else {
            panic!("{what}: the new id does not sell");
        };
        let term = u64::try_from(cfg.contract_term.as_millis()).unwrap();
        assert_eq!(c.term_ms, Some(term), "sold under the new term");
        before = flavours(&p)[0].id.clone();
        p.shutdown().await;
    }
}

/// A released contract is deleted with its transaction record once its retention is over, by
/// the running node's sweeper.
#[tokio::test]
async fn a_released_contract_is_deleted_after_its_retention() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut cfg = provider_config("prov", &d, port, dir.path());
    cfg.retention = std::time::Duration::from_millis(1000);
    cfg.expiry_check = std::time::Duration::from_millis(50);
    let p = start(cfg, None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let first = flavours(&p)[0].id.clone();
    r.send("prov", reserve("rogue.t1", &first)).await;
    let Body::Reserved(c) = r.recv().await.body else {
        panic!("not reserved");
    };
    r.send(
        "prov",
        Body::Release(fluidlet::wire::ContractRef {
            contract: c.id.clone(),
        }),
    )
    .await;
    assert!(matches!(r.recv().await.body, Body::Released(_)));
    assert!(
        p.tables().contract(&c.id).unwrap().is_some(),
        "kept during retention"
    );
    eventually("the contract deleted", || {
        p.tables().contract(&c.id).unwrap().is_none()
    })
    .await;
    assert_eq!(p.tables().transaction_record_count(), 0);
    assert_eq!(p.tables().deadline_count(), 0);
    p.shutdown().await;
}
