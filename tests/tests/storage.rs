//! Disk trouble at start: a damaged or foreign database is reported clearly and the node
//! refuses to start rather than re-offer capacity it already sold.

use fluidlet_tests::*;

#[tokio::test]
async fn damaged_database_is_reported_and_the_node_refuses_to_start() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let cfg = provider_config("prov", &d, port, dir.path());
    let p = start(cfg.clone(), None).await;
    let mut r = Rogue::connect(port, &d, "rogue").await;
    let f = flavours(&p)[0].clone();
    let body = fluidlet::wire::Body::ReserveFlavour(fluidlet::model::ReserveRequest {
        transaction: fluidlet::model::Id::new("rogue.t1").unwrap(),
        flavour: f.id.clone(),
        buyer: fluidlet::model::Id::new("rogue").unwrap(),
        partition: Some(fluidlet::model::Resources {
            cpu: 1000,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        }),
    });
    r.send("prov", body).await;
    assert!(matches!(r.recv().await.body, fluidlet::wire::Body::Reserved(_)));
    p.shutdown().await;

    // The database file is overwritten (a bad SD card, a botched restore).
    let db = cfg.data_dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len().max(4096) as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db, garbage).unwrap();

    let err = match fluidlet::Agent::start(cfg, None).await {
        Ok(a) => {
            let sold = a.tables().contracts().unwrap().len();
            a.shutdown().await;
            panic!("a node with a damaged database started (contracts left: {sold})");
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("damaged") || err.contains("database error"), "{err}");
}

#[tokio::test]
async fn another_nodes_data_directory_is_refused() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let a = start(config("gw-a", &d, port, dir.path()), None).await;
    a.shutdown().await;
    let mut b = config("gw-b", &d, port, dir.path());
    b.data_dir = dir.path().join("gw-a");
    let err = fluidlet::Agent::start(b, None).await.err().expect("refused").to_string();
    assert!(err.contains("holds the tables of node gw-a, not of gw-b"), "{err}");
}
