//! The node's tables in sled, and the one writer that changes them.
//!
//! Everything a contract's life touches (offers, the flavours on offer, the contracts with
//! their allocations, purchases in flight, peering grants) lives in one sled tree, `ledger`,
//! under a prefix per table ([`keys`] lists them). Each change of a contract is one atomic
//! `apply_batch` on that tree, made by one writer at a time (the writer lock), followed by a
//! flush: a group of reservations, a peering, an end, a renewal, a deletion. The index of
//! sales by transaction and the index of deadlines are derived from the contracts and kept
//! in memory by the writer ([`ledger`]).
//! Ratings (`ratings`), intents (`intents`) and the node's identity (`meta`) are trees of
//! their own: each of their changes is a single record.
//!
//! Why one tree and no sled transaction: a reservation replaces the flavour on offer by the
//! reduced one and stores the contract with its Node allocation (workflow step 16). If any of them could land without the
//! others, a crash between two writes would either sell capacity twice or lose an
//! acknowledged contract; sled makes a batch on one tree atomic, across a crash too. The
//! decision reads only the seller's state held in memory by the writer ([`ledger`]), so the
//! check and the write cannot be separated by another request; a multi-tree transaction did
//! the same work at several times the cost (docs/benchmarks.md). [`Tables::flush`] makes
//! everything durable (sled's flush, then `fdatasync`); nothing is answered OK before it.
//!
//! The invariant kept for every offer: the flavour on offer plus the resources of live Node
//! allocations equal the offer's total.
//!
//! The deadline index holds an entry per contract with something due at a known time: a
//! Reserved contract at its peering deadline (`expires_at`) or the end of its term if that
//! comes first, an Active one with a term at its end (`ends_at`, moved by a renewal), an
//! ended (Released or Expired) one at the end of its retention. It changes with the record,
//! so the expiry sweeper reads only the entries due ([`Tables::due`]) and decodes only those
//! contracts.
//!
//! Databases written before this layout (a tree per table) are moved into the ledger once,
//! at open ([`legacy`]).

mod codec;
pub mod keys;
mod ledger;
mod legacy;
mod purchases;
mod ratings;

pub use purchases::Outgoing;
pub use ratings::Rating;

use crate::contracts::{self, Refusal};
use crate::model::{
    Allocation, Contract, ContractState, Flavour, Id, OwnFlavour, ReserveRequest, Resources,
};
use crate::wire::PeerAccept;
use codec::{dec, enc, one, scan};
use ledger::{is_ended, Ledger, Record};
use minicbor::{Decode, Encode};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
        "offer {offer} now offers less than its live reservations hold ({held}); \
         restore its size or release those contracts first"
    )]
    OfferShrunk { offer: String, held: Box<Resources> },
    #[error("another fluidlet agent{pid} is running on {dir} (it holds the tables' lock): stop it first, or give this one another data_dir")]
    InUse { dir: String, pid: String },
    #[error("cannot open the tables in {dir}: {problem}")]
    Open { dir: String, problem: String },
}

impl TableError {
    /// sled's open error, with the directory and in words.
    fn opening(dir: &Path, e: sled::Error) -> TableError {
        let shown = dir.display().to_string();
        // sled reports the lock another process holds as an I/O error whose text says so.
        let locked = match &e {
            sled::Error::Io(io) => {
                io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock")
            }
            _ => false,
        };
        match e {
            _ if locked => {
                let pid = std::fs::read_to_string(dir.join(PID_FILE))
                    .ok()
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                TableError::InUse { dir: shown, pid }
            }
            sled::Error::Io(io) => TableError::Open {
                dir: shown,
                problem: crate::files::io_words(&io),
            },
            other => TableError::Open {
                dir: shown,
                problem: other.to_string(),
            },
        }
    }
}

/// What [`Tables::preflight`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflight {
    /// This node's tables, `contracts` on record, every offer covering its live reservations.
    Ready { contracts: usize },
    /// Tables of an older layout: the next start migrates them; not checked further.
    OldLayout,
}

