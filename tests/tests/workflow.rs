//! The whole seed workflow (steps 1-31) between two nodes over a real broker, with the
//! dry-run fabric, and the allocation lifecycle around it: room on bought capacity, own
//! capacity, expiry, release, refusals and resumption after a restart.

use fluidlet::model::{AllocationKind, AllocationStatus, ContractState, Id, IntentState};
use fluidlet::wire::{Body, ContractRef, ErrorCode, PeerRequest};
use fluidlet_tests::*;
use std::time::Duration;

on_both_brokers!(
    intent_goes_through_all_31_steps_and_the_workload_is_placed,
    second_intent_uses_the_room_left_on_the_bought_virtual_node,
    intent_that_fits_own_capacity_runs_locally,
    intent_nobody_can_serve_fails_with_a_clear_error,
    unpeered_reservation_expires_and_capacity_returns,
    release_restores_capacity_and_tears_the_peering_down,
    peering_without_a_matching_contract_is_refused,
    consumer_restarted_mid_intent_resumes_it,
);

fn consumer_cfg(name: &str, d: &str, port: u16, dir: &std::path::Path) -> fluidlet::Config {
    let mut c = config(name, d, port, dir);
    c.watch_catalog = false;
    c
}

async fn intent_goes_through_all_31_steps_and_the_workload_is_placed(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let steps = Steps::default();
    let p = start(provider_config("prov", &d, port, dir.path()), Some(&steps)).await;
    let c = start(consumer_cfg("cons", &d, port, dir.path()), Some(&steps)).await;
    let total = flavours(&p)[0].resources;

    let intent = c.submit_intent(intent_spec("cam", 1000, 2)).await.unwrap();

    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let mut seen: Vec<u8> = steps
        .of("cons")
        .into_iter()
        .chain(steps.of("prov"))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        (1..=31).collect::<Vec<u8>>(),
        "every step of the seed workflow"
    );
    assert_eq!(steps.of("prov"), [8, 9, 15, 16, 17, 18, 18, 23, 24, 25, 26]);

    let contract_id = intent.contract.clone().unwrap();
    let node = fluidlet::fabric::virtual_node_name(&contract_id);
    assert_eq!(intent.placement.as_ref().unwrap().as_str(), node);
    // Both sides: contract Active, allocation active; the provider's flavour reduced.
    for (side, kind) in [
        (&p, AllocationKind::Node),
        (&c, AllocationKind::VirtualNode),
    ] {
        let k = side.tables().contract(&contract_id).unwrap().unwrap();
        assert_eq!(k.state, ContractState::Active);
        let a = side.tables().allocation(&contract_id).unwrap().unwrap();
        assert_eq!((a.kind, a.status), (kind, AllocationStatus::Active));
    }
    let left = flavours(&p)[0].resources;
    assert_eq!(left.cpu, total.cpu - 1000);
    assert_eq!(
        c.tables().intent(&intent.id).unwrap().unwrap().state,
        IntentState::Placed
    );
    // Ratings and Metrics: the reservation and the peering are on the provider's record.
    let r = c
        .tables()
        .rating(&Id::new("prov").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((r.reservations_ok, r.peerings_ok, r.failures()), (1, 1, 0));

    // What the dry-run fabric recorded is what a cluster would have been given.
    let files = files_under(&dir.path().join("cons").join("fabric"));
    let slice = files
        .iter()
        .find(|(_, t)| t.contains("\"kind\": \"ResourceSlice\""))
        .expect("a ResourceSlice");
    assert!(slice.1.contains("\"cpu\": \"1000m\""), "{}", slice.1);
    assert!(slice.1.contains(&format!("\"name\": \"{node}\"")));
    let kust = files
        .iter()
        .find(|(p, _)| p.ends_with("kustomization.yaml"))
        .expect("a kustomization");
    assert!(kust.1.contains(&format!("kubernetes.io/hostname: {node}")));
    let prov_files = files_under(&dir.path().join("prov").join("fabric"));
    assert!(prov_files
        .iter()
        .any(|(_, t)| t.contains("generate peering-user --consumer-cluster-id dryrun-cons")));
    c.shutdown().await;
    p.shutdown().await;
}

