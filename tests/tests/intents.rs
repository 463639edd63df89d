//! An intent belongs to the agent, not to the control client that submitted it (issue 21):
//! a client that hangs up at any step of the workflow, or while the domain broker is down,
//! leaves an intent that the node still places on its own. Driven from the control socket,
//! as `fluidlet intent submit` drives it, over mosquitto.

use fluidlet::control::{Client, Request, Response};
use fluidlet::model::{Intent, IntentState};
use fluidlet::Agent;
use fluidlet_tests::*;
use std::path::Path;
use std::time::Duration;

/// Sends an intent over the control socket and reads `frames` frames of its answer (steps,
/// then the intent), then hangs up. Returns the frames read.
async fn submit_and_hang_up(socket: &Path, name: &str, frames: usize) -> Vec<Response> {
    let mut c = Client::connect(socket).await.expect("control socket");
    c.send(&Request::Submit(Box::new(intent_spec(name, 500, 1))))
        .await
        .expect("send the intent");
    let mut got = Vec::new();
    while got.len() < frames {
        match tokio::time::timeout(WAIT, c.recv()).await {
            Ok(Ok(Some(r))) => got.push(r),
            other => panic!("control socket ended early: {other:?}"),
        }
    }
    drop(c);
    got
}

fn intent_named(a: &Agent, name: &str) -> Option<Intent> {
    a.tables()
        .intents()
        .expect("intents")
        .into_iter()
        .find(|i| i.name.as_str() == name)
}

async fn placed(a: &Agent, name: &str, limit: Duration) -> Option<Intent> {
    let ok = within(limit, || {
        intent_named(a, name).is_some_and(|i| i.state.is_final())
    })
    .await;
    let i = intent_named(a, name);
    if ok {
        i
    } else {
        panic!("intent {name} did not end within {limit:?}: {i:?}")
    }
}

#[tokio::test]
async fn an_intent_is_placed_whatever_step_its_client_hangs_up_at() {
    let Some(b) = broker(BrokerKind::Mosquitto) else {
        return;
    };
    let d = fresh_domain();
    let pdir = tempfile::tempdir().unwrap();
    let p = start(provider_config("prov", &d, b.port, pdir.path()), None).await;

    // One consumer followed to the end, to learn how many frames a whole submission sends.
    let dir0 = tempfile::tempdir().unwrap();
    let cfg0 = config("cons0", &d, b.port, dir0.path());
    let socket0 = cfg0.control_socket.clone();
    let c0 = start(cfg0, None).await;
    let mut c = Client::connect(&socket0).await.expect("control socket");
    c.send(&Request::Submit(Box::new(intent_spec("whole", 500, 1))))
        .await
        .unwrap();
    let mut frames = 0;
    loop {
        let r = tokio::time::timeout(WAIT, c.recv())
            .await
            .expect("an answer")
            .expect("a frame")
            .expect("not the end");
        frames += 1;
        if let Response::Intent(i) = r {
            assert_eq!(i.state, IntentState::Placed, "{i:?}");
            break;
        }
    }
    drop(c);
    c0.shutdown().await;
    assert!(
        frames > 8,
        "a whole submission streams its steps: {frames} frames"
    );

    // A fresh consumer for each hang-up point, so that each intent buys its own contract
    // and the hang-up falls inside discovery, reservation, peering or deployment.
    for (k, cut) in [0, 1, 2, 3, frames / 2, frames - 2, frames - 1]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&format!("cons{}", k + 1), &d, b.port, dir.path());
        let socket = cfg.control_socket.clone();
        let a = start(cfg, None).await;
        let name = format!("cut{cut}");
        let read = submit_and_hang_up(&socket, &name, cut).await;
        assert_eq!(read.len(), cut);
        let i = placed(&a, &name, Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            i.state,
            IntentState::Placed,
            "client hung up after {cut} of {frames} frames: {i:?}"
        );
        let c = i.contract.clone().expect("a contract");
        assert!(
            p.tables().contract(&c).unwrap().is_some(),
            "the provider sold {c}"
        );
        a.shutdown().await;
    }
    p.shutdown().await;
}