/// Opens the sled database under `dir` (an error names the directory, in words).
fn open_db(dir: &Path) -> Result<sled::Db, TableError> {
    sled::Config::new()
        .path(dir)
        // A gateway has little memory and the tables are small: 1 MiB of page cache keeps
        // the hot records (flavours, recent contracts) without letting a burst of
        // reservations grow the agent (the benchmark's peak RSS shows it).
        .cache_capacity(1024 * 1024)
        .open()
        .map_err(|e| TableError::opening(dir, e))
}

/// The tables in `dir` are `me`'s: their owner record (`recorded`) names it, and a marker
/// file (`marked`) without a record means a damaged or replaced database.
fn owned_by(
    dir: &Path,
    recorded: Option<&Id>,
    marked: Option<&str>,
    me: &Id,
) -> Result<(), TableError> {
    let shown = |p: &Path| p.display().to_string();
    match (recorded, marked) {
        (Some(theirs), _) if theirs != me => Err(TableError::OtherNode {
            dir: shown(dir),
            theirs: theirs.to_string(),
            ours: me.to_string(),
        }),
        (None, Some(node)) => Err(TableError::Damaged {
            dir: shown(dir),
            node: node.trim().to_owned(),
            marker: shown(&dir.join("fluidlet.node")),
        }),
        _ => Ok(()),
    }
}

/// The running agent's pid, beside its tables (for the "another agent is running" error).
pub const PID_FILE: &str = "fluidlet.pid";

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

/// Terms of sale of an offer that live in the configuration rather than in its flavour
/// record: the share cap and the contract term. Changing them is a change of terms for
/// superseded flavour ids (docs/protocol.md, "Superseded flavour ids").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct SaleTerms {
    /// `max_per_buyer`, percent of the offer's total (0 or 100: no cap).
    #[n(0)]
    pub max_per_buyer: u8,
    /// The contract term in milliseconds (0: contracts without a term).
    #[n(1)]
    pub term_ms: u64,
}

/// A terms record: flavour ids of the offer numbered from `first` on were issued under the
/// offer's current flavour record and `sale` terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Epoch {
    #[n(0)]
    pub first: u64,
    #[n(1)]
    pub sale: SaleTerms,
}

/// What a group of RESERVE_FLAVOURs decided ([`Tables::reserve_batch`]): an answer per
/// request, in order, and whether the write of the new contracts was applied. When it was
/// not, no [`Reservation::New`] may be answered RESERVED (answer STORAGE; nothing of them
/// may be on disk or all of it, never a part); the repeats and refusals stand.
#[derive(Debug)]
pub struct Decided {
    pub answers: Vec<Reservation>,
    pub written: Result<(), TableError>,
}

/// The open tables of one node. Cloning is cheap (sled handles are reference-counted).
#[derive(Clone)]
pub struct Tables {
    db: sled::Db,
    ledger: sled::Tree,
    ratings: sled::Tree,
    intents: sled::Tree,
    meta: sled::Tree,
    /// The writer: the seller's state in memory; holding it is the right to change `ledger`.
    writer: Arc<Mutex<Ledger>>,
    /// How long an ended contract is kept, in milliseconds.
    retention_ms: u64,
    /// sled's log file (`{dir}/db`), for the `fdatasync` that [`Tables::flush`] adds to
    /// sled's own flush (see there).
    log: Arc<std::fs::File>,
}

impl Tables {
    /// Opens (or creates) the tables under `dir`, keeping ended contracts for the default
    /// retention ([`crate::config::DEFAULT_RETENTION`]).
    pub fn open(dir: &Path) -> Result<Tables, TableError> {
        Tables::open_with(dir, crate::config::DEFAULT_RETENTION)
    }

    /// Opens (or creates) the tables under `dir`, keeping ended contracts for `retention`.
    pub fn open_with(dir: &Path, retention: Duration) -> Result<Tables, TableError> {
        Tables::from_db(open_db(dir)?, dir, retention)
    }