async fn second_intent_uses_the_room_left_on_the_bought_virtual_node(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let steps = Steps::default();
    // A flavour sold only whole: 2 CPUs, 4 GiB. The first intent needs half of it.
    let p = start(whole_provider_config("prov", &d, port, dir.path()), None).await;
    let c = start(consumer_cfg("cons", &d, port, dir.path()), Some(&steps)).await;
    let first = c.submit_intent(intent_spec("a", 1000, 2)).await.unwrap();
    assert_eq!(first.state, IntentState::Placed, "{:?}", first.error);
    let before = steps.of("cons").len();

    let second = c.submit_intent(intent_spec("b", 1000, 2)).await.unwrap();
    assert_eq!(second.state, IntentState::Placed, "{:?}", second.error);
    assert_eq!(second.contract, first.contract, "no new contract");
    assert_eq!(second.placement, first.placement);
    let new_steps = &steps.of("cons")[before..];
    assert!(!new_steps.contains(&4), "no REAR this time: {new_steps:?}");
    assert_eq!(c.tables().contracts().unwrap().len(), 1);

    // A third one does not fit in the room left and needs REAR, which finds nothing.
    let third = c.submit_intent(intent_spec("c", 500, 1)).await.unwrap();
    assert_eq!(third.state, IntentState::Failed);
    c.shutdown().await;
    p.shutdown().await;
}

