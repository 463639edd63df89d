//! The provider enforces its contracts inside Liqo.
//!
//! Liqo's default ResourceSlice class accepts whatever a peered consumer asks for: the
//! provider's remote-slice controller copies `spec.resources` into the status, and the Quota
//! that then limits the consumer's offloaded pods is made from that status. A consumer's
//! administrator holding the peering could ask Liqo directly for more than was bought. So the
//! provider checks, every `enforce_every`, the ResourceSlices replicated into its cluster
//! from the consumer clusters it granted a peering to, against its live contracts, and
//! cordons (`liqoctl cordon resourceslice`) any slice that no live contract covers or that
//! exceeds its contract. A cordoned slice's Quota is cordoned and Liqo's ShadowPod webhook
//! refuses every new pod of that consumer on it; the consumer's control-plane user may not
//! remove the annotation (Liqo's ResourceSlice webhook). Why this mechanism and not another
//! is in docs/fabric.md.
//!
//! The rules are pure ([`verdicts`]); [`enforce`] reads the slices and cordons.

use super::{command, liqo, virtual_node_name, Action, Command, Fabric, FabricError, Tool};
use crate::model::{Contract, Id, Resources};
use std::collections::{BTreeMap, BTreeSet};

/// A ResourceSlice as the provider sees it (the consumer's slice, replicated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderSlice {
    pub namespace: String,
    pub name: String,
    /// The consumer's cluster id (label `liqo.io/originID`).
    pub consumer: Option<String>,
    /// What the consumer asks for (`spec.resources`).
    pub asked: BTreeMap<String, String>,
    /// What Liqo granted (`status.resources`).
    pub granted: BTreeMap<String, String>,
    /// Already cordoned (annotation `liqo.io/cordon`, not false).
    pub cordoned: bool,
}

/// A slice to cordon, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub slice: ProviderSlice,
    pub consumer: String,
    pub reason: String,
}

/// Lists the slices replicated into this cluster (`liqo.io/replicated=true`), as JSON.
pub fn plan_list() -> Action {
    let selector = format!("{}=true", liqo::LABEL_REPLICATED);
    Action::Run(Command {
        dry_output: r#"{"apiVersion":"v1","kind":"List","items":[]}"#.into(),
        ..command(
            "list the ResourceSlices of the consumers",
            Tool::Kubectl,
            &[
                "get",
                liqo::RESOURCE_SLICES,
                "--all-namespaces",
                "-l",
                &selector,
                "-o",
                "json",
            ],
        )
    })
}

/// Cordons one slice of `consumer` (Liqo's cordon confirms unless `--skip-confirm`).
pub fn plan_cordon(slice: &ProviderSlice, consumer: &str, timeout: std::time::Duration) -> Action {
    super::waiting(
        "cordon a ResourceSlice beyond its contract",
        &[
            "cordon",
            "resourceslice",
            &slice.name,
            "--remote-cluster-id",
            consumer,
            "--skip-confirm",
        ],
        timeout,
    )
}

fn quantities(v: &serde_json::Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, q)| {
                    let q = q.as_str().map_or_else(|| q.to_string(), str::to_owned);
                    (k.clone(), q)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads `kubectl get ... -o json` (a List of ResourceSlices).
pub fn parse_slices(json: &str) -> Result<Vec<ProviderSlice>, FabricError> {
    let list: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| FabricError::Invalid(format!("kubectl printed no JSON list: {e}")))?;
    let items = list["items"]
        .as_array()
        .ok_or_else(|| FabricError::Invalid("kubectl printed a list without items".into()))?;
    let mut out = Vec::new();
    for item in items {
        let meta = &item["metadata"];
        let (Some(namespace), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str())
        else {
            continue;
        };
        let cordon = meta["annotations"][liqo::ANNOTATION_CORDON].as_str();
        out.push(ProviderSlice {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            consumer: meta["labels"][liqo::LABEL_ORIGIN]
                .as_str()
                .map(str::to_owned),
            asked: quantities(&item["spec"]["resources"]),
            granted: quantities(&item["status"]["resources"]),
            cordoned: cordon.is_some_and(|v| !matches!(v, "false" | "False" | "0")),
        });
    }
    Ok(out)
}

