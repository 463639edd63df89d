//! The work of each `fluidlet` command, as functions a test can call. The binary
//! (`src/bin/fluidlet.rs`) parses the command line and calls one of them.
//!
//! `run` and `demo` start nodes; `check` validates a config; `doctor` checks the gateway for
//! the liqo fabric backend; `intent`, `status` and `contract`
//! send one request to a running agent over its control socket ([`crate::control`]) and print
//! what comes back.

use crate::config::Config;
use crate::control::{Client, Request, Response};
use crate::model::{Id, Intent};
use crate::AgentError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Why a command failed: the work itself, or writing its output.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// The output went to a pipe whose reader is gone (`fluidlet status | head`): nothing to
    /// report, the reader wanted no more.
    pub fn closed_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::Agent(e.into())
    }
}

impl From<crate::tls::TlsError> for CliError {
    fn from(e: crate::tls::TlsError) -> Self {
        CliError::Agent(e.into())
    }
}

/// Parses the command line into `T` as `argh::from_env` does, except that the output of
/// `--help` (and of a usage error) is written without panicking when the reader is gone:
/// `fluidlet --help | head -1` ends quietly. `Err` is the exit status to end with.
pub fn parse_args<T: argh::TopLevelCommand>() -> Result<T, ExitCode> {
    let mut args = Vec::new();
    for a in std::env::args_os() {
        match a.into_string() {
            Ok(a) => args.push(a),
            Err(a) => {
                let _ = writeln!(std::io::stderr(), "Invalid utf8: {}", a.to_string_lossy());
                return Err(ExitCode::FAILURE);
            }
        }
    }
    let Some((first, rest)) = args.split_first() else {
        let _ = writeln!(std::io::stderr(), "No program name, argv is empty");
        return Err(ExitCode::FAILURE);
    };
    let name = Path::new(first)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(first);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    T::from_args(&[name], &rest).map_err(|early| match early.status {
        Ok(()) => {
            let _ = writeln!(std::io::stdout(), "{}", early.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            let _ = writeln!(
                std::io::stderr(),
                "{}\nRun {name} --help for more information.",
                early.output
            );
            ExitCode::FAILURE
        }
    })
}

/// `fluidlet run`: loads the config, sets up logging and runs the node on `rt` until SIGINT or
/// SIGTERM.
pub fn run(config: &Path, log_json: bool, rt: &tokio::runtime::Runtime) -> Result<(), AgentError> {
    let cfg = Config::load(config)?;
    init_logs(&cfg.log, log_json);
    rt.block_on(async {
        let stop = stop_signal()
            .map_err(|e| AgentError::Other(format!("cannot install signal handlers: {e}")))?;
        crate::node::run(cfg, stop).await
    })
}

/// `fluidlet demo`: the two-node demo with an embedded broker.
#[cfg(feature = "demo")]
pub fn demo(rt: &tokio::runtime::Runtime) -> Result<(), AgentError> {
    init_logs("warn", false);
    rt.block_on(crate::demo::run()).map(|_| ())
}

/// Logs to stderr, human-readable or one JSON object per line; `RUST_LOG` overrides
/// `default`.
pub fn init_logs(default: &str, json: bool) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    let filter: tracing_subscriber::filter::Targets = spec.parse().unwrap_or_else(|e| {
        eprintln!("fluidlet: log filter {spec:?} not understood ({e}); using \"info\"");
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    // The embedded broker logs normal disconnects at ERROR: keep it quiet unless asked.
    let filter = filter.with_target("rumqttd", tracing_subscriber::filter::LevelFilter::OFF);
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let human = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
    });
    let machine = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(human)
        .with(machine)
        .with(filter)
        .init();
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that arrives while the node starts is not lost
/// (nor does it kill the process the default way, without a flush).
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// The control socket: `socket` if given, else the one `config` names.
fn socket_path(config: &Path, socket: Option<&Path>) -> Result<PathBuf, AgentError> {
    match socket {
        Some(s) => Ok(s.to_path_buf()),
        None => Ok(Config::load(config)?.control_socket),
    }
}

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::Agent(AgentError::Other(e.to_string()))
}

async fn ask(path: &Path, req: Request) -> Result<Response, CliError> {
    let mut c = Client::connect(path).await.map_err(other)?;
    c.send(&req).await.map_err(other)?;
    c.recv()
        .await
        .map_err(other)?
        .ok_or_else(|| other("the agent closed the connection"))
}

fn print_intent(out: &mut dyn Write, i: &Intent) -> std::io::Result<()> {
    writeln!(
        out,
        "{}  {:<20} {:<10?} contract {:<24} placement {}{}",
        i.id,
        i.name.as_str(),
        i.state,
        i.contract.as_ref().map_or("-", |c| c.as_str()),
        i.placement.as_ref().map_or("-", |p| p.as_str()),
        i.error
            .as_ref()
            .map_or(String::new(), |e| format!("  error: {e}")),
    )
}

/// `fluidlet intent submit`: submits the intent file `file` and prints each workflow step
/// until the intent is placed or fails.
pub async fn intent_submit(
    file: &Path,
    config: &Path,
    socket: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let text = crate::config::read_text(file, crate::config::MAX_CONFIG_FILE)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let spec = crate::orchestrator::parse_intent(&text, base)?;
    let mut c = Client::connect(&socket_path(config, socket)?)
        .await
        .map_err(other)?;
    c.send(&Request::Submit(Box::new(spec)))
        .await
        .map_err(other)?;
    while let Some(r) = c.recv().await.map_err(other)? {
        match r {
            Response::Step {
                number,
                element,
                text,
            } => {
                writeln!(out, "step {number:>2}  {:<22} {text}", element.as_str())?;
            }
            Response::Intent(i) => {
                print_intent(out, &i)?;
                return match &i.error {
                    Some(e) => Err(other(format!("intent {} failed: {e}", i.id))),
                    None => Ok(()),
                };
            }
            Response::Error(e) => return Err(other(e)),
            _ => {}
        }
    }
    Err(other(
        "the agent closed the connection before the intent ended",
    ))
}

