//! The `pgmux` command: run the proxy, check a config, or bring up a demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[cfg(feature = "demo")]
mod demo;

use pgmux::config::{Config, LogFormat};
use pgmux::proxy::Proxy;

#[derive(Parser)]
#[command(name = "pgmux", version, about = "PostgreSQL proxy: pooling, read/write splitting, sharding")]
struct Cli {
    /// Config file (TOML); see config/pgmux.toml.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit.
    CheckConfig { file: PathBuf },
    /// Sharding operations.
    Shard {
        #[command(subcommand)]
        op: ShardOp,
    },
    /// Start a local primary + 2 streaming replicas (or, `--sharded`, two
    /// shards) from the installed PostgreSQL binaries, with pgmux in
    /// front; Ctrl-C tears it all down.
    Demo {
        /// Install PostgreSQL with apt-get when it is missing.
        #[arg(long)]
        install: bool,
        /// pgmux port (default: 6432, or a free one when taken).
        #[arg(long)]
        port: Option<u16>,
        /// Two shards instead (each a primary with a streaming replica),
        /// with a small sharded schema and data loaded.
        #[arg(long)]
        sharded: bool,
    },
}

#[derive(Subcommand)]
enum ShardOp {
    /// Move every row of a key of a directory map to another shard, and
    /// switch its directory entry (pgmux holds new transactions for the
    /// key meanwhile).
    Move {
        /// The config pgmux runs with.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        database: String,
        /// The directory map the key belongs to.
        #[arg(long)]
        map: String,
        #[arg(long)]
        key: String,
        /// Target shard name.
        #[arg(long)]
        to: String,
        /// Wait after marking the key moving, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        grace_ms: u64,
    },
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt.json().try_init(),
    };
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::load(&file) {
            Ok(c) => {
                println!("{}: ok ({} users, {} databases)", file.display(), c.users.len(), c.databases.len());
                print!("{}", c.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Shard { op: ShardOp::Move { config, database, map, key, to, grace_ms } }) => {
            init_logging("info", LogFormat::Text);
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let req = pgmux::shard::mover::MoveRequest {
                database,
                map,
                key,
                to,
                grace: std::time::Duration::from_millis(grace_ms),
            };
            let moved = runtime(0)
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(pgmux::shard::mover::move_key(&config, &req)).map_err(|e| e.to_string()));
            match moved {
                Ok(n) => {
                    println!("moved key {} to shard {}: {n} rows", req.key, req.to);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("shard move failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Demo { install, port, sharded }) => run_demo(install, port, sharded),
        None => {
            let Some(path) = cli.config else {
                eprintln!("usage: pgmux --config FILE | pgmux check-config FILE | pgmux demo (see --help)");
                return ExitCode::from(2);
            };
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&config.general.log_level, config.general.log_format);
            let rt = match runtime(config.general.worker_threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(serve(config, path))
        }
    }
}

async fn serve(config: Config, path: std::path::PathBuf) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let running = match Proxy::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let proxy = running.proxy.clone();
    proxy.set_config_path(path);
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        eprintln!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = proxy.reload();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = proxy.shutdown_requested() => break,
        }
    }
    let timeout = proxy.config().general.shutdown_timeout.0;
    tracing::info!(?timeout, "shutting down: no new clients, waiting for transactions in flight");
    tokio::select! {
        _ = proxy.drain(timeout) => {}
        _ = term.recv() => {
            tracing::warn!("second signal: closing every client now");
            proxy.kill_all().await;
        }
        _ = int.recv() => {
            tracing::warn!("second signal: closing every client now");
            proxy.kill_all().await;
        }
    }
    running.stop().await;
    tracing::info!("pgmux stopped");
    ExitCode::SUCCESS
}

#[cfg(feature = "demo")]
fn run_demo(install: bool, port: Option<u16>, sharded: bool) -> ExitCode {
    init_logging("info", LogFormat::Text);
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo::run(install, port, sharded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "demo"))]
fn run_demo(_install: bool, _port: Option<u16>, _sharded: bool) -> ExitCode {
    eprintln!("this pgmux was built without the demo (cargo feature \"demo\")");
    ExitCode::FAILURE
}
