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
    assert!(matches!(
        r.recv().await.body,
        fluidlet::wire::Body::Reserved(_)
    ));
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
    assert!(
        err.contains("damaged") || err.contains("database error"),
        "{err}"
    );
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
    let err = fluidlet::Agent::start(b, None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("holds the tables of node gw-a, not of gw-b"),
        "{err}"
    );
}

/// A data directory that fills up: the provider refuses with STORAGE instead of answering OK,
/// and every reservation it did answer OK is still there once there is room again. Needs root
/// (it mounts a small tmpfs) and mosquitto; skipped otherwise, except under CI.
#[tokio::test]
async fn full_disk_refuses_reservations_and_loses_no_acknowledged_one() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs (root)"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs (not root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let Some(b) = broker(BrokerKind::Mosquitto) else {
        return;
    };
    let d = fresh_domain();
    let mut cfg = provider_config("prov", &d, b.port, &mnt);
    cfg.offers[0].resources = fluidlet::model::Resources {
        cpu: 1 << 40,
        memory: 1 << 50,
        pods: u32::MAX,
        storage: 0,
    };
    cfg.offers[0].partitionability = Some(fluidlet::model::Partitionability {
        cpu_min: 1,
        memory_min: 1,
        pods_min: 1,
        cpu_step: 1,
        memory_step: 1,
        pods_step: 1,
    });
    // One buyer fills the disk: lift the per-buyer and per-sender policy limits.
    cfg.limits.pending_per_buyer = u32::MAX;
    cfg.limits.sender_rate = u32::MAX;
    cfg.limits.sender_burst = u32::MAX;
    let p = start(cfg.clone(), None).await;
    let mut r = Rogue::connect(b.port, &d, "rogue").await;
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..50_000u32 {
        let Ok(Some(f)) = p.tables().flavours().map(|v| v.into_iter().next()) else {
            break; // the tables cannot even be read any more
        };
        let body = fluidlet::wire::Body::ReserveFlavour(fluidlet::model::ReserveRequest {
            transaction: fluidlet::model::Id::new(&format!("rogue.t{i}")).unwrap(),
            flavour: f.flavour.id.clone(),
            buyer: fluidlet::model::Id::new("rogue").unwrap(),
            partition: Some(fluidlet::model::Resources {
                cpu: 1,
                memory: 1,
                pods: 1,
                storage: 0,
            }),
        });
        r.send("prov", body).await;
        match r.recv().await.body {
            fluidlet::wire::Body::Reserved(c) => acked.push(*c),
            fluidlet::wire::Body::Error(e) => {
                assert_eq!(
                    e.code(),
                    Some(fluidlet::wire::ErrorCode::Storage),
                    "{}",
                    e.text
                );
                refused += 1;
                if refused > 5 {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        refused > 0,
        "the disk never filled after {} reservations",
        acked.len()
    );
    p.shutdown().await;
    // Room again (as after an operator cleaned up): every OK must still be there.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(grown);
    let t = fluidlet::tables::Tables::open(&cfg.data_dir).unwrap();
    let contracts = t.contracts().unwrap();
    for c in &acked {
        assert!(contracts.contains(c), "acknowledged contract {} lost", c.id);
    }
    eprintln!(
        "full disk: {} reservations acknowledged, then {refused} refused with STORAGE",
        acked.len()
    );
}
