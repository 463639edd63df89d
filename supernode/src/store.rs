//! The face's own tables (sled): one record per REAR transaction, durable before any answer
//! that names it, so a restart of the face loses no transaction nor contract.
//!
//! Trees: `tx` (REAR transaction id -> record, JSON), `by_buyer` (buyer id, NUL, REAR node
//! id, NUL, flavour id -> REAR transaction id: a repeated reserve finds its transaction).

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Where a transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxState {
    /// RESERVE_FLAVOUR sent, no RESERVED yet (a retry resends the same fluidlet
    /// transaction id, so a reservation made while the face was down is recovered).
    Pending,
    /// RESERVED received: the provider holds the piece until `expires_at`.
    Reserved,
    /// PEER_ACCEPT received: the contract is Active at the provider.
    Purchased,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TxRecord {
    /// The REAR transaction id (random; knowing it authorises the purchase).
    pub id: String,
    pub state: TxState,
    /// The buyer the face speaks as: `ref-{hash of liqoID}`.
    pub buyer: String,
    /// What the reference node sent as its identity (`buyerID`).
    pub node_id: String,
    pub node_ip: String,
    pub node_domain: String,
    pub liqo_id: String,
    /// The face's flavour id the reference node reserved.
    pub flavor_id: String,
    pub provider: String,
    /// fluidlet's flavour id at the provider.
    pub flavour: String,
    /// fluidlet's transaction id (`{buyer}.t{n}`), the provider's idempotency key.
    pub fluidlet_tx: String,
    /// The `configuration` of the reserve, echoed in the Transaction and the Contract.
    pub configuration: Option<serde_json::Value>,
    /// The piece asked (None: whole flavour), as fluidlet resources.
    pub partition: Option<[u64; 4]>,
    /// The contract RESERVED carried, CBOR (fluidlet::model::Contract).
    pub contract: Option<Vec<u8>>,
    /// Unix ms: the provider's reservation deadline (RESERVED's `expires_at`).
    pub expires_at: u64,
    pub created_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: TxState, created_at: u64, expires_at: u64) -> TxRecord {
        TxRecord {
            id: id.into(),
            state,
            buyer: "ref-1".into(),
            node_id: format!("n-{id}"),
            node_ip: String::new(),
            node_domain: String::new(),
            liqo_id: "l".into(),
            flavor_id: "fl-1".into(),
            provider: "p".into(),
            flavour: "f.1".into(),
            fluidlet_tx: "ref-1.t1".into(),
            configuration: None,
            partition: None,
            contract: None,
            expires_at,
            created_at,
        }
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_stale_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(&record("a", TxState::Reserved, 0, 1_000))
                .await
                .unwrap();
            s.put(&record("b", TxState::Reserved, 0, 10_000))
                .await
                .unwrap();
            s.put(&record("c", TxState::Pending, 0, 0)).await.unwrap();
            s.put(&record("d", TxState::Purchased, 0, 1_000))
                .await
                .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.all().len(), 4);
        assert!(s.find("ref-1", "n-b", "fl-1").unwrap().is_some());
        // At 5 s with 2 s of grace: a (expired at 1 s) and c (pending since 0) go; b is
        // live; d was purchased, its contract has no end: kept.
        assert_eq!(s.prune(5_000, 2_000, 2_000).await.unwrap(), 2);
        let mut left: Vec<String> = s.all().into_iter().map(|r| r.id).collect();
        left.sort();
        assert_eq!(left, ["b", "d"]);
        assert!(s.find("ref-1", "n-a", "fl-1").unwrap().is_none());
    }
}

/// Where a sale of a reference node's flavour to a fluidlet consumer is (outbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutState {
    /// RESERVED sent: the reference node holds a transaction (which reserves nothing there).
    Reserved,
    /// The reference node's purchase answered a Contract; PEER_ACCEPT sent.
    Active,
    /// The consumer sent RELEASE (the reference node is not told: REAR over HTTP has none).
    Released,
    /// Unpeered past `expires_at`.
    Expired,
}

/// One fluidlet contract the face sold on behalf of a reference node (outbound).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutRecord {
    /// fluidlet contract id, `{ref-provider}.c{n}`.
    pub contract_id: String,
    pub state: OutState,
    /// The fluidlet consumer (buyer).
    pub consumer: String,
    /// The consumer's transaction id (idempotency key with `consumer`).
    pub fluidlet_tx: String,
    /// The provider id the face speaks as for the reference node.
    pub provider: String,
    /// The reference node's REAR gateway, `host:port`.
    pub endpoint: String,
    /// The reference node's flavour id.
    pub ref_flavor: String,
    /// The reference node's transaction id (its purchase path).
    pub ref_transaction: String,
    /// The contract RESERVED carried, CBOR (fluidlet::model::Contract).
    pub contract: Vec<u8>,
    pub expires_at: u64,
    pub created_at: u64,
    /// After the purchase: the reference node's contract id, the seller's Liqo cluster id
    /// and the peering kubeconfig (kept for a repeated PEER_REQUEST: the reference node
    /// answers a repeated purchase 500). Owner-only files (the face's umask).
    pub ref_contract: Option<String>,
    pub cluster_id: Option<String>,
    pub kubeconfig: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tx: sled::Tree,
    by_buyer: sled::Tree,
    out: sled::Tree,
    out_by_tx: sled::Tree,
}

