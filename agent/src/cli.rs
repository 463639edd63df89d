//! The work of each `fluidlet` command, as functions a test can call. The binary
//! (`src/bin/fluidlet.rs`) parses the command line and calls one of them.
//!
//! `run` and `demo` start nodes; `check` validates a config; `doctor` checks the gateway for
//! the liqo fabric backend; `intent`, `status` and `contract`
//! send one request to a running agent over its control socket ([`crate::control`]) and print
//! what comes back.

use crate::config::Config;
use crate::control::{Client, Request, Response};
use crate::model::{ContractState, Id, Intent};
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
/// `fluidlet --help | head -1` ends quietly. `--version` (or `-V`) prints [`crate::version`]. `Err` is the exit status to end with.
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
    // argh has no `--version`: it is answered here, before any subcommand is required.
    if matches!(rest.as_slice(), ["--version"] | ["-V"]) {
        let _ = writeln!(std::io::stdout(), "{}", crate::version());
        return Err(ExitCode::SUCCESS);
    }
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
    let parsed = crate::config::log_filter(&spec).and_then(|_| {
        spec.parse::<tracing_subscriber::filter::Targets>()
            .map_err(|e| e.to_string())
    });
    let filter = parsed.unwrap_or_else(|e| {
        eprintln!("fluidlet: log filter (RUST_LOG) {e}; using \"info\"");
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

/// Sorts ids that end in a number by that number (`i4` before `i2000000`, not after).
fn id_order(id: &Id) -> (String, u64, String) {
    let s = id.as_str();
    let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, tail) = s.split_at(s.len() - digits);
    (head.to_owned(), tail.parse().unwrap_or(0), s.to_owned())
}

fn print_intent(out: &mut dyn Write, i: &Intent) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<10} {:<20} {:<10} contract {:<24} placement {}{}",
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
    let spec = crate::orchestrator::parse_intent(&text, base).map_err(|e| e.in_file(file))?;
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
        Response::Intents(mut v) => {
            v.sort_by_key(|i| id_order(&i.id));
            for i in &v {
                print_intent(out, i)?;
            }
            Ok(())
        }
        Response::Error(e) => Err(other(e)),
        _ => Err(other("unexpected answer")),
    }
}

/// `fluidlet intent cancel` / `retry`: ends an unfinished intent, or starts a failed one
/// again.
pub async fn intent_control(
    id: &str,
    retry: bool,
    config: &Path,
    socket: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let id = Id::new(id).map_err(|e| other(format!("intent id: {e}")))?;
    let req = match retry {
        true => Request::RetryIntent(id),
        false => Request::CancelIntent(id),
    };
    match ask(&socket_path(config, socket)?, req).await? {
        Response::Intent(i) => {
            print_intent(out, &i)?;
            Ok(())
        }
        Response::Error(e) => Err(other(e)),
        _ => Err(other("unexpected answer")),
    }
}

