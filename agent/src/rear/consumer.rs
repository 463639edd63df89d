//! REAR Manager, consumer side: from a flavour selector to a durable contract (workflow
//! steps 5-20).
//!
//! The phases, in order: look up fresh Peering Candidates (5); if none matches, hand the
//! selector to the Discovery Manager, which broadcasts LIST_FLAVOURS and stores every
//! FLAVOURS answer as candidates until the discovery window closes (6-11); look again (12);
//! then ask the Contract Manager to reserve the best candidate (13-14) and store the
//! contract and a VirtualNode allocation when RESERVED comes back (19-20).
//!
//! Providers can lie: advertise cheap flavours and then refuse or ignore every RESERVE.
//! So a flow gives each provider **one attempt** (one RESERVE_FLAVOUR, one
//! `reserve_timeout`) and then moves on to the next provider, for as long as its time budget
//! (`consumer.acquire_budget_secs`) lasts, not for a fixed number of candidates. A provider
//! that answers NO_FIT for a flavour it offered (an honest provider never does: a flavour's
//! id changes whenever its resources do), that does not answer in time, or whose RESERVED is
//! not the contract asked for, is a *liar* for this flow: it is out of the flow and demoted
//! in Ratings and Metrics for `consumer.liar_demotion_secs`, during which [`rank`] puts it
//! after every other provider whatever its price. FLAVOUR_GONE is what an honest provider
//! answers when the flavour was sold since this node saw it, so the first one only excludes
//! that provider's candidates known so far: it gets a second attempt on a flavour heard of
//! after the refusal (a fresh advert or discovery answer); a second FLAVOUR_GONE in the same
//! flow makes it a liar too; so is NO_FIT from a provider of protocol revision 0, whose builds
//! answer it for a superseded id that no longer fits (docs/protocol.md section 10), so its
//! first one counts as a first FLAVOUR_GONE. A RESERVED lost on the way back is no longer recovered by a
//! resend within the flow: the provider's reservation lapses at its expiry. Purchases
//! resumed after a restart ([`resume`]) still resend under the same transaction id
//! (`reserve_attempts`), so a contract made while this node was down is recovered.

use super::NETWORK_NOTE;
use crate::contracts::check_answer;
use crate::discovery::{rank, Fit, Standing};
use crate::model::ContractState;
use crate::model::{Candidate, Contract, FlavourSelector, Id, ReserveRequest};
use crate::shared::{RearError, Shared, Waiter};
use crate::tables::Outgoing;
use crate::unix_ms;
use crate::wire::{Body, ContractRef, ErrorCode, ListFlavours, Message, PeerRequest};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// FLAVOURS answers buffered during one discovery (each holds at most 16 flavours).
const DISCOVERY_QUEUE: usize = 32;

/// Says in words what a selector asks for, for "no provider offers ..." errors.
pub fn describe(sel: &FlavourSelector) -> String {
    let mut parts = Vec::new();
    if let Some(a) = &sel.architecture {
        parts.push(format!("architecture {a}"));
    }
    if let Some(m) = &sel.min {
        parts.push(format!("at least {m}"));
    }
    if let Some(p) = sel.max_price {
        parts.push(format!(
            "at most {} per period",
            crate::model::price_words(p)
        ));
    }
    if parts.is_empty() {
        "any flavour".into()
    } else {
        parts.join(", ")
    }
}

fn ranked(shared: &Shared, sel: &FlavourSelector) -> Result<Vec<(Candidate, Fit)>, RearError> {
    let ttl = shared.cfg.candidate_ttl.as_millis() as u64;
    let now = unix_ms();
    let standing = |p: &Id| {
        shared
            .tables
            .rating(p)
            .ok()
            .flatten()
            .map_or(Standing::default(), |r| Standing {
                demoted: r.demoted(now),
                failures: r.failures(),
            })
    };
    Ok(rank(shared.candidates.all(), sel, now, ttl, standing))
}

/// How often a flow waiting for the domain to come back after a reconnect looks at the
/// candidates again.
const REJOIN_POLL: Duration = Duration::from_millis(200);

/// Which providers a purchase flow may still try.
#[derive(Default)]
struct Turns {
    /// Providers whose attempt is used up (refused, silent, or a bad answer).
    done: HashSet<Id>,
    /// Providers that answered FLAVOUR_GONE once, with the Unix ms of the refusal: only
    /// their candidates heard of after it are eligible.
    gone_at: HashMap<Id, u64>,
}

impl Turns {
    fn eligible(&self, c: &Candidate) -> bool {
        let p = &c.flavour.provider;
        !self.done.contains(p) && self.gone_at.get(p).is_none_or(|t| c.seen_at > *t)
    }

