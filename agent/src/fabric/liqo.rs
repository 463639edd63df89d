//! Liqo's names, in one place: every API group, kind, label, annotation, taint, namespace
//! rule and `liqoctl` default the shim relies on.
//!
//! Each was read in Liqo's source at the tags of [`CHECKED`] (the files are named in
//! `tests/liqo/v1.0.3.toml` and `tests/liqo/v1.2.0.toml`, which record the same facts as
//! data); a unit test below and the conformance test in `tests/tests/liqo_fabric.rs` check
//! these constants and every manifest the shim writes against both files. Nothing else in
//! the crate spells a Liqo name.

use crate::model::Id;
use std::time::Duration;

/// The Liqo release the dry run reports, and the first one these names were checked against.
pub const PINNED: &str = "v1.0.3";

/// Every Liqo release these names were checked against, one facts file each: the shim
/// supports their minor versions (1.0 and 1.2); the minor between them, 1.1, was not checked
/// as a whole.
pub const CHECKED: [&str; 2] = ["v1.0.3", "v1.2.0"];

/// Whether `version`'s major.minor is one of [`CHECKED`]'s.
pub fn checked_minor(version: &str) -> bool {
    let m = minor_of(version);
    m.is_some() && CHECKED.iter().any(|c| minor_of(c) == m)
}

/// `apiVersion` of Liqo's ResourceSlice (group `authentication.liqo.io`, version `v1beta1`).
pub const RESOURCE_SLICE_API_VERSION: &str = "authentication.liqo.io/v1beta1";
pub const RESOURCE_SLICE_KIND: &str = "ResourceSlice";
/// The fully qualified resource: the plural alone also names Kubernetes' own
/// `resource.k8s.io` ResourceSlice (Dynamic Resource Allocation), which kubectl prefers.
pub const RESOURCE_SLICES: &str = "resourceslices.authentication.liqo.io";
/// The class Liqo's provider reconciles itself.
pub const DEFAULT_CLASS: &str = "default";

/// Asks Liqo's CRD replicator (and the consumer's slice controllers) to handle the object.
pub const LABEL_REPLICATION: &str = "liqo.io/replication";
/// Where the replicator sends the object (a cluster id).
pub const LABEL_REPLICATION_DESTINATION: &str = "liqo.io/remoteID";
/// The other cluster of a peering-scoped object.
pub const LABEL_REMOTE_CLUSTER_ID: &str = "liqo.io/remote-cluster-id";
/// On the provider's copy of a replicated object: `"true"`.
pub const LABEL_REPLICATED: &str = "liqo.io/replicated";
/// On the provider's copy of a replicated object: the consumer's cluster id.
pub const LABEL_ORIGIN: &str = "liqo.io/originID";

/// Asks for a virtual node for the slice.
pub const ANNOTATION_CREATE_VIRTUAL_NODE: &str = "liqo.io/create-virtual-node";
/// A cordoned slice: the consumer's Quota is cordoned, its new pods are refused.
pub const ANNOTATION_CORDON: &str = "liqo.io/cordon";

/// The taint of every virtual node (value `"true"`, effect [`VIRTUAL_NODE_TAINT_EFFECT`]).
pub const VIRTUAL_NODE_TAINT: &str = "virtual-node.liqo.io/not-allowed";
pub const VIRTUAL_NODE_TAINT_EFFECT: &str = "NoExecute";
/// The node label that carries a virtual node's name.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Tenant namespaces are named `liqo-tenant-{cluster id}`.
pub const TENANT_NAMESPACE_PREFIX: &str = "liqo-tenant-";

/// The longest label value (and DNS-1123 label) Kubernetes accepts.
pub const LABEL_VALUE_MAX: usize = 63;
/// Liqo names the user of a slice's virtual kubelet `{slice}-{12 hex}` and the provider's
/// ShadowPod webhook puts it, unshortened, in the label `liqo.io/creator-user` of every pod
/// offloaded on the slice: the 13 characters a slice name must leave for it.
pub const SLICE_USER_SUFFIX_LEN: usize = 13;
/// The longest ResourceSlice (and virtual node) name whose derived names all stay valid.
pub const MAX_SLICE_NAME: usize = LABEL_VALUE_MAX - SLICE_USER_SUFFIX_LEN;
/// `liqoctl generate peering-user` names its CSR `liqo-peer-user-{consumer cluster id}` and
/// labels the CSR and RoleBindings with that name.
pub const PEER_USER_PREFIX: &str = "liqo-peer-user-";
/// How long `liqoctl generate peering-user` itself waits for its CSR to be signed.
pub const CSR_SIGNING_WAIT: Duration = Duration::from_secs(30);

/// The namespace mapping fluidlet asks `liqoctl offload namespace` for, with the remote name
/// it chooses (see [`crate::fabric::remote_namespace`]): Liqo's `DefaultName` rule made
/// explicit, so that a name too long for it is shortened rather than refused.
pub const NAMESPACE_MAPPING: &str = "SelectedName";
/// Pods of an offloaded namespace run only on virtual nodes.
pub const POD_OFFLOADING: &str = "Remote";

