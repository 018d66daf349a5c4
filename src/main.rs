//! The `geoproxy` command: `geoproxy --config FILE [--check]`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use geoproxy::config::LogFormat;
use geoproxy::{Config, Server};

/// A failover proxy for Redis Active-Active databases.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML); `GEOPROXY__SECTION__KEY` variables override its keys.
    #[arg(long)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log one JSON object per line (overrides `log.format`).
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("geoproxy: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_from_env("GEOPROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: not in files, journald or `docker logs`.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if args.log_json || config.log.format == LogFormat::Json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    // This thread runs the first worker; `Server::run` starts the others and the control
    // path, each on a thread with a single-threaded runtime of its own.
    let mut runtime = tokio::runtime::Builder::new_current_thread();
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("geoproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(config).await {
            Ok(s) => s.reload_from(&args.config),
            Err(e) => {
                eprintln!("geoproxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        server.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

/// SIGTERM or SIGINT begins a graceful shutdown.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
