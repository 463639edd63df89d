//! REAR Manager, provider side: what a node does with the requests of nodes that buy from it
//! (seed workflow steps 8-9, 15-18 and 23-26, and the release of a contract it sold).
//!
//! The node task ([`crate::node`]) decodes and checks each inbound message and calls one of
//! these handlers:
//!
//! - LIST_FLAVOURS: `answer_list` (Discovery Manager, steps 8-9);
//! - RESERVE_FLAVOUR: `on_reserve_batch` (Contract Manager, steps 15-18; group commit);
//! - PEER_REQUEST: `on_peer_request` and `grant_peering` (Virtual Fabric Manager,
//!   steps 23-26);
//! - RELEASE: `on_release`.
//!
//! Every refusal is answered with ERROR to the sender (`answer_error`).

use super::NETWORK_NOTE;
use crate::discovery;
use crate::metrics::Answer;
use crate::model::{Contract, ContractState, FlavourList, Id, ReserveRequest};
use crate::shared::{Flight, QueuedGrant, Shared, MAX_GRANT_WAITERS};
use crate::tables::{Decided, Reservation, TableError};
use crate::unix_ms;
use crate::wire::{Body, ContractRef, ErrorBody, ErrorCode, Flavours, PeerAccept, PeerRequest};
use std::sync::Arc;
use tracing::{error, info, warn};

/// Discovery Manager, provider side (workflow steps 8-9). Broadcast requests are answered
/// only when something matches, so a large domain does not answer each one N times.
pub(crate) async fn answer_list(
    shared: &Shared,
    from: &Id,
    id: u64,
    sel: &crate::model::FlavourSelector,
    always: bool,
) {
    let own = match shared.tables.flavours() {
        Ok(v) => v,
        Err(e) => {
            error!(error = %e, "cannot read available resources");
            return answer_error(
                shared,
                from,
                Some(id),
                ErrorCode::Storage,
                "cannot read flavours",
            )
            .await;
        }
    };
    let found = discovery::matching(own.iter().map(|o| &o.flavour), sel);
    shared.step(
        8,
        "Discovery Manager",
        format_args!(
            "LIST_FLAVOURS from {from}: {} local flavour(s) match",
            found.len()
        ),
    );
    if found.is_empty() && !always {
        return;
    }
    let body = Body::Flavours(Flavours::own(FlavourList::from_slice_truncated(&found)));
    match shared.send(from, Some(id), body).await {
        Ok(_) => shared.step(
            9,
            "Discovery Manager",
            format_args!("FLAVOURS sent to {from}"),
        ),
        Err(e) => warn!(%from, error = %e, "could not answer LIST_FLAVOURS"),
    }
}

/// A RESERVE_FLAVOUR waiting in a group commit: who asked, the request id, the request.
pub(crate) type PendingReserve = (Id, u64, ReserveRequest);