/// `liqoctl force unpeer` exists from this version on (1.1).
pub const FORCE_UNPEER_SINCE: (u32, u32) = (1, 1);

/// What is wrong with `id` as a Liqo cluster id in the role given, for the names Liqo derives
/// from it: the tenant namespace `liqo-tenant-{id}` on the other cluster, and, for a
/// consumer, the peering user `liqo-peer-user-{id}` on its provider (a label value). `None`
/// when it is fine.
pub fn cluster_id_problem(id: &str, consumer: bool) -> Option<String> {
    if !valid_cluster_id(id) {
        return Some(format!(
            "{id:?} is not a cluster id Liqo accepts (lower-case letters, digits and '-', at              most 63)"
        ));
    }
    let (prefix, what) = if consumer {
        (PEER_USER_PREFIX, "its peering user's label on the provider")
    } else {
        (
            TENANT_NAMESPACE_PREFIX,
            "its tenant namespace on the consumer",
        )
    };
    let longest = LABEL_VALUE_MAX - prefix.len();
    (id.len() > longest).then(|| {
        format!(
            "cluster id {id:?} is {} characters: Liqo names {what} {prefix}{id}, at most              {LABEL_VALUE_MAX} characters, so it may have at most {longest}",
            id.len()
        )
    })
}

/// `liqoctl peer --timeout` default (10 min) and `unpeer --timeout` default (120 s).
pub const PEER_DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
pub const UNPEER_DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Gateway server Service types `liqoctl peer --gw-server-service-type` accepts; Liqo's
/// default is LoadBalancer.
pub const GATEWAY_SERVICE_TYPES: [&str; 3] = ["LoadBalancer", "NodePort", "ClusterIP"];
pub const GATEWAY_SERVICE_TYPE_DEFAULT: &str = "LoadBalancer";

/// `liqoctl info --get` queries.
pub const INFO_CLUSTER_ID: &str = "clusterid";
pub const INFO_VERSION: &str = "local.version";
pub const INFO_API_SERVER: &str = "local.apiserveraddr";

/// The tenant namespace Liqo creates on one cluster for the other cluster of a peering.
pub fn tenant_namespace(cluster: &Id) -> String {
    format!("{TENANT_NAMESPACE_PREFIX}{cluster}")
}

/// Whether `id` is a cluster id Liqo accepts in a ResourceSlice (`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`).
pub fn valid_cluster_id(id: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !id.is_empty()
        && id.len() <= 63
        && id.chars().all(|c| ok(c) || c == '-')
        && id.starts_with(ok)
        && id.ends_with(ok)
}

