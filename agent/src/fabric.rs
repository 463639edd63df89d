//! Virtual Fabric Manager and Network Manager: the shim to k3s + Liqo v1, and a dry-run
//! backend for devices without a cluster.
//!
//! Every fabric operation is first *planned* as a list of [`Action`]s (a file to write, a
//! `kubectl` or `liqoctl` invocation with its standard input) by pure functions, then
//! *executed* by one of two backends:
//! - `liqo` runs the actions against the local k3s cluster (kubeconfig
//!   `/etc/rancher/k3s/k3s.yaml` by default), each with a timeout; a command that fails or
//!   hangs becomes a [`FabricError`] that names the command and quotes its error output;
//! - `dry-run` runs nothing: it writes each action (manifests as files, commands as lines of a
//!   `commands.sh`) under `{data_dir}/fabric/{scope}/`, logs it, and reports success.
//!
//! Planning apart from execution means the dry run shows exactly what a real gateway would do,
//! and the plans are unit-tested without a cluster. Which Liqo objects and commands are used,
//! and why, is in `docs/fabric.md`.

pub mod doctor;
pub mod enforce;
pub mod liqo;

use crate::model::{Contract, Id, Intent};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// Which backend runs the fabric's actions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    DryRun,
    Liqo,
}

impl Backend {
    /// The name the config uses (`[fabric] backend`).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::DryRun => "dry-run",
            Backend::Liqo => "liqo",
        }
    }
}

/// Fabric settings (config section `[fabric]`).
#[derive(Clone, Debug)]
pub struct FabricConfig {
    pub backend: Backend,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub liqoctl: PathBuf,
    /// Longest any single command may run.
    pub command_timeout: Duration,
    /// `liqoctl peer`/`unpeer --timeout`, and the longest wait for a virtual node.
    pub peering_timeout: Duration,
    /// Consumer: how long it waits for the provider's PEER_ACCEPT (the provider's grant runs
    /// `liqoctl generate peering-user`, which itself waits up to 30 s), resending the request
    /// under the same id meanwhile.
    pub peer_request_timeout: Duration,
    /// Provider: how long after a peered contract expires it still keeps the consumer's
    /// peering user, so the consumer can unpeer first (its `liqoctl unpeer` needs the user).
    /// The consumer's RELEASE of the expired contract ends the wait sooner.
    pub teardown_grace: Duration,
    /// This cluster's Liqo cluster id; asked from `liqoctl info` when absent.
    pub cluster_id: Option<Id>,
    /// How often a provider checks the consumers' ResourceSlices against its contracts.
    pub enforce_every: Duration,
    /// `liqoctl peer --gw-server-service-type`: the Service type of the gateway server,
    /// which runs on the provider (LoadBalancer needs k3s ServiceLB; else NodePort).
    pub gateway_service_type: String,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            backend: Backend::DryRun,
            kubeconfig: PathBuf::from("/etc/rancher/k3s/k3s.yaml"),
            kubectl: PathBuf::from("kubectl"),
            liqoctl: PathBuf::from("liqoctl"),
            command_timeout: Duration::from_secs(30),
            peering_timeout: DEFAULT_PEERING_TIMEOUT,
            peer_request_timeout: DEFAULT_PEER_REQUEST_TIMEOUT,
            teardown_grace: DEFAULT_TEARDOWN_GRACE,
            cluster_id: None,
            enforce_every: Duration::from_secs(10),
            gateway_service_type: liqo::GATEWAY_SERVICE_TYPE_DEFAULT.into(),
        }
    }
}

/// Default `liqoctl peer --timeout` and wait for the virtual node: the first peering pulls
/// Liqo's gateway and virtual-kubelet images (Liqo's own default for `peer` is 10 min).
pub const DEFAULT_PEERING_TIMEOUT: Duration = Duration::from_secs(300);
/// Default wait for PEER_ACCEPT: two `liqoctl info` and one `generate peering-user` on the
/// provider, each with its own timeout (see [`plan_grant`]).
pub const DEFAULT_PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Default grace before a provider deletes the peering user of an expired contract: the
/// consumer's unpeer may take up to its peering timeout, after its own expiry check.
pub const DEFAULT_TEARDOWN_GRACE: Duration = Duration::from_secs(600);

/// Why a fabric operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("{what}: cannot run {program}: {err}")]
    Spawn {
        what: String,
        program: String,
        err: std::io::Error,
    },
    #[error("{what}: `{command}` failed ({status}): {stderr}")]
    Failed {
        what: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: `{command}` did not finish within {secs} s")]
    Timeout {
        what: String,
        command: String,
        secs: u64,
    },
    #[error("{what}: `{command}` did not print {want} within {secs} s (last: {last})")]
    NotReady {
        what: String,
        command: String,
        want: String,
        secs: u64,
        last: String,
    },
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Kubectl,
    Liqoctl,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write a file the next commands read (a kustomization, a kubeconfig).
    File {
        what: String,
        path: PathBuf,
        contents: String,
        private: bool,
    },
    /// Run a tool (with `--kubeconfig` added) and capture its standard output.
    Run(Command),
}

