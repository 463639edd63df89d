//! Cross-architecture interoperability: a provider that is a foreign `fluidlet` binary (the
//! aarch64 gateway build under qemu in CI) and a native consumer, through the domain broker
//! of `broker-config/` (mosquitto, mutual TLS): the cross-compiled TLS stack (ring) is used
//! for real.
//!
//! Set `FLUIDLET_FOREIGN_BIN` to the binary and `FLUIDLET_FOREIGN_RUNNER` to its runner
//! (`qemu-aarch64-static`); `.ci/run` does after building the ARM targets. Without them the
//! test says it is skipped, except under CI, where it fails.

use fluidlet::model::{FlavourSelector, Resources, Text};
use fluidlet_tests::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn foreign() -> Option<(String, Option<String>)> {
    match std::env::var("FLUIDLET_FOREIGN_BIN") {
        Ok(bin) => {
            // A relative path is taken from the workspace root, where `.ci/run` works.
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let bin = root.join(bin).to_string_lossy().into_owned();
            Some((bin, std::env::var("FLUIDLET_FOREIGN_RUNNER").ok()))
        }
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but FLUIDLET_FOREIGN_BIN is not: .ci/run must build and name the ARM binary")
        }
        Err(_) => {
            eprintln!("SKIPPED: set FLUIDLET_FOREIGN_BIN (and FLUIDLET_FOREIGN_RUNNER) to run it");
            None
        }
    }
}

fn spawn(bin: &str, runner: &Option<String>, config: &std::path::Path) -> Child {
    let mut cmd = match runner {
        Some(r) => {
            let mut c = Command::new(r);
            c.arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("run")
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the foreign provider")
}

/// Sends SIGTERM and waits for a clean exit.
fn terminate(child: &mut Child) {
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

#[tokio::test]
async fn foreign_arch_provider_serves_a_native_consumer() {
    let Some((bin, runner)) = foreign() else {
        return;
    };
    let Some(domain) = TlsDomain::start() else {
        return;
    };
    let (d, port) = (domain.domain.clone(), domain.port);
    let files = domain.enrol("arm-prov");
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("provider.toml");
    std::fs::write(
        &toml,
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
            dir.path().join("arm-prov").display(),
            files.ca.display(),
            files.cert.display(),
            files.key.display(),
        ),
    )
    .unwrap();
    let mut provider = spawn(&bin, &runner, &toml);

    let c = start(
        domain.config("x86-cons", domain.enrol("x86-cons"), dir.path()),
        None,
    )
    .await;
    eventually("the foreign provider's advert", || {
        c.tables()
            .candidates()
            .unwrap()
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
    terminate(&mut provider);
    eventually("the advert withdrawn", || {
        c.tables().candidates().unwrap().is_empty()
    })
    .await;

    // Restarted, the foreign provider advertises the reduced flavour from its tables.
    let mut provider = spawn(&bin, &runner, &toml);
    eventually("the reduced advert after restart", || {
        c.tables()
            .candidates()
            .unwrap()
            .iter()
            .any(|k| k.flavour.provider.as_str() == "arm-prov" && k.flavour.resources.cpu == 1000)
    })
    .await;
    terminate(&mut provider);
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.shutdown().await;
}