    /// Records how `provider`'s attempt, asked at `asked_at`, ended at `now` (Unix ms); true
    /// when it lied (to be demoted). `revision` is the protocol revision the provider
    /// advertised: one before 1 answers NO_FIT for a superseded id whose piece no longer fits
    /// (docs/protocol.md section 10), so from it a first NO_FIT counts as a first
    /// FLAVOUR_GONE. `reheard`: the provider's advert came again while the request waited,
    /// so it reconnected meanwhile (a certificate rotation, a broker restart) and the request
    /// may have reached it while it was between two sessions: a first silence is then a
    /// second chance for what it advertised since the request, not a lie.
    fn ended(
        &mut self,
        provider: &Id,
        e: &RearError,
        revision: u16,
        (asked_at, now): (u64, u64),
        reheard: bool,
    ) -> bool {
        let first = !self.gone_at.contains_key(provider);
        let lied = match e {
            RearError::Refused {
                code: Some(code), ..
            } if (*code == ErrorCode::FlavourGone
                || (*code == ErrorCode::NoFit && revision < 1))
                && first =>
            {
                self.gone_at.insert(provider.clone(), now);
                return false;
            }
            RearError::Timeout(_) if reheard && first => {
                self.gone_at.insert(provider.clone(), asked_at);
                return false;
            }
            RearError::Refused {
                code: Some(ErrorCode::FlavourGone | ErrorCode::NoFit),
                ..
            }
            | RearError::Timeout(_)
            | RearError::BadAnswer(_) => true,
            _ => false,
        };
        self.done.insert(provider.clone());
        lied
    }
}

