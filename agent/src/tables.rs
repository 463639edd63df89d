//! The node's tables in sled, one tree each, and the multi-tree updates that must be atomic.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `offers` | offer id | the configured offer: a [`Flavour`] whose resources are the total |
//! | `available` | flavour id | [`OwnFlavour`]: what is on offer now (Available Resources) |
//! | `allocations` | contract id | [`Allocation`] (Node on the provider, VirtualNode on the consumer) |
//! | (in memory) | `{provider}/{flavour}` | [`Candidate`] (Peering Candidates), CBOR-encoded |
//! | `contracts` | contract id | [`Contract`] |
//! | `transactions` | `in/{buyer}/{tx}` or `out/{tx}` | the contract id a transaction got (records written before hold the whole contract), or a purchase in flight |
//! | `ratings` | provider id | [`Rating`] (Ratings and Metrics) |
//! | `intents` | intent id | [`Intent`] |
//!
//! Peering candidates are a cache of other nodes' adverts and answers (fresh for
//! `candidate_ttl`, sent again by the broker's retained catalog after a restart), so they are
//! kept in memory, encoded, not in sled: in sled a domain of thousands of providers made every
//! advert stored cost 30x more once the tree outgrew sled's page cache (discovery grew
//! super-linearly with the domain) and cost about 2 KiB of resident memory per candidate,
//! against about 250 bytes here (`bench/examples/tables_probe.rs`, docs/benchmarks.md).
//! Databases written before keep an unused `candidates` tree, emptied at open.
//!
//! Why one sled transaction per reservation: the provider removes the old flavour, creates
//! the reduced one, the Node allocation, the contract and the transaction record together
//! (workflow step 16). If any of them could land without the others, a crash between two
//! writes would either sell capacity twice or lose an acknowledged contract. The check that
//! the request still fits runs inside the same transaction ([`crate::contracts::plan`]), and
//! the whole database is flushed before [`Tables::reserve`] returns, so an OK that leaves
//! the node is already on disk.
//!
//! The invariant kept here for every offer: the available flavour's resources plus the
//! resources of live (not released) Node allocations equal the offer's total.

use crate::contracts::{self, Plan, Refusal};
use crate::discovery::price_of;
use crate::model::{
    Allocation, AllocationKind, AllocationStatus, Candidate, Contract, ContractState, Flavour, Id,
    Intent, OwnFlavour, ReserveRequest, Resources,
};
use crate::wire::PeerAccept;
use minicbor::{Decode, Encode};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Peering candidates kept per provider: twice the flavours of one advert, since answers to
/// different selectors list different flavours and ids change as flavours are cut.
pub const MAX_CANDIDATES_PER_PROVIDER: usize = 2 * crate::model::MAX_FLAVOURS;

/// Why a table operation failed. Refusals of a reservation are not errors: see [`Reservation`].
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("damaged record in table {tree}, key {key:?}: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error(
        "the database in {dir} is damaged or was replaced: this directory held node {node}'s \
         tables (marker file {marker}) but the database is empty. Starting would re-offer \
         capacity already sold. Restore the directory from a backup, or, to start this node \
         afresh, delete {marker}"
    )]
    Damaged {
        dir: String,
        node: String,
        marker: String,
    },
    #[error("{dir} holds the tables of node {theirs}, not of {ours}: use another data_dir")]
    OtherNode {
        dir: String,
        theirs: String,
        ours: String,
    },
    #[error(
        "offer {offer} now offers less than its live reservations hold ({held:?}); \
         restore its size or release those contracts first"
    )]
    OfferShrunk { offer: String, held: Box<Resources> },
}

/// The outcome of a RESERVE_FLAVOUR on the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// A new contract, durable on disk.
    New(Contract),
    /// The transaction id was seen before: the first answer, nothing reserved again.
    Repeat(Contract),
    /// Refused; nothing was written.
    Refused(Refusal),
}

/// What a provider's policy adds to a RESERVE_FLAVOUR check (see [`Tables::reserve_unflushed`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// The buyer already holds the most unpeered reservations allowed.
    pub pending_full: Option<u32>,
    /// `[offer] max_per_buyer`: what the buyer may still take of the offer.
    pub room: Option<Room>,
    /// The contract's term (`[offer] contract_term_secs`); `None`: it never ends while Active.
    pub term_ms: Option<u64>,
}

/// What one buyer may still take of one offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    pub offer: Id,
    /// The cap, in percent of the offer's total.
    pub percent: u8,
    /// The cap minus what the buyer holds now.
    pub left: Resources,
}

/// A purchase this node started and has not finished (consumer side).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Outgoing {
    #[n(0)]
    pub request: ReserveRequest,
    #[n(1)]
    pub seller: Id,
    #[n(2)]
    pub started_at: u64,
}

