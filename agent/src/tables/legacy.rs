//! Databases written before the ledger tree (fluidlet up to commit 04a7442: one sled tree per
//! table, changed together by multi-tree transactions) are moved into it once, at open.
//!
//! What moves: each contract with its allocation becomes one record (`c/`), keeping, for an
//! ended contract, the end of its retention from the old deadline index (a database from
//! before the index gives it `now` plus the retention); the flavour on offer is re-keyed by
//! its offer (`a/`); offers, terms, purchases in flight and peering grants keep their
//! records under their prefix. The transaction records of sales (`in/...`) and the deadline
//! index are not moved: both are derived from the contracts now (`ledger`'s indexes).
//!
//! Records are written in batches; then `meta/layout` is set to 2, which is the commit point,
//! and the old trees are dropped. A crash during the move leaves the old trees the source of
//! truth (the move is done again, to the same keys, at the next open); a crash after the
//! marker leaves old trees that are dropped at the next open.

use super::codec::{dec, enc};
use super::keys;
use super::ledger::{is_ended, Record};
use super::TableError;
use crate::model::{Allocation, AllocationKind, Contract, Id, OwnFlavour};
use std::collections::HashMap;

/// The layout this code writes.
const LAYOUT: u8 = 2;
/// Records written per batch: bounds the memory a large old database costs to move.
const COPY_BATCH: usize = 1024;

/// Trees of the old layout (`candidates`, a cache kept in sled by even older builds, is
/// dropped without being moved).
const OLD_TREES: [&str; 8] = [
    "offers",
    "available",
    "allocations",
    "contracts",
    "transactions",
    "deadlines",
    "terms",
    "candidates",
];

fn old_trees(db: &sled::Db) -> Vec<String> {
    db.tree_names()
        .into_iter()
        .filter_map(|n| String::from_utf8(n.to_vec()).ok())
        .filter(|n| OLD_TREES.contains(&n.as_str()))
        .collect()
}

/// Whether `db` holds tables of an older layout that [`migrate`] has not moved yet. Reads
/// only: opens no tree that does not exist.
pub(super) fn pending(db: &sled::Db) -> Result<bool, TableError> {
    if old_trees(db).is_empty() {
        return Ok(false);
    }
    if !db.tree_names().iter().any(|n| n.as_ref() == b"meta") {
        return Ok(true);
    }
    let done = db
        .open_tree("meta")?
        .get(b"layout")?
        .is_some_and(|v| v.first() == Some(&LAYOUT));
    Ok(!done)
}

/// Writes `batch` when it holds [`COPY_BATCH`] records (or `force`).
fn spill(
    ledger: &sled::Tree,
    batch: &mut sled::Batch,
    n: &mut usize,
    force: bool,
) -> Result<(), TableError> {
    if *n >= COPY_BATCH || (force && *n > 0) {
        ledger.apply_batch(std::mem::take(batch))?;
        *n = 0;
    }
    Ok(())
}

/// Moves an old database into the ledger tree, once (see the module's doc).
pub(super) fn migrate(
    db: &sled::Db,
    ledger: &sled::Tree,
    meta: &sled::Tree,
    now: u64,
    retention_ms: u64,
) -> Result<(), TableError> {
    let done = meta
        .get(b"layout")?
        .is_some_and(|v| v.first() == Some(&LAYOUT));
    let old = old_trees(db);
    if !done && !old.is_empty() {
        let me: Option<Id> = meta
            .get(b"node")?
            .or(meta.get(b"owner")?)
            .and_then(|v| minicbor::decode::<Id>(&v).ok());
        let mut batch = sled::Batch::default();
        let mut n = 0usize;
        let mut moved = 0usize;
        let mut put = |batch: &mut sled::Batch, k: Vec<u8>, v: &[u8], n: &mut usize| {
            batch.insert(k, v);
            *n += 1;
            moved += 1;
        };
        for (name, prefix) in [
            ("offers", keys::OFFER),
            ("terms", keys::EPOCH),
            ("transactions", b"t/".as_slice()),
        ] {
            for kv in db.open_tree(name)?.iter() {
                let (k, v) = kv?;
                // Sales' transaction records are derived from the contracts now.
                if name == "transactions" && k.starts_with(b"in/") {
                    continue;
                }
                put(&mut batch, [prefix, &k[..]].concat(), &v, &mut n);
                spill(ledger, &mut batch, &mut n, false)?;
            }
        }
        for kv in db.open_tree("available")?.iter() {
            let (k, v) = kv?;
            let own: OwnFlavour = dec("available", &k, &v)?;
            put(&mut batch, keys::available(&own.offer), &v, &mut n);
        }
        // The end of each ended contract's retention, from the old index (8-byte big-endian
        // deadline, then the contract id).
        let mut kept: HashMap<Vec<u8>, u64> = HashMap::new();
        for kv in db.open_tree("deadlines")?.iter() {
            let (k, _) = kv?;
            if let Some((at, id)) = k.split_first_chunk::<8>() {
                let at = u64::from_be_bytes(*at);
                let e = kept.entry(id.to_vec()).or_insert(at);
                *e = (*e).max(at);
            }
        }
        let allocations = db.open_tree("allocations")?;
        for kv in db.open_tree("contracts")?.iter() {
            let (k, v) = kv?;
            let c: Contract = dec("contracts", &k, &v)?;
            let a: Option<Allocation> = allocations
                .get(&k)?
                .map(|v| dec("allocations", &k, &v))
                .transpose()?;
            let kind = match &a {
                Some(a) => a.kind,
                None if me.as_ref() == Some(&c.seller) => AllocationKind::Node,
                None => AllocationKind::VirtualNode,
            };
            let kept_until = is_ended(c.state).then(|| {
                kept.get(&k[..])
                    .copied()
                    .unwrap_or(now.saturating_add(retention_ms))
            });
            let record = Record {
                kind,
                offer: a.as_ref().and_then(|a| a.offer.clone()),
                updated_at: a.as_ref().map_or(c.created_at, |a| a.updated_at),
                kept_until,
                contract: c,
            };
            put(
                &mut batch,
                keys::contract(&record.contract.id),
                &enc(&record),
                &mut n,
            );
            spill(ledger, &mut batch, &mut n, false)?;
        }
        spill(ledger, &mut batch, &mut n, true)?;
        meta.insert(b"layout", &[LAYOUT])?;
        db.flush()?;
        tracing::info!(records = moved, "tables moved to the ledger layout (once)");
    } else if !done {
        meta.insert(b"layout", &[LAYOUT])?;
    }
    if !old.is_empty() {
        for name in &old {
            db.drop_tree(name.as_bytes())?;
        }
        db.flush()?;
    }
    Ok(())
}
