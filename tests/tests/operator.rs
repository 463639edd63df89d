//! An operator's first week (issue 21 §3 and §4): the shipped files fit together and list
//! every field, and each bad input an operator is likely to make gets an error in words that
//! names the file and the field: no Rust Debug text (`Some(..)`, `Os { .. }`, struct braces).

use fluidlet::cli;
use fluidlet::config::Config;
use fluidlet::model::{Id, ReserveRequest};
use fluidlet::wire::Body;
use fluidlet_tests::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// No Debug text reaches the operator.
fn assert_words(text: &str) {
    for bad in [
        "Some(", "None", "{ ", " }", "(\"", "Os {", ", kind: ", "Box(",
    ] {
        assert!(!text.contains(bad), "Debug text {bad:?} in: {text}");
    }
}

/// The fields the config parser accepts in `section` (empty: the top level), read from the
/// parser's own refusal of an unknown one.
fn parser_fields(section: &str) -> BTreeSet<String> {
    let base =
        "node_id = \"n\"\ndomain = \"d\"\nbroker = \"mqtt://127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n";
    let offer = "id = \"o\"\narchitecture = \"arm64\"\ncpu_millicores = 1\nmemory = 1\npods = 1\nprice = \"1\"\ncurrency = \"EUR\"\n";
    let text = match section {
        "" => format!("zz_bogus = 1\n{base}"),
        "offer" => format!("{base}[[offer]]\nzz_bogus = 1\n{offer}"),
        s if s.starts_with("offer.") => {
            format!("{base}[[offer]]\n{offer}[{s}]\nzz_bogus = 1\n")
        }
        s => format!("{base}[{s}]\nzz_bogus = 1\n"),
    };
    let e = Config::from_toml(&text).unwrap_err().to_string();
    let list = e
        .split("expected one of ")
        .nth(1)
        .or_else(|| e.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("[{section}]: {e}"));
    let list = list.lines().next().unwrap_or_default();
    list.replace(" or ", ", ")
        .split(", ")
        .map(|f| f.trim().trim_matches('`').to_owned())
        .filter(|f| !f.is_empty())
        .collect()
}

/// The keys packaging/agent.toml names in `section`, set or commented out.
fn shipped_fields() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("packaging/agent.toml")).unwrap();
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let l = line.trim_start().trim_start_matches('#').trim();
        if let Some(h) = l.strip_prefix('[') {
            let name: String = h
                .trim_start_matches('[')
                .chars()
                .take_while(|c| *c != ']')
                .collect();
            if name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
            {
                section = name;
            }
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                out.insert(if section.is_empty() {
                    k.to_owned()
                } else {
                    format!("{section}.{k}")
                });
            }
        }
    }
    out
}

