//! The ledger's records and the writer's state: what a provider must know to decide a
//! RESERVE_FLAVOUR, and the indexes that find contracts by transaction and by deadline, held
//! in memory and rebuilt from the records at open.
//!
//! Why in memory: every change of the ledger is made by one writer (the tables' writer lock;
//! the node task also hands it reservations in groups), and what a decision reads is small
//! and changes only through that writer: the configured offers (at most
//! [`crate::config::MAX_OFFERS`]), the flavour on offer of each, the terms each offer's
//! flavour ids were issued under, what each buyer holds of each offer (the share cap) and how
//! many unpeered reservations each buyer holds (the pending limit). Reading these from sled
//! inside a multi-tree transaction was 97% of a reservation's cost (issue 15's profile).
//!
//! The two indexes are derived from the contract records, so they are not stored: every key
//! sled stores costs about 20,000 instructions to insert and more to split and consolidate
//! (docs/benchmarks.md), and a reservation that wrote a transaction record and deadline
//! entries beside its contract paid that four times over. The transaction index maps a
//! hash of (buyer, transaction) to the contract it yielded (a hit is checked against the
//! record, so a hash collision costs a read, never a wrong answer); the deadline index holds,
//! for each contract, the one time something is due for it. Both cost about 100 bytes per
//! contract kept (live, or ended and within its retention), and are rebuilt at open by one
//! scan of the records ([`Ledger::load`]): a crash loses nothing of them.
//!
//! The decisions ([`Ledger::reserve`], [`Ledger::end`]) take `now` and the ids they may issue
//! as arguments, change the state as the write will, and put the write into the caller's
//! batch. The caller applies the batch in one `apply_batch` and, if that fails, reloads the
//! state from the tree: the state never runs ahead of what sled holds.

use super::codec::{dec, enc};
use super::keys;
use super::{Epoch, Reservation, TableError};
use crate::contracts::{self, Plan, Refusal};
use crate::discovery::price_of;
use crate::model::{
    Allocation, AllocationKind, AllocationStatus, Contract, ContractState, Flavour, Id, OwnFlavour,
    ReserveRequest, Resources,
};
use minicbor::{Decode, Encode};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// What the ledger keeps of a contract, under `c/{contract id}`: the contract, and its
/// allocation's side and offer, which with the contract's state make the allocation
/// ([`Record::allocation`]).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub(crate) struct Record {
    #[n(0)]
    pub contract: Contract,
    /// Node: this node sold it; VirtualNode: this node bought it.
    #[n(1)]
    pub kind: AllocationKind,
    /// A sale: the configured offer the resources were taken from.
    #[n(2)]
    pub offer: Option<Id>,
    /// Unix ms of the allocation's last status change.
    #[n(3)]
    pub updated_at: u64,
    /// An ended contract: Unix ms at which its retention ends and it is deleted (the
    /// retention configured when it ended).
    #[n(4)]
    pub kept_until: Option<u64>,
}

impl Record {
    /// The allocation of this contract (workflow steps 16, 20, 25, 28).
    pub fn allocation(&self) -> Allocation {
        let c = &self.contract;
        Allocation {
            contract: c.id.clone(),
            kind: self.kind,
            status: match c.state {
                ContractState::Reserved => AllocationStatus::Inactive,
                ContractState::Active => AllocationStatus::Active,
                ContractState::Released | ContractState::Expired => AllocationStatus::Released,
            },
            resources: c.resources,
            peer: match self.kind {
                AllocationKind::Node => c.buyer.clone(),
                AllocationKind::VirtualNode => c.seller.clone(),
            },
            updated_at: self.updated_at,
            offer: self.offer.clone(),
        }
    }

    /// When something is due for this contract, if anything: the one deadline index entry it
    /// needs. Reserved: its peering deadline, or the end of its term if that comes first
    /// (either ends it); Active: the end of its term, if it has one; ended: the end of its
    /// retention.
    pub fn due_at(&self) -> Option<u64> {
        let c = &self.contract;
        match c.state {
            ContractState::Reserved => {
                Some(c.ends_at.map_or(c.expires_at, |e| e.min(c.expires_at)))
            }
            ContractState::Active => c.ends_at,
            ContractState::Released | ContractState::Expired => self.kept_until,
        }
    }
}

