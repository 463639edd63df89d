//! Node Orchestrator: from an intent to a placed workload (workflow steps 1-4 and 29-31),
//! handing over to the REAR Manager only when nothing local fits.
//!
//! An intent moves through [`IntentState`]s and is written to the `intents` table at every
//! move, so an agent restarted mid-intent picks it up where it was ([`unfinished`], [`own`]): a reservation
//! in progress is retried, a contract waiting for peering is peered, a deployment is applied
//! again (`kubectl apply` is idempotent).
//!
//! Step 3 looks in two places, in this order: VirtualNode allocations already bought and
//! active that still have room for the request (capacity a previous intent paid for), then
//! this node's own flavours (a node may run its own workloads on capacity it would otherwise
//! sell; the piece is reserved from its offer like any sale, so capacity stays conserved).
//! Ratings and Metrics order the virtual nodes: among those with room, the one whose provider
//! failed least is used first.

use crate::config::{invalid, node_id, price_micros, text, ConfigError, Size};
use crate::discovery::fit;
use crate::model::{
    AllocationKind, AllocationStatus, Contract, ContractState, FlavourSelector, Id, Intent,
    IntentState, LongText, ReserveRequest, Resources, Text, MAX_MANIFEST,
};
use crate::rear::{consumer, RearError};
use crate::shared::Shared;
use crate::tables::{Reservation, TableError};
use crate::{unix_ms, AgentError};
use minicbor::{Decode, Encode};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// What a user asks for: the intent file, parsed (see `docs/intents.md`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct IntentSpec {
    #[n(0)]
    pub name: Id,
    #[n(1)]
    pub namespace: Id,
    #[n(2)]
    pub manifest: LongText<MAX_MANIFEST>,
    #[n(3)]
    pub selector: FlavourSelector,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntent {
    name: String,
    namespace: Option<String>,
    manifest: std::path::PathBuf,
    resources: RawNeeds,
    #[serde(default)]
    constraints: RawConstraints,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeeds {
    cpu_millicores: u64,
    memory: Size,
    #[serde(default = "one")]
    pods: u32,
    storage: Option<Size>,
    architecture: Option<String>,
    gpu: Option<bool>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConstraints {
    max_price: Option<String>,
    country: Option<String>,
}

/// Parses an intent file; the manifest path is taken relative to `base` (the file's folder).
pub fn parse_intent(toml_text: &str, base: &Path) -> Result<IntentSpec, ConfigError> {
    let raw: RawIntent =
        toml::from_str(toml_text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    let manifest = manifest(&raw.manifest, base)?;
    let name = node_id("name", &raw.name)?;
    let namespace = match &raw.namespace {
        Some(ns) => node_id("namespace", ns)?,
        None => name.clone(),
    };
    let r = &raw.resources;
    if r.cpu_millicores == 0 {
        return Err(invalid(
            "resources.cpu_millicores",
            "must be greater than 0",
        ));
    }
    Ok(IntentSpec {
        name,
        namespace,
        manifest: LongText::new(&manifest).map_err(|e| invalid("manifest", e.to_string()))?,
        selector: FlavourSelector {
            architecture: r
                .architecture
                .as_deref()
                .map(|a| crate::config::architecture("resources.architecture", a))
                .transpose()?,
            min: Some(Resources {
                cpu: r.cpu_millicores,
                memory: r.memory.bytes("resources.memory")?,
                pods: r.pods,
                storage: match &r.storage {
                    Some(s) => s.bytes("resources.storage")?,
                    None => 0,
                },
            }),
            max: None,
            max_price: raw
                .constraints
                .max_price
                .as_deref()
                .map(|p| price_micros("constraints.max_price", p))
                .transpose()?,
            gpu: r.gpu,
            country: raw
                .constraints
                .country
                .as_deref()
                .map(|c| text("constraints.country", c))
                .transpose()?,
        },
    })
}

/// The workload manifest: a file beside the intent file (or below its directory), never an
/// absolute path or one that climbs out with `..` (the CLI may run as root, and whatever it
/// reads goes to the agent and into the cluster), holding Kubernetes YAML (`apiVersion:` and
/// `kind:` at the start of a line).
fn manifest(path: &Path, base: &Path) -> Result<String, ConfigError> {
    use std::path::Component;
    let shown = path.display();
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(
            "manifest",
            format!("\"{shown}\" must be a path relative to the intent file's directory, without `..` (copy the manifest beside the intent file)"),
        ));
    }
    let text = crate::config::read_text(&base.join(path), MAX_MANIFEST as u64)?;
    let has = |key: &str| text.lines().any(|l| l.starts_with(key));
    if !has("apiVersion:") || !has("kind:") {
        return Err(invalid(
            "manifest",
            format!("{} is not a Kubernetes manifest: no `apiVersion:` and `kind:` at the start of a line", base.join(path).display()),
        ));
    }
    Ok(text)
}

/// Where step 3 found room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On a bought virtual node: the contract paying for it and the node's name.
    Virtual { contract: Id, node: String },
    /// On this node's own capacity: the flavour to reserve from and the piece.
    Local {
        flavour: Id,
        partition: Option<Resources>,
    },
}