/// `fluidlet catalog`: the providers and flavours this node has heard of, their prices and
/// the age of each advert, and the providers it ranks last and why.
pub async fn catalog(
    config: &Path,
    socket: Option<&Path>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let view = match ask(&socket_path(config, socket)?, Request::Catalog).await? {
        Response::Catalog(v) => v,
        Response::Error(e) => return Err(other(e)),
        _ => return Err(other("unexpected answer")),
    };
    let age = |at: u64| view.now.saturating_sub(at) / 1000;
    if json {
        let flavours: Vec<_> = view
            .flavours
            .iter()
            .map(|c| {
                serde_json::json!({
                    "provider": c.flavour.provider.as_str(),
                    "flavour": c.flavour,
                    "seen_at_unix_ms": c.seen_at,
                    "age_secs": age(c.seen_at),
                })
            })
            .collect();
        let providers: Vec<_> = view
            .providers
            .iter()
            .map(|p| {
                let r = p.rating.clone().unwrap_or_default();
                serde_json::json!({
                    "id": p.id.as_str(),
                    "flavours": p.flavours,
                    "age_secs": age(p.seen_at),
                    "reservations_ok": r.reservations_ok,
                    "reservations_failed": r.reservations_failed,
                    "peerings_ok": r.peerings_ok,
                    "peerings_failed": r.peerings_failed,
                    "lies": r.lies,
                    "demoted_until_unix_ms": (r.demoted_until > view.now).then_some(r.demoted_until),
                })
            })
            .collect();
        let v = serde_json::json!({"providers": providers, "flavours": flavours, "truncated": view.truncated});
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "providers heard: {} (as of {})",
        view.providers.len(),
        crate::model::date_words(view.now)
    )?;
    for p in &view.providers {
        let r = p.rating.clone().unwrap_or_default();
        let standing = if r.demoted_until > view.now {
            format!(
                "  DEMOTED until {}: refused or ignored {} reservation(s) of flavours it offered",
                crate::model::date_words(r.demoted_until),
                r.lies
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  {:<24} {} flavour(s), heard {} s ago; reservations {} ok / {} failed, peerings {} ok / {} failed{standing}",
            p.id,
            p.flavours,
            age(p.seen_at),
            r.reservations_ok,
            r.reservations_failed,
            r.peerings_ok,
            r.peerings_failed
        )?;
    }
    writeln!(out, "flavours:")?;
    for c in &view.flavours {
        let f = &c.flavour;
        let cut = match &f.partitionability {
            Some(p) => format!(
                "pieces from {}m / {}",
                p.cpu_min,
                crate::model::bytes_words(p.memory_min)
            ),
            None => "whole only".into(),
        };
        let place = f
            .location
            .as_ref()
            .and_then(|l| l.country.as_ref())
            .map_or(String::new(), |c| format!(", {c}"));
        writeln!(
            out,
            "  {:<24} {:<20} {:<6} {}  {} {} per {} (whole), {cut}{place}; heard {} s ago",
            f.provider,
            f.id,
            f.architecture,
            f.resources,
            crate::model::price_words(f.price.amount),
            f.price.currency,
            f.price.period,
            age(c.seen_at)
        )?;
    }
    if view.truncated {
        writeln!(
            out,
            "(more than {} flavours heard: the first {} shown)",
            crate::control::MAX_CATALOG_VIEW,
            crate::control::MAX_CATALOG_VIEW
        )?;
    }
    Ok(())
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
            writeln!(
                out,
                "namespace {}, needs {}",
                i.namespace,
                crate::rear::consumer::describe(&i.selector)
            )?;

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
        let mut v = serde_json::to_value(&st).map_err(other)?;
        if let Some(m) = v.as_object_mut() {
            m.insert(
                "units".into(),
                serde_json::json!({
                    "cpu": "millicores",
                    "memory": "bytes",
                    "storage": "bytes",
                    "price": "millionths of the currency unit, per period (flavours: for the whole flavour; contracts: for the piece)",
                    "*_at, ends_at, expires_at, since_ms": "Unix time in milliseconds",
                    "term_ms": "milliseconds",
                }),
            );
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v).map_err(other)?)?;
        return Ok(());
    }
    if let Some(v) = &st.version {
        writeln!(
            out,
            "{v}, protocol 1 revision {}",
            st.protocol_revision.unwrap_or(0)
        )?;
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
    if let Some(t) = st.metrics.as_ref().and_then(|m| m.certificate_not_after) {
        let rotations = st.metrics.as_ref().map_or(0, |m| m.certificate_rotations);
        writeln!(
            out,
            "certificate: valid until {} ({rotations} rotations since start)",
            crate::model::date_words(t.saturating_mul(1000))
        )?;
    }
    if let Some(w) = &st.certificate_warning {
        writeln!(out, "WARNING: {w}")?;
    }
    writeln!(out, "\nflavours on offer:")?;
    for f in st
        .flavours
        .iter()
        .filter(|f| f.available && !f.resources.is_zero())
    {
        writeln!(
            out,
            "  {:<24} {}  {} {} per {} (whole)",
            f.id,
            f.resources,
            crate::model::price_words(f.price.amount),
            f.price.currency,
            f.price.period
        )?;
    }
    writeln!(out, "\ncontracts:")?;
    let mut contracts = st.contracts.clone();
    contracts.sort_by_key(|k| id_order(&k.id));
    for k in &contracts {
        let live = matches!(k.state, ContractState::Active | ContractState::Reserved);
        let end = match (k.ends_at, live) {
            (Some(e), true) => {
                let renewal = match (k.term_ms, k.buyer == st.node, k.state) {
                    (Some(t), true, ContractState::Active) => format!(
                        ", renewed from {}",
                        crate::model::date_words(e.saturating_sub(t / 2))
                    ),
                    _ => String::new(),
                };
                format!(
                    ", ends {} (term {} s{renewal})",
                    crate::model::date_words(e),
                    k.term_ms.unwrap_or(0) / 1000
                )
            }
            (None, true) => ", no end".into(),
            (_, false) => String::new(),
        };
        writeln!(
            out,
            "  {:<24} {:<9} buyer {:<16} seller {:<16} {}  {} {} per {}{end}",
            k.id,
            k.state,
            k.buyer,
            k.seller,
            k.resources,
            crate::model::price_words(k.price),
            k.flavour.price.currency,
            k.flavour.price.period
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
            writeln!(out, "contract {} released ({})", k.id, k.state)?;
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
    if cfg.fabric.backend == crate::fabric::Backend::DryRun {
        writeln!(
            out,
            "{}: [fabric] backend is \"dry-run\": no cluster is driven, so there is nothing for \
             doctor to check. doctor checks what the liqo backend needs (kubectl, liqoctl, the \
             kubeconfig, Liqo in the cluster); run it after setting backend = \"liqo\".",
            path.display()
        )?;
        return Ok(());
    }
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
            let days = loaded
                .identity
                .not_after
                .saturating_sub(crate::model::unix_ms() / 1000)
                / 86_400;
            format!(
                "mutual TLS as CN {} (certificate signed by {}, {days} days left)",
                loaded.identity.common_name,
                files.ca.display()
            )
        }
        None if cfg.insecure_plaintext => "PLAIN MQTT (insecure_plaintext = true)".into(),
        None => "plain MQTT on loopback".into(),
    };
    for w in crate::files::mode_warnings(&cfg.data_dir) {
        eprintln!("warning: {w}");
    }
    let tables = check_data_dir(&cfg)?;
    writeln!(out, "{}: the agent would start with:", path.display())?;
    writeln!(out, "  node      {} in domain {}", cfg.node_id, cfg.domain)?;
    writeln!(
        out,
        "  broker    {}:{} ({transport})",
        cfg.broker.host, cfg.broker.port
    )?;
    writeln!(out, "  data_dir  {} ({tables})", cfg.data_dir.display())?;
    writeln!(out, "  control   {}", cfg.control_socket.display())?;
    for o in &cfg.offers {
        let (share, term) = cfg.terms_of(&o.id);
        let cut = match &o.partitionability {
            Some(p) => format!(
                "sold in pieces from {}m cpu / {} (steps {}m / {})",
                p.cpu_min,
                crate::model::bytes_words(p.memory_min),
                p.cpu_step,
                crate::model::bytes_words(p.memory_step)
            ),
            None => "sold only whole".into(),
        };
        writeln!(
            out,
            "  offer     {}: {} ({}), {} {} per {}, {cut}; one buyer at most {share}%, contract term {}",
            o.id,
            o.resources,
            o.architecture,
            crate::model::price_words(o.price.amount),
            o.price.currency,
            o.price.period,
            if term.is_zero() { "none".to_owned() } else { format!("{} s", term.as_secs()) }
        )?;
    }
    if cfg.offers.is_empty() {
        writeln!(out, "  offers    none (a consumer only)")?;
    }
    let l = &cfg.limits;
    writeln!(
        out,
        "  limits    {} messages/s per sender (burst {}), {} unpeered reservations per buyer, {}% per buyer by default",
        l.sender_rate, l.sender_burst, l.pending_per_buyer, l.max_per_buyer
    )?;
    writeln!(out, "  fabric    {}", cfg.fabric.backend.name())?;
    match &cfg.metrics.textfile {
        Some(f) => {
            check_metrics_dir(f)?;
            writeln!(
                out,
                "  metrics   {} every {} s",
                f.display(),
                cfg.metrics.interval.as_secs()
            )?;
        }
        None => writeln!(out, "  metrics   off")?,
    }
    Ok(())
}

