//! `fluidlet doctor`: checks, on a real gateway, what the `liqo` backend needs, and says
//! what to fix. Each check runs the real tools the way the agent would (same paths, same
//! `--kubeconfig`), so run it as the agent's user.

use super::{command, liqo, Action, Backend, Fabric, FabricConfig, FabricError, Tool};
use crate::model::Id;
use std::fmt;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check: what was looked at, what was found, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub found: String,
    pub fix: Option<String>,
}

/// Every check, in order.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// No check failed (warnings allowed).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    fn push(&mut self, name: &'static str, status: Status, found: String, fix: Option<String>) {
        self.checks.push(Check {
            name,
            status,
            found,
            fix,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            writeln!(f, "{tag} {:<16} {}", c.name, c.found)?;
            if let Some(fix) = &c.fix {
                writeln!(f, "     {:<16} fix: {fix}", "")?;
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        match failed {
            0 => write!(f, "the liqo backend has what it needs"),
            n => write!(f, "{n} problem(s) to fix before the liqo backend can peer"),
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned()
}

/// The host of a URL (`https://host:port/...`), without brackets for IPv6.
fn url_host(url: &str) -> &str {
    let rest = url.trim();
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

/// Whether an API server URL points at this machine's loopback (unusable by a peer).
pub fn loopback_url(url: &str) -> bool {
    let host = url_host(url);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// Whether an API server URL names a private, shared (carrier-grade NAT) or link-local
/// address: reachable from this site only, not by a peer elsewhere. Names are not resolved.
pub fn private_url(url: &str) -> bool {
    match url_host(url).parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            let [a, b, ..] = ip.octets();
            ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        Ok(std::net::IpAddr::V6(ip)) => ip.is_unique_local() || ip.is_unicast_link_local(),
        Err(_) => false,
    }
}

/// `Client version: X` and `Server version: Y` from `liqoctl version`.
fn versions(out: &str) -> (Option<String>, Option<String>) {
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    (get("Client version:"), get("Server version:"))
}

async fn ask(
    fabric: &Fabric,
    what: &str,
    tool: Tool,
    args: &[&str],
) -> Result<String, FabricError> {
    fabric
        .execute("doctor", &[Action::Run(command(what, tool, args))])
        .await
}

fn tool_fix(tool: &str, key: &str, e: &FabricError) -> String {
    match e {
        FabricError::Spawn { .. } => format!(
            "install {tool} on this gateway or set fabric.{key} to its path (the agent's \
             PATH, and ReadOnlyPaths= under systemd, must reach it)"
        ),
        _ => format!("run `{tool} version --client` as the agent's user and fix what it says"),
    }
}

/// Runs every check against `cfg` (as if `backend = "liqo"`).
pub async fn doctor(cfg: &FabricConfig, data_dir: &Path, node: &Id) -> Report {
    let mut r = Report::default();
    if cfg.backend != Backend::Liqo {
        r.push(
            "backend",
            Status::Warn,
            "fabric.backend is \"dry-run\": nothing below is used yet".into(),
            Some("set fabric.backend = \"liqo\" once every check passes".into()),
        );
    }
    let fabric = Fabric::new(
        FabricConfig {
            backend: Backend::Liqo,
            ..cfg.clone()
        },
        data_dir,
        node,
    );
    let path = fabric.program(Tool::Kubectl).display().to_string();
    match ask(&fabric, "kubectl", Tool::Kubectl, &["version", "--client"]).await {
        Ok(out) => r.push(
            "kubectl",
            Status::Ok,
            format!("{path}: {}", first_line(&out)),
            None,
        ),
        Err(e) => r.push(
            "kubectl",
            Status::Fail,
            e.to_string(),
            Some(tool_fix("kubectl", "kubectl", &e)),
        ),
    }
    let kubeconfig = cfg.kubeconfig.display().to_string();
    let readable = std::fs::File::open(&cfg.kubeconfig);
    match &readable {
        Ok(_) => r.push(
            "kubeconfig",
            Status::Ok,
            format!("{kubeconfig} is readable"),
            None,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.push(
            "kubeconfig",
            Status::Fail,
            format!("{kubeconfig} is not readable by this user: {e}"),
            Some(
                "k3s writes it root-only (0600): start k3s with --write-kubeconfig-mode 0640 \
                 and give the agent's group read access (SupplementaryGroups= under systemd), \
                 or copy it to a file the agent may read and set fabric.kubeconfig"
                    .into(),
            ),
        ),
        Err(e) => r.push(
            "kubeconfig",
            Status::Fail,
            format!("{kubeconfig}: {e}"),
            Some(
                "install k3s (it writes /etc/rancher/k3s/k3s.yaml) or set fabric.kubeconfig".into(),
            ),
        ),
    }
    // liqoctl loads the kubeconfig before any subcommand, `version --client` included: with
    // an unreadable one it fails whatever the binary, so say so rather than blame liqoctl.
    let path = fabric.program(Tool::Liqoctl).display().to_string();
    let mut cli_version = None;
    if readable.is_err() {
        r.push(
            "liqoctl",
            Status::Fail,
            format!(
                "{path}: not checked: liqoctl reads the kubeconfig ({kubeconfig}) before \
                 anything else, even for `version --client`"
            ),
            Some("fix the kubeconfig first (above)".into()),
        );
    } else {
        match ask(&fabric, "liqoctl", Tool::Liqoctl, &["version", "--client"]).await {
            Ok(out) => {
                cli_version = versions(&out).0;
                r.push(
                    "liqoctl",
                    Status::Ok,
                    format!("{path}: {}", first_line(&out)),
                    None,
                )
            }
            Err(e) => r.push(
                "liqoctl",
                Status::Fail,
                e.to_string(),
                Some(tool_fix("liqoctl", "liqoctl", &e)),
            ),
        }
    }
    let info = |q: &'static str| {
        let fabric = &fabric;
        async move { ask(fabric, "liqoctl info", Tool::Liqoctl, &["info", "--get", q]).await }
    };
    match info(liqo::INFO_CLUSTER_ID).await {
        Ok(out) => {
            let id = out.trim().to_owned();
            let configured = cfg.cluster_id.as_ref().map(|c| c.as_str().to_owned());
            if !liqo::valid_cluster_id(&id) {
                r.push(
                    "liqo",
                    Status::Fail,
                    format!("liqoctl printed {id:?} as the cluster id"),
                    Some("check `liqoctl info` by hand".into()),
                );
            } else if let Some(why) = liqo::cluster_id_problem(&id, true) {
                r.push(
                    "liqo",
                    Status::Fail,
                    why,
                    Some(
                        "reinstall Liqo with a shorter --cluster-id (at most 48 characters)".into(),
                    ),
                );
            } else if configured.as_ref().is_some_and(|c| *c != id) {
                r.push(
                    "liqo",
                    Status::Fail,
                    format!(
                        "Liqo's cluster id is {id}, fabric.cluster_id says {}",
                        configured.unwrap_or_default()
                    ),
                    Some("remove fabric.cluster_id or set it to Liqo's".into()),
                );
            } else {
                r.push(
                    "liqo",
                    Status::Ok,
                    format!("installed, cluster id {id}"),
                    None,
                );
            }
        }
        Err(e) => r.push(
            "liqo",
            Status::Fail,
            format!("Liqo is not installed or not reachable: {e}"),
            Some(format!(
                "liqoctl install k3s --version {} --api-server-url https://<this gateway's \
                 address>:6443 (see docs/fabric.md)",
                liqo::PINNED
            )),
        ),
    }
    match info(liqo::INFO_VERSION).await {
        Ok(out) => {
            let v = out.trim().to_owned();
            // `liqoctl version` without --client compares the CLI with the installed Liqo
            // (and only warns); `version --client` never does.
            let server = ask(&fabric, "liqoctl version", Tool::Liqoctl, &["version"])
                .await
                .ok()
                .and_then(|o| versions(&o).1);
            let cli = cli_version.clone();
            let checked = liqo::CHECKED.join(" and ");
            if !liqo::checked_minor(&v) {
                r.push(
                    "liqo version",
                    Status::Warn,
                    format!(
                        "{v}; fluidlet was checked against Liqo {checked} (minor versions 1.0 \
                         and 1.2), and peers refuse another major.minor"
                    ),
                    Some("run the same Liqo 1.0.x or 1.2.x on every gateway of the domain".into()),
                );
            } else if let Some(cli) = cli.filter(|c| server.as_deref().unwrap_or(&v) != c) {
                r.push(
                    "liqo version",
                    Status::Warn,
                    format!(
                        "Liqo {v} is installed but liqoctl is {cli}: liqoctl warns that a \
                         mismatch may cause unexpected behaviour"
                    ),
                    Some(format!("install liqoctl {v} (fabric.liqoctl)")),
                );
            } else {
                r.push("liqo version", Status::Ok, v, None);
            }
        }
        Err(e) => r.push("liqo version", Status::Fail, e.to_string(), None),
    }
    // Liqo hands peers the address given at install (--api-server-url), else its first
    // control-plane node's, external before internal, on 6443; never the kubeconfig's
    // localhost. An empty answer cannot happen: `--get` fails on an empty field.
    match info(liqo::INFO_API_SERVER).await {
        Ok(out) if loopback_url(&out) => r.push(
            "api server",
            Status::Fail,
            format!(
                "Liqo hands {} to its peers: a loopback address, which no peer can reach (it \
                 comes from an explicit override: liqoctl refuses localhost itself)",
                out.trim()
            ),
            Some(
                "reinstall with `liqoctl install k3s --api-server-url https://<address peers \
                 reach>:6443`"
                    .into(),
            ),
        ),
        Ok(out) if private_url(&out) => r.push(
            "api server",
            Status::Warn,
            format!(
                "Liqo hands {} to its peers: a private or NATed address, reachable only from \
                 this network",
                out.trim()
            ),
            Some(
                "fine if every peer is on this network; otherwise reinstall with `liqoctl \
                 install k3s --api-server-url https://<public address or name>:6443` (the \
                 API server certificate must be valid for it: k3s --tls-san)"
                    .into(),
            ),
        ),
        Ok(out) => r.push(
            "api server",
            Status::Ok,
            format!("peers get {}", out.trim()),
            None,
        ),
        Err(e) => r.push("api server", Status::Fail, e.to_string(), None),
    }
    // The gateway server of a peering runs on the provider, with the Service type the
    // consumer chose (`liqoctl peer --gw-server-service-type`): what matters here is whether
    // this cluster can give a LoadBalancer Service an address, for consumers that ask one.
    let asks = cfg.gateway_service_type.as_str();
    let out = ask(
        &fabric,
        "list kube-system DaemonSets",
        Tool::Kubectl,
        &["get", "daemonsets.apps", "-n", "kube-system", "-o", "name"],
    )
    .await;
    let own = format!(
        "(as a consumer this node asks its providers for {asks}: that depends on each \
         provider's cluster, not this one)"
    );
    match out {
        Ok(out) if out.lines().any(|l| l.contains("svclb-")) => r.push(
            "gateway service",
            Status::Ok,
            format!(
                "k3s ServiceLB runs here (svclb-* DaemonSets): consumers asking this provider \
                 for a LoadBalancer gateway get an address {own}"
            ),
            None,
        ),
        Ok(_) => r.push(
            "gateway service",
            Status::Warn,
            format!(
                "no k3s ServiceLB DaemonSet (svclb-*) in kube-system: k3s was started with \
                 --disable servicelb, or no LoadBalancer Service exists yet. As a provider, \
                 the gateway server of a consumer asking LoadBalancer (Liqo's and fluidlet's \
                 default) would get no address {own}"
            ),
            Some(
                "keep ServiceLB on providers, or have their consumers set \
                 fabric.gateway_service_type = \"NodePort\" (and open UDP 30000-32767 here)"
                    .into(),
            ),
        ),
        Err(e) => r.push("gateway service", Status::Fail, e.to_string(), None),
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_api_servers_are_recognised() {
        for url in [
            "https://127.0.0.1:6443",
            "https://localhost:6443",
            "https://[::1]:6443",
            "127.0.0.2:6443",
            "https://0.0.0.0:6443",
        ] {
            assert!(loopback_url(url), "{url}");
        }
        for url in [
            "https://192.0.2.10:6443",
            "https://gw.example.org:6443",
            "https://[2001:db8::1]:6443",
        ] {
            assert!(!loopback_url(url), "{url}");
        }
    }

    #[test]
    fn private_and_nated_api_servers_are_recognised() {
        for url in [
            "https://10.0.0.5:6443",
            "https://172.16.3.4:6443",
            "https://192.168.1.20:6443",
            "https://100.64.0.9:6443",
            "https://169.254.1.1:6443",
            "https://[fd00::5]:6443",
            "https://[fe80::1]:6443",
        ] {
            assert!(private_url(url), "{url}");
        }
        for url in [
            "https://192.0.2.10:6443",
            "https://203.0.113.7:6443",
            "https://gw.example.org:6443",
            "https://[2001:db8::1]:6443",
            "https://100.128.0.1:6443",
        ] {
            assert!(!private_url(url), "{url}");
        }
        assert_eq!(
            versions("Client version: v1.0.3\nServer version: v1.2.0\n"),
            (Some("v1.0.3".into()), Some("v1.2.0".into()))
        );
    }
}
