//! An imitation of the FLUIDOS reference node's REAR client (fluidos-project/node 9018b69,
//! pkg/rear-controller/gateway/client.go and services.go), written from its source as a test
//! helper: what it sends and what it accepts. Routes and JSON keys are read from the pinned
//! facts (tests/fluidos/node-9018b69.toml); nothing here is the reference node's code.
//!
//! Like the Go client it speaks plain HTTP/1.1, one request per connection (`req.Close`),
//! decodes JSON keys case-insensitively, ignores unknown keys, reads missing keys as zero
//! values, aborts a discovery on a flavour whose `type.name` it does not know, and treats
//! any status but the ones it expects as an error.

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pinned facts.
pub fn facts() -> toml::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fluidos/node-9018b69.toml");
    let text = std::fs::read_to_string(path).expect("tests/fluidos/node-9018b69.toml");
    toml::from_str(&text).expect("facts parse")
}

/// A fact by dotted path (`routes.reserve.path`), as a string.
pub fn fact(path: &str) -> String {
    let f = facts();
    let mut v = &f;
    for k in path.split('.') {
        v = v.get(k).unwrap_or_else(|| panic!("no fact {path}"));
    }
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Largest answer read (a bound of the helper's own).
const MAX_ANSWER: usize = 4 << 20;

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on its own connection (`Connection: close`), as makeRequest does.
pub async fn request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: Go-http-client/1.1\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else if method == "POST" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.expect("write head");
    if let Some(b) = body {
        s.write_all(b).await.expect("write body");
    }
    let mut raw = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(180),
        (&mut s).take(MAX_ANSWER as u64).read_to_end(&mut raw),
    )
    .await;
    read.expect("an answer in time").expect("read answer");
    parse(&raw)
}

fn parse(raw: &[u8]) -> Answer {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let mut content_type = None;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            match k.as_str() {
                "content-type" => content_type = Some(v),
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)
    } else {
        match length {
            Some(n) => rest[..n.min(rest.len())].to_vec(),
            None => rest.to_vec(),
        }
    };
    Answer {
        status,
        content_type,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let start = i + 2;
        out.extend_from_slice(&b[start..(start + n).min(b.len())]);
        b = &b[(start + n + 2).min(b.len())..];
    }
    out
}

/// Go's encoding/json key matching: the exact key first, else one equal ignoring case.
pub fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    let Some(o) = v.as_object() else { return &NULL };
    o.get(key)
        .or_else(|| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
        .unwrap_or(&NULL)
}

/// A string field, "" when missing (Go's zero value).
pub fn s(v: &Value, key: &str) -> String {
    get(v, key).as_str().unwrap_or_default().to_string()
}

/// What the Go client keeps of a listed flavour (ForgeFlavorFromObj).
#[derive(Clone, Debug)]
pub struct Flavor {
    pub id: String,
    pub provider: String,
    /// owner.IP: where reserve and purchase go.
    pub owner_ip: String,
    pub architecture: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    pub cpu_min: String,
    pub cpu_step: String,
    pub country: String,
    pub price: (String, String, String),
    pub raw: Value,
}

/// ForgeFlavorFromObj: `type.name` must be `k8slice` (or `service`), else the error that
/// aborts the whole discovery.
fn forge(f: &Value) -> Result<Flavor, String> {
    let t = get(f, "type");
    let name = s(t, "name");
    if name != fact("json.flavor.type_name") {
        return Err(format!("flavor type not recognized: {name:?}"));
    }
    let data = get(t, "data");
    let ch = get(data, &fact("json.k8slice.characteristics_key"));
    let part = get(get(data, "policies"), "partitionability");
    let owner = get(f, "owner");
    let price = get(f, "price");
    Ok(Flavor {
        id: s(f, "flavorID"),
        provider: s(owner, "ID"),
        owner_ip: s(owner, "IP"),
        architecture: s(ch, "architecture"),
        cpu: s(ch, "cpu"),
        memory: s(ch, "memory"),
        pods: s(ch, "pods"),
        cpu_min: s(part, "cpuMin"),
        cpu_step: s(part, "cpuStep"),
        country: s(get(f, "location"), &fact("json.flavor.country_key")),
        price: (s(price, "amount"), s(price, "currency"), s(price, "period")),
        raw: f.clone(),
    })
}

