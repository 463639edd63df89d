//! The `fluidlet` command: parses the command line, sets up logging, calls the library.
//!
//! It runs on tokio's current-thread runtime: a gateway agent handles one message at a
//! time by design (see `node`), and one thread keeps the footprint small.

use argh::FromArgs;
use fluidlet::{config::Config, node};
use std::path::PathBuf;
use std::process::ExitCode;

/// fluidlet: makes this device a node of a FLUIDOS domain (REAR over MQTT/CBOR).
#[derive(FromArgs)]
struct Cli {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Run(RunCmd),
    Check(CheckCmd),
    #[cfg(feature = "demo")]
    Demo(DemoCmd),
}

/// Run the agent: serve this node's offers and keep its tables, until SIGINT or SIGTERM.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunCmd {
    /// path of the TOML config (see docs/operations.md)
    #[argh(
        option,
        short = 'c',
        default = "PathBuf::from(\"/etc/fluidlet/agent.toml\")"
    )]
    config: PathBuf,
    /// log one JSON object per line instead of human-readable lines
    #[argh(switch)]
    log_json: bool,
}

/// Validate a config file and print what it configures; exits 1 on the first problem.
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct CheckCmd {
    /// path of the TOML config
    #[argh(
        option,
        short = 'c',
        default = "PathBuf::from(\"/etc/fluidlet/agent.toml\")"
    )]
    config: PathBuf,
}

/// Run the two-node demo: an embedded broker, a provider and a consumer in this process.
#[cfg(feature = "demo")]
#[derive(FromArgs)]
#[argh(subcommand, name = "demo")]
struct DemoCmd {}

fn init_logs(default: &str, json: bool) {
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
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
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

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fluidlet: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.cmd {
        Cmd::Run(r) => Config::load(&r.config).map_err(Into::into).and_then(|cfg| {
            init_logs(&cfg.log, r.log_json);
            rt.block_on(async {
                let stop = stop_signal().map_err(|e| {
                    fluidlet::AgentError::Other(format!("cannot install signal handlers: {e}"))
                })?;
                node::run(cfg, stop).await
            })
        }),
        Cmd::Check(c) => Config::load(&c.config).map_err(Into::into).map(|cfg| {
            println!(
                "{}: node {} in domain {}, broker {}:{}, data in {}, {} offer(s)",
                c.config.display(),
                cfg.node_id,
                cfg.domain,
                cfg.broker.host,
                cfg.broker.port,
                cfg.data_dir.display(),
                cfg.offers.len()
            );
        }),
        #[cfg(feature = "demo")]
        Cmd::Demo(_) => {
            init_logs("warn", false);
            rt.block_on(fluidlet::demo::run()).map(|_| ())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluidlet: {e}");
            ExitCode::FAILURE
        }
    }
}