/// What this node knows of a provider's behaviour (Ratings and Metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Rating {
    #[n(0)]
    pub reservations_ok: u64,
    #[n(1)]
    pub reservations_failed: u64,
    /// Milliseconds from RESERVE_FLAVOUR sent to RESERVED received, last success.
    #[n(2)]
    pub last_latency_ms: u64,
    // Keys 3-5 came later: `default` lets records written before them decode.
    #[cbor(n(3), default)]
    pub peerings_ok: u64,
    #[cbor(n(4), default)]
    pub peerings_failed: u64,
    /// Milliseconds from PEER_REQUEST sent to the virtual node ready, last success.
    #[cbor(n(5), default)]
    pub last_peering_ms: u64,
    /// Reservations the provider refused (NO_FIT, or FLAVOUR_GONE twice in one flow) or
    /// ignored although it had just offered the flavour: see [`crate::rear`].
    #[cbor(n(6), default)]
    pub lies: u64,
    /// Unix ms until which the provider is ranked after every provider that did not lie
    /// (0: not demoted).
    #[cbor(n(7), default)]
    pub demoted_until: u64,
}

impl Rating {
    /// What ranking weighs: everything that went wrong with this provider.
    pub fn failures(&self) -> u64 {
        self.reservations_failed + self.peerings_failed
    }

    /// Whether the provider is demoted at `now`.
    pub fn demoted(&self, now: u64) -> bool {
        now < self.demoted_until
    }
}

/// The open tables of one node. Cloning is cheap (sled handles are reference-counted).
#[derive(Clone)]
pub struct Tables {
    db: sled::Db,
    offers: Tree,
    available: Tree,
    allocations: Tree,
    /// Peering candidates, CBOR-encoded, by `{provider}/{flavour}` (sorted, as sled kept them).
    candidates: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
    contracts: Tree,
    transactions: Tree,
    ratings: Tree,
    intents: Tree,
}

fn enc<T: Encode<()>>(v: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail.
    minicbor::to_vec(v).unwrap_or_default()
}

fn dec<T: for<'a> Decode<'a, ()>>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, TableError> {
    minicbor::decode(bytes).map_err(|e| TableError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn all<T: for<'a> Decode<'a, ()>>(name: &'static str, tree: &Tree) -> Result<Vec<T>, TableError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            dec(name, &k, &v)
        })
        .collect()
}

/// One record of `tree`, decoded.
fn one<T: for<'a> Decode<'a, ()>>(
    name: &'static str,
    tree: &Tree,
    key: &[u8],
) -> Result<Option<T>, TableError> {
    tree.get(key)?.map(|v| dec(name, key, &v)).transpose()
}

type TxResult<T> = Result<T, ConflictableTransactionError<TableError>>;

fn tx_get<T: for<'a> Decode<'a, ()>>(
    name: &'static str,
    tree: &TransactionalTree,
    key: &[u8],
) -> TxResult<Option<T>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => dec(name, key, &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
    }
}

fn flatten<T>(r: Result<T, TransactionError<TableError>>) -> Result<T, TableError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => TableError::Sled(e),
    })
}

/// The contract first given for the transaction record `key`, as it was given (Reserved). The
/// record holds the contract's id; records written by earlier versions hold the contract
/// itself. `None` when no record or its contract is gone (a fresh evaluation follows).
fn first_answer(
    transactions: &TransactionalTree,
    contracts: &TransactionalTree,
    key: &[u8],
) -> TxResult<Option<Contract>> {
    let Some(v) = transactions.get(key)? else {
        return Ok(None);
    };
    let Ok(id) = minicbor::decode::<Id>(&v) else {
        return dec("transactions", key, &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort);
    };
    let Some(mut c) = tx_get::<Contract>("contracts", contracts, id.as_str().as_bytes())? else {
        return Ok(None);
    };
    // After a contract is made only its state and its end (RENEW) change: the first answer
    // said Reserved, and ended `term_ms` after it was made.
    c.state = ContractState::Reserved;
    c.ends_at = c.term_ms.map(|t| c.created_at.saturating_add(t));
    Ok(Some(c))
}

fn in_key(buyer: &Id, tx: &Id) -> Vec<u8> {
    format!("in/{buyer}/{tx}").into_bytes()
}

fn out_key(tx: &Id) -> Vec<u8> {
    format!("out/{tx}").into_bytes()
}

fn candidate_key(provider: &Id, flavour: &Id) -> Vec<u8> {
    format!("{provider}/{flavour}").into_bytes()
}