/// Contract Manager and REAR Manager, provider side (workflow steps 15-18), for a batch of
/// requests that arrived together (group commit): the tables' writer decides each in turn
/// and writes every sale of the batch in ONE atomic batch, then ONE flush makes them
/// durable, then they are answered. No OK leaves before the flush that covers it has
/// returned; if the write or the flush fails, every new reservation of the batch is answered
/// STORAGE instead (it may survive in the tables, unpeered, and lapse at expiry, so it is
/// never sold twice nor acknowledged without being on disk).
pub(crate) async fn on_reserve_batch(shared: &Shared, batch: Vec<PendingReserve>) {
    let ttl = shared.cfg.reservation_ttl.as_millis() as u64;
    let started = std::time::Instant::now();
    for (from, _, req) in &batch {
        shared.step(
            15,
            "Contract Manager",
            format_args!(
                "RESERVE_FLAVOUR from {from} for {} (transaction {})",
                req.flavour, req.transaction
            ),
        );
    }
    let reqs: Vec<ReserveRequest> = batch.iter().map(|(.., r)| r.clone()).collect();
    let limit = shared.cfg.limits.pending_per_buyer;
    let decided = shared
        .tables
        .reserve_batch(shared.me(), &reqs, unix_ms(), ttl, limit);
    let (answers, durable) = match decided {
        Ok(Decided { answers, written }) => {
            let any_new = answers.iter().any(|a| matches!(a, Reservation::New(_)));
            let durable = match written {
                Ok(()) if any_new => shared.tables.flush().await,
                other => other,
            };
            (Some(answers), durable.map_err(|e| e.to_string()))
        }
        Err(e) => {
            error!(error = %e, "reservations could not be decided; refused");
            (None, Err(e.to_string()))
        }
    };
    let any_new = answers
        .iter()
        .flatten()
        .any(|a| matches!(a, Reservation::New(_)));
    let mut answers = answers.map(Vec::into_iter);
    for (from, id, req) in batch {
        let outcome = answers.as_mut().and_then(Iterator::next).map(|o| match o {
            Reservation::Refused(r) => Reservation::Refused(crate::contracts::as_answered(r, &req)),
            o => o,
        });
        let verdict = Verdict::of(outcome, durable.as_ref().copied().map_err(String::as_str));
        match &verdict {
            Verdict::New(c) => {
                shared.step(
                    16,
                    "REAR Manager",
                    format_args!(
                        "flavour {} removed, reduced flavour created, Node allocation {} inactive",
                        req.flavour, c.id
                    ),
                );
                shared.step(
                    17,
                    "REAR Manager",
                    format_args!("resources reserved; contract {} flushed to disk", c.id),
                );
                info!(contract = %c.id, buyer = %from, "reservation made");
            }
            Verdict::Repeat(c) => {
                info!(contract = %c.id, tx = %req.transaction, "repeated transaction: first answer sent again")
            }
            Verdict::Refused(r) => {
                info!(%from, flavour = %req.flavour, reason = %r, "reservation refused")
            }
            Verdict::NotDurable(c, e) => {
                error!(contract = %c.id, error = %e, "write or flush failed: reservation not acknowledged")
            }
            Verdict::Undecided => {}
        }
        let answer = verdict.metric();
        let body = verdict.body();
        let ok = matches!(body, Body::Reserved(_));
        match shared.send(&from, Some(id), body).await {
            Ok(_) if ok => {
                shared.step(
                    18,
                    "Contract Manager",
                    format_args!("OK (RESERVED) sent to {from}"),
                );
                shared.step(18, "Network Manager", NETWORK_NOTE);
            }
            Ok(_) => {}
            Err(e) => warn!(%from, error = %e, "could not answer RESERVE_FLAVOUR"),
        }
        shared.metrics.reservation(answer, started.elapsed());
    }
    // The new advert goes out after the answers: buyers wait on the answer, the catalog
    // only informs.
    if any_new && durable.is_ok() {
        if let Err(e) = shared.publish_advert().await {
            warn!(error = %e, "could not re-publish the advert");
        }
    }
}

/// How one request of a group commit is answered (steps 16-18), from the writer's decision
/// and whether the batch that holds it reached the disk. A pure rule: the driver above only
/// logs, reports the steps and sends.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Sold now and durable: RESERVED.
    New(Contract),
    /// A transaction sold before (durable then): RESERVED again, byte for byte, whatever
    /// became of this batch's flush.
    Repeat(Contract),
    /// Refused by the rules: ERROR with the refusal's code.
    Refused(crate::contracts::Refusal),
    /// Sold in this batch, but the write or the flush failed: ERROR STORAGE. The sale may
    /// survive unpeered on disk; it lapses at its peering deadline, never acknowledged.
    NotDurable(Contract, String),
    /// The writer could not decide the batch: ERROR STORAGE, nothing reserved.
    Undecided,
}

impl Verdict {
    pub(crate) fn of(outcome: Option<Reservation>, durable: Result<(), &str>) -> Verdict {
        match (outcome, durable) {
            (Some(Reservation::New(c)), Ok(())) => Verdict::New(c),
            (Some(Reservation::New(c)), Err(e)) => Verdict::NotDurable(c, e.to_string()),
            (Some(Reservation::Repeat(c)), _) => Verdict::Repeat(c),
            (Some(Reservation::Refused(r)), _) => Verdict::Refused(r),
            (None, _) => Verdict::Undecided,
        }
    }

    /// The metrics' name for the answer.
    pub(crate) fn metric(&self) -> Answer {
        match self {
            Verdict::New(_) => Answer::New,
            Verdict::Repeat(_) => Answer::Repeat,
            Verdict::Refused(r) => Answer::Refused(r.code()),
            Verdict::NotDurable(..) | Verdict::Undecided => Answer::Refused(ErrorCode::Storage),
        }
    }