/// The reference node as a buyer.
pub struct Client {
    pub node_id: String,
    pub ip: String,
    pub domain: String,
    pub liqo_id: String,
}

impl Client {
    fn identity(&self) -> Value {
        json!({
            "ID": self.node_id,
            "IP": self.ip,
            "domain": self.domain,
            "additionalInformation": {
                "liqoID": self.liqo_id,
                // client.go sends the buyer's own kubeconfig (base64) along.
                "kubeconfig": "YXBpVmVyc2lvbjogdjEKa2luZDogQ29uZmlnCg==",
            }
        })
    }

    /// searchFlavor / searchFlavorWithSelector: 200 decodes, 204 is none, anything else or
    /// a flavour it cannot forge is an error.
    pub async fn discover(
        &self,
        provider: &str,
        query: Option<&str>,
    ) -> Result<Vec<Flavor>, String> {
        let path = match query {
            None => fact("routes.flavors.path"),
            Some(q) => format!("{}?{q}", fact("routes.k8slice.path")),
        };
        let a = request(provider, "GET", &path, None).await;
        match a.status {
            200 => {}
            204 => return Ok(Vec::new()),
            s => return Err(format!("received non-OK response status code: {s}")),
        }
        let list = a.json();
        let list = list.as_array().ok_or("not a list")?;
        list.iter().map(forge).collect()
    }

    /// ReserveFlavor: the body client.go builds; 200 decodes a Transaction (an empty
    /// transactionID is an error), anything else is an error (with its status).
    pub async fn reserve(
        &self,
        f: &Flavor,
        configuration: Option<Value>,
    ) -> Result<Value, (u16, String)> {
        let mut body = json!({ "flavorID": f.id, "buyerID": self.identity() });
        if let Some(c) = configuration {
            body["configuration"] = c;
        }
        let a = request(
            &f.owner_ip,
            "POST",
            &fact("routes.reserve.path"),
            Some(body.to_string().as_bytes()),
        )
        .await;
        if a.status != 200 {
            return Err((a.status, a.text()));
        }
        let t = a.json();
        if s(&t, "transactionID").is_empty() {
            return Err((200, "transactionID is empty".into()));
        }
        Ok(t)
    }

    /// PurchaseFlavor: body `{}` (no Liqo credentials for a K8Slice, no telemetry);
    /// anything but 200 is an error.
    pub async fn purchase(
        &self,
        seller_ip: &str,
        transaction: &str,
    ) -> Result<Value, (u16, String)> {
        let path = fact("routes.purchase.path").replace("{transactionID}", transaction);
        let a = request(seller_ip, "POST", &path, Some(b"{}")).await;
        if a.status != 200 {
            return Err((a.status, a.text()));
        }
        Ok(a.json())
    }
}

/// A K8Slice configuration (configuration.data keys from the facts).
pub fn k8slice_configuration(cpu: &str, memory: &str, pods: &str) -> Value {
    json!({ "type": fact("json.flavor.type_name"), "data": { "cpu": cpu, "memory": memory, "pods": pods } })
}

/// Standard base64 decoding (the kubeconfig in peeringTargetCredentials).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

// ---------------------------------------------------------------------------------------
// The reference node as a SELLER: an imitation of its REAR gateway's HTTP server
// (pkg/rear-controller/gateway/provider.go, routes.go at 9018b69), written from its source.
// Routes, keys and status codes come from the facts file; its quirks are kept: 204 and no
// body for an empty list, a reserve that holds nothing (an in-memory transaction valid one
// hour, looked up by buyer id and flavour before the liqoID is checked), a purchase that
// answers 408 past the expiry and deletes the transaction, removes it before making the
// Contract (a second purchase is 500), and sleeps while it "fetches" the credentials.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How the imitated seller behaves (the hostile modes for the face's bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// As the reference node.
    Honest,
    /// Accepts connections, reads the request, never answers.
    Hang,
    /// Answers 200 with a body that is not JSON.
    Garbage,
    /// Answers 200 with a 10 MB body.
    Huge,
    /// Reserve answers a Transaction for another flavour than asked.
    WrongFlavor,
}