/// Room left on a bought capacity: the contract's resources minus what the intents placed
/// on it asked for. Pure, so the bookkeeping is unit-tested.
pub fn room(contract: &Contract, intents: &[Intent]) -> Resources {
    let mut used = Resources::default();
    for i in intents {
        let on_it = i.contract.as_ref() == Some(&contract.id)
            && matches!(i.state, IntentState::Deploying | IntentState::Placed);
        if on_it {
            used = used.saturating_add(&i.selector.min.unwrap_or_default());
        }
    }
    contract.resources.checked_sub(&used).unwrap_or_default()
}

/// Whether `need` fits in `room` on a contract's flavour (architecture, GPU and country
/// must also match; the price was paid already).
pub fn fits_room(room: &Resources, contract: &Contract, sel: &FlavourSelector) -> bool {
    let need = sel.min.unwrap_or_default();
    let probe = FlavourSelector {
        min: None,
        max: None,
        max_price: None,
        ..sel.clone()
    };
    room.checked_sub(&need).is_some() && fit(&contract.flavour, &probe).is_some()
}

/// Step 3 (and 31): room for `intent` in Available Resources, ranked with Ratings and Metrics.
fn lookup(shared: &Shared, intent: &Intent) -> Result<Option<Placement>, TableError> {
    let intents = shared.tables.intents()?;
    let mut virtual_nodes = Vec::new();
    for a in shared.tables.allocations()? {
        if a.kind != AllocationKind::VirtualNode || a.status != AllocationStatus::Active {
            continue;
        }
        let Some(c) = shared.tables.contract(&a.contract)? else {
            continue;
        };
        if c.state == ContractState::Active && fits_room(&room(&c, &intents), &c, &intent.selector)
        {
            let failures = shared.tables.rating(&c.seller)?.map_or(0, |r| r.failures());
            virtual_nodes.push((failures, c.id.clone()));
        }
    }
    virtual_nodes.sort();
    if let Some((_, contract)) = virtual_nodes.into_iter().next() {
        let node = crate::fabric::virtual_node_name(&contract);
        return Ok(Some(Placement::Virtual { contract, node }));
    }
    for own in shared.tables.flavours()? {
        if let Some(f) = fit(&own.flavour, &intent.selector) {
            return Ok(Some(Placement::Local {
                flavour: own.flavour.id,
                partition: f.partition,
            }));
        }
    }
    Ok(None)
}