    /// The answer's body.
    pub(crate) fn body(self) -> Body {
        match self {
            Verdict::New(c) | Verdict::Repeat(c) => Body::Reserved(Box::new(c)),
            Verdict::Refused(r) => Body::Error(ErrorBody::new(r.code(), &r.to_string())),
            Verdict::NotDurable(..) => Body::Error(ErrorBody::new(
                ErrorCode::Storage,
                "the provider could not make the reservation durable; retry later",
            )),
            Verdict::Undecided => Body::Error(ErrorBody::new(
                ErrorCode::Storage,
                "the provider could not store the reservation; nothing was reserved",
            )),
        }
    }
}

/// Finds the contract `id` that this node sold to `buyer`, or says why not.
fn sold_to(shared: &Shared, id: &Id, buyer: &Id) -> Result<crate::model::Contract, String> {
    match shared.tables.contract(id) {
        Ok(Some(c)) if &c.seller == shared.me() && &c.buyer == buyer => Ok(c),
        Ok(_) => Err(format!("no contract {id} sold to {buyer}")),
        Err(e) => Err(format!("cannot read contracts: {e}")),
    }
}

/// Virtual Fabric Manager, provider side (workflow steps 23-26): a peering is granted only for
/// a signed, live contract of the node asking; anything else is refused. A repeated request
/// gets the first grant again (the peering user cannot be generated twice): once recorded,
/// from the tables; while the grant still runs, by joining it (see [`crate::shared::Flight`]).
pub(crate) async fn on_peer_request(shared: &Arc<Shared>, from: Id, id: u64, req: PeerRequest) {
    let c = match sold_to(shared, &req.contract, &from) {
        Ok(c) if matches!(c.state, ContractState::Reserved | ContractState::Active) => c,
        Ok(c) => {
            let text = format!("contract {} is {:?}", c.id, c.state);
            return answer_error(shared, &from, Some(id), ErrorCode::NoContract, &text).await;
        }
        Err(text) => {
            warn!(%from, contract = %req.contract, "peering refused: {text}");
            return answer_error(shared, &from, Some(id), ErrorCode::NoContract, &text).await;
        }
    };
    let recipient = match crate::seal::recipient(shared.sealing().as_deref(), &req, &from) {
        Ok(r) => r,
        Err(e) => {
            warn!(%from, contract = %req.contract, error = %e, "peering refused");
            let text = e.to_string();
            return answer_error(shared, &from, Some(id), ErrorCode::BadCertificate, &text).await;
        }
    };
    if let Ok(Some(grant)) = shared.tables.peer_grant(&c.id) {
        if let Err(e) = shared.send(&from, Some(id), Body::PeerAccept(grant)).await {
            warn!(%from, error = %e, "could not answer PEER_REQUEST");
        }
        return;
    }
    let cluster = req.cluster_id.clone();
    let (who, asked) = (from.clone(), id);
    let first = QueuedGrant {
        from,
        id,
        request: req,
        recipient,
    };
    // One grant at a time per consumer cluster: join the one in progress, or start one. The
    // lock is never held across an await; a poisoned one (a panic elsewhere) is still a map.
    let start = {
        let mut flights = shared.flights.lock().unwrap_or_else(|p| p.into_inner());
        match flights.get_mut(&cluster) {
            Some(f) if f.waiters() >= MAX_GRANT_WAITERS => {
                Err("too many requests for this cluster's peering")
            }
            Some(f) => {
                if f.contract == c.id {
                    f.answer.push((first.from, first.id));
                } else {
                    f.queued.push(first);
                }
                return;
            }
            None => match shared.peerings.clone().try_acquire_owned() {
                Ok(permit) => {
                    flights.insert(
                        cluster.clone(),
                        Flight {
                            contract: c.id.clone(),
                            answer: vec![(first.from.clone(), first.id)],
                            queued: Vec::new(),
                        },
                    );
                    Ok((first, permit))
                }
                Err(_) => Err("too many peerings in progress"),
            },
        }
    };
    let (first, permit) = match start {
        Ok(started) => started,
        Err(text) => return answer_error(shared, &who, Some(asked), ErrorCode::Busy, text).await,
    };
    let sh = shared.clone();
    // The fabric may take seconds: the node task goes on serving meanwhile.
    shared.own_until_stop(async move {
        let shared = sh;
        let _permit = permit;
        let mut next = Some(first);
        while let Some(g) = next.take() {
            let outcome = grant_one(&shared, &g).await;
            // Who asked for this contract meanwhile, and what comes next for the cluster.
            let (answer, queued) = {
                let mut flights = shared.flights.lock().unwrap_or_else(|p| p.into_inner());
                next_in_flight(&mut flights, &cluster)
            };
            answer_all(&shared, &answer, &outcome).await;
            next = queued;
        }
    });
}