/// Builds a new flavour id `{offer}.{n}`; ids are never reused, so a consumer holding an old
/// id gets FlavourGone instead of silently buying a different flavour.
fn flavour_id(offer: &Id, n: u64) -> Result<Id, ConflictableTransactionError<TableError>> {
    Id::new(&format!("{offer}.{n}")).map_err(|e| {
        ConflictableTransactionError::Abort(TableError::Corrupt {
            tree: "offers",
            key: offer.to_string(),
            reason: e.to_string(),
        })
    })
}

impl Tables {
    /// Opens (or creates) the tables under `dir`.
    pub fn open(dir: &Path) -> Result<Tables, TableError> {
        let db = sled::Config::new()
            .path(dir)
            // A gateway has little memory and the tables are small: 1 MiB of page cache keeps
            // the hot records (flavours, recent contracts) without letting a burst of
            // reservations grow the agent (the benchmark's peak RSS shows it).
            .cache_capacity(1024 * 1024)
            .open()?;
        Ok(Tables {
            offers: db.open_tree("offers")?,
            available: db.open_tree("available")?,
            allocations: db.open_tree("allocations")?,
            candidates: {
                // Candidates stored by earlier versions: a cache, now kept in memory.
                let old = db.open_tree("candidates")?;
                if !old.is_empty() {
                    old.clear()?;
                }
                Arc::default()
            },
            contracts: db.open_tree("contracts")?,
            transactions: db.open_tree("transactions")?,
            ratings: db.open_tree("ratings")?,
            intents: db.open_tree("intents")?,
            db,
        })
    }

    /// Opens the tables of node `me` for running it, and checks they are the ones it left.
    ///
    /// sled recovers from a damaged log by truncating it, silently: a node whose database was
    /// damaged (or replaced by an empty one) would come back with no contracts and re-offer
    /// capacity it already sold. So the node's id is kept both inside the database (tree
    /// `meta`) and in a marker file beside it (`fluidlet.node`); a marker without the record
    /// is reported as [`TableError::Damaged`] and the node refuses to start.
    pub async fn open_for(dir: &Path, me: &Id) -> Result<Tables, TableError> {
        let t = Tables::open(dir)?;
        let meta = t.db.open_tree("meta")?;
        let marker = dir.join("fluidlet.node");
        let recorded: Option<Id> = one("meta", &meta, b"node")?;
        let marked = std::fs::read_to_string(&marker).ok();
        let shown = |p: &Path| p.display().to_string();
        match (&recorded, &marked) {
            (Some(theirs), _) if theirs != me => {
                return Err(TableError::OtherNode {
                    dir: shown(dir),
                    theirs: theirs.to_string(),
                    ours: me.to_string(),
                })
            }
            (None, Some(node)) => {
                return Err(TableError::Damaged {
                    dir: shown(dir),
                    node: node.trim().to_owned(),
                    marker: shown(&marker),
                })
            }
            _ => {}
        }
        if recorded.is_none() {
            meta.insert(b"node", enc(me))?;
            t.flush().await?;
        }
        if marked.is_none() {
            std::fs::write(&marker, format!("{me}\n"))
                .map_err(|e| TableError::Sled(sled::Error::Io(e)))?;
        }
        Ok(t)
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), TableError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Resources held by live Node allocations, per offer.
    fn held(&self, offer: &Id) -> Result<Resources, TableError> {
        let mut held = Resources::default();
        for a in all::<Allocation>("allocations", &self.allocations)? {
            if a.kind == AllocationKind::Node
                && a.status != AllocationStatus::Released
                && a.offer.as_ref() == Some(offer)
            {
                held = held.saturating_add(&a.resources);
            }
        }
        Ok(held)
    }

    /// Brings the offers in line with the configuration: each configured offer (a flavour
    /// whose id is the offer id and whose resources are the total) is advertised with its
    /// total minus what live reservations hold; offers no longer configured are withdrawn.
    /// Called at start, before the node serves anything.
    pub async fn sync_offers(&self, configured: &[Flavour]) -> Result<(), TableError> {
        let mut wanted = Vec::new();
        for offer in configured {
            let held = self.held(&offer.id)?;
            let left =
                offer
                    .resources
                    .checked_sub(&held)
                    .ok_or_else(|| TableError::OfferShrunk {
                        offer: offer.id.to_string(),
                        held: Box::new(held),
                    })?;
            wanted.push((offer, left));
        }
        let current: Vec<OwnFlavour> = all("available", &self.available)?;
        let stored: Vec<Flavour> = all("offers", &self.offers)?;
        flatten(
            (&self.offers, &self.available).transaction(|(offers, available)| {
                for old in &stored {
                    if !configured.iter().any(|o| o.id == old.id) {
                        offers.remove(old.id.as_str())?;
                    }
                }
                for own in &current {
                    let keep = wanted.iter().any(|(o, left)| {
                        own.offer == o.id && own.flavour == cut(o, &own.flavour.id, *left)
                    });
                    if !keep {
                        available.remove(own.flavour.id.as_str())?;
                    }
                }
                for (o, left) in &wanted {
                    offers.insert(o.id.as_str(), enc(*o))?;
                    let kept = current.iter().any(|own| {
                        own.offer == o.id && own.flavour == cut(o, &own.flavour.id, *left)
                    });
                    if !kept && !left.is_zero() {
                        offer_cut(available, &o.id, o, *left)?;
                    }
                }
                Ok(())
            }),
        )?;
        self.flush().await
    }

