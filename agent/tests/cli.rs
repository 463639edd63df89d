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
    assert!(String::from_utf8_lossy(&out.stdout).contains("node gw-1 in domain d1"));
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = fluidlet(&["run", "-c", "/nonexistent/agent.toml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read /nonexistent/agent.toml"), "{err}");
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
    assert!(
        dir.path().join("data").join("conf").exists(),
        "the tables were created"
    );
}