/// After a grant for `cluster`: the requests to answer with its outcome, and the next
/// queued request (whose contract becomes the flight's), or the flight's end.
fn next_in_flight(
    flights: &mut std::collections::HashMap<Id, Flight>,
    cluster: &Id,
) -> (Vec<(Id, u64)>, Option<QueuedGrant>) {
    let Some(f) = flights.get_mut(cluster) else {
        return (Vec::new(), None);
    };
    let answer = std::mem::take(&mut f.answer);
    if f.queued.is_empty() {
        flights.remove(cluster);
        return (answer, None);
    }
    let next = f.queued.remove(0);
    let contract = next.request.contract.clone();
    let mut same = Vec::new();
    f.queued.retain(|q| {
        let join = q.request.contract == contract;
        if join {
            same.push((q.from.clone(), q.id));
        }
        !join
    });
    f.contract = contract;
    f.answer = std::iter::once((next.from.clone(), next.id))
        .chain(same)
        .collect();
    (answer, Some(next))
}

/// One grant of a flight: the request's contract checked again (it may have ended while
/// it waited), its recorded grant if any, else a new one.
async fn grant_one(shared: &Shared, g: &QueuedGrant) -> Result<PeerAccept, (ErrorCode, String)> {
    let c = match sold_to(shared, &g.request.contract, &g.from) {
        Ok(c) if matches!(c.state, ContractState::Reserved | ContractState::Active) => c,
        Ok(c) => {
            return Err((
                ErrorCode::NoContract,
                format!("contract {} is {:?}", c.id, c.state),
            ))
        }
        Err(text) => return Err((ErrorCode::NoContract, text)),
    };
    if let Ok(Some(grant)) = shared.tables.peer_grant(&c.id) {
        return Ok(grant);
    }
    shared.step(
        23,
        "Virtual Fabric Manager",
        format_args!(
            "contract {} signed with {} found: granting the peering to cluster {}",
            c.id, g.from, g.request.cluster_id
        ),
    );
    let grant = grant_peering(shared, &c, &g.request, g.recipient.as_ref()).await;
    match &grant {
        Ok(_) => {
            shared.step(
                24,
                "Virtual Fabric Manager",
                format_args!("peering for {} granted; REAR Manager informed", c.id),
            );
            shared.step(
                25,
                "REAR Manager",
                format_args!("Node allocation {} active", c.id),
            );
        }
        Err((_, text)) => error!(contract = %c.id, "peering grant failed: {text}"),
    }
    grant
}

/// Sends one grant's outcome to everyone who asked for it.
async fn answer_all(
    shared: &Shared,
    to: &[(Id, u64)],
    outcome: &Result<PeerAccept, (ErrorCode, String)>,
) {
    for (from, id) in to {
        match outcome {
            Ok(grant) => {
                match shared
                    .send(from, Some(*id), Body::PeerAccept(grant.clone()))
                    .await
                {
                    Ok(_) => shared.step(
                        26,
                        "Virtual Fabric Manager",
                        format_args!("peering artefacts (Liqo ResourceOffer) sent to {from}"),
                    ),
                    Err(e) => warn!(%from, error = %e, "could not send PEER_ACCEPT"),
                }
            }
            Err((code, text)) => answer_error(shared, from, Some(*id), *code, text).await,
        }
    }
}

/// Whether consumer cluster `cluster` may be given a new peering user for `c`, and whether
/// one left from an ended grant to the same buyer must be deleted first (`Ok(true)`). A
/// cluster granted to another buyer's live contract is refused: its user is that buyer's.
fn fresh_user_needed(
    shared: &Shared,
    c: &Contract,
    cluster: &Id,
) -> Result<bool, (ErrorCode, String)> {
    let storage = |e: TableError| {
        (
            ErrorCode::Storage,
            format!("could not read the peerings: {e}"),
        )
    };
    let me = shared.me();
    let mut candidates = Vec::new();
    shared
        .tables
        .each_contract(|o| {
            let live = matches!(o.state, ContractState::Reserved | ContractState::Active);
            if o.id != c.id && &o.seller == me && (live || o.buyer == c.buyer) {
                candidates.push((o.id, o.buyer, live));
            }
        })
        .map_err(storage)?;
    let mut stale = false;
    for (id, buyer, live) in candidates {
        if shared.tables.peer_cluster(&id).map_err(storage)?.as_ref() != Some(cluster) {
            continue;
        }
        if live && buyer != c.buyer {
            return Err((
                ErrorCode::PeeringFailed,
                format!("cluster {cluster} is peered for another buyer's contract"),
            ));
        }
        stale |= !live;
    }
    Ok(stale)
}