    /// The tables over an open database: migrates an older layout, loads the seller's state.
    fn from_db(db: sled::Db, dir: &Path, retention: Duration) -> Result<Tables, TableError> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let ledger = db.open_tree("ledger")?;
        let meta = db.open_tree("meta")?;
        legacy::migrate(&db, &ledger, &meta, crate::model::unix_ms(), retention_ms)?;
        let state = Ledger::load(&ledger)?;
        Ok(Tables {
            ratings: db.open_tree("ratings")?,
            intents: db.open_tree("intents")?,
            writer: Arc::new(Mutex::new(state)),
            retention_ms,
            log: Arc::new(std::fs::File::open(dir.join("db"))?),
            ledger,
            meta,
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
    ///
    /// The record's key is `owner` since the ledger layout; builds before it wrote `node`,
    /// which is moved. A build before the layout opening a moved database so finds its own
    /// key missing beside the marker and refuses to start, instead of taking the emptied
    /// old trees for a node that sold nothing.
    pub async fn open_for(dir: &Path, me: &Id, retention: Duration) -> Result<Tables, TableError> {
        let t = Tables::open_with(dir, retention)?;
        let marker = dir.join("fluidlet.node");
        if let Some(old) = t.meta.get(b"node")? {
            t.meta.insert(b"owner", old)?;
            t.meta.remove(b"node")?;
            t.flush().await?;
        }
        let recorded: Option<Id> = one("meta", &t.meta, b"owner")?;
        let marked = std::fs::read_to_string(&marker).ok();
        owned_by(dir, recorded.as_ref(), marked.as_deref(), me)?;
        if recorded.is_none() {
            t.meta.insert(b"owner", enc(me))?;
            t.flush().await?;
        }
        if marked.is_none() {
            std::fs::write(&marker, format!("{me}\n"))
                .map_err(|e| TableError::Sled(sled::Error::Io(e)))?;
        }
        // Best effort: only the "another agent is running" error reads it.
        let _ = std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id()));
        Ok(t)
    }