/// The whole consumer flow for one selector.
pub(crate) async fn acquire(shared: &Shared, sel: &FlavourSelector) -> Result<Contract, RearError> {
    // Without a broker, discovery would hear nothing and report "no provider offers ...",
    // which would send an operator looking in the wrong place.
    let status = shared.status.borrow().clone();
    if !status.connected {
        let why = status
            .last_error
            .unwrap_or_else(|| "not connected yet".into());
        return Err(RearError::Disconnected(why));
    }
    if status.heard == Some(false) {
        // Discovery would hear nothing and say "no provider offers ...": say why instead.
        let why = status.last_error.unwrap_or_default();
        return Err(RearError::Broker(why));
    }
    let deadline = Instant::now() + shared.cfg.acquire_budget;
    let budget_ms = shared.cfg.acquire_budget.as_millis() as u64;
    let mut turns = Turns::default();
    let mut discovered = false;
    let mut last = None;
    let mut first = true;
    loop {
        // Candidates heard before the current broker session began are from a session that
        // is gone: after an outage their provider may not be back (a RESERVE to it would be
        // lost, and its silence taken for a lie). The retained catalog, sent again on every
        // reconnect, refreshes those that are. (`min`: a clock stepped back after the
        // connect does not hide every candidate.)
        let session = shared.status.borrow().clone();
        let since = session.since_ms.min(unix_ms());
        let found: Vec<_> = ranked(shared, sel)?
            .into_iter()
            .filter(|(c, _)| turns.eligible(c) && c.seen_at >= since)
            .collect();
        if first {
            shared.step(
                5,
                "REAR Manager",
                format_args!("{} matching peering candidate(s) in the table", found.len()),
            );
            first = false;
        }
        if Instant::now() >= deadline {
            warn!(
                budget_s = shared.cfg.acquire_budget.as_secs(),
                "purchase flow out of time"
            );
            return Err(last.unwrap_or_else(|| RearError::NoProvider(describe(sel))));
        }
        let Some((cand, fit)) = found.into_iter().next() else {
            // Every candidate known before discovery failed (sold since, stale, or offered
            // by a liar): ask the domain once for what is on offer now.
            if discovered {
                // Right after a REconnect the domain may still be coming back (after a broker
                // restart every node reconnects on its own backoff): within the flow's budget
                // of it, wait for an advert instead of failing. On the first connection the
                // retained catalog is complete, and a flow nobody can serve fails at once.
                let age = unix_ms().saturating_sub(since);
                if session.connects > 1 && age < budget_ms {
                    tokio::time::sleep(REJOIN_POLL).await;
                    continue;
                }
                return Err(last.unwrap_or_else(|| RearError::NoProvider(describe(sel))));
            }
            shared.step(
                6,
                "REAR Manager",
                format_args!(
                    "no candidate: flavour selector ({}) to the Discovery Manager",
                    describe(sel)
                ),
            );
            discover(shared, sel).await?;
            discovered = true;
            let n = ranked(shared, sel)?
                .iter()
                .filter(|(c, _)| turns.eligible(c))
                .count();
            shared.step(
                12,
                "REAR Manager",
                format_args!("{n} matching peering candidate(s) after discovery"),
            );
            continue;
        };
        let provider = cand.flavour.provider.clone();
        shared.step(
            13,
            "REAR Manager",
            format_args!(
                "best candidate {} from {provider}: reservation phase to the Contract Manager",
                cand.flavour.id
            ),
        );
        let asked_at = unix_ms();
        match reserve(shared, &cand, &fit).await {
            Ok(c) => return Ok(c),
            Err(
                e @ (RearError::Refused { .. } | RearError::Timeout(_) | RearError::BadAnswer(_)),
            ) => {
                let revision = shared.candidates.revision(&provider);
                let reheard = matches!(e, RearError::Timeout(_))
                    && shared.candidates.heard_since(&provider, asked_at);
                if reheard {
                    warn!(%provider, "provider silent, but its advert came again meanwhile (it reconnected): asked once more");
                } else {
                    shared.candidates.remove(&provider, &cand.flavour.id);
                }
                if turns.ended(&provider, &e, revision, (asked_at, unix_ms()), reheard) {
                    let until =
                        unix_ms().saturating_add(shared.cfg.liar_demotion.as_millis() as u64);
                    warn!(%provider, error = %e, "provider refused or ignored what it had just offered: demoted, trying the next provider");
                    if let Err(e) = shared.tables.demote(&provider, until) {
                        warn!(error = %e, "could not record the demotion in Ratings and Metrics");
                    }
                } else {
                    warn!(%provider, error = %e, "candidate failed; trying the next");
                }
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Discovery Manager, consumer side (steps 7, 10, 11).
async fn discover(shared: &Shared, sel: &FlavourSelector) -> Result<(), RearError> {
    let (tx, mut rx) = mpsc::channel(DISCOVERY_QUEUE);
    let id = shared.next_id();
    let _guard = shared.wait_for(id, Waiter::Collect(tx))?;
    let msg = Message {
        id,
        correlation: None,
        sent_at: unix_ms(),
        sender: shared.me().clone(),
        body: Body::ListFlavours(ListFlavours {
            selector: sel.clone(),
        }),
    };
    shared
        .publish(shared.topics.my_discovery(), false, &msg)
        .await?;
    shared.step(
        7,
        "Discovery Manager",
        "LIST_FLAVOURS broadcast to the domain (through the broker, the domain's Supernode)",
    );
    let window_end = Instant::now() + shared.cfg.discovery_window;
    let mut end = window_end;
    let mut answers = 0usize;
    while let Ok(Some((from, list))) = tokio::time::timeout_at(end, rx.recv()).await {
        if let Some(f) = list.iter().find(|f| f.provider != from) {
            warn!(%from, provider = %f.provider, "FLAVOURS answer lists another node's flavour; ignored");
            continue;
        }
        let forgotten = shared.candidates.add(&from, list.iter(), unix_ms());
        if forgotten > 0 {
            warn!(%from, forgotten, limit = crate::discovery::MAX_CANDIDATES_PER_PROVIDER, "provider offers more flavours than kept per provider; the oldest were forgotten");
        }
        answers += 1;
        shared.step(
            10,
            "Discovery Manager",
            format_args!(
                "{} flavour(s) from {from} stored as peering candidates",
                list.len()
            ),
        );
        end = (Instant::now() + shared.cfg.discovery_settle).min(window_end);
    }
    shared.step(
        11,
        "Discovery Manager",
        format_args!("discovery complete: {answers} answer(s)"),
    );
    Ok(())
}

/// Contract Manager, consumer side (steps 13-14, 19-20).
async fn reserve(shared: &Shared, cand: &Candidate, fit: &Fit) -> Result<Contract, RearError> {
    let n = shared.tables.generate_id()?;
    let transaction =
        Id::new(&format!("{}.t{n}", shared.me())).map_err(|e| RearError::Broker(e.to_string()))?;
    let out = Outgoing {
        request: ReserveRequest {
            transaction,
            flavour: cand.flavour.id.clone(),
            buyer: shared.me().clone(),
            partition: fit.partition,
        },
        seller: cand.flavour.provider.clone(),
        started_at: unix_ms(),
    };
    shared.tables.begin_purchase(&out)?;
    // One attempt: a provider that does not answer within one timeout costs the flow no more.
    pursue(shared, &out, 1).await
}

/// Sends RESERVE_FLAVOUR for a recorded purchase until it is answered or `attempts` run
/// out, always under the purchase's transaction id.
///
/// The purchase record is made durable while the first request travels (not before it
/// leaves, which would add an fsync to every reservation): if this node crashes before the
/// flush, it never received an OK either, and the provider's reservation lapses at expiry.
async fn pursue(shared: &Shared, out: &Outgoing, attempts: u32) -> Result<Contract, RearError> {
    let (provider, request) = (&out.seller, &out.request);
    let started = Instant::now();
    for attempt in 1..=attempts.max(1) {
        let (_guard, rx, msg) =
            new_request(shared, provider, Body::ReserveFlavour(request.clone()))?;
        let send = shared.publish(shared.topics.to(provider), false, &msg);
        if attempt == 1 {
            let (flushed, sent) = tokio::join!(shared.tables.flush(), send);
            flushed?;
            sent?;
        } else {
            send.await?;
        }
        shared.step(
            14,
            "Contract Manager",
            format_args!(
                "RESERVE_FLAVOUR sent to {provider} (transaction {}, attempt {attempt})",
                request.transaction
            ),
        );
        let answer = match tokio::time::timeout(shared.cfg.reserve_timeout, rx).await {
            Ok(Ok(body)) => body,
            _ => continue,
        };
        return finish(shared, provider, request, answer, started.elapsed()).await;
    }
    shared.tables.abandon_purchase(&request.transaction)?;
    shared.tables.rate(provider, false, 0)?;
    Err(RearError::Timeout(provider.to_string()))
}

/// Finishes the purchases a previous run of this node left in flight (it stopped between
/// sending RESERVE_FLAVOUR and storing the answer): asks again under the same transaction
/// ids, so a reservation the provider made is recovered rather than left to lapse.
pub(crate) async fn resume(shared: &Shared) {
    let pending = match shared.tables.purchases_in_flight() {
        Ok(p) => p,
        Err(e) => return warn!(error = %e, "cannot read purchases in flight"),
    };
    for out in pending {
        let tx = &out.request.transaction;
        info!(%tx, seller = %out.seller, "resuming a purchase left in flight");
        match pursue(shared, &out, shared.cfg.reserve_attempts).await {
            Ok(c) => info!(contract = %c.id, %tx, "purchase recovered"),
            Err(e) => warn!(%tx, error = %e, "purchase in flight abandoned"),
        }
    }
}

async fn finish(
    shared: &Shared,
    provider: &Id,
    request: &ReserveRequest,
    answer: Body,
    took: Duration,
) -> Result<Contract, RearError> {
    match answer {
        Body::Reserved(c) => {
            if let Err(e) = check_answer(&c, provider, request) {
                shared.tables.abandon_purchase(&request.transaction)?;
                shared.tables.rate(provider, false, 0)?;
                return Err(e.into());
            }
            shared.tables.complete_purchase(&c, unix_ms()).await?;
            shared
                .tables
                .rate(provider, true, took.as_millis() as u64)?;
            shared.step(
                19,
                "Contract Manager",
                format_args!("contract {} stored; resources reserved at {provider}", c.id),
            );
            shared.step(19, "Network Manager", NETWORK_NOTE);
            shared.step(
                20,
                "REAR Manager",
                format_args!("VirtualNode allocation {} created, inactive", c.id),
            );
            info!(contract = %c.id, %provider, ms = took.as_millis() as u64, "flavour reserved");
            Ok(*c)
        }
        Body::Error(e) => {
            shared.tables.abandon_purchase(&request.transaction)?;
            shared.tables.rate(provider, false, 0)?;
            Err(RearError::Refused {
                provider: provider.to_string(),
                code: e.code(),
                text: e.text.to_string(),
            })
        }
        other => Err(RearError::Refused {
            provider: provider.to_string(),
            code: None,
            text: format!("answered {} to RESERVE_FLAVOUR", other.kind()),
        }),
    }
}

/// A request for `to` under a fresh message id, with the waiter for its one answer
/// registered (and removed when the guard drops).
fn new_request<'a>(
    shared: &'a Shared,
    to: &Id,
    body: Body,
) -> Result<
    (
        crate::shared::PendingGuard<'a>,
        oneshot::Receiver<Body>,
        Message,
    ),
    RearError,
> {
    let id = shared.next_id();
    let (tx, rx) = oneshot::channel();
    let guard = shared.wait_for(
        id,
        Waiter::Reply {
            from: to.clone(),
            tx,
        },
    )?;
    let msg = Message {
        id,
        correlation: None,
        sent_at: unix_ms(),
        sender: shared.me().clone(),
        body,
    };
    Ok((guard, rx, msg))
}

/// Sends `body` to `to` and waits for the answer, resending it every `timeout` up to the
/// configured attempts, always under the same message id: an answer to any of the sends is
/// taken, and a receiver still working on the first (a provider's peering grant) recognises
/// the resend. The request must be idempotent on the receiving side (all of REAR's are).
pub(crate) async fn ask(
    shared: &Shared,
    to: &Id,
    body: Body,
    timeout: Duration,
) -> Result<Body, RearError> {
    let (_guard, mut rx, msg) = new_request(shared, to, body)?;
    for _ in 0..shared.cfg.reserve_attempts.max(1) {
        shared.publish(shared.topics.to(to), false, &msg).await?;
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    Err(RearError::Timeout(to.to_string()))
}

fn refused(provider: &Id, e: &crate::wire::ErrorBody) -> RearError {
    RearError::Refused {
        provider: provider.to_string(),
        code: e.code(),
        text: e.text.to_string(),
    }
}

/// Attempts of the fabric's peering set-up, and the pause before the first retry (doubled
/// each time): a kubectl that fails or hangs is rolled back and tried again.
pub const PEERING_ATTEMPTS: u32 = 3;
const PEERING_BACKOFF: Duration = Duration::from_millis(500);

/// Peering phase, consumer side (workflow steps 21-22, 26-28): asks the seller for the
/// peering artefacts, sets the peering up through the Virtual Fabric Manager, and marks the
/// contract and the VirtualNode allocation active. Returns the virtual node's name.
pub(crate) async fn peer(shared: &Shared, contract: &Contract) -> Result<String, RearError> {
    let started = Instant::now();
    let outcome = peer_inner(shared, contract).await;
    let ms = started.elapsed().as_millis() as u64;
    if let Err(e) = shared
        .tables
        .rate_peering(&contract.seller, outcome.is_ok(), ms)
    {
        warn!(error = %e, "could not record the peering in Ratings and Metrics");
    }
    outcome
}

async fn peer_inner(shared: &Shared, contract: &Contract) -> Result<String, RearError> {
    // One key for the whole exchange: a certificate rotated meanwhile does not open a grant
    // sealed to the certificate this request carried.
    let keys = shared.sealing();
    let seller = &contract.seller;
    shared.step(
        21,
        "REAR Manager",
        format_args!(
            "contract {}: peering phase to the Virtual Fabric Manager",
            contract.id
        ),
    );
    let cluster_id = shared.fabric.cluster_id().await?;
    let version = shared.fabric.liqo_version().await?;
    let request = Body::PeerRequest(PeerRequest {
        contract: contract.id.clone(),
        cluster_id: cluster_id.clone(),
        liqo_version: crate::model::Text::new(&version).ok(),
        // On a TLS domain: the certificate the seller seals the identity to.
        certificate: keys
            .as_ref()
            .and_then(|k| crate::wire::Bytes::new(&k.certificate).ok()),
    });
    shared.step(
        22,
        "Virtual Fabric Manager",
        format_args!(
            "peering request (Liqo ResourceRequest) for {} sent to {seller}, cluster {cluster_id}",
            contract.id
        ),
    );
    // The seller's grant runs `liqoctl generate peering-user`, which waits for its CSR to be
    // signed: the request gets the fabric's peering request timeout in all, not the
    // reservation's, resent under the same id in between (the seller joins a resend to the
    // grant in progress).
    let total = shared.fabric.peer_request_timeout();
    let every = total / shared.cfg.reserve_attempts.max(1);
    let answer = match ask(shared, seller, request, every).await {
        Err(RearError::Timeout(_)) => {
            return Err(RearError::Refused {
                provider: seller.to_string(),
                code: None,
                text: format!(
                    "no answer to PEER_REQUEST within {} s (fabric.peer_request_timeout_secs)",
                    total.as_secs()
                ),
            })
        }
        other => other?,
    };
    let grant = match answer {
        Body::PeerAccept(g) if g.contract == contract.id => g,
        Body::Error(e) => return Err(refused(seller, &e)),
        other => {
            return Err(RearError::Refused {
                provider: seller.to_string(),
                code: None,
                text: format!("answered {} to PEER_REQUEST", other.kind()),
            })
        }
    };
    shared.step(
        26,
        "Virtual Fabric Manager",
        format_args!(
            "peering accepted by {seller} (Liqo ResourceOffer), provider cluster {}",
            grant.cluster_id
        ),
    );
    if let Err(text) = crate::fabric::check_accept(&grant, &version) {
        return Err(RearError::Refused {
            provider: seller.to_string(),
            code: Some(crate::wire::ErrorCode::PeeringFailed),
            text,
        });
    }
    let ctx = crate::seal::Context {
        contract: &contract.id,
        provider: seller,
        buyer: shared.me(),
    };
    let opened =
        crate::seal::receive(keys.as_deref(), &ctx, &grant).map_err(|e| RearError::Refused {
            provider: seller.to_string(),
            code: None,
            text: e.to_string(),
        })?;
    // Kept (without the identity, which goes to an owner-only file) for the teardown.
    shared.tables.put_peer_grant(&crate::wire::PeerAccept {
        identity: None,
        sealed: None,
        ..grant.clone()
    })?;
    let identity = match opened {
        Some(kubeconfig) => {
            let path = shared.fabric.identity_path(&grant.cluster_id);
            let file = crate::fabric::Action::File {
                what: "the provider's peering identity".into(),
                path: path.clone(),
                contents: kubeconfig,
                private: true,
            };
            shared.fabric.execute(contract.id.as_str(), &[file]).await?;
            Some(path)
        }
        None => None,
    };
    let plan = shared
        .fabric
        .plan_establish(contract, &grant.cluster_id, identity.as_deref());
    let mut pause = PEERING_BACKOFF;
    let mut attempt = 1;
    loop {
        match shared.fabric.execute(contract.id.as_str(), &plan).await {
            Ok(_) => break,
            Err(e) if attempt < PEERING_ATTEMPTS => {
                warn!(contract = %contract.id, attempt, error = %e, "peering failed; rolling back and retrying");
                let undo = crate::fabric::plan_teardown_consumer(
                    contract,
                    &grant.cluster_id,
                    None,
                    false,
                    shared.fabric.ready_timeout(),
                );
                if let Err(e) = shared.fabric.execute(contract.id.as_str(), &undo).await {
                    warn!(contract = %contract.id, error = %e, "rollback failed");
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let node = crate::fabric::virtual_node_name(&contract.id);
    shared.step(
        27,
        "Virtual Fabric Manager",
        format_args!("virtual node {node} ready; REAR Manager informed"),
    );
    shared.tables.activate(&contract.id, unix_ms()).await?;
    shared.step(
        28,
        "REAR Manager",
        format_args!("VirtualNode allocation {} active", contract.id),
    );
    Ok(node)
}

/// Releases a contract this node bought: tears its peering down, tells the seller (RELEASE,
/// answered by RELEASED once the seller restored its capacity) and marks it released here.
/// When the seller does not answer, the contract is released here anyway and the error says
/// so: the seller keeps the capacity until its operator releases it.
pub(crate) async fn release(shared: &Shared, contract: &Id) -> Result<Contract, RearError> {
    let Some(c) = shared.tables.contract(contract)? else {
        return Err(RearError::NoContract(contract.to_string()));
    };
    if &c.buyer != shared.me() {
        return Err(RearError::SoldHere(contract.to_string()));
    }
    teardown_bought(shared, &c).await;
    let answer = ask(
        shared,
        &c.seller,
        Body::Release(ContractRef {
            contract: contract.clone(),
        }),
        shared.cfg.reserve_timeout,
    )
    .await;
    let ended = shared
        .tables
        .end_contract(contract, ContractState::Released, unix_ms())
        .await?;
    info!(%contract, "contract released");
    match answer {
        Ok(Body::Released(_)) => Ok(ended.unwrap_or(c)),
        Ok(Body::Error(e)) => Err(refused(&c.seller, &e)),
        Ok(other) => Err(RearError::Refused {
            provider: c.seller.to_string(),
            code: None,
            text: format!("answered {} to RELEASE", other.kind()),
        }),
        Err(e) => Err(e),
    }
}

/// Removes the fabric objects of a bought contract (best effort: a failure is logged). The
/// whole peering goes only when no other live contract uses it ([`Shared::peering_in_use`]);
/// when that cannot be read, only the contract's own ResourceSlice goes. True when the
/// contract was peered and its teardown succeeded.
pub(crate) async fn teardown_bought(shared: &Shared, c: &Contract) -> bool {
    let Ok(Some(grant)) = shared.tables.peer_grant(&c.id) else {
        return false;
    };
    let last = match shared.peering_in_use(c) {
        Ok(in_use) => !in_use,
        Err(e) => {
            error!(contract = %c.id, error = %e, "cannot read contracts; the peering is kept");
            false
        }
    };
    let identity = shared.fabric.identity_path(&grant.cluster_id);
    let plan = crate::fabric::plan_teardown_consumer(
        c,
        &grant.cluster_id,
        Some(&identity),
        last,
        shared.fabric.ready_timeout(),
    );
    match shared.fabric.execute(c.id.as_str(), &plan).await {
        Ok(_) => true,
        Err(e) => {
            warn!(contract = %c.id, error = %e, "peering teardown failed");
            false
        }
    }
}

/// A bought contract that ended by expiry (here, or as the seller said): its side is torn
/// down, then, if it was peered and the teardown succeeded, the seller is sent RELEASE for it
/// (not waited for), which tells it this side has unpeered and it may delete the peering user
/// now rather than after its grace. (A seller whose clock is behind still holds the contract
/// live: it releases it. It answers RELEASED, or NO_CONTRACT once it has forgotten the
/// contract.)
pub(crate) async fn expired_bought(shared: &Shared, c: &Contract) {
    if !teardown_bought(shared, c).await {
        return;
    }
    let body = Body::Release(ContractRef {
        contract: c.id.clone(),
    });
    if let Err(e) = shared.send(&c.seller, None, body).await {
        warn!(contract = %c.id, seller = %c.seller, error = %e, "could not tell the seller the peering is gone");
    }
}

/// Buyer side: renews every live contract this node bought once half of its term is left, or
/// two `expiry_check`s and one `reserve_timeout`, whichever is longer (checked every
/// `expiry_check`). A seller that answers NO_CONTRACT has ended it: it ends
/// here too. A seller that does not answer is asked again at the next check; if `ends_at`
/// passes first, the expiry sweeper ends the contract here.
pub(crate) async fn keep_renewed(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.cfg.expiry_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Cancel safety: a tick has no state; a renewal in progress finishes before the next
        // select!.
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = unix_ms();
        // Never less than two checks and an answer's wait: a short term must not slip
        // between two checks.
        let margin = (2 * shared.cfg.expiry_check + shared.cfg.reserve_timeout).as_millis() as u64;
        // One contract decoded at a time, and none of this node's sales (skipped by their
        // ids): this runs every `expiry_check` on every node, and a provider holds thousands.
        let mut due: Vec<Contract> = Vec::new();
        let read = shared.tables.each_bought(shared.me(), |c| {
            if renewal_due(&c, shared.me(), now, margin) {
                due.push(c);
            }
        });
        if let Err(e) = read {
            error!(error = %e, "cannot read contracts for renewal");
            continue;
        }
        for c in due {
            renew(&shared, &c).await;
        }
    }
}

/// Whether contract `c` is due for RENEW by its buyer `me` at `now` (Unix ms): a live
/// contract (Reserved or Active) with a term, not yet past its end, with half its term or
/// `margin_ms` left, whichever is longer.
fn renewal_due(c: &Contract, me: &Id, now: u64, margin_ms: u64) -> bool {
    &c.buyer == me
        && matches!(c.state, ContractState::Reserved | ContractState::Active)
        && matches!((c.term_ms, c.ends_at), (Some(t), Some(e)) if now.saturating_add((t / 2).max(margin_ms)) >= e && now < e)
}

/// Sends RENEW for one bought contract and records the answer.
async fn renew(shared: &Shared, c: &Contract) {
    let body = Body::Renew(ContractRef {
        contract: c.id.clone(),
    });
    match ask(shared, &c.seller, body, shared.cfg.reserve_timeout).await {
        Ok(Body::Renewed(r)) if r.id == c.id && r.seller == c.seller && &r.buyer == shared.me() => {
            if let Some(end) = r.ends_at {
                if let Err(e) = shared.tables.extend(&c.id, end).await {
                    error!(contract = %c.id, error = %e, "renewal not stored");
                }
            }
        }
        Ok(Body::Error(e)) if e.code() == Some(ErrorCode::NoContract) => {
            warn!(contract = %c.id, seller = %c.seller, text = %e.text, "seller ended the contract");
            match shared
                .tables
                .end_contract(&c.id, ContractState::Expired, unix_ms())
                .await
            {
                Ok(Some(_)) => expired_bought(shared, c).await,
                Ok(None) => {}
                Err(e) => error!(contract = %c.id, error = %e, "expiry failed"),
            }
        }
        Ok(other) => {
            warn!(contract = %c.id, answer = %other.kind(), "unexpected answer to RENEW")
        }
        Err(RearError::Timeout(_)) => {
            warn!(contract = %c.id, seller = %c.seller, "RENEW not answered; retrying")
        }
        Err(e) => warn!(contract = %c.id, error = %e, "RENEW failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_contract, Resources};

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    fn refused(code: ErrorCode) -> RearError {
        RearError::Refused {
            provider: "p".into(),
            code: Some(code),
            text: String::new(),
        }
    }

    fn candidate(provider: &str, seen_at: u64) -> Candidate {
        let mut c = test_contract(
            "x.c1",
            provider,
            "me",
            Resources::default(),
            ContractState::Reserved,
        );
        c.flavour.provider = id(provider);
        Candidate {
            flavour: c.flavour,
            seen_at,
        }
    }

    #[test]
    fn a_first_flavour_gone_is_a_second_chance_for_candidates_heard_after_it() {
        let mut turns = Turns::default();
        let p = id("p");
        assert!(!turns.ended(&p, &refused(ErrorCode::FlavourGone), 1, (0, 1_000), false));
        // Sold in the meantime: what was heard before the refusal is stale, what came after
        // is not.
        assert!(!turns.eligible(&candidate("p", 900)));
        assert!(!turns.eligible(&candidate("p", 1_000)));
        assert!(turns.eligible(&candidate("p", 1_001)));
        // Gone again for a flavour it has just advertised: a liar, and done.
        assert!(turns.ended(&p, &refused(ErrorCode::FlavourGone), 1, (0, 2_000), false));
        assert!(!turns.eligible(&candidate("p", 3_000)));
    }

    #[test]
    fn no_fit_is_a_lie_from_a_current_provider_and_a_first_gone_from_a_revision_0_one() {
        let mut turns = Turns::default();
        assert!(turns.ended(&id("new"), &refused(ErrorCode::NoFit), 1, (0, 10), false));
        assert!(!turns.ended(&id("old"), &refused(ErrorCode::NoFit), 0, (0, 10), false));
        assert!(turns.eligible(&candidate("old", 11)));
        assert!(turns.ended(&id("old"), &refused(ErrorCode::NoFit), 0, (0, 20), false));
    }

    #[test]
    fn silence_and_bad_answers_are_lies_other_refusals_only_end_the_turn() {
        let mut turns = Turns::default();
        assert!(turns.ended(&id("a"), &RearError::Timeout("a".into()), 1, (0, 0), false));
        for (p, code) in [
            ("b", ErrorCode::ShareExceeded),
            ("c", ErrorCode::TooManyPending),
            ("d", ErrorCode::Busy),
            ("e", ErrorCode::Storage),
        ] {
            assert!(
                !turns.ended(&id(p), &refused(code), 1, (0, 0), false),
                "{code:?}"
            );
            assert!(
                !turns.eligible(&candidate(p, 1)),
                "{code:?} ends {p}'s turn"
            );
        }
        assert!(!turns.eligible(&candidate("a", 1)));
        assert!(turns.eligible(&candidate("f", 0)), "others keep their turn");
    }

    #[test]
    fn a_silence_while_the_provider_reconnected_is_a_second_chance_not_a_lie() {
        let mut turns = Turns::default();
        let p = id("p");
        let timeout = RearError::Timeout("p".into());
        // Asked at 1_000, silent until 1_500, its advert heard again meanwhile (1_200).
        assert!(!turns.ended(&p, &timeout, 1, (1_000, 1_500), true));
        assert!(
            !turns.eligible(&candidate("p", 1_000)),
            "what it said before the request"
        );
        assert!(
            turns.eligible(&candidate("p", 1_200)),
            "what it advertised since"
        );
        // Silent a second time: a liar, reconnects or not.
        assert!(turns.ended(&p, &timeout, 1, (2_000, 2_500), true));
        assert!(!turns.eligible(&candidate("p", 3_000)));
        // A silence with no advert meanwhile is a lie at once.
        let mut turns = Turns::default();
        assert!(turns.ended(&p, &timeout, 1, (1_000, 1_500), false));
    }

    fn bought(term_ms: Option<u64>, ends_at: Option<u64>, state: ContractState) -> Contract {
        let mut c = test_contract("s.c1", "s", "me", Resources::default(), state);
        c.term_ms = term_ms;
        c.ends_at = ends_at;
        c
    }

    #[test]
    fn renewal_is_due_with_half_the_term_left_or_the_margin_for_short_terms() {
        let me = id("me");
        let c = bought(Some(10_000), Some(20_000), ContractState::Active);
        assert!(
            !renewal_due(&c, &me, 14_999, 1_000),
            "more than half the term left"
        );
        assert!(renewal_due(&c, &me, 15_000, 1_000), "half the term left");
        assert!(renewal_due(&c, &me, 19_999, 1_000));
        assert!(
            !renewal_due(&c, &me, 20_000, 1_000),
            "past its end: the sweeper ends it"
        );
        // A term shorter than two checks and a wait: renewed from the margin on.
        let short = bought(Some(1_000), Some(20_000), ContractState::Reserved);
        assert!(!renewal_due(&short, &me, 16_999, 3_000));
        assert!(renewal_due(&short, &me, 17_000, 3_000));
    }

    #[test]
    fn only_a_live_contract_with_a_term_that_this_node_bought_is_renewed() {
        let me = id("me");
        for state in [ContractState::Released, ContractState::Expired] {
            assert!(!renewal_due(&bought(Some(10), Some(20), state), &me, 19, 0));
        }
        assert!(!renewal_due(
            &bought(None, None, ContractState::Active),
            &me,
            19,
            0
        ));
        let sold = bought(Some(10), Some(20), ContractState::Active);
        assert!(!renewal_due(&sold, &id("someone-else"), 19, 0));
    }
}