/// Step 23's work: the peering user (unless the buyer already peers with us), this cluster's
/// id, and the record of both, with the contract activated (steps 24-25).
async fn grant_peering(
    shared: &Shared,
    c: &Contract,
    req: &PeerRequest,
    recipient: Option<&p256::PublicKey>,
) -> Result<PeerAccept, (ErrorCode, String)> {
    let failed = |e: &dyn std::fmt::Display| (ErrorCode::PeeringFailed, e.to_string());
    let storage = |e: TableError| {
        (
            ErrorCode::Storage,
            format!("could not record the peering: {e}"),
        )
    };
    if let Some(why) = crate::fabric::liqo::cluster_id_problem(req.cluster_id.as_str(), true) {
        return Err((ErrorCode::PeeringFailed, why));
    }
    let version = shared.fabric.liqo_version().await.map_err(|e| failed(&e))?;
    let theirs = req.liqo_version.as_ref().map(|v| v.as_str());
    crate::fabric::check_liqo_version(&version, theirs)
        .map_err(|text| (ErrorCode::PeeringFailed, text))?;
    let reuse = shared.peering_in_use(c).map_err(storage)?;
    let stale = !reuse && fresh_user_needed(shared, c, &req.cluster_id)?;
    let plan = shared.fabric.plan_grant(&req.cluster_id, reuse, stale);
    let out = match shared.fabric.execute(c.id.as_str(), &plan).await {
        Ok(out) => out,
        Err(e) => {
            if let crate::fabric::FabricError::Timeout { .. } = e {
                // A generate killed while it waited left its CSR: remove the half-made user,
                // or every later grant for this cluster would fail on it.
                let undo = crate::fabric::plan_teardown_provider(&req.cluster_id, true);
                if let Err(u) = shared.fabric.execute(c.id.as_str(), &undo).await {
                    warn!(contract = %c.id, error = %u, "could not remove a half-made peering user");
                }
            }
            return Err(failed(&e));
        }
    };
    let identity = match plan.is_empty() {
        true => None,
        false => Some(
            crate::model::LongText::new(&out)
                .map_err(|e| failed(&format!("peering identity too large: {e}")))?,
        ),
    };
    let ctx = crate::seal::Context {
        contract: &c.id,
        provider: shared.me(),
        buyer: &c.buyer,
    };
    let (identity, sealed) =
        crate::seal::protect(recipient, &ctx, identity).map_err(|e| failed(&e))?;
    let grant = PeerAccept {
        contract: c.id.clone(),
        cluster_id: shared.fabric.cluster_id().await.map_err(|e| failed(&e))?,
        identity,
        liqo_version: crate::model::Text::new(&version).ok(),
        sealed,
    };
    shared.tables.put_peer_grant(&grant).map_err(storage)?;
    shared
        .tables
        .put_peer_cluster(&c.id, &req.cluster_id)
        .map_err(storage)?;
    shared
        .tables
        .activate(&c.id, unix_ms())
        .await
        .map_err(storage)?;
    Ok(grant)
}

/// Contract Manager, provider side of a release: the capacity goes back into the offer (and
/// the advert), the peering user goes when no other contract of that consumer needs it.
/// Releasing an already released contract is answered RELEASED again.
pub(crate) async fn on_release(shared: &Shared, from: &Id, id: u64, r: ContractRef) {
    let c = match sold_to(shared, &r.contract, from) {
        Ok(c) => c,
        Err(text) => {
            return answer_error(shared, from, Some(id), ErrorCode::NoContract, &text).await
        }
    };
    match shared
        .tables
        .end_contract(&c.id, ContractState::Released, unix_ms())
        .await
    {
        Ok(Some(_)) => {
            info!(contract = %c.id, buyer = %from, "contract released; resources returned");
            if let Err(e) = shared.publish_advert().await {
                warn!(error = %e, "could not re-publish the advert");
            }
            crate::terms::teardown_sold(shared, &c).await;
        }
        // An expired contract released by its buyer: the buyer has unpeered (it releases
        // after its own teardown), so the peering user need not wait out the grace.
        Ok(None) if c.state == ContractState::Expired => {
            crate::terms::teardown_sold(shared, &c).await;
        }
        Ok(None) => {}
        Err(e) => {
            error!(contract = %c.id, error = %e, "release failed");
            return answer_error(
                shared,
                from,
                Some(id),
                ErrorCode::Storage,
                "could not store the release",
            )
            .await;
        }
    }
    let body = Body::Released(ContractRef { contract: c.id });
    if let Err(e) = shared.send(from, Some(id), body).await {
        warn!(%from, error = %e, "could not send RELEASED");
    }
}

