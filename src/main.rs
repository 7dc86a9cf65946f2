//! The `thassp` command: `run` the proxy, `check-config` a file. Sets up logging, turns
//! signals into shutdown (SIGTERM, SIGINT) and reload (SIGHUP).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use thassp::app::App;
use thassp::config::Config;

#[derive(Parser)]
#[command(name = "thassp", version, about = "Anti-spam SMTP proxy in front of your MTA")]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "THASSP_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy until SIGTERM/SIGINT; SIGHUP reloads the configuration.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long, env = "THASSP_CONFIG")]
        config: PathBuf,
    },
    /// Print the outcome statistics (category, attempts, percent) from the event log.
    Stats {
        /// Configuration file (TOML); its `[events] url` is read.
        #[arg(short, long, env = "THASSP_CONFIG")]
        config: PathBuf,
        /// Period to report, ending now: "10d", "24h", "30m".
        #[arg(long, default_value = "10d")]
        since: String,
    },
    /// Read a password on standard input and print its hash for `[admin] password_hash`.
    HashPassword,
    /// Parse and validate a configuration file and load the files it names; exit 0 when it
    /// is usable, 1 otherwise.
    CheckConfig {
        /// Configuration file (TOML).
        config: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("THASSP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // Parse, validate, and build everything the file names (certificates, CA files, list
        // files), exactly as `run` and a reload would.
        Cmd::CheckConfig { config } => match Config::load(&config).and_then(|c| {
            // Building resolvers may need a runtime context, exactly as under `run`.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| thassp::config::ConfigError {
                    source_name: "runtime".into(),
                    errors: vec![e.to_string()],
                })?;
            let _guard = runtime.enter();
            App::check(c).map_err(|mut e| {
                e.source_name = config.display().to_string();
                e
            })
        }) {
            Ok(_) => {
                println!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::FAILURE
            }
        },
        Cmd::HashPassword => {
            let mut password = String::new();
            if std::io::stdin().read_line(&mut password).is_err()
                || password.trim_end_matches(['\r', '\n']).is_empty()
            {
                eprintln!("thassp hash-password: give the password on standard input");
                return ExitCode::FAILURE;
            }
            match thassp::admin::hash_password(
                password.trim_end_matches(['\r', '\n']),
                thassp::admin::DEFAULT_ITERATIONS,
            ) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("thassp hash-password: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Stats { config, since } => {
            let result = Config::load(&config).map_err(|e| e.to_string()).and_then(|c| {
                let since = thassp::config::duration::parse(&since).map_err(|e| format!("--since: {e}"))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(stats(&c, since))
            });
            match result {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("thassp stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config } => {
            init_logging(cli.log_format);
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(loaded, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let app = App::new(config).await?;
    let running = thassp::server::start(app.clone()).await?;
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_config = app.snapshot().config.admin.clone();
    let admin = thassp::admin::start(app.clone(), &admin_config, Some(path.clone()), admin_stop.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(addr) = admin.web_addr {
        info!(address = %addr, "Admin web UI and API listening.");
    }
    if let Some(addr) = admin.console_addr {
        info!(address = %addr, "Admin console listening.");
    }
    info!(version = env!("CARGO_PKG_VERSION"), "thassp started.");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // Reading list and certificate files blocks: keep it off the async workers.
            _ = hup.recv() => reload(&app, &path).await,
        }
    }
    info!("Shutting down: no new connections; sessions in flight may finish.");
    running.shutdown().await;
    admin_stop.cancel();
    admin.stopped().await;
    Ok(())
}

/// SIGHUP: re-read the file and swap the configuration; on any error keep the running one.
/// Reading list and certificate files blocks, so it runs off the async workers.
async fn reload(app: &std::sync::Arc<App>, path: &std::path::Path) {
    let (app, owned) = (app.clone(), path.to_path_buf());
    let outcome = tokio::task::spawn_blocking(move || app.reload_from(&owned)).await;
    match outcome {
        Ok(Ok(warnings)) => {
            for w in warnings {
                warn!("{w}");
            }
            info!(config = %path.display(), "Configuration reloaded.");
        }
        Ok(Err(e)) => error!("Reload failed, the running configuration stays: {e}"),
        Err(e) => error!("Reload failed, the running configuration stays: reload task failed: {e}"),
    }
}

/// The outcome table for the last `since`, as ThASSP printed it.
async fn stats(config: &Config, since: std::time::Duration) -> Result<String, String> {
    if config.events.url.is_empty() {
        return Err("the event log is disabled ([events] url = \"\")".into());
    }
    let stats = thassp::events::Stats::open(&config.events).await?;
    let until = chrono::Utc::now();
    let from = until - chrono::Duration::from_std(since).map_err(|e| e.to_string())?;
    let rows = stats
        .outcome_table(from, until)
        .await
        .map_err(|e| format!("reading {}: {e}", config.events.url))?;
    Ok(thassp::events::format_table(&rows))
}
