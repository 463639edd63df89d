//! A lying provider cannot block purchases: eve, a node of the domain, advertises 16 cheap
//! flavours, answers every discovery with fresh ones, and refuses every RESERVE with NO_FIT
//! (or never answers). bob's intent is placed on alice, the honest provider, at the cost of
//! one refusal (or one reservation timeout), and eve is demoted for the next purchases.

use fluidlet::model::{Flavour, Id, IntentState};
use fluidlet::wire::{Body, ErrorBody, ErrorCode, Flavours, Message};
use fluidlet_tests::{broker, config, eventually, fresh_domain, intent_spec, provider_config};
use fluidlet_tests::{start, want, BrokerKind, Rogue};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// Refuses every RESERVE_FLAVOUR with NO_FIT.
    NoFit,
    /// Never answers a RESERVE_FLAVOUR.
    Silent,
}

/// 16 flavours of eve's at price 1, with ids `f{n}`..`f{n+15}`.
fn cheap(n: usize) -> fluidlet::model::FlavourList {
    let eve = Id::new("eve").unwrap();
    let list: Vec<Flavour> = (n..n + 16)
        .map(|i| {
            let mut f = fluidlet::demo::demo_offer(&eve);
            f.id = Id::new(&format!("f{i}")).unwrap();
            f.price.amount = 1;
            f
        })
        .collect();
    fluidlet::model::Bounded::from_slice_truncated(&list)
}

fn message(id: u64, correlation: Option<u64>, body: Body) -> Vec<u8> {
    Message {
        id,
        correlation,
        sent_at: fluidlet::unix_ms(),
        sender: Id::new("eve").unwrap(),
        body,
    }
    .encode()
    .unwrap()
}

/// Starts eve, claiming protocol revision `revision` in her adverts and answers (`None`: a
/// build from before revisions); returns the number of RESERVE_FLAVOURs she has received so
/// far.
async fn eve(port: u16, domain: &str, lie: Lie, revision: Option<u16>) -> Arc<AtomicUsize> {
    let mut eve = Rogue::connect(port, domain, "eve").await;
    eve.subscribe(&format!("fluidos/v1/{domain}/discovery/from/+"))
        .await;
    let advert = message(
        1,
        None,
        Body::Advert(Flavours {
            flavours: cheap(0),
            revision,
            ..Default::default()
        }),
    );
    eve.publish(&format!("fluidos/v1/{domain}/catalog/eve"), true, advert)
        .await;
    let reserves = Arc::new(AtomicUsize::new(0));
    let count = reserves.clone();
    tokio::spawn(async move {
        let mut next = 16;
        while let Some((topic, payload)) = eve.recv_within(Duration::from_secs(60)).await {
            let Some((_, from)) = topic.rsplit_once("/from/") else {
                continue;
            };
            let Ok(m) = Message::decode(&payload) else {
                continue;
            };
            let answer = match m.body {
                Body::ListFlavours(_) => {
                    next += 16;
                    Body::Flavours(Flavours {
                        flavours: cheap(next),
                        revision,
                        ..Default::default()
                    })
                }
                Body::ReserveFlavour(_) => {
                    count.fetch_add(1, Ordering::SeqCst);
                    if lie == Lie::Silent {
                        continue;
                    }
                    Body::Error(ErrorBody::new(ErrorCode::NoFit, "no fit (a lie)"))
                }
                _ => continue,
            };
            eve.send_raw(from, message(next as u64, Some(m.id), answer))
                .await;
        }
    });
    reserves
}

