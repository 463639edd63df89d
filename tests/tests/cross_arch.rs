//! Cross-architecture interoperability: a provider that is a foreign `fluidlet` binary (the
//! aarch64 gateway build under qemu in CI) and a native consumer, through the domain broker
//! of `broker-config/` (mosquitto, mutual TLS): the cross-compiled TLS stack (ring) is used
//! for real. The same scenario runs twice: the bare binary under its runner, and the runtime
//! container image (`cross/Containerfile`, arm64, under qemu through binfmt) with the agent as
//! the container's PID 1.
//!
//! Set `FLUIDLET_FOREIGN_BIN` to the binary and `FLUIDLET_FOREIGN_RUNNER` to its runner
//! (`qemu-aarch64-static`), and `FLUIDLET_IMAGE` to the image (`localhost/fluidlet:arm64`);
//! `.ci/run` does after building the ARM targets. Without them a test says it is skipped,
//! except under CI, where it fails. The container test needs a Docker Engine and root (the
//! TLS key is handed to the image's user, 65532).

use fluidlet::model::{FlavourSelector, Resources, Text};
use fluidlet_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The value of `var`, or `None` (the test is skipped) when unset outside CI.
fn required(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) => Some(v),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but {var} is not: .ci/run must build and name {what}")
        }
        Err(_) => {
            eprintln!("SKIPPED: set {var} to run it ({what})");
            None
        }
    }
}

/// How the foreign provider is started and stopped.
enum Launcher {
    /// The binary, under its runner (qemu) if any.
    Binary { bin: String, runner: Option<String> },
    /// The runtime image; config and TLS material in a bind-mounted directory, state in a
    /// named volume that outlives a restart.
    Container { image: String, volume: String },
}

/// A running provider; stopped (and its container removed) on drop if a test fails.
enum Running {
    Process(Child),
    Container(String),
}

impl Launcher {
    /// Paths as the provider sees them: the directory of its config (`agent.toml`) and TLS
    /// files, and its data directory.
    fn paths(&self, host: &Path) -> (PathBuf, PathBuf) {
        match self {
            Launcher::Binary { .. } => (host.to_path_buf(), host.join("arm-prov")),
            Launcher::Container { .. } => ("/etc/fluidlet".into(), "/var/lib/fluidlet".into()),
        }
    }

    fn spawn(&self, host: &Path, run: u32) -> Running {
        match self {
            Launcher::Binary { bin, runner } => {
                let mut cmd = match runner {
                    Some(r) => {
                        let mut c = Command::new(r);
                        c.arg(bin);
                        c
                    }
                    None => Command::new(bin),
                };
                let child = cmd
                    .arg("run")
                    .arg("-c")
                    .arg(host.join("agent.toml"))
                    .env("RUST_LOG", "info")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("start the foreign provider");
                Running::Process(child)
            }
            Launcher::Container { image, volume } => {
                // The image's default command: `run -c /etc/fluidlet/agent.toml`. Host
                // networking: the broker is on this machine's loopback. (The config is
                // bind-mounted: `docker cp -a` would keep the files' owner, but Docker 20.10
                // looks the image's user up in the host's passwd and fails.)
                let name = format!("{volume}-{run}");
                let out = Command::new("docker")
                    .args(["run", "-d", "--name", &name, "--network", "host"])
                    .args(["-e", "RUST_LOG=info"])
                    .arg("-v")
                    .arg(format!("{}:/etc/fluidlet:ro", host.display()))
                    .arg("-v")
                    .arg(format!("{volume}:/var/lib/fluidlet"))
                    .arg(image)
                    .output()
                    .expect("docker run");
                // Removed on drop from here on, even if it failed to start.
                let running = Running::Container(name);
                assert!(
                    out.status.success(),
                    "docker run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                running
            }
        }
    }
}

/// How long a foreign provider gets for each step: it runs under qemu (TLS handshakes
/// included), on a machine that may be building in parallel.
const FOREIGN_WAIT: Duration = Duration::from_secs(60);

impl Running {
    /// Waits for `cond`; if it does not hold within [`FOREIGN_WAIT`], fails with what the
    /// provider printed (a container's logs and state; a process's stderr is the test's).
    async fn wait(&self, what: &str, cond: impl FnMut() -> bool) {
        if within(FOREIGN_WAIT, cond).await {
            return;
        }
        let detail = match self {
            Running::Process(child) => format!("process {} (its log is above)", child.id()),
            Running::Container(name) => {
                let run = |args: &[&str]| {
                    Command::new("docker")
                        .args(args)
                        .output()
                        .map(|o| {
                            format!(
                                "{}{}",
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            )
                        })
                        .unwrap_or_else(|e| format!("docker: {e}"))
                };
                format!(
                    "container {name}: state {}logs:\n{}",
                    run(&["inspect", "-f", "{{json .State}}", name]),
                    run(&["logs", name])
                )
            }
        };
        panic!("timed out waiting for {what}; {detail}");
    }

