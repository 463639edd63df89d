//! Version skew (docs/protocol.md section 9): the previous release of the agent, built from
//! git, trades with this one in both roles over the domain broker of `broker-config/`
//! (mosquitto, mutual TLS, so identities are sealed): an intent is placed (reservation,
//! peering), the contract is kept alive by RENEW across more than one term, each side is
//! restarted in turn and renewals go on, and the buyer's release ends it on both sides.
//!
//! Set `FLUIDLET_OLD_BIN` to the old binary; `.ci/run` builds it with `tests/old-release.sh
//! $OLD_REV`. Without it the tests say they are skipped, except under CI, where they fail.
//! The old side is driven as an operator drives it, through its own command line (`run`,
//! `intent submit`, `status --json`, `contract release`), so only what that release already
//! had is used; the new side runs in this process, where its tables can be read.

use fluidlet::config::TlsFiles;
use fluidlet::model::{ContractState, Id, IntentState};
use fluidlet_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The contract term both directions sell under: long enough that a restart (a second or
/// two) never lets a contract run out, short enough that a test sees several renewals.
const TERM: Duration = Duration::from_secs(10);
/// The longest wait for anything the old side does (a renewal comes within half a term).
const SKEW_WAIT: Duration = Duration::from_secs(60);

fn old_bin() -> Option<PathBuf> {
    match std::env::var("FLUIDLET_OLD_BIN") {
        Ok(v) => Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(v)),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but FLUIDLET_OLD_BIN is not: .ci/run must build the old release")
        }
        Err(_) => {
            eprintln!("SKIPPED: set FLUIDLET_OLD_BIN to an agent built from the previous release (tests/old-release.sh)");
            None
        }
    }
}