/// A command of a plan: recorded by the dry run, run by the liqo backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub what: String,
    pub tool: Tool,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    /// What the dry run reports as the command's output.
    pub dry_output: String,
    /// Longer than the command timeout, for commands that wait themselves.
    pub timeout: Option<Duration>,
    /// Run again until it succeeds and prints [`Poll::want`], for at most [`Poll::within`].
    pub poll: Option<Poll>,
}

/// How a command is polled: a condition that is not met yet (an object that does not exist
/// yet, a node not Ready yet) is asked again rather than failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poll {
    /// The standard output (trimmed) that ends the wait.
    pub want: String,
    /// The longest the whole wait may take.
    pub within: Duration,
    /// The pause between two runs.
    pub every: Duration,
}

/// How much longer than its own `--timeout` a tool that waits (`liqoctl peer`, `unpeer`) may
/// run before it is killed: time to report its own timeout and clean up.
pub const PROCESS_SLACK: Duration = Duration::from_secs(10);

/// A `liqoctl` command that waits itself: `--timeout` from the config (Liqo's defaults are
/// 10 min for `peer`, 120 s for `unpeer`), and the process a little more.
fn waiting(what: &str, args: &[&str], timeout: Duration) -> Action {
    let flag = format!("--timeout={}s", timeout.as_secs());
    let mut args = args.to_vec();
    args.push(&flag);
    Action::Run(Command {
        timeout: Some(timeout + PROCESS_SLACK),
        ..command(what, Tool::Liqoctl, &args)
    })
}

/// Pause between two polls of a condition.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

fn command(what: &str, tool: Tool, args: &[&str]) -> Command {
    Command {
        what: what.into(),
        tool,
        args: args.iter().map(|s| s.to_string()).collect(),
        stdin: None,
        dry_output: String::new(),
        timeout: None,
        poll: None,
    }
}

fn run(what: &str, tool: Tool, args: &[&str]) -> Action {
    Action::Run(command(what, tool, args))
}

fn apply(what: &str, manifest: String) -> Action {
    Action::Run(Command {
        stdin: Some(manifest),
        ..command(what, Tool::Kubectl, &["apply", "-f", "-"])
    })
}

/// A Kubernetes object name (DNS-1123 label) for `prefix` + `id`: lower case, `.` and `_`
/// turned into `-`, at most 63 characters (a longer one ends in a hash of the whole id).
pub fn k8s_name(prefix: &str, id: &str) -> String {
    let mut s: String = format!("{prefix}{id}")
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '-' => c,
            _ => '-',
        })
        .collect();
    if s.len() > 63 {
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        s.truncate(46);
        let _ = write!(s, "-{hash:016x}");
    }
    s.trim_matches('-').to_owned()
}

/// [`k8s_name`] at most `max` characters long: a longer one keeps its first characters and
/// ends in `-` and 12 hex digits of a hash of the whole id, so it is the same on every node
/// and after every restart, and two ids that share a long prefix still get two names.
pub fn k8s_name_within(prefix: &str, id: &str, max: usize) -> String {
    let name = k8s_name(prefix, id);
    if name.len() <= max {
        return name;
    }
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut s: String = name.chars().take(max.saturating_sub(13)).collect();
    while s.ends_with('-') {
        s.pop();
    }
    let _ = write!(s, "-{:012x}", hash >> 16);
    s
}

/// The virtual node (and ResourceSlice) a contract becomes on the consumer: `fluidos-` and
/// the contract id, at most [`liqo::MAX_SLICE_NAME`] (50) characters, so that every name
/// Liqo derives from it stays valid (the user `{name}-{12 hex}` is a label value: at most
/// 63). Both sides derive it: the provider's enforcement finds the slice by this name.
pub fn virtual_node_name(contract: &Id) -> String {
    k8s_name_within("fluidos-", contract.as_str(), liqo::MAX_SLICE_NAME)
}

/// The namespace a workload namespace becomes on its providers: `{namespace}-{this
/// cluster}`, as Liqo's `DefaultName` mapping names it (unique per consumer, never one the
/// provider already has, such as `default`), shortened with a hash when over 63 characters.
pub fn remote_namespace(namespace: &Id, consumer_cluster: &Id) -> String {
    k8s_name_within(
        "",
        &format!("{namespace}-{consumer_cluster}"),
        liqo::LABEL_VALUE_MAX,
    )
}

/// The tenant namespace Liqo uses on one cluster for the other cluster of a peering.
pub fn tenant_namespace(cluster: &Id) -> String {
    liqo::tenant_namespace(cluster)
}

/// The label fluidlet adds to the objects of a contract.
pub const CONTRACT_LABEL: &str = "fluidos.eu/contract";

/// Quantities as Kubernetes writes them.
fn cpu_quantity(millicores: u64) -> String {
    format!("{millicores}m")
}