/// `major.minor` of a Liqo version as `liqoctl info` prints it (`v1.0.3`, `1.1.2-rc.1`);
/// `None` for anything else (a development build's commit).
pub fn minor_of(version: &str) -> Option<(u32, u32)> {
    let v = version.trim();
    let v = v.strip_prefix('v').unwrap_or(v);
    let mut parts = v.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Liqo peers only clusters of the same major.minor version (docs/usage/peer.md). `Err`
/// says why not; versions that are not releases must be equal.
pub fn same_minor(mine: &str, theirs: &str) -> Result<(), String> {
    let compatible = match (minor_of(mine), minor_of(theirs)) {
        (Some(a), Some(b)) => a == b,
        _ => mine.trim() == theirs.trim(),
    };
    if compatible {
        Ok(())
    } else {
        Err(format!(
            "Liqo version mismatch: this cluster runs {}, the other {}; Liqo peers only the same \
             major.minor version",
            mine.trim(),
            theirs.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_match_on_major_and_minor_only() {
        assert!(same_minor("v1.0.3", "v1.0.0").is_ok());
        assert!(same_minor("v1.0.3", "1.0.1-rc.2").is_ok());
        let e = same_minor("v1.0.3", "v1.1.2").unwrap_err();
        assert!(e.contains("v1.0.3") && e.contains("v1.1.2"), "{e}");
        assert!(same_minor("v2.0.0", "v1.0.0").is_err());
        assert!(same_minor("0123abcd", "0123abcd").is_ok());
        assert!(same_minor("0123abcd", "v1.0.3").is_err());
    }

    #[test]
    fn cluster_ids_follow_liqos_pattern() {
        assert!(valid_cluster_id("gw-turin-01"));
        for bad in ["", "-a", "a-", "Gw", "a_b", "a.b"] {
            assert!(!valid_cluster_id(bad), "{bad}");
        }
    }

    /// A TOML value as text: strings bare, arrays as `[a, b]`, the rest by Debug. (toml's
    /// own Display needs its `display` feature, which builds without the demo lack.)
    fn render(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(a) => {
                let items: Vec<String> = a.iter().map(render).collect();
                format!("[{}]", items.join(", "))
            }
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn cluster_ids_leave_room_for_the_names_liqo_derives() {
        assert_eq!(MAX_SLICE_NAME, 50);
        let c48 = "c".repeat(48);
        assert_eq!(cluster_id_problem(&c48, true), None);
        let e = cluster_id_problem(&"c".repeat(49), true).unwrap();
        assert!(e.contains("liqo-peer-user-") && e.contains("48"), "{e}");
        assert_eq!(cluster_id_problem(&"p".repeat(51), false), None);
        assert!(cluster_id_problem(&"p".repeat(52), false).is_some());
        assert!(cluster_id_problem("Gw", false).is_some());
        assert!(checked_minor("v1.0.1") && checked_minor("v1.2.3"));
        assert!(!checked_minor("v1.1.2") && !checked_minor("0123abcd"));
    }

    /// The constants above against both facts files: a change on either side fails here.
    #[test]
    fn names_are_the_pinned_facts() {
        for tag in CHECKED {
            names_are_the_facts_of(tag);
        }
    }

    fn names_are_the_facts_of(tag: &str) {
        let file = format!("{}/../tests/liqo/{tag}.toml", env!("CARGO_MANIFEST_DIR"));
        let file = file.as_str();
        let text = std::fs::read_to_string(file).unwrap();
        let facts: toml::Table = toml::from_str(&text).unwrap();
        let get = |path: &str| -> String {
            let mut v = facts.get(path.split('.').next().unwrap()).unwrap();
            for p in path.split('.').skip(1) {
                v = v.get(p).unwrap_or_else(|| panic!("no {path} in {file}"));
            }
            render(v)
        };
        assert_eq!(get("liqo_tag"), tag);
        assert_eq!(
            get("liqoctl.generate_peering_user.csr_signing_wait_secs"),
            CSR_SIGNING_WAIT.as_secs().to_string()
        );
        assert_eq!(
            get("liqoctl.generate_peering_user.csr_name"),
            format!("{PEER_USER_PREFIX}{{consumer cluster id}}")
        );
        assert_eq!(
            get("liqoctl.offload.selector_label"),
            LABEL_REMOTE_CLUSTER_ID
        );
        assert!(get("liqoctl.offload.mapping_strategies").contains(NAMESPACE_MAPPING));
        let force = facts["liqoctl"]["force_unpeer"]["present"]
            .as_bool()
            .unwrap();
        assert_eq!(force, minor_of(tag) >= Some(FORCE_UNPEER_SINCE), "{tag}");
        assert_eq!(
            format!(
                "{}/{}",
                get("resourceslice.group"),
                get("resourceslice.version")
            ),
            RESOURCE_SLICE_API_VERSION
        );
        assert_eq!(get("resourceslice.kind"), RESOURCE_SLICE_KIND);
        assert_eq!(get("resourceslice.qualified_resource"), RESOURCE_SLICES);
        assert_eq!(
            format!(
                "{}.{}",
                get("resourceslice.plural"),
                get("resourceslice.group")
            ),
            RESOURCE_SLICES
        );
        assert_eq!(get("resourceslice.default_class"), DEFAULT_CLASS);
        assert_eq!(get("labels.replication.key"), LABEL_REPLICATION);
        assert_eq!(
            get("labels.replication_destination.key"),
            LABEL_REPLICATION_DESTINATION
        );
        assert_eq!(get("labels.remote_cluster_id.key"), LABEL_REMOTE_CLUSTER_ID);
        assert_eq!(get("labels.replicated.key"), LABEL_REPLICATED);
        assert_eq!(get("labels.origin.key"), LABEL_ORIGIN);
        assert_eq!(
            get("annotations.create_virtual_node.key"),
            ANNOTATION_CREATE_VIRTUAL_NODE
        );
        assert_eq!(get("annotations.cordon.key"), ANNOTATION_CORDON);
        assert_eq!(get("taints.virtual_node.key"), VIRTUAL_NODE_TAINT);
        assert_eq!(get("taints.virtual_node.effect"), VIRTUAL_NODE_TAINT_EFFECT);
        assert_eq!(get("virtual_node.hostname_label"), HOSTNAME_LABEL);
        assert_eq!(get("tenant_namespace.prefix"), TENANT_NAMESPACE_PREFIX);
        assert_eq!(
            get("liqoctl.peer.timeout_default_secs"),
            PEER_DEFAULT_TIMEOUT.as_secs().to_string()
        );
        assert_eq!(
            get("liqoctl.unpeer.timeout_default_secs"),
            UNPEER_DEFAULT_TIMEOUT.as_secs().to_string()
        );
        assert_eq!(
            get("liqoctl.peer.gw_server_service_type_default"),
            GATEWAY_SERVICE_TYPE_DEFAULT
        );
        assert_eq!(
            get("liqoctl.peer.gw_server_service_types"),
            render(&toml::Value::Array(
                GATEWAY_SERVICE_TYPES
                    .iter()
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect()
            ))
        );
        assert_eq!(
            get("liqoctl.info.queries"),
            render(&toml::Value::Array(
                [INFO_CLUSTER_ID, INFO_VERSION, INFO_API_SERVER]
                    .iter()
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect()
            ))
        );
    }
}