    /// The flavours on offer now.
    pub fn flavours(&self) -> Result<Vec<OwnFlavour>, TableError> {
        all("available", &self.available)
    }

    /// The configured offers (totals).
    pub fn offers(&self) -> Result<Vec<Flavour>, TableError> {
        all("offers", &self.offers)
    }

    /// Provider side of RESERVE_FLAVOUR (workflow steps 15-17): one transaction, flushed
    /// before returning when anything was written.
    pub async fn reserve(
        &self,
        me: &Id,
        req: &ReserveRequest,
        now: u64,
        ttl_ms: u64,
    ) -> Result<Reservation, TableError> {
        let outcome = self.reserve_unflushed(me, req, now, ttl_ms, &Admission::default())?;
        if matches!(outcome, Reservation::New(_)) {
            self.flush().await?;
        }
        Ok(outcome)
    }

    /// [`Tables::reserve`] without the flush, for group commit: the caller flushes once for
    /// a batch and answers none of it before that flush returned.
    ///
    /// `admit.pending_full`: the buyer already holds the most unpeered reservations allowed; a
    /// new transaction is refused (a repeated one still gets its first answer). `admit.room`:
    /// a piece beyond what the buyer may still take of the offer is refused (after the
    /// flavour's own checks). `admit.term_ms`: the contract's term; it ends at `now + term`
    /// unless renewed.
    pub fn reserve_unflushed(
        &self,
        me: &Id,
        req: &ReserveRequest,
        now: u64,
        ttl_ms: u64,
        admit: &Admission,
    ) -> Result<Reservation, TableError> {
        let key = in_key(&req.buyer, &req.transaction);
        let outcome = flatten(
            (
                &self.offers,
                &self.available,
                &self.allocations,
                &self.contracts,
                &self.transactions,
            )
                .transaction(
                    |(offers, available, allocations, contracts, transactions)| {
                        if let Some(first) = first_answer(transactions, contracts, &key)? {
                            return Ok(Reservation::Repeat(first));
                        }
                        if let Some(n) = admit.pending_full {
                            return Ok(Reservation::Refused(Refusal::TooManyPending(n)));
                        }
                        let Some(own) = tx_get::<OwnFlavour>(
                            "available",
                            available,
                            req.flavour.as_str().as_bytes(),
                        )?
                        else {
                            return Ok(Reservation::Refused(Refusal::FlavourGone(
                                req.flavour.clone(),
                            )));
                        };
                        let Plan {
                            resources,
                            price,
                            remainder,
                        } = match contracts::plan(&own.flavour, req) {
                            Ok(p) => p,
                            Err(r) => return Ok(Reservation::Refused(r)),
                        };
                        if let Some(room) = &admit.room {
                            if room.offer == own.offer
                                && room.left.checked_sub(&resources).is_none()
                            {
                                return Ok(Reservation::Refused(Refusal::ShareExceeded {
                                    offer: own.offer.clone(),
                                    percent: room.percent,
                                }));
                            }
                        }
                        let n = available.generate_id()?;
                        let id = Id::new(&format!("{me}.c{n}")).map_err(|e| {
                            ConflictableTransactionError::Abort(TableError::Corrupt {
                                tree: "contracts",
                                key: me.to_string(),
                                reason: e.to_string(),
                            })
                        })?;
                        available.remove(req.flavour.as_str())?;
                        if let Some(left) = remainder {
                            let offer: Flavour =
                                tx_get("offers", offers, own.offer.as_str().as_bytes())?
                                    .unwrap_or_else(|| own.flavour.clone());
                            offer_cut(available, &own.offer, &offer, left)?;
                        }
                        let contract = Contract {
                            id: id.clone(),
                            transaction: req.transaction.clone(),
                            flavour: own.flavour.clone(),
                            buyer: req.buyer.clone(),
                            seller: me.clone(),
                            resources,
                            price,
                            created_at: now,
                            expires_at: now.saturating_add(ttl_ms),
                            state: ContractState::Reserved,
                            term_ms: admit.term_ms,
                            ends_at: admit.term_ms.map(|t| now.saturating_add(t)),
                        };
                        let alloc = Allocation {
                            contract: id.clone(),
                            kind: AllocationKind::Node,
                            status: AllocationStatus::Inactive,
                            resources,
                            peer: req.buyer.clone(),
                            updated_at: now,
                            offer: Some(own.offer.clone()),
                        };
                        allocations.insert(id.as_str(), enc(&alloc))?;
                        contracts.insert(id.as_str(), enc(&contract))?;
                        // The contract is stored once; the transaction record names it.
                        transactions.insert(key.clone(), enc(&contract.id))?;
                        Ok(Reservation::New(contract))
                    },
                ),
        )?;
        Ok(outcome)
    }

