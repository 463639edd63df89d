//! The node's tables in sled, one tree each, and the multi-tree updates that must be atomic.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `offers` | offer id | the configured offer: a [`Flavour`] whose resources are the total |
//! | `available` | flavour id | [`OwnFlavour`]: what is on offer now (Available Resources) |
//! | `allocations` | contract id | [`Allocation`] (Node on the provider, VirtualNode on the consumer) |
//! | (in memory) | `{provider}/{flavour}` | [`Candidate`] (Peering Candidates), CBOR-encoded |
//! | `contracts` | contract id | [`Contract`] |
//! | `transactions` | `in/{buyer}/{tx}` or `out/{tx}` | the id of the contract the first answer gave, or a purchase in flight |
//! | `deadlines` | big-endian deadline (Unix ms, 8 bytes) + contract id | empty: the contract has something due then |
//! | `terms` | offer id | [`Epoch`]: first flavour number issued under the offer's current terms, and the terms of sale set outside its record |
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
//!
//! The `deadlines` index holds an entry per thing a contract has due at a known time: a
//! Reserved contract at its peering deadline (`expires_at`), a live (Reserved or Active)
//! contract with a term at the end of it (`ends_at`, moved by a renewal), an ended (Released
//! or Expired) contract at the end of its retention. Each entry is written
//! and removed in the same transaction that creates or changes the contract, so the expiry
//! sweeper reads only the entries due ([`Tables::due`]) and decodes only those contracts.
//! Contracts are stored once, in `contracts`; a transaction record holds the contract's id
//! (records written before this version hold a copy, and are still read).

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
use std::time::Duration;

/// Peering candidates kept per provider: twice the flavours of one advert, since answers to
/// different selectors list different flavours and ids change as flavours are cut.
pub const MAX_CANDIDATES_PER_PROVIDER: usize = 2 * crate::model::MAX_FLAVOURS;

/// Why a table operation failed. Refusals of a reservation are not errors: see [`Reservation`].
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("cannot make the tables durable: {0}")]
    Sync(#[from] std::io::Error),
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
    deadlines: Tree,
    terms: Tree,
    /// How long an ended contract is kept, in milliseconds.
    retention_ms: u64,
    /// sled's log file (`{dir}/db`), for the `fdatasync` that [`Tables::flush`] adds to
    /// sled's own flush (see there).
    log: Arc<std::fs::File>,
}

/// The key of a `deadlines` entry: the deadline in big-endian Unix milliseconds (so keys sort
/// by time), then the contract id.
pub fn deadline_key(deadline: u64, contract: &Id) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + contract.as_str().len());
    k.extend_from_slice(&deadline.to_be_bytes());
    k.extend_from_slice(contract.as_str().as_bytes());
    k
}

/// The deadline and contract id of a `deadlines` key; `None` for a key that is not one.
pub fn parse_deadline_key(key: &[u8]) -> Option<(u64, Id)> {
    let (at, id) = key.split_first_chunk::<8>()?;
    let id = Id::new(std::str::from_utf8(id).ok()?).ok()?;
    Some((u64::from_be_bytes(*at), id))
}

/// What a transaction record (`in/{buyer}/{tx}`) holds: the contract's id, or, for records
/// written before contracts were stored once, a copy of the contract.
enum TxRecord {
    Points(Id),
    Copy(Box<Contract>),
}

fn dec_tx_record(key: &[u8], bytes: &[u8]) -> Result<TxRecord, TableError> {
    if let Ok(id) = minicbor::decode::<Id>(bytes) {
        return Ok(TxRecord::Points(id));
    }
    dec("transactions", key, bytes).map(|c| TxRecord::Copy(Box::new(c)))
}

fn is_ended(s: ContractState) -> bool {
    matches!(s, ContractState::Released | ContractState::Expired)
}

/// The `deadlines` entries a contract needs while it is live: its peering deadline while
/// Reserved, and the end of its term (`ends_at`) while Reserved or Active. An ended contract
/// needs none of these; it gets its retention entry when it ends.
fn live_deadlines(c: &Contract) -> impl Iterator<Item = u64> {
    let reserved = c.state == ContractState::Reserved;
    let live = reserved || c.state == ContractState::Active;
    [reserved.then_some(c.expires_at), c.ends_at.filter(|_| live)]
        .into_iter()
        .flatten()
}

/// Moves a contract's live `deadlines` entries from those `old` needed to those `new` needs,
/// inside a transaction (removals first, so an entry both need stays).
fn reindex(deadlines: &TransactionalTree, old: &Contract, new: &Contract) -> TxResult<()> {
    for at in live_deadlines(old) {
        deadlines.remove(deadline_key(at, &old.id))?;
    }
    for at in live_deadlines(new) {
        deadlines.insert(deadline_key(at, &new.id), &[])?;
    }
    Ok(())
}

/// Terms of sale of an offer that live in the configuration rather than in its flavour
/// record: the share cap and the contract term. Changing them is a change of terms for
/// superseded flavour ids (docs/protocol.md, "Superseded flavour ids").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct SaleTerms {
    /// `max_per_buyer`, percent of the offer's total.
    #[n(0)]
    pub max_per_buyer: u8,
    /// The contract term in milliseconds.
    #[n(1)]
    pub term_ms: u64,
}

