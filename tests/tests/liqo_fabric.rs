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

/// Writes `kubectl` and `liqoctl` stand-ins for one cluster into `dir`; returns the fabric
/// config that uses them.
///
/// Both are wrappers around `liqo-standin` (tests/src/bin/liqo-standin.rs, where each
/// behaviour and its switches are described): they record their arguments and standard input
/// in `dir/calls.log`, keep the cluster's state under `dir/state`, refuse what the real tools
/// and Liqo refuse (label values over 63 characters, names that are not DNS-1123, a remote
/// namespace the provider already has, a second peering user, a peering user's calls once it
/// is deleted), and take the time the real ones take (`generate peering-user` and `peer` 2 s
/// by default). The clusters of one test find each other through `dir/../clusters/{id}`.
fn stand_ins(dir: &Path, cluster_id: &str) -> FabricConfig {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cluster-id"), cluster_id).unwrap();
    let registry = dir.parent().unwrap().join("clusters");
    std::fs::create_dir_all(&registry).unwrap();
    std::fs::write(registry.join(cluster_id), dir.display().to_string()).unwrap();
    let kubeconfig = dir.join("k3s.yaml");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
    for tool in ["kubectl", "liqoctl"] {
        let p = dir.join(tool);
        let script = format!(
            "#!/bin/sh\nexec '{}' {tool} '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_liqo-standin"),
            dir.display()
        );
        std::fs::write(&p, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    FabricConfig {
        backend: Backend::Liqo,
        kubeconfig,
        kubectl: dir.join("kubectl"),
        liqoctl: dir.join("liqoctl"),
        command_timeout: Duration::from_secs(5),
        peering_timeout: Duration::from_secs(4),
        enforce_every: Duration::from_millis(100),
        ..FabricConfig::default()
    }
}

/// `--kubeconfig {path}`, as the stand-ins of `dir` are called.
fn kc(dir: &Path) -> String {
    format!("--kubeconfig {}", dir.join("k3s.yaml").display())
}

/// Sets a stand-in switch (see tests/src/bin/liqo-standin.rs).
fn switch(dir: &Path, name: &str, value: &str) {
    std::fs::write(dir.join(name), value).unwrap();
}

/// Makes a cluster's slow commands quick, for tests about something else.
fn quick(dir: &Path) {
    switch(dir, "generate-secs", "0.2");
    switch(dir, "peer-secs", "0.2");
    switch(dir, "unpeer-secs", "0.1");
}

/// Whether the stand-in's state holds `kind/name` (slices, nodes, peers, cordoned, ...).
fn exists(dir: &Path, kind: &str, name: &str) -> bool {
    dir.join("state").join(kind).join(name).exists()
}

/// Whether the provider cluster of `dir` holds a peering user for consumer cluster `c`.
fn user_exists(dir: &Path, c: &str) -> bool {
    exists(
        dir,
        "rolebindings",
        &format!("liqo-peer-user-{c}-liqo-ns-reader"),
    )
}

/// What the stand-in recorded about the pods of the workload applied from `intent`'s
/// directory (Running ..., or Pending and why).
fn workload(dir: &Path, intent: &Id) -> String {
    let name = fluidlet::fabric::k8s_name("", intent.as_str());
    std::fs::read_to_string(dir.join("state/workloads").join(name)).unwrap_or_default()
}

/// The stand-in's record of a namespace's offloading (strategy, remote name, mapped
/// providers, errors).
fn offloading(dir: &Path, ns: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("state/offloading").join(ns)).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
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
    pair_of("prov", |_| {}, tweak).await
}