    /// SIGTERM to the agent (`kill`, or `docker stop` to the container's PID 1) and a clean
    /// exit.
    fn terminate(mut self) {
        match &mut self {
            Running::Process(child) => {
                let status = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status()
                    .expect("kill");
                assert!(status.success());
                let exit = child.wait().expect("wait");
                assert!(
                    exit.success(),
                    "the provider did not stop cleanly: {exit:?}"
                );
            }
            Running::Container(name) => {
                let stop = Command::new("docker")
                    .args(["stop", "-t", "20", name.as_str()])
                    .output()
                    .expect("docker stop");
                assert!(stop.status.success(), "docker stop failed");
                let code = Command::new("docker")
                    .args(["inspect", "-f", "{{.State.ExitCode}}", name.as_str()])
                    .output()
                    .expect("docker inspect");
                let code = String::from_utf8_lossy(&code.stdout).trim().to_string();
                if code != "0" {
                    let logs = Command::new("docker")
                        .args(["logs", name.as_str()])
                        .output();
                    if let Ok(l) = logs {
                        eprintln!("{}", String::from_utf8_lossy(&l.stderr));
                    }
                }
                assert_eq!(code, "0", "the provider in {name} did not stop cleanly");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Running::Container(name) => {
                let _ = Command::new("docker")
                    .args(["rm", "-f", name.as_str()])
                    .output();
            }
        }
    }
}

/// Removes the test's named volume.
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f", self.0.as_str()])
            .output();
    }
}

#[tokio::test]
async fn foreign_arch_provider_serves_a_native_consumer() {
    let Some(bin) = required("FLUIDLET_FOREIGN_BIN", "the ARM gateway binary") else {
        return;
    };
    // A relative path is taken from the workspace root, where `.ci/run` works.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join(bin).to_string_lossy().into_owned();
    let runner = std::env::var("FLUIDLET_FOREIGN_RUNNER").ok();
    serves_a_native_consumer(Launcher::Binary { bin, runner }).await;
}

/// The provider runs in the arm64 runtime image built by `cross/runtime-image.sh`, as the
/// container's PID 1 under qemu; `docker stop` must reach it as SIGTERM and withdraw the
/// advert, and the state volume must carry its tables over a restart.
#[tokio::test]
async fn provider_in_the_arm64_container_serves_a_native_consumer() {
    let Some(image) = required("FLUIDLET_IMAGE", "the arm64 runtime image") else {
        return;
    };
    let engine = Command::new("docker")
        .args(["info", "-f", "{{.ServerVersion}}"])
        .output();
    if !engine.map(|o| o.status.success()).unwrap_or(false) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but no Docker Engine answers"
        );
        eprintln!("SKIPPED: no Docker Engine");
        return;
    }
    let volume = format!("fluidlet-test-{}", std::process::id());
    let _cleanup = Volume(volume.clone());
    serves_a_native_consumer(Launcher::Container { image, volume }).await;
}