/// One flavour the imitated seller lists (its K8Slice characteristics as strings, as the
/// Go struct holds Kubernetes quantities).
#[derive(Clone, Debug)]
pub struct Offer {
    pub id: String,
    pub architecture: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    pub cpu_min: String,
    pub memory_min: String,
    pub pods_min: String,
    pub cpu_step: String,
    pub memory_step: String,
    pub pods_step: String,
    pub amount: String,
    pub currency: String,
    pub period: String,
    pub country: String,
    pub available: bool,
}

impl Offer {
    /// A partitionable K8Slice flavour: `cpu`, `memory`, 110 pods, pieces of 500m / 1Gi.
    pub fn k8slice(id: &str, architecture: &str, cpu: &str, memory: &str, amount: &str) -> Offer {
        Offer {
            id: id.into(),
            architecture: architecture.into(),
            cpu: cpu.into(),
            memory: memory.into(),
            pods: "110".into(),
            cpu_min: "500m".into(),
            memory_min: "1Gi".into(),
            pods_min: "1".into(),
            cpu_step: "500m".into(),
            memory_step: "1Gi".into(),
            pods_step: "1".into(),
            amount: amount.into(),
            currency: "EUR".into(),
            period: "hour".into(),
            country: "IT".into(),
            available: true,
        }
    }
}

/// A transaction the seller holds (Gateway.Transactions: memory only).
#[derive(Clone, Debug)]
pub struct SellerTransaction {
    pub id: String,
    pub flavor_id: String,
    pub buyer: Value,
    pub cluster_id: String,
    pub configuration: Option<Value>,
    /// Unix seconds.
    pub expires: u64,
}

/// What the imitated seller holds and has done.
pub struct SellerState {
    pub node_id: String,
    pub liqo_id: String,
    pub ip: String,
    pub offers: Vec<Offer>,
    pub behaviour: Behaviour,
    pub transactions: HashMap<String, SellerTransaction>,
    /// Contracts made by purchases, as answered.
    pub contracts: Vec<Value>,
    /// How long a transaction lives (the reference node: 3600 s).
    pub transaction_secs: u64,
    /// How long a purchase takes (the reference node sleeps 5 s for the token).
    pub purchase_delay: Duration,
    /// Requests received: (method, path).
    pub requests: Vec<(String, String)>,
}