fn buyer_key(buyer: &str, node_id: &str, flavor_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(buyer.len() + node_id.len() + flavor_id.len() + 2);
    k.extend_from_slice(buyer.as_bytes());
    k.push(0);
    k.extend_from_slice(node_id.as_bytes());
    k.push(0);
    k.extend_from_slice(flavor_id.as_bytes());
    k
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let db = sled::Config::new()
            .path(dir.join("supernode.sled"))
            .open()
            .map_err(err)?;
        let tx = db.open_tree("tx").map_err(err)?;
        let by_buyer = db.open_tree("by_buyer").map_err(err)?;
        let out = db.open_tree("out").map_err(err)?;
        let out_by_tx = db.open_tree("out_by_tx").map_err(err)?;
        Ok(Store {
            db,
            tx,
            by_buyer,
            out,
            out_by_tx,
        })
    }

    /// A number never handed out before, across restarts (fluidlet transaction ids).
    pub fn next_number(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(err)
    }

    pub fn get(&self, id: &str) -> Result<Option<TxRecord>, StoreError> {
        match self.tx.get(id.as_bytes()).map_err(err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(err),
            None => Ok(None),
        }
    }

    pub fn find(
        &self,
        buyer: &str,
        node_id: &str,
        flavor_id: &str,
    ) -> Result<Option<TxRecord>, StoreError> {
        match self
            .by_buyer
            .get(buyer_key(buyer, node_id, flavor_id))
            .map_err(err)?
        {
            Some(id) => self.get(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Writes the record and its index, durably (flushed) before returning.
    pub async fn put(&self, r: &TxRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(r).map_err(err)?;
        self.tx.insert(r.id.as_bytes(), v).map_err(err)?;
        self.by_buyer
            .insert(
                buyer_key(&r.buyer, &r.node_id, &r.flavor_id),
                r.id.as_bytes(),
            )
            .map_err(err)?;
        self.db.flush_async().await.map_err(err)?;
        Ok(())
    }

    /// Deletes the record and its index, durably.
    pub async fn remove(&self, r: &TxRecord) -> Result<(), StoreError> {
        self.tx.remove(r.id.as_bytes()).map_err(err)?;
        let k = buyer_key(&r.buyer, &r.node_id, &r.flavor_id);
        if self
            .by_buyer
            .get(&k)
            .map_err(err)?
            .is_some_and(|v| v == r.id.as_bytes())
        {
            self.by_buyer.remove(k).map_err(err)?;
        }
        self.db.flush_async().await.map_err(err)?;
        Ok(())
    }

    /// Deletes what can no longer be used, so the tables stay bounded by live business:
    /// a Pending record older than `stale_ms` (its reserve was never answered), a Reserved one
    /// `stale_ms` past its expiry (the reference node drops an expired transaction too), a
    /// Purchased one `keep_ms` after its contract's end (`ends_at`; a contract without a term is
    /// kept). Returns how many were deleted.
    pub async fn prune(&self, now: u64, stale_ms: u64, keep_ms: u64) -> Result<usize, StoreError> {
        let mut gone = Vec::new();
        for r in self.all() {
            let dead = match r.state {
                TxState::Pending => now > r.created_at.saturating_add(stale_ms),
                TxState::Reserved => now > r.expires_at.saturating_add(stale_ms),
                TxState::Purchased => r
                    .contract
                    .as_deref()
                    .and_then(|c| minicbor::decode::<fluidlet::model::Contract>(c).ok())
                    .and_then(|c| c.ends_at)
                    .is_some_and(|end| now > end.saturating_add(keep_ms)),
            };
            if dead {
                gone.push(r);
            }
        }
        for r in &gone {
            self.remove(r).await?;
        }
        Ok(gone.len())
    }

    /// Every record (the `status` listing; bounded by what was sold).
    pub fn all(&self) -> Vec<TxRecord> {
        self.tx
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Outbound: a contract by its fluidlet id.
    pub fn out_get(&self, contract: &str) -> Result<Option<OutRecord>, StoreError> {
        match self.out.get(contract.as_bytes()).map_err(err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(err),
            None => Ok(None),
        }
    }

    /// Outbound: the contract a consumer's transaction made.
    pub fn out_find(&self, consumer: &str, tx: &str) -> Result<Option<OutRecord>, StoreError> {
        let k = [consumer.as_bytes(), &[0], tx.as_bytes()].concat();
        match self.out_by_tx.get(k).map_err(err)? {
            Some(id) => self.out_get(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Outbound: writes the record and its index, durably (flushed) before returning.
    pub async fn out_put(&self, r: &OutRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(r).map_err(err)?;
        self.out.insert(r.contract_id.as_bytes(), v).map_err(err)?;
        let k = [r.consumer.as_bytes(), &[0], r.fluidlet_tx.as_bytes()].concat();
        self.out_by_tx
            .insert(k, r.contract_id.as_bytes())
            .map_err(err)?;
        self.db.flush_async().await.map_err(err)?;
        Ok(())
    }

    /// Outbound: every record.
    pub fn out_all(&self) -> Vec<OutRecord> {
        self.out
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Outbound: Reserved records past `expires_at` become Expired; ended ones (Released,
    /// Expired) go `keep_ms` after their expiry. Returns (expired, deleted).
    pub async fn out_sweep(&self, now: u64, keep_ms: u64) -> Result<(usize, usize), StoreError> {
        let (mut expired, mut deleted) = (0, 0);
        for mut r in self.out_all() {
            match r.state {
                OutState::Reserved if now > r.expires_at => {
                    r.state = OutState::Expired;
                    self.out_put(&r).await?;
                    expired += 1;
                }
                OutState::Released | OutState::Expired
                    if now > r.expires_at.saturating_add(keep_ms) =>
                {
                    self.out.remove(r.contract_id.as_bytes()).map_err(err)?;
                    let k = [r.consumer.as_bytes(), &[0], r.fluidlet_tx.as_bytes()].concat();
                    self.out_by_tx.remove(k).map_err(err)?;
                    self.db.flush_async().await.map_err(err)?;
                    deleted += 1;
                }
                _ => {}
            }
        }
        Ok((expired, deleted))
    }
}