/// Takes a piece of this node's own flavour for its own workload (a sale to itself).
async fn reserve_locally(
    shared: &Shared,
    flavour: &Id,
    partition: Option<Resources>,
) -> Result<Contract, RearError> {
    let n = shared.tables.generate_id()?;
    let me = shared.me();
    let req = ReserveRequest {
        transaction: Id::new(&format!("{me}.t{n}"))
            .map_err(|e| RearError::Broker(e.to_string()))?,
        flavour: flavour.clone(),
        buyer: me.clone(),
        partition,
    };
    let ttl = shared.cfg.reservation_ttl.as_millis() as u64;
    match shared.tables.reserve(me, &req, unix_ms(), ttl).await? {
        Reservation::New(c) | Reservation::Repeat(c) => {
            shared.tables.activate(&c.id, unix_ms()).await?;
            if let Err(e) = shared.publish_advert().await {
                warn!(error = %e, "could not re-publish the advert");
            }
            Ok(c)
        }
        Reservation::Refused(r) => Err(RearError::Refused {
            provider: me.to_string(),
            code: Some(r.code()),
            text: r.to_string(),
        }),
    }
}

async fn save(shared: &Shared, intent: &mut Intent) {
    intent.updated_at = unix_ms();
    if let Err(e) = shared.tables.put_intent(intent).await {
        error!(intent = %intent.id, error = %e, "could not store the intent");
    }
}

fn fail(intent: &mut Intent, why: &str) {
    warn!(intent = %intent.id, "intent failed: {why}");
    intent.state = IntentState::Failed;
    let mut end = why.len().min(256);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    intent.error = Text::new(&why[..end]).ok();
}