/// A running imitated reference seller (its REAR gateway on a loopback port).
#[derive(Clone)]
pub struct Provider {
    pub addr: String,
    pub state: Arc<Mutex<SellerState>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 with an offset, as Go formats time.Now() in a `+01:00` zone (the face must read
/// offsets: time.Parse(time.RFC3339) does).
pub fn rfc3339_offset(unix: u64, offset_minutes: i64) -> String {
    let local = unix as i64 + offset_minutes * 60;
    let days = local.div_euclid(86_400);
    let rem = local.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let zone = if offset_minutes == 0 {
        "Z".to_string()
    } else {
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let o = offset_minutes.abs();
        format!("{sign}{:02}:{:02}", o / 60, o % 60)
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{zone}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

impl Provider {
    /// Starts an imitated seller `node_id` (Liqo cluster `liqo_id`) listing `offers`.
    pub async fn start(node_id: &str, liqo_id: &str, offers: Vec<Offer>) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let state = Arc::new(Mutex::new(SellerState {
            node_id: node_id.into(),
            liqo_id: liqo_id.into(),
            ip: addr.clone(),
            offers,
            behaviour: Behaviour::Honest,
            transactions: HashMap::new(),
            contracts: Vec::new(),
            transaction_secs: 3600,
            purchase_delay: Duration::from_millis(200),
            requests: Vec::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve_one(conn, st).await;
                });
            }
        });
        Provider {
            addr,
            state,
            task: Arc::new(task),
        }
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        self.state.lock().unwrap().behaviour = b;
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut SellerState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Stops serving (the listener closes: connections are refused).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The Flavor JSON of an offer, keys as the Go struct tags spell them (typos included).
pub fn flavor_json(st: &SellerState, o: &Offer) -> Value {
    let ch = fact("json.k8slice.characteristics_key");
    let mut data = serde_json::Map::new();
    data.insert(
        ch,
        json!({
            "architecture": o.architecture, "cpu": o.cpu, "memory": o.memory, "pods": o.pods,
        }),
    );
    data.insert("properties".into(), json!({}));
    data.insert(
        "policies".into(),
        json!({ "partitionability": {
            "cpuMin": o.cpu_min, "memoryMin": o.memory_min, "podsMin": o.pods_min,
            "cpuStep": o.cpu_step, "memoryStep": o.memory_step, "podsStep": o.pods_step,
        }}),
    );
    let mut location = serde_json::Map::new();
    location.insert(fact("json.flavor.country_key"), json!(o.country));
    location.insert("city".into(), json!("Turin"));
    json!({
        "flavorID": o.id,
        "providerID": st.node_id,
        "type": { "name": fact("json.flavor.type_name"), "data": data },
        "timestamp": rfc3339_offset(unix_secs(), 60),
        "location": location,
        "price": { "amount": o.amount, "currency": o.currency, "period": o.period },
        "owner": {
            "ID": st.node_id, "IP": st.ip, "domain": "fluidos.eu",
            "additionalInformation": { "liqoID": st.liqo_id },
        },
        "availability": o.available,
    })
}

fn respond(status: u16, json: bool, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Internal Server Error",
    };
    let ct = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    // Go's net/http drops the body of a 204.
    let body: &[u8] = if status == 204 { b"" } else { body };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {ct}\r\n").into_bytes();
    if status != 204 {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// As Go's http.Error: text/plain, the text and a newline.
fn go_error(status: u16, text: &str) -> Vec<u8> {
    respond(status, false, format!("{text}\n").as_bytes())
}

fn encode(v: &Value) -> Vec<u8> {
    // encodeResponse: json.Marshal, status 200.
    respond(200, true, v.to_string().as_bytes())
}

async fn serve_one(
    mut conn: tokio::net::TcpStream,
    st: Arc<Mutex<SellerState>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + 4 + length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end + 4..].to_vec();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.clone(), None),
    };
    let behaviour = {
        let mut s = st.lock().unwrap();
        s.requests.push((method.clone(), path.clone()));
        s.behaviour
    };
    match behaviour {
        Behaviour::Hang => {
            // Holds the connection open, answering nothing.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(());
        }
        Behaviour::Garbage => {
            conn.write_all(&respond(200, true, b"{\"flavorID\": [1, 2, \x01 not json"))
                .await?;
            return Ok(());
        }
        Behaviour::Huge => {
            let big = vec![b'['; 10 << 20];
            let _ = conn.write_all(&respond(200, true, &big)).await;
            return Ok(());
        }
        _ => {}
    }
    let answer = route(&st, &method, &path, query.as_deref(), &body, behaviour).await;
    conn.write_all(&answer).await?;
    conn.shutdown().await
}

async fn route(
    st: &Arc<Mutex<SellerState>>,
    method: &str,
    path: &str,
    _query: Option<&str>,
    body: &[u8],
    behaviour: Behaviour,
) -> Vec<u8> {
    let purchase_prefix = "/api/v2/transactions/";
    if path == fact("routes.flavors.path") {
        if method != "GET" {
            return go_error(405, "");
        }
        let s = st.lock().unwrap();
        let list: Vec<Value> = s
            .offers
            .iter()
            .filter(|o| o.available)
            .map(|o| flavor_json(&s, o))
            .collect();
        if list.is_empty() {
            return respond(204, true, b"[]");
        }
        return encode(&Value::Array(list));
    }
    if path == fact("routes.k8slice.path") {
        if method != "GET" {
            return go_error(405, "");
        }
        let s = st.lock().unwrap();
        let available: Vec<&Offer> = s.offers.iter().filter(|o| o.available).collect();
        let matched = match select(_query, &available) {
            Ok(n) => n,
            Err(e) => return go_error(400, &e),
        };
        // The quirk (facts: quirk_returns_first_n_available): as many flavours as matched,
        // but the first ones of the whole available list.
        let list: Vec<Value> = available
            .iter()
            .take(matched)
            .map(|o| flavor_json(&s, o))
            .collect();
        return encode(&Value::Array(list));
    }
    if path == fact("routes.reserve.path") && method == "POST" {
        let req: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return go_error(400, &e.to_string()),
        };
        let flavor_id = s(&req, "flavorID");
        let buyer = get(&req, "buyerID").clone();
        let mut s = st.lock().unwrap();
        if !s.offers.iter().any(|o| o.id == flavor_id) {
            return go_error(404, "Flavor not found");
        }
        let conf = get(&req, "configuration").clone();
        if !conf.is_null() && self::s(&conf, "type") != fact("json.flavor.type_name") {
            return go_error(400, "Configuration type not supported");
        }
        // SearchTransaction(buyer ID, flavour) first: a repeat refreshes the expiry.
        let buyer_id = self::s(&buyer, "ID");
        let secs = s.transaction_secs;
        let found = s
            .transactions
            .values_mut()
            .find(|t| self::s(&t.buyer, "ID") == buyer_id && t.flavor_id == flavor_id);
        let t = match found {
            Some(t) => {
                t.expires = unix_secs() + secs;
                t.clone()
            }
            None => {
                let liqo = s_path(&buyer, &["additionalInformation", "liqoID"]);
                if liqo.is_empty() {
                    return go_error(400, "Error: LiqoID not provided");
                }
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let t = SellerTransaction {
                    id: format!("{:016x}-{nanos}", nanos as u64 ^ 0x5a5a_1234_9876_fedc),
                    flavor_id: flavor_id.clone(),
                    buyer: buyer.clone(),
                    cluster_id: liqo,
                    configuration: (!conf.is_null()).then_some(conf),
                    expires: unix_secs() + secs,
                };
                s.transactions.insert(t.id.clone(), t.clone());
                t
            }
        };
        let flavor_out = if behaviour == Behaviour::WrongFlavor {
            format!("{}-other", t.flavor_id)
        } else {
            t.flavor_id.clone()
        };
        let mut out = json!({
            "transactionID": t.id,
            "flavorID": flavor_out,
            "buyer": t.buyer,
            "clusterID": t.cluster_id,
            "expirationTime": rfc3339_offset(t.expires, 60),
        });
        if let Some(c) = &t.configuration {
            out["configuration"] = c.clone();
        }
        return encode(&out);
    }
    if let Some(rest) = path.strip_prefix(purchase_prefix) {
        let Some(tid) = rest.strip_suffix("/purchase") else {
            return go_error(404, "404 page not found");
        };
        if method != "POST" {
            return go_error(405, "");
        }
        if serde_json::from_slice::<Value>(body).is_err() {
            return go_error(400, "EOF");
        }
        let (t, delay) = {
            let mut s = st.lock().unwrap();
            let Some(t) = s.transactions.get(tid).cloned() else {
                return go_error(500, "Error getting the Transaction");
            };
            if unix_secs() > t.expires {
                s.transactions.remove(tid);
                return go_error(408, "Error: transaction Timeout");
            }
            // removeTransaction before the contract is made.
            s.transactions.remove(tid);
            (t, s.purchase_delay)
        };
        // CreateKubeconfigForPeering: the token takes a while.
        tokio::time::sleep(delay).await;
        let mut s = st.lock().unwrap();
        let Some(o) = s.offers.iter().find(|o| o.id == t.flavor_id).cloned() else {
            return go_error(500, "Error getting the Flavor by ID");
        };
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {}\n  cluster:\n    server: https://{}:6443\nusers:\n- name: fluidos-peering-{}\n",
            s.liqo_id, s.node_id, t.cluster_id
        );
        let contract = json!({
            "contractID": format!("contract-{}-{}", s.node_id, s.contracts.len() + 1),
            "transactionID": t.id,
            "flavor": flavor_json(&s, &o),
            "buyerID": t.buyer,
            "buyerClusterID": t.cluster_id,
            "seller": {
                "ID": s.node_id, "IP": s.ip, "domain": "fluidos.eu",
                "additionalInformation": { "liqoID": s.liqo_id },
            },
            "peeringTargetCredentials": {
                "clusterID": s.liqo_id,
                "kubeconfig": base64_encode(kubeconfig.as_bytes()),
            },
            "expirationTime": rfc3339_offset(unix_secs() + 365 * 86_400, 60),
            "configuration": t.configuration,
        });
        s.contracts.push(contract.clone());
        return encode(&contract);
    }
    go_error(404, "404 page not found")
}