/// A provider `provider` (cluster `prov-cluster`) and a consumer `cons` (`cons-cluster`);
/// `before` may set the provider's stand-in switches and config, `tweak` the consumer's.
async fn pair_of(
    provider: &str,
    before: impl FnOnce(&mut fluidlet::Config),
    tweak: impl FnOnce(&mut fluidlet::Config),
) -> Pair {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let cbin = dir.path().join("cons-bin");
    let mut pcfg = provider_config(provider, &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    before(&mut pcfg);
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
    let pk = kc(&t.pbin);
    assert!(
        prov.contains(&format!("liqoctl {pk} info --get clusterid")),
        "{prov}"
    );
    assert!(
        prov.contains(&format!(
            "liqoctl {pk} generate peering-user --consumer-cluster-id cons-cluster"
        )),
        "{prov}"
    );

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
    let ck = kc(&t.cbin);
    assert!(
        cons.contains(&format!("kubectl {ck} get node/{node} -o jsonpath=")),
        "{cons}"
    );
    assert!(cons.contains(&format!("kubectl {ck} apply -k ")), "{cons}");
    // The workload's pods run on the virtual node, in the namespace offloaded to the provider.
    let pods = workload(&t.cbin, &intent.id);
    assert!(pods.starts_with("Running on "), "{pods}\n{cons}");
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
        !user_exists(&t.pbin, "cons-cluster"),
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

/// The Liqo releases whose facts are pinned (tests/liqo/{tag}.toml): every manifest must
/// conform to each.
const PINNED: [&str; 2] = ["v1.0.3", "v1.2.0"];

/// The Liqo facts of one pinned release.
fn facts(tag: &str) -> toml::Table {
    let path = format!("{}/liqo/{tag}.toml", env!("CARGO_MANIFEST_DIR"));
    let f: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(fact_str(&f, "liqo_tag"), tag, "{path}");
    f
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
    for tag in PINNED {
        checker_knows_a_bad_slice(&facts(tag));
    }
}

fn checker_knows_a_bad_slice(f: &toml::Table) {
    let f = f.clone();
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

/// Whether `name` is of `kind` as the facts' `[derived_names]` spell it.
fn name_of_kind(name: &str, kind: &str) -> bool {
    match kind {
        "dns1123_label" => dns_label(name) && name.len() <= 63,
        "dns1123_subdomain" => name.len() <= 253 && name.split('.').all(dns_label),
        "label_value" => {
            let ok = |c: char| c.is_ascii_alphanumeric();
            name.len() <= 63
                && (name.is_empty()
                    || (name.starts_with(ok)
                        && name.ends_with(ok)
                        && name.chars().all(|c| ok(c) || "-_.".contains(c))))
        }
        other => panic!("unknown kind {other:?} in the facts"),
    }
}

/// Every name Liqo derives (the facts' `[derived_names].{group}`) from `vars`, with what is
/// wrong with each.
fn derived_name_problems(f: &toml::Table, group: &str, vars: &[(&str, &str)]) -> Vec<String> {
    let mut bad = Vec::new();
    for rule in fact(f, &format!("derived_names.{group}"))
        .as_array()
        .unwrap()
    {
        let mut name = rule["name"]
            .as_str()
            .unwrap()
            .replace("{hex12}", "0123456789ab");
        for (k, v) in vars {
            name = name.replace(&format!("{{{k}}}"), v);
        }
        let kind = rule["kind"].as_str().unwrap();
        if !name_of_kind(&name, kind) {
            bad.push(format!(
                "{name:?} ({} chars) is not a valid {kind} ({})",
                name.len(),
                rule["source"].as_str().unwrap_or("")
            ));
        }
    }
    bad
}

/// The longest node id fluidlet accepts (`MAX_NODE_ID`, 48 bytes): the provider's id makes
/// the contract ids, and those the names of the slices and virtual nodes.
const LONG_PROVIDER: &str = "provider-with-the-longest-node-id-allowed-48byte";

/// Every ResourceSlice the consumer applied, every name Liqo derives from the names fluidlet
/// chose, and the commands and kustomization that name Liqo's objects, against the facts of
/// each pinned release (tests/liqo/v1.0.3.toml and v1.2.0.toml), with a provider whose node
/// id is as long as fluidlet allows.
#[tokio::test]
async fn every_manifest_conforms_to_the_pinned_liqo_facts() {
    assert_eq!(LONG_PROVIDER.len(), 48);
    let t = pair_of(LONG_PROVIDER, |_| {}, |_| {}).await;
    quick(&t.pbin);
    quick(&t.cbin);
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    let kustomization = std::fs::read_to_string(
        t.cbin
            .parent()
            .unwrap()
            .join("cons/fabric")
            .join(fluidlet::fabric::k8s_name("", intent.id.as_str()))
            .join("kustomization.yaml"),
    )
    .unwrap();
    t.c.release(&contract).await.unwrap();
    let log = calls(&t.cbin);
    let slices: Vec<serde_json::Value> = stdins(&log)
        .iter()
        .filter_map(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .filter(|v| v["kind"] == "ResourceSlice")
        .collect();
    assert!(!slices.is_empty(), "{log}");
    for tag in PINNED {
        let f = facts(tag);
        for s in &slices {
            assert_eq!(slice_problems(&f, s), Vec::<String>::new(), "{tag}: {s}");
            let name = s["metadata"]["name"].as_str().unwrap();
            assert_eq!(
                derived_name_problems(&f, "from_slice", &[("slice", name)]),
                Vec::<String>::new(),
                "{tag}: names Liqo derives from the slice {name}"
            );
        }
        for cluster in ["prov-cluster", "cons-cluster"] {
            assert_eq!(
                derived_name_problems(&f, "from_cluster", &[("cluster", cluster)]),
                Vec::<String>::new(),
                "{tag}"
            );
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
        for (cmd, facts_key) in [
            ("peer", "liqoctl.peer"),
            ("unpeer", "liqoctl.unpeer"),
            ("offload namespace", "liqoctl.offload"),
        ] {
            let line = log
                .lines()
                .find(|l| l.contains(&format!("liqoctl {} {cmd} ", kc(&t.cbin))))
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
                    "{tag}: {name} is not a flag of liqoctl {cmd}: {line}"
                );
            }
        }
        // The workload tolerates the virtual node's taint and is pinned by its hostname label.
        let k = &kustomization;
        assert!(k.contains(&format!("key: {}", fact_str(&f, "taints.virtual_node.key"))));
        assert!(k.contains(&format!(
            "effect: {}",
            fact_str(&f, "taints.virtual_node.effect")
        )));
        assert!(k.contains(fact_str(&f, "virtual_node.hostname_label")));
    }
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
    quick(&t.pbin);
    quick(&t.cbin);
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
    provider_and_rogue_with(|_| {}).await
}

async fn provider_and_rogue_with(
    tweak: impl FnOnce(&mut fluidlet::Config),
) -> (fluidlet::Agent, PathBuf, Rogue, tempfile::TempDir) {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    tweak(&mut pcfg);
    let p = start(pcfg, None).await;
    let eve = Rogue::connect(port, &d, "eve").await;
    (p, pbin, eve, dir)
}

/// Reserves a 0.5-CPU piece of the provider's pool for `eve`; returns the contract id.
async fn reserve(p: &fluidlet::Agent, eve: &mut Rogue, tx: &str) -> Id {
    reserve_as(p, eve, "eve", tx).await
}

async fn reserve_as(p: &fluidlet::Agent, eve: &mut Rogue, buyer: &str, tx: &str) -> Id {
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
            buyer: Id::new(buyer).unwrap(),
            partition: Some(piece),
        }),
    )
    .await;
    match eve.recv().await.body {
        Body::Reserved(c) => c.id,
        other => panic!("{other:?}"),
    }
}

