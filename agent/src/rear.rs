//! REAR Manager, consumer side: from a flavour selector to a durable contract (workflow
//! steps 5-20).
//!
//! The phases, in order: look up fresh Peering Candidates (5); if none matches, hand the
//! selector to the Discovery Manager, which broadcasts LIST_FLAVOURS and stores every
//! FLAVOURS answer as candidates until the discovery window closes (6-11); look again (12);
//! then ask the Contract Manager to reserve the best candidate (13-14) and store the
//! contract and a VirtualNode allocation when RESERVED comes back (19-20).
//!
//! Retries reuse the transaction id, so a RESERVED lost on the way back is recovered by
//! asking again and never reserves twice (the provider answers a repeated id with its first
//! answer). A refusal drops that candidate and moves to the next one; after
//! [`MAX_TRIED`] candidates the flow gives up with the last reason.

use crate::contracts::{check_answer, BadAnswer};
use crate::discovery::{rank, Fit};
use crate::model::{Candidate, Contract, FlavourSelector, Id, ReserveRequest};
use crate::node::{Shared, Waiter};
use crate::tables::{Outgoing, TableError};
use crate::unix_ms;
use crate::wire::{Body, ErrorCode, ListFlavours, Message, WireError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

/// Candidates tried for one selector before giving up.
pub const MAX_TRIED: usize = 3;
/// FLAVOURS answers buffered during one discovery (each holds at most 16 flavours).
const DISCOVERY_QUEUE: usize = 32;

/// Why a consumer flow ended without a contract.
#[derive(Debug, thiserror::Error)]
pub enum RearError {
    #[error("no provider offers {0}")]
    NoProvider(String),
    #[error("provider {provider} refused: {text} ({code:?})")]
    Refused {
        provider: String,
        code: Option<ErrorCode>,
        text: String,
    },
    #[error("provider {0} did not answer RESERVE_FLAVOUR in time")]
    Timeout(String),
    #[error(transparent)]
    BadAnswer(#[from] BadAnswer),
    #[error("too many requests in flight; try again")]
    Busy,
    #[error("broker: {0}")]
    Broker(String),
    #[error("not connected to the domain broker ({0})")]
    Disconnected(String),
    #[error("the MQTT client could not queue a message in time (broker unreachable?)")]
    PublishTimeout,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Says in words what a selector asks for, for "no provider offers ..." errors.
pub fn describe(sel: &FlavourSelector) -> String {
    let mut parts = Vec::new();
    if let Some(a) = &sel.architecture {
        parts.push(format!("architecture {a}"));
    }
    if let Some(m) = &sel.min {
        parts.push(format!(
            "at least {}m cpu, {} MiB memory, {} pods",
            m.cpu,
            m.memory >> 20,
            m.pods
        ));
    }
    if let Some(p) = sel.max_price {
        parts.push(format!("at most {p} (millionths) per period"));
    }
    if parts.is_empty() {
        "any flavour".into()
    } else {
        parts.join(", ")
    }
}

fn ranked(shared: &Shared, sel: &FlavourSelector) -> Result<Vec<(Candidate, Fit)>, RearError> {
    let ttl = shared.cfg.candidate_ttl.as_millis() as u64;
    Ok(rank(shared.tables.candidates()?, sel, unix_ms(), ttl))
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
    let mut found = ranked(shared, sel)?;
    shared.step(
        5,
        "REAR Manager",
        format!("{} matching peering candidate(s) in the table", found.len()),
    );
    if found.is_empty() {
        shared.step(
            6,
            "REAR Manager",
            format!(
                "no candidate: flavour selector ({}) to the Discovery Manager",
                describe(sel)
            ),
        );
        discover(shared, sel).await?;
        found = ranked(shared, sel)?;
        shared.step(
            12,
            "REAR Manager",
            format!(
                "{} matching peering candidate(s) after discovery",
                found.len()
            ),
        );
    }
    if found.is_empty() {
        return Err(RearError::NoProvider(describe(sel)));
    }
    let mut last = None;
    for (cand, fit) in found.into_iter().take(MAX_TRIED) {
        shared.step(
            13,
            "REAR Manager",
            format!(
                "best candidate {} from {}: reservation phase to the Contract Manager",
                cand.flavour.id, cand.flavour.provider
            ),
        );
        match reserve(shared, &cand, &fit).await {
            Ok(c) => return Ok(c),
            Err(
                e @ (RearError::Refused { .. } | RearError::Timeout(_) | RearError::BadAnswer(_)),
            ) => {
                warn!(provider = %cand.flavour.provider, error = %e, "candidate failed; trying the next");
                let _ = shared
                    .tables
                    .remove_candidate(&cand.flavour.provider, &cand.flavour.id);
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| RearError::NoProvider(describe(sel))))
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
        let flavours: Vec<_> = list.iter().cloned().collect();
        for f in &flavours {
            // Add, do not replace: an answer lists only what matched this selector.
            shared.tables.replace_candidate(f, unix_ms())?;
        }
        answers += 1;
        shared.step(
            10,
            "Discovery Manager",
            format!(
                "{} flavour(s) from {from} stored as peering candidates",
                flavours.len()
            ),
        );
        end = (Instant::now() + shared.cfg.discovery_settle).min(window_end);
    }
    shared.step(
        11,
        "Discovery Manager",
        format!("discovery complete: {answers} answer(s)"),
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
    pursue(shared, &out).await
}

/// Sends RESERVE_FLAVOUR for a recorded purchase until it is answered or the attempts run
/// out, always under the purchase's transaction id.
///
/// The purchase record is made durable while the first request travels (not before it
/// leaves, which would add an fsync to every reservation): if this node crashes before the
/// flush, it never received an OK either, and the provider's reservation lapses at expiry.
async fn pursue(shared: &Shared, out: &Outgoing) -> Result<Contract, RearError> {
    let (provider, request) = (&out.seller, &out.request);
    let started = Instant::now();
    for attempt in 1..=shared.cfg.reserve_attempts {
        let id = shared.next_id();
        let (tx, rx) = oneshot::channel();
        let _guard = shared.wait_for(
            id,
            Waiter::Reply {
                from: provider.clone(),
                tx,
            },
        )?;
        let msg = Message {
            id,
            correlation: None,
            sent_at: unix_ms(),
            sender: shared.me().clone(),
            body: Body::ReserveFlavour(request.clone()),
        };
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
            format!(
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
        match pursue(shared, &out).await {
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
                format!("contract {} stored; resources reserved at {provider}", c.id),
            );
            shared.step(
                20,
                "REAR Manager",
                format!("VirtualNode allocation {} created, inactive", c.id),
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
            text: format!("answered {:?} to RESERVE_FLAVOUR", other.kind()),
        }),
    }
}
