//! The REAR HTTP API as the reference node's gateway serves it (routes, status codes, JSON),
//! mapped onto fluidlet's protocol: a reserve becomes RESERVE_FLAVOUR to the provider, a
//! purchase PEER_REQUEST, each sent as the reference node's own buyer `ref-{hash}`.
//! docs/supernode.md has the mapping field by field.

use crate::config::Config;
use crate::domain::{buyer_id, Domain};
use crate::quantity;
use crate::rear;
use crate::store::{Store, TxRecord, TxState};
use fluidlet::model::{ContractState, Flavour, Id, Resources};
use fluidlet::wire::{Body, Bytes, ErrorCode, PeerRequest};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// An HTTP answer: status, content type, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub json: bool,
    pub body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: &impl serde::Serialize) -> Reply {
        match serde_json::to_vec(v) {
            Ok(body) => Reply {
                status,
                json: true,
                body,
            },
            Err(e) => Reply::error(500, &format!("encoding the answer: {e}")),
        }
    }
    /// As Go's http.Error: text/plain, the message and a newline.
    pub fn error(status: u16, text: &str) -> Reply {
        Reply {
            status,
            json: false,
            body: format!("{text}\n").into_bytes(),
        }
    }
    fn empty(status: u16) -> Reply {
        Reply {
            status,
            json: true,
            body: Vec::new(),
        }
    }
}

/// A reference node admitted by `domain.sh refnode`: its buyer certificate and keys.
struct RefKeys {
    certificate: Vec<u8>,
    keys: fluidlet::seal::Keys,
}

pub struct Face {
    cfg: Config,
    domain: Domain,
    store: Store,
    /// Loaded reference-node keys, by buyer id (read from refs.dir on first use).
    refs: Mutex<HashMap<String, Arc<RefKeys>>>,
}

fn now() -> u64 {
    fluidlet::unix_ms()
}

/// A selector: per resource a match or a range (thousandths), and an architecture.
#[derive(Default, Debug)]
struct Selector {
    architecture: Option<String>,
    filters: HashMap<&'static str, Filter>,
}