fn peer_request_body(contract: &Id) -> Body {
    peer_request_for(contract, "eve-cluster")
}

fn peer_request_for(contract: &Id, cluster: &str) -> Body {
    Body::PeerRequest(fluidlet::wire::PeerRequest {
        contract: contract.clone(),
        cluster_id: Id::new(cluster).unwrap(),
        liqo_version: None,
        certificate: None,
    })
}

async fn peer_request(eve: &mut Rogue, contract: &Id) -> Body {
    eve.send("prov", peer_request_body(contract)).await;
    eve.recv().await.body
}

/// Problem 5: one rule on both sides for whether a peering is shared. Contract A is peered,
/// B only reserved; A is released. B never had the peering, so the provider must not keep
/// A's peering user for it: B's own grant creates a new one ('liqoctl generate
/// peering-user' fails when one exists, as the stand-in does).
#[tokio::test]
async fn a_peering_user_is_kept_only_for_contracts_that_use_it() {
    let (p, pbin, mut eve, _dir) = provider_and_rogue().await;
    quick(&pbin);
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
        !user_exists(&pbin, "eve-cluster"),
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

    // Liqo handing a loopback address to peers: only an explicit override does that (liqoctl
    // never picks the kubeconfig's localhost, and refuses it as --api-server-url).
    std::fs::write(bin.join("api-server"), "https://127.0.0.1:6443\n").unwrap();
    let r = run(cfg.clone()).await;
    let c = r.get("api server").unwrap();
    assert_eq!(c.status, Status::Fail, "{r}");
    assert!(c.fix.as_ref().unwrap().contains("--api-server-url"), "{r}");
    assert!(!r.ok());
    assert!(r.to_string().contains("FAIL api server"), "{r}");
    // The usual risk (finding 8): the control-plane node's private or NATed address, which
    // Liqo picks by itself; a peer elsewhere cannot reach it.
    std::fs::write(bin.join("api-server"), "https://192.168.1.20:6443\n").unwrap();
    let r = run(cfg.clone()).await;
    let c = r.get("api server").unwrap();
    assert_eq!(c.status, Status::Warn, "{r}");
    assert!(c.found.contains("private or NATed"), "{r}");
    assert!(c.fix.as_ref().unwrap().contains("--api-server-url"), "{r}");
    std::fs::remove_file(bin.join("api-server")).unwrap();

    // Another Liqo minor version than fluidlet was checked against.
    std::fs::write(bin.join("liqo-version"), "v1.1.2\n").unwrap();
    let r = run(cfg.clone()).await;
    assert_eq!(r.get("liqo version").unwrap().status, Status::Warn, "{r}");
    // Liqo 1.2 is supported; a liqoctl of another version than the installed Liqo is not
    // (finding 10: `liqoctl version` warns of it, `version --client` never compares).
    std::fs::write(bin.join("liqo-version"), "v1.2.0\n").unwrap();
    std::fs::write(bin.join("liqoctl-version"), "v1.0.3\n").unwrap();
    let r = run(cfg.clone()).await;
    let c = r.get("liqo version").unwrap();
    assert_eq!(c.status, Status::Warn, "{r}");
    assert!(c.found.contains("liqoctl is v1.0.3"), "{r}");
    std::fs::write(bin.join("liqoctl-version"), "v1.2.0\n").unwrap();
    let r = run(cfg.clone()).await;
    assert_eq!(r.get("liqo version").unwrap().status, Status::Ok, "{r}");
    std::fs::remove_file(bin.join("liqo-version")).unwrap();
    std::fs::remove_file(bin.join("liqoctl-version")).unwrap();

    // No ServiceLB here (finding 9): the gateway server of a peering runs on the provider
    // with the type its consumer chose, so this cluster, as a provider, needs ServiceLB for
    // consumers asking LoadBalancer, whatever this node asks its own providers for.
    std::fs::remove_file(bin.join("daemonsets")).unwrap();
    for asks in ["LoadBalancer", "NodePort"] {
        let r = run(FabricConfig {
            gateway_service_type: asks.into(),
            ..cfg.clone()
        })
        .await;
        let c = r.get("gateway service").unwrap();
        assert_eq!(c.status, Status::Warn, "{r}");
        assert!(c.found.contains("As a provider"), "{r}");
        assert!(c.fix.as_ref().unwrap().contains("NodePort"), "{r}");
    }

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
    // liqoctl reads the kubeconfig even for `version --client` (finding 10): its failure is
    // the kubeconfig's, and doctor says so instead of blaming liqoctl.
    let c = r.get("liqoctl").unwrap();
    assert_eq!(c.status, Status::Fail, "{r}");
    assert!(c.found.contains("not checked"), "{r}");
    assert!(c.fix.as_ref().unwrap().contains("kubeconfig"), "{r}");

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

// ---- Issue 22: the shim against what Liqo v1.0.3 and v1.2.0 really do. ----

/// Finding 1: Liqo names the user of a slice's virtual kubelet `{slice}-{12 hex}` and the
/// provider's ShadowPod webhook copies that into a label (at most 63 characters), so a slice
/// name over 50 characters gives a Ready virtual node on which no pod ever starts. The
/// longest node id fluidlet allows (48 bytes) must still get its workload running.
#[tokio::test]
async fn a_provider_with_a_48_byte_node_id_still_gets_the_workload_running() {
    let t = pair_of(LONG_PROVIDER, |_| {}, |_| {}).await;
    quick(&t.pbin);
    quick(&t.cbin);
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    assert!(contract.as_str().len() > 50, "{contract}");
    let node = fluidlet::fabric::virtual_node_name(&contract);
    assert!(exists(&t.cbin, "nodes", &node), "{}", calls(&t.cbin));
    let pods = workload(&t.cbin, &intent.id);
    assert!(pods.starts_with("Running on "), "{pods}");
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// Finding 2: `generate peering-user` waits for its CSR to be signed, so a grant takes
/// seconds, longer than `reserve_timeout`. The consumer must wait for it, and its resends
/// must not start a second grant (which would fail on the CSR the first one made).
#[tokio::test]
async fn a_grant_slower_than_the_answer_timeout_is_made_once_and_reaches_the_consumer() {
    let t = pair(|_| {}).await;
    switch(&t.pbin, "generate-secs", "4");
    quick(&t.cbin);
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let prov = calls(&t.pbin);
    assert_eq!(
        prov.matches(" generate peering-user ").count(),
        1,
        "one grant: {prov}"
    );
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// Finding 2, the provider's side: a PEER_REQUEST repeated while its grant runs (under the
/// same envelope id, as a resend, or under a new one, as an older consumer resends) joins
/// that grant and gets its answer; no second `generate peering-user` starts.
#[tokio::test]
async fn a_repeated_peer_request_joins_the_grant_in_progress() {
    let (p, pbin, mut eve, _dir) = provider_and_rogue().await;
    switch(&pbin, "generate-secs", "2");
    let a = reserve(&p, &mut eve, "eve-t1").await;
    let first = fluidlet::wire::Message {
        id: 4242,
        correlation: None,
        sent_at: fluidlet::unix_ms(),
        sender: Id::new("eve").unwrap(),
        body: peer_request_body(&a),
    };
    let bytes = first.encode().unwrap();
    eve.send_raw("prov", bytes.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    eve.send_raw("prov", bytes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = eve.send("prov", peer_request_body(&a)).await;
    let mut answered = Vec::new();
    let mut identities = Vec::new();
    for _ in 0..3 {
        let m = eve.recv().await;
        match m.body {
            Body::PeerAccept(g) => identities.push(g.identity.map(|i| i.as_str().to_owned())),
            other => panic!("{other:?}\n{}", calls(&pbin)),
        }
        answered.push(m.correlation);
    }
    answered.sort();
    let mut want = vec![Some(4242), Some(4242), Some(other)];
    want.sort();
    assert_eq!(answered, want);
    assert!(identities[0].is_some());
    assert!(identities.iter().all(|i| *i == identities[0]), "one grant");
    let prov = calls(&pbin);
    assert_eq!(prov.matches(" generate peering-user ").count(), 1, "{prov}");
    p.shutdown().await;
}

/// Finding 3: a workload namespace the provider already has (here `default`) must not
/// clash: Liqo refuses a remote namespace that exists and is not its own.
#[tokio::test]
async fn a_workload_namespace_the_provider_already_has_does_not_clash() {
    let t = pair(|_| {}).await;
    quick(&t.pbin);
    quick(&t.cbin);
    let mut spec = intent_spec("cam", 1000, 1);
    spec.namespace = Id::new("default").unwrap();
    let intent = t.c.submit_intent(spec).await.unwrap();
    assert_eq!(
        intent.state,
        IntentState::Placed,
        "{:?}\n{}",
        intent.error,
        offloading(&t.cbin, "default")
    );
    let pods = workload(&t.cbin, &intent.id);
    assert!(pods.starts_with("Running on "), "{pods}");
    let remote = offloading(&t.cbin, "default")["mapped"]["prov-cluster"].clone();
    assert_ne!(
        remote, "default",
        "the provider's own namespace is left alone"
    );
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// Finding 3: two consumers using the same namespace name on one provider.
#[tokio::test]
async fn two_consumers_may_use_the_same_namespace_name_on_one_provider() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    quick(&pbin);
    let p = start(pcfg, None).await;
    let mut consumers = Vec::new();
    for name in ["cons1", "cons2"] {
        let bin = dir.path().join(format!("{name}-bin"));
        let mut cfg = config(name, &d, port, dir.path());
        cfg.watch_catalog = false;
        cfg.fabric = stand_ins(&bin, &format!("{name}-cluster"));
        quick(&bin);
        consumers.push((start(cfg, None).await, bin));
    }
    for (c, bin) in &consumers {
        let intent = c.submit_intent(intent_spec("cam", 500, 1)).await.unwrap();
        assert_eq!(
            intent.state,
            IntentState::Placed,
            "{:?}\n{}",
            intent.error,
            offloading(bin, "cam")
        );
        let pods = workload(bin, &intent.id);
        assert!(pods.starts_with("Running on "), "{pods}");
    }
    for (c, _) in consumers {
        c.shutdown().await;
    }
    p.shutdown().await;
}

/// Finding 3: the namespace goes to the provider the workload was bought from, not to every
/// peered provider.
#[tokio::test]
async fn the_workload_namespace_goes_only_to_the_provider_it_was_bought_from() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let mut providers = Vec::new();
    for name in ["prov1", "prov2"] {
        let bin = dir.path().join(format!("{name}-bin"));
        let mut cfg = provider_config(name, &d, port, dir.path());
        cfg.fabric = stand_ins(&bin, &format!("{name}-cluster"));
        quick(&bin);
        providers.push(start(cfg, None).await);
    }
    let cbin = dir.path().join("cons-bin");
    let mut ccfg = config("cons", &d, port, dir.path());
    ccfg.watch_catalog = false;
    ccfg.fabric = stand_ins(&cbin, "cons-cluster");
    quick(&cbin);
    let c = start(ccfg, None).await;
    // The first intent takes a whole provider's pool, so the second buys from the other.
    let mut placed = Vec::new();
    for (name, cpu, mem) in [("a", 4000, 8), ("b", 1000, 1)] {
        let intent = c.submit_intent(intent_spec(name, cpu, mem)).await.unwrap();
        assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
        let k = c
            .tables()
            .contract(intent.contract.as_ref().unwrap())
            .unwrap()
            .unwrap();
        placed.push((name, format!("{}-cluster", k.seller)));
    }
    assert_ne!(placed[0].1, placed[1].1, "{placed:?}");
    for (ns, cluster) in &placed {
        let mapped = offloading(&cbin, ns)["mapped"].clone();
        let to: Vec<&String> = mapped.as_object().unwrap().keys().collect();
        assert_eq!(to, vec![cluster], "namespace {ns}: {mapped}");
    }
    c.shutdown().await;
    for p in providers {
        p.shutdown().await;
    }
}

/// Finding 4: one rule for whether a peering user is still needed. Contract A is peered, B
/// only reserved; A's term runs out. B never had the peering, so A's user must not be kept
/// for it: B's own grant needs a new one (`generate peering-user` fails while one exists).
#[tokio::test]
async fn an_expired_contract_does_not_keep_its_peering_user_for_an_unpeered_one() {
    let (p, pbin, mut eve, _dir) = provider_and_rogue_with(|p| {
        p.contract_term = Duration::from_secs(3);
        p.expiry_check = Duration::from_millis(100);
    })
    .await;
    quick(&pbin);
    let a = reserve(&p, &mut eve, "eve-t1").await;
    match peer_request(&mut eve, &a).await {
        Body::PeerAccept(g) => assert!(g.identity.is_some()),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = reserve(&p, &mut eve, "eve-t2").await;
    eventually("A to expire on the provider", || {
        p.tables().contract(&a).unwrap().unwrap().state == ContractState::Expired
    })
    .await;
    match peer_request(&mut eve, &b).await {
        Body::PeerAccept(g) => assert!(g.identity.is_some(), "B gets its own identity"),
        other => panic!("B's peering: {other:?}\n{}", calls(&pbin)),
    }
    p.shutdown().await;
}

/// Finding 5: both sides expire a contract on their own clocks. When the provider's comes
/// first, it must not delete the peering user before the consumer has unpeered: `liqoctl
/// unpeer` fails at its first call to the provider without it, and nothing is torn down.
#[tokio::test]
async fn when_the_provider_expires_a_contract_first_the_consumer_still_unpeers() {
    let t = pair_of(
        "prov",
        |p| {
            p.contract_term = Duration::from_secs(6);
            p.expiry_check = Duration::from_millis(100);
        },
        // The consumer looks at its contracts (renewal and expiry) only every 8 s.
        |c| c.expiry_check = Duration::from_secs(8),
    )
    .await;
    quick(&t.pbin);
    quick(&t.cbin);
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    assert!(exists(&t.cbin, "peers", "prov-cluster"));
    let ended = |a: &fluidlet::Agent| {
        a.tables().contract(&contract).unwrap().unwrap().state == ContractState::Expired
    };
    assert!(
        within(Duration::from_secs(15), || ended(&t.p)).await,
        "provider"
    );
    assert!(!ended(&t.c), "the provider's clock came first");
    let torn_down = within(Duration::from_secs(20), || {
        ended(&t.c)
            && !exists(&t.cbin, "peers", "prov-cluster")
            && !user_exists(&t.pbin, "cons-cluster")
    })
    .await;
    assert!(
        torn_down,
        "both sides torn down\nconsumer: {}\nprovider: {}",
        calls(&t.cbin),
        calls(&t.pbin)
    );
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// Finding 6: `generate peering-user` waits up to 30 s for its signature; killing it at the
/// command timeout (30 s by default, 1 s here) leaves its CSR behind and fails the grant.
#[tokio::test]
async fn generate_peering_user_may_take_longer_than_the_command_timeout() {
    let t = pair_of(
        "prov",
        |p| p.fabric.command_timeout = Duration::from_secs(1),
        |_| {},
    )
    .await;
    switch(&t.pbin, "generate-secs", "2");
    quick(&t.cbin);
    let intent =
        t.c.submit_intent(intent_spec("cam", 1000, 1))
            .await
            .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    t.c.shutdown().await;
    t.p.shutdown().await;
}

/// Finding 5, the other order: the consumer's clock comes first (here: the provider is down,
/// so the consumer cannot renew). The consumer unpeers while the provider's user still
/// exists; the provider, once back, expires the contract and deletes the user after its
/// grace.
#[tokio::test]
async fn when_the_consumer_expires_a_contract_first_the_provider_deletes_the_user_after() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let cbin = dir.path().join("cons-bin");
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    pcfg.fabric.teardown_grace = Duration::from_secs(1);
    pcfg.contract_term = Duration::from_secs(4);
    pcfg.expiry_check = Duration::from_millis(100);
    let mut ccfg = config("cons", &d, port, dir.path());
    ccfg.watch_catalog = false;
    ccfg.fabric = stand_ins(&cbin, "cons-cluster");
    ccfg.expiry_check = Duration::from_millis(100);
    quick(&pbin);
    quick(&cbin);
    let p = start(pcfg.clone(), None).await;
    let c = start(ccfg, None).await;
    let intent = c.submit_intent(intent_spec("cam", 1000, 1)).await.unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let contract = intent.contract.clone().unwrap();
    p.shutdown().await;
    let expired = |a: &fluidlet::Agent| {
        a.tables().contract(&contract).unwrap().unwrap().state == ContractState::Expired
    };
    assert!(
        within(Duration::from_secs(15), || expired(&c)
            && !exists(&cbin, "peers", "prov-cluster"))
        .await,
        "the consumer expired and unpeered: {}",
        calls(&cbin)
    );
    assert!(
        user_exists(&pbin, "cons-cluster"),
        "the provider has not expired it yet"
    );
    let p = start(pcfg, None).await;
    eventually(
        "the provider to expire the contract and delete the user",
        || expired(&p) && !user_exists(&pbin, "cons-cluster"),
    )
    .await;
    c.shutdown().await;
    p.shutdown().await;
}

/// Finding 5's grace: a consumer that never says it has unpeered keeps its peering user for
/// `teardown_grace` after the expiry, then loses it; one that RELEASEs the expired contract
/// (as a consumer agent does after its teardown) loses it at once.
#[tokio::test]
async fn an_expired_contracts_peering_user_goes_after_the_grace_or_at_the_consumers_release() {
    let (p, pbin, mut eve, _dir) = provider_and_rogue_with(|p| {
        p.contract_term = Duration::from_secs(2);
        p.expiry_check = Duration::from_millis(100);
        p.fabric.teardown_grace = Duration::from_secs(3);
    })
    .await;
    quick(&pbin);
    let a = reserve(&p, &mut eve, "eve-t1").await;
    assert!(matches!(
        peer_request(&mut eve, &a).await,
        Body::PeerAccept(_)
    ));
    let ended = |c: &Id| p.tables().contract(c).unwrap().unwrap().state == ContractState::Expired;
    eventually("A to expire", || ended(&a)).await;
    assert!(user_exists(&pbin, "eve-cluster"), "kept during the grace");
    eventually("the grace to end", || !user_exists(&pbin, "eve-cluster")).await;

    // Now with a RELEASE after the expiry, and a grace longer than the test.
    let (p, pbin, mut eve, _dir) = provider_and_rogue_with(|p| {
        p.contract_term = Duration::from_secs(2);
        p.expiry_check = Duration::from_millis(100);
        p.fabric.teardown_grace = Duration::from_secs(600);
    })
    .await;
    quick(&pbin);
    let b = reserve(&p, &mut eve, "eve-t1").await;
    assert!(matches!(
        peer_request(&mut eve, &b).await,
        Body::PeerAccept(_)
    ));
    eventually("B to expire", || {
        p.tables().contract(&b).unwrap().unwrap().state == ContractState::Expired
    })
    .await;
    assert!(user_exists(&pbin, "eve-cluster"));
    eve.send(
        "prov",
        Body::Release(fluidlet::wire::ContractRef { contract: b }),
    )
    .await;
    assert!(matches!(eve.recv().await.body, Body::Released(_)));
    assert!(!user_exists(&pbin, "eve-cluster"), "{}", calls(&pbin));
    p.shutdown().await;
}

/// Finding 4, the other half of the one rule: an expired contract's peering user is kept
/// while another live contract of the buyer that was granted the peering still uses it.
#[tokio::test]
async fn an_expired_contract_keeps_the_peering_user_a_peered_contract_still_uses() {
    let (p, pbin, mut eve, _dir) = provider_and_rogue_with(|p| {
        p.contract_term = Duration::from_secs(3);
        p.expiry_check = Duration::from_millis(100);
        p.fabric.teardown_grace = Duration::from_millis(200);
    })
    .await;
    quick(&pbin);
    let a = reserve(&p, &mut eve, "eve-t1").await;
    assert!(matches!(
        peer_request(&mut eve, &a).await,
        Body::PeerAccept(_)
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = reserve(&p, &mut eve, "eve-t2").await;
    match peer_request(&mut eve, &b).await {
        Body::PeerAccept(g) => assert!(g.identity.is_none(), "B shares A's peering"),
        other => panic!("{other:?}"),
    }
    let state = |c: &Id| p.tables().contract(c).unwrap().unwrap().state;
    eventually("A to expire", || state(&a) == ContractState::Expired).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(state(&b), ContractState::Active);
    assert!(user_exists(&pbin, "eve-cluster"), "B still uses it");
    eve.send(
        "prov",
        Body::Release(fluidlet::wire::ContractRef { contract: b }),
    )
    .await;
    assert!(matches!(eve.recv().await.body, Body::Released(_)));
    assert!(!user_exists(&pbin, "eve-cluster"), "the last one gone");
    p.shutdown().await;
}

/// A grant removes a peering user left from an ended grant of the same buyer (a restart
/// forgets the grace), but never another buyer's: a buyer claiming the cluster id of another
/// buyer's live peering is refused, and that peering is left alone.
#[tokio::test]
async fn a_buyer_cannot_take_over_the_peering_user_of_another_buyers_cluster() {
    let port = broker(BrokerKind::Embedded).unwrap().port;
    let dir = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pbin = dir.path().join("prov-bin");
    let mut pcfg = provider_config("prov", &d, port, dir.path());
    pcfg.fabric = stand_ins(&pbin, "prov-cluster");
    quick(&pbin);
    let p = start(pcfg, None).await;
    let mut eve = Rogue::connect(port, &d, "eve").await;
    let mut mallory = Rogue::connect(port, &d, "mallory").await;
    // mallory once peered claiming eve's cluster id, then released.
    let m1 = reserve_as(&p, &mut mallory, "mallory", "m-t1").await;
    mallory
        .send("prov", peer_request_for(&m1, "eve-cluster"))
        .await;
    assert!(matches!(mallory.recv().await.body, Body::PeerAccept(_)));
    mallory
        .send(
            "prov",
            Body::Release(fluidlet::wire::ContractRef { contract: m1 }),
        )
        .await;
    assert!(matches!(mallory.recv().await.body, Body::Released(_)));
    // eve peers with her own cluster.
    let e1 = reserve(&p, &mut eve, "eve-t1").await;
    assert!(matches!(
        peer_request(&mut eve, &e1).await,
        Body::PeerAccept(_)
    ));
    let generated = calls(&pbin).matches(" generate peering-user ").count();
    // mallory tries again with eve's cluster id.
    let m2 = reserve_as(&p, &mut mallory, "mallory", "m-t2").await;
    mallory
        .send("prov", peer_request_for(&m2, "eve-cluster"))
        .await;
    match mallory.recv().await.body {
        Body::Error(e) => assert!(e.text.as_str().contains("another buyer"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(
        user_exists(&pbin, "eve-cluster"),
        "eve's peering user is left alone"
    );
    let log = calls(&pbin);
    assert_eq!(
        log.matches(" generate peering-user ").count(),
        generated,
        "{log}"
    );
    assert_eq!(
        log.matches(" delete peering-user ").count(),
        1,
        "only m1's: {log}"
    );
    drop(dir);
    p.shutdown().await;
}