/// decodeK8SliceSelector and the filter: how many of `offers` the query selects, or the
/// 400 text. Keys `filter[RESOURCE][match|range]([min|max])`; quantities in thousandths.
fn select(query: Option<&str>, offers: &[&Offer]) -> Result<usize, String> {
    type Bounds = (Option<u128>, Option<u128>, Option<u128>);
    let mut arch: Option<String> = None;
    let mut filters: HashMap<String, Bounds> = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = k.replace("%5B", "[").replace("%5D", "]");
        let parts: Vec<&str> = k
            .strip_prefix("filter[")
            .and_then(|r| r.strip_suffix(']'))
            .map(|r| r.split("][").collect())
            .ok_or(format!("invalid key format: {k}"))?;
        let (res, kind, bound) = match parts.as_slice() {
            [r, t] => (*r, *t, None),
            [r, t, b] => (*r, *t, Some(*b)),
            _ => return Err(format!("invalid key format: {k}")),
        };
        if !["architecture", "cpu", "memory", "pods", "storage"].contains(&res)
            || !["match", "range"].contains(&kind)
        {
            return Err(format!("invalid key format: {k}"));
        }
        if res == "architecture" {
            if kind != "match" {
                return Err("invalid filter type".into());
            }
            arch = Some(v.to_string());
            continue;
        }
        let q = fluidlet_supernode::quantity::parse(v)?.0;
        let e = filters.entry(res.to_string()).or_default();
        match (kind, bound) {
            ("match", None) if e.0.is_none() && e.1.is_none() && e.2.is_none() => e.0 = Some(q),
            ("range", Some("min")) if e.0.is_none() && e.1.is_none() => e.1 = Some(q),
            ("range", Some("max")) if e.0.is_none() && e.2.is_none() => e.2 = Some(q),
            _ => return Err(format!("invalid filter: {k}")),
        }
    }
    let value = |o: &Offer, r: &str| -> u128 {
        let q = match r {
            "cpu" => &o.cpu,
            "memory" => &o.memory,
            _ => &o.pods,
        };
        fluidlet_supernode::quantity::parse(q)
            .map(|m| m.0)
            .unwrap_or(0)
    };
    Ok(offers
        .iter()
        .filter(|o| arch.as_ref().is_none_or(|a| *a == o.architecture))
        .filter(|o| {
            filters.iter().all(|(r, (m, mn, mx))| {
                let v = value(o, r);
                m.is_none_or(|m| v == m) && mn.is_none_or(|m| v >= m) && mx.is_none_or(|m| v <= m)
            })
        })
        .count())
}

