//! Enrolment with a one-time token, end to end: `domain.sh init` and `token`, the real
//! `fluidlet-signer` binary over TLS, a gateway that starts with only a config, the domain's CA
//! bundle and a token file, and mosquitto over mutual TLS; and every bad token and CSR the
//! signer must refuse, with nothing signed.

use fluidlet::enrol::{EnrolConfig, Request};
use fluidlet::model::IntentState;
use fluidlet_signer::{Limiter, Refusal, Signer};
use fluidlet_tests::{domain_script, eventually, free_port, start, TlsDomain};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn domain_sh(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("sh")
        .arg(domain_script())
        .args(args)
        .output()
        .expect("run domain.sh");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A token from `domain.sh token DIR ARGS...`.
fn token(dir: &Path, args: &[&str]) -> String {
    let d = dir.to_str().unwrap();
    let mut all = vec!["token", d];
    all.extend_from_slice(args);
    let (code, out, err) = domain_sh(&all);
    assert_eq!(code, Some(0), "domain.sh token: {err}");
    assert_eq!(out.len(), 64, "{out}");
    out
}

/// The signer binary on a free port; killed on drop.
struct SignerProcess {
    port: u16,
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for SignerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SignerProcess {
    fn start(dir: &Path) -> SignerProcess {
        SignerProcess::start_with(dir, &[])
    }

    /// With further arguments (e.g. `--seconds N`).
    fn start_with(dir: &Path, extra: &[&str]) -> SignerProcess {
        let port = free_port();
        let log = dir.join("signer.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fluidlet-signer"))
            .arg("--dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start fluidlet-signer");
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return SignerProcess { port, child, log };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the signer did not listen");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_only_a_config_and_a_token_enrols_connects_and_trades() {
    let Some(d) = TlsDomain::start() else { return };
    let signer = SignerProcess::start(d.dir.path());
    let gw = tempfile::tempdir().unwrap();
    // The image: the domain's CA bundle (public) and a token file; no key, no certificate.
    let tls_dir = gw.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::copy(d.dir.path().join("ca-bundle.pem"), tls_dir.join("ca.pem")).unwrap();
    let token_file = gw.path().join("token");
    std::fs::write(&token_file, token(d.dir.path(), &["gw-a"]) + "\n").unwrap();
    let files = fluidlet::config::TlsFiles {
        ca: tls_dir.join("ca.pem"),
        cert: tls_dir.join("node.pem"),
        key: tls_dir.join("node.key"),
    };
    let mut cfg =
        fluidlet_tests::provider_config("gw-a", &d.domain, d.port, &gw.path().join("data"));
    cfg.tls = Some(files.clone());
    cfg.enrol = Some(EnrolConfig {
        signer_host: "127.0.0.1".into(),
        signer_port: signer.port,
        token: token_file.clone(),
        renew_at: fluidlet::config::RENEW_AT,
    });
    let provider = start(cfg.clone(), None).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&files.key),
        0o600,
        "the key made on the device is owner-only"
    );
    assert_eq!(
        mode(&files.cert),
        0o600,
        "so is the certificate, as everything in data_dir"
    );
    assert!(signer.log().contains("signed"), "{}", signer.log());

    // It trades over mutual TLS with a node enrolled by hand.
    let cd = tempfile::tempdir().unwrap();
    let consumer = start(d.config("carol", d.enrol("carol"), cd.path()), None).await;
    let intent = consumer
        .submit_intent(fluidlet_tests::intent_spec("web", 1000, 1))
        .await
        .expect("intent accepted");
    eventually("the intent to be placed on the enrolled gateway", || {
        consumer
            .tables()
            .intent(&intent.id)
            .ok()
            .flatten()
            .is_some_and(|i| i.state == IntentState::Placed)
    })
    .await;
    assert_eq!(
        provider.tables().contracts().unwrap()[0].buyer.as_str(),
        "carol"
    );

    // domain.sh list shows the certificate the signer issued.
    let (_, list, _) = domain_sh(&["list", d.dir.path().to_str().unwrap()]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("gw-a\t") && l.ends_with("\tvalid")),
        "{list}"
    );

    // The token was used: a second device with the same token (its own key) is refused and
    // gets nothing.
    let other = tempfile::tempdir().unwrap();
    let other_files = fluidlet::config::TlsFiles {
        ca: files.ca.clone(),
        cert: other.path().join("node.pem"),
        key: other.path().join("node.key"),
    };
    let e = fluidlet::enrol::enrol(
        &fluidlet::model::Id::new("gw-a").unwrap(),
        &other_files,
        cfg.enrol.as_ref().unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already used"), "{e}");
    assert!(!other_files.cert.exists());

    // Revoking it works for a certificate of the enrolment CA as for one of the root: the
    // enrolment CA's CRL lists it, and after a reload the broker cuts it off.
    let dir = d.dir.path().to_str().unwrap();
    let (code, _, err) = domain_sh(&["revoke", dir, "gw-a"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, list, _) = domain_sh(&["list", dir]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("gw-a\t") && l.ends_with("\trevoked")),
        "{list}"
    );
    let pid = d.broker_pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    eventually("the revoked gateway to be cut off", || {
        !provider.broker_status().connected
    })
    .await;
    assert!(
        !provider.connected(Duration::from_secs(2)).await,
        "it got back in"
    );

    consumer.shutdown().await;
    provider.shutdown().await;
}