    /// What `fluidlet check` finds in `dir` without writing anything: the tables belong to
    /// `me`, and every configured offer still covers what its live reservations hold (the
    /// checks [`Tables::open_for`] and [`Tables::sync_offers`] make at start). Tables of an
    /// older layout are not opened further (opening them migrates them, which an older
    /// build could then not read: a rollback after a `check`). `dir` must already hold a
    /// database.
    pub fn preflight(
        dir: &Path,
        me: &Id,
        offers: &[crate::model::Flavour],
    ) -> Result<Preflight, TableError> {
        let db = open_db(dir)?;
        if legacy::pending(&db)? {
            return Ok(Preflight::OldLayout);
        }
        let t = Tables::from_db(db, dir, Duration::from_secs(0))?;
        let recorded = match one::<Id>("meta", &t.meta, b"owner")? {
            Some(r) => Some(r),
            None => one("meta", &t.meta, b"node")?,
        };
        let marked = std::fs::read_to_string(dir.join("fluidlet.node")).ok();
        owned_by(dir, recorded.as_ref(), marked.as_deref(), me)?;
        let state = t.writer();
        for offer in offers {
            let held = state.held(&offer.id);
            if offer.resources.checked_sub(&held).is_none() {
                return Err(TableError::OfferShrunk {
                    offer: offer.id.to_string(),
                    held: Box::new(held),
                });
            }
        }
        drop(state);
        Ok(Preflight::Ready {
            contracts: t.contracts()?.len(),
        })
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

    /// The writer: the seller's state, and the right to change the ledger tree. Held only
    /// for the synchronous part of a change (decide, `apply_batch`), never across an await.
    fn writer(&self) -> MutexGuard<'_, Ledger> {
        // A holder that panicked (tests only: release builds abort) may have left the state
        // ahead of the tree: rebuild it from the tree.
        match self.writer.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                if let Ok(l) = Ledger::load(&self.ledger) {
                    *g = l;
                }
                self.writer.clear_poison();
                g
            }
        }
    }

    /// Applies `batch` to the ledger tree; if that fails, the writer's state (already changed
    /// as the batch would) is rebuilt from the tree.
    fn apply(&self, state: &mut Ledger, batch: sled::Batch) -> Result<(), TableError> {
        match self.ledger.apply_batch(batch) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Ok(l) = Ledger::load(&self.ledger) {
                    *state = l;
                }
                Err(e.into())
            }
        }
    }

    fn next_id(&self) -> impl FnMut() -> Result<u64, TableError> + '_ {
        move || Ok(self.db.generate_id()?)
    }

    /// Brings the offers in line with the configuration: each configured offer (a flavour
    /// whose id is the offer id and whose resources are the total, with its [`SaleTerms`]) is
    /// advertised with its total minus what live reservations hold; offers no longer
    /// configured are withdrawn. Called at start, before the node serves anything.
    pub async fn sync_offers(&self, configured: &[(Flavour, SaleTerms)]) -> Result<(), TableError> {
        {
            let mut state = self.writer();
            let mut wanted = Vec::new();
            for (offer, sale) in configured {
                let held = state.held(&offer.id);
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
            let mut batch = sled::Batch::default();
            for id in state.offers.keys() {
                if !configured.iter().any(|(c, _)| &c.id == id) {
                    batch.remove(keys::offer(id));
                    batch.remove(keys::epoch(id));
                    batch.remove(keys::available(id));
                }
            }
            let mut next = self.next_id();
            for (o, left, sale) in &wanted {
                let stored = state.offers.get(&o.id);
                // Flavour ids issued before the offer's terms last changed (its record, or its
                // share cap or contract term), or before this record existed, are not served
                // as superseded ids.
                let same = stored.is_some_and(|s| &s.total == *o);
                let epoch = stored.and_then(|s| s.epoch);
                let new_terms = !same || epoch.is_none_or(|e| e.sale != *sale);
                if new_terms {
                    let first = next()?;
                    batch.insert(keys::epoch(&o.id), enc(&Epoch { first, sale: *sale }));
                }
                batch.insert(keys::offer(&o.id), enc(*o));
                // The current flavour keeps its id only under the same terms: an id issued
                // before they changed is gone for good, the current one included, even when
                // only a sale term (share cap, contract term) changed and the flavour itself
                // reads the same.
                let current = stored.and_then(|s| s.current.as_ref());
                let kept =
                    !new_terms && current.is_some_and(|f| *f == ledger::cut(o, &f.id, *left));
                if !kept {
                    batch.remove(keys::available(&o.id));
                    if !left.is_zero() {
                        let fid = Id::new(&format!("{}.{}", o.id, next()?)).map_err(|e| {
                            TableError::Corrupt {
                                tree: "offers",
                                key: o.id.to_string(),
                                reason: e.to_string(),
                            }
                        })?;
                        let own = OwnFlavour {
                            offer: o.id.clone(),
                            flavour: ledger::cut(o, &fid, *left),
                        };
                        batch.insert(keys::available(&o.id), enc(&own));
                    }
                }
            }
            self.ledger.apply_batch(batch)?;
            *state = Ledger::load(&self.ledger)?;
        }
        self.flush().await
    }

    /// The flavours on offer now, by flavour id.
    pub fn flavours(&self) -> Result<Vec<OwnFlavour>, TableError> {
        Ok(self.writer().flavours())
    }

    /// One contract record.
    fn record(&self, id: &Id) -> Result<Option<Record>, TableError> {
        one("contracts", &self.ledger, &keys::contract(id))
    }

    /// The first answer given to transaction `tx` of `buyer`, if it was answered RESERVED:
    /// the contract as it was sold (only the state and a renewal's `ends_at` change after
    /// it, so both are set back).
    fn first_answer(
        &self,
        state: &Ledger,
        buyer: &Id,
        tx: &Id,
    ) -> Result<Option<Contract>, TableError> {
        for id in state.sold_for(buyer, tx) {
            let Some(r) = self.record(&id)? else {
                continue;
            };
            let mut c = r.contract;
            if &c.buyer == buyer && &c.transaction == tx {
                c.state = ContractState::Reserved;
                c.ends_at = c.term_ms.map(|t| c.created_at.saturating_add(t));
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Provider side of a group of RESERVE_FLAVOURs (workflow steps 15-17, group commit):
    /// each is decided in turn against the seller's state (a repeated transaction gets its
    /// first answer; a new one is refused or sold), and every sale of the group is written
    /// in ONE atomic batch. Not flushed: the caller flushes once and answers none of the
    /// group before that flush returned. `pending_limit`: the most unpeered reservations one
    /// buyer may hold.
    pub fn reserve_batch(
        &self,
        me: &Id,
        reqs: &[ReserveRequest],
        now: u64,
        ttl_ms: u64,
        pending_limit: u32,
    ) -> Result<Decided, TableError> {
        let mut state = self.writer();
        let mut batch = sled::Batch::default();
        let mut answers = Vec::with_capacity(reqs.len());
        let mut any_new = false;
        let mut next = self.next_id();
        for (i, req) in reqs.iter().enumerate() {
            // The same transaction twice in one group: the second gets the first's answer.
            let earlier = reqs[..i]
                .iter()
                .zip(&answers)
                .find(|(r, _)| r.buyer == req.buyer && r.transaction == req.transaction)
                .and_then(|(_, a): (_, &Reservation)| match a {
                    Reservation::New(c) | Reservation::Repeat(c) => Some(c.clone()),
                    Reservation::Refused(_) => None,
                });
            let answer = match earlier {
                Some(c) => Ok(Reservation::Repeat(c)),
                None => match self.first_answer(&state, &req.buyer, &req.transaction) {
                    Ok(Some(c)) => Ok(Reservation::Repeat(c)),
                    Ok(None) => {
                        state.reserve(me, req, now, ttl_ms, pending_limit, &mut next, &mut batch)
                    }
                    Err(e) => Err(e),
                },
            };
            match answer {
                Ok(a) => {
                    any_new |= matches!(a, Reservation::New(_));
                    answers.push(a);
                }
                Err(e) => {
                    // A record that cannot be read: the state may be half-way through this
                    // request, so it is rebuilt and nothing of the group is written.
                    drop(next);
                    if let Ok(l) = Ledger::load(&self.ledger) {
                        *state = l;
                    }
                    return Err(e);
                }
            }
        }
        drop(next);
        let written = if any_new {
            self.apply(&mut state, batch)
        } else {
            Ok(())
        };
        Ok(Decided { answers, written })
    }

    /// One RESERVE_FLAVOUR, flushed when it sold something (tools and tests; the node uses
    /// [`Tables::reserve_batch`]). No pending limit.
    pub async fn reserve(
        &self,
        me: &Id,
        req: &ReserveRequest,
        now: u64,
        ttl_ms: u64,
    ) -> Result<Reservation, TableError> {
        let Decided {
            mut answers,
            written,
        } = self.reserve_batch(me, std::slice::from_ref(req), now, ttl_ms, u32::MAX)?;
        written?;
        let outcome = answers.pop().ok_or_else(|| TableError::Corrupt {
            tree: "ledger",
            key: req.transaction.to_string(),
            reason: "no answer".into(),
        })?;
        if matches!(outcome, Reservation::New(_)) {
            self.flush().await?;
        }
        Ok(outcome)
    }

    pub fn contracts(&self) -> Result<Vec<Contract>, TableError> {
        let mut out = Vec::new();
        self.each_contract(|c| out.push(c))?;
        Ok(out)
    }

    pub fn allocations(&self) -> Result<Vec<Allocation>, TableError> {
        Ok(scan::<Record>("contracts", &self.ledger, keys::CONTRACT)?
            .iter()
            .map(Record::allocation)
            .collect())
    }

    pub fn contract(&self, id: &Id) -> Result<Option<Contract>, TableError> {
        Ok(self.record(id)?.map(|r| r.contract))
    }

    pub fn allocation(&self, contract: &Id) -> Result<Option<Allocation>, TableError> {
        Ok(self.record(contract)?.map(|r| r.allocation()))
    }

    /// Writes `new` over `old` (a change of one contract, with whatever `batch` already
    /// holds) and brings the writer's state along.
    fn rewrite(
        &self,
        state: &mut Ledger,
        mut batch: sled::Batch,
        old: &Record,
        new: Record,
    ) -> Result<Record, TableError> {
        batch.insert(keys::contract(&new.contract.id), enc(&new));
        self.apply(state, batch)?;
        state.replaced(Some(old), &new);
        Ok(new)
    }

    /// Peering completed on this side (steps 25 and 28): the contract becomes Active and
    /// its allocation active, together. Returns false if the contract is not Reserved (already
    /// active is fine for a repeated call; released or expired is not).
    pub async fn activate(&self, contract: &Id, now: u64) -> Result<bool, TableError> {
        {
            let mut state = self.writer();
            let Some(old) = self.record(contract)? else {
                return Ok(false);
            };
            if old.contract.state == ContractState::Active {
                return Ok(true);
            }
            if !contracts::can_move(old.contract.state, ContractState::Active) {
                return Ok(false);
            }
            let mut new = old.clone();
            new.contract.state = ContractState::Active;
            new.updated_at = now;
            self.rewrite(&mut state, sled::Batch::default(), &old, new)?;
        }
        self.flush().await?;
        Ok(true)
    }

    /// Ends a live contract as Released or Expired: its allocation is released and, on the
    /// provider, the resources go back into the offer's flavour (the flavour on offer is
    /// replaced by a larger one under a new id), all in one batch, flushed. The contract is
    /// kept for the retention from now. Returns the ended contract, or `None` if it was not
    /// live (ending twice is harmless).
    pub async fn end_contract(
        &self,
        contract: &Id,
        end: ContractState,
        now: u64,
    ) -> Result<Option<Contract>, TableError> {
        let ended = {
            let mut state = self.writer();
            let Some(old) = self.record(contract)? else {
                return Ok(None);
            };
            if !contracts::can_move(old.contract.state, end) {
                return Ok(None);
            }
            let mut batch = sled::Batch::default();
            let mut next = self.next_id();
            state.give_back(&old, &mut next, &mut batch)?;
            drop(next);
            let mut new = old.clone();
            new.contract.state = end;
            new.updated_at = now;
            new.kept_until = Some(now.saturating_add(self.retention_ms));
            self.rewrite(&mut state, batch, &old, new)?.contract
        };
        self.flush().await?;
        self.unplace(&ended, now).await?;
        Ok(Some(ended))
    }

    /// The intents placed on `ended` no longer say Placed: they end Failed with the reason
    /// (`fluidlet intent retry` places them again).
    async fn unplace(&self, ended: &Contract, now: u64) -> Result<(), TableError> {
        for mut i in self.intents()? {
            if i.contract.as_ref() != Some(&ended.id)
                || i.state != crate::model::IntentState::Placed
            {
                continue;
            }
            let how = match ended.state {
                ContractState::Expired => "expired",
                _ => "was released",
            };
            let why = format!(
                "contract {} {how} on {}: the workload has no capacity any more (fluidlet intent retry {} places it again)",
                ended.id,
                crate::model::date_words(now),
                i.id
            );
            i.state = crate::model::IntentState::Failed;
            i.error = crate::model::Text::new(&why).ok();
            i.updated_at = now;
            self.put_intent(&i).await?;
        }
        Ok(())
    }

    /// How many reservations each buyer holds from this node that are not peered yet.
    pub fn unpeered_by_buyer(&self) -> std::collections::HashMap<Id, u32> {
        self.writer().unpeered.clone()
    }

    /// Calls `f` with every contract, decoding one at a time: a scan that keeps one contract
    /// in memory, not the whole table (a table of 10,000 contracts decoded at once took
    /// about 10 MB, the provider's peak RSS under load).
    pub fn each_contract(&self, mut f: impl FnMut(Contract)) -> Result<(), TableError> {
        for kv in self.ledger.scan_prefix(keys::CONTRACT) {
            let (k, v) = kv?;
            f(dec::<Record>("contracts", &k, &v)?.contract);
        }
        Ok(())
    }

    /// Calls `f` with every contract `me` did not sell, one decoded at a time. Contracts
    /// `me` sold (ids `{me}.c{n}`, docs/protocol.md) are skipped by their key, without
    /// decoding: a provider holds thousands of sales and buys a few, and the buyer's renewal
    /// check runs every `expiry_check`.
    pub fn each_bought(&self, me: &Id, mut f: impl FnMut(Contract)) -> Result<(), TableError> {
        for kv in self.ledger.scan_prefix(keys::CONTRACT) {
            let (k, v) = kv?;
            if !keys::is_sale_of(me, &k[keys::CONTRACT.len()..]) {
                f(dec::<Record>("contracts", &k, &v)?.contract);
            }
        }
        Ok(())
    }

    /// The entries of the deadline index due at `now` (deadline not after it), earliest
    /// first, at most `limit`: (deadline, contract id). Decodes no contract.
    pub fn due(&self, now: u64, limit: usize) -> Result<Vec<(u64, Id)>, TableError> {
        Ok(self.writer().due(now, limit))
    }

    /// How many entries the deadline index holds (one per contract with something due).
    pub fn deadline_count(&self) -> usize {
        self.writer().due_count()
    }

    /// Forgets the deadline entry (`deadline`, `contract`) alone (it is stale: nothing of
    /// the contract is due then any more). It comes back at the next open if the record
    /// still says so.
    pub fn drop_deadline(&self, deadline: u64, contract: &Id) -> Result<(), TableError> {
        self.writer().drop_due(deadline, contract);
        Ok(())
    }

    /// Deletes an ended contract whose retention is over (entry `deadline` of the index),
    /// with everything kept for it: its record (the contract and its allocation, and with it
    /// its place in the transaction index), the peering grant and the consumer cluster; in
    /// one batch. Returns false (and deletes nothing) if the entry is no longer in the index
    /// (it was read before the change that moved it) or the contract is not ended.
    pub fn prune(&self, deadline: u64, contract: &Id) -> Result<bool, TableError> {
        let mut state = self.writer();
        if !state.is_due_entry(deadline, contract) {
            return Ok(false);
        }
        let r = match self.record(contract)? {
            Some(r) if is_ended(r.contract.state) && r.kept_until == Some(deadline) => r,
            _ => return Ok(false),
        };
        let mut batch = sled::Batch::default();
        batch.remove(keys::contract(contract));
        batch.remove(keys::grant(contract));
        batch.remove(keys::grant_cluster(contract));
        self.apply(&mut state, batch)?;
        state.deleted(&r);
        Ok(true)
    }

    /// How many sales' first answers are kept (live contracts and ended ones within their
    /// retention).
    pub fn transaction_record_count(&self) -> usize {
        self.writer().sale_count()
    }

    /// What `buyer` holds now of `offer` (live Node allocations, provider side).
    pub fn held_by(&self, buyer: &Id, offer: &Id) -> Result<Resources, TableError> {
        Ok(self
            .writer()
            .offers
            .get(offer)
            .and_then(|o| o.held.get(buyer).copied())
            .unwrap_or_default())
    }

    /// The flavour on offer now under `id`, with its offer.
    pub fn own_flavour(&self, id: &Id) -> Result<Option<OwnFlavour>, TableError> {
        Ok(self
            .writer()
            .flavours()
            .into_iter()
            .find(|f| &f.flavour.id == id))
    }

    /// The offer a flavour id belongs to: the offer of the flavour on offer under `id`, or, for
    /// an id no longer on offer that has the form of a superseded id (`{offer}.{n}`), that
    /// offer if it is configured. Whether the id is still served is decided by the reservation.
    pub fn offer_of(&self, id: &Id) -> Result<Option<Id>, TableError> {
        Ok(self.writer().offer_of(id))
    }

    /// Renews a live contract with a term: `ends_at` becomes `max(ends_at, now + term)` (a
    /// repeated renewal never adds a second term), flushed. Returns the contract as it is
    /// now, or `None` if it is not live. A contract without a term is returned unchanged.
    /// The contract's deadline moves with it.
    pub async fn renew(&self, contract: &Id, now: u64) -> Result<Option<Contract>, TableError> {
        let out = {
            let mut state = self.writer();
            let Some(old) = self.record(contract)? else {
                return Ok(None);
            };
            let c = &old.contract;
            let live = matches!(c.state, ContractState::Reserved | ContractState::Active);
            if !live || c.ends_at.is_some_and(|e| e <= now) {
                return Ok(None);
            }
            match c.term_ms {
                Some(t) if c.ends_at != Some(now.saturating_add(t).max(c.ends_at.unwrap_or(0))) => {
                    let mut new = old.clone();
                    new.contract.ends_at = Some(now.saturating_add(t).max(c.ends_at.unwrap_or(0)));
                    self.rewrite(&mut state, sled::Batch::default(), &old, new)?
                        .contract
                }
                _ => old.contract,
            }
        };
        self.flush().await?;
        Ok(Some(out))
    }

    /// Buyer side: records the end a seller's RENEWED gave a contract (only ever later);
    /// its deadline moves with it.
    pub async fn extend(&self, contract: &Id, ends_at: u64) -> Result<(), TableError> {
        {
            let mut state = self.writer();
            if let Some(old) = self.record(contract)? {
                if old.contract.ends_at.is_some_and(|e| e < ends_at) {
                    let mut new = old.clone();
                    new.contract.ends_at = Some(ends_at);
                    self.rewrite(&mut state, sled::Batch::default(), &old, new)?;
                }
            }
        }
        self.flush().await
    }

    /// Remembers the PEER_ACCEPT given for a contract, so a repeated PEER_REQUEST gets the
    /// same answer (the peering user cannot be generated twice).
    pub fn put_peer_grant(&self, grant: &PeerAccept) -> Result<(), TableError> {
        let _state = self.writer();
        self.ledger
            .insert(keys::grant(&grant.contract), enc(grant))?;
        Ok(())
    }

    pub fn peer_grant(&self, contract: &Id) -> Result<Option<PeerAccept>, TableError> {
        one("transactions", &self.ledger, &keys::grant(contract))
    }

    /// Remembers the consumer's cluster id a peering was granted to (for the teardown).
    pub fn put_peer_cluster(&self, contract: &Id, cluster: &Id) -> Result<(), TableError> {
        let _state = self.writer();
        self.ledger
            .insert(keys::grant_cluster(contract), enc(cluster))?;
        Ok(())
    }

    pub fn peer_cluster(&self, contract: &Id) -> Result<Option<Id>, TableError> {
        one("transactions", &self.ledger, &keys::grant_cluster(contract))
    }

    /// A number never handed out before by this database (ids of transactions).
    pub fn generate_id(&self) -> Result<u64, TableError> {
        Ok(self.db.generate_id()?)
    }

    /// Records per table (each count is a scan: for metrics, not for hot paths), with the
    /// number of peering candidates, which the node keeps in memory, in its place.
    pub fn sizes(&self, candidates: usize) -> [(&'static str, usize); 10] {
        let n = |p: &[u8]| self.ledger.scan_prefix(p).count();
        [
            ("offers", n(keys::OFFER)),
            ("available", n(keys::AVAILABLE)),
            // One allocation per contract, in its record.
            ("allocations", n(keys::CONTRACT)),
            ("candidates", candidates),
            ("contracts", n(keys::CONTRACT)),
            // Sales' first answers (indexed in memory), purchases in flight, peering grants.
            ("transactions", self.transaction_record_count() + n(b"t/")),
            ("ratings", self.ratings.len()),
            ("intents", self.intents.len()),
            ("deadlines", self.deadline_count()),
            ("terms", n(keys::EPOCH)),
        ]
    }
}

#[cfg(test)]
mod tests;
