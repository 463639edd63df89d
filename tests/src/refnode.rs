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
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let b = s.trim_end_matches('=').as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::new();
    for c in b.chunks(4) {
        let mut n = 0u32;
        for (i, x) in c.iter().enumerate() {
            n |= val(*x)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..c.len() - 1]);
    }
    Some(out)
}
