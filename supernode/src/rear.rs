//! The reference node's REAR JSON (fluidos-project/node 9018b69, pkg/utils/models), as its Go
//! struct tags spell it, typos included: `charateristics`, the country under `altitude`.
//! The facts, with their sources, are in tests/fluidos/node-9018b69.toml.
//!
//! Output types are built from fluidlet's model ([`flavor`], [`contract`]); input types
//! (reserve and purchase requests) ignore unknown keys, as Go's decoder does.

use crate::quantity;
use fluidlet::model::{Flavour, Resources};
use serde::{Deserialize, Serialize};

/// `type.name` of a K8Slice flavour: exactly this, or the Go buyer aborts its discovery.
pub const K8SLICE: &str = "k8slice";

#[derive(Clone, Debug, Serialize)]
pub struct Flavor {
    #[serde(rename = "flavorID")]
    pub flavor_id: String,
    #[serde(rename = "providerID")]
    pub provider_id: String,
    #[serde(rename = "type")]
    pub kind: FlavorType,
    /// RFC 3339 (Go's time.Time in JSON).
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    pub price: Price,
    pub owner: NodeIdentity,
    pub availability: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlavorType {
    pub name: &'static str,
    pub data: K8Slice,
}

#[derive(Clone, Debug, Serialize)]
pub struct K8Slice {
    /// Sic: the reference node's key (K8Slice.Characteristics' tag).
    #[serde(rename = "charateristics")]
    pub characteristics: Characteristics,
    pub properties: Properties,
    pub policies: Policies,
}

#[derive(Clone, Debug, Serialize)]
pub struct Characteristics {
    pub architecture: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Gpu {
    pub model: String,
    pub cores: String,
    pub memory: String,
}

/// Nothing of fluidlet's flavour maps to the reference node's properties (latency,
/// security standards, carbon footprint, network authorisations): all omitted, as Go omits
/// empty ones.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Properties {}

#[derive(Clone, Debug, Serialize)]
pub struct Policies {
    pub partitionability: Partitionability,
}

#[derive(Clone, Debug, Serialize)]
pub struct Partitionability {
    #[serde(rename = "cpuMin")]
    pub cpu_min: String,
    #[serde(rename = "memoryMin")]
    pub memory_min: String,
    #[serde(rename = "podsMin")]
    pub pods_min: String,
    #[serde(rename = "cpuStep")]
    pub cpu_step: String,
    #[serde(rename = "memoryStep")]
    pub memory_step: String,
    #[serde(rename = "podsStep")]
    pub pods_step: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Location {
    /// Sic: Location.Country's tag is `altitude`.
    #[serde(rename = "altitude", skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(rename = "additionalNotes", skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Price {
    pub amount: String,
    pub currency: String,
    pub period: String,
}

/// REAR's NodeIdentity: `ID`, `IP`, `domain` (the multicast announcement spells them
/// differently; not used here).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeIdentity {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "IP", default)]
    pub ip: String,
    #[serde(default)]
    pub domain: String,
    #[serde(
        rename = "additionalInformation",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub additional: Option<AdditionalInfo>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AdditionalInfo {
    #[serde(rename = "liqoID", default, skip_serializing_if = "String::is_empty")]
    pub liqo_id: String,
    /// The buyer sends its own kubeconfig here; the face never keeps nor forwards it.
    #[serde(default, skip_serializing)]
    pub kubeconfig: Option<serde_json::Value>,
}

/// `configuration` of a reserve: `type` and free `data`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Configuration {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `configuration.data` of a K8Slice reserve: the piece wanted.
#[derive(Clone, Debug, Deserialize)]
pub struct K8SliceConfiguration {
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    #[serde(default)]
    pub storage: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ReserveRequest {
    #[serde(rename = "flavorID", default)]
    pub flavor_id: String,
    #[serde(rename = "buyerID", default)]
    pub buyer: NodeIdentity,
    #[serde(default)]
    pub configuration: Option<Configuration>,
}

/// The purchase body: both keys optional and not used by a K8Slice purchase (the reference
/// node reads them only for service flavours and telemetry).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PurchaseRequest {
    #[serde(rename = "liqoCredentials", default)]
    pub liqo_credentials: Option<serde_json::Value>,
    #[serde(rename = "ingressTelemetryEndpoint", default)]
    pub ingress_telemetry_endpoint: Option<serde_json::Value>,
}

/// Transaction: the buyer is `buyer` here (`buyerID` in the request and the contract).
#[derive(Clone, Debug, Serialize)]
pub struct Transaction {
    #[serde(rename = "transactionID")]
    pub transaction_id: String,
    #[serde(rename = "flavorID")]
    pub flavor_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configuration: Option<Configuration>,
    pub buyer: NodeIdentity,
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    #[serde(rename = "expirationTime")]
    pub expiration_time: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct LiqoCredentials {
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// Base64 (standard, padded) of the kubeconfig YAML.
    pub kubeconfig: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Contract {
    #[serde(rename = "contractID")]
    pub contract_id: String,
    #[serde(rename = "transactionID")]
    pub transaction_id: String,
    pub flavor: Flavor,
    #[serde(rename = "buyerID")]
    pub buyer: NodeIdentity,
    #[serde(rename = "buyerClusterID")]
    pub buyer_cluster_id: String,
    pub seller: NodeIdentity,
    #[serde(rename = "peeringTargetCredentials")]
    pub credentials: LiqoCredentials,
    #[serde(rename = "expirationTime", skip_serializing_if = "String::is_empty")]
    pub expiration_time: String,
    #[serde(rename = "configuration", skip_serializing_if = "Option::is_none")]
    pub configuration: Option<Configuration>,
}

/// A price in millionths as a decimal string without trailing zeros: 2000000 -> "2",
/// 1500000 -> "1.5", 1 -> "0.000001".
pub fn amount(millionths: u64) -> String {
    let (int, frac) = (millionths / 1_000_000, millionths % 1_000_000);
    if frac == 0 {
        return int.to_string();
    }
    let f = format!("{frac:06}");
    format!("{int}.{}", f.trim_end_matches('0'))
}

/// Unix ms as RFC 3339 UTC with seconds ("2026-12-04T01:07:00Z"), as Go's time.RFC3339.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Standard base64 with padding (what Go's base64.StdEncoding writes).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A fluidlet flavour as the reference node lists it. `flavor_id` is the face's name for
/// it, `owner` the identity of the provider as reached through this face.
pub fn flavor(f: &Flavour, flavor_id: &str, owner: NodeIdentity, heard_at_ms: u64) -> Flavor {
    let r = &f.resources;
    // Sold whole: the smallest piece is everything, no step.
    let (min, step) = match &f.partitionability {
        Some(p) => (
            Resources {
                cpu: p.cpu_min,
                memory: p.memory_min,
                pods: p.pods_min,
                storage: 0,
            },
            Resources {
                cpu: p.cpu_step,
                memory: p.memory_step,
                pods: p.pods_step,
                storage: 0,
            },
        ),
        None => (*r, Resources::default()),
    };
    Flavor {
        flavor_id: flavor_id.to_string(),
        provider_id: f.provider.to_string(),
        kind: FlavorType {
            name: K8SLICE,
            data: K8Slice {
                characteristics: Characteristics {
                    architecture: f.architecture.as_str().to_string(),
                    cpu: quantity::cpu(r.cpu),
                    memory: quantity::bytes(r.memory),
                    pods: quantity::count(u64::from(r.pods)),
                    gpu: f.gpu.as_ref().map(|g| Gpu {
                        model: g.model.as_str().to_string(),
                        cores: quantity::count(u64::from(g.cores)),
                        memory: quantity::bytes(g.memory_bytes),
                    }),
                    storage: (r.storage > 0).then(|| quantity::bytes(r.storage)),
                },
                properties: Properties::default(),
                policies: Policies {
                    partitionability: Partitionability {
                        cpu_min: quantity::cpu(min.cpu),
                        memory_min: quantity::bytes(min.memory),
                        pods_min: quantity::count(u64::from(min.pods)),
                        cpu_step: quantity::cpu(step.cpu),
                        memory_step: quantity::bytes(step.memory),
                        pods_step: quantity::count(u64::from(step.pods)),
                    },
                },
            },
        },
        timestamp: rfc3339(heard_at_ms),
        location: f.location.as_ref().map(|l| Location {
            country: l.country.as_ref().map(|t| t.as_str().to_string()),
            city: l.city.as_ref().map(|t| t.as_str().to_string()),
            notes: l.notes.as_ref().map(|t| t.as_str().to_string()),
        }),
        price: Price {
            amount: amount(f.price.amount),
            currency: f.price.currency.as_str().to_string(),
            period: f.price.period.as_str().to_string(),
        },
        owner,
        availability: f.available,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_times_and_base64_are_as_go_writes_them() {
        assert_eq!(amount(2_000_000), "2");
        assert_eq!(amount(1_500_000), "1.5");
        assert_eq!(amount(1), "0.000001");
        assert_eq!(amount(0), "0");
        assert_eq!(rfc3339(1_767_225_600_000), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"apiVersion: v1\n"), "YXBpVmVyc2lvbjogdjEK");
    }
}
