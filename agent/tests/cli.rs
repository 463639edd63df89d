//! The `fluidlet` command as a user runs it.

use std::process::Command;

fn fluidlet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fluidlet"))
        .args(args)
        .output()
        .expect("run fluidlet")
}

/// The README's first command: the demo runs the 31 steps of the seed workflow and exits 0.
#[test]
fn demo_prints_every_step_from_1_to_31_and_exits_0() {
    let out = fluidlet(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in 1..=31 {
        assert!(
            stdout.contains(&format!("step {step:>2} ")),
            "step {step} missing from:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("Node Active"),
        "provider allocation shown:\n{stdout}"
    );
    assert!(
        stdout.contains("VirtualNode Active"),
        "consumer allocation shown:\n{stdout}"
    );
}

#[test]
fn check_reports_the_faulty_field_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "node_id = \"gw 1\"\ndomain = \"d1\"\nbroker = \"mqtt://127.0.0.1\"\ndata_dir = \"/tmp/x\"\n",
    )
    .unwrap();
    let out = fluidlet(&["check", "-c", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`node_id`") && err.contains("' '"), "{err}");
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "node_id = \"gw-1\"\ndomain = \"d1\"\nbroker = \"mqtt://127.0.0.1\"\ndata_dir = \"/tmp/x\"\n",
    )
    .unwrap();
    let out = fluidlet(&["check", "-c", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node      gw-1 in domain d1"));
}

#[test]
fn check_reads_the_tls_files_and_names_the_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    std::fs::write(
        &path,
        format!(
            "node_id = \"gw-1\"\ndomain = \"d1\"\nbroker = \"mqtts://broker.lan\"\n\
             data_dir = \"/tmp/x\"\n[tls]\nca = \"{}\"\ncert = \"/nonexistent/node.pem\"\n\
             key = \"/nonexistent/node.key\"\n",
            ca.display()
        ),
    )
    .unwrap();
    let out = fluidlet(&["check", "-c", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls: cannot read /nonexistent/node.pem"),
        "{err}"
    );
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = fluidlet(&["run", "-c", "/nonexistent/agent.toml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read /nonexistent/agent.toml"), "{err}");
}

/// `--version` prints the release and, when built in a git checkout, the short revision.
#[test]
fn version_prints_the_release_and_the_revision() {
    let out = fluidlet(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim_end(), fluidlet::version());
    assert!(
        text.starts_with(&format!("fluidlet {} ", env!("CARGO_PKG_VERSION")))
            || text.trim_end() == format!("fluidlet {}", env!("CARGO_PKG_VERSION")),
        "{text}"
    );
    if !fluidlet::GIT_REV.is_empty() {
        assert!(text.contains(&format!("({})", fluidlet::GIT_REV)), "{text}");
    }
}

#[test]
fn help_lists_the_commands() {
    let out = fluidlet(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "demo"] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
}

/// `run` handles SIGTERM: it stops cleanly (exit 0) and, with `--log-json`, every log line is
/// one JSON object. The broker address is unreachable on purpose: stopping must not wait for it.
#[test]
fn run_stops_cleanly_on_sigterm_and_logs_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "node_id = \"gw-1\"\ndomain = \"d1\"\nbroker = \"mqtt://127.0.0.1:9\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fluidlet"))
        .args(["run", "--log-json", "-c", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    while !first.contains("fluidlet node started") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("the agent ended before it started: {first}");
        }
        first.push_str(&line);
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(status.success(), "exit {status:?}; logs:\n{first}{rest}");
    for line in first.lines().chain(rest.lines()) {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\":"),
            "not a JSON log line: {line}"
        );
    }
    assert!(rest.contains("fluidlet node stopped"), "{rest}");
    let version = format!("\"version\":\"{}\"", fluidlet::version());
    let opening = first.lines().next().unwrap_or_default();
    assert!(
        opening.contains("fluidlet node starting") && opening.contains(&version),
        "the first log line does not name the release: {opening}"
    );
    let started = first.lines().last().unwrap_or_default();
    assert!(
        started.contains(&version),
        "the release is not in the start line: {started}"
    );
    assert!(
        dir.path().join("data").join("conf").exists(),
        "the tables were created"
    );
}

