//! fluidlet-supernode: `run` serves the REAR HTTP face, `check-config` checks a config.

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;

/// REAR over HTTP for a fluidlet domain: FLUIDOS reference nodes buy from its providers.
#[derive(FromArgs)]
struct Args {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Run(Run),
    CheckConfig(CheckConfig),
}

/// serve the face
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct Run {
    /// config file (TOML)
    #[argh(
        option,
        default = "PathBuf::from(\"/etc/fluidlet-supernode/supernode.toml\")"
    )]
    config: PathBuf,
}

/// check a config file and exit
#[derive(FromArgs)]
#[argh(subcommand, name = "check-config")]
struct CheckConfig {
    /// config file (TOML)
    #[argh(
        option,
        default = "PathBuf::from(\"/etc/fluidlet-supernode/supernode.toml\")"
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    // Files the face writes (its tables) are owner-only, whatever the umask.
    unsafe {
        libc::umask(0o077);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match args.cmd {
        Cmd::CheckConfig(c) => match fluidlet_supernode::Config::load(&c.config) {
            Ok(_) => {
                println!("{}: ok", c.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run(r) => {
            let cfg = match fluidlet_supernode::Config::load(&r.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async {
                let s = match fluidlet_supernode::Supernode::start(cfg).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                };
                tracing::info!("serving REAR over HTTP on {}", s.addr);
                // SIGINT or SIGTERM (systemd's stop).
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
                s.shutdown().await;
                ExitCode::SUCCESS
            })
        }
    }
}