/// One configured offer as the ledger holds it.
#[derive(Clone, Debug)]
pub(crate) struct Offer {
    /// The configured offer: its resources are the total.
    pub total: Flavour,
    /// The terms its flavour ids are issued under now (`None`: a record of an older format,
    /// so no superseded id is served until the offer is synced again).
    pub epoch: Option<Epoch>,
    /// The flavour on offer now; `None` when sold out.
    pub current: Option<Flavour>,
    /// What each buyer holds of it now (live sales).
    pub held: HashMap<Id, Resources>,
}

/// The writer's state (see the module's doc).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub offers: BTreeMap<Id, Offer>,
    /// Reserved (unpeered) sales per buyer.
    pub unpeered: HashMap<Id, u32>,
    /// Transaction index: hash of a sale's (buyer, transaction) -> its contract id.
    sold: HashMap<u64, Box<str>>,
    /// Sales whose hash another sale already holds in `sold` (a 64-bit collision: kept so
    /// that neither is ever sold twice).
    sold_overflow: Vec<(Box<str>, Box<str>, Box<str>)>,
    /// Deadline index: (when, contract id), one entry per contract with something due.
    due: BTreeSet<(u64, Box<str>)>,
    hasher: RandomState,
}

/// Where new numbers come from: the database's id generator (never reused, across crashes).
pub(crate) type NextId<'a> = dyn FnMut() -> Result<u64, TableError> + 'a;

pub(crate) fn is_ended(s: ContractState) -> bool {
    matches!(s, ContractState::Released | ContractState::Expired)
}

/// The flavour that offers `left` of `offer` under `id`, priced pro rata from the offer's
/// total (so the unit price stays the same however the offer is cut).
pub(crate) fn cut(offer: &Flavour, id: &Id, left: Resources) -> Flavour {
    let mut f = Flavour {
        id: id.clone(),
        resources: left,
        ..offer.clone()
    };
    f.price.amount = price_of(offer, &left);
    f
}

fn new_id(what: &'static str, base: &Id, sep: &str, n: u64) -> Result<Id, TableError> {
    Id::new(&format!("{base}{sep}{n}")).map_err(|e| TableError::Corrupt {
        tree: what,
        key: base.to_string(),
        reason: e.to_string(),
    })
}

/// `percent` of `total`, per resource: the share cap of a buyer.
fn share(total: &Resources, percent: u8) -> Resources {
    let p = |v: u64| (v as u128 * percent as u128 / 100) as u64;
    Resources {
        cpu: p(total.cpu),
        memory: p(total.memory),
        pods: p(total.pods as u64) as u32,
        storage: p(total.storage),
    }
}

fn sub_held(held: &mut HashMap<Id, Resources>, buyer: &Id, r: &Resources) {
    if let Some(h) = held.get_mut(buyer) {
        *h = Resources {
            cpu: h.cpu.saturating_sub(r.cpu),
            memory: h.memory.saturating_sub(r.memory),
            pods: h.pods.saturating_sub(r.pods),
            storage: h.storage.saturating_sub(r.storage),
        };
        if h.is_zero() {
            held.remove(buyer);
        }
    }
}

fn dec_unpeered(unpeered: &mut HashMap<Id, u32>, buyer: &Id) {
    if let Some(n) = unpeered.get_mut(buyer) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            unpeered.remove(buyer);
        }
    }
}

