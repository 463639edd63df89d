//! A stand-in for `kubectl` and `liqoctl` on a k3s + Liqo gateway, for the `liqo` fabric
//! backend's tests (tests/tests/liqo_fabric.rs). No k3s or Liqo can run where this project is
//! built; this program answers the calls the shim makes the way the real tools and Liqo's
//! controllers would, refuses what they refuse, and takes the time they take. What it does,
//! and the Liqo source each behaviour was read from, is recorded in tests/liqo/v1.0.3.toml
//! and tests/liqo/v1.2.0.toml; nothing here is Liqo's code.
//!
//! Usage (through the wrapper scripts `kubectl` and `liqoctl` that the tests write):
//! `liqo-standin TOOL DIR ARGS...`. `DIR` holds one cluster: its switches (plain files, see
//! below), `calls.log` (every call, and every standard input), and `state/` (what the API
//! server and Liqo would hold). The other clusters of the test are found through the
//! registry `DIR/../clusters/{cluster id}`, which holds the path of that cluster's `DIR`.
//!
//! Switches in `DIR` (absent: the default):
//! - `cluster-id`: this cluster's Liqo cluster id (written by the tests);
//! - `generate-secs` (2): how long `generate peering-user` takes; the CSR exists from its
//!   start, and after 30 s Liqo gives up waiting for the signature (and leaves the CSR);
//! - `peer-secs` (2), `unpeer-secs` (0.5): how long `liqoctl peer` / `unpeer` take;
//! - `node-delay` (0): seconds between an accepted ResourceSlice and its virtual node;
//! - `liqo-version` (v1.0.3), `liqoctl-version` (the same): what the installed Liqo and
//!   the CLI report; `no-liqo`: Liqo not installed; `api-server`: the address Liqo hands out;
//! - `daemonsets`: what listing kube-system's DaemonSets prints; `no-servicelb`: a
//!   LoadBalancer gateway Service on this cluster never gets an address;
//! - `provider-slices.json`: what listing the replicated ResourceSlices prints;
//! - `fail-apply-once`, `hang-apply`: the next `kubectl apply -f -` fails / every one hangs.

use serde_json::{json, Value};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::Duration;

/// Liqo's wait for a peering user's CSR to be signed (userfactory/cert.go).
const CSR_SIGNING_WAIT_SECS: f64 = 30.0;
/// `{slice}-{12 hex}`: the suffix Liqo appends to a ResourceSlice's name to make the user its
/// virtual kubelet authenticates as (authentication/csr.go, CommonNameResourceSliceCSR).
const SLICE_USER_SUFFIX: &str = "-0123456789ab";
/// Namespaces every k3s cluster with Liqo has.
const BUILTIN_NAMESPACES: [&str; 5] = [
    "default",
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "liqo",
];

struct Cluster {
    dir: PathBuf,
    id: String,
}

impl Cluster {
    fn open(dir: &Path) -> Cluster {
        let id = read(&dir.join("cluster-id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let c = Cluster {
            dir: dir.to_path_buf(),
            id,
        };
        for ns in BUILTIN_NAMESPACES {
            let p = c.state("namespaces").join(ns);
            if !p.exists() {
                let _ = fs::write(p, "");
            }
        }
        c
    }

    /// Another cluster of the same test, by its Liqo cluster id.
    fn peer(&self, id: &str) -> Option<Cluster> {
        let world = self.dir.parent()?;
        let dir = read(&world.join("clusters").join(id))?;
        Some(Cluster::open(Path::new(dir.trim())))
    }

    fn state(&self, kind: &str) -> PathBuf {
        let p = self.dir.join("state").join(kind);
        let _ = fs::create_dir_all(&p);
        p
    }

    fn has(&self, kind: &str, name: &str) -> bool {
        self.state(kind).join(name).exists()
    }

    fn switch(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    fn secs(&self, name: &str, default: f64) -> f64 {
        read(&self.dir.join(name))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(default)
    }

    fn liqo_version(&self) -> String {
        read(&self.dir.join("liqo-version"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "v1.0.3".into())
    }

    /// The peering user of consumer cluster `c` on this (provider) cluster: the RoleBinding
    /// `liqoctl generate peering-user` makes last (userfactory/roles.go).
    fn has_peering_user(&self, c: &str) -> bool {
        self.has(
            "rolebindings",
            &format!("liqo-peer-user-{c}-liqo-ns-reader"),
        )
    }

    fn log(&self, line: &str) {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("calls.log"))
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn read(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok()
}

fn sleep(secs: f64) {
    if secs > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    exit(1)
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 63 characters (RFC 1123 label).
fn dns_label(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| ok(c) || c == '-')
        && s.starts_with(ok)
        && s.ends_with(ok)
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// Why `v` is not a valid label value, if it is not (at most 63 characters, alphanumerics
/// with `-`, `_`, `.` inside).
fn label_value_problem(v: &str) -> Option<&'static str> {
    let ok = |c: char| c.is_ascii_alphanumeric();
    if v.len() > 63 {
        return Some("must be no more than 63 characters");
    }
    let inner = v.chars().all(|c| ok(c) || "-_.".contains(c));
    let well_formed = inner && v.starts_with(ok) && v.ends_with(ok);
    if !(v.is_empty() || well_formed) {
        return Some(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', \
             '_' or '.', and must start and end with an alphanumeric character",
        );
    }
    None
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&eq)
        }
    })
}