/// Moves an intent from wherever it is to Placed or Failed.
pub(crate) async fn drive(shared: &Shared, mut intent: Intent) -> Intent {
    loop {
        match intent.state {
            IntentState::Submitted => {
                shared.step(
                    2,
                    "Node Orchestrator",
                    format_args!(
                        "intent {} decomposed into a resource request: {}",
                        intent.id,
                        consumer::describe(&intent.selector)
                    ),
                );
                match lookup(shared, &intent) {
                    Ok(Some(Placement::Virtual { contract, node })) => {
                        shared.step(
                            3,
                            "Node Orchestrator",
                            format_args!("room on virtual node {node} (contract {contract})"),
                        );
                        intent.contract = Some(contract);
                        intent.placement = Text::new(&node).ok();
                        intent.state = IntentState::Deploying;
                    }
                    Ok(Some(Placement::Local { flavour, partition })) => {
                        shared.step(
                            3,
                            "Node Orchestrator",
                            format_args!("own flavour {flavour} fits: running locally"),
                        );
                        match reserve_locally(shared, &flavour, partition).await {
                            Ok(c) => {
                                intent.contract = Some(c.id);
                                intent.placement = Text::new("local").ok();
                                intent.state = IntentState::Deploying;
                            }
                            Err(e) => fail(&mut intent, &e.to_string()),
                        }
                    }
                    Ok(None) => {
                        shared.step(3, "Node Orchestrator", "nothing in Available Resources fits (own flavours, virtual nodes with room; Ratings and Metrics consulted)");
                        shared.step(4, "Node Orchestrator", "request handed to the REAR Manager");
                        intent.state = IntentState::Reserving;
                    }
                    Err(e) => fail(&mut intent, &e.to_string()),
                }
            }
            IntentState::Reserving => match consumer::acquire(shared, &intent.selector).await {
                Ok(c) => {
                    intent.contract = Some(c.id);
                    intent.state = IntentState::Peering;
                }
                Err(RearError::Disconnected(why)) => {
                    // A gateway's link comes and goes: the intent waits for the broker
                    // rather than failing on an outage.
                    info!(intent = %intent.id, %why, "waiting for the domain broker");
                    let mut status = shared.status.clone();
                    if status.wait_for(|s| s.connected).await.is_err() {
                        fail(&mut intent, &format!("the broker connection ended: {why}"));
                    } else {
                        info!(intent = %intent.id, "domain broker reachable again: the reservation goes on");
                    }
                    continue;
                }
                Err(e) => fail(&mut intent, &e.to_string()),
            },
            IntentState::Peering => {
                let contract = match &intent.contract {
                    Some(id) => shared.tables.contract(id).ok().flatten(),
                    None => None,
                };
                let Some(c) = contract else {
                    fail(&mut intent, "the intent's contract is missing");
                    save(shared, &mut intent).await;
                    continue;
                };
                match consumer::peer(shared, &c).await {
                    Ok(_) => {
                        shared.step(
                            29,
                            "REAR Manager",
                            "discovery, reservation and peering over: Node Orchestrator informed",
                        );
                        shared.step(
                            30,
                            "Node Orchestrator",
                            format_args!("continuing intent {}", intent.id),
                        );
                        match lookup(shared, &intent) {
                            Ok(Some(Placement::Virtual { contract, node })) if contract == c.id => {
                                shared.step(
                                    31,
                                    "Node Orchestrator",
                                    format_args!(
                                        "Available Resources: virtual node {node} has room"
                                    ),
                                );
                                intent.placement = Text::new(&node).ok();
                                intent.state = IntentState::Deploying;
                            }
                            other => {
                                let found = match other {
                                    Ok(Some(Placement::Virtual { contract, .. })) => {
                                        format!("room found on contract {contract} instead")
                                    }
                                    Ok(Some(Placement::Local { flavour, .. })) => {
                                        format!("room found on own flavour {flavour} instead")
                                    }
                                    Ok(None) => "no room on it".to_string(),
                                    Err(e) => format!("Available Resources unreadable: {e}"),
                                };
                                fail(
                                    &mut intent,
                                    &format!(
                                        "the new virtual node does not fit the request ({found})"
                                    ),
                                )
                            }
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        // Give the capacity back rather than keep paying for a failed peering.
                        if let Err(e) = consumer::release(shared, &c.id).await {
                            warn!(contract = %c.id, error = %e, "release after a failed peering");
                        }
                        fail(
                            &mut intent,
                            &format!("peering with {} failed: {why}", c.seller),
                        );
                    }
                }
            }
            IntentState::Deploying => {
                let node = intent.placement.as_ref().map(|p| p.as_str().to_owned());
                let virtual_node = node.as_deref().filter(|n| *n != "local");
                let dir = shared.fabric.scope_dir(intent.id.as_str());
                let offload = match virtual_node {
                    Some(_) => match offload_for(shared, &intent).await {
                        Ok(o) => Some(o),
                        Err(why) => {
                            fail(&mut intent, &format!("deployment failed: {why}"));
                            save(shared, &mut intent).await;
                            continue;
                        }
                    },
                    None => None,
                };
                let target = virtual_node.zip(offload.as_ref());
                let plan = crate::fabric::plan_deploy(&intent, target, &dir);
                match shared.fabric.execute(intent.id.as_str(), &plan).await {
                    Ok(_) => {
                        let place = virtual_node
                            .map_or("this node".to_owned(), |n| format!("virtual node {n}"));
                        shared.step(
                            31,
                            "Node Orchestrator",
                            format_args!(
                                "workload {} deployed on {place}, namespace {}",
                                intent.name, intent.namespace
                            ),
                        );
                        info!(intent = %intent.id, placement = node.as_deref().unwrap_or("?"), "intent placed");
                        intent.state = IntentState::Placed;
                    }
                    Err(e) => fail(&mut intent, &format!("deployment failed: {e}")),
                }
            }
            IntentState::Placed | IntentState::Failed => return intent,
        }
        save(shared, &mut intent).await;
    }
}

/// Where `intent`'s namespace is offloaded: its name on the providers, and the provider
/// cluster of every live contract a workload in that namespace is placed on, this intent's
/// included (`liqoctl offload` replaces the namespace's cluster selector: it must name them
/// all).
async fn offload_for(shared: &Shared, intent: &Intent) -> Result<crate::fabric::Offload, String> {
    let me = shared
        .fabric
        .cluster_id()
        .await
        .map_err(|e| e.to_string())?;
    let cannot = |e: TableError| format!("cannot read the tables: {e}");
    let mut providers = Vec::new();
    for i in shared.tables.intents().map_err(cannot)? {
        let placed = i.id == intent.id || matches!(i.state, IntentState::Placed);
        let remote = i.placement.as_ref().is_some_and(|p| p.as_str() != "local");
        let Some(contract) = i.contract.as_ref().filter(|_| placed && remote) else {
            continue;
        };
        if i.namespace != intent.namespace {
            continue;
        }
        let live = shared
            .tables
            .contract(contract)
            .map_err(cannot)?
            .is_some_and(|c| c.state == ContractState::Active);
        if let (true, Some(grant)) = (live, shared.tables.peer_grant(contract).map_err(cannot)?) {
            if !providers.contains(&grant.cluster_id) {
                providers.push(grant.cluster_id);
            }
        }
    }
    if providers.is_empty() {
        return Err(format!(
            "no peering on record for the contract of intent {}",
            intent.id
        ));
    }
    providers.sort();
    Ok(crate::fabric::Offload {
        remote_namespace: crate::fabric::remote_namespace(&intent.namespace, &me),
        providers,
    })
}

/// Workflow step 1: stores a new intent and hands it to the node, which drives it to its
/// end on its own ([`own`]): whatever the caller does next (a control client that goes
/// away, a CLI cut off by Ctrl-C or `| head`), the intent goes on. The receiver gets the
/// intent as it ended; it is dropped unanswered if the node stops first (the intent then
/// resumes at the next start).
pub(crate) async fn submit(
    shared: &Arc<Shared>,
    spec: IntentSpec,
) -> Result<(Intent, oneshot::Receiver<Intent>), AgentError> {
    // Two intents applying one workload name into one namespace would overwrite each
    // other's Deployment (kubectl apply): the second is refused while the first lives.
    if let Some(other) = shared.tables.intents()?.into_iter().find(|i| {
        i.name == spec.name && i.namespace == spec.namespace && i.state != IntentState::Failed
    }) {
        return Err(AgentError::Other(format!(
            "intent {} already places {} in namespace {} ({}): cancel it (fluidlet intent \
             cancel {}) or give this one another name",
            other.id, other.name, other.namespace, other.state, other.id
        )));
    }
    let n = shared.tables.generate_id()?;
    let now = unix_ms();
    let intent = Intent {
        id: Id::new(&format!("i{n}")).map_err(|e| AgentError::Other(e.to_string()))?,
        name: spec.name,
        namespace: spec.namespace,
        manifest: spec.manifest,
        selector: spec.selector,
        state: IntentState::Submitted,
        contract: None,
        placement: None,
        error: None,
        created_at: now,
        updated_at: now,
    };
    shared.tables.put_intent(&intent).await?;
    shared.step(
        1,
        "Service Handler",
        format_args!(
            "intent {} ({}) received: {} bytes of manifest",
            intent.id,
            intent.name,
            intent.manifest.as_str().len()
        ),
    );
    info!(intent = %intent.id, name = %intent.name, "intent accepted: the node drives it to its end");
    let (tx, rx) = oneshot::channel();
    own(shared, intent.clone(), Some(tx));
    Ok((intent, rx))
}

/// The intents a previous run left unfinished; the node resumes each with [`own`].
pub(crate) fn unfinished(shared: &Shared) -> Result<Vec<Intent>, AgentError> {
    let mut v = Vec::new();
    for intent in shared.tables.intents()? {
        if intent.state.is_final() {
            continue;
        }
        info!(intent = %intent.id, state = %intent.state, "resuming an unfinished intent");
        v.push(intent);
    }
    Ok(v)
}

/// Drives `intent` to its end as one of the node's own tasks ([`Shared::own`]), until the
/// node stops; `done`, if given, gets the intent as it ended.
pub(crate) fn own(shared: &Arc<Shared>, intent: Intent, done: Option<oneshot::Sender<Intent>>) {
    let sh = shared.clone();
    let mut stop = shared.stop.clone();
    let key = intent.id.clone();
    let handle = shared.own(async move {
        let id = intent.id.clone();
        // Cancel safety: every state change is stored before the next await, so a stop
        // here loses at most the step in progress, which the next start repeats.
        let resumed = intent.state != IntentState::Submitted;
        let run = async {
            // A resumed intent is past its local lookup: its next step needs the broker.
            let mut status = sh.status.clone();
            if resumed && status.wait_for(|s| s.connected).await.is_err() {
                return None;
            }
            Some(drive(&sh, intent).await)
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                info!(intent = %id, "node stopping: the intent resumes where it is at the next start");
            }
            Some(end) = run => {
                if let Ok(mut t) = sh.intent_tasks.lock() {
                    t.remove(&end.id);
                }
                if let Some(tx) = done {
                    let _ = tx.send(end);
                }
            }
        }
    });
    if let Ok(mut t) = shared.intent_tasks.lock() {
        t.retain(|_, h| !h.is_finished());
        t.insert(key, handle);
    }
}

