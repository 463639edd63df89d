//! The `fluidlet` command: parses the command line and calls the library's [`fluidlet::cli`],
//! which does the work of each command.
//!
//! It runs on tokio's current-thread runtime: a gateway agent handles one message at a
//! time by design (see `node`), and one thread keeps the footprint small.

use argh::FromArgs;
use fluidlet::cli;
use std::path::PathBuf;
use std::process::ExitCode;

/// fluidlet: makes this device a node of a FLUIDOS domain (REAR over MQTT/CBOR).
/// `fluidlet --version` prints the release.
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
    Catalog(CatalogCmd),
    Contract(ContractCmd),
    Doctor(DoctorCmd),
    Enrol(EnrolCmd),
    #[cfg(feature = "demo")]
    Demo(DemoCmd),
}

/// Enrol this node by hand: make its key here, send a CSR with the token of `[enrol]` to the
/// domain's signer, write the certificate it returns (what `run` does on first boot).
#[derive(FromArgs)]
#[argh(subcommand, name = "enrol")]
struct EnrolCmd {
    /// path of the TOML config
    #[argh(option, short = 'c', default = "default_config()")]
    config: PathBuf,
}

/// Check what the liqo fabric backend needs on this gateway (kubectl, liqoctl, kubeconfig,
/// Liqo, API server address, gateway service) and say what to fix; exits 1 on a problem.
#[derive(FromArgs)]
#[argh(subcommand, name = "doctor")]
struct DoctorCmd {
    /// path of the TOML config
    #[argh(option, short = 'c', default = "default_config()")]
    config: PathBuf,
}

/// Run the agent: serve this node's offers and keep its tables, until SIGINT or SIGTERM.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunCmd {
    /// path of the TOML config (see docs/operations.md)
    #[argh(option, short = 'c', default = "default_config()")]
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
    #[argh(option, short = 'c', default = "default_config()")]
    config: PathBuf,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "intent")]
/// Submit, list, show, cancel and retry intents (workloads with their resource needs) on the
/// running agent.
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
    Cancel(IntentCancel),
    Retry(IntentRetry),
}

/// Stop an unfinished intent: it ends Failed ("cancelled") and the capacity it bought is
/// released (unless another placed intent uses it).
#[derive(FromArgs)]
#[argh(subcommand, name = "cancel")]
struct IntentCancel {
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

/// Start a Failed intent again from its first step; the agent drives it on its own.
#[derive(FromArgs)]
#[argh(subcommand, name = "retry")]
struct IntentRetry {
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

/// Show the domain as this node hears it: providers, their flavours and prices, the age of
/// each advert, and the providers it ranks last and why.
#[derive(FromArgs)]
#[argh(subcommand, name = "catalog")]
struct CatalogCmd {
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
    PathBuf::from(fluidlet::config::DEFAULT_PATH)
}

/// Run the two-node demo: an embedded broker, a provider and a consumer in this process.
#[cfg(feature = "demo")]
#[derive(FromArgs)]
#[argh(subcommand, name = "demo")]
struct DemoCmd {}

fn main() -> ExitCode {
    let args: Cli = match cli::parse_args() {
        Ok(a) => a,
        Err(status) => return status,
    };
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
    let out = &mut std::io::stdout();
    let result = match args.cmd {
        Cmd::Run(r) => cli::run(&r.config, r.log_json, &rt).map_err(Into::into),
        Cmd::Check(c) => cli::check(&c.config, out),
        Cmd::Intent(IntentCmd { cmd }) => match cmd {
            IntentSub::Submit(s) => rt.block_on(cli::intent_submit(
                &s.file,
                &s.config,
                s.socket.as_deref(),
                out,
            )),
            IntentSub::List(l) => {
                rt.block_on(cli::intent_list(&l.config, l.socket.as_deref(), out))
            }
            IntentSub::Show(s) => {
                rt.block_on(cli::intent_show(&s.id, &s.config, s.socket.as_deref(), out))
            }
            IntentSub::Cancel(c) => rt.block_on(cli::intent_control(
                &c.id,
                false,
                &c.config,
                c.socket.as_deref(),
                out,
            )),
            IntentSub::Retry(c) => rt.block_on(cli::intent_control(
                &c.id,
                true,
                &c.config,
                c.socket.as_deref(),
                out,
            )),
        },
        Cmd::Catalog(c) => rt.block_on(cli::catalog(&c.config, c.socket.as_deref(), c.json, out)),
        Cmd::Status(c) => rt.block_on(cli::status(&c.config, c.socket.as_deref(), c.json, out)),
        Cmd::Contract(ContractCmd {
            cmd: ContractSub::Release(c),
        }) => rt.block_on(cli::release(&c.id, &c.config, c.socket.as_deref(), out)),
        Cmd::Doctor(c) => cli::doctor(&c.config, &rt, out),
        Cmd::Enrol(c) => fluidlet::enrol::cli(&c.config, out).map_err(Into::into),
        #[cfg(feature = "demo")]
        Cmd::Demo(_) => cli::demo(&rt).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout is gone (`fluidlet status | head -1`): stop without a word, and
        // without claiming success, since the output was cut short.
        Err(e) if e.closed_pipe() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fluidlet: {e}");
            ExitCode::FAILURE
        }
    }
}