    /// Consumer side: records a purchase before RESERVE_FLAVOUR leaves, so that a restarted
    /// node knows which transaction ids it may still hold a contract for.
    pub fn begin_purchase(&self, out: &Outgoing) -> Result<(), TableError> {
        self.transactions
            .insert(out_key(&out.request.transaction), enc(out))?;
        Ok(())
    }

    /// Consumer side: a purchase that ended without a contract.
    pub fn abandon_purchase(&self, tx: &Id) -> Result<(), TableError> {
        self.transactions.remove(out_key(tx))?;
        Ok(())
    }

    /// Purchases started and not finished (consumer side).
    pub fn purchases_in_flight(&self) -> Result<Vec<Outgoing>, TableError> {
        self.transactions
            .scan_prefix("out/")
            .map(|kv| {
                let (k, v) = kv?;
                dec("transactions", &k, &v)
            })
            .collect()
    }

    /// Consumer side of RESERVED (workflow steps 19-20): the contract, a VirtualNode
    /// allocation in "inactive" status, and the end of the purchase, in one transaction,
    /// flushed before returning.
    pub async fn complete_purchase(&self, c: &Contract, now: u64) -> Result<(), TableError> {
        let alloc = Allocation {
            contract: c.id.clone(),
            kind: AllocationKind::VirtualNode,
            status: AllocationStatus::Inactive,
            resources: c.resources,
            peer: c.seller.clone(),
            updated_at: now,
            offer: None,
        };
        flatten(
            (&self.contracts, &self.allocations, &self.transactions).transaction(
                |(contracts, allocations, transactions)| {
                    contracts.insert(c.id.as_str(), enc(c))?;
                    allocations.insert(c.id.as_str(), enc(&alloc))?;
                    transactions.remove(out_key(&c.transaction))?;
                    Ok(())
                },
            ),
        )?;
        self.flush().await
    }

    pub fn contracts(&self) -> Result<Vec<Contract>, TableError> {
        all("contracts", &self.contracts)
    }

    pub fn allocations(&self) -> Result<Vec<Allocation>, TableError> {
        all("allocations", &self.allocations)
    }

    pub fn contract(&self, id: &Id) -> Result<Option<Contract>, TableError> {
        one("contracts", &self.contracts, id.as_str().as_bytes())
    }

    pub fn allocation(&self, contract: &Id) -> Result<Option<Allocation>, TableError> {
        one(
            "allocations",
            &self.allocations,
            contract.as_str().as_bytes(),
        )
    }

    /// Peering completed on this side (steps 25 and 28): the contract becomes Active and
    /// its allocation active, together. Returns false if the contract is not Reserved (already
    /// active is fine for a repeated call; released or expired is not).
    pub async fn activate(&self, contract: &Id, now: u64) -> Result<bool, TableError> {
        let key = contract.as_str().as_bytes();
        let changed = flatten((&self.contracts, &self.allocations).transaction(
            |(contracts, allocations)| {
                let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? else {
                    return Ok(false);
                };
                if c.state == ContractState::Active {
                    return Ok(true);
                }
                if !contracts::can_move(c.state, ContractState::Active) {
                    return Ok(false);
                }
                c.state = ContractState::Active;
                contracts.insert(key, enc(&c))?;
                if let Some(mut a) = tx_get::<Allocation>("allocations", allocations, key)? {
                    a.status = AllocationStatus::Active;
                    a.updated_at = now;
                    allocations.insert(key, enc(&a))?;
                }
                Ok(true)
            },
        ))?;
        self.flush().await?;
        Ok(changed)
    }

