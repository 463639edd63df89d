//! Zero-touch enrolment in a container: a gateway that starts from the x86_64 node image
//! with only a config, the domain's CA bundle and a one-time token (no key, no certificate)
//! enrols with the real `fluidlet-signer`, connects to the domain broker over mutual TLS and
//! sells to a consumer.
//!
//! The broker (mosquitto with the shipped config, as `TlsDomain`) and the signer run on this
//! host, listening on every address; the container reaches them as `fl-host`, a name in the
//! broker's certificate, mapped to the host with `--add-host fl-host:host-gateway`. The
//! consumer runs in this process. Set `FLUIDLET_NODE_IMAGE` (`localhost/fluidlet:amd64`,
//! built by `cross/test-images.sh`, passed by `.ci/run`); without it the test is skipped,
//! except under CI, where it fails. Needs a Docker Engine.

use fluidlet_tests::{domain_script, free_port, start, want, TlsDomain};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The name the container knows the host by, in the broker's (and so the signer's)
/// certificate.
const HOST: &str = "fl-host";
const WAIT: Duration = Duration::from_secs(120);

use fluidlet_tests::{docker, output_text as text};

/// The container, removed (with its state volume) on drop.
struct Gateway(String);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.0]);
    }
}

impl Gateway {
    fn status(&self) -> Option<serde_json::Value> {
        let out = docker(&["exec", &self.0, "/usr/bin/fluidlet", "status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn logs(&self) -> String {
        text(&docker(&["logs", &self.0]))
    }
}

/// The signer binary on every address; killed on drop.
struct Signer(std::process::Child, std::path::PathBuf);

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_container_with_only_a_config_and_a_token_enrols_and_trades() {
    let image = match std::env::var("FLUIDLET_NODE_IMAGE") {
        Ok(v) => v,
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but FLUIDLET_NODE_IMAGE is not: .ci/run must build and name the x86_64 node image")
        }
        Err(_) => {
            eprintln!(
                "SKIPPED: set FLUIDLET_NODE_IMAGE to run it (cross/test-images.sh builds it)"
            );
            return;
        }
    };
    if !docker(&["info", "-f", "{{.ServerVersion}}"])
        .status
        .success()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but no Docker Engine answers"
        );
        eprintln!("SKIPPED: no Docker Engine");
        return;
    }
    let Some(d) = TlsDomain::start_public(HOST) else {
        return;
    };
    let sport = free_port();
    let slog = d.dir.path().join("signer.log");
    let signer = Signer(
        Command::new(env!("CARGO_BIN_EXE_fluidlet-signer"))
            .arg("--dir")
            .arg(d.dir.path())
            .args(["--listen", &format!("0.0.0.0:{sport}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&slog).unwrap())
            .spawn()
            .expect("start fluidlet-signer"),
        slog,
    );
    let signer_log = || std::fs::read_to_string(&signer.1).unwrap_or_default();

    // What the gateway is given: config, CA bundle, token. Owned by the image's user.
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(d.dir.path().join("ca-bundle.pem"), etc.join("ca.pem")).unwrap();
    let out = Command::new("sh")
        .arg(domain_script())
        .args(["token", d.dir.path().to_str().unwrap(), "gw-c"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(etc.join("token"), &out.stdout).unwrap();
    std::fs::write(
        etc.join("agent.toml"),
        format!(
            r#"node_id = "gw-c"
domain = "{domain}"
broker = "mqtts://{HOST}:{port}"
data_dir = "/var/lib/fluidlet"
keepalive_secs = 5

[tls]
ca = "/etc/fluidlet/ca.pem"
cert = "/var/lib/fluidlet/tls/node.pem"
key = "/var/lib/fluidlet/tls/node.key"

[enrol]
signer = "{HOST}:{sport}"
token = "/etc/fluidlet/token"

[[offer]]
id = "pool"
architecture = "amd64"
cpu_millicores = 4000
memory = "8Gi"
pods = 20
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
            domain = d.domain,
            port = d.port,
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (f, m) in [
        ("", 0o755),
        ("agent.toml", 0o644),
        ("ca.pem", 0o644),
        ("token", 0o600),
    ] {
        std::fs::set_permissions(etc.join(f), std::fs::Permissions::from_mode(m)).unwrap();
    }

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("fl-zero-touch-{}-{}", std::process::id(), nanos % 100_000);
    let created = docker(&[
        "create",
        "--name",
        &name,
        "--add-host",
        &format!("{HOST}:host-gateway"),
        "-e",
        "RUST_LOG=info",
        &image,
    ]);
    assert!(created.status.success(), "{}", text(&created));
    let gw = Gateway(name.clone());
    // A tar stream into `docker cp -`, keeping the owner it names (as tests/tests/bridged.rs).
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&etc)
        .args([
            "-c",
            "--numeric-owner",
            "--owner=65532",
            "--group=65532",
            ".",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stream = tar.stdout.take().unwrap();
    let cp = Command::new("docker")
        .args(["cp", "-", &format!("{name}:/etc/fluidlet")])
        .stdin(stream)
        .output()
        .unwrap();
    assert!(
        tar.wait().unwrap().success() && cp.status.success(),
        "{}",
        text(&cp)
    );
    let started = docker(&["start", &name]);
    assert!(started.status.success(), "{}", text(&started));

    let begun = Instant::now();
    while !gw.status().is_some_and(|s| s["connected"] == true) {
        assert!(
            begun.elapsed() < WAIT,
            "the gateway did not connect; its log:\n{}\nsigner:\n{}",
            gw.logs(),
            signer_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let logs = gw.logs();
    assert!(
        logs.contains("no certificate yet: enrolling with the token")
            && logs.contains("connected to the domain broker over mutual TLS as gw-c"),
        "{logs}"
    );
    assert!(signer_log().contains("signed"), "{}", signer_log());

    // It sells to a consumer on the host, over mutual TLS on both sides.
    let cd = tempfile::tempdir().unwrap();
    let consumer = start(d.config("carol", d.enrol("carol"), cd.path()), None).await;
    let begun = Instant::now();
    let contract = loop {
        match consumer.acquire(&want(500, 1)).await {
            Ok(c) => break c,
            Err(e) if begun.elapsed() < WAIT => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("no purchase from the gateway: {e}\n{}", gw.logs()),
        }
    };
    assert_eq!(contract.seller.as_str(), "gw-c");
    let sold = gw.status().expect("status");
    assert!(
        sold["contracts"]
            .as_array()
            .is_some_and(|v| v.iter().any(|c| c["id"] == contract.id.as_str())),
        "{sold}"
    );
    // The key was made in the container and stays there: the signer's domain has only the
    // certificate it issued.
    let issued = d.dir.path().join("nodes/gw-c/issued");
    assert_eq!(std::fs::read_dir(&issued).unwrap().count(), 1);
    assert!(!d.dir.path().join("nodes/gw-c/node.key").exists());
    consumer.shutdown().await;
    drop(gw);
    drop(signer);
}