fn s_path(v: &Value, keys: &[&str]) -> String {
    let mut v = v;
    for k in keys {
        v = get(v, k);
    }
    v.as_str().unwrap_or_default().to_string()
}

/// Standard base64 with padding (Go's base64.StdEncoding).
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The reference node's multicast announcement (network-controller.go sendMulticastMessage),
/// imitated: json.Marshal of its nodecore NodeIdentity (`domain`, `nodeID`, `ip` = the REAR
/// gateway's host:port, `additionalInformation.liqoID`) sent to `group` every `period` (the
/// Go ticker's first tick is one period after the start). Stops when the handle is dropped.
pub struct Announcer(tokio::task::JoinHandle<()>);

impl Drop for Announcer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn announce(
    node_id: &str,
    ip: &str,
    liqo_id: &str,
    group: std::net::SocketAddrV4,
    period: Duration,
) -> Announcer {
    let keys: Vec<String> = facts()["multicast"]["fields"]
        .as_array()
        .expect("multicast.fields")
        .iter()
        .map(|v| v.as_str().expect("a field").to_string())
        .collect();
    let mut m = serde_json::Map::new();
    for k in keys {
        let v = match k.as_str() {
            "domain" => json!("fluidos.eu"),
            "nodeID" => json!(node_id),
            "ip" => json!(ip),
            _ => json!({ "liqoID": liqo_id }),
        };
        m.insert(k, v);
    }
    let payload = Value::Object(m).to_string();
    Announcer(tokio::spawn(async move {
        let Ok(sock) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
            return;
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tick.tick().await;
            let _ = sock.send_to(payload.as_bytes(), group).await;
        }
    }))
}