impl Ledger {
    /// Rebuilds the state from the ledger tree: offers, terms, flavours on offer, then one
    /// scan of the contract records for the holdings, the unpeered counts and both indexes.
    pub fn load(tree: &sled::Tree) -> Result<Ledger, TableError> {
        let mut l = Ledger::default();
        for kv in tree.scan_prefix(keys::OFFER) {
            let (k, v) = kv?;
            let total: Flavour = dec("offers", &k, &v)?;
            l.offers.insert(
                total.id.clone(),
                Offer {
                    total,
                    epoch: None,
                    current: None,
                    held: HashMap::new(),
                },
            );
        }
        for kv in tree.scan_prefix(keys::EPOCH) {
            let (k, v) = kv?;
            let Some(offer) = std::str::from_utf8(&k[keys::EPOCH.len()..])
                .ok()
                .and_then(|s| Id::new(s).ok())
            else {
                continue;
            };
            if let Some(o) = l.offers.get_mut(&offer) {
                // A record that does not decode is an older format: counts as absent.
                o.epoch = minicbor::decode::<Epoch>(&v).ok();
            }
        }
        for kv in tree.scan_prefix(keys::AVAILABLE) {
            let (k, v) = kv?;
            let own: OwnFlavour = dec("available", &k, &v)?;
            if let Some(o) = l.offers.get_mut(&own.offer) {
                o.current = Some(own.flavour);
            }
        }
        for kv in tree.scan_prefix(keys::CONTRACT) {
            let (k, v) = kv?;
            let r: Record = dec("contracts", &k, &v)?;
            l.track(&r);
        }
        Ok(l)
    }

    /// Puts a record that is now in the tree into the state: the holding, the unpeered count
    /// and both indexes (its previous version, if any, was [`Ledger::untrack`]ed).
    fn track(&mut self, r: &Record) {
        let c = &r.contract;
        if let Some(at) = r.due_at() {
            self.due.insert((at, c.id.as_str().into()));
        }
        if r.kind != AllocationKind::Node {
            return;
        }
        self.index_sale(&c.buyer, &c.transaction, &c.id);
        let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
        if c.state == ContractState::Reserved {
            *self.unpeered.entry(c.buyer.clone()).or_insert(0) += 1;
        }
        if let Some(o) = r.offer.as_ref().and_then(|o| self.offers.get_mut(o)) {
            if live {
                let h = o.held.entry(c.buyer.clone()).or_default();
                *h = h.saturating_add(&c.resources);
            }
        }
    }

    /// Takes a record's version that is about to change (or go) out of the state.
    fn untrack(&mut self, r: &Record) {
        let c = &r.contract;
        if let Some(at) = r.due_at() {
            self.due.remove(&(at, c.id.as_str().into()));
        }
        if r.kind != AllocationKind::Node {
            return;
        }
        if c.state == ContractState::Reserved {
            dec_unpeered(&mut self.unpeered, &c.buyer);
        }
        let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
        if let Some(o) = r.offer.as_ref().and_then(|o| self.offers.get_mut(o)) {
            if live {
                sub_held(&mut o.held, &c.buyer, &c.resources);
            }
        }
    }

    /// The state after `old` (if any) became `new` in the tree.
    pub fn replaced(&mut self, old: Option<&Record>, new: &Record) {
        if let Some(old) = old {
            self.untrack(old);
        }
        self.track(new);
    }

    /// The state after `r` was deleted from the tree (its retention is over).
    pub fn deleted(&mut self, r: &Record) {
        self.untrack(r);
        if r.kind == AllocationKind::Node {
            let c = &r.contract;
            let h = self.hash_tx(&c.buyer, &c.transaction);
            if self.sold.get(&h).is_some_and(|id| **id == *c.id.as_str()) {
                self.sold.remove(&h);
            }
            self.sold_overflow
                .retain(|(b, t, _)| !(**b == *c.buyer.as_str() && **t == *c.transaction.as_str()));
        }
    }

    fn hash_tx(&self, buyer: &Id, tx: &Id) -> u64 {
        self.hasher
            .hash_one((buyer.as_str().as_bytes(), 0u8, tx.as_str().as_bytes()))
    }

    fn index_sale(&mut self, buyer: &Id, tx: &Id, contract: &Id) {
        let h = self.hash_tx(buyer, tx);
        match self.sold.get(&h) {
            None => {
                self.sold.insert(h, contract.as_str().into());
            }
            Some(id) if **id == *contract.as_str() => {}
            Some(_) => self.sold_overflow.push((
                buyer.as_str().into(),
                tx.as_str().into(),
                contract.as_str().into(),
            )),
        }
    }

