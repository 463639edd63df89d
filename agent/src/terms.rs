//! Contract terms against hoarding: a provider caps the share of an offer one buyer may hold
//! (`[offer] max_per_buyer`, percent of the offer's total, each resource), and contracts have
//! a term (`[offer] contract_term_secs`, carried in the contract as `term_ms` and `ends_at`):
//! a contract its buyer does not RENEW before `ends_at` ends as Expired on both sides and its
//! capacity goes back on offer, so an abandoned contract cannot hold capacity forever.
//!
//! Provider side: [`sale_terms`] (the cap and the term an offer is sold under, which the
//! tables apply to each RESERVE_FLAVOUR: [`crate::tables::Tables::reserve_batch`]), [`on_renew`]
//! (RENEW, answered RENEWED with the contract), [`expired_sold`] (the peering user of a
//! contract that ran out). Buyer side: [`crate::rear::consumer::keep_renewed`] renews every live contract it bought
//! when half of its term is left (sooner for very short terms).

use crate::config::Config;
use crate::model::{Contract, Id};
use crate::shared::Shared;
use crate::tables::SaleTerms;
use crate::unix_ms;
use crate::wire::{Body, ContractRef, ErrorBody, ErrorCode};
use tracing::{error, info, warn};

/// The share cap and contract term offer `offer` is sold under, as the tables record them
/// (a change of either is a change of terms for superseded flavour ids).
pub(crate) fn sale_terms(cfg: &Config, offer: &crate::model::Id) -> SaleTerms {
    let (max_per_buyer, term) = cfg.terms_of(offer);
    SaleTerms {
        max_per_buyer,
        term_ms: u64::try_from(term.as_millis()).unwrap_or(u64::MAX),
    }
}

async fn answer(shared: &Shared, to: &Id, id: u64, body: Body) {
    if let Err(e) = shared.send(to, Some(id), body).await {
        warn!(%to, error = %e, "could not answer RENEW");
    }
}

/// RENEW from `from`: only the buyer of a live contract this node sold may renew it; the
/// answer is RENEWED with the contract and its new `ends_at` (see [`crate::tables::Tables::renew`]).
pub(crate) async fn on_renew(shared: &Shared, from: &Id, id: u64, r: ContractRef) {
    let refuse = |text: String| Body::Error(ErrorBody::new(ErrorCode::NoContract, &text));
    let sold = match shared.tables.contract(&r.contract) {
        Ok(Some(c)) if &c.seller == shared.me() && &c.buyer == from => c,
        Ok(_) => {
            warn!(%from, contract = %r.contract, "RENEW refused: not the buyer");
            let text = format!("no contract {} sold to {from}", r.contract);
            return answer(shared, from, id, refuse(text)).await;
        }
        Err(e) => {
            error!(error = %e, "cannot read contracts");
            let body = Body::Error(ErrorBody::new(ErrorCode::Storage, "cannot read contracts"));
            return answer(shared, from, id, body).await;
        }
    };
    match shared.tables.renew(&sold.id, unix_ms()).await {
        Ok(Some(c)) => {
            let until = c
                .ends_at
                .map_or("no end".to_owned(), crate::model::date_words);
            info!(contract = %c.id, buyer = %from, "contract renewed until {until}");
            answer(shared, from, id, Body::Renewed(Box::new(c))).await
        }
        Ok(None) => {
            let text = format!(
                "contract {} has ended ({}, or its term ran out): it cannot be renewed",
                sold.id, sold.state
            );
            answer(shared, from, id, refuse(text)).await
        }
        Err(e) => {
            error!(contract = %sold.id, error = %e, "renewal not stored");
            let body = Body::Error(ErrorBody::new(
                ErrorCode::Storage,
                "could not store the renewal",
            ));
            answer(shared, from, id, body).await
        }
    }
}

/// Provider side of a contract that ran out (its reservation lapsed, or its term ended
/// unrenewed): the buyer's peering user is deleted, by [`teardown_sold`]'s rule, only after
/// `fabric.teardown_grace`. Both sides expire a contract on their own clocks, and the
/// buyer's `liqoctl unpeer` fails at its first call to this cluster once the user is gone,
/// leaving both sides as they were; so the buyer unpeers first and then RELEASEs the expired
/// contract, which ends the wait at once ([`crate::rear::provider`]'s `on_release`). The
/// grace only bounds how long a buyer that never says so keeps its credentials. (A restart
/// forgets the wait; the buyer's next grant deletes the user it left, see `plan_grant`.)
pub(crate) async fn expired_sold(shared: &std::sync::Arc<Shared>, c: &Contract) {
    let Ok(Some(cluster)) = shared.tables.peer_cluster(&c.id) else {
        return;
    };
    // One waiting task per consumer cluster: the rule is the same for every contract of it.
    {
        let mut waiting = shared.teardowns.lock().unwrap_or_else(|p| p.into_inner());
        if !waiting.insert(cluster.clone()) {
            return;
        }
    }
    let sh = shared.clone();
    let c = c.clone();
    shared.own_until_stop(async move {
        let shared = sh;
        tokio::time::sleep(shared.fabric.teardown_grace()).await;
        shared
            .teardowns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cluster);
        teardown_sold(&shared, &c).await;
    });
}

/// Provider: deletes the peering user of the consumer cluster `c` was granted to, unless
/// another live contract of that buyer uses the peering ([`Shared::peering_in_use`], the one
/// rule) or a grant for that cluster is in progress (the grant decides, and removes a user
/// left over itself). A table that cannot be read keeps the user: better a user kept too
/// long than a peering in use torn down.
pub(crate) async fn teardown_sold(shared: &Shared, c: &Contract) {
    let cluster = match shared.tables.peer_cluster(&c.id) {
        Ok(Some(cluster)) => cluster,
        Ok(None) => return,
        Err(e) => {
            error!(contract = %c.id, error = %e, "cannot read the peering; its user is kept");
            return;
        }
    };
    match shared.peering_in_use(c) {
        Ok(false) => {}
        Ok(true) => return,
        Err(e) => {
            error!(contract = %c.id, error = %e, "cannot read contracts; the peering user is kept");
            return;
        }
    }
    let granting = shared
        .flights
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&cluster);
    if granting {
        return;
    }
    let plan = crate::fabric::plan_teardown_provider(&cluster, true);
    if let Err(e) = shared.fabric.execute(c.id.as_str(), &plan).await {
        warn!(contract = %c.id, error = %e, "peering teardown failed");
    }
}