    /// Ends a live contract as Released or Expired: its allocation is released and, on the
    /// provider, the resources go back into the offer's flavour (the old flavour is deleted
    /// and a larger one created under a new id), all in one transaction, flushed. Returns
    /// the ended contract, or `None` if it was not live (ending twice is harmless).
    pub async fn end_contract(
        &self,
        contract: &Id,
        end: ContractState,
        now: u64,
    ) -> Result<Option<Contract>, TableError> {
        let key = contract.as_str().as_bytes();
        // The offer's current flavour, found outside the transaction (sled transactions cannot
        // scan) and re-read inside it, so a concurrent change makes the transaction retry.
        let alloc = self.allocation(contract)?;
        let offer_id = alloc.as_ref().and_then(|a| a.offer.clone());
        let current = match &offer_id {
            Some(o) => self
                .flavours()?
                .into_iter()
                .find(|f| &f.offer == o)
                .map(|f| f.flavour.id),
            None => None,
        };
        let ended = flatten(
            (
                &self.offers,
                &self.available,
                &self.allocations,
                &self.contracts,
            )
                .transaction(|(offers, available, allocations, contracts)| {
                    let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? else {
                        return Ok(None);
                    };
                    if !contracts::can_move(c.state, end) {
                        return Ok(None);
                    }
                    c.state = end;
                    contracts.insert(key, enc(&c))?;
                    let Some(mut a) = tx_get::<Allocation>("allocations", allocations, key)? else {
                        return Ok(Some(c));
                    };
                    a.status = AllocationStatus::Released;
                    a.updated_at = now;
                    allocations.insert(key, enc(&a))?;
                    let (AllocationKind::Node, Some(offer_id)) = (a.kind, &a.offer) else {
                        return Ok(Some(c));
                    };
                    let Some(offer) =
                        tx_get::<Flavour>("offers", offers, offer_id.as_str().as_bytes())?
                    else {
                        // The offer was withdrawn from the config: nothing to give back to.
                        return Ok(Some(c));
                    };
                    let mut back = a.resources;
                    if let Some(old) = &current {
                        if let Some(own) =
                            tx_get::<OwnFlavour>("available", available, old.as_str().as_bytes())?
                        {
                            back = back.saturating_add(&own.flavour.resources);
                            available.remove(old.as_str())?;
                        }
                    }
                    offer_cut(available, offer_id, &offer, back)?;
                    Ok(Some(c))
                }),
        )?;
        self.flush().await?;
        Ok(ended)
    }

    /// How many reservations each buyer holds from `me` that are not peered yet.
    pub fn unpeered_by_buyer(
        &self,
        me: &Id,
    ) -> Result<std::collections::HashMap<Id, u32>, TableError> {
        let mut out = std::collections::HashMap::new();
        self.each_contract(|c| {
            if &c.seller == me && c.state == ContractState::Reserved {
                *out.entry(c.buyer).or_insert(0) += 1;
            }
        })?;
        Ok(out)
    }

    /// Calls `f` with every contract, decoding one at a time: a scan that keeps one contract
    /// in memory, not the whole table (a table of 10,000 contracts decoded at once took
    /// about 10 MB, the provider's peak RSS under load).
    pub fn each_contract(&self, mut f: impl FnMut(Contract)) -> Result<(), TableError> {
        for kv in self.contracts.iter() {
            let (k, v) = kv?;
            f(dec("contracts", &k, &v)?);
        }
        Ok(())
    }

    /// Reserved contracts whose peering deadline has passed, and live contracts whose term
    /// ran out unrenewed (`ends_at`).
    pub fn lapsed(&self, now: u64) -> Result<Vec<Contract>, TableError> {
        let mut out = Vec::new();
        self.each_contract(|c| {
            let unpeered = c.state == ContractState::Reserved && c.expires_at <= now;
            let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
            if unpeered || (live && c.ends_at.is_some_and(|e| e <= now)) {
                out.push(c);
            }
        })?;
        Ok(out)
    }

    /// What `buyer` holds now of `offer` (live Node allocations, provider side).
    pub fn held_by(&self, buyer: &Id, offer: &Id) -> Result<Resources, TableError> {
        let mut held = Resources::default();
        for a in all::<Allocation>("allocations", &self.allocations)? {
            if a.kind == AllocationKind::Node
                && a.status != AllocationStatus::Released
                && &a.peer == buyer
                && a.offer.as_ref() == Some(offer)
            {
                held = held.saturating_add(&a.resources);
            }
        }
        Ok(held)
    }

    /// The flavour on offer now under `id`, with its offer.
    pub fn own_flavour(&self, id: &Id) -> Result<Option<OwnFlavour>, TableError> {
        one("available", &self.available, id.as_str().as_bytes())
    }