/// Provider side of step 23: a peering user for the consumer's cluster, whose kubeconfig is
/// the identity the consumer needs. Nothing to do when the consumer already peers with us.
/// With `stale`, a user left from an ended peering of the same buyer is deleted first
/// (`generate peering-user` fails while one exists). `generate peering-user` waits up to
/// 30 s for its CSR to be signed: it may run that much longer than `command_timeout` before
/// it is killed (a killed one leaves its CSR behind, and every later one fails).
pub fn plan_grant(
    consumer_cluster: &Id,
    reuse: bool,
    stale: bool,
    command_timeout: Duration,
) -> Vec<Action> {
    if reuse {
        return Vec::new();
    }
    let mut plan = Vec::new();
    if stale {
        plan.extend(plan_teardown_provider(consumer_cluster, true));
    }
    let a = Action::Run(Command {
        timeout: Some(liqo::CSR_SIGNING_WAIT + command_timeout),
        dry_output: format!(
            "# dry-run: the kubeconfig of Liqo's peering user for cluster {consumer_cluster}\n"
        ),
        ..command(
            "generate the consumer's peering user",
            Tool::Liqoctl,
            &[
                "generate",
                "peering-user",
                "--consumer-cluster-id",
                consumer_cluster.as_str(),
            ],
        )
    });
    plan.push(a);
    plan
}

/// Consumer side of steps 26-27: peer with the provider (network and authentication) using
/// the identity it sent, ask for exactly the contract's resources with a ResourceSlice that
/// creates a virtual node, and wait for that node to be ready.
pub fn plan_establish(
    contract: &Contract,
    provider_cluster: &Id,
    identity: Option<&Path>,
    ready_timeout: Duration,
    gateway_service_type: &str,
) -> Vec<Action> {
    let mut plan = Vec::new();
    if let Some(path) = identity {
        let path = path.to_string_lossy();
        plan.push(waiting(
            "peer with the provider (network and authentication, no resources yet)",
            &[
                "peer",
                "--remote-kubeconfig",
                &path,
                "--create-resource-slice=false",
                "--gw-server-service-type",
                gateway_service_type,
            ],
            ready_timeout,
        ));
    }
    let name = virtual_node_name(&contract.id);
    let slice = resource_slice(contract, provider_cluster);
    plan.push(apply(
        "ask for the contract's resources (ResourceSlice)",
        slice,
    ));
    // Liqo makes the node only once the provider accepted the slice, seconds later; `kubectl
    // wait` fails at once on an object that does not exist yet, so poll `get` for existence
    // and readiness together, within the peering timeout.
    let node = format!("node/{name}");
    plan.push(Action::Run(Command {
        poll: Some(Poll {
            want: "True".into(),
            within: ready_timeout,
            every: POLL_EVERY,
        }),
        dry_output: "True".into(),
        ..command(
            "wait for the virtual node to exist and be Ready",
            Tool::Kubectl,
            &["get", &node, "-o", NODE_READY_JSONPATH],
        )
    }));
    plan
}

/// Prints a node's Ready condition status (`True` when ready).
pub const NODE_READY_JSONPATH: &str = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";

/// The ResourceSlice that asks `provider_cluster` for exactly the contract's resources, with
/// a virtual node named after the contract, as JSON (what `kubectl apply -f -` reads).
///
/// The labels are those Liqo's own `liqoctl create resourceslice` sets: without
/// `liqo.io/replication: "true"` and `liqo.io/remoteID` no Liqo controller ever selects the
/// slice (see `tests/liqo/v1.0.3.toml`).
pub fn resource_slice(contract: &Contract, provider_cluster: &Id) -> String {
    let r = &contract.resources;
    let p = provider_cluster.as_str();
    let slice = serde_json::json!({
        "apiVersion": liqo::RESOURCE_SLICE_API_VERSION,
        "kind": liqo::RESOURCE_SLICE_KIND,
        "metadata": {
            "name": virtual_node_name(&contract.id),
            "namespace": tenant_namespace(provider_cluster),
            "annotations": { liqo::ANNOTATION_CREATE_VIRTUAL_NODE: "true" },
            "labels": {
                liqo::LABEL_REPLICATION: "true",
                liqo::LABEL_REPLICATION_DESTINATION: p,
                liqo::LABEL_REMOTE_CLUSTER_ID: p,
                CONTRACT_LABEL: k8s_name("", contract.id.as_str()),
            },
        },
        "spec": {
            "class": liqo::DEFAULT_CLASS,
            "providerClusterID": p,
            "resources": {
                "cpu": cpu_quantity(r.cpu),
                "memory": r.memory.to_string(),
                "pods": r.pods.to_string(),
                "ephemeral-storage": r.storage.to_string(),
            },
        },
    });
    let mut text = serde_json::to_string_pretty(&slice).unwrap_or_default();
    text.push('\n');
    text
}

/// Where an offloaded namespace goes: its name on the providers ([`remote_namespace`]) and
/// the provider clusters that get it (those of the live contracts whose workloads use it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offload {
    pub remote_namespace: String,
    pub providers: Vec<Id>,
}