    /// The contracts that may be the one sold for (buyer, transaction): the index's entry
    /// for its hash (to be checked against the record: another transaction may share the
    /// hash), and one from the overflow. Empty: it was never sold (or its record is gone).
    pub fn sold_for(&self, buyer: &Id, tx: &Id) -> Vec<Id> {
        let mut out = Vec::new();
        if let Some(id) = self.sold.get(&self.hash_tx(buyer, tx)) {
            out.extend(Id::new(id).ok());
        }
        for (b, t, id) in &self.sold_overflow {
            if **b == *buyer.as_str() && **t == *tx.as_str() {
                out.extend(Id::new(id).ok());
            }
        }
        out
    }

    /// The deadline index's entries due at `now` (not after it), earliest first, at most
    /// `limit`.
    pub fn due(&self, now: u64, limit: usize) -> Vec<(u64, Id)> {
        self.due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter_map(|(at, id)| Some((*at, Id::new(id).ok()?)))
            .take(limit)
            .collect()
    }

    /// Whether the deadline index has the entry (`at`, `contract`).
    pub fn is_due_entry(&self, at: u64, contract: &Id) -> bool {
        self.due.contains(&(at, contract.as_str().into()))
    }

    /// Forgets one deadline entry (it is stale).
    pub fn drop_due(&mut self, at: u64, contract: &Id) {
        self.due.remove(&(at, contract.as_str().into()));
    }

    pub fn due_count(&self) -> usize {
        self.due.len()
    }

    pub fn sale_count(&self) -> usize {
        self.sold.len() + self.sold_overflow.len()
    }

    /// What live reservations hold of `offer`, all buyers together.
    pub fn held(&self, offer: &Id) -> Resources {
        self.offers.get(offer).map_or_else(Resources::default, |o| {
            o.held
                .values()
                .fold(Resources::default(), |a, r| a.saturating_add(r))
        })
    }