/// `fluidlet intent list`: the intents and where they got to.
pub async fn intent_list(
    config: &Path,
    socket: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match ask(&socket_path(config, socket)?, Request::ListIntents).await? {
        Response::Intents(v) => {
            for i in &v {
                print_intent(out, i)?;
            }
            Ok(())
        }
        Response::Error(e) => Err(other(e)),
        _ => Err(other("unexpected answer")),
    }
}

/// `fluidlet intent show`: one intent.
pub async fn intent_show(
    id: &str,
    config: &Path,
    socket: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let id = Id::new(id).map_err(|e| other(format!("intent id: {e}")))?;
    match ask(&socket_path(config, socket)?, Request::ShowIntent(id)).await? {
        Response::Intent(i) => {
            print_intent(out, &i)?;
            writeln!(out, "namespace {}, needs {:?}", i.namespace, i.selector)?;
            Ok(())
        }
        Response::Error(e) => Err(other(e)),
        _ => Err(other("unexpected answer")),
    }
}

/// `fluidlet status`: the node's flavours, contracts, allocations, intents and broker
/// connection, as tables or (`json`) as JSON.
pub async fn status(
    config: &Path,
    socket: Option<&Path>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let Response::Status(st) = ask(&socket_path(config, socket)?, Request::Status).await? else {
        return Err(other("unexpected answer"));
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&st).map_err(other)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "node {} in domain {}: broker {} ({} connects{}), fabric {}",
        st.node,
        st.domain,
        if st.connected {
            "connected"
        } else {
            "DISCONNECTED"
        },
        st.connects,
        st.last_error
            .as_ref()
            .map_or(String::new(), |e| format!(", last error: {e}")),
        st.fabric
    )?;
    writeln!(out, "\nflavours:")?;
    for f in &st.flavours {
        let r = &f.resources;
        writeln!(
            out,
            "  {:<24} {}m cpu  {} MiB  {} pods  price {}",
            f.id,
            r.cpu,
            r.memory >> 20,
            r.pods,
            f.price.amount
        )?;
    }
    writeln!(out, "\ncontracts:")?;
    for k in &st.contracts {
        let r = &k.resources;
        writeln!(
            out,
            "  {:<24} {:<9?} buyer {:<16} seller {:<16} {}m cpu  {} MiB",
            k.id,
            k.state,
            k.buyer,
            k.seller,
            r.cpu,
            r.memory >> 20
        )?;
    }
    writeln!(out, "\nallocations:")?;
    for a in &st.allocations {
        writeln!(
            out,
            "  {:<24} {:<11?} {:<8?} peer {}",
            a.contract, a.kind, a.status, a.peer
        )?;
    }
    writeln!(out, "\nintents:")?;
    for i in &st.intents {
        print_intent(out, i)?;
    }
    Ok(())
}

/// `fluidlet contract release`: releases the contract `id` this node bought.
pub async fn release(
    id: &str,
    config: &Path,
    socket: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let id = Id::new(id).map_err(|e| other(format!("contract id: {e}")))?;
    match ask(&socket_path(config, socket)?, Request::Release(id)).await? {
        Response::Released(k) => {
            writeln!(out, "contract {} released ({:?})", k.id, k.state)?;
            Ok(())
        }
        Response::Error(e) => Err(other(e)),
        _ => Err(other("unexpected answer")),
    }
}

/// `fluidlet doctor`: what the liqo fabric backend needs on this gateway
/// ([`crate::fabric::doctor`]), one line per check; `Err` when a check failed.
pub fn doctor(
    path: &Path,
    rt: &tokio::runtime::Runtime,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let cfg = Config::load(path)?;
    let report = rt.block_on(crate::fabric::doctor::doctor(
        &cfg.fabric,
        &cfg.data_dir,
        &cfg.node_id,
    ));
    writeln!(out, "{report}")?;
    match report.ok() {
        true => Ok(()),
        false => Err(AgentError::Other("doctor found problems".into()).into()),
    }
}

/// `fluidlet check`: the config is valid; with TLS, the PEM files are too.
pub fn check(path: &Path, out: &mut dyn Write) -> Result<(), CliError> {
    let cfg = Config::load(path)?;
    let transport = match &cfg.tls {
        // Zero-touch, before the first start: nothing to read yet (crate::enrol).
        Some(files) if cfg.enrol.is_some() && !files.cert.exists() => format!(
            "mutual TLS, not enrolled yet: the first start enrols with the token {}",
            cfg.enrol
                .as_ref()
                .map(|e| e.token.display().to_string())
                .unwrap_or_default()
        ),
        Some(files) => {
            let loaded = crate::tls::load(files, &cfg.node_id)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            format!("mutual TLS as CN {}", loaded.identity.common_name)
        }
        None if cfg.insecure_plaintext => "PLAIN MQTT (insecure_plaintext = true)".into(),
        None => "plain MQTT on loopback".into(),
    };
    for w in crate::files::mode_warnings(&cfg.data_dir) {
        eprintln!("warning: {w}");
    }
    writeln!(
        out,
        "{}: node {} in domain {}, broker {}:{} ({transport}), data in {}, {} offer(s)",
        path.display(),
        cfg.node_id,
        cfg.domain,
        cfg.broker.host,
        cfg.broker.port,
        cfg.data_dir.display(),
        cfg.offers.len()
    )?;
    Ok(())
}