/// `fluidlet intent cancel`: stops driving an unfinished intent and ends it `Failed`
/// ("cancelled"), giving back the capacity it bought if no other intent is placed on it.
/// A reservation in flight at that moment is not answered to the intent: the provider lets
/// it lapse after its `reservation_ttl_secs`.
pub(crate) async fn cancel(shared: &Arc<Shared>, id: &Id) -> Result<Intent, String> {
    let mut intent = match shared.tables.intent(id) {
        Ok(Some(i)) => i,
        Ok(None) => return Err(format!("no intent {id}")),
        Err(e) => return Err(e.to_string()),
    };
    if intent.state.is_final() {
        return Err(format!(
            "intent {id} has already ended ({}): nothing to cancel",
            intent.state
        ));
    }
    let task = shared
        .intent_tasks
        .lock()
        .ok()
        .and_then(|mut t| t.remove(id));
    if let Some(h) = task {
        h.abort();
    }
    let contract = intent.contract.clone();
    fail(
        &mut intent,
        "cancelled by the operator (fluidlet intent cancel)",
    );
    save(shared, &mut intent).await;
    info!(intent = %id, "intent cancelled");
    if let Some(c) = contract {
        let shared_by_others = shared.tables.intents().unwrap_or_default().iter().any(|i| {
            i.id != *id && i.state == IntentState::Placed && i.contract.as_ref() == Some(&c)
        });
        let bought = shared
            .tables
            .contract(&c)
            .ok()
            .flatten()
            .is_some_and(|k| &k.buyer == shared.me() && &k.seller != shared.me());
        if bought && !shared_by_others {
            if let Err(e) = consumer::release(shared, &c).await {
                warn!(intent = %id, contract = %c, "release after a cancel: {e}");
            }
        }
    }
    Ok(intent)
}