fn flags<'a>(args: &'a [String], names: &[&str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        for name in names {
            if a == name {
                if let Some(v) = args.get(i + 1) {
                    out.push(v.as_str());
                }
            } else if let Some(v) = a.strip_prefix(&format!("{name}=")) {
                out.push(v);
            }
        }
    }
    out
}

/// `--timeout=90s` as seconds.
fn timeout(args: &[String], default: f64) -> f64 {
    flag(args, "--timeout")
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.len() < 2 {
        fail("usage: liqo-standin TOOL DIR ARGS...");
    }
    let tool = argv.remove(0);
    let dir = PathBuf::from(argv.remove(0));
    let c = Cluster::open(&dir);
    c.log(&format!("{tool} {}\n", argv.join(" ")));
    let mut args = argv;
    if args.first().map(String::as_str) == Some("--kubeconfig") {
        let path = args.get(1).cloned().unwrap_or_default();
        args.drain(..2.min(args.len()));
        // Both tools load the kubeconfig before anything else; liqoctl even for
        // `version --client` (its root command initialises the factory first,
        // cmd/liqoctl/cmd/root.go). kubectl loads it lazily and needs none for that.
        let client_only = tool == "kubectl" && args.first().map(String::as_str) == Some("version");
        if !client_only {
            if let Err(e) = fs::File::open(&path) {
                let prefix = if tool == "liqoctl" {
                    " ERRO  "
                } else {
                    "error: "
                };
                fail(&format!(
                    "{prefix}error loading config file \"{path}\": open {path}: {e}"
                ));
            }
        }
    }
    match tool.as_str() {
        "kubectl" => kubectl(&c, &args),
        "liqoctl" => liqoctl(&c, &args),
        other => fail(&format!("liqo-standin: unknown tool {other}")),
    }
}

fn notfound(kind: &str, name: &str) -> ! {
    fail(&format!(
        "Error from server (NotFound): {kind} \"{name}\" not found"
    ))
}