    /// Renews a live contract with a term: `ends_at` becomes `max(ends_at, now + term)` (a
    /// repeated renewal never adds a second term), flushed. Returns the contract as it is
    /// now, or `None` if it is not live. A contract without a term is returned unchanged.
    pub async fn renew(&self, contract: &Id, now: u64) -> Result<Option<Contract>, TableError> {
        let key = contract.as_str().as_bytes();
        let out = flatten(self.contracts.transaction(|contracts| {
            let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? else {
                return Ok(None);
            };
            let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
            if !live || c.ends_at.is_some_and(|e| e <= now) {
                return Ok(None);
            }
            if let Some(t) = c.term_ms {
                let end = now.saturating_add(t).max(c.ends_at.unwrap_or(0));
                if c.ends_at != Some(end) {
                    c.ends_at = Some(end);
                    contracts.insert(key, enc(&c))?;
                }
            }
            Ok(Some(c))
        }))?;
        if out.is_some() {
            self.flush().await?;
        }
        Ok(out)
    }

    /// Buyer side: records the end a seller's RENEWED gave a contract (only ever later).
    pub async fn extend(&self, contract: &Id, ends_at: u64) -> Result<(), TableError> {
        let key = contract.as_str().as_bytes();
        flatten(self.contracts.transaction(|contracts| {
            if let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? {
                if c.ends_at.is_some_and(|e| e < ends_at) {
                    c.ends_at = Some(ends_at);
                    contracts.insert(key, enc(&c))?;
                }
            }
            Ok(())
        }))?;
        self.flush().await
    }

    /// Remembers the PEER_ACCEPT given for a contract, so a repeated PEER_REQUEST gets the
    /// same answer (the peering user cannot be generated twice).
    pub fn put_peer_grant(&self, grant: &PeerAccept) -> Result<(), TableError> {
        let key = format!("peer/{}", grant.contract);
        self.transactions.insert(key, enc(grant))?;
        Ok(())
    }

    pub fn peer_grant(&self, contract: &Id) -> Result<Option<PeerAccept>, TableError> {
        one(
            "transactions",
            &self.transactions,
            format!("peer/{contract}").as_bytes(),
        )
    }

    /// Remembers the consumer's cluster id a peering was granted to (for the teardown).
    pub fn put_peer_cluster(&self, contract: &Id, cluster: &Id) -> Result<(), TableError> {
        self.transactions
            .insert(format!("peer-cluster/{contract}"), enc(cluster))?;
        Ok(())
    }

    pub fn peer_cluster(&self, contract: &Id) -> Result<Option<Id>, TableError> {
        let key = format!("peer-cluster/{contract}");
        one("transactions", &self.transactions, key.as_bytes())
    }

    /// Stores an intent, flushed: a submitted intent survives a crash.
    pub async fn put_intent(&self, intent: &Intent) -> Result<(), TableError> {
        self.intents.insert(intent.id.as_str(), enc(intent))?;
        self.flush().await
    }

    pub fn intents(&self) -> Result<Vec<Intent>, TableError> {
        all("intents", &self.intents)
    }

    pub fn intent(&self, id: &Id) -> Result<Option<Intent>, TableError> {
        one("intents", &self.intents, id.as_str().as_bytes())
    }

    /// The candidates, however a panicking holder left them (each update is complete or not
    /// made: a poisoned lock holds no half-written entry).
    fn cands(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.candidates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces everything known of `provider` with `flavours` (an advert or an answer).
    pub fn replace_candidates(
        &self,
        provider: &Id,
        flavours: &[Flavour],
        now: u64,
    ) -> Result<(), TableError> {
        let prefix = format!("{provider}/").into_bytes();
        let mut map = self.cands();
        let old: Vec<Vec<u8>> = map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            map.remove(&k);
        }
        for f in flavours {
            let c = Candidate {
                flavour: f.clone(),
                seen_at: now,
            };
            map.insert(candidate_key(provider, &f.id), enc(&c));
        }
        Ok(())
    }