#[tokio::test]
async fn an_intent_submitted_during_an_outage_is_placed_after_its_client_left() {
    let Some(mut b) = broker(BrokerKind::Mosquitto) else {
        return;
    };
    let d = fresh_domain();
    let pdir = tempfile::tempdir().unwrap();
    let p = start(provider_config("prov", &d, b.port, pdir.path()), None).await;
    let cdir = tempfile::tempdir().unwrap();
    let cfg = config("cons", &d, b.port, cdir.path());
    let socket = cfg.control_socket.clone();
    let c = start(cfg, None).await;

    assert!(b.stop(), "mosquitto stops");
    assert!(
        within(WAIT, || !c.broker_status().connected).await,
        "the consumer sees the outage"
    );
    // The client reads the first step (the intent's id) and is cut off, as
    // `timeout 60 fluidlet intent submit ...` was in the report.
    let read = submit_and_hang_up(&socket, "outage", 1).await;
    let Response::Step {
        number: 1, text, ..
    } = &read[0]
    else {
        panic!("the first frame is step 1: {read:?}");
    };
    assert!(text.contains("received"), "{text}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let i = intent_named(&c, "outage").expect("stored");
    assert!(
        !i.state.is_final(),
        "nothing to place on while the broker is down: {i:?}"
    );

    b.restart();
    let i = placed(&c, "outage", Duration::from_secs(60)).await.unwrap();
    assert_eq!(i.state, IntentState::Placed, "{i:?}");
    c.shutdown().await;
    p.shutdown().await;
}

#[tokio::test]
async fn an_operator_cancels_a_waiting_intent_and_retries_it() {
    let Some(mut b) = broker(BrokerKind::Mosquitto) else {
        return;
    };
    let d = fresh_domain();
    let pdir = tempfile::tempdir().unwrap();
    let p = start(provider_config("prov", &d, b.port, pdir.path()), None).await;
    let cdir = tempfile::tempdir().unwrap();
    let cfg = config("cons", &d, b.port, cdir.path());
    let socket = cfg.control_socket.clone();
    let c = start(cfg, None).await;

    assert!(b.stop(), "mosquitto stops");
    assert!(within(WAIT, || !c.broker_status().connected).await);
    submit_and_hang_up(&socket, "waiting", 1).await;
    let id = intent_named(&c, "waiting").expect("stored").id;

    let mut cl = Client::connect(&socket).await.unwrap();
    cl.send(&Request::CancelIntent(id.clone())).await.unwrap();
    let Some(Response::Intent(i)) = cl.recv().await.unwrap() else {
        panic!("cancel answers with the intent");
    };
    assert_eq!(i.state, IntentState::Failed);
    assert!(i.error.unwrap().as_str().contains("cancelled"));

    // The broker back: the cancelled intent stays cancelled (its task is gone).
    b.restart();
    assert!(within(WAIT, || c.broker_status().connected).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let i = intent_named(&c, "waiting").unwrap();
    assert_eq!(i.state, IntentState::Failed, "{i:?}");
    assert!(
        i.contract.is_none(),
        "nothing bought for a cancelled intent"
    );

    // A cancel of an ended intent is refused; a retry starts it again and it is placed.
    cl.send(&Request::CancelIntent(id.clone())).await.unwrap();
    assert!(
        matches!(cl.recv().await.unwrap(), Some(Response::Error(e)) if e.contains("already ended"))
    );
    cl.send(&Request::RetryIntent(id.clone())).await.unwrap();
    assert!(matches!(
        cl.recv().await.unwrap(),
        Some(Response::Intent(_))
    ));
    drop(cl);
    let i = placed(&c, "waiting", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(i.state, IntentState::Placed, "{i:?}");

    // The catalog shows the provider, its flavour with price and currency, and the advert's age.
    let mut out = Vec::new();
    fluidlet::cli::catalog(Path::new("unused"), Some(&socket), false, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("providers heard: 1"), "{text}");
    assert!(
        text.contains("prov") && text.contains("EUR per hour"),
        "{text}"
    );
    assert!(text.contains("reservations 1 ok"), "{text}");
    assert!(text.contains("s ago"), "{text}");
    c.shutdown().await;
    p.shutdown().await;
}