/// A node run by the old binary, from its own config file.
struct Old {
    bin: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Old {
    /// Writes the old node's config (`extra` appended: its offer, its terms) and starts it.
    fn start(bin: &Path, dir: &Path, name: &str, domain: &TlsDomain, extra: &str) -> Old {
        let files = domain.enrol(name);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{name}\"\ndomain = \"{}\"\nbroker = \"mqtts://127.0.0.1:{}\"\n\
                 data_dir = \"{}\"\nkeepalive_secs = 5\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\n\
                 key = \"{}\"\n\n{extra}",
                domain.domain,
                domain.port,
                dir.join(name).display(),
                files.ca.display(),
                files.cert.display(),
                files.key.display(),
            ),
        )
        .unwrap();
        let mut old = Old {
            bin: bin.to_path_buf(),
            config,
            child: None,
        };
        old.spawn();
        old
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the old agent");
        self.child = Some(child);
    }

    /// SIGTERM and a clean exit, as `systemctl stop` does.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let exit = child.wait().expect("wait");
        assert!(
            exit.success(),
            "the old agent did not stop cleanly: {exit:?}"
        );
    }

    /// The old agent's own command line, against its config. On the blocking pool: `intent
    /// submit` waits for the placement, and the new side in this runtime must go on serving.
    async fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("-c").arg(&self.config);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("the old cli's thread")
            .expect("run the old cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `status --json`, once the control socket answers.
    async fn status(&self) -> serde_json::Value {
        let mut last = String::new();
        for _ in 0..200 {
            let (ok, out, err) = self.cli(&["status", "--json"]).await;
            if ok {
                return serde_json::from_str(&out).expect("status JSON");
            }
            last = err;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the old agent's status never answered: {last}");
    }

    /// Its record of contract `id`: (state, ends_at).
    async fn contract(&self, id: &str) -> Option<(String, u64)> {
        let st = self.status().await;
        st["contracts"].as_array()?.iter().find_map(|k| {
            (k["id"] == id).then(|| {
                (
                    k["state"].as_str().unwrap_or_default().to_owned(),
                    k["ends_at"].as_u64().unwrap_or(0),
                )
            })
        })
    }

    /// Waits until its record of `id` satisfies `cond`.
    async fn wait_contract(&self, what: &str, id: &str, cond: impl Fn(&str, u64) -> bool) {
        let deadline = tokio::time::Instant::now() + SKEW_WAIT;
        let mut seen = None;
        while tokio::time::Instant::now() < deadline {
            seen = self.contract(id).await;
            if let Some((state, ends)) = &seen {
                assert_ne!(state, "Expired", "{what}: the old side expired {id}");
                if cond(state, *ends) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("timed out waiting for {what}: the old side holds {seen:?}");
    }
}

impl Drop for Old {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until the new side's record of `id` satisfies `cond`, failing at once if it expired.
async fn wait_new(
    what: &str,
    a: &fluidlet::Agent,
    id: &Id,
    cond: impl Fn(&fluidlet::model::Contract) -> bool,
) {
    let deadline = tokio::time::Instant::now() + SKEW_WAIT;
    loop {
        let k = a.tables().contract(id).unwrap();
        if let Some(k) = &k {
            assert_ne!(
                k.state,
                ContractState::Expired,
                "{what}: the new side expired {id}"
            );
            if cond(k) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: the new side holds {k:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn term_ms() -> u64 {
    TERM.as_millis() as u64
}

fn offer_toml() -> String {
    format!(
        "[provider]\ncontract_term_secs = {}\n\n[[offer]]\nid = \"pool\"\narchitecture = \"{}\"\n\
         cpu_millicores = 4000\nmemory = \"8Gi\"\npods = 110\nprice = \"2.00\"\ncurrency = \"EUR\"\n\
         [offer.partition]\ncpu_min = 500\ncpu_step = 500\nmemory_min = \"512Mi\"\n\
         memory_step = \"512Mi\"\npods_min = 1\npods_step = 1\n",
        TERM.as_secs(),
        fluidlet::demo::k8s_arch()
    )
}

fn new_config(domain: &TlsDomain, name: &str, dir: &Path) -> fluidlet::Config {
    let files: TlsFiles = domain.enrol(name);
    let mut cfg = domain.config(name, files, dir);
    cfg.reserve_timeout = Duration::from_secs(5);
    cfg.acquire_budget = SKEW_WAIT;
    cfg
}

/// The previous release sells, this one buys: placed, renewed past a term, renewed after a
/// restart of the old provider and after one of the new consumer, released.
#[tokio::test]
async fn an_old_provider_and_a_new_consumer_trade_renew_and_survive_restarts() {
    let Some(bin) = old_bin() else { return };
    let Some(domain) = TlsDomain::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut prov = Old::start(&bin, dir.path(), "old-prov", &domain, &offer_toml());
    let cfg = new_config(&domain, "new-cons", dir.path());
    let mut cons = start(cfg.clone(), None).await;
    eventually_within("the old provider's advert", || {
        cons.candidates()
            .all()
            .iter()
            .any(|k| k.flavour.provider.as_str() == "old-prov")
    })
    .await;

    let intent = cons
        .submit_intent(intent_spec("cam", 1000, 2))
        .await
        .unwrap();
    assert_eq!(intent.state, IntentState::Placed, "{:?}", intent.error);
    let id = intent.contract.clone().unwrap();
    let bought = cons.tables().contract(&id).unwrap().unwrap();
    assert_eq!(bought.seller.as_str(), "old-prov");
    assert_eq!(bought.state, ContractState::Active);
    assert_eq!(bought.term_ms, Some(term_ms()));
    let created = bought.created_at;

    // Renewed past its first term: still Active on both sides.
    prov.wait_contract("a renewal past the first term", id.as_str(), |s, ends| {
        s == "Active" && ends > created + 2 * term_ms()
    })
    .await;

    // The old provider restarts; the new consumer's renewals reach the restarted one.
    prov.stop();
    let restarted = fluidlet::unix_ms();
    prov.spawn();
    prov.wait_contract(
        "a renewal after the provider's restart",
        id.as_str(),
        |s, ends| s == "Active" && ends > restarted + term_ms(),
    )
    .await;
    wait_new(
        "the consumer's view after the provider's restart",
        &cons,
        &id,
        |k| k.state == ContractState::Active && k.ends_at.unwrap_or(0) > restarted + term_ms(),
    )
    .await;

    // The new consumer restarts and goes on renewing from its tables.
    cons.shutdown().await;
    let restarted = fluidlet::unix_ms();
    cons = start(cfg, None).await;
    prov.wait_contract(
        "a renewal after the consumer's restart",
        id.as_str(),
        |s, ends| s == "Active" && ends > restarted + term_ms(),
    )
    .await;

    // The buyer releases: both sides end it.
    let released = cons
        .release(&id)
        .await
        .expect("RELEASED from the old provider");
    assert_eq!(released.state, ContractState::Released);
    prov.wait_contract("the release on the old side", id.as_str(), |s, _| {
        s == "Released"
    })
    .await;
    cons.shutdown().await;
    prov.stop();
}

/// This release sells, the previous one buys: the same story the other way round.
#[tokio::test]
async fn a_new_provider_and_an_old_consumer_trade_renew_and_survive_restarts() {
    let Some(bin) = old_bin() else { return };
    let Some(domain) = TlsDomain::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut pcfg = new_config(&domain, "new-prov", dir.path());
    pcfg.offers.push(fluidlet::demo::demo_offer(&pcfg.node_id));
    pcfg.contract_term = TERM;
    let mut prov = start(pcfg.clone(), None).await;
    let mut cons = Old::start(&bin, dir.path(), "old-cons", &domain, "");
    cons.status().await;

    std::fs::write(
        dir.path().join("app.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n",
    )
    .unwrap();
    let intent = dir.path().join("intent.toml");
    std::fs::write(
        &intent,
        format!(
            "name = \"app\"\nmanifest = \"app.yaml\"\n[resources]\ncpu_millicores = 1000\n\
             memory = \"2Gi\"\narchitecture = \"{}\"\n",
            fluidlet::demo::k8s_arch()
        ),
    )
    .unwrap();
    // The old agent may still be connecting: the first submit can fail with "not connected".
    let intent = intent.to_str().unwrap();
    let mut submitted = cons.cli(&["intent", "submit", intent]).await;
    for _ in 0..100 {
        if submitted.0 || !submitted.2.contains("not connected") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        submitted = cons.cli(&["intent", "submit", intent]).await;
    }
    let (ok, out, err) = submitted;
    assert!(
        ok && out.contains("Placed"),
        "the old consumer's intent: {out}{err}"
    );

    let sold = prov.tables().contracts().unwrap();
    assert_eq!(sold.len(), 1, "{sold:?}");
    let id = sold[0].id.clone();
    assert_eq!(sold[0].buyer.as_str(), "old-cons");
    assert_eq!(sold[0].state, ContractState::Active);
    let created = sold[0].created_at;

    // Renewed past its first term: still Active on both sides.
    wait_new("a renewal past the first term", &prov, &id, |k| {
        k.state == ContractState::Active && k.ends_at.unwrap_or(0) > created + 2 * term_ms()
    })
    .await;
    cons.wait_contract("the old consumer's view", id.as_str(), |s, _| s == "Active")
        .await;

    // The old consumer restarts and goes on renewing.
    cons.stop();
    let restarted = fluidlet::unix_ms();
    cons.spawn();
    wait_new("a renewal after the consumer's restart", &prov, &id, |k| {
        k.state == ContractState::Active && k.ends_at.unwrap_or(0) > restarted + term_ms()
    })
    .await;

    // The new provider restarts; the old consumer's renewals reach it.
    prov.shutdown().await;
    let restarted = fluidlet::unix_ms();
    prov = start(pcfg, None).await;
    wait_new("a renewal after the provider's restart", &prov, &id, |k| {
        k.state == ContractState::Active && k.ends_at.unwrap_or(0) > restarted + term_ms()
    })
    .await;
    cons.wait_contract("the old consumer's renewed end", id.as_str(), |s, ends| {
        s == "Active" && ends > restarted + term_ms()
    })
    .await;

    // The old buyer releases: both sides end it.
    let (ok, out, err) = cons.cli(&["contract", "release", id.as_str()]).await;
    assert!(ok && out.contains("Released"), "{out}{err}");
    wait_new("the release on the new side", &prov, &id, |k| {
        k.state == ContractState::Released
    })
    .await;
    cons.stop();
    prov.shutdown().await;
}

/// [`eventually`] with the skew tests' longer wait.
async fn eventually_within(what: &str, cond: impl FnMut() -> bool) {
    assert!(
        within(SKEW_WAIT, cond).await,
        "timed out waiting for {what}"
    );
}
