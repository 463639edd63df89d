//! The `liqo` fabric backend against stand-in `kubectl` and `liqoctl` executables that record
//! their arguments and standard input and answer as the real tools do. No k3s can run on the
//! machines this project is built on; what these tests show is that the agents drive the
//! tools with the right objects, and survive a tool that fails or hangs.

use fluidlet::fabric::{Backend, FabricConfig};
use fluidlet::model::{ContractState, Id, IntentState};
use fluidlet::wire::Body;
use fluidlet_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Writes `kubectl` and `liqoctl` stand-ins for one node into `dir`; returns the fabric
/// config that uses them.
///
/// The stand-ins keep state under `dir/state` and behave like the real tools where the shim
/// depends on it (see tests/liqo/v1.0.3.toml for the Liqo side):
/// - a ResourceSlice applied with Liqo's replication label gets a virtual node of the same
///   name (after `node-delay` seconds if that file exists, as Liqo takes a while); without
///   the label nothing happens, as Liqo's controllers never select it;
/// - `kubectl get node/X` and `kubectl wait ... node/X` on a missing node fail at once with
///   NotFound (kubectl ignores NotFound only for `--for=delete`);
/// - the short name `resourceslice(s)` means Kubernetes' own resource.k8s.io ResourceSlice
///   (cluster-scoped): deleting one by that name never touches Liqo's slice;
/// - `liqoctl generate peering-user` fails when the consumer's user already exists.
///
/// Switches: `fail-apply-once` makes the next `kubectl apply -f -` fail; `hang-apply` makes
/// every one hang; `liqo-version` and `api-server` set what `liqoctl info` reports, and
/// `no-liqo` makes it fail as on a cluster without Liqo; `daemonsets` is what listing
/// kube-system's DaemonSets prints;
/// `provider-slices.json` is what listing Liqo's ResourceSlices returns.
fn stand_ins(dir: &Path, cluster_id: &str) -> FabricConfig {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join("calls.log");
    let script = format!(
        r#"#!/bin/sh
d='{dir}'
log='{log}'
tool=$(basename "$0")
echo "$tool $*" >> "$log"
if [ "$1" = "--kubeconfig" ]; then shift 2; fi
mkdir -p "$d/state/slices" "$d/state/nodes" "$d/state/users" "$d/state/cordoned"
notfound() {{ echo "Error from server (NotFound): $1 \"$2\" not found" >&2; exit 1; }}
case "$tool $1" in
  "kubectl apply")
    if [ "$2" = "-f" ]; then
      input=$(cat)
      printf -- '--- stdin\n%s\n--- end\n' "$input" >> "$log"
      if [ -f "$d/fail-apply-once" ]; then rm "$d/fail-apply-once"; echo 'error: the server is currently unable to handle the request' >&2; exit 1; fi
      if [ -f "$d/hang-apply" ]; then sleep 30; fi
      if echo "$input" | grep -q '"kind": *"ResourceSlice"\|^kind: ResourceSlice'; then
        name=$(echo "$input" | sed -n 's/^ *"\{{0,1\}}name"\{{0,1\}}: *"\{{0,1\}}\([a-z0-9.-]*\)"\{{0,1\}},\{{0,1\}}$/\1/p' | head -n 1)
        echo "$input" > "$d/state/slices/$name"
        if echo "$input" | grep -q 'liqo.io/replication"\{{0,1\}}: *"true"'; then
          delay=$(cat "$d/node-delay" 2>/dev/null || echo 0)
          if [ "$delay" = 0 ]; then touch "$d/state/nodes/$name"
          else (sleep "$delay"; touch "$d/state/nodes/$name") >/dev/null 2>&1 &
          fi
        fi
      fi
    fi
    echo "applied" ;;
  "kubectl get")
    case "$2" in
      node/*) n=${{2#node/}}; [ -f "$d/state/nodes/$n" ] || notfound nodes "$n"; echo True ;;
      resourceslices.authentication.liqo.io) cat "$d/provider-slices.json" 2>/dev/null || echo '{{"apiVersion":"v1","kind":"List","items":[]}}' ;;
      daemonsets.apps) cat "$d/daemonsets" 2>/dev/null ;;
      *) ;;
    esac ;;
  "kubectl wait")
    for a in "$@"; do case "$a" in node/*) n=${{a#node/}}; [ -f "$d/state/nodes/$n" ] || notfound nodes "$n"; echo "node/$n condition met" ;; esac; done ;;
  "kubectl delete")
    case "$2" in
      resourceslices.authentication.liqo.io) rm -f "$d/state/slices/$3" "$d/state/nodes/$3" ;;
      resourceslice|resourceslices) case "$*" in *--ignore-not-found*) ;; *) notfound resourceslices.resource.k8s.io "$3" ;; esac ;;
    esac ;;
  "kubectl version") echo "Client Version: v1.31.4+k3s1" ;;
  "liqoctl info")
    if [ -f "$d/no-liqo" ]; then echo 'Liqo is not installed in the current cluster!' >&2; exit 1; fi
    case "$*" in
      *"--get clusterid"*) echo "{cluster_id}" ;;
      *"--get local.version"*) cat "$d/liqo-version" 2>/dev/null || echo v1.0.3 ;;
      *"--get local.apiserveraddr"*) cat "$d/api-server" 2>/dev/null || echo https://192.0.2.10:6443 ;;
    esac ;;
  "liqoctl generate")
    c=$4
    if [ -f "$d/state/users/$c" ]; then echo "a user to peer from cluster with ID \"$c\" already exists. Please delete it first" >&2; exit 1; fi
    touch "$d/state/users/$c"
    printf 'apiVersion: v1\nkind: Config\n# peering user of {cluster_id} for: %s\n' "$*" ;;
  "liqoctl delete") rm -f "$d/state/users/$4" ;;
  "liqoctl cordon") touch "$d/state/cordoned/$3" ;;
  "liqoctl version") echo "Client version: v1.0.3" ;;
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
        enforce_every: Duration::from_millis(100),
        ..FabricConfig::default()
    }
}

/// Whether the stand-in's state holds `kind/name` (slices, nodes, users, cordoned).
fn exists(dir: &Path, kind: &str, name: &str) -> bool {
    dir.join("state").join(kind).join(name).exists()
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
    let slice = std::fs::read_to_string(t.cbin.join("state/slices").join(&node)).unwrap();
    let slice: serde_json::Value = serde_json::from_str(&slice).unwrap();
    assert_eq!(slice["metadata"]["namespace"], "liqo-tenant-prov-cluster");
    assert_eq!(slice["spec"]["providerClusterID"], "prov-cluster");
    let res = &slice["spec"]["resources"];
    assert_eq!(res["cpu"], format!("{}m", k.resources.cpu));
    assert_eq!(res["memory"], k.resources.memory.to_string());
    assert_eq!(res["pods"], k.resources.pods.to_string());
    assert_eq!(slice["metadata"]["name"], node.as_str());
    assert!(
        exists(&t.cbin, "nodes", &node),
        "Liqo made the virtual node"
    );
    assert!(
        cons.contains(&format!(
            "kubectl --kubeconfig /etc/rancher/k3s/k3s.yaml get node/{node} -o jsonpath="
        )),
        "{cons}"
    );
    assert!(cons.contains("offload namespace cam --namespace-mapping-strategy EnforceSameName --pod-offloading-strategy Remote"));
    assert!(cons.contains("kubectl --kubeconfig /etc/rancher/k3s/k3s.yaml apply -k "));
    assert_eq!(
        t.p.tables().contract(&contract).unwrap().unwrap().state,
        ContractState::Active
    );

    // Release: the consumer removes the slice and unpeers, the provider drops the peering user.
    t.c.release(&contract).await.unwrap();
    assert!(
        !exists(&t.cbin, "slices", &node),
        "Liqo's ResourceSlice is really gone: {}",
        calls(&t.cbin)
    );
    assert!(!exists(&t.cbin, "nodes", &node), "and its virtual node");
    assert!(calls(&t.cbin).contains("unpeer --remote-kubeconfig"));
    assert!(
        !exists(&t.pbin, "users", "cons-cluster"),
        "peering user deleted"
    );
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
    let first_apply = cons.find("\"kind\": \"ResourceSlice\"").unwrap();
    let rollback = cons
        .find("delete resourceslices.authentication.liqo.io ")
        .expect("a rollback after the failure");
    let second_apply = cons.rfind("\"kind\": \"ResourceSlice\"").unwrap();
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
    assert!(
        calls(&t.cbin)
            .matches("delete resourceslices.authentication.liqo.io ")
            .count()
            >= 3
    );
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

/// The Liqo facts fluidlet is pinned to (tests/liqo/v1.0.3.toml).
fn facts() -> toml::Table {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/liqo/v1.0.3.toml");
    toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fact<'a>(facts: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let mut v = facts.get(parts.next().unwrap()).unwrap();
    for p in parts {
        v = v.get(p).unwrap_or_else(|| panic!("no {path} in the facts"));
    }
    v
}

fn fact_str<'a>(facts: &'a toml::Table, path: &str) -> &'a str {
    fact(facts, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, the pattern the facts record for cluster ids.
fn dns_label(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty() && s.chars().all(|c| ok(c) || c == '-') && s.starts_with(ok) && s.ends_with(ok)
}

/// A Kubernetes quantity: a decimal number, then nothing, one of `suffixes`, or an exponent.
fn quantity(s: &str, suffixes: &[&str]) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    let digits = num.chars().filter(|c| c.is_ascii_digit()).count();
    let number_ok = digits > 0 && num.matches('.').count() <= 1;
    let exponent = |e: &str| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    };
    number_ok
        && (suffix.is_empty()
            || suffixes.contains(&suffix)
            || suffix.strip_prefix(['e', 'E']).is_some_and(exponent))
}

/// Every way `slice` departs from Liqo's ResourceSlice as the facts record it.
fn slice_problems(f: &toml::Table, slice: &serde_json::Value) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = |ok: bool, what: String| {
        if !ok {
            bad.push(what)
        }
    };
    let api = format!(
        "{}/{}",
        fact_str(f, "resourceslice.group"),
        fact_str(f, "resourceslice.version")
    );
    want(
        slice["apiVersion"] == api.as_str(),
        format!("apiVersion is not {api}"),
    );
    want(
        slice["kind"] == fact_str(f, "resourceslice.kind"),
        "kind".into(),
    );
    let meta = &slice["metadata"];
    let provider = slice["spec"]["providerClusterID"].as_str().unwrap_or("");
    want(
        meta["name"]
            .as_str()
            .is_some_and(|n| dns_label(n) && n.len() <= 63),
        "metadata.name is not a DNS label".into(),
    );
    want(
        meta["namespace"].as_str()
            == Some(&format!(
                "{}{provider}",
                fact_str(f, "tenant_namespace.prefix")
            )),
        format!("namespace is not the tenant namespace of {provider}"),
    );
    for (label, value) in [
        (
            "labels.replication",
            fact_str(f, "labels.replication.value"),
        ),
        ("labels.replication_destination", provider),
        ("labels.remote_cluster_id", provider),
    ] {
        let key = fact_str(f, &format!("{label}.key"));
        want(
            meta["labels"][key] == value,
            format!("label {key} is not {value:?}"),
        );
    }
    let key = fact_str(f, "annotations.create_virtual_node.key");
    want(
        meta["annotations"][key] == fact_str(f, "annotations.create_virtual_node.value"),
        format!("annotation {key}"),
    );
    let spec_facts = fact(f, "resourceslice.spec").as_table().unwrap();
    let suffixes: Vec<&str> = fact(f, "resourceslice.spec.resources.quantity_suffixes")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let spec = slice["spec"].as_object().cloned().unwrap_or_default();
    for (field, rule) in spec_facts {
        if rule.get("required").and_then(|r| r.as_bool()) == Some(true) {
            want(
                spec.contains_key(field),
                format!("spec.{field} is required"),
            );
        }
    }
    for (field, value) in &spec {
        let Some(rule) = spec_facts.get(field) else {
            want(
                false,
                format!("spec.{field} is not a field of Liqo's ResourceSlice"),
            );
            continue;
        };
        match rule.get("type").and_then(|t| t.as_str()) {
            Some("string") => {
                want(value.is_string(), format!("spec.{field} is not a string"));
                if rule.get("pattern").is_some() {
                    assert_eq!(
                        rule["pattern"].as_str(),
                        Some("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
                        "the pattern changed: update dns_label"
                    );
                    want(
                        value.as_str().is_some_and(dns_label),
                        format!("spec.{field} does not match its pattern"),
                    );
                }
            }
            Some("map of quantity") => {
                let map = value.as_object().cloned().unwrap_or_default();
                want(value.is_object(), format!("spec.{field} is not a map"));
                for (k, q) in &map {
                    want(
                        q.as_str().is_some_and(|q| quantity(q, &suffixes)) || q.is_u64(),
                        format!("spec.{field}.{k} = {q} is not a quantity"),
                    );
                }
                for k in fact(f, "resourceslice.spec.resources.defaulted_when_absent")
                    .as_array()
                    .unwrap()
                {
                    let k = k.as_str().unwrap();
                    want(
                        map.contains_key(k),
                        format!("spec.{field}.{k} is absent: the provider would default it"),
                    );
                }
            }
            Some("bytes") => want(value.is_string(), format!("spec.{field} is not base64")),
            other => want(
                false,
                format!("spec.{field}: unknown type {other:?} in the facts"),
            ),
        }
    }
    let class = spec.get("class").and_then(|c| c.as_str()).unwrap_or("");
    want(
        fact(f, "resourceslice.classes_reconciled_by_liqo")
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_str() == Some(class)),
        format!("class {class:?} is not one Liqo's provider reconciles"),
    );
    bad
}

/// Standard inputs of the stand-ins' calls, in order.
fn stdins(log: &str) -> Vec<String> {
    log.split("--- stdin\n")
        .skip(1)
        .filter_map(|b| b.split("\n--- end").next())
        .map(String::from)
        .collect()
}

#[test]
fn the_checker_knows_a_bad_slice_when_it_sees_one() {
    let f = facts();
    let good = serde_json::json!({
        "apiVersion": "authentication.liqo.io/v1beta1", "kind": "ResourceSlice",
        "metadata": {"name": "fluidos-p-c1", "namespace": "liqo-tenant-p",
            "annotations": {"liqo.io/create-virtual-node": "true"},
            "labels": {"liqo.io/replication": "true", "liqo.io/remoteID": "p", "liqo.io/remote-cluster-id": "p"}},
        "spec": {"class": "default", "providerClusterID": "p",
            "resources": {"cpu": "1500m", "memory": "2Gi", "pods": "3", "ephemeral-storage": "0"}}
    });
    assert_eq!(slice_problems(&f, &good), Vec::<String>::new());
    for (path, value) in [
        (
            "/metadata/labels/liqo.io~1replication",
            serde_json::Value::Null,
        ),
        ("/spec/resources/cpu", serde_json::json!("1.5 cores")),
        ("/spec/providerClusterID", serde_json::json!("P_1")),
        ("/spec/class", serde_json::json!("fluidos")),
        ("/metadata/namespace", serde_json::json!("liqo-tenant-q")),
    ] {
        let mut bad = good.clone();
        *bad.pointer_mut(path).unwrap() = value;
        assert!(!slice_problems(&f, &bad).is_empty(), "{path}");
    }
    let mut extra = good.clone();
    extra["spec"]["size"] = serde_json::json!("big");
    assert!(!slice_problems(&f, &extra).is_empty());
    let mut partial = good;
    partial["spec"]["resources"]
        .as_object_mut()
        .unwrap()
        .remove("pods");
    assert!(!slice_problems(&f, &partial).is_empty());
}

/// Every ResourceSlice the consumer applied, and the commands and kustomization that name
/// Liqo's objects, against tests/liqo/v1.0.3.toml.
#[tokio::test]
async fn every_manifest_conforms_to_the_pinned_liqo_facts() {
    let f = facts();
    let t = pair(|_| {}).await;
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    t.c.release(&contract).await.unwrap();
    let log = calls(&t.cbin);
    let slices: Vec<serde_json::Value> = stdins(&log)
        .iter()
        .filter_map(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .filter(|v| v["kind"] == "ResourceSlice")
        .collect();
    assert!(!slices.is_empty(), "{log}");
    for s in &slices {
        assert_eq!(slice_problems(&f, s), Vec::<String>::new(), "{s}");
    }
    // Commands name Liqo's slices by their qualified resource, never the bare plural.
    let qualified = fact_str(&f, "resourceslice.qualified_resource");
    for line in log.lines().filter(|l| l.starts_with("kubectl ")) {
        for word in line.split_whitespace() {
            assert!(
                !matches!(word, "resourceslice" | "resourceslices" | "rslice"),
                "ambiguous resource name in: {line}"
            );
        }
    }
    assert!(log.contains(&format!("delete {qualified} ")), "{log}");
    // liqoctl flags the facts list for each command.
    for (cmd, facts_key) in [("peer", "liqoctl.peer"), ("unpeer", "liqoctl.unpeer")] {
        let line = log
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "liqoctl --kubeconfig /etc/rancher/k3s/k3s.yaml {cmd} "
                ))
            })
            .unwrap_or_else(|| panic!("no liqoctl {cmd} in {log}"));
        let known: Vec<&str> = fact(&f, &format!("{facts_key}.flags"))
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for flag in line.split_whitespace().filter(|w| w.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(
                name == "--kubeconfig" || known.contains(&name),
                "{name} is not a flag of liqoctl {cmd}: {line}"
            );
        }
    }
    // The workload tolerates the virtual node's taint and is pinned by its hostname label.
    let k = std::fs::read_to_string(
        t.cbin
            .parent()
            .unwrap()
            .join("cons/fabric")
            .join(fluidlet::fabric::k8s_name("", intent.id.as_str()))
            .join("kustomization.yaml"),
    )
    .unwrap();
    assert!(k.contains(&format!("key: {}", fact_str(&f, "taints.virtual_node.key"))));
    assert!(k.contains(&format!(
        "effect: {}",
        fact_str(&f, "taints.virtual_node.effect")
    )));
    assert!(k.contains(fact_str(&f, "virtual_node.hostname_label")));
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// Liqo takes a while to make the virtual node: the consumer waits for it to exist, then to
/// be Ready, within the peering timeout, instead of failing on the first NotFound.
#[tokio::test]
async fn the_consumer_waits_for_a_virtual_node_that_appears_late() {
    let t = pair(|_| {}).await;
    std::fs::write(t.cbin.join("node-delay"), "1").unwrap();
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let cons = calls(&t.cbin);
    assert_eq!(
        cons.matches("\"kind\": \"ResourceSlice\"").count(),
        1,
        "one attempt was enough: {cons}"
    );
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// A node that never comes fails the attempt after the peering timeout, not before.
#[tokio::test]
async fn a_virtual_node_that_never_comes_fails_after_the_peering_timeout() {
    let t = pair(|c| c.fabric.peering_timeout = Duration::from_secs(1)).await;
    std::fs::write(t.cbin.join("node-delay"), "600").unwrap();
    let started = std::time::Instant::now();
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Failed);
    let why = intent.error.as_ref().unwrap().as_str();
    assert!(why.contains("virtual node"), "{why}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "three attempts of at least 1 s each: {:?}",
        started.elapsed()
    );
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// A consumer speaking REAR by hand to a provider with stand-in tools.
async fn provider_and_rogue() -> (fluidlet::Agent, PathBuf, Rogue, tempfile::TempDir) {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    let p = start(pcfg, None).await;
    let eve = Rogue::connect(port, &d, "eve").await;
    (p, pbin, eve, dir)
}

/// Reserves a 0.5-CPU piece of the provider's pool; returns the contract id.
async fn reserve(p: &fluidlet::Agent, eve: &mut Rogue, tx: &str) -> Id {
    let piece = fluidlet::model::Resources {
        cpu: 500,
        memory: 1 << 30,
        pods: 1,
        storage: 0,
    };
    eve.send(
        "prov",
        Body::ReserveFlavour(fluidlet::model::ReserveRequest {
            transaction: Id::new(tx).unwrap(),
            flavour: flavours(p)[0].id.clone(),
            buyer: Id::new("eve").unwrap(),
            partition: Some(piece),
        }),
    )
    .await;
    match eve.recv().await.body {
        Body::Reserved(c) => c.id,
        other => panic!("{other:?}"),
    }
}

async fn peer_request(eve: &mut Rogue, contract: &Id) -> Body {
    eve.send(
        "prov",
        Body::PeerRequest(fluidlet::wire::PeerRequest {
            contract: contract.clone(),
            cluster_id: Id::new("eve-cluster").unwrap(),
            liqo_version: None,
            certificate: None,
        }),
    )
    .await;
    eve.recv().await.body
}

/// Problem 5: one rule on both sides for whether a peering is shared. Contract A is peered,
/// B only reserved; A is released. B never had the peering, so the provider must not keep
/// A's peering user for it: B's own grant creates a new one ('liqoctl generate
/// peering-user' fails when one exists, as the stand-in does).
#[tokio::test]
async fn a_peering_user_is_kept_only_for_contracts_that_use_it() {
    let (p, pbin, mut eve, _dir) = provider_and_rogue().await;
    let a = reserve(&p, &mut eve, "eve-t1").await;
    match peer_request(&mut eve, &a).await {
        Body::PeerAccept(g) => assert!(g.identity.is_some()),
        other => panic!("{other:?}"),
    }
    let b = reserve(&p, &mut eve, "eve-t2").await;
    eve.send(
        "prov",
        Body::Release(fluidlet::wire::ContractRef { contract: a }),
    )
    .await;
    assert!(matches!(eve.recv().await.body, Body::Released(_)));
    assert!(
        !exists(&pbin, "users", "eve-cluster"),
        "no peered contract is left: the peering user goes"
    );
    match peer_request(&mut eve, &b).await {
        Body::PeerAccept(g) => assert!(g.identity.is_some(), "B gets its own identity"),
        other => panic!("B's peering: {other:?}\n{}", calls(&pbin)),
    }
    // A third contract while B is peered shares B's peering: no new identity.
    let c = reserve(&p, &mut eve, "eve-t3").await;
    match peer_request(&mut eve, &c).await {
        Body::PeerAccept(g) => assert!(g.identity.is_none(), "reuses B's peering"),
        other => panic!("{other:?}"),
    }
    p.shutdown().await;
}

/// Liqo peers only the same major.minor version: a mismatch is refused with a clear
/// PEERING_FAILED before any `liqoctl peer` or `generate peering-user` runs.
#[tokio::test]
async fn a_liqo_version_mismatch_is_refused_before_anything_runs() {
    let t = pair(|_| {}).await;
    std::fs::write(t.cbin.join("liqo-version"), "v1.1.2\n").unwrap();
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Failed);
    let why = intent.error.as_ref().unwrap().as_str();
    assert!(
        why.contains("Liqo version mismatch") && why.contains("v1.0.3") && why.contains("v1.1.2"),
        "{why}"
    );
    assert!(!calls(&t.pbin).contains("generate peering-user"));
    assert!(!calls(&t.cbin).contains(" peer --remote-kubeconfig"));
    // A patch release apart is fine.
    std::fs::write(t.cbin.join("liqo-version"), "v1.0.1\n").unwrap();
    let intent =
        t.c.submit_intent(intent_spec("cam2", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// The provider's copy of a consumer slice, as `kubectl get -o json` lists it.
fn provider_slice(
    name: &str,
    consumer: &str,
    cpu: &str,
    k: &fluidlet::model::Contract,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "authentication.liqo.io/v1beta1", "kind": "ResourceSlice",
        "metadata": {"name": name, "namespace": format!("liqo-tenant-{consumer}"),
            "labels": {"liqo.io/replicated": "true", "liqo.io/originID": consumer,
                "liqo.io/remote-cluster-id": consumer, "liqo.io/replication": "false"}},
        "spec": {"class": "default", "consumerClusterID": consumer, "providerClusterID": "prov-cluster",
            "resources": {"cpu": cpu, "memory": k.resources.memory.to_string(),
                "pods": k.resources.pods.to_string(),
                "ephemeral-storage": k.resources.storage.to_string()}},
        "status": {"resources": {"cpu": cpu}}
    })
}

fn list(items: Vec<serde_json::Value>) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Liqo's default class grants whatever a peered consumer asks: the provider checks the
/// slices of the consumers it granted against its live contracts and cordons what exceeds
/// them, leaving the slice that matches its contract alone.
#[tokio::test]
async fn the_provider_cordons_slices_beyond_its_contracts() {
    let t = pair(|_| {}).await;
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    let k = t.p.tables().contract(&contract).unwrap().unwrap();
    let node = fluidlet::fabric::virtual_node_name(&contract);
    let exact = format!("{}m", k.resources.cpu);
    let slices = list(vec![
        provider_slice(&node, "cons-cluster", &exact, &k),
        provider_slice("more-for-free", "cons-cluster", "1", &k),
        provider_slice("made-by-hand", "other-cluster", "64", &k),
    ]);
    std::fs::write(t.pbin.join("provider-slices.json"), slices).unwrap();
    eventually("the extra slice cordoned", || {
        exists(&t.pbin, "cordoned", "more-for-free")
    })
    .await;
    let prov = calls(&t.pbin);
    assert!(
        prov.contains("cordon resourceslice more-for-free --remote-cluster-id cons-cluster --skip-confirm --timeout="),
        "{prov}"
    );
    assert!(
        !exists(&t.pbin, "cordoned", &node),
        "the contract's own slice is fine"
    );
    assert!(
        !exists(&t.pbin, "cordoned", "made-by-hand"),
        "not a peering fluidlet granted"
    );
    // The consumer's admin raises the contract's slice: cordoned too.
    let bigger = format!("{}m", k.resources.cpu * 4);
    let slices = list(vec![provider_slice(&node, "cons-cluster", &bigger, &k)]);
    std::fs::write(t.pbin.join("provider-slices.json"), slices).unwrap();
    eventually("the grown slice cordoned", || {
        exists(&t.pbin, "cordoned", &node)
    })
    .await;
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// `fluidlet doctor` on a gateway with everything in place, then with each thing broken.
#[tokio::test]
async fn doctor_passes_a_good_gateway_and_names_what_is_wrong_with_a_broken_one() {
    use fluidlet::fabric::doctor::{doctor, Status};
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let mut cfg = stand_ins(&bin, "gw-1");
    cfg.kubeconfig = dir.path().join("k3s.yaml");
    std::fs::write(&cfg.kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
    std::fs::write(
        bin.join("daemonsets"),
        "daemonset.apps/svclb-traefik-1a2b3c4d\n",
    )
    .unwrap();
    let node = Id::new("gw").unwrap();
    let run = |cfg: FabricConfig| {
        let data = dir.path().to_path_buf();
        let node = node.clone();
        async move { doctor(&cfg, &data, &node).await }
    };
    let good = run(cfg.clone()).await;
    assert!(good.ok(), "{good}");
    for c in &good.checks {
        assert_eq!(c.status, Status::Ok, "{good}");
    }
    assert!(good.get("liqo").unwrap().found.contains("gw-1"), "{good}");
    assert!(
        good.get("liqoctl").unwrap().found.contains("v1.0.3"),
        "{good}"
    );
    assert!(
        good.get("api server").unwrap().found.contains("192.0.2.10"),
        "{good}"
    );

    // Liqo handing its loopback address to peers (k3s's kubeconfig default).
    std::fs::write(bin.join("api-server"), "https://127.0.0.1:6443\n").unwrap();
    let r = run(cfg.clone()).await;
    let c = r.get("api server").unwrap();
    assert_eq!(c.status, Status::Fail, "{r}");
    assert!(c.fix.as_ref().unwrap().contains("--api-server-url"), "{r}");
    assert!(!r.ok());
    assert!(r.to_string().contains("FAIL api server"), "{r}");
    std::fs::remove_file(bin.join("api-server")).unwrap();

    // Another Liqo minor version than fluidlet was checked against.
    std::fs::write(bin.join("liqo-version"), "v1.1.2\n").unwrap();
    let r = run(cfg.clone()).await;
    assert_eq!(r.get("liqo version").unwrap().status, Status::Warn, "{r}");
    std::fs::remove_file(bin.join("liqo-version")).unwrap();

    // No ServiceLB for a LoadBalancer gateway; NodePort needs none.
    std::fs::remove_file(bin.join("daemonsets")).unwrap();
    let r = run(cfg.clone()).await;
    let c = r.get("gateway service").unwrap();
    assert_eq!(c.status, Status::Warn, "{r}");
    assert!(c.fix.as_ref().unwrap().contains("NodePort"), "{r}");
    let r = run(FabricConfig {
        gateway_service_type: "NodePort".into(),
        ..cfg.clone()
    })
    .await;
    assert_eq!(r.get("gateway service").unwrap().status, Status::Ok, "{r}");

    // Liqo not installed.
    std::fs::write(bin.join("no-liqo"), "").unwrap();
    let r = run(cfg.clone()).await;
    let c = r.get("liqo").unwrap();
    assert_eq!(c.status, Status::Fail, "{r}");
    assert!(c.found.contains("Liqo is not installed"), "{r}");
    assert!(
        c.fix.as_ref().unwrap().contains("liqoctl install k3s"),
        "{r}"
    );
    std::fs::remove_file(bin.join("no-liqo")).unwrap();

    // Tools missing, kubeconfig missing.
    let r = run(FabricConfig {
        kubectl: dir.path().join("nowhere/kubectl"),
        kubeconfig: dir.path().join("nowhere/k3s.yaml"),
        ..cfg.clone()
    })
    .await;
    let c = r.get("kubectl").unwrap();
    assert_eq!(c.status, Status::Fail, "{r}");
    assert!(c.fix.as_ref().unwrap().contains("fabric.kubectl"), "{r}");
    assert_eq!(r.get("kubeconfig").unwrap().status, Status::Fail, "{r}");

    // A kubeconfig only root may read (k3s's default mode), for a non-root agent.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cfg.kubeconfig, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&cfg.kubeconfig).is_ok() {
        eprintln!("SKIPPED the unreadable-kubeconfig case: running as root, which reads anything");
    } else {
        let r = run(cfg.clone()).await;
        let c = r.get("kubeconfig").unwrap();
        assert_eq!(c.status, Status::Fail, "{r}");
        assert!(
            c.fix.as_ref().unwrap().contains("--write-kubeconfig-mode"),
            "{r}"
        );
    }
}
