//! The buyer's side of the ledger: purchases in flight and the contracts bought. A purchase
//! is recorded before its RESERVE_FLAVOUR leaves, so a restarted node knows which
//! transaction ids it may still hold a contract for, and it ends in the same batch that
//! stores the contract it yielded.

use super::codec::{enc, scan};
use super::ledger::Record;
use super::{keys, TableError, Tables};
use crate::model::{AllocationKind, Contract, Id, ReserveRequest};
use minicbor::{Decode, Encode};

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

impl Tables {
    /// Records a purchase before RESERVE_FLAVOUR leaves.
    pub fn begin_purchase(&self, out: &Outgoing) -> Result<(), TableError> {
        let _state = self.writer();
        self.ledger
            .insert(keys::purchase(&out.request.transaction), enc(out))?;
        Ok(())
    }

    /// A purchase that ended without a contract.
    pub fn abandon_purchase(&self, tx: &Id) -> Result<(), TableError> {
        let _state = self.writer();
        self.ledger.remove(keys::purchase(tx))?;
        Ok(())
    }

    /// Purchases started and not finished.
    pub fn purchases_in_flight(&self) -> Result<Vec<Outgoing>, TableError> {
        scan("transactions", &self.ledger, keys::PURCHASE)
    }

    /// The buyer's side of RESERVED (workflow steps 19-20): the contract with its VirtualNode
    /// allocation in "inactive" status, and the end of the purchase, in one batch, flushed
    /// before returning.
    pub async fn complete_purchase(&self, c: &Contract, now: u64) -> Result<(), TableError> {
        let record = Record {
            contract: c.clone(),
            kind: AllocationKind::VirtualNode,
            offer: None,
            updated_at: now,
            kept_until: None,
        };
        {
            let mut state = self.writer();
            let old = self.record(&c.id)?;
            let mut batch = sled::Batch::default();
            batch.insert(keys::contract(&c.id), enc(&record));
            batch.remove(keys::purchase(&c.transaction));
            self.apply(&mut state, batch)?;
            state.replaced(old.as_ref(), &record);
        }
        self.flush().await
    }
}
