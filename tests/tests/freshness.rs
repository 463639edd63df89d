//! Advert freshness (docs/protocol.md, "Advert freshness"): what a domain of bridged brokers
//! needs, since bridges hand stale retained adverts back when a link returns. A provider
//! re-publishes its advert every `[provider] advert_refresh_secs`; a consumer with
//! `[consumer] advert_max_age_secs` ignores older adverts and forgets providers it has not
//! heard from within that age.

use fluidlet::model::{FlavourList, Id};
use fluidlet::wire::{Body, Flavours, Message};
use fluidlet_tests::*;
use std::time::Duration;

on_both_brokers!(stale_adverts_are_ignored_and_silent_providers_forgotten);

/// A retained advert of `node`, sent at `sent_at` (Unix ms).
fn advert(node: &str, sent_at: u64) -> Vec<u8> {
    let mut f = fluidlet::demo::demo_offer(&Id::new(node).unwrap());
    f.id = Id::new("pool.1").unwrap();
    Message {
        id: 1,
        correlation: None,
        sent_at,
        sender: Id::new(node).unwrap(),
        body: Body::Advert(Flavours {
            flavours: FlavourList::from_slice_truncated(&[f]),
            ..Default::default()
        }),
    }
    .encode()
    .unwrap()
}

fn providers(a: &fluidlet::Agent) -> Vec<String> {
    let mut v: Vec<String> = a
        .candidates()
        .all()
        .iter()
        .map(|c| c.flavour.provider.to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

async fn stale_adverts_are_ignored_and_silent_providers_forgotten(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let now = fluidlet::unix_ms();
    // "ghost" left a retained advert a minute ago and is gone; "quiet" advertised just now,
    // once, and will never refresh; "prov" is a live provider refreshing every 5 s.
    let ghost = Rogue::connect(port, &d, "ghost").await;
    ghost
        .publish(
            &format!("fluidos/v1/{d}/catalog/ghost"),
            true,
            advert("ghost", now - 60_000),
        )
        .await;
    let quiet = Rogue::connect(port, &d, "quiet").await;
    quiet
        .publish(
            &format!("fluidos/v1/{d}/catalog/quiet"),
            true,
            advert("quiet", now),
        )
        .await;
    let mut pc = provider_config("prov", &d, port, dir.path());
    pc.advert_refresh = Some(Duration::from_secs(5));
    let p = start(pc, None).await;
    let mut cc = config("cons", &d, port, dir.path());
    cc.advert_max_age = Some(Duration::from_secs(12));
    let c = start(cc, None).await;

    eventually("cons to take the fresh adverts", || {
        providers(&c) == ["prov", "quiet"]
    })
    .await;
    // The retained ghost advert arrived with the others and was ignored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        providers(&c),
        ["prov", "quiet"],
        "the stale advert was taken"
    );

    // quiet is not heard from again: forgotten after 12 s; prov's refreshes keep it.
    let start_wait = tokio::time::Instant::now();
    while providers(&c).contains(&"quiet".to_string()) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(30),
            "a provider silent for longer than advert_max_age is still a candidate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(providers(&c), ["prov"], "the refreshing provider stays");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        providers(&c),
        ["prov"],
        "still there after its first advert aged out"
    );

    // Clean the shared broker's retained store.
    for (r, n) in [(&ghost, "ghost"), (&quiet, "quiet")] {
        r.publish(&format!("fluidos/v1/{d}/catalog/{n}"), true, Vec::new())
            .await;
    }
    c.shutdown().await;
    p.shutdown().await;
}