async fn a_liar_cannot_block_an_intent(lie: Lie) {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let (ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let alice = start(provider_config("alice", &domain, b.port, ad.path()), None).await;
    let bcfg = config("bob", &domain, b.port, bd.path());
    let timeout = bcfg.reserve_timeout;
    let bob = start(bcfg, None).await;
    let reserves = eve(b.port, &domain, lie, Some(fluidlet::wire::REVISION)).await;
    eventually("bob to see eve's 16 flavours and alice's", || {
        bob.candidates().all().len() == 17
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // eve's discovery SUBACK

    let started = Instant::now();
    let intent = bob
        .submit_intent(intent_spec("web", 1000, 1))
        .await
        .expect("intent accepted");
    eventually("bob's intent to end", || {
        bob.tables()
            .intent(&intent.id)
            .unwrap()
            .is_some_and(|i| i.state.is_final())
    })
    .await;
    let took = started.elapsed();
    let ended = bob.tables().intent(&intent.id).unwrap().unwrap();
    assert_eq!(ended.state, IntentState::Placed, "{:?}", ended.error);
    let contract = bob
        .tables()
        .contract(ended.contract.as_ref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        contract.seller.as_str(),
        "alice",
        "placed on the honest one"
    );
    assert_eq!(
        reserves.load(Ordering::SeqCst),
        1,
        "one attempt per provider per flow"
    );
    if lie == Lie::Silent {
        assert!(
            took < timeout * 2,
            "a silent provider costs one reservation timeout ({timeout:?}); took {took:?}"
        );
    }
    let eve_id = Id::new("eve").unwrap();
    let r = bob.tables().rating(&eve_id).unwrap().expect("eve rated");
    assert_eq!(r.lies, 1);
    assert!(r.demoted(fluidlet::unix_ms()), "eve demoted: {r:?}");

    // Demoted: the next purchase goes to alice first although eve is cheaper.
    let again = bob.acquire(&want(500, 1)).await.expect("second purchase");
    assert_eq!(again.seller.as_str(), "alice");
    assert_eq!(reserves.load(Ordering::SeqCst), 1, "eve not tried again");

    let eve_client = Rogue::connect_as(b.port, &domain, "eve", "eve-cleanup").await;
    eve_client
        .publish(
            &format!("fluidos/v1/{domain}/catalog/eve"),
            true,
            Vec::new(),
        )
        .await;
    bob.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test]
async fn a_provider_refusing_every_reservation_with_no_fit_cannot_block_an_intent() {
    a_liar_cannot_block_an_intent(Lie::NoFit).await;
}

#[tokio::test]
async fn a_provider_ignoring_every_reservation_costs_one_timeout_and_cannot_block_an_intent() {
    a_liar_cannot_block_an_intent(Lie::Silent).await;
}

/// A provider of revision 0 (a build from before `v0.1.0`) answers NO_FIT for a superseded id
/// whose piece no longer fits, where a current one answers FLAVOUR_GONE (docs/protocol.md
/// section 10): its first NO_FIT in a purchase only sets it aside, as a first FLAVOUR_GONE
/// does. The purchase goes to alice and eve is not demoted.
#[tokio::test]
async fn a_first_no_fit_from_a_provider_of_revision_0_sets_it_aside_without_a_demotion() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let domain = fresh_domain();
    let (ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let alice = start(provider_config("alice", &domain, b.port, ad.path()), None).await;
    let bob = start(config("bob", &domain, b.port, bd.path()), None).await;
    let reserves = eve(b.port, &domain, Lie::NoFit, None).await;
    eventually("bob to see eve's 16 flavours and alice's", || {
        bob.candidates().all().len() == 17
    })
    .await;
    let c = bob.acquire(&want(500, 1)).await.expect("a purchase");
    assert_eq!(c.seller.as_str(), "alice");
    assert_eq!(reserves.load(Ordering::SeqCst), 1, "eve was asked first");
    let eve_id = Id::new("eve").unwrap();
    let rating = bob.tables().rating(&eve_id).unwrap();
    assert!(
        rating
            .as_ref()
            .is_none_or(|r| r.lies == 0 && !r.demoted(fluidlet::unix_ms())),
        "eve demoted for an old provider's NO_FIT: {rating:?}"
    );
    let eve_client = Rogue::connect_as(b.port, &domain, "eve", "eve-cleanup").await;
    eve_client
        .publish(
            &format!("fluidos/v1/{domain}/catalog/eve"),
            true,
            Vec::new(),
        )
        .await;
    bob.shutdown().await;
    alice.shutdown().await;
}