/// Step 31: the workload in its namespace, pinned to the virtual node when there is one
/// (node selector on the node's hostname label, and the toleration of Liqo's virtual-node
/// taint), through a kustomization so that any Deployment, StatefulSet, DaemonSet, Job or Pod
/// in the manifest is pinned without parsing it here. The namespace is offloaded under its
/// [`Offload::remote_namespace`] (mapping `SelectedName`), to the providers of
/// [`Offload::providers`] only (a `--selector` each, in logical OR, on the label every
/// virtual node carries); without a selector Liqo would offload it to every peered cluster.
pub fn plan_deploy(
    intent: &Intent,
    virtual_node: Option<(&str, &Offload)>,
    dir: &Path,
) -> Vec<Action> {
    let ns = intent.namespace.as_str();
    let mut plan = vec![apply(
        "the workload's namespace",
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
    )];
    let mut kustomization =
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {ns}\nresources:\n- workload.yaml\n");
    if let Some((node, offload)) = virtual_node {
        let mut args = vec![
            "offload".to_owned(),
            "namespace".into(),
            ns.into(),
            "--namespace-mapping-strategy".into(),
            liqo::NAMESPACE_MAPPING.into(),
            "--remote-namespace-name".into(),
            offload.remote_namespace.clone(),
            "--pod-offloading-strategy".into(),
            liqo::POD_OFFLOADING.into(),
        ];
        for p in &offload.providers {
            args.push("--selector".into());
            args.push(format!("{}={p}", liqo::LABEL_REMOTE_CLUSTER_ID));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        plan.push(run(
            "offload the namespace to the provider",
            Tool::Liqoctl,
            &args,
        ));
        kustomization.push_str("patches:\n");
        for (kind, spec) in [
            (
                "Deployment|StatefulSet|DaemonSet|ReplicaSet",
                "/spec/template/spec",
            ),
            ("Job", "/spec/template/spec"),
            ("Pod", "/spec"),
        ] {
            let _ = write!(
                kustomization,
                "- target:\n    kind: {kind}\n  patch: |-\n    - op: add\n      path: {spec}/nodeSelector\n      value:\n        {host}: {node}\n    - op: add\n      path: {spec}/tolerations\n      value:\n      - key: {taint}\n        operator: Exists\n        effect: {effect}\n",
                host = liqo::HOSTNAME_LABEL,
                taint = liqo::VIRTUAL_NODE_TAINT,
                effect = liqo::VIRTUAL_NODE_TAINT_EFFECT,
            );
        }
    }
    plan.push(Action::File {
        what: "the workload manifest".into(),
        path: dir.join("workload.yaml"),
        contents: intent.manifest.as_str().to_owned(),
        private: false,
    });
    plan.push(Action::File {
        what: "the placement (kustomization)".into(),
        path: dir.join("kustomization.yaml"),
        contents: kustomization,
        private: false,
    });
    let dir = dir.to_string_lossy();
    plan.push(run(
        "apply the workload",
        Tool::Kubectl,
        &["apply", "-k", &dir],
    ));
    plan
}

/// Consumer teardown: the contract's ResourceSlice (its virtual node goes with it), and the
/// whole peering when no other live contract uses it (`liqoctl unpeer` gets `timeout`).
pub fn plan_teardown_consumer(
    contract: &Contract,
    provider_cluster: &Id,
    identity: Option<&Path>,
    last: bool,
    timeout: Duration,
) -> Vec<Action> {
    let name = virtual_node_name(&contract.id);
    let ns = tenant_namespace(provider_cluster);
    let mut plan = vec![run(
        "remove the contract's ResourceSlice",
        Tool::Kubectl,
        &[
            "delete",
            liqo::RESOURCE_SLICES,
            &name,
            "-n",
            &ns,
            "--ignore-not-found",
        ],
    )];
    if let (true, Some(path)) = (last, identity) {
        let path = path.to_string_lossy();
        plan.push(waiting(
            "unpeer from the provider",
            &["unpeer", "--remote-kubeconfig", &path, "--skip-confirm"],
            timeout,
        ));
    }
    plan
}

/// Provider teardown: the consumer's peering user, when no other live contract needs it.
pub fn plan_teardown_provider(consumer_cluster: &Id, last: bool) -> Vec<Action> {
    if !last {
        return Vec::new();
    }
    vec![run(
        "delete the consumer's peering user",
        Tool::Liqoctl,
        &[
            "delete",
            "peering-user",
            "--consumer-cluster-id",
            consumer_cluster.as_str(),
        ],
    )]
}

/// Whether a peer's Liqo version (from its PEER_REQUEST or PEER_ACCEPT) allows a peering
/// with this cluster's: the same major.minor, as Liqo requires. An older fluidlet sends no
/// version and is let through. `Err` is the text of the PEERING_FAILED refusal.
pub fn check_liqo_version(mine: &str, theirs: Option<&str>) -> Result<(), String> {
    match theirs {
        Some(theirs) => liqo::same_minor(mine, theirs),
        None => Ok(()),
    }
}

/// The consumer's check of a PEER_ACCEPT before anything runs: a provider cluster id that
/// Liqo accepts (it names the tenant namespace and the slice's labels), and a compatible
/// Liqo version.
pub fn check_accept(grant: &crate::wire::PeerAccept, mine: &str) -> Result<(), String> {
    if let Some(why) = liqo::cluster_id_problem(grant.cluster_id.as_str(), false) {
        return Err(format!("provider {why}"));
    }
    check_liqo_version(mine, grant.liqo_version.as_ref().map(|v| v.as_str()))
}

/// Executes plans with the configured backend.
#[derive(Clone, Debug)]
pub struct Fabric {
    cfg: FabricConfig,
    /// `{data_dir}/fabric`: kubeconfigs received, kustomizations, and the dry run's record.
    dir: PathBuf,
    me: Id,
}

impl Fabric {
    pub fn new(cfg: FabricConfig, data_dir: &Path, me: &Id) -> Fabric {
        Fabric {
            cfg,
            dir: data_dir.join("fabric"),
            me: me.clone(),
        }
    }

    /// How often the provider's contract enforcement runs (liqo backend).
    pub fn enforce_every(&self) -> Duration {
        self.cfg.enforce_every
    }

    pub fn backend(&self) -> &Backend {
        &self.cfg.backend
    }

    pub fn ready_timeout(&self) -> Duration {
        self.cfg.peering_timeout
    }

    /// How long a consumer waits for PEER_ACCEPT in all.
    pub fn peer_request_timeout(&self) -> Duration {
        self.cfg.peer_request_timeout
    }

    /// How long a provider keeps an expired contract's peering user for the consumer.
    pub fn teardown_grace(&self) -> Duration {
        self.cfg.teardown_grace
    }

    /// [`plan_grant`] with this fabric's command timeout.
    pub fn plan_grant(&self, consumer_cluster: &Id, reuse: bool, stale: bool) -> Vec<Action> {
        plan_grant(consumer_cluster, reuse, stale, self.cfg.command_timeout)
    }

    /// [`plan_establish`] with this fabric's timeout and gateway service type.
    pub fn plan_establish(
        &self,
        contract: &Contract,
        provider_cluster: &Id,
        identity: Option<&Path>,
    ) -> Vec<Action> {
        plan_establish(
            contract,
            provider_cluster,
            identity,
            self.cfg.peering_timeout,
            &self.cfg.gateway_service_type,
        )
    }

    /// The working directory of one contract or intent.
    pub fn scope_dir(&self, scope: &str) -> PathBuf {
        self.dir.join(k8s_name("", scope))
    }

    /// Where the identity received for a provider cluster is kept (owner-only).
    pub fn identity_path(&self, provider_cluster: &Id) -> PathBuf {
        self.dir.join("identities").join(format!(
            "{}.kubeconfig",
            k8s_name("", provider_cluster.as_str())
        ))
    }

    /// This cluster's Liqo cluster id.
    pub async fn cluster_id(&self) -> Result<Id, FabricError> {
        if let Some(id) = &self.cfg.cluster_id {
            return Ok(id.clone());
        }
        let a = Action::Run(Command {
            dry_output: k8s_name("dryrun-", self.me.as_str()),
            ..command(
                "read this cluster's Liqo id",
                Tool::Liqoctl,
                &["info", "--get", liqo::INFO_CLUSTER_ID],
            )
        });
        let out = self.execute("cluster-id", &[a]).await?;
        Id::new(out.trim()).map_err(|e| {
            FabricError::Invalid(format!(
                "liqoctl printed {:?} as cluster id: {e}",
                out.trim()
            ))
        })
    }

    /// This cluster's Liqo version, as `liqoctl info` reports it (the dry run reports the
    /// version fluidlet is pinned to).
    pub async fn liqo_version(&self) -> Result<String, FabricError> {
        let a = Action::Run(Command {
            dry_output: liqo::PINNED.into(),
            ..command(
                "read this cluster's Liqo version",
                Tool::Liqoctl,
                &["info", "--get", liqo::INFO_VERSION],
            )
        });
        let out = self.execute("liqo-version", &[a]).await?;
        Ok(out.trim().to_owned())
    }

    /// Runs a plan; returns the standard output of its last command.
    pub async fn execute(&self, scope: &str, plan: &[Action]) -> Result<String, FabricError> {
        let mut last = String::new();
        for (i, action) in plan.iter().enumerate() {
            last = match (action, &self.cfg.backend) {
                (
                    Action::File {
                        what,
                        path,
                        contents,
                        private,
                    },
                    backend,
                ) => {
                    self.write_file(what, path, contents, *private)?;
                    info!(?backend, %what, path = %path.display(), "file written");
                    String::new()
                }
                (Action::Run(c), Backend::DryRun) => self.record(scope, i, c)?,
                (Action::Run(c), Backend::Liqo) => self.perform(c).await?,
            };
        }
        Ok(last)
    }

    fn program(&self, tool: Tool) -> &Path {
        match tool {
            Tool::Kubectl => &self.cfg.kubectl,
            Tool::Liqoctl => &self.cfg.liqoctl,
        }
    }

    fn full_args(&self, args: &[String]) -> Vec<String> {
        let mut v = vec![
            "--kubeconfig".to_owned(),
            self.cfg.kubeconfig.to_string_lossy().into_owned(),
        ];
        v.extend(args.iter().cloned());
        v
    }

    fn command_line(&self, tool: Tool, args: &[String]) -> String {
        let mut s = self.program(tool).to_string_lossy().into_owned();
        for a in self.full_args(args) {
            s.push(' ');
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
            {
                s.push_str(&a);
            } else {
                s.push('\'');
                s.push_str(&a.replace('\'', "'\\''"));
                s.push('\'');
            }
        }
        s
    }

    fn write_file(
        &self,
        what: &str,
        path: &Path,
        contents: &str,
        private: bool,
    ) -> Result<(), FabricError> {
        let io = |err| FabricError::Io {
            what: what.to_owned(),
            err,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if private {
            // Created 0600 before a byte of the secret is written (never write-then-chmod).
            crate::files::write_private(path, contents.as_bytes()).map_err(io)
        } else {
            std::fs::write(path, contents).map_err(io)
        }
    }

    /// The dry run: writes the command down instead of running it.
    fn record(&self, scope: &str, i: usize, c: &Command) -> Result<String, FabricError> {
        let dir = self.scope_dir(scope);
        let what = &c.what;
        let mut line = format!("# {what}\n{}", self.command_line(c.tool, &c.args));
        if let Some(input) = &c.stdin {
            let file = dir.join(format!("{:02}-{}.yaml", i, k8s_name("", what)));
            self.write_file(what, &file, input, false)?;
            let _ = write!(line, " < {}", file.display());
        }
        line.push('\n');
        let script = dir.join("commands.sh");
        let io = |err| FabricError::Io {
            what: what.clone(),
            err,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&script)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(io)?;
        info!(backend = "dry-run", %what, command = %self.command_line(c.tool, &c.args), "not run");
        Ok(c.dry_output.clone())
    }

    /// The real thing: runs the command (polling it when it has a [`Poll`]).
    async fn perform(&self, c: &Command) -> Result<String, FabricError> {
        let Some(poll) = &c.poll else {
            return self
                .perform_once(c, c.timeout.unwrap_or(self.cfg.command_timeout))
                .await;
        };
        let deadline = tokio::time::Instant::now() + poll.within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let last = match self
                .perform_once(c, left.min(self.cfg.command_timeout))
                .await
            {
                Ok(out) if out.trim() == poll.want => return Ok(out),
                Ok(out) => format!("printed {:?}", out.trim()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() + poll.every >= deadline {
                return Err(FabricError::NotReady {
                    what: c.what.clone(),
                    command: self.command_line(c.tool, &c.args),
                    want: poll.want.clone(),
                    secs: poll.within.as_secs(),
                    last: tail(&last, 200),
                });
            }
            tokio::time::sleep(poll.every).await;
        }
    }

    /// Runs the command once, with a timeout, killing it if it hangs.
    async fn perform_once(&self, c: &Command, timeout: Duration) -> Result<String, FabricError> {
        let (what, tool, args, stdin) = (&c.what, c.tool, &c.args, &c.stdin);
        let program = self.program(tool);
        let command = self.command_line(tool, args);
        info!(%what, %command, "running");
        let mut child = tokio::process::Command::new(program)
            .args(self.full_args(args))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| FabricError::Spawn {
                what: what.clone(),
                program: program.to_string_lossy().into_owned(),
                err,
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that exits without reading its input is reported by its exit status.
            let _ = pipe.write_all(input.as_bytes()).await;
        }
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|err| FabricError::Io {
                what: what.clone(),
                err,
            })?,
            Err(_) => {
                warn!(%what, %command, "command timed out and was killed");
                return Err(FabricError::Timeout {
                    what: what.clone(),
                    command,
                    secs: timeout.as_secs(),
                });
            }
        };
        if !out.status.success() {
            return Err(FabricError::Failed {
                what: what.clone(),
                command,
                status: out.status.to_string(),
                stderr: tail(&String::from_utf8_lossy(&out.stderr), 400),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The last `n` characters of `text`, trimmed.
fn tail(text: &str, n: usize) -> String {
    let t = text.trim();
    let skip = t.chars().count().saturating_sub(n);
    t.chars().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContractState, FlavourSelector, IntentState, LongText, Resources};

    fn build_contract() -> Contract {
        let piece = Resources {
            cpu: 1500,
            memory: 2 << 30,
            pods: 3,
            storage: 0,
        };
        crate::model::test_contract("prov.c7", "prov", "cons", piece, ContractState::Reserved)
    }

    fn stdin_of(a: &Action) -> &str {
        match a {
            Action::Run(Command { stdin: Some(s), .. }) => s,
            _ => panic!("no stdin in {a:?}"),
        }
    }

    /// The longest node id fluidlet accepts makes contract ids of 51 characters and more:
    /// their virtual nodes must leave Liqo room for `{name}-{12 hex}` in a label (63).
    #[test]
    fn virtual_node_names_leave_room_for_every_name_liqo_derives() {
        let node = "n".repeat(crate::model::MAX_NODE_ID);
        assert_eq!(node.len(), 48);
        let a = Id::new(&format!("{node}.c1")).unwrap();
        let b = Id::new(&format!("{node}.c2")).unwrap();
        let (na, nb) = (virtual_node_name(&a), virtual_node_name(&b));
        for n in [&na, &nb] {
            assert!(n.len() <= liqo::MAX_SLICE_NAME, "{n}");
            assert!(n.len() + liqo::SLICE_USER_SUFFIX_LEN <= 63, "{n}");
            assert!(liqo::valid_cluster_id(n), "a DNS-1123 label: {n}");
            assert!(n.starts_with("fluidos-nnnn"), "{n}");
        }
        assert_ne!(na, nb, "the hash keeps contracts of one seller apart");
        assert_eq!(na, virtual_node_name(&a), "the same on every call and node");
        // Short ids keep the names they always had.
        assert_eq!(
            virtual_node_name(&Id::new("prov.c7").unwrap()),
            "fluidos-prov-c7"
        );
        let ns = Id::new(&"w".repeat(40)).unwrap();
        let remote = remote_namespace(&ns, &Id::new(&"c".repeat(48)).unwrap());
        assert!(
            remote.len() <= 63 && liqo::valid_cluster_id(&remote),
            "{remote}"
        );
        assert_eq!(
            remote_namespace(&Id::new("default").unwrap(), &Id::new("gw-b").unwrap()),
            "default-gw-b",
            "Liqo's DefaultName, when it fits"
        );
    }

    /// `generate peering-user` waits up to 30 s for its CSR: killing it at the command
    /// timeout (30 s by default) would leave the CSR behind.
    #[test]
    fn generate_peering_user_outlives_its_own_signing_wait() {
        let cfg = FabricConfig::default();
        let plan = plan_grant(&Id::new("c").unwrap(), false, false, cfg.command_timeout);
        match &plan[..] {
            [Action::Run(Command { args, timeout, .. })] => {
                assert_eq!(args[..2], ["generate", "peering-user"]);
                let t = timeout.expect("its own timeout");
                assert!(
                    t > liqo::CSR_SIGNING_WAIT && t > cfg.command_timeout,
                    "{t:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A stale user of the same buyer goes first.
        let plan = plan_grant(&Id::new("c").unwrap(), false, true, cfg.command_timeout);
        assert!(
            matches!(&plan[0], Action::Run(Command { args, .. }) if args[..2] == ["delete", "peering-user"])
        );
        assert_eq!(plan.len(), 2);
    }

    /// The runbook's 300 s: `liqoctl peer` waits for the gateways and the first peering pulls
    /// images (Liqo's own default is 10 min).
    #[test]
    fn the_default_peering_timeout_is_the_runbooks() {
        let cfg = FabricConfig::default();
        assert_eq!(cfg.peering_timeout, Duration::from_secs(300));
        assert!(cfg.peer_request_timeout >= Duration::from_secs(60));
    }

    #[test]
    fn k8s_names_are_dns_labels() {
        assert_eq!(k8s_name("fluidos-", "Prov_1.c7"), "fluidos-prov-1-c7");
        let long = k8s_name("fluidos-", &"x".repeat(90));
        assert_eq!(long.len(), 63);
        assert_ne!(
            long,
            k8s_name("fluidos-", &"x".repeat(91)),
            "hash keeps them apart"
        );
    }

    #[test]
    fn resource_slice_asks_for_exactly_the_contracts_resources() {
        let plan = plan_establish(
            &build_contract(),
            &Id::new("prov-cluster").unwrap(),
            Some(Path::new("/d/id.kubeconfig")),
            Duration::from_secs(60),
            "NodePort",
        );
        assert_eq!(plan.len(), 3);
        match &plan[0] {
            Action::Run(Command { tool, args, .. }) => {
                assert_eq!(*tool, Tool::Liqoctl);
                assert_eq!(
                    args[..3],
                    ["peer", "--remote-kubeconfig", "/d/id.kubeconfig"]
                );
                assert!(args.contains(&"--create-resource-slice=false".to_string()));
            }
            other => panic!("{other:?}"),
        }
        let slice: serde_json::Value = serde_json::from_str(stdin_of(&plan[1])).unwrap();
        assert_eq!(slice["kind"], "ResourceSlice");
        assert_eq!(slice["apiVersion"], "authentication.liqo.io/v1beta1");
        let meta = &slice["metadata"];
        assert_eq!(meta["namespace"], "liqo-tenant-prov-cluster");
        assert_eq!(meta["name"], "fluidos-prov-c7");
        assert_eq!(meta["annotations"]["liqo.io/create-virtual-node"], "true");
        assert_eq!(meta["labels"]["liqo.io/replication"], "true");
        assert_eq!(meta["labels"]["liqo.io/remoteID"], "prov-cluster");
        assert_eq!(meta["labels"]["liqo.io/remote-cluster-id"], "prov-cluster");
        assert_eq!(slice["spec"]["providerClusterID"], "prov-cluster");
        let res = &slice["spec"]["resources"];
        assert_eq!(res["cpu"], "1500m");
        assert_eq!(res["memory"], (2u64 << 30).to_string());
        assert_eq!(res["pods"], "3");
        assert_eq!(res["ephemeral-storage"], "0", "none sold: none asked");
        match &plan[2] {
            Action::Run(Command { args, poll, .. }) => {
                assert_eq!(args[..2], ["get", "node/fluidos-prov-c7"]);
                assert_eq!(args[3], NODE_READY_JSONPATH);
                let poll = poll.as_ref().expect("polled, not a one-shot kubectl wait");
                assert_eq!(poll.want, "True");
                assert_eq!(poll.within, Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
    }

    /// liqoctl peer waits up to 10 min by default, unpeer 120 s: both get an explicit
    /// --timeout from the config, and the process a little longer before it is killed.
    #[test]
    fn liqoctl_peer_gets_an_explicit_timeout_and_the_process_a_little_more() {
        let t = Duration::from_secs(90);
        let plan = plan_establish(
            &build_contract(),
            &Id::new("p").unwrap(),
            Some(Path::new("/d/id")),
            t,
            "NodePort",
        );
        match &plan[0] {
            Action::Run(Command { args, timeout, .. }) => {
                assert_eq!(args[0], "peer");
                assert!(args.contains(&"--timeout=90s".to_string()), "{args:?}");
                assert_eq!(*timeout, Some(t + PROCESS_SLACK));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peer_accept_is_checked_before_anything_runs() {
        let grant = |cluster: &str, version: Option<&str>| crate::wire::PeerAccept {
            contract: Id::new("p.c1").unwrap(),
            cluster_id: Id::new(cluster).unwrap(),
            identity: None,
            liqo_version: version.and_then(|v| crate::model::Text::new(v).ok()),
            sealed: None,
        };
        assert!(check_accept(&grant("prov-1", Some("v1.0.0")), "v1.0.3").is_ok());
        assert!(
            check_accept(&grant("prov-1", None), "v1.0.3").is_ok(),
            "older sender"
        );
        let e = check_accept(&grant("prov-1", Some("v1.2.0")), "v1.0.3").unwrap_err();
        assert!(e.contains("Liqo version mismatch"), "{e}");
        let e = check_accept(&grant("Prov_1", None), "v1.0.3").unwrap_err();
        assert!(e.contains("Prov_1"), "{e}");
    }

    #[test]
    fn reusing_a_peering_skips_liqoctl_peer_and_the_peering_user() {
        let plan = plan_establish(
            &build_contract(),
            &Id::new("p").unwrap(),
            None,
            Duration::from_secs(1),
            "NodePort",
        );
        assert_eq!(plan.len(), 2);
        let t = Duration::from_secs(30);
        assert!(plan_grant(&Id::new("c").unwrap(), true, true, t).is_empty());
        assert_eq!(plan_grant(&Id::new("c").unwrap(), false, false, t).len(), 1);
    }

    #[test]
    fn deployment_is_pinned_to_the_virtual_node_with_the_liqo_toleration() {
        let intent = Intent {
            id: Id::new("i1").unwrap(),
            name: Id::new("cam").unwrap(),
            namespace: Id::new("cam-ns").unwrap(),
            manifest: LongText::new("kind: Deployment\n").unwrap(),
            selector: FlavourSelector::default(),
            state: IntentState::Deploying,
            contract: None,
            placement: None,
            error: None,
            created_at: 0,
            updated_at: 0,
        };
        let offload = Offload {
            remote_namespace: "cam-ns-cons".into(),
            providers: vec![Id::new("prov").unwrap()],
        };
        let plan = plan_deploy(
            &intent,
            Some(("fluidos-prov-c7", &offload)),
            Path::new("/d/i1"),
        );
        let kustomization = plan
            .iter()
            .find_map(|a| match a {
                Action::File { path, contents, .. } if path.ends_with("kustomization.yaml") => {
                    Some(contents)
                }
                _ => None,
            })
            .unwrap();
        assert!(kustomization.contains("namespace: cam-ns"));
        assert!(kustomization.contains("kubernetes.io/hostname: fluidos-prov-c7"));
        assert!(kustomization.contains("key: virtual-node.liqo.io/not-allowed"));
        let offload = plan
            .iter()
            .find_map(|a| match a {
                Action::Run(Command { args, .. }) if args[0] == "offload" => Some(args.join(" ")),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            offload,
            "offload namespace cam-ns --namespace-mapping-strategy SelectedName \
             --remote-namespace-name cam-ns-cons --pod-offloading-strategy Remote \
             --selector liqo.io/remote-cluster-id=prov"
        );
        // Locally (no virtual node): no offloading, no pinning.
        let local = plan_deploy(&intent, None, Path::new("/d/i1"));
        assert!(!local
            .iter()
            .any(|a| matches!(a, Action::Run(Command { args, .. }) if args[0] == "offload")));
    }

    #[test]
    fn teardown_removes_the_peering_only_with_the_last_contract() {
        let c = build_contract();
        let p = Id::new("p").unwrap();
        let id = Path::new("/d/id");
        let t = Duration::from_secs(30);
        assert_eq!(plan_teardown_consumer(&c, &p, Some(id), false, t).len(), 1);
        let plan = plan_teardown_consumer(&c, &p, Some(id), true, t);
        assert_eq!(plan.len(), 2);
        match &plan[1] {
            Action::Run(Command { args, timeout, .. }) => {
                assert_eq!(args[0], "unpeer");
                assert!(args.contains(&"--timeout=30s".to_string()), "{args:?}");
                assert_eq!(*timeout, Some(t + PROCESS_SLACK));
            }
            other => panic!("{other:?}"),
        }
        assert!(plan_teardown_provider(&p, false).is_empty());
        assert_eq!(plan_teardown_provider(&p, true).len(), 1);
    }
}