/// A native consumer buys from the foreign provider over mutual TLS; a clean stop withdraws
/// the advert; restarted, the provider advertises what is left from its tables.
async fn serves_a_native_consumer(launcher: Launcher) {
    let Some(domain) = TlsDomain::start() else {
        return;
    };
    let (d, port) = (domain.domain.clone(), domain.port);
    let minted = domain.enrol("arm-prov");
    let dir = tempfile::tempdir().unwrap();
    // The provider's TLS files sit beside its config, readable by the container's user.
    let mut files = Vec::new();
    for (name, from) in [
        ("domain-ca.pem", &minted.ca),
        ("node.pem", &minted.cert),
        ("node.key", &minted.key),
    ] {
        std::fs::copy(from, dir.path().join(name)).unwrap();
        files.push(name);
    }
    let (tls_dir, data_dir) = launcher.paths(dir.path());
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            r#"node_id = "arm-prov"
domain = "{d}"
broker = "mqtts://127.0.0.1:{port}"
data_dir = "{}"
keepalive_secs = 5

[tls]
ca = "{}"
cert = "{}"
key = "{}"

[[offer]]
id = "pool"
architecture = "arm64"
cpu_millicores = 2000
memory = "2Gi"
pods = 10
price = "1.00"
currency = "EUR"
[offer.partition]
cpu_min = 500
cpu_step = 500
memory_min = "512Mi"
memory_step = "512Mi"
pods_min = 1
pods_step = 1
"#,
            data_dir.display(),
            tls_dir.join("domain-ca.pem").display(),
            tls_dir.join("node.pem").display(),
            tls_dir.join("node.key").display(),
        ),
    )
    .unwrap();
    // After every file is written, whatever the umask (CI's may be 077, which left
    // agent.toml unreadable to the image's user).
    if let Launcher::Container { .. } = launcher {
        files.push("agent.toml");
        hand_to_image_user(dir.path(), &files);
    }
    let provider = launcher.spawn(dir.path(), 1);

    // The provider runs emulated on a machine that may be busy: its answers get the wait a
    // slow gateway would, not the 1.5 s of the native tests.
    let mut cfg = domain.config("x86-cons", domain.enrol("x86-cons"), dir.path());
    cfg.reserve_timeout = Duration::from_secs(20);
    cfg.acquire_budget = FOREIGN_WAIT;
    let c = start(cfg, None).await;
    provider
        .wait("the foreign provider's advert", || {
            c.candidates()
                .all()
                .iter()
                .any(|k| k.flavour.provider.as_str() == "arm-prov")
        })
        .await;
    let sel = FlavourSelector {
        architecture: Some(Text::new("arm64").unwrap()),
        min: Some(Resources {
            cpu: 1000,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        }),
        ..Default::default()
    };
    let contract = c
        .acquire(&sel)
        .await
        .expect("a contract from the foreign provider");
    assert_eq!(contract.seller.as_str(), "arm-prov");
    assert_eq!(contract.resources.cpu, 1000);

    // A clean stop (SIGTERM) withdraws the advert.
    provider.terminate();
    assert!(
        within(FOREIGN_WAIT, || c.candidates().all().is_empty()).await,
        "timed out waiting for the advert to be withdrawn"
    );

    // Restarted, the foreign provider advertises the reduced flavour from its tables.
    let provider = launcher.spawn(dir.path(), 2);
    provider
        .wait("the reduced advert after restart", || {
            c.candidates().all().iter().any(|k| {
                k.flavour.provider.as_str() == "arm-prov" && k.flavour.resources.cpu == 1000
            })
        })
        .await;
    provider.terminate();
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.shutdown().await;
}

/// The image runs as 65532 and the agent refuses keys others can read: the config directory
/// and its files are handed to that user (the test runs as root where CI runs it).
fn hand_to_image_user(dir: &Path, files: &[&str]) {
    let mut cmd = Command::new("chown");
    cmd.arg("-R").arg("65532:65532").arg(dir);
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    assert!(
        ok,
        "chown to the image's user failed (the container test needs root)"
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in files {
        let mode = if f.ends_with(".key") { 0o600 } else { 0o644 };
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
    }
}