#[derive(Debug)]
enum Filter {
    Match(u128),
    Range(Option<u128>, Option<u128>),
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape in {s:?}"))?;
                out.push(h);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

/// Most query parameters read.
const MAX_QUERY_PAIRS: usize = 32;

/// The reference node's decodeK8SliceSelector: every key must be
/// `filter[RESOURCE][match|range]` with `[min|max]` after a range (tests/fluidos facts).
fn parse_selector(query: Option<&str>) -> Result<Selector, String> {
    let mut sel = Selector::default();
    let Some(q) = query else { return Ok(sel) };
    let mut seen: Vec<String> = Vec::new();
    for (n, pair) in q.split('&').filter(|p| !p.is_empty()).enumerate() {
        if n >= MAX_QUERY_PAIRS {
            return Err("too many query parameters".into());
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        // Go's url.Values: a repeated key keeps its first value.
        if seen.contains(&k) {
            continue;
        }
        seen.push(k.clone());
        let parts: Vec<&str> = k
            .strip_prefix("filter[")
            .and_then(|r| r.strip_suffix(']'))
            .map(|r| r.split("][").collect())
            .ok_or_else(|| format!("invalid key format: {k}"))?;
        let (resource, kind, bound) = match parts.as_slice() {
            [r, t] => (*r, *t, None),
            [r, t, b] => (*r, *t, Some(*b)),
            _ => return Err(format!("invalid key format: {k}")),
        };
        let resource: &'static str = match resource {
            "architecture" => "architecture",
            "cpu" => "cpu",
            "memory" => "memory",
            "pods" => "pods",
            "storage" => "storage",
            _ => return Err(format!("invalid key format: {k}")),
        };
        if !matches!(kind, "match" | "range")
            || !matches!(bound, None | Some("min" | "max" | "regex"))
        {
            return Err(format!("invalid key format: {k}"));
        }
        if resource == "architecture" {
            if kind != "match" {
                return Err("invalid filter type: Range".into());
            }
            if sel.architecture.is_some() {
                return Err("multiple match filters for the same resource".into());
            }
            sel.architecture = Some(v);
            continue;
        }
        let q = quantity::parse(&v)?.0;
        let entry = sel.filters.remove(resource);
        let f = match (kind, bound, entry) {
            ("match", _, None) => Filter::Match(q),
            ("match", _, Some(_)) => {
                return Err("multiple match filters for the same resource".into())
            }
            ("range", Some("min"), None) => Filter::Range(Some(q), None),
            ("range", Some("max"), None) => Filter::Range(None, Some(q)),
            ("range", Some("min"), Some(Filter::Range(None, mx))) => Filter::Range(Some(q), mx),
            ("range", Some("max"), Some(Filter::Range(mn, None))) => Filter::Range(mn, Some(q)),
            ("range", Some("min" | "max"), Some(Filter::Range(..))) => {
                return Err("min or max value already set".into())
            }
            ("range", Some("min" | "max"), Some(Filter::Match(_))) => {
                return Err(
                    "cannot have range filter for a resource with another filter type".into(),
                )
            }
            // A range without [min]/[max] (the reference node's handler fails on it too), or
            // with [regex].
            _ => return Err(format!("invalid key format: {k}")),
        };
        sel.filters.insert(resource, f);
    }
    Ok(sel)
}

fn matches(sel: &Selector, f: &Flavour) -> bool {
    if let Some(a) = &sel.architecture {
        if a != f.architecture.as_str() {
            return false;
        }
    }
    let r = &f.resources;
    sel.filters.iter().all(|(res, filt)| {
        let v: u128 = match *res {
            "cpu" => u128::from(r.cpu),
            "memory" => u128::from(r.memory) * 1000,
            "pods" => u128::from(r.pods) * 1000,
            _ => u128::from(r.storage) * 1000,
        };
        match filt {
            Filter::Match(x) => v == *x,
            Filter::Range(mn, mx) => mn.is_none_or(|m| v >= m) && mx.is_none_or(|m| v <= m),
        }
    })
}

/// The piece a K8Slice configuration asks for, in fluidlet's units.
fn partition(c: &rear::Configuration) -> Result<Resources, String> {
    let k: rear::K8SliceConfiguration =
        serde_json::from_value(c.data.clone()).map_err(|e| format!("configuration data: {e}"))?;
    let cpu = quantity::parse(&k.cpu)?
        .millicores()
        .ok_or("cpu too large")?;
    let memory = quantity::parse(&k.memory)?
        .units_ceil()
        .ok_or("memory too large")?;
    let pods = quantity::parse(&k.pods)?
        .units_ceil()
        .ok_or("pods too large")?;
    let pods = u32::try_from(pods).map_err(|_| "pods too large".to_string())?;
    let storage = match &k.storage {
        Some(s) => quantity::parse(s)?
            .units_ceil()
            .ok_or("storage too large")?,
        None => 0,
    };
    Ok(Resources {
        cpu,
        memory,
        pods,
        storage,
    })
}

/// A REAR transaction id as the reference node makes them: random hex, '-', Unix ns.
fn transaction_id() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "no randomness".to_string())?;
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{}-{ns}", crate::domain::hex(&b)))
}

/// The HTTP status a provider's refusal becomes.
fn refusal_status(code: Option<ErrorCode>) -> u16 {
    match code {
        Some(ErrorCode::FlavourGone) => 404,
        Some(ErrorCode::BadPartition) => 400,
        Some(ErrorCode::NoFit) | Some(ErrorCode::ShareExceeded) => 409,
        Some(ErrorCode::TooManyPending) => 429,
        Some(ErrorCode::Busy) => 503,
        _ => 502,
    }
}