/// The control socket, as an operator uses it: a consumer agent runs as a process, and
/// `fluidlet intent submit` follows an intent to its placement; `intent list`, `status
/// --json` and `contract release` read and act on the running agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_status_and_release_through_the_control_socket() {
    use fluidlet::demo::{demo_config, demo_offer, embedded_broker, k8s_arch};
    let port = embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let domain = format!("cli{}", std::process::id());
    let mut pcfg = demo_config("cli-prov", &domain, port, dir.path()).unwrap();
    pcfg.offers.push(demo_offer(&pcfg.node_id));
    let provider = fluidlet::Agent::start(pcfg, None).await.unwrap();
    assert!(provider.connected(std::time::Duration::from_secs(10)).await);

    let cfg = dir.path().join("consumer.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"cli-cons\"\ndomain = \"{domain}\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[consumer]\nwatch_catalog = false\n",
            dir.path().join("cli-cons").display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("app.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n",
    )
    .unwrap();
    let intent = dir.path().join("intent.toml");
    std::fs::write(
        &intent,
        format!("name = \"app\"\nmanifest = \"app.yaml\"\n[resources]\ncpu_millicores = 500\nmemory = \"1Gi\"\narchitecture = \"{}\"\n", k8s_arch()),
    )
    .unwrap();
    // Killed when the test ends, also when an assertion fails first: a leaked agent would
    // hold the test's pipes (and anything the test runner inherited) open.
    let mut agent = Reap(
        Command::new(env!("CARGO_BIN_EXE_fluidlet"))
            .args(["run", "-c", cfg.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = dir.path().join("cli-cons").join("control.sock");
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let c = cfg.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = fluidlet(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The agent may still be connecting: the first submit can fail with "not connected".
    let mut submitted = run(&["intent", "submit", intent.to_str().unwrap(), "-c", c]);
    for _ in 0..50 {
        if submitted.0 || !submitted.2.contains("not connected") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        submitted = run(&["intent", "submit", intent.to_str().unwrap(), "-c", c]);
    }
    let (ok, out, err) = submitted;
    let _ = (&out, &err);
    if !ok {
        panic!("submit failed: {out}\n{err}");
    }
    for step in [1, 4, 7, 14, 22, 26, 28, 31] {
        assert!(
            out.contains(&format!("step {step:>2} ")),
            "step {step} not streamed:\n{out}"
        );
    }
    assert!(out.contains("Placed"), "{out}");

    let (ok, list, _) = run(&["intent", "list", "-c", c]);
    assert!(
        ok && list.contains("app") && list.contains("Placed"),
        "{list}"
    );
    let (ok, json, err) = run(&["status", "--json", "-c", c]);
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(st["node"], "cli-cons");
    assert_eq!(st["version"], fluidlet::version());
    assert_eq!(st["protocol_revision"], fluidlet::wire::REVISION);
    assert_eq!(st["connected"], true);
    assert_eq!(st["contracts"][0]["state"], "Active");
    assert_eq!(st["allocations"][0]["kind"], "VirtualNode");
    assert_eq!(st["intents"][0]["state"], "Placed");
    let contract = st["contracts"][0]["id"].as_str().unwrap().to_owned();
    let (ok, table, _) = run(&["status", "-c", c]);
    assert!(
        ok && table.contains(&contract)
            && table.contains("connected")
            && table.starts_with(&fluidlet::version()),
        "{table}"
    );

    let (ok, out, err) = run(&["contract", "release", &contract, "-c", c]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("Released"), "{out}");
    let id = fluidlet::model::Id::new(&contract).unwrap();
    assert_eq!(
        provider.tables().contract(&id).unwrap().unwrap().state,
        fluidlet::model::ContractState::Released
    );
    // An unknown contract is a clear error.
    let (ok, _, err) = run(&["contract", "release", "nope.c1", "-c", c]);
    assert!(!ok && err.contains("no contract nope.c1"), "{err}");

    let _ = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status();
    assert!(agent.0.wait().unwrap().success());
    provider.shutdown().await;
}

#[test]
fn check_warns_about_a_data_dir_other_users_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = data.join("db");
    std::fs::write(&db, b"tables").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = dir.path().join("agent.toml");
    let toml = format!(
        "node_id = \"gw-1\"\ndomain = \"d1\"\nbroker = \"mqtt://127.0.0.1\"\ndata_dir = \"{}\"\n",
        data.display()
    );
    std::fs::write(&path, &toml).unwrap();
    let out = fluidlet(&["check", "-c", path.to_str().unwrap()]);
    assert!(out.status.success(), "a warning is not a failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: data_dir") && err.contains("0755") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(err.contains("db") && err.contains("0644"), "{err}");
    // Owner-only: no warning.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = fluidlet(&["check", "-c", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("warning"), "{err}");
}

/// A valid config whose data_dir (not created) is under `dir`.
/// A zero-touch gateway before its first start: `check` says it will enrol rather than failing
/// on the certificate that does not exist yet; `enrol` by hand fails with the reason (here the
/// CA file it checks the signer with is missing) and writes no certificate.
#[test]
fn check_and_enrol_on_a_gateway_that_is_not_enrolled_yet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let cert = dir.path().join("tls/node.pem");
    let token = dir.path().join("token");
    std::fs::write(&token, "ab".repeat(32)).unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &path,
        format!(
            "node_id = \"gw-1\"\ndomain = \"d1\"\nbroker = \"mqtts://broker.lan\"\n\
             data_dir = \"{}\"\n[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"{}\"\n\
             key = \"{}\"\n[enrol]\nsigner = \"127.0.0.1:{port}\"\ntoken = \"{}\"\n",
            dir.path().join("data").display(),
            cert.display(),
            dir.path().join("tls/node.key").display(),
            token.display()
        ),
    )
    .unwrap();
    let out = fluidlet(&["check", "-c", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("not enrolled yet"), "{text}");
    let out = fluidlet(&["enrol", "-c", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enrol:") && err.contains("ca.pem"), "{err}");
    assert!(!cert.exists());
}

fn good_config(dir: &std::path::Path) -> String {
    format!(
        "node_id = \"gw-1\"\ndomain = \"d1\"\nbroker = \"mqtt://127.0.0.1\"\ndata_dir = \"{}\"\n",
        dir.join("data").display()
    )
}

/// Runs fluidlet with stdout on a pipe whose reader is already gone, as in `fluidlet --help |
/// head` when head has exited: every write fails with EPIPE.
fn into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_fluidlet"))
        .args(args)
        .stdout(writer)
        .output()
        .expect("run fluidlet")
}

#[test]
fn help_into_a_closed_pipe_ends_quietly() {
    let out = into_closed_pipe(&["--help"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// A command whose output cannot be written stops without a message (and without a panic's
/// status 101); it does not claim success, since its output was cut short.
#[test]
fn a_command_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, good_config(dir.path())).unwrap();
    let out = into_closed_pipe(&["check", "-c", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("fluidlet:"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
}

/// The commands are library functions: `check` called directly writes its summary to the
/// writer it is given.
#[test]
fn check_is_a_library_function_writing_to_any_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, good_config(dir.path())).unwrap();
    let mut out = Vec::new();
    fluidlet::cli::check(&path, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("node      gw-1 in domain d1"), "{text}");
}

/// A child process killed and reaped when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