/// Answers `to` with ERROR (never fails: a lost ERROR is only logged). The node task refuses
/// malformed messages through it too.
pub(crate) async fn answer_error(
    shared: &Shared,
    to: &Id,
    correlation: Option<u64>,
    code: ErrorCode,
    text: &str,
) {
    let body = Body::Error(ErrorBody::new(code, text));
    if let Err(e) = shared.send(to, correlation, body).await {
        warn!(%to, error = %e, "could not send ERROR");
    }
}

/// This provider's sales, each with the consumer cluster it was granted to. One contract is
/// decoded at a time and only sales that were peered are kept (a provider's whole table of
/// contracts decoded at once was its peak memory).
fn sales(shared: &crate::shared::Shared) -> Vec<(Contract, Id)> {
    let me = shared.me();
    let mut out = Vec::new();
    let read = shared.tables.each_contract(|c| {
        if &c.seller == me && &c.buyer != me {
            if let Ok(Some(cluster)) = shared.tables.peer_cluster(&c.id) {
                out.push((c, cluster));
            }
        }
    });
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read contracts for enforcement");
    }
    out
}

/// The provider's enforcement task (liqo backend only): one [`enforce`] round every
/// `enforce_every`, until `stop`.
pub(crate) async fn enforce_sales(
    shared: std::sync::Arc<crate::shared::Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if shared.fabric.backend() != &crate::fabric::Backend::Liqo {
        return;
    }
    let mut tick = tokio::time::interval(shared.fabric.enforce_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = crate::fabric::enforce::enforce(&shared.fabric, &sales(&shared)).await {
            tracing::warn!(error = %e, "contract enforcement round failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::Refusal;
    use crate::model::{test_contract, Resources};

    fn sold() -> Contract {
        test_contract(
            "p.c1",
            "p",
            "b",
            Resources::default(),
            ContractState::Reserved,
        )
    }

    fn code(body: &Body) -> Option<ErrorCode> {
        match body {
            Body::Error(e) => e.code(),
            _ => None,
        }
    }

    #[test]
    fn a_new_sale_is_acknowledged_only_once_durable() {
        let v = Verdict::of(Some(Reservation::New(sold())), Ok(()));
        assert!(matches!(v.metric(), Answer::New));
        assert!(matches!(v.body(), Body::Reserved(c) if c.id.as_str() == "p.c1"));

        let v = Verdict::of(Some(Reservation::New(sold())), Err("fsync: EIO"));
        assert!(matches!(v.metric(), Answer::Refused(ErrorCode::Storage)));
        let body = v.body();
        assert_eq!(code(&body), Some(ErrorCode::Storage));
        assert!(!matches!(body, Body::Reserved(_)));
    }

    #[test]
    fn a_repeat_is_answered_again_even_when_this_batch_did_not_reach_the_disk() {
        // The repeat was made durable by an earlier batch; this batch's failure is not its.
        for durable in [Ok(()), Err("flush failed")] {
            let v = Verdict::of(Some(Reservation::Repeat(sold())), durable);
            assert!(matches!(v.metric(), Answer::Repeat));
            assert!(matches!(v.body(), Body::Reserved(_)));
        }
    }

    #[test]
    fn a_refusal_keeps_its_code_and_words_and_an_undecided_batch_is_storage() {
        let flavour = Id::new("p.f1").unwrap();
        let v = Verdict::of(
            Some(Reservation::Refused(Refusal::NoFit(flavour))),
            Err("flush failed"),
        );
        assert!(matches!(v.metric(), Answer::Refused(ErrorCode::NoFit)));
        match v.body() {
            Body::Error(e) => {
                assert_eq!(e.code(), Some(ErrorCode::NoFit));
                assert!(e.text.as_str().contains("p.f1"), "{}", e.text.as_str());
            }
            other => panic!("{:?}", other.kind()),
        }
        let v = Verdict::of(None, Err("tables closed"));
        assert!(matches!(v.metric(), Answer::Refused(ErrorCode::Storage)));
        assert_eq!(code(&v.body()), Some(ErrorCode::Storage));
    }
}