/// A domain directory made by `domain.sh init` (the plugin is built too; no broker runs).
fn domain() -> Option<tempfile::TempDir> {
    let gcc = Command::new("gcc").arg("--version").output().is_ok();
    if !gcc || !Path::new("/usr/include/mosquitto_broker.h").exists() {
        if std::env::var_os("CI").is_some() {
            panic!("gcc or mosquitto-dev missing and CI is set");
        }
        eprintln!("SKIPPED: gcc or mosquitto-dev not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    let (code, _, err) = domain_sh(&["init", d.to_str().unwrap(), "t1", "8883", "127.0.0.1"]);
    assert_eq!(code, Some(0), "{err}");
    Some(dir)
}

/// A CSR made by openssl: `key` is e.g. `ec -pkeyopt ec_paramgen_curve:P-256`, `extra`
/// further `openssl req` arguments.
fn openssl_csr(dir: &Path, cn: &str, key: &[&str], extra: &[&str]) -> Vec<u8> {
    let out = dir.join("req.der");
    let status = Command::new("openssl")
        .args(["req", "-new", "-nodes", "-outform", "DER", "-newkey"])
        .args(key)
        .arg("-keyout")
        .arg(dir.join("req.key"))
        .arg("-out")
        .arg(&out)
        .args(["-subj", &format!("/CN={cn}")])
        .args(extra)
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(status.success());
    std::fs::read(out).unwrap()
}

fn request(token: &str, csr: Vec<u8>) -> Vec<u8> {
    minicbor::to_vec(Request {
        token: token.into(),
        csr: csr.into(),
    })
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signer(d: &Path) -> Signer {
    Signer::open(
        d,
        Duration::from_secs(86_400),
        Limiter::new((1.0, 5.0), (10.0, 20.0)),
    )
    .unwrap()
}

fn nothing_issued(d: &Path, node: &str) -> bool {
    !d.join("nodes").join(node).join("issued").exists()
}

#[test]
fn bad_tokens_are_refused_and_nothing_is_signed() {
    let Some(dir) = domain() else { return };
    let d = dir.path().join("d");
    let s = signer(&d);
    let good = fluidlet::enrol::ensure_key(&dir.path().join("k")).unwrap();
    let csr =
        |cn: &str| fluidlet::enrol::csr(&fluidlet::model::Id::new(cn).unwrap(), &good).unwrap();

    // Forged: well-formed, never minted.
    let forged = "ab".repeat(32);
    assert_eq!(
        s.handle_unlimited(&request(&forged, csr("gw-a")), now()),
        Err(Refusal::UnknownToken)
    );
    assert_eq!(
        s.handle_unlimited(&request("not hex", csr("gw-a")), now()),
        Err(Refusal::UnknownToken)
    );
    // Expired.
    let t = token(&d, &["gw-a", "60"]);
    assert_eq!(
        s.handle_unlimited(&request(&t, csr("gw-a")), now() + 120),
        Err(Refusal::TokenExpired)
    );
    // Wrong node: a token for gw-b, a CSR for gw-a (and the other way round: a prefix).
    let t = token(&d, &["gw-b"]);
    assert!(matches!(
        s.handle_unlimited(&request(&t, csr("gw-a")), now()),
        Err(Refusal::WrongNode { .. })
    ));
    let batch = token(&d, &["site1-*", "3600", "2"]);
    assert!(matches!(
        s.handle_unlimited(&request(&batch, csr("site2-x")), now()),
        Err(Refusal::WrongNode { .. })
    ));
    assert!(nothing_issued(&d, "gw-a") && nothing_issued(&d, "site2-x"));
    // Reused: the token for gw-b signs once; a prefix token signs USES ids, each once.
    assert!(s.handle_unlimited(&request(&t, csr("gw-b")), now()).is_ok());
    assert_eq!(
        s.handle_unlimited(&request(&t, csr("gw-b")), now()),
        Err(Refusal::TokenUsed)
    );
    assert!(s
        .handle_unlimited(&request(&batch, csr("site1-a")), now())
        .is_ok());
    assert_eq!(
        s.handle_unlimited(&request(&batch, csr("site1-a")), now()),
        Err(Refusal::AlreadyEnrolled("site1-a".into()))
    );
    assert!(s
        .handle_unlimited(&request(&batch, csr("site1-b")), now())
        .is_ok());
    assert_eq!(
        s.handle_unlimited(&request(&batch, csr("site1-c")), now()),
        Err(Refusal::TokenUsed)
    );
    assert!(nothing_issued(&d, "site1-c"));
    // A revoked id gets nothing, even with a fresh token minted before the revocation.
    let t = token(&d, &["gw-r"]);
    std::fs::write(d.join("revoked"), "gw-r\n").unwrap();
    assert_eq!(
        s.handle_unlimited(&request(&t, csr("gw-r")), now()),
        Err(Refusal::Revoked("gw-r".into()))
    );
    assert!(nothing_issued(&d, "gw-r"));
}

#[test]
fn bad_csrs_and_floods_are_refused_and_nothing_is_signed() {
    let Some(dir) = domain() else { return };
    let d = dir.path().join("d");
    let s = signer(&d);
    let t = token(&d, &["gw-a"]);
    let p256 = ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    // Another CN than the token's node.
    let other = openssl_csr(dir.path(), "gw-z", &p256, &[]);
    assert!(matches!(
        s.handle_unlimited(&request(&t, other), now()),
        Err(Refusal::WrongNode { .. })
    ));
    // A weak key (RSA 1024) and a key on another curve.
    let rsa = openssl_csr(dir.path(), "gw-a", &["rsa:1024"], &[]);
    assert!(matches!(
        s.handle_unlimited(&request(&t, rsa), now()),
        Err(Refusal::WeakKey(_))
    ));
    let p384 = openssl_csr(
        dir.path(),
        "gw-a",
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        &[],
    );
    assert!(matches!(
        s.handle_unlimited(&request(&t, p384), now()),
        Err(Refusal::WeakKey(_))
    ));
    // Extensions asking for CA rights, and any other extension request.
    let ca = openssl_csr(
        dir.path(),
        "gw-a",
        &p256,
        &["-addext", "basicConstraints=critical,CA:TRUE"],
    );
    assert_eq!(
        s.handle_unlimited(&request(&t, ca), now()),
        Err(Refusal::AsksForCa)
    );
    let san = openssl_csr(
        dir.path(),
        "gw-a",
        &p256,
        &["-addext", "subjectAltName=DNS:broker"],
    );
    assert!(matches!(
        s.handle_unlimited(&request(&t, san), now()),
        Err(Refusal::Attributes(_))
    ));
    // A CN that is not a node id; a signature that does not verify.
    let slash = openssl_csr(dir.path(), "gw\\/a", &p256, &[]);
    assert!(matches!(
        s.handle_unlimited(&request(&t, slash), now()),
        Err(Refusal::BadCsr(_))
    ));
    let mut broken = openssl_csr(dir.path(), "gw-a", &p256, &[]);
    let last = broken.len() - 3;
    broken[last] ^= 0x55;
    assert!(matches!(
        s.handle_unlimited(&request(&t, broken), now()),
        Err(Refusal::BadCsr(_))
    ));
    // 1 MB of junk, and junk within the size bound.
    let junk = vec![0x5a_u8; 1 << 20];
    assert_eq!(
        s.handle_unlimited(&junk, now()),
        Err(Refusal::TooLarge(1 << 20))
    );
    assert!(matches!(
        s.handle_unlimited(&junk[..4000], now()),
        Err(Refusal::Malformed(_))
    ));
    assert!(matches!(
        s.handle_unlimited(&request(&t, junk[..4000].to_vec()), now()),
        Err(Refusal::BadCsr(_))
    ));
    assert!(nothing_issued(&d, "gw-a") && nothing_issued(&d, "gw-z"));
    // After all that the token is still good: nothing above used it.
    let good = openssl_csr(dir.path(), "gw-a", &p256, &[]);
    let chain = s
        .handle_unlimited(&request(&t, good), now())
        .expect("signed");
    assert_eq!(chain.len(), 2);

    // A flood from one address: the first few get an answer, the rest are refused before
    // any check (burst 5 per peer), and another address is still served.
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let answers: Vec<_> = (0..20)
        .map(|_| s.handle(peer, &request(&"cd".repeat(32), vec![]), now()))
        .collect();
    let limited = answers
        .iter()
        .filter(|a| **a == Err(Refusal::RateLimited))
        .count();
    assert_eq!(limited, 15, "{answers:?}");
    let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    assert_ne!(
        s.handle(other, &request(&"cd".repeat(32), vec![]), now()),
        Err(Refusal::RateLimited)
    );
}

/// `cert`'s serial number, as `domain.sh list` prints it.
fn serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .expect("openssl x509");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A gateway whose certificate is short-lived rotates it, more than once, while a consumer
/// streams reservations at it: every reservation answered OK is in the provider's tables,
/// the provider connected to the broker exactly once more per rotation (mosquitto's log), and
/// each rotation made a new key and certificate in place of the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_rotates_during_a_stream_of_reservations_and_nothing_is_lost() {
    let Some(d) = TlsDomain::start() else { return };
    // The signer backdates a certificate by an hour (gateway clocks drift): its life is
    // 3600 s + SECONDS, and renew_at 0.9 of it falls (3600 + 404) * 0.9 - 3600 = 3.6 s after
    // it was issued.
    let signer = SignerProcess::start_with(d.dir.path(), &["--seconds", "404"]);
    let gw = tempfile::tempdir().unwrap();
    let tls_dir = gw.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::copy(d.dir.path().join("ca-bundle.pem"), tls_dir.join("ca.pem")).unwrap();
    let token_file = gw.path().join("token");
    std::fs::write(&token_file, token(d.dir.path(), &["gw-r"])).unwrap();
    let files = fluidlet::config::TlsFiles {
        ca: tls_dir.join("ca.pem"),
        cert: tls_dir.join("node.pem"),
        key: tls_dir.join("node.key"),
    };
    let mut cfg =
        fluidlet_tests::provider_config("gw-r", &d.domain, d.port, &gw.path().join("data"));
    // A pool large enough for the whole stream, and limits that do not get in its way.
    let offer = &mut cfg.offers[0];
    offer.resources.cpu = 10_000_000;
    offer.resources.memory = 1 << 44;
    offer.resources.pods = 100_000;
    cfg.limits.pending_per_buyer = 100_000;
    cfg.limits.sender_rate = 100_000;
    cfg.limits.sender_burst = 100_000;
    cfg.tls = Some(files.clone());
    cfg.enrol = Some(EnrolConfig {
        signer_host: "127.0.0.1".into(),
        signer_port: signer.port,
        token: token_file.clone(),
        renew_at: 0.9,
    });
    let provider_socket = cfg.control_socket.clone();
    let provider = start(cfg, None).await;
    let first_cert = std::fs::read(&files.cert).unwrap();
    let first_key = std::fs::read(&files.key).unwrap();
    let first_serial = serial(&files.cert);

    let cd = tempfile::tempdir().unwrap();
    let mut ccfg = d.config("carol", d.enrol("carol"), cd.path());
    ccfg.reserve_timeout = Duration::from_millis(500);
    let consumer = start(ccfg, None).await;
    let mut bought = Vec::new();
    let mut failed = Vec::new();
    let began = std::time::Instant::now();
    while began.elapsed() < Duration::from_secs(12) {
        match consumer.acquire(&fluidlet_tests::want(500, 1)).await {
            Ok(c) => bought.push(c.id),
            Err(e) => failed.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rotations = provider.metrics().certificate_rotations;
    assert!(
        rotations >= 2,
        "{rotations} rotations in 12 s; signer: {}",
        signer.log()
    );
    // A RESERVE the broker delivers while the provider is between its DISCONNECT and the
    // SUBACK of its new connection (a few ms, clean sessions) reaches nobody; the consumer,
    // which heard the provider's advert again meanwhile, asks once more instead of taking
    // the silence for a lie: no purchase fails.
    assert!(failed.is_empty(), "purchases failed: {failed:?}");
    assert!(bought.len() > 50, "only {} purchases", bought.len());
    // Every reservation answered OK is a contract in the provider's tables.
    let sold: std::collections::HashSet<_> = provider
        .tables()
        .contracts()
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for id in &bought {
        assert!(sold.contains(id), "contract {id} answered but not stored");
    }

    // No more rotations (the signer is gone), then one connection per rotation plus the
    // first, by the broker's count and the agent's.
    drop(signer);
    // A rotation whose answer left the signer just before it was killed may still finish:
    // settled is the same count twice, a second apart.
    let mut settled = (u64::MAX, 0);
    for _ in 0..20 {
        let mut now = (0, 0);
        eventually("the provider's session to settle", || {
            let m = provider.metrics();
            let st = provider.broker_status();
            now = (m.certificate_rotations, st.connects);
            st.connected && st.connects == 1 + m.certificate_rotations
        })
        .await;
        if now == settled {
            break;
        }
        settled = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (rotations, connects) = settled;
    let log = d.broker_log();
    // The broker names a client by its certificate's CN (use_identity_as_username).
    let me = " as gw-r ";
    let broker_connects = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(me))
        .count() as u64;
    assert_eq!(
        broker_connects,
        1 + rotations,
        "{connects} connects for {rotations} rotations; broker log:\n{log}"
    );

    // New key, new certificate (another serial), both owner-only, nothing left over.
    assert_ne!(std::fs::read(&files.key).unwrap(), first_key);
    assert_ne!(std::fs::read(&files.cert).unwrap(), first_cert);
    assert_ne!(serial(&files.cert), first_serial);
    use std::os::unix::fs::PermissionsExt;
    for f in [&files.key, &files.cert] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let left: Vec<_> = std::fs::read_dir(&tls_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".next") || n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The signer kept each certificate it issued: the first and one per rotation, and maybe
    // one more whose answer it was killed before sending.
    let issued = std::fs::read_dir(d.dir.path().join("nodes/gw-r/issued"))
        .unwrap()
        .count() as u64;
    assert!(
        (1 + rotations..=2 + rotations).contains(&issued),
        "{issued} issued, {rotations} rotations"
    );

    // The certificate in use, close to its expiry (404 s of life left at most): its not-after
    // in the metrics, and a WARNING in `fluidlet status`, as text and JSON.
    let not_after = {
        let pem = std::fs::read(&files.cert).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
            .unwrap();
        fluidlet::tls::identity(&der).unwrap().not_after
    };
    let m = provider.metrics();
    assert_eq!(m.certificate_not_after, Some(not_after));
    let text = fluidlet::metrics::render(&m, "gw-r");
    assert!(
        text.contains(&format!(
            "fluidlet_certificate_expiry_timestamp_seconds{{node=\"gw-r\"}} {not_after}"
        )) && text.contains(&format!(
            "fluidlet_certificate_rotations_total{{node=\"gw-r\"}} {rotations}"
        )),
        "{text}"
    );
    let socket = provider_socket;
    let mut out = Vec::new();
    fluidlet::cli::status(Path::new("unused"), Some(&socket), false, &mut out)
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("WARNING: the certificate expires in 0 days")
            && out.contains(&format!("({rotations} rotations since start)")),
        "{out}"
    );
    let mut json = Vec::new();
    fluidlet::cli::status(Path::new("unused"), Some(&socket), true, &mut json)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(
        v["certificate_warning"], "the certificate expires in 0 days",
        "{v}"
    );
    assert_eq!(v["metrics"]["certificate_not_after"], not_after);

    consumer.shutdown().await;
    provider.shutdown().await;
}

/// Re-enrolment over mutual TLS: a node renews with its certificate; once revoked it is
/// refused, with the reason in the signer's log, and nothing is signed; and another node's
/// certificate cannot renew for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_cannot_re_enrol() {
    let Some(d) = TlsDomain::start() else { return };
    let signer = SignerProcess::start(d.dir.path());
    let gw = tempfile::tempdir().unwrap();
    std::fs::copy(d.dir.path().join("ca-bundle.pem"), gw.path().join("ca.pem")).unwrap();
    let token_file = gw.path().join("token");
    std::fs::write(&token_file, token(d.dir.path(), &["gw-x"])).unwrap();
    let files = fluidlet::config::TlsFiles {
        ca: gw.path().join("ca.pem"),
        cert: gw.path().join("node.pem"),
        key: gw.path().join("node.key"),
    };
    let e = EnrolConfig {
        signer_host: "127.0.0.1".into(),
        signer_port: signer.port,
        token: token_file,
        renew_at: 0.66,
    };
    let id = fluidlet::model::Id::new("gw-x").unwrap();
    fluidlet::enrol::enrol(&id, &files, &e).expect("enrolled");
    // Before the revocation it renews (the rotation path works for this node).
    fluidlet::enrol::renew(&id, &files, &e).expect("renewed");
    let issued = || {
        std::fs::read_dir(d.dir.path().join("nodes/gw-x/issued"))
            .unwrap()
            .count()
    };
    assert_eq!(issued(), 2);
    let (code, _, err) = domain_sh(&["revoke", d.dir.path().to_str().unwrap(), "gw-x"]);
    assert_eq!(code, Some(0), "{err}");
    let cert = std::fs::read(&files.cert).unwrap();
    let err = fluidlet::enrol::renew(&id, &files, &e)
        .unwrap_err()
        .to_string();
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(
        std::fs::read(&files.cert).unwrap(),
        cert,
        "nothing replaced"
    );
    assert_eq!(issued(), 2, "nothing signed");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        signer
            .log()
            .contains("re-enrolment of gw-x: refused: node id \"gw-x\" was revoked"),
        "{}",
        signer.log()
    );
    // Another node's certificate cannot renew for gw-x.
    let carol = d.enrol("carol");
    let stolen = fluidlet::config::TlsFiles {
        ca: files.ca.clone(),
        cert: carol.cert.clone(),
        key: carol.key.clone(),
    };
    let err = fluidlet::enrol::renew(&id, &stolen, &e)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"carol\"") && err.contains("gw-x"), "{err}");
    assert_eq!(issued(), 2, "nothing signed");
}