/// What `run` will find in `data_dir`, found now: a directory it can write, tables that
/// are this node's, offers that still cover their live reservations.
fn check_data_dir(cfg: &Config) -> Result<String, CliError> {
    let dir = &cfg.data_dir;
    let bad = |problem: String| other(format!("data_dir {}: {problem}", dir.display()));
    let Some(existing) =
        std::iter::successors(Some(dir.as_path()), |d| d.parent()).find(|d| d.exists())
    else {
        return Err(bad("no part of the path exists".into()));
    };
    if !existing.is_dir() {
        return Err(bad(format!("{} is not a directory", existing.display())));
    }
    if !writable(existing) {
        return Err(bad(format!(
            "{} is not writable by this user (uid {}); the agent's user must own it",
            existing.display(),
            uid()
        )));
    }
    if existing != dir.as_path() {
        return Ok("will be created".into());
    }
    // A sled database is `conf` and `db` (and snapshots): anything less is not opened, so
    // check never makes files in a directory that holds no tables yet.
    if !dir.join("db").exists() || !dir.join("conf").exists() {
        return Ok("no tables yet: new ones will be made".into());
    }
    crate::files::private_umask();
    use crate::tables::Preflight;
    match crate::tables::Tables::preflight(dir, &cfg.node_id, &cfg.offers) {
        Ok(Preflight::Ready { contracts }) => Ok(format!(
            "tables of {}, {contracts} contracts on record",
            cfg.node_id
        )),
        Ok(Preflight::OldLayout) => Ok(
            "tables of an older release: the next start migrates them (older releases cannot \
             open them after that); not checked further"
                .into(),
        ),
        Err(crate::tables::TableError::InUse { pid, .. }) => Ok(format!(
            "in use by a running agent{pid}: its tables were not checked"
        )),
        Err(e) => Err(other(e.to_string())),
    }
}

fn check_metrics_dir(file: &Path) -> Result<(), CliError> {
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(other(format!(
            "metrics.textfile {}: the directory {} does not exist (node_exporter's textfile directory, e.g. /var/lib/prometheus/node-exporter)",
            file.display(),
            parent.display()
        )));
    }
    if !writable(parent) {
        return Err(other(format!(
            "metrics.textfile {}: the directory {} is not writable by this user",
            file.display(),
            parent.display()
        )));
    }
    Ok(())
}

fn writable(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    unsafe { libc::getuid() }
}