    /// The flavours on offer now, by flavour id.
    pub fn flavours(&self) -> Vec<OwnFlavour> {
        let mut v: Vec<OwnFlavour> = self
            .offers
            .iter()
            .filter_map(|(id, o)| {
                o.current.as_ref().map(|f| OwnFlavour {
                    offer: id.clone(),
                    flavour: f.clone(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.flavour.id.as_str().cmp(b.flavour.id.as_str()));
        v
    }

    /// The offer a flavour id belongs to: the offer of the flavour on offer under `id`, or,
    /// for an id of the form of a superseded id (`{offer}.{n}`), that offer if configured.
    pub fn offer_of(&self, id: &Id) -> Option<Id> {
        if let Some((offer, _)) = self.offer_on_offer(id) {
            return Some(offer.clone());
        }
        keys::superseded_offer(id)
            .map(|(offer, _)| offer)
            .filter(|o| self.offers.contains_key(o))
    }

    fn offer_on_offer(&self, flavour: &Id) -> Option<(&Id, &Offer)> {
        self.offers
            .iter()
            .find(|(_, o)| o.current.as_ref().is_some_and(|f| &f.id == flavour))
    }

    /// Which offer serves a request for `req.flavour`: the one whose flavour on offer has
    /// that id, or, for a superseded id with a partition, its offer when it has a flavour on
    /// offer and the id was issued under the offer's current terms (docs/protocol.md,
    /// "Superseded flavour ids").
    fn serving(&self, req: &ReserveRequest) -> Option<Id> {
        if let Some((offer, _)) = self.offer_on_offer(&req.flavour) {
            return Some(offer.clone());
        }
        let (offer, n) = keys::superseded_offer(&req.flavour)?;
        let o = self.offers.get(&offer)?;
        let first = o.epoch?.first;
        (req.partition.is_some() && n >= first && o.current.is_some()).then_some(offer)
    }

    /// Decides a new RESERVE_FLAVOUR (workflow steps 15-16; the transaction was not sold
    /// before) and, when it is sold, puts the write into `batch`: the offer's flavour on offer
    /// replaced by the reduced one under a new id (or removed when sold out), and the
    /// contract's record (the contract and its Node allocation). The refusals come in the
    /// protocol's order (docs/protocol.md, ReserveRequest): pending limit, flavour gone, bad
    /// partition, no fit, share cap.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve(
        &mut self,
        me: &Id,
        req: &ReserveRequest,
        now: u64,
        ttl_ms: u64,
        pending_limit: u32,
        next: &mut NextId<'_>,
        batch: &mut sled::Batch,
    ) -> Result<Reservation, TableError> {
        let gone = || {
            Ok(Reservation::Refused(Refusal::FlavourGone(
                req.flavour.clone(),
            )))
        };
        if self.unpeered.get(&req.buyer).copied().unwrap_or(0) >= pending_limit {
            return Ok(Reservation::Refused(Refusal::TooManyPending(pending_limit)));
        }
        let Some(offer_id) = self.serving(req) else {
            return gone();
        };
        let Some(offer) = self.offers.get_mut(&offer_id) else {
            return gone();
        };
        let Some(current) = offer.current.clone() else {
            return gone();
        };
        let Plan {
            resources,
            price,
            remainder,
        } = match contracts::plan(&current, req) {
            Ok(p) => p,
            Err(r) => return Ok(Reservation::Refused(r)),
        };
        let sale = offer.epoch.map(|e| e.sale).unwrap_or_default();
        if (1..100).contains(&sale.max_per_buyer) {
            let cap = share(&offer.total.resources, sale.max_per_buyer);
            let held = offer.held.get(&req.buyer).copied().unwrap_or_default();
            let fits = cap
                .checked_sub(&held)
                .and_then(|room| room.checked_sub(&resources))
                .is_some();
            if !fits {
                return Ok(Reservation::Refused(Refusal::ShareExceeded {
                    offer: offer_id,
                    percent: sale.max_per_buyer,
                }));
            }
        }
        let term_ms = (sale.term_ms > 0).then_some(sale.term_ms);
        let id = new_id("contracts", me, ".c", next()?)?;
        offer.current = match remainder {
            Some(left) => {
                let fid = new_id("offers", &offer_id, ".", next()?)?;
                let f = cut(&offer.total, &fid, left);
                let own = OwnFlavour {
                    offer: offer_id.clone(),
                    flavour: f.clone(),
                };
                batch.insert(keys::available(&offer_id), enc(&own));
                Some(f)
            }
            None => {
                batch.remove(keys::available(&offer_id));
                None
            }
        };
        // The flavour bought, under the id the buyer named (a superseded id names the same
        // terms; the resources are those it was served from).
        let contract = Contract {
            id: id.clone(),
            transaction: req.transaction.clone(),
            flavour: Flavour {
                id: req.flavour.clone(),
                ..current
            },
            buyer: req.buyer.clone(),
            seller: me.clone(),
            resources,
            price,
            created_at: now,
            expires_at: now.saturating_add(ttl_ms),
            state: ContractState::Reserved,
            term_ms,
            ends_at: term_ms.map(|t| now.saturating_add(t)),
        };
        let record = Record {
            contract,
            kind: AllocationKind::Node,
            offer: Some(offer_id),
            updated_at: now,
            kept_until: None,
        };
        batch.insert(keys::contract(&id), enc(&record));
        self.track(&record);
        Ok(Reservation::New(record.contract))
    }

    /// A sale `old` (as it was, live) ends: the resources go back into the offer's flavour
    /// (the flavour on offer is replaced by a larger one under a new id), written into
    /// `batch`. An offer withdrawn from the configuration gets nothing back. The caller
    /// writes the ended record and calls [`Ledger::replaced`].
    pub fn give_back(
        &mut self,
        old: &Record,
        next: &mut NextId<'_>,
        batch: &mut sled::Batch,
    ) -> Result<(), TableError> {
        let c = &old.contract;
        let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
        if old.kind != AllocationKind::Node || !live {
            return Ok(());
        }
        let Some(offer_id) = &old.offer else {
            return Ok(());
        };
        let Some(offer) = self.offers.get_mut(offer_id) else {
            return Ok(());
        };
        let mut back = c.resources;
        if let Some(now_on_offer) = offer.current.take() {
            back = back.saturating_add(&now_on_offer.resources);
        }
        let fid = new_id("offers", offer_id, ".", next()?)?;
        let f = cut(&offer.total, &fid, back);
        let own = OwnFlavour {
            offer: offer_id.clone(),
            flavour: f.clone(),
        };
        batch.insert(keys::available(offer_id), enc(&own));
        offer.current = Some(f);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_offer;
    use crate::tables::SaleTerms;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    fn piece(cpu: u64) -> Option<Resources> {
        Some(Resources {
            cpu,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        })
    }

    /// A seller `prov` with the demo offer on offer as `edge-pool.1`, under `sale`.
    fn build_ledger(sale: SaleTerms) -> Ledger {
        let me = id("prov");
        let total = demo_offer(&me);
        let current = cut(&total, &id("edge-pool.1"), total.resources);
        let mut l = Ledger::default();
        l.offers.insert(
            total.id.clone(),
            Offer {
                total,
                epoch: Some(Epoch { first: 1, sale }),
                current: Some(current),
                held: HashMap::new(),
            },
        );
        l
    }

    fn request(buyer: &str, tx: &str, flavour: &str, cpu: u64) -> ReserveRequest {
        ReserveRequest {
            transaction: id(tx),
            flavour: id(flavour),
            buyer: id(buyer),
            partition: piece(cpu),
        }
    }

    fn counter() -> impl FnMut() -> Result<u64, TableError> {
        let mut n = 100;
        move || {
            n += 1;
            Ok(n)
        }
    }

    fn decide(l: &mut Ledger, req: &ReserveRequest, limit: u32) -> (Reservation, sled::Batch) {
        let mut batch = sled::Batch::default();
        let mut next = counter();
        let r = l
            .reserve(&id("prov"), req, 1000, 600, limit, &mut next, &mut batch)
            .unwrap();
        (r, batch)
    }

    #[test]
    fn a_sale_cuts_the_flavour_and_counts_the_buyers_holding_pending_and_deadline() {
        let mut l = build_ledger(SaleTerms::default());
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 1000), 8);
        let Reservation::New(c) = r else {
            panic!("{r:?}")
        };
        assert_eq!(c.resources.cpu, 1000);
        assert_eq!(c.flavour.id, id("edge-pool.1"));
        assert_eq!((c.term_ms, c.ends_at), (None, None), "term 0: no term");
        let offer = &l.offers[&id("edge-pool")];
        let now = offer.current.as_ref().unwrap();
        assert_ne!(
            now.id,
            id("edge-pool.1"),
            "the reduced flavour has a new id"
        );
        assert_eq!(now.resources.cpu, 3000);
        assert_eq!(l.held(&id("edge-pool")).cpu, 1000);
        assert_eq!(l.unpeered[&id("b")], 1);
        assert_eq!(l.sold_for(&id("b"), &id("b.t1")), vec![c.id.clone()]);
        assert_eq!(l.due(u64::MAX, 10), vec![(c.expires_at, c.id)]);
    }

    #[test]
    fn refusals_come_in_the_protocols_order() {
        let mut l = build_ledger(SaleTerms {
            max_per_buyer: 25,
            term_ms: 0,
        });
        // Pending limit first, even for a flavour that does not exist.
        l.unpeered.insert(id("b"), 2);
        let (r, b) = decide(&mut l, &request("b", "b.t1", "nope.1", 500), 2);
        assert_eq!(r, Reservation::Refused(Refusal::TooManyPending(2)));
        assert_eq!(
            format!("{b:?}"),
            format!("{:?}", sled::Batch::default()),
            "a refusal writes nothing"
        );
        l.unpeered.clear();
        let (r, _) = decide(&mut l, &request("b", "b.t1", "nope.1", 500), 2);
        assert!(matches!(r, Reservation::Refused(Refusal::FlavourGone(_))));
        // Off its step and too large: BAD_PARTITION, not NO_FIT.
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 99_999), 2);
        assert!(matches!(r, Reservation::Refused(Refusal::BadPartition(_))));
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 99_500), 2);
        assert!(matches!(r, Reservation::Refused(Refusal::NoFit(_))));
        // 25% of 4000m is 1000m.
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 1500), 2);
        assert!(matches!(
            r,
            Reservation::Refused(Refusal::ShareExceeded { percent: 25, .. })
        ));
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 1000), 2);
        assert!(matches!(r, Reservation::New(_)));
        let cur = l.offers[&id("edge-pool")].current.clone().unwrap().id;
        let (r, _) = decide(&mut l, &request("b", "b.t2", cur.as_str(), 500), 2);
        assert!(
            matches!(r, Reservation::Refused(Refusal::ShareExceeded { .. })),
            "the cap counts what the buyer already holds"
        );
    }

    #[test]
    fn a_superseded_id_is_served_from_the_current_flavour_only_with_a_partition() {
        let mut l = build_ledger(SaleTerms::default());
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 500), 8);
        assert!(matches!(r, Reservation::New(_)));
        // edge-pool.1 is gone, but a piece asked under it is cut from the current flavour.
        let (r, _) = decide(&mut l, &request("c", "c.t1", "edge-pool.1", 500), 8);
        let Reservation::New(c) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            c.flavour.id,
            id("edge-pool.1"),
            "the contract names the id asked"
        );
        assert_eq!(c.flavour.resources.cpu, 3500, "as it was before this piece");
        let mut whole = request("d", "d.t1", "edge-pool.1", 500);
        whole.partition = None;
        let (r, _) = decide(&mut l, &whole, 8);
        assert!(matches!(r, Reservation::Refused(Refusal::FlavourGone(_))));
        // An id issued before the terms last changed is gone.
        l.offers.get_mut(&id("edge-pool")).unwrap().epoch = Some(Epoch {
            first: 50,
            sale: SaleTerms::default(),
        });
        let (r, _) = decide(&mut l, &request("e", "e.t1", "edge-pool.1", 500), 8);
        assert!(matches!(r, Reservation::Refused(Refusal::FlavourGone(_))));
    }

    #[test]
    fn an_end_gives_the_resources_back_and_moves_the_contract_to_its_retention() {
        let mut l = build_ledger(SaleTerms::default());
        let (r, _) = decide(&mut l, &request("b", "b.t1", "edge-pool.1", 1500), 8);
        let Reservation::New(c) = r else {
            panic!("{r:?}")
        };
        let old = Record {
            contract: c.clone(),
            kind: AllocationKind::Node,
            offer: Some(id("edge-pool")),
            updated_at: 0,
            kept_until: None,
        };
        let mut batch = sled::Batch::default();
        l.give_back(&old, &mut counter(), &mut batch).unwrap();
        let mut ended = old.clone();
        ended.contract.state = ContractState::Released;
        ended.kept_until = Some(9_999);
        l.replaced(Some(&old), &ended);
        let offer = &l.offers[&id("edge-pool")];
        assert_eq!(offer.current.as_ref().unwrap().resources.cpu, 4000);
        assert!(offer.held.is_empty());
        assert!(l.unpeered.is_empty());
        assert_eq!(l.due(u64::MAX, 10), vec![(9_999, c.id.clone())]);
        assert_eq!(
            l.sold_for(&c.buyer, &c.transaction),
            vec![c.id.clone()],
            "the first answer is kept for the retention"
        );
        l.deleted(&ended);
        assert!(l.sold_for(&c.buyer, &c.transaction).is_empty());
        assert_eq!(l.due_count(), 0);
    }

    #[test]
    fn two_transactions_with_one_hash_are_both_kept() {
        let mut l = build_ledger(SaleTerms::default());
        let (a, b) = (id("prov.c1"), id("prov.c2"));
        l.index_sale(&id("x"), &id("x.t1"), &a);
        // As if (y, y.t1) hashed like (x, x.t1): force the same slot.
        let h = l.hash_tx(&id("x"), &id("x.t1"));
        let hy = l.hash_tx(&id("y"), &id("y.t1"));
        let taken = l.sold.remove(&h).unwrap();
        l.sold.insert(hy, taken);
        l.index_sale(&id("y"), &id("y.t1"), &b);
        assert_eq!(l.sold_for(&id("y"), &id("y.t1")), vec![a, b]);
    }
}