impl Face {
    pub fn new(cfg: Config, domain: Domain, store: Store) -> Face {
        Face {
            cfg,
            domain,
            store,
            refs: Mutex::new(HashMap::new()),
        }
    }

    pub fn ready(&self) -> bool {
        self.domain.is_connected()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn owner(&self, provider: &Id) -> rear::NodeIdentity {
        rear::NodeIdentity {
            id: provider.to_string(),
            ip: self.cfg.advertise.clone(),
            domain: self.cfg.domain.to_string(),
            additional: None,
        }
    }

    fn listed(&self, sel: Option<&Selector>) -> Vec<rear::Flavor> {
        let Ok(c) = self.domain.catalog.lock() else {
            return Vec::new();
        };
        let mut out: Vec<(String, String, rear::Flavor)> = Vec::new();
        for (p, a) in &c.providers {
            for f in a.flavours.iter().filter(|f| f.available) {
                if sel.is_some_and(|s| !matches(s, f)) {
                    continue;
                }
                let id = crate::domain::face_flavor_id(p, &f.id);
                out.push((
                    p.to_string(),
                    f.id.to_string(),
                    rear::flavor(f, &id, self.owner(p), a.sent_at),
                ));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out.into_iter().map(|(_, _, f)| f).collect()
    }

    /// GET /api/v2/flavors: 200 with the list, 204 with no body when there is none.
    pub fn flavors(&self) -> Reply {
        let l = self.listed(None);
        if l.is_empty() {
            Reply::empty(204)
        } else {
            Reply::json(200, &l)
        }
    }

    /// GET /api/v2/flavors/k8slice?filter[...]: 400 on a bad selector, 200 `[]` on no match.
    pub fn k8slice(&self, query: Option<&str>) -> Reply {
        match parse_selector(query) {
            Ok(sel) => Reply::json(200, &self.listed(Some(&sel))),
            Err(e) => Reply::error(400, &e),
        }
    }

    fn ref_keys(&self, buyer: &str) -> Result<Arc<RefKeys>, Reply> {
        if let Some(k) = self.refs.lock().ok().and_then(|m| m.get(buyer).cloned()) {
            return Ok(k);
        }
        let id = Id::new(buyer).map_err(|_| Reply::error(500, "bad buyer id"))?;
        let dir: PathBuf = self.cfg.refs_dir.join(buyer);
        let files = fluidlet::config::TlsFiles {
            ca: dir.join("domain-ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        if !files.cert.is_file() {
            return Err(Reply::error(
                403,
                &format!(
                    "this reference node is not admitted to the domain: its operator runs domain.sh refnode DIR {} LIQO_ID (buyer {buyer})",
                    self.cfg.name
                ),
            ));
        }
        let loaded = fluidlet::tls::load(&files, &id).map_err(|e| {
            tracing::warn!("reference node {buyer}: {e}");
            Reply::error(500, "the reference node's buyer certificate does not load")
        })?;
        let keys = fluidlet::seal::Keys::new(&loaded.certificate, &loaded.key, loaded.roots)
            .map_err(|e| {
                tracing::warn!("reference node {buyer}: {e}");
                Reply::error(500, "the reference node's buyer key does not load")
            })?;
        let k = Arc::new(RefKeys {
            certificate: loaded.certificate.to_vec(),
            keys,
        });
        if let Ok(mut m) = self.refs.lock() {
            if m.len() < 10_000 {
                m.insert(buyer.to_string(), k.clone());
            }
        }
        Ok(k)
    }

    fn transaction_json(&self, r: &TxRecord) -> rear::Transaction {
        rear::Transaction {
            transaction_id: r.id.clone(),
            flavor_id: r.flavor_id.clone(),
            configuration: r
                .configuration
                .as_ref()
                .and_then(|c| serde_json::from_value(c.clone()).ok()),
            buyer: self.buyer_identity(r),
            cluster_id: r.liqo_id.clone(),
            expiration_time: rear::rfc3339(r.expires_at),
        }
    }

    fn buyer_identity(&self, r: &TxRecord) -> rear::NodeIdentity {
        rear::NodeIdentity {
            id: r.node_id.clone(),
            ip: r.node_ip.clone(),
            domain: r.node_domain.clone(),
            additional: Some(rear::AdditionalInfo {
                liqo_id: r.liqo_id.clone(),
                kubeconfig: None,
            }),
        }
    }

    /// POST /api/v2/reservations.
    pub async fn reserve(&self, body: &[u8]) -> Reply {
        let req: rear::ReserveRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return Reply::error(400, &e.to_string()),
        };
        let liqo_id = req
            .buyer
            .additional
            .as_ref()
            .map(|a| a.liqo_id.clone())
            .unwrap_or_default();
        if liqo_id.is_empty() {
            return Reply::error(400, "Error: LiqoID not provided");
        }
        // The Liqo cluster id goes into PEER_REQUEST as fluidlet's cluster_id.
        if Id::new(&liqo_id).is_err() {
            return Reply::error(
                400,
                "Error: the LiqoID is not a cluster id (A-Z a-z 0-9 . _ -, at most 96)",
            );
        }
        let buyer = buyer_id(&liqo_id);
        // The same buyer and flavour again: the same transaction, while it is live.
        match self.store.find(&buyer, &req.buyer.id, &req.flavor_id) {
            Ok(Some(r)) if r.state != TxState::Pending && now() < r.expires_at => {
                return Reply::json(200, &self.transaction_json(&r));
            }
            Ok(Some(r)) if r.state == TxState::Pending => {
                // Left in flight by a restart: resend the same fluidlet transaction.
                return self.send_reserve(r).await;
            }
            Ok(_) => {}
            Err(e) => return Reply::error(500, &e.to_string()),
        }
        let found = self
            .domain
            .catalog
            .lock()
            .ok()
            .and_then(|c| c.lookup(&req.flavor_id));
        let Some((provider, flavour)) = found else {
            return Reply::error(404, "Flavor not found");
        };
        let part = match &req.configuration {
            None => None,
            Some(c) if c.kind != rear::K8SLICE => {
                return Reply::error(400, "Configuration type not supported")
            }
            Some(c) => match partition(c) {
                Ok(p) => Some(p),
                Err(e) => return Reply::error(400, &e),
            },
        };
        if let Err(r) = self.ref_keys(&buyer) {
            return r;
        }
        let n = match self.store.next_number() {
            Ok(n) => n,
            Err(e) => return Reply::error(500, &e.to_string()),
        };
        let id = match transaction_id() {
            Ok(i) => i,
            Err(e) => return Reply::error(500, &e),
        };
        let record = TxRecord {
            id,
            state: TxState::Pending,
            buyer: buyer.clone(),
            node_id: req.buyer.id.clone(),
            node_ip: req.buyer.ip.clone(),
            node_domain: req.buyer.domain.clone(),
            liqo_id,
            flavor_id: req.flavor_id.clone(),
            provider: provider.to_string(),
            flavour: flavour.to_string(),
            fluidlet_tx: format!("{buyer}.t{n}"),
            configuration: req
                .configuration
                .as_ref()
                .and_then(|c| serde_json::to_value(c).ok()),
            partition: part.map(|p| [p.cpu, p.memory, u64::from(p.pods), p.storage]),
            contract: None,
            expires_at: 0,
            created_at: now(),
        };
        if let Err(e) = self.store.put(&record).await {
            return Reply::error(500, &e.to_string());
        }
        self.send_reserve(record).await
    }

    async fn send_reserve(&self, mut r: TxRecord) -> Reply {
        let ids = (
            Id::new(&r.buyer),
            Id::new(&r.provider),
            Id::new(&r.flavour),
            Id::new(&r.fluidlet_tx),
        );
        let (Ok(buyer), Ok(provider), Ok(flavour), Ok(tx)) = ids else {
            return Reply::error(500, "a stored id is not an id");
        };
        let partition = r.partition.and_then(|p| {
            Some(Resources {
                cpu: p[0],
                memory: p[1],
                pods: u32::try_from(p[2]).ok()?,
                storage: p[3],
            })
        });
        let body = Body::ReserveFlavour(fluidlet::model::ReserveRequest {
            transaction: tx.clone(),
            flavour: flavour.clone(),
            buyer: buyer.clone(),
            partition,
        });
        let answer = self
            .domain
            .request(&buyer, &provider, body, self.cfg.reserve_timeout, None)
            .await;
        let m = match answer {
            Ok(m) => m,
            Err(e) => {
                let _ = self.store.remove(&r).await;
                return Reply::error(504, &format!("the provider did not answer: {e}"));
            }
        };
        match m.body {
            Body::Reserved(c) => {
                // The buyer's check (docs/protocol.md, Contract).
                let ok = c.seller == provider
                    && c.buyer == buyer
                    && c.transaction == tx
                    && c.flavour.id == flavour
                    && partition.is_none_or(|p| p == c.resources)
                    && c.state == ContractState::Reserved
                    && c.id.as_str().starts_with(&format!("{provider}."));
                if !ok {
                    let _ = self.store.remove(&r).await;
                    return Reply::error(502, "the provider answered a contract not asked for");
                }
                r.state = TxState::Reserved;
                r.expires_at = c.expires_at;
                r.contract = Some(minicbor::to_vec(&*c).unwrap_or_default());
                if let Err(e) = self.store.put(&r).await {
                    return Reply::error(500, &e.to_string());
                }
                Reply::json(200, &self.transaction_json(&r))
            }
            Body::Error(e) => {
                let _ = self.store.remove(&r).await;
                Reply::error(
                    refusal_status(e.code()),
                    &format!("the provider refused: {}", e.text.as_str()),
                )
            }
            _ => {
                let _ = self.store.remove(&r).await;
                Reply::error(502, "the provider answered something else")
            }
        }
    }

    /// POST /api/v2/transactions/{id}/purchase.
    pub async fn purchase(&self, tid: &str, body: &[u8]) -> Reply {
        if let Err(e) = serde_json::from_slice::<rear::PurchaseRequest>(body) {
            return Reply::error(400, &e.to_string());
        }
        let r = match self.store.get(tid) {
            Ok(Some(r)) if r.state != TxState::Pending => r,
            Ok(_) => return Reply::error(500, "Error getting the Transaction"),
            Err(e) => return Reply::error(500, &e.to_string()),
        };
        if r.state == TxState::Reserved && now() > r.expires_at {
            let _ = self.store.remove(&r).await;
            return Reply::error(408, "Error: transaction Timeout");
        }
        let contract: fluidlet::model::Contract = match r.contract.as_deref().map(minicbor::decode)
        {
            Some(Ok(c)) => c,
            _ => return Reply::error(500, "the stored contract does not decode"),
        };
        let keys = match self.ref_keys(&r.buyer) {
            Ok(k) => k,
            Err(reply) => return reply,
        };
        let (Ok(buyer), Ok(provider), Ok(cluster)) =
            (Id::new(&r.buyer), Id::new(&r.provider), Id::new(&r.liqo_id))
        else {
            return Reply::error(500, "a stored id is not an id");
        };
        let Ok(cert) = Bytes::new(&keys.certificate) else {
            return Reply::error(500, "the buyer certificate is too large");
        };
        let body = Body::PeerRequest(PeerRequest {
            contract: contract.id.clone(),
            cluster_id: cluster,
            liqo_version: None,
            certificate: Some(cert),
        });
        let t = self.cfg.peer_request_timeout;
        let m = match self
            .domain
            .request(&buyer, &provider, body, t, Some(t / 3))
            .await
        {
            Ok(m) => m,
            Err(e) => return Reply::error(504, &format!("the provider did not answer: {e}")),
        };
        let grant = match m.body {
            Body::PeerAccept(g) if g.contract == contract.id => g,
            Body::Error(e) => {
                let status = match e.code() {
                    Some(ErrorCode::Busy) => 503,
                    _ => 500,
                };
                return Reply::error(
                    status,
                    &format!("the provider refused the peering: {}", e.text.as_str()),
                );
            }
            _ => return Reply::error(502, "the provider answered something else"),
        };
        if grant.identity.is_some() {
            // On a TLS domain a kubeconfig in clear crossed the broker: refused, as a
            // fluidlet buyer refuses it.
            return Reply::error(502, "the provider sent the peering identity in clear");
        }
        let kubeconfig = match &grant.sealed {
            Some(s) => {
                let ctx = fluidlet::seal::Context {
                    contract: &contract.id,
                    provider: &provider,
                    buyer: &buyer,
                };
                match keys.keys.open(&ctx, s.as_slice()) {
                    Ok(k) => rear::base64(k.as_bytes()),
                    Err(e) => {
                        tracing::warn!("{}: sealed identity: {e}", r.id);
                        return Reply::error(502, "the sealed peering identity does not open");
                    }
                }
            }
            // This buyer already peers with the provider through another contract.
            None => String::new(),
        };
        let mut r = r;
        if r.state != TxState::Purchased {
            r.state = TxState::Purchased;
            if let Err(e) = self.store.put(&r).await {
                return Reply::error(500, &e.to_string());
            }
        }
        let seller = rear::NodeIdentity {
            additional: Some(rear::AdditionalInfo {
                liqo_id: grant.cluster_id.to_string(),
                kubeconfig: None,
            }),
            ..self.owner(&provider)
        };
        let out = rear::Contract {
            contract_id: contract.id.to_string(),
            transaction_id: r.id.clone(),
            flavor: rear::flavor(
                &contract.flavour,
                &r.flavor_id,
                self.owner(&provider),
                contract.created_at,
            ),
            buyer: self.buyer_identity(&r),
            buyer_cluster_id: r.liqo_id.clone(),
            seller,
            credentials: rear::LiqoCredentials {
                cluster_id: grant.cluster_id.to_string(),
                kubeconfig,
            },
            expiration_time: contract.ends_at.map(rear::rfc3339).unwrap_or_default(),
            configuration: r
                .configuration
                .as_ref()
                .and_then(|c| serde_json::from_value(c.clone()).ok()),
        };
        Reply::json(200, &out)
    }

    /// Every transaction the face holds (for `status`).
    pub fn transactions(&self) -> Vec<TxRecord> {
        self.store.all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_as_the_reference_node_decodes_them() {
        let s = parse_selector(Some(
            "filter[cpu][range][min]=500m&filter%5Bcpu%5D%5Brange%5D%5Bmax%5D=2&filter[architecture][match]=arm64",
        ))
        .unwrap();
        assert!(matches!(
            s.filters.get("cpu"),
            Some(Filter::Range(Some(500), Some(2000)))
        ));
        assert_eq!(s.architecture.as_deref(), Some("arm64"));
        for bad in [
            "cpu=1",
            "filter[gpu][match]=1",
            "filter[cpu][between]=1",
            "filter[cpu][range]=1",
            "filter[cpu][range][regex]=1",
            "filter[cpu][range][min]=lots",
            "filter[architecture][range][min]=1",
            "filter[memory][match]=1Gi&filter[memory][range][min]=1Gi",
            "filter[memory][range][min]=1Gi&filter[memory][match]=1Gi",
            "filter[cpu][match]=%zz",
        ] {
            assert!(parse_selector(Some(bad)).is_err(), "{bad} accepted");
        }
        assert!(parse_selector(Some("")).unwrap().filters.is_empty());
    }
}
