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
    Intent(IntentCmd),
    Status(StatusCmd),
    Contract(ContractCmd),
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

/// Validate a config file (and its TLS files: readable, CN = node_id, in date) and print what
/// it configures; exits 1 on the first problem.
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

#[derive(FromArgs)]
#[argh(subcommand, name = "intent")]
/// Submit, list and show intents (workloads with their resource needs) on the running agent.
struct IntentCmd {
    #[argh(subcommand)]
    cmd: IntentSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum IntentSub {
    Submit(IntentSubmit),
    List(IntentList),
    Show(IntentShow),
}

/// Submit an intent file and follow it step by step until the workload is placed or fails.
#[derive(FromArgs)]
#[argh(subcommand, name = "submit")]
struct IntentSubmit {
    /// the intent file (TOML; see docs/intents.md)
    #[argh(positional)]
    file: PathBuf,
    #[argh(option, short = 'c', default = "default_config()")]
    /// the agent's config, to find its control socket
    config: PathBuf,
    /// the control socket (overrides the config's)
    #[argh(option)]
    socket: Option<PathBuf>,
}

/// List the intents and where they got to.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct IntentList {
    #[argh(option, short = 'c', default = "default_config()")]
    /// the agent's config, to find its control socket
    config: PathBuf,
    /// the control socket (overrides the config's)
    #[argh(option)]
    socket: Option<PathBuf>,
}

/// Show one intent.
#[derive(FromArgs)]
#[argh(subcommand, name = "show")]
struct IntentShow {
    /// the intent id (from `intent list`)
    #[argh(positional)]
    id: String,
    #[argh(option, short = 'c', default = "default_config()")]
    /// the agent's config, to find its control socket
    config: PathBuf,
    /// the control socket (overrides the config's)
    #[argh(option)]
    socket: Option<PathBuf>,
}

/// Show the node's flavours, contracts, allocations, intents and broker connection.
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// print JSON instead of tables
    #[argh(switch)]
    json: bool,
    #[argh(option, short = 'c', default = "default_config()")]
    /// the agent's config, to find its control socket
    config: PathBuf,
    /// the control socket (overrides the config's)
    #[argh(option)]
    socket: Option<PathBuf>,
}