fn kubectl(c: &Cluster, args: &[String]) {
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match a(0) {
        "apply" if a(1) == "-f" => apply_stdin(c),
        "apply" if a(1) == "-k" => apply_kustomization(c, Path::new(a(2))),
        "get" => match a(1) {
            n if n.starts_with("node/") => {
                let n = &n["node/".len()..];
                if !c.has("nodes", n) {
                    notfound("nodes", n);
                }
                print!("True");
            }
            "resourceslices.authentication.liqo.io" => print!(
                "{}",
                read(&c.dir.join("provider-slices.json"))
                    .unwrap_or_else(|| r#"{"apiVersion":"v1","kind":"List","items":[]}"#.into())
            ),
            "daemonsets.apps" => print!("{}", read(&c.dir.join("daemonsets")).unwrap_or_default()),
            _ => {}
        },
        "wait" => {
            for w in args.iter().filter_map(|w| w.strip_prefix("node/")) {
                if !c.has("nodes", w) {
                    notfound("nodes", w);
                }
                println!("node/{w} condition met");
            }
        }
        "delete" => match a(1) {
            "resourceslices.authentication.liqo.io" => {
                // Liqo deletes the VirtualNode, then the node, with the slice.
                let _ = fs::remove_file(c.state("slices").join(a(2)));
                let _ = fs::remove_file(c.state("nodes").join(a(2)));
                println!("resourceslice.authentication.liqo.io \"{}\" deleted", a(2));
            }
            // Since Kubernetes 1.30 the bare plural is resource.k8s.io's ResourceSlice
            // (cluster-scoped, Dynamic Resource Allocation): never Liqo's.
            "resourceslice" | "resourceslices"
                if !args.iter().any(|w| w == "--ignore-not-found") =>
            {
                notfound("resourceslices.resource.k8s.io", a(2));
            }
            _ => {}
        },
        "version" => println!("Client Version: v1.31.4+k3s1"),
        _ => {}
    }
}

/// The objects fluidlet applies on standard input: a ResourceSlice (JSON) or a Namespace.
fn apply_stdin(c: &Cluster) {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    c.log(&format!("--- stdin\n{}\n--- end\n", input.trim_end()));
    if c.switch("fail-apply-once") {
        let _ = fs::remove_file(c.dir.join("fail-apply-once"));
        fail("error: the server is currently unable to handle the request");
    }
    if c.switch("hang-apply") {
        sleep(30.0);
    }
    if let Ok(v) = serde_json::from_str::<Value>(&input) {
        if v["kind"] == "ResourceSlice" {
            return apply_slice(c, &v);
        }
        fail("error: the stand-in applies only ResourceSlices as JSON");
    }
    let field = |key: &str| {
        input
            .lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    match field("kind:").as_str() {
        "Namespace" => {
            let name = field("name:");
            if !dns_label(&name) {
                let why = if name.len() > 63 {
                    "must be no more than 63 characters"
                } else {
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric \
                     characters or '-', and must start and end with an alphanumeric character"
                };
                fail(&format!(
                    "The Namespace \"{name}\" is invalid: metadata.name: Invalid value: \
                     \"{name}\": {why}"
                ));
            }
            let p = c.state("namespaces").join(&name);
            if !p.exists() {
                let _ = fs::write(p, "");
            }
            println!("namespace/{name} configured");
        }
        other => fail(&format!("error: the stand-in does not know kind {other:?}")),
    }
}

/// A ResourceSlice: validated as the API server does; then, as Liqo does, replicated to its
/// provider when the two clusters peer, and given a virtual node of the same name when it
/// asks for one and every name Liqo derives from it is valid.
fn apply_slice(c: &Cluster, v: &Value) {
    let meta = &v["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    let ns = meta["namespace"].as_str().unwrap_or("");
    if !dns_subdomain(name) {
        fail(&format!(
            "The ResourceSlice \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": \
             a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    if let Some(labels) = meta["labels"].as_object() {
        for (k, l) in labels {
            let l = l.as_str().unwrap_or("");
            if let Some(why) = label_value_problem(l) {
                fail(&format!(
                    "The ResourceSlice \"{name}\" is invalid: metadata.labels: Invalid value: \
                     \"{l}\": {why} (label {k})"
                ));
            }
        }
    }
    if !c.has("namespaces", ns) {
        fail(&format!(
            "Error from server (NotFound): error when creating \"STDIN\": namespaces \"{ns}\" \
             not found"
        ));
    }
    let _ = fs::write(c.state("slices").join(name), v.to_string());
    println!("resourceslice.authentication.liqo.io/{name} configured");
    let provider = v["spec"]["providerClusterID"].as_str().unwrap_or("");
    let replicated = meta["labels"]["liqo.io/replication"] == "true"
        && meta["labels"]["liqo.io/remoteID"].is_string();
    let wants_node = meta["annotations"]["liqo.io/create-virtual-node"] == "true";
    // The VirtualNode and its Node are named after the slice, and the node's
    // kubernetes.io/hostname label carries that name: at most 63 characters.
    if replicated && wants_node && c.has("peers", provider) && dns_label(name) {
        let delay = c.secs("node-delay", 0.0);
        let node = c.state("nodes").join(name);
        if delay == 0.0 {
            let _ = fs::write(node, provider);
        } else {
            // Liqo takes a while: a detached child makes the node later. It closes every
            // descriptor it inherited beyond stdio first: a test run under `flock` would
            // otherwise hold the lock for as long as the child sleeps.
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "for fd in 3 4 5 6 7 8 9; do eval \"exec $fd>&-\"; done; sleep {delay}; printf %s '{provider}' > '{}'",
                    node.display()
                ))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
        }
    }
}

/// `kubectl apply -k DIR`: the workload. Whether its pods would run is recorded in
/// `state/workloads/{DIR's name}`: on a virtual node they run only in a namespace offloaded
/// to that node's provider, and only if the provider's ShadowPod webhook accepts them (it
/// labels each with `liqo.io/creator-user: {slice}-{12 hex}`, pkg/webhooks/shadowpod).
fn apply_kustomization(c: &Cluster, dir: &Path) {
    let k = read(&dir.join("kustomization.yaml")).unwrap_or_default();
    let value = |key: &str| {
        k.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
    };
    let ns = value("namespace:").unwrap_or_default();
    let status = match value("kubernetes.io/hostname:") {
        None => "Running locally".to_owned(),
        Some(node) => workload_on(c, &ns, &node),
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = fs::write(c.state("workloads").join(name), &status);
    println!("deployment.apps configured");
}

fn workload_on(c: &Cluster, ns: &str, node: &str) -> String {
    let Some(provider) = read(&c.state("nodes").join(node)) else {
        return format!("Pending: node {node} not found");
    };
    let offloading = read(&c.state("offloading").join(ns))
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    let Some(remote) = offloading["mapped"][&provider].as_str() else {
        return format!("Pending: namespace {ns} is not offloaded to {provider}");
    };
    let user = format!("{node}{SLICE_USER_SUFFIX}");
    if let Some(why) = label_value_problem(&user) {
        return format!(
            "Pending: the provider's ShadowPod webhook refuses the pods: metadata.labels: \
             Invalid value: \"{user}\": {why}"
        );
    }
    format!("Running on {node} (provider {provider}, namespace {remote})")
}

fn liqoctl(c: &Cluster, args: &[String]) {
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    if c.switch("no-liqo") && a(0) != "version" {
        fail(
            " ERRO  Liqo is not installed in the current cluster! \n\nYou can install liqo via \
             the 'liqoctl install' command.",
        );
    }
    match (a(0), a(1)) {
        ("info", _) => {
            let q = flag(args, "--get").unwrap_or("");
            match q.to_ascii_lowercase().as_str() {
                "clusterid" => println!("{}", c.id),
                "local.version" => println!("{}", c.liqo_version()),
                "local.apiserveraddr" => println!(
                    "{}",
                    read(&c.dir.join("api-server"))
                        .map(|s| s.trim().to_owned())
                        .unwrap_or_else(|| "https://192.0.2.10:6443".into())
                ),
                _ => fail(&format!("invalid query {q:?}")),
            }
        }
        ("generate", "peering-user") => generate_peering_user(c, args),
        ("delete", "peering-user") => {
            let cid = flag(args, "--consumer-cluster-id").unwrap_or("");
            let user = format!("liqo-peer-user-{cid}");
            for kind_name in [
                ("rolebindings", format!("{user}-liqo-ns-reader")),
                ("rolebindings", format!("{user}-tenant-ns-writer")),
                ("csr", user.clone()),
            ] {
                let _ = fs::remove_file(c.state(kind_name.0).join(kind_name.1));
            }
            eprintln!(" INFO  Peering user for cluster with ID \"{cid}\" deleted successfully");
        }
        ("peer", _) => peer(c, args),
        ("unpeer", _) => unpeer(c, args),
        ("force", "unpeer") => {
            if minor(&c.liqo_version()) < Some((1, 1)) {
                fail("Error: unknown command \"force\" for \"liqoctl\"\nRun 'liqoctl --help' for usage.");
            }
            forget_peering(c, a(2));
        }
        ("offload", "namespace") => offload(c, a(2), args),
        ("cordon", "resourceslice") => {
            let _ = fs::write(c.state("cordoned").join(a(2)), "");
        }
        ("version", _) => {
            let client = read(&c.dir.join("liqoctl-version"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|| c.liqo_version());
            println!("Client version: {client}");
            if !args.iter().any(|w| w == "--client") {
                let server = c.liqo_version();
                println!("Server version: {server}");
                if server != client {
                    eprintln!(
                        " WARN  The version of liqoctl does not match the Liqo server version. \
                         This might cause unexpected behaviors."
                    );
                }
            }
        }
        _ => {}
    }
}

fn minor(v: &str) -> Option<(u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let mut p = v.split(['.', '-']);
    Some((p.next()?.parse().ok()?, p.next()?.parse().ok()?))
}

/// `liqoctl generate peering-user --consumer-cluster-id C` (rest/peering-user/generate.go,
/// userfactory/cert.go and roles.go): the tenant namespace, a CSR named
/// `liqo-peer-user-{C}` and labelled with that name, Liqo's wait for its signature (at most
/// 30 s, polled), then two RoleBindings; the kubeconfig on standard output. A second one
/// fails at the CSR, which exists from the first one's start until `delete peering-user`.
fn generate_peering_user(c: &Cluster, args: &[String]) {
    let cid = flag(args, "--consumer-cluster-id").unwrap_or("");
    let tenant = format!("liqo-tenant-{cid}");
    if !dns_label(&tenant) {
        fail(&format!(
            " ERRO  unable to create the tenant namespace: Namespace \"{tenant}\" is invalid: \
             metadata.name: Invalid value: \"{tenant}\": must be no more than 63 characters"
        ));
    }
    let ns = c.state("namespaces").join(&tenant);
    if !ns.exists() {
        let _ = fs::write(ns, "liqo");
    }
    let user = format!("liqo-peer-user-{cid}");
    if let Some(why) = label_value_problem(&user) {
        fail(&format!(
            " ERRO  unable to generate certificate for the user: CertificateSigningRequest.\
             certificates.k8s.io \"{user}\" is invalid: metadata.labels: Invalid value: \
             \"{user}\": {why}"
        ));
    }
    let created = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(c.state("csr").join(&user));
    if created.is_err() {
        fail(&format!(
            " ERRO  unable to generate certificate for the user: certificatesigningrequests.\
             certificates.k8s.io \"{user}\" already exists"
        ));
    }
    let takes = c.secs("generate-secs", 2.0);
    if takes > CSR_SIGNING_WAIT_SECS {
        sleep(CSR_SIGNING_WAIT_SECS);
        fail(
            " ERRO  unable to generate certificate for the user: failed waiting for CSR to be \
             signed: context deadline exceeded",
        );
    }
    sleep(takes);
    for binding in ["liqo-ns-reader", "tenant-ns-writer"] {
        let name = format!("{user}-{binding}");
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(c.state("rolebindings").join(&name));
        if created.is_err() {
            fail(&format!(
                " ERRO  unable to ensure roles: unable to create role binding: rolebindings.rbac.\
                 authorization.k8s.io \"{name}\" already exists"
            ));
        }
    }
    println!(
        "apiVersion: v1\nkind: Config\n# peering user of {} for: {}",
        c.id,
        args.join(" ")
    );
}

/// The provider and consumer cluster ids a peering-user kubeconfig was made for.
fn identity(path: &str) -> (String, String) {
    let text = read(Path::new(path))
        .unwrap_or_else(|| fail(&format!(" ERRO  open {path}: no such file or directory")));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("# peering user of "))
        .unwrap_or_else(|| fail(" ERRO  the remote kubeconfig is not a peering user's"));
    let provider = line.split_whitespace().next().unwrap_or("").to_owned();
    let consumer = line
        .split_whitespace()
        .skip_while(|w| *w != "--consumer-cluster-id")
        .nth(1)
        .unwrap_or("")
        .to_owned();
    (provider, consumer)
}

/// The first call `liqoctl peer` and `unpeer` make with the remote kubeconfig reads the
/// provider's cluster id in its Liqo namespace, which the peering user may do only while
/// its RoleBindings exist (`delete peering-user` removes them).
fn remote_cluster(c: &Cluster, remote_kubeconfig: &str) -> Cluster {
    let (provider, consumer) = identity(remote_kubeconfig);
    let Some(p) = c.peer(&provider) else {
        fail(&format!(
            " ERRO  an error occurred while retrieving cluster id: dial tcp: cluster {provider} \
             unreachable"
        ));
    };
    if consumer != c.id || !p.has_peering_user(&consumer) {
        fail(&format!(
            " ERRO  an error occurred while retrieving cluster id: configmaps is forbidden: \
             User \"liqo-peer-user-{consumer}\" cannot list resource \"configmaps\" in API \
             group \"\" in the namespace \"liqo\""
        ));
    }
    p
}

fn peer(c: &Cluster, args: &[String]) {
    let kubeconfig = flag(args, "--remote-kubeconfig").unwrap_or("");
    let p = remote_cluster(c, kubeconfig);
    let limit = timeout(args, 600.0);
    let service = flag(args, "--gw-server-service-type").unwrap_or("LoadBalancer");
    // The gateway server runs on the provider, with the Service type the consumer chose.
    if service == "LoadBalancer" && p.switch("no-servicelb") {
        sleep(limit);
        fail(" ERRO  Unable to ensure networking: timed out waiting for the gateway server's Service to get an address: context deadline exceeded");
    }
    let takes = c.secs("peer-secs", 2.0);
    if takes > limit {
        sleep(limit);
        fail(" ERRO  Unable to ensure networking: context deadline exceeded");
    }
    sleep(takes);
    let _ = fs::write(c.state("peers").join(&p.id), kubeconfig);
    let tenant = c.state("namespaces").join(format!("liqo-tenant-{}", p.id));
    if !tenant.exists() {
        let _ = fs::write(tenant, "liqo");
    }
    eprintln!(" INFO  Peering enabled");
}

fn unpeer(c: &Cluster, args: &[String]) {
    let kubeconfig = flag(args, "--remote-kubeconfig").unwrap_or("");
    let p = remote_cluster(c, kubeconfig);
    sleep(c.secs("unpeer-secs", 0.5).min(timeout(args, 120.0)));
    forget_peering(c, &p.id);
    eprintln!(" INFO  Unpeered from cluster {}", p.id);
}

/// Unpeering removes the provider's ResourceSlices and virtual nodes here; the NamespaceMaps
/// go with the virtual nodes, and the remote namespaces with them.
fn forget_peering(c: &Cluster, provider: &str) {
    if let Ok(entries) = fs::read_dir(c.state("slices")) {
        for e in entries.flatten() {
            let v: Value = read(&e.path())
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null);
            if v["spec"]["providerClusterID"] == provider {
                let _ = fs::remove_file(e.path());
                let _ = fs::remove_file(c.state("nodes").join(e.file_name()));
            }
        }
    }
    if let Ok(entries) = fs::read_dir(c.state("offloading")) {
        for e in entries.flatten() {
            let mut v: Value = read(&e.path())
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null);
            if let Some(remote) = v["mapped"][provider].as_str() {
                if let Some(p) = c.peer(provider) {
                    let _ = fs::remove_file(p.state("namespaces").join(remote));
                }
            }
            if let Some(m) = v["mapped"].as_object_mut() {
                m.remove(provider);
            }
            let _ = fs::write(e.path(), v.to_string());
        }
    }
    let _ = fs::remove_file(c.state("peers").join(provider));
}

/// One requirement of a cluster selector (`liqoctl offload --selector`), against a virtual
/// node's labels.
fn selector_matches(sel: &str, labels: &[(&str, &str)]) -> bool {
    let value_of = |k: &str| labels.iter().find(|(l, _)| *l == k).map(|(_, v)| *v);
    // Requirements separated by commas, outside parentheses, all hold.
    let mut reqs = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in sel.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                reqs.push(&sel[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    reqs.push(&sel[start..]);
    reqs.iter().all(|r| {
        let r = r.trim();
        if let Some((k, set)) = r.split_once(" in ") {
            let set = set.trim().trim_start_matches('(').trim_end_matches(')');
            let v = value_of(k.trim());
            set.split(',').any(|s| Some(s.trim()) == v)
        } else if let Some((k, v)) = r.split_once("!=") {
            value_of(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = r.split_once('=') {
            value_of(k.trim()) == Some(v.trim_start_matches('=').trim())
        } else {
            fail(&format!(" ERRO  invalid selector {r:?}"))
        }
    })
}

/// `liqoctl offload namespace NS`: the namespace's NamespaceOffloading (strategy and remote
/// name immutable, pkg/webhooks/namespaceoffloading/nsoff.go), then, for every provider
/// with a virtual node that the cluster selector picks (all of them without one), the
/// remote namespace on that provider, which Liqo refuses when a namespace of that name
/// exists there and is not its own (namespacemap-controller/enforcement.go). liqoctl waits
/// for the result and fails when any provider failed (pkg/liqoctl/wait/wait.go).
fn offload(c: &Cluster, ns: &str, args: &[String]) {
    let strategy = flag(args, "--namespace-mapping-strategy").unwrap_or("DefaultName");
    let selected = flag(args, "--remote-namespace-name").unwrap_or("");
    let selectors = flags(args, &["--selector", "-l"]);
    if !c.has("namespaces", ns) {
        fail(&format!(
            " ERRO  Failed enabling namespace offloading: namespaces \"{ns}\" not found"
        ));
    }
    if strategy == "SelectedName" && selected.is_empty() {
        fail(" ERRO  Failed enabling namespace offloading: admission webhook denied the request: The RemoteNamespaceName value cannot be empty when using the SelectedName NamespaceMappingStrategy");
    }
    let path = c.state("offloading").join(ns);
    let mut record: Value = read(&path)
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({"strategy": strategy, "remote": selected, "mapped": {}}));
    if record["strategy"] != strategy {
        fail(" ERRO  Failed enabling namespace offloading: admission webhook denied the request: The NamespaceMappingStrategy value cannot be modified after creation");
    }
    if record["remote"] != selected {
        fail(" ERRO  Failed enabling namespace offloading: admission webhook denied the request: The RemoteNamespaceName value cannot be modified after creation");
    }
    record["selectors"] = json!(selectors);
    let remote = match strategy {
        "EnforceSameName" => ns.to_owned(),
        "SelectedName" => selected.to_owned(),
        _ => format!("{ns}-{}", c.id),
    };
    let mut providers: Vec<String> = fs::read_dir(c.state("nodes"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| read(&e.path()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    providers.sort();
    providers.dedup();
    let managed_by = format!("liqo-tenant-{}/{}", c.id, c.id);
    let (mut chosen, mut failed) = (0, Vec::new());
    for provider in &providers {
        let labels = [
            ("liqo.io/remote-cluster-id", provider.as_str()),
            ("liqo.io/type", "virtual-node"),
        ];
        let Some(p) = c.peer(provider) else { continue };
        let pick = selectors.is_empty() || selectors.iter().any(|s| selector_matches(s, &labels));
        let there = p.state("namespaces").join(&remote);
        if !pick {
            if read(&there).as_deref() == Some(managed_by.as_str()) {
                let _ = fs::remove_file(&there);
            }
            if let Some(m) = record["mapped"].as_object_mut() {
                m.remove(provider);
            }
            continue;
        }
        chosen += 1;
        if !dns_label(&remote) {
            failed.push(format!(
                "{provider}: failed to create namespace {remote:?}: metadata.name: must be no \
                 more than 63 characters"
            ));
            continue;
        }
        match read(&there) {
            Some(owner) if owner != managed_by => failed.push(format!(
                "{provider}: namespace {remote:?} already exists and it is not managed by \
                 NamespaceMap {managed_by:?}"
            )),
            _ => {
                let _ = fs::write(&there, &managed_by);
                record["mapped"][provider.as_str()] = json!(remote);
            }
        }
    }
    record["errors"] = json!(failed);
    let _ = fs::write(&path, record.to_string());
    if !failed.is_empty() {
        let phase = if failed.len() == chosen {
            "AllFailed"
        } else {
            "SomeFailed"
        };
        fail(&format!(
            " ERRO  Failed waiting for offloading to complete: the offloading is in \"{phase}\" \
             state"
        ));
    }
    if chosen == 0 {
        eprintln!(" WARN  Offloading completed, but no cluster was selected");
    } else {
        eprintln!(" INFO  Offloading completed successfully");
    }
}