/// `fluidlet intent retry`: starts a `Failed` intent again from its first step.
pub(crate) async fn retry(shared: &Arc<Shared>, id: &Id) -> Result<Intent, String> {
    let mut intent = match shared.tables.intent(id) {
        Ok(Some(i)) => i,
        Ok(None) => return Err(format!("no intent {id}")),
        Err(e) => return Err(e.to_string()),
    };
    if intent.state != IntentState::Failed {
        return Err(format!(
            "intent {id} is {}: only a Failed intent is retried",
            intent.state
        ));
    }
    intent.state = IntentState::Submitted;
    intent.error = None;
    intent.contract = None;
    intent.placement = None;
    save(shared, &mut intent).await;
    info!(intent = %id, "intent retried: the node drives it again from the start");
    own(shared, intent.clone(), None);
    Ok(intent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_contract(cpu: u64) -> Contract {
        let piece = Resources {
            cpu,
            memory: 4000,
            pods: 10,
            storage: 0,
        };
        crate::model::test_contract("p.c1", "p", "c", piece, ContractState::Active)
    }

    fn build_intent(cpu: u64, state: IntentState, contract: Option<&str>) -> Intent {
        Intent {
            id: Id::new("i1").unwrap(),
            name: Id::new("w").unwrap(),
            namespace: Id::new("w").unwrap(),
            manifest: LongText::default(),
            selector: FlavourSelector {
                min: Some(Resources {
                    cpu,
                    memory: 1000,
                    pods: 1,
                    storage: 0,
                }),
                ..Default::default()
            },
            state,
            contract: contract.map(|c| Id::new(c).unwrap()),
            placement: None,
            error: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn room_subtracts_what_placed_intents_asked_for() {
        let c = build_contract(2000);
        let placed = build_intent(1500, IntentState::Placed, Some("p.c1"));
        let elsewhere = build_intent(1000, IntentState::Placed, Some("q.c1"));
        let failed = build_intent(1000, IntentState::Failed, Some("p.c1"));
        let r = room(&c, &[placed, elsewhere, failed]);
        assert_eq!(r.cpu, 500);
        assert_eq!(r.memory, 3000);
        assert!(!fits_room(
            &r,
            &c,
            &build_intent(600, IntentState::Submitted, None).selector
        ));
        assert!(fits_room(
            &r,
            &c,
            &build_intent(500, IntentState::Submitted, None).selector
        ));
    }

    #[test]
    fn room_on_another_architecture_does_not_fit() {
        let c = build_contract(2000);
        let mut sel = build_intent(100, IntentState::Submitted, None).selector;
        sel.architecture = Some(Text::new("amd64").unwrap());
        assert!(!fits_room(&c.resources, &c, &sel));
    }

    #[test]
    fn the_documented_example_intent_is_valid() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        let text = std::fs::read_to_string(base.join("intent.toml")).unwrap();
        let spec = parse_intent(&text, &base).unwrap();
        assert_eq!(spec.selector.min.unwrap().cpu, 1000);
        assert!(spec.manifest.as_str().contains("kind: Deployment"));
    }

    #[test]
    fn intent_file_parses_with_units_and_a_relative_manifest() {
        let dir = std::env::temp_dir().join(format!("fluidlet-intent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("app.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "hello\n").unwrap();
        let spec = parse_intent(
            "name = \"cam\"\nmanifest = \"app.yaml\"\n[resources]\ncpu_millicores = 500\nmemory = \"256Mi\"\narchitecture = \"arm64\"\n[constraints]\nmax_price = \"0.5\"\ncountry = \"IT\"\n",
            &dir,
        )
        .unwrap();
        assert_eq!(spec.namespace.as_str(), "cam");
        assert_eq!(spec.selector.min.unwrap().memory, 256 << 20);
        assert_eq!(spec.selector.min.unwrap().pods, 1);
        assert_eq!(spec.selector.max_price, Some(500_000));
        assert_eq!(spec.selector.country.as_ref().unwrap().as_str(), "IT");
        let missing = parse_intent("name = \"cam\"\nmanifest = \"nope.yaml\"\n[resources]\ncpu_millicores = 1\nmemory = 1\n", &dir);
        assert!(missing.unwrap_err().to_string().contains("nope.yaml"));
        let intent = |manifest: &str, arch: &str| {
            parse_intent(&format!("name = \"cam\"\nmanifest = \"{manifest}\"\n[resources]\ncpu_millicores = 1\nmemory = 1\narchitecture = \"{arch}\"\n"), &dir)
        };
        // What people type for the architecture is taken for the Kubernetes name.
        let spec = intent("app.yaml", "aarch64").unwrap();
        assert_eq!(spec.selector.architecture.unwrap().as_str(), "arm64");
        for bad in ["/etc/shadow", "../app.yaml", "notes.txt"] {
            let e = intent(bad, "arm64").unwrap_err().to_string();
            assert!(e.contains("manifest"), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
