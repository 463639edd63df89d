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

/// Whether an API server URL points at this machine's loopback (unusable by a peer).
pub fn loopback_url(url: &str) -> bool {
    let rest = url.trim();
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
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
    for (name, tool, key) in [
        ("kubectl", Tool::Kubectl, "kubectl"),
        ("liqoctl", Tool::Liqoctl, "liqoctl"),
    ] {
        let path = fabric.program(tool).display().to_string();
        match ask(&fabric, name, tool, &["version", "--client"]).await {
            Ok(out) => r.push(
                name,
                Status::Ok,
                format!("{path}: {}", first_line(&out)),
                None,
            ),
            Err(e) => r.push(
                name,
                Status::Fail,
                e.to_string(),
                Some(tool_fix(name, key, &e)),
            ),
        }
    }
    let kubeconfig = cfg.kubeconfig.display().to_string();
    match std::fs::File::open(&cfg.kubeconfig) {
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
            let v = out.trim();
            match liqo::same_minor(liqo::PINNED, v) {
                Ok(()) => r.push("liqo version", Status::Ok, v.to_owned(), None),
                Err(_) => r.push(
                    "liqo version",
                    Status::Warn,
                    format!(
                        "{v}; fluidlet was checked against Liqo {} and peers refuse another \
                         major.minor",
                        liqo::PINNED
                    ),
                    Some(format!(
                        "run Liqo {}.x on every gateway of the domain",
                        liqo::PINNED
                            .rsplit_once('.')
                            .map_or(liqo::PINNED, |(m, _)| m)
                    )),
                ),
            }
        }
        Err(e) => r.push("liqo version", Status::Fail, e.to_string(), None),
    }
    match info(liqo::INFO_API_SERVER).await {
        Ok(out) if loopback_url(&out) => r.push(
            "api server",
            Status::Fail,
            format!(
                "Liqo hands {} to its peers: a loopback address, which no peer can reach",
                out.trim()
            ),
            Some(
                "reinstall with `liqoctl install k3s --api-server-url https://<address peers \
                 reach>:6443` (k3s's kubeconfig says https://127.0.0.1:6443)"
                    .into(),
            ),
        ),
        Ok(out) if out.trim().is_empty() => r.push(
            "api server",
            Status::Warn,
            "liqoctl reported no API server address".into(),
            Some("check `liqoctl info` by hand".into()),
        ),
        Ok(out) => r.push(
            "api server",
            Status::Ok,
            format!("peers get {}", out.trim()),
            None,
        ),
        Err(e) => r.push("api server", Status::Fail, e.to_string(), None),
    }
    let service = cfg.gateway_service_type.as_str();
    if service == "LoadBalancer" {
        let out = ask(
            &fabric,
            "list kube-system DaemonSets",
            Tool::Kubectl,
            &["get", "daemonsets.apps", "-n", "kube-system", "-o", "name"],
        )
        .await;
        match out {
            Ok(out) if out.lines().any(|l| l.contains("svclb-")) => r.push(
                "gateway service",
                Status::Ok,
                "LoadBalancer, and k3s ServiceLB runs (svclb-* DaemonSets in kube-system)".into(),
                None,
            ),
            Ok(_) => r.push(
                "gateway service",
                Status::Warn,
                "LoadBalancer, but no k3s ServiceLB DaemonSet (svclb-*) in kube-system: k3s \
                 was started with --disable servicelb, or no LoadBalancer Service exists yet"
                    .into(),
                Some(
                    "without a load balancer the provider's gateway gets no address: keep \
                     ServiceLB, or set fabric.gateway_service_type = \"NodePort\""
                        .into(),
                ),
            ),
            Err(e) => r.push("gateway service", Status::Fail, e.to_string(), None),
        }
    } else {
        r.push(
            "gateway service",
            Status::Ok,
            format!(
                "{service}: peers reach the gateway on a node port (UDP, 30000-32767 by default)"
            ),
            None,
        );
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
}