#[test]
fn the_shipped_config_names_every_field_the_parser_accepts() {
    let shipped = shipped_fields();
    let mut missing = Vec::new();
    for section in [
        "",
        "tls",
        "consumer",
        "provider",
        "limits",
        "metrics",
        "fabric",
        "enrol",
        "offer",
        "offer.partition",
        "offer.gpu",
        "offer.location",
    ] {
        let fields = parser_fields(section);
        assert!(!fields.is_empty(), "[{section}] has fields");
        for f in fields {
            // Sections are tables, listed by their header.
            if [
                "tls", "consumer", "provider", "limits", "metrics", "fabric", "offer", "enrol",
            ]
            .contains(&f.as_str())
                && section.is_empty()
            {
                continue;
            }
            let key = if section.is_empty() {
                f.clone()
            } else {
                format!("{section}.{f}")
            };
            let table =
                section == "offer" && ["partition", "gpu", "location"].contains(&f.as_str());
            if !(shipped.contains(&key) || table) {
                missing.push(key);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "packaging/agent.toml does not name {missing:?}"
    );
    let text = std::fs::read_to_string(repo().join("packaging/agent.toml")).unwrap();
    assert!(
        !text.contains("mint-certs"),
        "names a script that does not exist"
    );
    Config::from_toml(&text).expect("the shipped config parses");
}

/// The shipped provider config and the documented first intent, over a broker: the intent
/// is placed (it was refused when it asked for more than the offer sells to one buyer).
#[tokio::test]
async fn the_shipped_config_sells_what_the_documented_intent_asks_for() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let d = fresh_domain();
    let pdir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo().join("packaging/agent.toml")).unwrap();
    let mut text = String::new();
    let mut in_tls = false;
    for line in shipped.lines() {
        if line.starts_with('[') {
            in_tls = line.starts_with("[tls]");
        }
        let key = line.split('=').next().unwrap_or_default().trim();
        let line = match key {
            _ if in_tls => continue,
            "domain" => format!("domain = \"{d}\""),
            "broker" => format!("broker = \"mqtt://127.0.0.1:{}\"", b.port),
            "data_dir" => format!("data_dir = \"{}\"", pdir.path().display()),
            _ => line.to_owned(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    let cfg = Config::from_toml(&text).expect("the shipped config, on loopback");
    let p = start(cfg, None).await;
    let cdir = tempfile::tempdir().unwrap();
    let c = start(config("cons", &d, b.port, cdir.path()), None).await;
    let file = repo().join("docs/examples/intent.toml");
    let spec = fluidlet::orchestrator::parse_intent(
        &std::fs::read_to_string(&file).unwrap(),
        file.parent().unwrap(),
    )
    .unwrap();
    let i = c.submit_intent(spec).await.unwrap();
    assert_eq!(
        i.state,
        fluidlet::model::IntentState::Placed,
        "the documented intent on the shipped offer: {:?}",
        i.error
    );
    c.shutdown().await;
    p.shutdown().await;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn plain(dir: &Path, extra_top: &str, rest: &str) -> String {
    format!(
        "node_id = \"gw-1\"\ndomain = \"lab\"\nbroker = \"mqtt://127.0.0.1:1\"\ndata_dir = \"{}\"\n{extra_top}\n{rest}",
        dir.join("data").display()
    )
}

const OFFER: &str = "[[offer]]\nid = \"edge-pool\"\narchitecture = \"arm64\"\ncpu_millicores = 2000\nmemory = \"2Gi\"\npods = 10\nprice = \"1\"\ncurrency = \"EUR\"\n[offer.partition]\ncpu_min = 500\ncpu_step = 500\nmemory_min = \"512Mi\"\nmemory_step = \"512Mi\"\npods_min = 1\npods_step = 1\n";

fn check(path: &Path) -> Result<String, String> {
    let mut out = Vec::new();
    match cli::check(path, &mut out) {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn check_finds_what_run_would_and_says_it_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // A good config: check prints what it checked, one line per part.
    let good = write(d, "good.toml", &plain(d, "", OFFER));
    let out = check(&good).unwrap();
    for part in [
        "node      gw-1",
        "broker",
        "data_dir",
        "offer     edge-pool",
        "limits",
        "fabric    dry-run",
        "metrics   off",
    ] {
        assert!(out.contains(part), "check prints {part:?}:\n{out}");
    }
    assert!(out.contains("2000m cpu, 2 GiB memory, 10 pods"), "{out}");
    assert_words(&out);

    // Each bad input: the error names the file (or path) and the field, in words.
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("log.toml", plain(d, "log = \"verbose+++\"", OFFER), &["log.toml", "`log`", "not a level"]),
        ("cur.toml", plain(d, "", &OFFER.replace("\"EUR\"", "\"euro!\""), ), &["cur.toml", "currency", "ISO 4217"]),
        ("arch.toml", plain(d, "", &OFFER.replace("\"arm64\"", "\"sparc\"")), &["arch.toml", "architecture", "amd64, arm64, arm"]),
        ("metrics.toml", plain(d, "", &format!("[metrics]\ntextfile = \"{}/nowhere/f.prom\"\n", d.display())), &["metrics.textfile", "does not exist"]),
        ("file.toml", format!("node_id = \"gw-1\"\ndomain = \"lab\"\nbroker = \"mqtt://127.0.0.1:1\"\ndata_dir = \"{}/file.toml/data\"\n", d.display()), &["data_dir", "is not a directory"]),
    ];
    for (name, text, words) in cases {
        let p = write(d, name, &text);
        let e = check(&p).expect_err(name);
        for w in words {
            assert!(e.contains(w), "{name}: {w:?} in: {e}");
        }
        assert_words(&e);
    }
}

#[tokio::test]
async fn check_and_start_refuse_tables_that_are_not_this_nodes_or_in_use() {
    let Some(b) = broker(BrokerKind::Embedded) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dom = fresh_domain();
    let cfg = provider_config("gw-1", &dom, b.port, &d.join("data"));
    let offer = cfg.offers[0].clone();
    let p = start(cfg.clone(), None).await;

    // A second agent on the same data_dir: says another agent runs, with its pid.
    let e = fluidlet::Agent::start(cfg.clone(), None)
        .await
        .err()
        .expect("a second agent on one data_dir is refused")
        .to_string();
    assert!(e.contains("another fluidlet agent"), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    assert_words(&e);

    // Sell 1.5 CPUs, then stop.
    let mut r = Rogue::connect(b.port, &dom, "buyer").await;
    let f = flavours(&p)[0].clone();
    let mut part = f.resources;
    part.cpu = 1500;
    part.memory = 1 << 30;
    part.pods = 1;
    r.send(
        "gw-1",
        Body::ReserveFlavour(ReserveRequest {
            transaction: Id::new("buyer.t1").unwrap(),
            flavour: f.id.clone(),
            buyer: Id::new("buyer").unwrap(),
            partition: Some(part),
        }),
    )
    .await;
    assert!(matches!(r.recv().await.body, Body::Reserved(_)));
    p.shutdown().await;

    let toml_of = |node: &str, cpu: u64| {
        format!(
            "node_id = \"{node}\"\ndomain = \"{dom}\"\nbroker = \"mqtt://127.0.0.1:{}\"\ndata_dir = \"{}\"\n[[offer]]\nid = \"{}\"\narchitecture = \"{}\"\ncpu_millicores = {cpu}\nmemory = \"8Gi\"\npods = 110\nprice = \"2\"\ncurrency = \"EUR\"\n[offer.partition]\ncpu_min = 500\ncpu_step = 500\nmemory_min = \"1Gi\"\nmemory_step = \"1Gi\"\npods_min = 1\npods_step = 1\n",
            b.port,
            cfg.data_dir.display(),
            offer.id,
            offer.architecture
        )
    };
    // The same tables, checked: fine, and counted.
    let same = write(d, "same.toml", &toml_of("gw-1", 4000));
    let out = check(&same).unwrap();
    assert!(
        out.contains("tables of gw-1, 1 contracts on record"),
        "{out}"
    );
    // The offer shrunk below what is sold: check says so, in units.
    let shrunk = write(d, "shrunk.toml", &toml_of("gw-1", 1000));
    let e = check(&shrunk).unwrap_err();
    assert!(
        e.contains("offers less than its live reservations hold (1500m cpu, 1 GiB memory, 1 pods)"),
        "{e}"
    );
    assert_words(&e);
    // Another node's config on these tables.
    let other = write(d, "other.toml", &toml_of("gw-2", 4000));
    let e = check(&other).unwrap_err();
    assert!(
        e.contains("holds the tables of node gw-1, not of gw-2"),
        "{e}"
    );
    assert_words(&e);
}

#[tokio::test]
async fn bad_intent_files_are_refused_before_they_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "app.yaml", "apiVersion: apps/v1\nkind: Deployment\n");
    write(d, "notes.txt", "just text\n");
    let intent = |manifest: &str, arch: &str| {
        format!("name = \"cam\"\nmanifest = \"{manifest}\"\n[resources]\ncpu_millicores = 500\nmemory = \"1Gi\"\narchitecture = \"{arch}\"\n")
    };
    let cfg = write(d, "agent.toml", &plain(d, "", ""));
    for (name, text, words) in [
        (
            "shadow.toml",
            intent("/etc/shadow", "arm64"),
            &["shadow.toml", "manifest", "relative"][..],
        ),
        (
            "up.toml",
            intent("../app.yaml", "arm64"),
            &["manifest", "without `..`"][..],
        ),
        (
            "text.toml",
            intent("notes.txt", "arm64"),
            &["notes.txt", "not a Kubernetes manifest"][..],
        ),
        (
            "arch.toml",
            intent("app.yaml", "sparc"),
            &["arch.toml", "resources.architecture"][..],
        ),
    ] {
        let f = write(d, name, &text);
        let mut out = Vec::new();
        let e = cli::intent_submit(&f, &cfg, None, &mut out)
            .await
            .expect_err(name)
            .to_string();
        for w in words {
            assert!(e.contains(w), "{name}: {w:?} in: {e}");
        }
        assert_words(&e);
    }
}

/// `domain.sh node DIR ID DAYS` with a DAYS that is not a positive number says so and leaves
/// nothing behind (it exited 1 silently, leaving node.key, node.csr and node.ext; DAYS=0 made
/// an expired certificate).
#[test]
fn domain_sh_refuses_a_bad_days_and_leaves_nothing() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: openssl not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let sh = |args: &[&str]| {
        std::process::Command::new("sh")
            .arg(repo().join("broker-config/domain.sh"))
            .args(args)
            .output()
            .unwrap()
    };
    // `init` also builds the plugin; only the CA matters here, so a missing gcc is fine.
    let _ = sh(&["init", d, "lab", "18883", "127.0.0.1"]);
    if !dir.path().join("domain-ca.key").exists() {
        eprintln!("SKIPPED: domain.sh init could not run here");
        return;
    }
    for days in ["-5", "abc", "0", "1.5"] {
        let out = sh(&["node", d, "gw-1", days]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "DAYS {days} accepted");
        assert!(err.contains("a whole number of days"), "DAYS {days}: {err}");
        assert!(
            !dir.path().join("nodes/gw-1").exists(),
            "DAYS {days} left files"
        );
    }
    assert!(sh(&["node", d, "gw-1", "30"]).status.success());
    assert!(dir.path().join("nodes/gw-1/node.pem").exists());
}
