//! The `liqo` fabric backend against stand-in `kubectl` and `liqoctl` executables that record
//! their arguments and standard input and answer as the real tools do. No k3s can run on the
//! machines this project is built on; what these tests show is that the agents drive the
//! tools with the right objects, and survive a tool that fails or hangs.

use fluidlet::fabric::{Backend, FabricConfig};
use fluidlet::model::{ContractState, Id, IntentState};
use fluidlet_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Writes `kubectl` and `liqoctl` stand-ins for one node into `dir`; returns the fabric
/// config that uses them. Behaviour switches: a file `fail-apply-once` makes the next
/// `kubectl apply -f -` fail; a file `hang-apply` makes every one hang.
fn stand_ins(dir: &Path, cluster_id: &str) -> FabricConfig {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join("calls.log");
    let script = format!(
        r#"#!/bin/sh
d='{dir}'
echo "$(basename "$0") $*" >> '{log}'
case "$*" in
  *"apply -f -"*)
    echo "--- stdin" >> '{log}'; cat >> '{log}'; echo "--- end" >> '{log}'
    if [ -f "$d/fail-apply-once" ]; then rm "$d/fail-apply-once"; echo 'error: the server is currently unable to handle the request' >&2; exit 1; fi
    if [ -f "$d/hang-apply" ]; then sleep 30; fi
    echo "applied" ;;
  *"info --get clusterid"*) echo "{cluster_id}" ;;
  *"generate peering-user"*) printf 'apiVersion: v1\nkind: Config\n# peering user of {cluster_id} for: %s\n' "$*" ;;
  *) ;;
esac
exit 0
"#,
        dir = dir.display(),
        log = log.display(),
    );
    for tool in ["kubectl", "liqoctl"] {
        let p = dir.join(tool);
        std::fs::write(&p, &script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    FabricConfig {
        backend: Backend::Liqo,
        kubeconfig: PathBuf::from("/etc/rancher/k3s/k3s.yaml"),
        kubectl: dir.join("kubectl"),
        liqoctl: dir.join("liqoctl"),
        command_timeout: Duration::from_secs(5),
        peering_timeout: Duration::from_secs(3),
        cluster_id: None,
    }
}

fn calls(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default()
}

struct Pair {
    p: fluidlet::Agent,
    c: fluidlet::Agent,
    pbin: PathBuf,
    cbin: PathBuf,
    _dir: tempfile::TempDir,
}

async fn pair(tweak: impl FnOnce(&mut fluidlet::Config)) -> Pair {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let cbin = dir.path().join("cons-bin");
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    let mut ccfg = config("cons", &d, port, dir.path());
    ccfg.watch_catalog = false;
    ccfg.fabric = stand_ins(&cbin, "cons-cluster");
    tweak(&mut ccfg);
    let p = start(pcfg, None).await;
    let c = start(ccfg, None).await;
    Pair {
        p,
        c,
        pbin,
        cbin,
        _dir: dir,
    }
}

#[tokio::test]
async fn liqo_backend_drives_the_tools_with_the_contracts_objects() {
    let t = pair(|_| {}).await;
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 2))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    let node = fluidlet::fabric::virtual_node_name(&contract);

    let prov = calls(&t.pbin);
    assert!(
        prov.contains("liqoctl --kubeconfig /etc/rancher/k3s/k3s.yaml info --get clusterid"),
        "{prov}"
    );
    assert!(prov.contains("liqoctl --kubeconfig /etc/rancher/k3s/k3s.yaml generate peering-user --consumer-cluster-id cons-cluster"), "{prov}");

    let cons = calls(&t.cbin);
    // The identity the provider generated reached the consumer and is used to peer.
    let peer_line = cons
        .lines()
        .find(|l| l.contains(" peer --remote-kubeconfig "))
        .expect("liqoctl peer");
    assert!(
        peer_line.contains("--create-resource-slice=false"),
        "{peer_line}"
    );
    let path = peer_line
        .split_whitespace()
        .skip_while(|w| *w != "--remote-kubeconfig")
        .nth(1)
        .unwrap();
    let identity = std::fs::read_to_string(path).unwrap();
    assert!(
        identity.contains("peering user of prov-cluster for:") && identity.contains("cons-cluster"),
        "{identity}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The ResourceSlice asks for exactly the contract's resources, in the right namespace.
    let k = t.c.tables().contract(&contract).unwrap().unwrap();
    assert!(cons.contains("kind: ResourceSlice"), "{cons}");
    assert!(cons.contains("namespace: liqo-tenant-prov-cluster"));
    assert!(cons.contains("providerClusterID: prov-cluster"));
    assert!(cons.contains(&format!("cpu: {}m", k.resources.cpu)));
    assert!(cons.contains(&format!("memory: \"{}\"", k.resources.memory)));
    assert!(cons.contains(&format!("name: {node}")));
    assert!(cons.contains(&format!(
        "wait --for=condition=Ready node/{node} --timeout=3s"
    )));
    assert!(cons.contains("offload namespace cam --namespace-mapping-strategy EnforceSameName --pod-offloading-strategy Remote"));
    assert!(cons.contains("kubectl --kubeconfig /etc/rancher/k3s/k3s.yaml apply -k "));
    assert_eq!(
        t.p.tables().contract(&contract).unwrap().unwrap().state,
        ContractState::Active
    );

    // Release: the consumer removes the slice and unpeers, the provider drops the peering user.
    t.c.release(&contract).await.unwrap();
    assert!(calls(&t.cbin).contains(&format!(
        "delete resourceslice {node} -n liqo-tenant-prov-cluster --ignore-not-found"
    )));
    assert!(calls(&t.cbin).contains("unpeer --remote-kubeconfig"));
    assert!(calls(&t.pbin).contains("delete peering-user --consumer-cluster-id cons-cluster"));
    t.c.shutdown().await;
    t.p.shutdown().await;
}

#[tokio::test]
async fn failing_kubectl_is_rolled_back_and_retried() {
    let t = pair(|_| {}).await;
    std::fs::write(t.cbin.join("fail-apply-once"), "").unwrap();
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let cons = calls(&t.cbin);
    let first_apply = cons.find("kind: ResourceSlice").unwrap();
    let rollback = cons
        .find("delete resourceslice")
        .expect("a rollback after the failure");
    let second_apply = cons.rfind("kind: ResourceSlice").unwrap();
    assert!(first_apply < rollback && rollback < second_apply, "{cons}");
    t.c.shutdown().await;
    t.p.shutdown().await;
}

#[tokio::test]
async fn hanging_kubectl_ends_the_intent_with_a_clear_error_and_returns_the_capacity() {
    let t = pair(|c| c.fabric.command_timeout = Duration::from_secs(1)).await;
    let total = flavours(&t.p)[0].resources;
    std::fs::write(t.cbin.join("hang-apply"), "").unwrap();
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Failed);
    let why = intent.error.as_ref().unwrap().as_str();
    assert!(why.contains("did not finish within 1 s"), "{why}");
    assert!(why.contains("kubectl"), "{why}");
    // Three attempts, each rolled back.
    assert!(calls(&t.cbin).matches("delete resourceslice").count() >= 3);
    let contract: Id = intent.contract.clone().unwrap();
    assert_eq!(
        t.p.tables().contract(&contract).unwrap().unwrap().state,
        ContractState::Released
    );
    assert_eq!(
        flavours(&t.p)[0].resources,
        total,
        "the provider has all its capacity back"
    );
    t.c.shutdown().await;
    t.p.shutdown().await;
}