    /// Adds or refreshes `provider`'s candidates `flavours` (an answer lists only what matched
    /// its selector, so nothing else of the provider is dropped). A provider keeps at most
    /// [`MAX_CANDIDATES_PER_PROVIDER`]: beyond it the ones seen longest ago are forgotten
    /// (their number is returned), so a provider answering every discovery with new flavour
    /// ids cannot grow the table.
    pub fn add_candidates<'a>(
        &self,
        provider: &Id,
        flavours: impl IntoIterator<Item = &'a Flavour>,
        now: u64,
    ) -> Result<usize, TableError> {
        let prefix = format!("{provider}/").into_bytes();
        let mut map = self.cands();
        for f in flavours {
            let c = Candidate {
                flavour: f.clone(),
                seen_at: now,
            };
            map.insert(candidate_key(provider, &f.id), enc(&c));
        }
        let mut theirs = Vec::new();
        for (k, v) in map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
        {
            let c: Candidate = dec("candidates", k, v)?;
            theirs.push((c.seen_at, k.clone()));
        }
        let over = theirs.len().saturating_sub(MAX_CANDIDATES_PER_PROVIDER);
        if over > 0 {
            theirs.sort();
            for (_, k) in theirs.into_iter().take(over) {
                map.remove(&k);
            }
        }
        Ok(over)
    }

    /// A number never handed out before by this database (ids of transactions).
    pub fn generate_id(&self) -> Result<u64, TableError> {
        Ok(self.db.generate_id()?)
    }

    /// Forgets one candidate (it was sold or refused).
    pub fn remove_candidate(&self, provider: &Id, flavour: &Id) -> Result<(), TableError> {
        self.cands().remove(&candidate_key(provider, flavour));
        Ok(())
    }

    /// How many peering candidates are kept.
    pub fn candidate_count(&self) -> Result<usize, TableError> {
        Ok(self.cands().len())
    }

    /// Every peering candidate, by provider then flavour id.
    pub fn candidates(&self) -> Result<Vec<Candidate>, TableError> {
        self.cands()
            .iter()
            .map(|(k, v)| dec("candidates", k, v))
            .collect()
    }

    /// Records the outcome of a reservation attempt with `provider`.
    pub fn rate(&self, provider: &Id, ok: bool, latency_ms: u64) -> Result<(), TableError> {
        self.update_rating(provider, |r| {
            if ok {
                r.reservations_ok += 1;
                r.last_latency_ms = latency_ms;
            } else {
                r.reservations_failed += 1;
            }
        })
    }

    /// Records that `provider` lied to a purchase (refused or ignored what it had just
    /// offered) and demotes it until `until` (Unix ms; a longer demotion already running is
    /// kept).
    pub fn demote(&self, provider: &Id, until: u64) -> Result<(), TableError> {
        self.update_rating(provider, |r| {
            r.lies += 1;
            r.demoted_until = r.demoted_until.max(until);
        })
    }

    /// Records the outcome of a peering with `provider`.
    pub fn rate_peering(&self, provider: &Id, ok: bool, ms: u64) -> Result<(), TableError> {
        self.update_rating(provider, |r| {
            if ok {
                r.peerings_ok += 1;
                r.last_peering_ms = ms;
            } else {
                r.peerings_failed += 1;
            }
        })
    }

    /// Applies `change` to `provider`'s rating atomically (flows running at once do not lose
    /// each other's counts); a rating that does not decode is reported, not overwritten.
    fn update_rating(&self, provider: &Id, change: impl Fn(&mut Rating)) -> Result<(), TableError> {
        let key = provider.as_str().as_bytes();
        let mut bad = None;
        self.ratings.update_and_fetch(key, |old| {
            let mut r = match old.map(|v| dec::<Rating>("ratings", key, v)).transpose() {
                Ok(r) => r.unwrap_or_default(),
                Err(e) => {
                    bad = Some(e);
                    return old.map(|v| v.to_vec());
                }
            };
            change(&mut r);
            Some(enc(&r))
        })?;
        bad.map_or(Ok(()), Err)
    }

    pub fn rating(&self, provider: &Id) -> Result<Option<Rating>, TableError> {
        one("ratings", &self.ratings, provider.as_str().as_bytes())
    }

    /// Records per table (each count is a scan: for metrics, not for hot paths).
    pub fn sizes(&self) -> [(&'static str, usize); 8] {
        [
            ("offers", self.offers.len()),
            ("available", self.available.len()),
            ("allocations", self.allocations.len()),
            ("candidates", self.cands().len()),
            ("contracts", self.contracts.len()),
            ("transactions", self.transactions.len()),
            ("ratings", self.ratings.len()),
            ("intents", self.intents.len()),
        ]
    }
}

/// Puts the flavour offering `left` of `offer` (whose id is `offer_id`) on offer under a new
/// flavour id, inside a transaction.
fn offer_cut(
    available: &TransactionalTree,
    offer_id: &Id,
    offer: &Flavour,
    left: Resources,
) -> TxResult<()> {
    let id = flavour_id(offer_id, available.generate_id()?)?;
    let own = OwnFlavour {
        offer: offer_id.clone(),
        flavour: cut(offer, &id, left),
    };
    available.insert(id.as_str(), enc(&own))?;
    Ok(())
}

/// The flavour that offers `left` of `offer` under `id`, priced pro rata from the offer's
/// total (so the unit price stays the same however the offer is cut).
fn cut(offer: &Flavour, id: &Id, left: Resources) -> Flavour {
    let mut f = Flavour {
        id: id.clone(),
        resources: left,
        ..offer.clone()
    };
    f.price.amount = price_of(offer, &left);
    f
}