/// A Kubernetes quantity in thousandths of its unit, rounded up (`1500m` CPU is 1500, `2Gi`
/// is 2 * 2^30 * 1000); `None` if it is not a non-negative quantity or too large.
pub fn quantity_millis(q: &str) -> Option<u128> {
    let q = q.trim();
    let q = q.strip_prefix('+').unwrap_or(q);
    let end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 18 {
        return None;
    }
    let mantissa: u128 = format!("{int}{frac}").parse().ok()?;
    let ten = |n: u32| 10u128.checked_pow(n);
    let (mul, div) = match suffix {
        "" => (1, 1),
        "n" => (1, ten(9)?),
        "u" => (1, ten(6)?),
        "m" => (1, ten(3)?),
        "k" => (ten(3)?, 1),
        "M" => (ten(6)?, 1),
        "G" => (ten(9)?, 1),
        "T" => (ten(12)?, 1),
        "P" => (ten(15)?, 1),
        "E" => (ten(18)?, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        e => {
            let exp: i32 = e.strip_prefix(['e', 'E'])?.parse().ok()?;
            match exp.unsigned_abs() {
                n if n > 30 => return None,
                n if exp >= 0 => (ten(n)?, 1),
                n => (1, ten(n)?),
            }
        }
    };
    let num = mantissa.checked_mul(mul)?.checked_mul(1000)?;
    let den = ten(frac.len() as u32)?.checked_mul(div)?;
    Some(num.div_ceil(den))
}

/// The resources a contract covers, by Liqo resource name, in thousandths.
fn covered(r: &Resources) -> [(&'static str, u128); 4] {
    [
        ("cpu", r.cpu as u128),
        ("memory", r.memory as u128 * 1000),
        ("pods", r.pods as u128 * 1000),
        ("ephemeral-storage", r.storage as u128 * 1000),
    ]
}

/// Why `asked` (or `granted`) goes beyond `contract`, if it does.
fn beyond(which: &str, q: &BTreeMap<String, String>, contract: &Contract) -> Option<String> {
    let limits = covered(&contract.resources);
    for (name, value) in q {
        let Some((_, limit)) = limits.iter().find(|(n, _)| n == name) else {
            return Some(format!(
                "{which} {name} {value}, which contract {} does not sell",
                contract.id
            ));
        };
        match quantity_millis(value) {
            Some(v) if v <= *limit => {}
            Some(_) => {
                return Some(format!(
                    "{which} {name} {value}, more than contract {} covers",
                    contract.id
                ))
            }
            None => return Some(format!("{which} {name} {value:?}, not a quantity")),
        }
    }
    None
}

/// The slices to cordon. `contracts` are this provider's sales with the consumer cluster
/// each was granted to. Only slices of those consumer clusters are judged (a peering the
/// administrator made by hand is not fluidlet's business); a slice is fine when it bears the
/// name of a live (Reserved or Active) contract of its consumer cluster, names every
/// resource Liqo would otherwise fill with its own default, and neither asks for nor was
/// granted more than that contract covers.
pub fn verdicts(slices: &[ProviderSlice], contracts: &[(Contract, Id)]) -> Vec<Verdict> {
    use crate::model::ContractState::{Active, Reserved};
    let known: BTreeSet<&str> = contracts.iter().map(|(_, c)| c.as_str()).collect();
    let mut out = Vec::new();
    for s in slices {
        let Some(consumer) = s.consumer.as_deref() else {
            continue;
        };
        if s.cordoned || !known.contains(consumer) {
            continue;
        }
        let contract = contracts.iter().find(|(c, cluster)| {
            cluster.as_str() == consumer
                && matches!(c.state, Reserved | Active)
                && virtual_node_name(&c.id) == s.name
        });
        let reason = match contract {
            None => Some(format!(
                "no live contract of cluster {consumer} is named {}",
                s.name
            )),
            Some((c, _)) => {
                let missing = covered(&c.resources)
                    .into_iter()
                    .map(|(n, _)| n)
                    .find(|n| !s.asked.contains_key(*n));
                match missing {
                    Some(n) => Some(format!("asks no {n}: Liqo would grant its default")),
                    None => beyond("asks for", &s.asked, c)
                        .or_else(|| beyond("was granted", &s.granted, c)),
                }
            }
        };
        if let Some(reason) = reason {
            out.push(Verdict {
                slice: s.clone(),
                consumer: consumer.to_owned(),
                reason,
            });
        }
    }
    out
}

/// One round: lists the slices, cordons those [`verdicts`] names; returns them.
pub async fn enforce(
    fabric: &Fabric,
    contracts: &[(Contract, Id)],
) -> Result<Vec<Verdict>, FabricError> {
    if contracts.is_empty() {
        return Ok(Vec::new());
    }
    let out = fabric.execute("enforce", &[plan_list()]).await?;
    let found = verdicts(&parse_slices(&out)?, contracts);
    for v in &found {
        tracing::warn!(
            slice = %v.slice.name, namespace = %v.slice.namespace, consumer = %v.consumer,
            reason = %v.reason, "cordoning a ResourceSlice beyond its contract"
        );
        let plan = [plan_cordon(
            &v.slice,
            &v.consumer,
            fabric.cfg.command_timeout,
        )];
        fabric.execute("enforce", &plan).await?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_contract, ContractState};

    #[test]
    fn quantities_in_thousandths() {
        let q = |s| quantity_millis(s);
        assert_eq!(q("1500m"), Some(1500));
        assert_eq!(q("2"), Some(2000));
        assert_eq!(q("1.5"), Some(1500));
        assert_eq!(q("0.0001"), Some(1), "rounded up");
        assert_eq!(q("2Gi"), Some(2 * (1 << 30) * 1000));
        assert_eq!(q("1G"), Some(1_000_000_000_000));
        assert_eq!(q("1e3"), Some(1_000_000));
        assert_eq!(q("+3"), Some(3000));
        assert_eq!(q("100n"), Some(1));
        for bad in ["", "-1", "1.2.3", "abc", "1X", "1e", "1e99", "."] {
            assert_eq!(q(bad), None, "{bad}");
        }
        assert_eq!(q(&"9".repeat(60)), None, "too large is not a panic");
    }

    fn slice(name: &str, consumer: &str, asked: &[(&str, &str)]) -> ProviderSlice {
        ProviderSlice {
            namespace: format!("liqo-tenant-{consumer}"),
            name: name.into(),
            consumer: Some(consumer.into()),
            asked: asked
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            granted: BTreeMap::new(),
            cordoned: false,
        }
    }

    #[test]
    fn slices_beyond_their_contract_are_cordoned() {
        let piece = Resources {
            cpu: 1500,
            memory: 2 << 30,
            pods: 3,
            storage: 0,
        };
        let c = test_contract("prov.c1", "prov", "cons", piece, ContractState::Active);
        let contracts = vec![(c, Id::new("cons-cluster").unwrap())];
        let exact = [
            ("cpu", "1500m"),
            ("memory", "2Gi"),
            ("pods", "3"),
            ("ephemeral-storage", "0"),
        ];
        let judge = |s: ProviderSlice| verdicts(&[s], &contracts);
        assert!(judge(slice("fluidos-prov-c1", "cons-cluster", &exact)).is_empty());
        let mut more = exact;
        more[0] = ("cpu", "2");
        let v = judge(slice("fluidos-prov-c1", "cons-cluster", &more));
        assert_eq!(v.len(), 1);
        assert!(v[0].reason.contains("cpu 2, more than"), "{}", v[0].reason);
        let v = judge(slice("extra", "cons-cluster", &exact));
        assert!(v[0].reason.contains("no live contract"), "{}", v[0].reason);
        let v = judge(slice("fluidos-prov-c1", "cons-cluster", &exact[..3]));
        assert!(v[0].reason.contains("ephemeral-storage"), "{}", v[0].reason);
        let mut gpu = exact.to_vec();
        gpu.push(("nvidia.com/gpu", "1"));
        assert_eq!(
            judge(slice("fluidos-prov-c1", "cons-cluster", &gpu)).len(),
            1
        );
        let mut granted = slice("fluidos-prov-c1", "cons-cluster", &exact);
        granted.granted.insert("memory".into(), "8Gi".into());
        assert!(judge(granted).len() == 1, "what Liqo granted counts too");
        let mut done = slice("extra", "cons-cluster", &exact);
        done.cordoned = true;
        assert!(judge(done).is_empty(), "already cordoned");
        assert!(
            judge(slice("extra", "someone-else", &exact)).is_empty(),
            "a peering fluidlet did not grant is left alone"
        );
        let mut ended = contracts.clone();
        ended[0].0.state = ContractState::Released;
        assert_eq!(
            verdicts(&[slice("fluidos-prov-c1", "cons-cluster", &exact)], &ended).len(),
            1,
            "a released contract covers nothing"
        );
    }

    #[test]
    fn kubectl_lists_are_read_and_bad_ones_refused() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"metadata":{"name":"a",
          "namespace":"liqo-tenant-c","labels":{"liqo.io/originID":"c"},
          "annotations":{"liqo.io/cordon":"true"}},
          "spec":{"resources":{"cpu":"1","pods":3}},"status":{"resources":{"cpu":"1"}}}]}"#;
        let s = parse_slices(json).unwrap();
        assert_eq!(s[0].consumer.as_deref(), Some("c"));
        assert!(s[0].cordoned);
        assert_eq!(s[0].asked["pods"], "3");
        assert_eq!(s[0].granted["cpu"], "1");
        assert!(parse_slices("not json").is_err());
        assert!(parse_slices("{}").is_err());
    }
}