/// Manage contracts this node bought.
#[derive(FromArgs)]
#[argh(subcommand, name = "contract")]
struct ContractCmd {
    #[argh(subcommand)]
    cmd: ContractSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ContractSub {
    Release(ContractRelease),
}

/// Release a contract: the seller gets its capacity back, the peering is torn down.
#[derive(FromArgs)]
#[argh(subcommand, name = "release")]
struct ContractRelease {
    /// the contract id (from `status`)
    #[argh(positional)]
    id: String,
    #[argh(option, short = 'c', default = "default_config()")]
    /// the agent's config, to find its control socket
    config: PathBuf,
    /// the control socket (overrides the config's)
    #[argh(option)]
    socket: Option<PathBuf>,
}

fn default_config() -> PathBuf {
    PathBuf::from("/etc/fluidlet/agent.toml")
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
        Cmd::Check(c) => Config::load(&c.config)
            .map_err(Into::into)
            .and_then(|cfg| check(&c.config, &cfg)),
        Cmd::Intent(IntentCmd { cmd }) => rt.block_on(cli::intent(cmd)),
        Cmd::Status(c) => rt.block_on(cli::status(c)),
        Cmd::Contract(ContractCmd {
            cmd: ContractSub::Release(c),
        }) => rt.block_on(cli::release(c)),
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

/// The control-socket commands: send one request, print what comes back.
mod cli {
    use super::*;
    use fluidlet::control::{Client, Request, Response};
    use fluidlet::model::{Id, Intent};
    use fluidlet::AgentError;

    fn socket(config: &std::path::Path, socket: &Option<PathBuf>) -> Result<PathBuf, AgentError> {
        match socket {
            Some(s) => Ok(s.clone()),
            None => Ok(Config::load(config)?.control_socket),
        }
    }

    fn other(e: impl std::fmt::Display) -> AgentError {
        AgentError::Other(e.to_string())
    }

    async fn ask(path: &std::path::Path, req: Request) -> Result<Response, AgentError> {
        let mut c = Client::connect(path).await.map_err(other)?;
        c.send(&req).await.map_err(other)?;
        c.recv()
            .await
            .map_err(other)?
            .ok_or_else(|| other("the agent closed the connection"))
    }

    fn print_intent(i: &Intent) {
        println!(
            "{}  {:<20} {:<10?} contract {:<24} placement {}{}",
            i.id,
            i.name.as_str(),
            i.state,
            i.contract.as_ref().map_or("-", |c| c.as_str()),
            i.placement.as_ref().map_or("-", |p| p.as_str()),
            i.error
                .as_ref()
                .map_or(String::new(), |e| format!("  error: {e}")),
        );
    }

    pub async fn intent(cmd: IntentSub) -> Result<(), AgentError> {
        match cmd {
            IntentSub::Submit(s) => {
                let text = fluidlet::config::read_text(&s.file, fluidlet::config::MAX_CONFIG_FILE)?;
                let base = s.file.parent().unwrap_or(std::path::Path::new("."));
                let spec = fluidlet::orchestrator::parse_intent(&text, base)?;
                let mut c = Client::connect(&socket(&s.config, &s.socket)?)
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
                            println!("step {number:>2}  {:<22} {text}", element.as_str())
                        }
                        Response::Intent(i) => {
                            print_intent(&i);
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
            IntentSub::List(l) => {
                match ask(&socket(&l.config, &l.socket)?, Request::ListIntents).await? {
                    Response::Intents(v) => {
                        v.iter().for_each(print_intent);
                        Ok(())
                    }
                    Response::Error(e) => Err(other(e)),
                    _ => Err(other("unexpected answer")),
                }
            }
            IntentSub::Show(sh) => {
                let id = Id::new(&sh.id).map_err(|e| other(format!("intent id: {e}")))?;
                match ask(&socket(&sh.config, &sh.socket)?, Request::ShowIntent(id)).await? {
                    Response::Intent(i) => {
                        print_intent(&i);
                        println!("namespace {}, needs {:?}", i.namespace, i.selector);
                        Ok(())
                    }
                    Response::Error(e) => Err(other(e)),
                    _ => Err(other("unexpected answer")),
                }
            }
        }
    }

    pub async fn status(c: StatusCmd) -> Result<(), AgentError> {
        let Response::Status(st) = ask(&socket(&c.config, &c.socket)?, Request::Status).await?
        else {
            return Err(other("unexpected answer"));
        };
        if c.json {
            println!("{}", serde_json::to_string_pretty(&st).map_err(other)?);
            return Ok(());
        }
        println!(
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
        );
        println!("\nflavours:");
        for f in &st.flavours {
            let r = &f.resources;
            println!(
                "  {:<24} {}m cpu  {} MiB  {} pods  price {}",
                f.id,
                r.cpu,
                r.memory >> 20,
                r.pods,
                f.price.amount
            );
        }
        println!("\ncontracts:");
        for k in &st.contracts {
            let r = &k.resources;
            println!(
                "  {:<24} {:<9?} buyer {:<16} seller {:<16} {}m cpu  {} MiB",
                k.id,
                k.state,
                k.buyer,
                k.seller,
                r.cpu,
                r.memory >> 20
            );
        }
        println!("\nallocations:");
        for a in &st.allocations {
            println!(
                "  {:<24} {:<11?} {:<8?} peer {}",
                a.contract, a.kind, a.status, a.peer
            );
        }
        println!("\nintents:");
        st.intents.iter().for_each(print_intent);
        Ok(())
    }

    pub async fn release(c: ContractRelease) -> Result<(), AgentError> {
        let id = Id::new(&c.id).map_err(|e| other(format!("contract id: {e}")))?;
        match ask(&socket(&c.config, &c.socket)?, Request::Release(id)).await? {
            Response::Released(k) => {
                println!("contract {} released ({:?})", k.id, k.state);
                Ok(())
            }
            Response::Error(e) => Err(other(e)),
            _ => Err(other("unexpected answer")),
        }
    }
}

/// `fluidlet check`: the config is valid; with TLS, the PEM files are too.
fn check(path: &std::path::Path, cfg: &Config) -> Result<(), fluidlet::AgentError> {
    let transport = match &cfg.tls {
        Some(files) => {
            let loaded = fluidlet::tls::load(files, &cfg.node_id)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            format!("mutual TLS as CN {}", loaded.identity.common_name)
        }
        None if cfg.insecure_plaintext => "PLAIN MQTT (insecure_plaintext = true)".into(),
        None => "plain MQTT on loopback".into(),
    };
    for w in fluidlet::files::mode_warnings(&cfg.data_dir) {
        eprintln!("warning: {w}");
    }
    println!(
        "{}: node {} in domain {}, broker {}:{} ({transport}), data in {}, {} offer(s)",
        path.display(),
        cfg.node_id,
        cfg.domain,
        cfg.broker.host,
        cfg.broker.port,
        cfg.data_dir.display(),
        cfg.offers.len()
    );
    Ok(())
}