/// A `terms` record: flavour ids of the offer numbered from `first` on were issued under the
/// offer's current flavour record and `sale` terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Epoch {
    #[n(0)]
    pub first: u64,
    #[n(1)]
    pub sale: SaleTerms,
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
    /// Opens (or creates) the tables under `dir`, keeping ended contracts for the default
    /// retention ([`crate::config::DEFAULT_RETENTION`]).
    pub fn open(dir: &Path) -> Result<Tables, TableError> {
        Tables::open_with(dir, crate::config::DEFAULT_RETENTION)
    }

    /// Opens (or creates) the tables under `dir`, keeping ended contracts for `retention`.
    pub fn open_with(dir: &Path, retention: Duration) -> Result<Tables, TableError> {
        let db = sled::Config::new()
            .path(dir)
            // A gateway has little memory and the tables are small: 1 MiB of page cache keeps
            // the hot records (flavours, recent contracts) without letting a burst of
            // reservations grow the agent (the benchmark's peak RSS shows it).
            .cache_capacity(1024 * 1024)
            .open()?;
        let t = Tables {
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
            deadlines: db.open_tree("deadlines")?,
            terms: db.open_tree("terms")?,
            retention_ms: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
            log: Arc::new(std::fs::File::open(dir.join("db"))?),
            db,
        };
        t.index_deadlines(crate::model::unix_ms())?;
        Ok(t)
    }

    /// Builds the `deadlines` index of a database written before it existed (once): Reserved
    /// contracts at their peering deadline, live ones with a term at its end (`ends_at`),
    /// ended ones at `now` plus the retention.
    fn index_deadlines(&self, now: u64) -> Result<(), TableError> {
        let meta = self.db.open_tree("meta")?;
        if meta.contains_key(b"deadlines")? {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for c in self.contracts()? {
            if is_ended(c.state) {
                batch.insert(
                    deadline_key(now.saturating_add(self.retention_ms), &c.id),
                    &[],
                );
            }
            for at in live_deadlines(&c) {
                batch.insert(deadline_key(at, &c.id), &[]);
            }
        }
        self.deadlines.apply_batch(batch)?;
        meta.insert(b"deadlines", &[1u8])?;
        Ok(())
    }

    /// Opens the tables of node `me` for running it, and checks they are the ones it left.
    ///
    /// sled recovers from a damaged log by truncating it, silently: a node whose database was
    /// damaged (or replaced by an empty one) would come back with no contracts and re-offer
    /// capacity it already sold. So the node's id is kept both inside the database (tree
    /// `meta`) and in a marker file beside it (`fluidlet.node`); a marker without the record
    /// is reported as [`TableError::Damaged`] and the node refuses to start.
    pub async fn open_for(dir: &Path, me: &Id, retention: Duration) -> Result<Tables, TableError> {
        let t = Tables::open_with(dir, retention)?;
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
        // sled 0.34 ends its flush on Linux with `sync_file_range` alone, which writes the
        // pages out but neither the file's metadata nor the disk's volatile write cache (its
        // man page: "no guarantees that the data will be available after a crash"). A
        // power cut on a gateway's SD card could then lose a reservation already answered
        // OK. `fdatasync` on the log makes it durable; with group commit, once per batch.
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.sync_data())
            .await
            .map_err(|e| TableError::Sync(std::io::Error::other(e.to_string())))??;
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
    /// whose id is the offer id and whose resources are the total, with its [`SaleTerms`]) is
    /// advertised with its total minus what live reservations hold; offers no longer
    /// configured are withdrawn. Called at start, before the node serves anything.
    pub async fn sync_offers(&self, configured: &[(Flavour, SaleTerms)]) -> Result<(), TableError> {
        let mut wanted = Vec::new();
        for (offer, sale) in configured {
            let held = self.held(&offer.id)?;
            let left =
                offer
                    .resources
                    .checked_sub(&held)
                    .ok_or_else(|| TableError::OfferShrunk {
                        offer: offer.id.to_string(),
                        held: Box::new(held),
                    })?;
            wanted.push((offer, left, *sale));
        }
        let current: Vec<OwnFlavour> = all("available", &self.available)?;
        let stored: Vec<Flavour> = all("offers", &self.offers)?;
        flatten((&self.offers, &self.available, &self.terms).transaction(
            |(offers, available, terms)| {
                for old in &stored {
                    if !configured.iter().any(|(o, _)| o.id == old.id) {
                        offers.remove(old.id.as_str())?;
                        terms.remove(old.id.as_str())?;
                    }
                }
                for own in &current {
                    let keep = wanted.iter().any(|(o, left, _)| {
                        own.offer == o.id && own.flavour == cut(o, &own.flavour.id, *left)
                    });
                    if !keep {
                        available.remove(own.flavour.id.as_str())?;
                    }
                }
                for (o, left, sale) in &wanted {
                    // Flavour ids issued before the offer's terms last changed (its record, or
                    // its share cap or contract term), or before this record existed, are not
                    // served as superseded ids. A record that does not decode (an older
                    // format) counts as absent.
                    let same = stored.iter().any(|old| old == *o);
                    let epoch = terms
                        .get(o.id.as_str())?
                        .and_then(|v| minicbor::decode::<Epoch>(&v).ok());
                    if !same || epoch.is_none_or(|e| e.sale != *sale) {
                        let first = available.generate_id()?;
                        terms.insert(o.id.as_str(), enc(&Epoch { first, sale: *sale }))?;
                    }
                    offers.insert(o.id.as_str(), enc(*o))?;
                    let kept = current.iter().any(|own| {
                        own.offer == o.id && own.flavour == cut(o, &own.flavour.id, *left)
                    });
                    if !kept && !left.is_zero() {
                        offer_cut(available, &o.id, o, *left)?;
                    }
                }
                Ok(())
            },
        ))?;
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
        // A flavour id no longer on offer may be a superseded id of an offer (docs/protocol.md,
        // "Superseded flavour ids"): the offer's current flavour is found outside the
        // transaction (sled transactions cannot scan) and re-read inside it, so a concurrent
        // change makes the transaction retry.
        let superseded = match self.available.contains_key(req.flavour.as_str())? {
            true => None,
            false => superseded_offer(&req.flavour).and_then(|(offer, n)| {
                let current = self
                    .available
                    .iter()
                    .filter_map(|kv| {
                        let (k, v) = kv.ok()?;
                        let own: OwnFlavour = dec("available", &k, &v).ok()?;
                        (own.offer == offer).then_some(own.flavour.id)
                    })
                    .next()?;
                Some((offer, n, current))
            }),
        };
        let outcome = flatten(
            (
                &self.offers,
                &self.available,
                &self.allocations,
                &self.contracts,
                &self.transactions,
                &self.deadlines,
                &self.terms,
            )
                .transaction(
                    |(
                        offers,
                        available,
                        allocations,
                        contracts,
                        transactions,
                        deadlines,
                        terms,
                    )| {
                        if let Some(v) = transactions.get(&key)? {
                            let first = match dec_tx_record(&key, &v)
                                .map_err(ConflictableTransactionError::Abort)?
                            {
                                TxRecord::Copy(c) => *c,
                                TxRecord::Points(id) => {
                                    let Some(mut c) = tx_get::<Contract>(
                                        "contracts",
                                        contracts,
                                        id.as_str().as_bytes(),
                                    )?
                                    else {
                                        return Err(ConflictableTransactionError::Abort(
                                            TableError::Corrupt {
                                                tree: "transactions",
                                                key: String::from_utf8_lossy(&key).into_owned(),
                                                reason: format!("contract {id} is missing"),
                                            },
                                        ));
                                    };
                                    // The first answer: the contract as it was sold. Only
                                    // the state and a renewal's `ends_at` change after it.
                                    c.state = ContractState::Reserved;
                                    c.ends_at = c.term_ms.map(|t| c.created_at.saturating_add(t));
                                    c
                                }
                            };
                            return Ok(Reservation::Repeat(first));
                        }
                        if let Some(n) = admit.pending_full {
                            return Ok(Reservation::Refused(Refusal::TooManyPending(n)));
                        }
                        let gone = || {
                            Ok(Reservation::Refused(Refusal::FlavourGone(
                                req.flavour.clone(),
                            )))
                        };
                        let own = match tx_get::<OwnFlavour>(
                            "available",
                            available,
                            req.flavour.as_str().as_bytes(),
                        )? {
                            Some(own) => own,
                            None => {
                                let Some((offer, n, current)) = &superseded else {
                                    return gone();
                                };
                                // A record that does not decode is an older format: no
                                // superseded id is served for the offer until it is rewritten.
                                let epoch = terms
                                    .get(offer.as_str().as_bytes())?
                                    .and_then(|v| minicbor::decode::<Epoch>(&v).ok());
                                if req.partition.is_none() || epoch.is_none_or(|e| *n < e.first) {
                                    return gone();
                                }
                                match tx_get::<OwnFlavour>(
                                    "available",
                                    available,
                                    current.as_str().as_bytes(),
                                )? {
                                    Some(own) if &own.offer == offer => own,
                                    _ => return gone(),
                                }
                            }
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
                        available.remove(own.flavour.id.as_str())?;
                        if let Some(left) = remainder {
                            let offer: Flavour =
                                tx_get("offers", offers, own.offer.as_str().as_bytes())?
                                    .unwrap_or_else(|| own.flavour.clone());
                            offer_cut(available, &own.offer, &offer, left)?;
                        }
                        // The flavour bought, under the id the buyer named (a superseded id
                        // names the same terms; the resources are those it was served from).
                        let flavour = Flavour {
                            id: req.flavour.clone(),
                            ..own.flavour.clone()
                        };
                        let contract = Contract {
                            id: id.clone(),
                            transaction: req.transaction.clone(),
                            flavour,
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
                        transactions.insert(key.clone(), enc(&id))?;
                        for at in live_deadlines(&contract) {
                            deadlines.insert(deadline_key(at, &id), &[])?;
                        }
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
            (
                &self.contracts,
                &self.allocations,
                &self.transactions,
                &self.deadlines,
            )
                .transaction(|(contracts, allocations, transactions, deadlines)| {
                    contracts.insert(c.id.as_str(), enc(c))?;
                    allocations.insert(c.id.as_str(), enc(&alloc))?;
                    transactions.remove(out_key(&c.transaction))?;
                    for at in live_deadlines(c) {
                        deadlines.insert(deadline_key(at, &c.id), &[])?;
                    }
                    Ok(())
                }),
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
        let changed = flatten(
            (&self.contracts, &self.allocations, &self.deadlines).transaction(
                |(contracts, allocations, deadlines)| {
                    let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? else {
                        return Ok(false);
                    };
                    if c.state == ContractState::Active {
                        return Ok(true);
                    }
                    if !contracts::can_move(c.state, ContractState::Active) {
                        return Ok(false);
                    }
                    let before = c.clone();
                    c.state = ContractState::Active;
                    contracts.insert(key, enc(&c))?;
                    // Peered: the peering deadline no longer applies; the term's end does.
                    reindex(deadlines, &before, &c)?;
                    if let Some(mut a) = tx_get::<Allocation>("allocations", allocations, key)? {
                        a.status = AllocationStatus::Active;
                        a.updated_at = now;
                        allocations.insert(key, enc(&a))?;
                    }
                    Ok(true)
                },
            ),
        )?;
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
        let retention_ms = self.retention_ms;
        let ended = flatten(
            (
                &self.offers,
                &self.available,
                &self.allocations,
                &self.contracts,
                &self.deadlines,
            )
                .transaction(
                    |(offers, available, allocations, contracts, deadlines)| {
                        let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? else {
                            return Ok(None);
                        };
                        if !contracts::can_move(c.state, end) {
                            return Ok(None);
                        }
                        // Ended: the peering deadline and the term's end no longer apply; the
                        // retention does.
                        for at in live_deadlines(&c) {
                            deadlines.remove(deadline_key(at, &c.id))?;
                        }
                        c.state = end;
                        contracts.insert(key, enc(&c))?;
                        let kept_until = now.saturating_add(retention_ms);
                        deadlines.insert(deadline_key(kept_until, &c.id), &[])?;
                        let Some(mut a) = tx_get::<Allocation>("allocations", allocations, key)?
                        else {
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
                            if let Some(own) = tx_get::<OwnFlavour>(
                                "available",
                                available,
                                old.as_str().as_bytes(),
                            )? {
                                back = back.saturating_add(&own.flavour.resources);
                                available.remove(old.as_str())?;
                            }
                        }
                        offer_cut(available, offer_id, &offer, back)?;
                        Ok(Some(c))
                    },
                ),
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

    /// Calls `f` with every contract `me` did not sell, one decoded at a time. Contracts
    /// `me` sold (ids `{me}.c{n}`, docs/protocol.md) are skipped by their key, without
    /// decoding: a provider holds thousands of sales and buys a few, and the buyer's renewal
    /// check runs every `expiry_check`.
    pub fn each_bought(&self, me: &Id, mut f: impl FnMut(Contract)) -> Result<(), TableError> {
        let sold = format!("{me}.c");
        for kv in self.contracts.iter() {
            let (k, v) = kv?;
            let mine = k
                .strip_prefix(sold.as_bytes())
                .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit));
            if !mine {
                f(dec("contracts", &k, &v)?);
            }
        }
        Ok(())
    }

    /// The entries of the `deadlines` index due at `now` (deadline not after it), earliest
    /// first, at most `limit`: (deadline, contract id). Decodes no contract.
    pub fn due(&self, now: u64, limit: usize) -> Result<Vec<(u64, Id)>, TableError> {
        let mut out = Vec::new();
        let end = now.saturating_add(1).to_be_bytes();
        for kv in self.deadlines.range(..&end[..]).take(limit) {
            let (k, _) = kv?;
            match parse_deadline_key(&k) {
                Some(entry) => out.push(entry),
                None => {
                    // Not a key this code writes: drop it rather than read it every tick.
                    self.deadlines.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// How many entries the `deadlines` index holds.
    pub fn deadline_count(&self) -> usize {
        self.deadlines.len()
    }

    /// Forgets the `deadlines` entry (`deadline`, `contract`) alone (it is stale: the
    /// contract is gone, or nothing of it is due then any more).
    pub fn drop_deadline(&self, deadline: u64, contract: &Id) -> Result<(), TableError> {
        self.deadlines.remove(deadline_key(deadline, contract))?;
        Ok(())
    }

    /// Deletes an ended contract whose retention is over (entry `deadline` of the index), with
    /// everything kept for it: its allocation, the transaction record that points to it, the
    /// peering grant and the consumer cluster, and the index entry; in one transaction.
    /// Returns false (and deletes nothing but the entry) if the contract is not ended, and
    /// false (deleting nothing) if the entry is no longer in the index: it was read before
    /// the transaction that ended the contract removed it, so it is not the retention's.
    pub fn prune(&self, deadline: u64, contract: &Id) -> Result<bool, TableError> {
        let key = contract.as_str().as_bytes();
        flatten(
            (
                &self.contracts,
                &self.allocations,
                &self.transactions,
                &self.deadlines,
            )
                .transaction(|(contracts, allocations, transactions, deadlines)| {
                    if deadlines
                        .remove(deadline_key(deadline, contract))?
                        .is_none()
                    {
                        return Ok(false);
                    }
                    let Some(c) = tx_get::<Contract>("contracts", contracts, key)? else {
                        return Ok(false);
                    };
                    if !is_ended(c.state) {
                        return Ok(false);
                    }
                    contracts.remove(key)?;
                    allocations.remove(key)?;
                    let tx = in_key(&c.buyer, &c.transaction);
                    if let Some(v) = transactions.get(&tx)? {
                        let ours = match dec_tx_record(&tx, &v) {
                            Ok(TxRecord::Points(id)) => id == c.id,
                            Ok(TxRecord::Copy(old)) => old.id == c.id,
                            Err(_) => false,
                        };
                        if ours {
                            transactions.remove(tx)?;
                        }
                    }
                    transactions.remove(format!("peer/{contract}").as_bytes())?;
                    transactions.remove(format!("peer-cluster/{contract}").as_bytes())?;
                    Ok(true)
                }),
        )
    }

    /// How many transaction records (`in/...`) are stored.
    pub fn transaction_record_count(&self) -> usize {
        self.transactions.scan_prefix("in/").count()
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

    /// The offer a flavour id belongs to: the offer of the flavour on offer under `id`, or, for
    /// an id no longer on offer that has the form of a superseded id (`{offer}.{n}`), that
    /// offer if it is configured. Whether the id is still served is decided by the reservation.
    pub fn offer_of(&self, id: &Id) -> Result<Option<Id>, TableError> {
        if let Some(own) = self.own_flavour(id)? {
            return Ok(Some(own.offer));
        }
        match superseded_offer(id) {
            Some((offer, _)) if self.offers.contains_key(offer.as_str())? => Ok(Some(offer)),
            _ => Ok(None),
        }
    }

    /// Renews a live contract with a term: `ends_at` becomes `max(ends_at, now + term)` (a
    /// repeated renewal never adds a second term), flushed. Returns the contract as it is
    /// now, or `None` if it is not live. A contract without a term is returned unchanged.
    /// The contract's `deadlines` entry moves to the new end in the same transaction.
    pub async fn renew(&self, contract: &Id, now: u64) -> Result<Option<Contract>, TableError> {
        let key = contract.as_str().as_bytes();
        let out = flatten((&self.contracts, &self.deadlines).transaction(
            |(contracts, deadlines)| {
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
                        let before = c.clone();
                        c.ends_at = Some(end);
                        contracts.insert(key, enc(&c))?;
                        reindex(deadlines, &before, &c)?;
                    }
                }
                Ok(Some(c))
            },
        ))?;
        if out.is_some() {
            self.flush().await?;
        }
        Ok(out)
    }

    /// Buyer side: records the end a seller's RENEWED gave a contract (only ever later),
    /// moving its `deadlines` entry in the same transaction.
    pub async fn extend(&self, contract: &Id, ends_at: u64) -> Result<(), TableError> {
        let key = contract.as_str().as_bytes();
        flatten(
            (&self.contracts, &self.deadlines).transaction(|(contracts, deadlines)| {
                if let Some(mut c) = tx_get::<Contract>("contracts", contracts, key)? {
                    if c.ends_at.is_some_and(|e| e < ends_at) {
                        let before = c.clone();
                        c.ends_at = Some(ends_at);
                        contracts.insert(key, enc(&c))?;
                        reindex(deadlines, &before, &c)?;
                    }
                }
                Ok(())
            }),
        )?;
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

    /// Forgets every candidate last advertised or listed before `cutoff` (Unix ms): a
    /// provider whose adverts stopped coming (`advert_max_age`). Returns how many went.
    pub fn forget_candidates_seen_before(&self, cutoff: u64) -> usize {
        let mut map = self.cands();
        let old: Vec<Vec<u8>> = map
            .iter()
            .filter(|(_, v)| {
                minicbor::decode::<Candidate>(v)
                    .map(|c| c.seen_at < cutoff)
                    .unwrap_or(true)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            map.remove(k);
        }
        old.len()
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
    pub fn sizes(&self) -> [(&'static str, usize); 10] {
        [
            ("offers", self.offers.len()),
            ("available", self.available.len()),
            ("allocations", self.allocations.len()),
            ("candidates", self.cands().len()),
            ("contracts", self.contracts.len()),
            ("transactions", self.transactions.len()),
            ("ratings", self.ratings.len()),
            ("intents", self.intents.len()),
            ("deadlines", self.deadlines.len()),
            ("terms", self.terms.len()),
        ]
    }
}

/// The offer and flavour number of a flavour id `{offer}.{n}`, if it has that form.
fn superseded_offer(flavour: &Id) -> Option<(Id, u64)> {
    let (offer, n) = flavour.as_str().rsplit_once('.')?;
    Some((Id::new(offer).ok()?, n.parse().ok()?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resources;

    const MIN: u64 = 60_000;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    fn piece() -> Option<Resources> {
        Some(Resources {
            cpu: 500,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        })
    }

    fn request(tx: &str, flavour: &Id) -> ReserveRequest {
        ReserveRequest {
            transaction: id(tx),
            flavour: flavour.clone(),
            buyer: id("buyer"),
            partition: piece(),
        }
    }

    async fn provider(dir: &Path, retention: Duration) -> (Tables, Id) {
        let t = Tables::open_with(dir, retention).unwrap();
        let me = id("prov");
        t.sync_offers(&[(crate::model::demo_offer(&me), SaleTerms::default())])
            .await
            .unwrap();
        (t, me)
    }

    /// Opens the tables again after the test dropped them. sled's I/O threads may still hold
    /// the database (and its file lock) for a moment after the last handle is dropped: a
    /// reopen at once failed about one run in four on a busy machine.
    fn reopen(dir: &Path, retention: Duration) -> Tables {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Tables::open_with(dir, retention) {
                Ok(t) => return t,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    fn current(t: &Tables) -> Id {
        t.flavours().unwrap()[0].flavour.id.clone()
    }

    async fn reserve(t: &Tables, me: &Id, tx: &str, now: u64) -> Contract {
        let req = request(tx, &current(t));
        match t.reserve(me, &req, now, 10 * MIN).await.unwrap() {
            Reservation::New(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deadline_keys_sort_by_time_and_parse_back() {
        let a = deadline_key(255, &id("z"));
        let b = deadline_key(256, &id("a"));
        assert!(a < b, "big-endian keys sort by deadline first");
        assert_eq!(parse_deadline_key(&b), Some((256, id("a"))));
        assert_eq!(parse_deadline_key(b"short"), None);
    }

    #[tokio::test]
    async fn each_bought_skips_only_this_nodes_own_sales() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tables::open_with(dir.path(), Duration::from_secs(60)).unwrap();
        let me = id("alice");
        // Sold by alice: `alice.c{n}`. Bought: from bob, and from sellers whose ids begin
        // like alice's sales (node ids may hold dots).
        let ids = [
            ("alice.c1", "alice", "bob"),
            ("alice.c22", "alice", "carol"),
            ("bob.c3", "bob", "alice"),
            ("alice.c2.c7", "alice.c2", "alice"),
            ("alice.x.c5", "alice.x", "alice"),
            ("alice.c.c1", "alice.c", "alice"),
        ];
        for (cid, seller, buyer) in ids {
            let c = crate::model::test_contract(
                cid,
                seller,
                buyer,
                Resources::default(),
                ContractState::Active,
            );
            t.complete_purchase(&c, 0).await.unwrap();
        }
        let mut seen = Vec::new();
        t.each_bought(&me, |c| seen.push(c.id.as_str().to_owned()))
            .unwrap();
        seen.sort();
        assert_eq!(seen, ["alice.c.c1", "alice.c2.c7", "alice.x.c5", "bob.c3"]);
    }

    #[tokio::test]
    async fn transaction_record_holds_the_contract_id_not_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let c = reserve(&t, &me, "t1", 0).await;
        let rec = t
            .transactions
            .get(in_key(&c.buyer, &c.transaction))
            .unwrap()
            .unwrap();
        assert_eq!(minicbor::decode::<Id>(&rec).unwrap(), c.id);
        // A repeat still gets the first answer (the contract as sold), even once it is Active.
        assert!(t.activate(&c.id, 1).await.unwrap());
        let again = t
            .reserve(&me, &request("t1", &c.flavour.id), 2, MIN)
            .await
            .unwrap();
        assert_eq!(again, Reservation::Repeat(c));
    }

    #[tokio::test]
    async fn a_transaction_record_written_as_a_copy_is_still_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let c = reserve(&t, &me, "t1", 0).await;
        // As the previous version wrote it.
        t.transactions
            .insert(in_key(&c.buyer, &c.transaction), enc(&c))
            .unwrap();
        let again = t
            .reserve(&me, &request("t1", &c.flavour.id), 2, MIN)
            .await
            .unwrap();
        assert_eq!(again, Reservation::Repeat(c));
    }

    #[tokio::test]
    async fn due_reads_only_the_entries_due_and_decodes_no_contract() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let due = reserve(&t, &me, "t0", 0).await; // peering deadline 10 min
        let mut later = Vec::new();
        for i in 1..8 {
            later.push(reserve(&t, &me, &format!("t{i}"), MIN).await); // 11 min
        }
        // The contracts not due are made undecodable: reading any of them would fail.
        for c in &later {
            t.contracts.insert(c.id.as_str(), &b"not cbor"[..]).unwrap();
        }
        assert_eq!(t.due(10 * MIN - 1, 100).unwrap(), vec![]);
        assert_eq!(
            t.due(10 * MIN, 100).unwrap(),
            vec![(10 * MIN, due.id.clone())]
        );
        assert_eq!(t.contract(&due.id).unwrap().map(|c| c.id), Some(due.id));
        assert_eq!(t.due(11 * MIN, 3).unwrap().len(), 3, "at most the limit");
    }

    #[tokio::test]
    async fn peering_removes_the_deadline_and_ending_sets_the_retention_one() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
        let a = reserve(&t, &me, "ta", 0).await;
        let b = reserve(&t, &me, "tb", 0).await;
        assert_eq!(t.deadline_count(), 2);
        assert!(t.activate(&a.id, 1).await.unwrap());
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(10 * MIN, b.id.clone())]
        );
        t.end_contract(&a.id, ContractState::Released, 2 * MIN)
            .await
            .unwrap();
        t.end_contract(&b.id, ContractState::Expired, 10 * MIN)
            .await
            .unwrap();
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(7 * MIN, a.id.clone()), (15 * MIN, b.id.clone())]
        );
    }

    #[tokio::test]
    async fn a_contract_past_retention_is_deleted_with_its_records_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
        let c = reserve(&t, &me, "t1", 0).await;
        let kept = reserve(&t, &me, "t2", 0).await;
        t.put_peer_cluster(&c.id, &id("cluster")).unwrap();
        t.end_contract(&c.id, ContractState::Released, MIN)
            .await
            .unwrap();
        t.flush().await.unwrap();
        drop(t);

        let t = reopen(dir.path(), Duration::from_millis(5 * MIN));
        assert_eq!(
            t.due(6 * MIN - 1, 10).unwrap(),
            vec![],
            "still in retention"
        );
        let due = t.due(6 * MIN, 10).unwrap();
        assert_eq!(due, vec![(6 * MIN, c.id.clone())]);
        assert!(t.prune(due[0].0, &due[0].1).unwrap());
        assert_eq!(t.contract(&c.id).unwrap(), None);
        assert_eq!(t.allocation(&c.id).unwrap(), None);
        assert_eq!(t.peer_cluster(&c.id).unwrap(), None);
        assert_eq!(
            t.transaction_record_count(),
            1,
            "only the live contract's record is left"
        );
        assert_eq!(
            t.deadline_count(),
            1,
            "only the live contract's peering deadline"
        );
        assert!(t.contract(&kept.id).unwrap().is_some());
        // A retry of the pruned transaction is a new request: the flavour id it named was
        // superseded under unchanged terms, so it is served afresh with a new contract.
        let retry = t
            .reserve(&me, &request("t1", &c.flavour.id), 7 * MIN, MIN)
            .await
            .unwrap();
        assert!(
            matches!(retry, Reservation::New(ref n) if n.id != c.id),
            "{retry:?}"
        );
    }

    #[tokio::test]
    async fn prune_deletes_nothing_of_a_live_contract() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(MIN)).await;
        let c = reserve(&t, &me, "t1", 0).await;
        assert!(!t.prune(c.expires_at, &c.id).unwrap());
        assert!(t.contract(&c.id).unwrap().is_some());
        assert_eq!(t.transaction_record_count(), 1);
    }

    #[tokio::test]
    async fn a_database_from_before_the_index_is_indexed_once_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(MIN)).await;
        let live = reserve(&t, &me, "t1", 0).await;
        let ended = reserve(&t, &me, "t2", 0).await;
        t.end_contract(&ended.id, ContractState::Released, 0)
            .await
            .unwrap();
        // As the previous version left it: no index, no record that it was built.
        t.deadlines.clear().unwrap();
        t.db.open_tree("meta")
            .unwrap()
            .remove(b"deadlines")
            .unwrap();
        t.flush().await.unwrap();
        drop(t);
        let t = reopen(dir.path(), Duration::from_millis(MIN));
        let due = t.due(u64::MAX - 1, 10).unwrap();
        assert_eq!(due.len(), 2);
        assert!(due.contains(&(live.expires_at, live.id.clone())));
        assert!(due
            .iter()
            .any(|(at, c)| c == &ended.id && *at > live.expires_at));
    }

    #[tokio::test]
    async fn a_superseded_flavour_id_is_served_from_the_current_flavour() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let first = current(&t);
        let a = t
            .reserve(&me, &request("ta", &first), 0, MIN)
            .await
            .unwrap();
        let b = t
            .reserve(&me, &request("tb", &first), 0, MIN)
            .await
            .unwrap();
        let (Reservation::New(a), Reservation::New(b)) = (a, b) else {
            panic!("both served");
        };
        assert_eq!(a.flavour.id, first);
        assert_eq!(
            b.flavour.id, first,
            "the contract names the id the buyer named"
        );
        assert_eq!(
            b.flavour.resources.cpu, 3500,
            "served from the reduced flavour"
        );
        assert_eq!(t.flavours().unwrap()[0].flavour.resources.cpu, 3000);
        assert_ne!(current(&t), first);
        // A whole purchase under a superseded id is refused: what it named is gone.
        let mut whole = request("tc", &first);
        whole.partition = None;
        assert!(matches!(
            t.reserve(&me, &whole, 0, MIN).await.unwrap(),
            Reservation::Refused(Refusal::FlavourGone(_))
        ));
    }

    #[tokio::test]
    async fn a_superseded_id_from_before_the_terms_changed_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let first = current(&t);
        reserve(&t, &me, "ta", 0).await;
        let mut offer = crate::model::demo_offer(&me);
        offer.price.amount *= 2;
        t.sync_offers(&[(offer, SaleTerms::default())])
            .await
            .unwrap();
        let r = t
            .reserve(&me, &request("tb", &first), 0, MIN)
            .await
            .unwrap();
        assert_eq!(r, Reservation::Refused(Refusal::FlavourGone(first)));
        // The current id still sells, at the new price.
        let c = reserve(&t, &me, "tc", 0).await;
        assert_eq!(c.price, 2 * 250_000);
    }

    /// Reserves a piece at `now` under a contract term of `term` ms (peering deadline 10 min).
    async fn reserve_with_term(t: &Tables, me: &Id, tx: &str, now: u64, term: u64) -> Contract {
        let admit = Admission {
            term_ms: Some(term),
            ..Admission::default()
        };
        let req = request(tx, &current(t));
        match t
            .reserve_unflushed(me, &req, now, 10 * MIN, &admit)
            .unwrap()
        {
            Reservation::New(c) => {
                t.flush().await.unwrap();
                c
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_contracts_term_end_is_indexed_moved_by_renew_and_kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
        let c = reserve_with_term(&t, &me, "t1", 0, 30 * MIN).await;
        assert_eq!(c.ends_at, Some(30 * MIN));
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(10 * MIN, c.id.clone()), (30 * MIN, c.id.clone())],
            "Reserved: the peering deadline and the term's end"
        );
        assert!(t.activate(&c.id, MIN).await.unwrap());
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(30 * MIN, c.id.clone())],
            "Active: only the term's end"
        );
        let renewed = t.renew(&c.id, 20 * MIN).await.unwrap().unwrap();
        assert_eq!(renewed.ends_at, Some(50 * MIN));
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(50 * MIN, c.id.clone())],
            "the renewal moved the entry"
        );
        // A repeated renewal adds nothing and leaves the single entry.
        t.renew(&c.id, 20 * MIN).await.unwrap().unwrap();
        assert_eq!(t.deadline_count(), 1);
        drop(t);

        let t = reopen(dir.path(), Duration::from_millis(5 * MIN));
        assert_eq!(t.due(50 * MIN - 1, 10).unwrap(), vec![]);
        assert_eq!(
            t.due(50 * MIN, 10).unwrap(),
            vec![(50 * MIN, c.id.clone())],
            "still due after a restart"
        );
        t.end_contract(&c.id, ContractState::Expired, 50 * MIN)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(55 * MIN, c.id.clone())],
            "ended: only the retention's entry"
        );
    }

    #[tokio::test]
    async fn a_term_ending_with_the_peering_deadline_keeps_its_entry_once_peered() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
        // Term = peering deadline: one key for both.
        let c = reserve_with_term(&t, &me, "t1", 0, 10 * MIN).await;
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(10 * MIN, c.id.clone())]
        );
        assert!(t.activate(&c.id, MIN).await.unwrap());
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(10 * MIN, c.id.clone())],
            "the term's end is still due"
        );
    }

    #[tokio::test]
    async fn a_bought_contracts_term_end_is_indexed_and_moved_by_extend() {
        let dir = tempfile::tempdir().unwrap();
        let (seller, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
        let sold = reserve_with_term(&seller, &me, "t1", 0, 30 * MIN).await;
        drop(seller);
        let dir = tempfile::tempdir().unwrap();
        let t = Tables::open_with(dir.path(), Duration::from_millis(5 * MIN)).unwrap();
        t.complete_purchase(&sold, 0).await.unwrap();
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(10 * MIN, sold.id.clone()), (30 * MIN, sold.id.clone())]
        );
        assert!(t.activate(&sold.id, MIN).await.unwrap());
        t.extend(&sold.id, 45 * MIN).await.unwrap();
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(45 * MIN, sold.id.clone())]
        );
        // Only ever later.
        t.extend(&sold.id, 40 * MIN).await.unwrap();
        assert_eq!(
            t.due(u64::MAX - 1, 10).unwrap(),
            vec![(45 * MIN, sold.id.clone())]
        );
    }

    #[tokio::test]
    async fn a_repeat_after_a_renewal_gets_the_first_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let c = reserve_with_term(&t, &me, "t1", 0, 30 * MIN).await;
        assert!(t.activate(&c.id, 1).await.unwrap());
        t.renew(&c.id, 20 * MIN).await.unwrap().unwrap();
        let again = t
            .reserve(&me, &request("t1", &c.flavour.id), 21 * MIN, MIN)
            .await
            .unwrap();
        assert_eq!(again, Reservation::Repeat(c.clone()));
        let Reservation::Repeat(first) = again else {
            unreachable!()
        };
        assert_eq!(enc(&first), enc(&c), "byte-identical");
    }

    #[tokio::test]
    async fn a_database_from_before_the_index_gets_its_terms_ends_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(MIN)).await;
        let c = reserve_with_term(&t, &me, "t1", 0, 30 * MIN).await;
        assert!(t.activate(&c.id, 1).await.unwrap());
        t.deadlines.clear().unwrap();
        t.db.open_tree("meta")
            .unwrap()
            .remove(b"deadlines")
            .unwrap();
        t.flush().await.unwrap();
        drop(t);
        let t = reopen(dir.path(), Duration::from_millis(MIN));
        assert_eq!(t.due(u64::MAX - 1, 10).unwrap(), vec![(30 * MIN, c.id)]);
    }

    #[tokio::test]
    async fn prune_leaves_an_ended_contract_whose_entry_was_already_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
        let c = reserve(&t, &me, "t1", 0).await;
        // The sweeper read the peering deadline's entry, then the contract was released.
        t.end_contract(&c.id, ContractState::Released, MIN)
            .await
            .unwrap();
        assert!(!t.prune(c.expires_at, &c.id).unwrap());
        assert!(
            t.contract(&c.id).unwrap().is_some(),
            "kept for its retention"
        );
        assert_eq!(t.due(u64::MAX - 1, 10).unwrap(), vec![(6 * MIN, c.id)]);
    }

    #[tokio::test]
    async fn a_superseded_id_from_before_the_sale_terms_changed_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let offer = crate::model::demo_offer(&me);
        let first = current(&t);
        reserve(&t, &me, "ta", 0).await;
        // The same terms again: superseded ids are still served.
        t.sync_offers(&[(offer.clone(), SaleTerms::default())])
            .await
            .unwrap();
        assert!(matches!(
            t.reserve(&me, &request("tb", &first), 0, MIN)
                .await
                .unwrap(),
            Reservation::New(_)
        ));
        for sale in [
            SaleTerms {
                max_per_buyer: 50,
                term_ms: 0,
            },
            SaleTerms {
                max_per_buyer: 50,
                term_ms: 3_600_000,
            },
        ] {
            let before = current(&t);
            // Supersedes `before` under the terms in force.
            reserve(&t, &me, &format!("tx{}", sale.term_ms), 0).await;
            assert_ne!(current(&t), before);
            t.sync_offers(&[(offer.clone(), sale)]).await.unwrap();
            let tx = format!("tc{}", sale.term_ms);
            let r = t
                .reserve(&me, &request(&tx, &before), 0, MIN)
                .await
                .unwrap();
            assert_eq!(
                r,
                Reservation::Refused(Refusal::FlavourGone(before.clone())),
                "{sale:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_superseded_id_names_its_offer_for_the_admission() {
        let dir = tempfile::tempdir().unwrap();
        let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
        let first = current(&t);
        let offer = t.flavours().unwrap()[0].offer.clone();
        reserve(&t, &me, "ta", 0).await;
        assert_eq!(t.own_flavour(&first).unwrap(), None, "superseded");
        assert_eq!(t.offer_of(&first).unwrap(), Some(offer.clone()));
        assert_eq!(t.offer_of(&current(&t)).unwrap(), Some(offer));
        assert_eq!(t.offer_of(&id("elsewhere.1")).unwrap(), None);
        assert_eq!(t.offer_of(&id("nodot")).unwrap(), None);
    }
}