async fn intent_that_fits_own_capacity_runs_locally(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let steps = Steps::default();
    let n = start(provider_config("gw", &d, port, dir.path()), Some(&steps)).await;
    let total = flavours(&n)[0].resources;
    let intent = n
        .submit_intent(intent_spec("local-app", 1000, 1))
        .await
        .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    assert_eq!(intent.placement.as_ref().unwrap().as_str(), "local");
    assert!(!steps.of("gw").contains(&4), "no REAR needed");
    // Its own workload takes capacity from its own offer: conserved like any sale.
    let k = n
        .tables()
        .contract(intent.contract.as_ref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((k.buyer.as_str(), k.seller.as_str()), ("gw", "gw"));
    assert_eq!(
        flavours(&n)[0].resources.saturating_add(&k.resources),
        total
    );
    n.shutdown().await;
}

async fn intent_nobody_can_serve_fails_with_a_clear_error(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let mut cfg = consumer_cfg("cons", &d, port, dir.path());
    cfg.discovery_window = Duration::from_millis(300);
    let c = start(cfg, None).await;
    let intent = c
        .submit_intent(intent_spec("huge", 64_000, 1))
        .await
        .unwrap();
    assert_eq!(intent.state, IntentState::Failed);
    let why = intent.error.as_ref().unwrap().as_str();
    assert!(why.starts_with("no provider offers"), "{why}");
    assert_eq!(
        c.tables().intent(&intent.id).unwrap().unwrap().state,
        IntentState::Failed
    );
    c.shutdown().await;
    p.shutdown().await;
}

async fn unpeered_reservation_expires_and_capacity_returns(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.reservation_ttl = Duration::from_millis(800);
    pcfg.expiry_check = Duration::from_millis(100);
    let p = start(pcfg.clone(), None).await;
    let total = flavours(&p)[0].resources;
    let mut ccfg = config("cons", &d, port, dir.path());
    ccfg.expiry_check = Duration::from_millis(100);
    let c = start(ccfg, None).await;
    let contract = c
        .acquire(&intent_spec("x", 1000, 1).selector)
        .await
        .unwrap();
    assert_eq!(flavours(&p)[0].resources.cpu, total.cpu - 1000);

    eventually("the provider's capacity back", || {
        flavours(&p).first().is_some_and(|f| f.resources == total)
    })
    .await;
    let on_p = p.tables().contract(&contract.id).unwrap().unwrap();
    assert_eq!(on_p.state, ContractState::Expired);
    assert_eq!(
        p.tables().allocation(&contract.id).unwrap().unwrap().status,
        AllocationStatus::Released
    );
    eventually("the consumer's contract expired", || {
        c.tables().contract(&contract.id).unwrap().unwrap().state == ContractState::Expired
    })
    .await;
    // Re-advertised at once: the consumer's catalog view has the whole offer again.
    eventually("the full flavour re-advertised", || {
        c.candidates()
            .all()
            .iter()
            .any(|k| k.flavour.resources == total)
    })
    .await;

    // Across a restart: a reservation that lapses while the provider is down is expired
    // when it comes back.
    let second = c
        .acquire(&intent_spec("y", 1000, 1).selector)
        .await
        .unwrap();
    p.shutdown().await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let p = start(pcfg, None).await;
    eventually("capacity back after the restart", || {
        flavours(&p).first().is_some_and(|f| f.resources == total)
    })
    .await;
    assert_eq!(
        p.tables().contract(&second.id).unwrap().unwrap().state,
        ContractState::Expired
    );
    c.shutdown().await;
    p.shutdown().await;
}

async fn release_restores_capacity_and_tears_the_peering_down(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let c = start(consumer_cfg("cons", &d, port, dir.path()), None).await;
    let total = flavours(&p)[0].resources;
    let intent = c.submit_intent(intent_spec("cam", 1500, 2)).await.unwrap();
    let id = intent.contract.clone().unwrap();

    let released = c.release(&id).await.unwrap();
    assert_eq!(released.state, ContractState::Released);
    for side in [&p, &c] {
        assert_eq!(
            side.tables().contract(&id).unwrap().unwrap().state,
            ContractState::Released
        );
        assert_eq!(
            side.tables().allocation(&id).unwrap().unwrap().status,
            AllocationStatus::Released
        );
    }
    assert_eq!(
        flavours(&p)[0].resources,
        total,
        "capacity conserved: all of it is back"
    );
    let cons = files_under(&dir.path().join("cons").join("fabric"));
    assert!(
        cons.iter()
            .any(|(_, t)| t.contains("delete resourceslices.authentication.liqo.io ")),
        "ResourceSlice removed"
    );
    assert!(
        cons.iter()
            .any(|(_, t)| t.contains("unpeer --remote-kubeconfig")),
        "last contract: unpeered"
    );
    let prov = files_under(&dir.path().join("prov").join("fabric"));
    assert!(prov
        .iter()
        .any(|(_, t)| t.contains("delete peering-user --consumer-cluster-id dryrun-cons")));
    // Releasing again is harmless.
    assert!(c.release(&id).await.is_ok());
    assert_eq!(flavours(&p)[0].resources, total);
    c.shutdown().await;
    p.shutdown().await;
}

async fn peering_without_a_matching_contract_is_refused(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let c = start(config("cons", &d, port, dir.path()), None).await;
    let contract = c.acquire(&intent_spec("x", 500, 1).selector).await.unwrap();
    let mut r = Rogue::connect(port, &d, "rogue").await;
    for id in ["prov.c999", contract.id.as_str()] {
        let body = Body::PeerRequest(PeerRequest {
            contract: Id::new(id).unwrap(),
            cluster_id: Id::new("rogue-cluster").unwrap(),
            liqo_version: None,
            certificate: None,
        });
        r.send("prov", body).await;
        let m = r.recv().await;
        let Body::Error(e) = m.body else {
            panic!("granted {id} to a stranger: {:?}", m.body)
        };
        assert_eq!(e.code(), Some(ErrorCode::NoContract), "{id}: {}", e.text);
    }
    // Nor can a stranger release someone else's contract.
    r.send(
        "prov",
        Body::Release(ContractRef {
            contract: contract.id.clone(),
        }),
    )
    .await;
    let Body::Error(e) = r.recv().await.body else {
        panic!("released by a stranger")
    };
    assert_eq!(e.code(), Some(ErrorCode::NoContract));
    assert_eq!(
        p.tables().contract(&contract.id).unwrap().unwrap().state,
        ContractState::Reserved
    );
    c.shutdown().await;
    p.shutdown().await;
}

async fn consumer_restarted_mid_intent_resumes_it(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let p = start(provider_config("prov", &d, port, dir.path()), None).await;
    let ccfg = consumer_cfg("cons", &d, port, dir.path());
    // First run: the intent got its contract, then the agent stopped before peering.
    let c = start(ccfg.clone(), None).await;
    let spec = intent_spec("cam", 1000, 1);
    let contract = c.acquire(&spec.selector).await.unwrap();
    c.shutdown().await;
    {
        let t = fluidlet::tables::Tables::open(&ccfg.data_dir).unwrap();
        let intent = fluidlet::model::Intent {
            id: Id::new("i77").unwrap(),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            manifest: spec.manifest.clone(),
            selector: spec.selector.clone(),
            state: IntentState::Peering,
            contract: Some(contract.id.clone()),
            placement: None,
            error: None,
            created_at: 0,
            updated_at: 0,
        };
        t.put_intent(&intent).await.unwrap();
    }
    // Second run: it picks the intent up where it was.
    let c = start(ccfg, None).await;
    let id = Id::new("i77").unwrap();
    eventually("the resumed intent placed", || {
        c.tables()
            .intent(&id)
            .unwrap()
            .is_some_and(|i| i.state == IntentState::Placed)
    })
    .await;
    assert_eq!(
        p.tables().contract(&contract.id).unwrap().unwrap().state,
        ContractState::Active
    );
    assert_eq!(
        c.tables().contracts().unwrap().len(),
        1,
        "no second purchase"
    );
    c.shutdown().await;
    p.shutdown().await;
}
