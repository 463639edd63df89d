//! docs/operations.md, "First domain in ten minutes", replayed as written (issue 21 §4):
//! its shell lines are run in order (domain.sh and mosquitto as themselves, each `fluidlet`
//! command through the same library function the binary calls), its TOML blocks are written
//! to the files they name, with `/tmp/lab` moved to a fresh directory and the port to a free
//! one. A step the test does not know how to replay fails the test, so the section cannot
//! grow a command nobody ran.

use fluidlet::cli;
use fluidlet::config::Config;
use fluidlet::Agent;
use fluidlet_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The section's code blocks, in order: (language, text).
fn blocks() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let start = doc
        .find("## First domain in ten minutes")
        .expect("the section exists");
    let rest = &doc[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = Vec::new();
    let mut lines = section.lines();
    while let Some(l) = lines.next() {
        if let Some(lang) = l.strip_prefix("```").filter(|l| !l.is_empty()) {
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            out.push((lang.to_owned(), body.join("\n")));
        }
    }
    out
}

struct Lab {
    dir: tempfile::TempDir,
    port: u16,
}

impl Lab {
    fn fix(&self, s: &str) -> String {
        s.replace("/tmp/lab", self.dir.path().to_str().unwrap())
            .replace("18883", &self.port.to_string())
    }
}

#[tokio::test]
async fn the_first_domain_in_ten_minutes_works_as_written() {
    if TlsDomain::start().is_none() {
        return; // mosquitto, openssl or the plugin's headers missing (outside CI)
    }
    let blocks = blocks();
    assert!(blocks.len() >= 5, "the section has its steps: {blocks:?}");
    let lab = Lab {
        dir: tempfile::tempdir().unwrap(),
        port: free_port(),
    };
    {
        use std::os::unix::fs::PermissionsExt;
        // mosquitto started as root drops to its own user, which must reach the files.
        std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut broker: Option<Child> = None;
    let mut agents: Vec<Agent> = Vec::new();
    let mut replayed = Vec::new();
    for (lang, body) in &blocks {
        let body = lab.fix(body);
        match lang.as_str() {
            "toml" => {
                let first = body.lines().next().unwrap_or_default();
                let path = first
                    .strip_prefix("# ")
                    .expect("a TOML block names its file");
                std::fs::write(path, &body).unwrap();
                replayed.push(format!("wrote {path}"));
            }
            "sh" => {
                for line in body.lines().map(str::trim) {
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["broker-config/domain.sh", args @ ..] => {
                            let out = Command::new("sh")
                                .arg(repo().join("broker-config/domain.sh"))
                                .args(args)
                                .output()
                                .unwrap();
                            assert!(
                                out.status.success(),
                                "{line}: {}",
                                String::from_utf8_lossy(&out.stderr)
                            );
                        }
                        ["mosquitto", "-c", conf] => {
                            broker = Some(
                                Command::new("mosquitto")
                                    .args(["-c", conf])
                                    .stdout(Stdio::null())
                                    .stderr(Stdio::null())
                                    .spawn()
                                    .unwrap(),
                            );
                            let port = lab.port;
                            assert!(
                                within(WAIT, || std::net::TcpStream::connect(("127.0.0.1", port))
                                    .is_ok())
                                .await,
                                "{line}: the broker listens"
                            );
                        }
                        ["fluidlet", "check", "-c", conf] => {
                            let mut out = Vec::new();
                            cli::check(Path::new(conf), &mut out)
                                .unwrap_or_else(|e| panic!("{line}: {e}"));
                            let out = String::from_utf8(out).unwrap();
                            assert!(out.contains("the agent would start with"), "{out}");
                            assert!(out.contains("mutual TLS as CN gw-"), "{out}");
                        }
                        ["fluidlet", "run", "-c", conf] => {
                            let cfg = Config::load(Path::new(conf)).unwrap();
                            agents.push(start(cfg, None).await);
                        }
                        ["fluidlet", "intent", "submit", file, "-c", conf] => {
                            let mut out = Vec::new();
                            cli::intent_submit(&repo().join(file), Path::new(conf), None, &mut out)
                                .await
                                .unwrap_or_else(|e| {
                                    panic!("{line}: {e}\n{}", String::from_utf8_lossy(&out))
                                });
                            let out = String::from_utf8(out).unwrap();
                            assert!(out.contains("Placed"), "{line}:\n{out}");
                        }
                        ["fluidlet", "status", "-c", conf] => {
                            let mut out = Vec::new();
                            cli::status(Path::new(conf), None, false, &mut out)
                                .await
                                .unwrap_or_else(|e| panic!("{line}: {e}"));
                            let out = String::from_utf8(out).unwrap();
                            assert!(out.contains("gw-prov-01.c"), "{line}: a contract\n{out}");
                        }
                        _ => {
                            panic!("the walk-through has a step this test does not replay: {line}")
                        }
                    }
                    replayed.push(line.to_owned());
                }
            }
            other => panic!("a {other} block in the walk-through"),
        }
    }
    eprintln!("replayed: {replayed:#?}");
    for want in ["fluidlet run", "fluidlet intent submit", "fluidlet status"] {
        assert!(
            replayed.iter().any(|l| l.starts_with(want)),
            "the walk-through has `{want}`: {replayed:?}"
        );
    }
    for a in agents {
        a.shutdown().await;
    }
    if let Some(mut b) = broker {
        let _ = b.kill();
        let _ = b.wait();
    }
}
