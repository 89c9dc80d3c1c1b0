//! The `echo-bridge` command line: `init`, `run`, `demo`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use echo_bridge::{
    Config, InitOptions,
    tunables::{LogFormat, LogSettings},
};

/// The bridge's memory allocator: jemalloc (default feature `jemalloc`).
/// A listener moves request and answer buffers between runtime threads,
/// and glibc's malloc serialises such frees on its arena locks: over
/// loopback HTTP, bridgekeys-bench measured about 15 % more claims per
/// second with jemalloc than with glibc's malloc (median of nine
/// alternating pairs, 7 to 37 %), raw crypto unchanged
/// (docs/BENCHMARKS.md). Your bridge chooses its own
/// allocator the same way; bridgekeys' libraries never set one.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A tiny Matrix bridge on bridgekeys: @echo_* puppets join rooms they are
/// invited to and echo every text message.
#[derive(Parser)]
#[command(name = "echo-bridge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write DIR/config.toml and DIR/registration.yaml (fresh tokens and
    /// store key) and create the store DIR/store.
    Init {
        /// Directory for both files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// The homeserver's client-server API, e.g. http://127.0.0.1:8008.
        #[arg(long)]
        homeserver_url: String,
        /// The homeserver's server name, e.g. example.org.
        #[arg(long)]
        server_name: String,
        /// Where the appservice API listens, e.g. 127.0.0.1:29300.
        #[arg(long)]
        listen: SocketAddr,
        /// Keep the store in this PostgreSQL database (it must hold no
        /// store yet), e.g. postgres://bridge:secret@db/echo, instead of
        /// the sled store DIR/store. For a bridge run as several processes.
        #[arg(long)]
        database: Option<String>,
    },
    /// Serve the appservice API until Ctrl-C or SIGTERM.
    Run {
        /// The configuration written by `init`.
        #[arg(long)]
        config: PathBuf,
        /// Start on a store restored from an older backup (refused
        /// otherwise): key ids jump past every id handed out before, and
        /// keys handed out after the backup are lost. See the README.
        #[arg(long)]
        accept_restored_store: bool,
    },
    /// Copy the sled store of a stopped bridge into a new store in an empty
    /// PostgreSQL database, then point config.toml at it (`database`,
    /// `store_id`) and rename the sled store to `<store>.migrated`.
    Migrate {
        /// The configuration written by `init`.
        #[arg(long)]
        config: PathBuf,
        /// The PostgreSQL database, e.g. postgres://bridge:secret@db/echo.
        #[arg(long)]
        to: String,
    },
    /// Start a local Synapse and the bridge, and walk through an echo.
    Demo,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo => "warn",
        _ => "info",
    };
    // `run` reads its configuration first: it says how to log.
    let loaded = match &cli.command {
        Command::Run {
            config,
            accept_restored_store,
        } => match Config::load(config) {
            Ok(mut config) => {
                config.accept_restored_store = *accept_restored_store;
                Some(config)
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let logging = loaded
        .as_ref()
        .map(|c| c.logging.clone())
        .unwrap_or_default();
    init_logging(&logging, default_filter);
    match execute(cli.command, loaded).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, one line; never a secret (none is put in
            // an error).
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stdout: text (colour only on a terminal, unless the config
/// says otherwise) or one JSON object per line; `RUST_LOG` filters.
fn init_logging(settings: &LogSettings, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(settings.ansi(std::io::stdout().is_terminal()));
    match settings.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn execute(command: Command, loaded: Option<Config>) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            homeserver_url,
            server_name,
            listen,
            database,
        } => {
            let done = echo_bridge::init(&InitOptions {
                dir,
                homeserver_url,
                server_name,
                listen,
                database,
            })?;
            println!("wrote {}", done.config.display());
            println!("wrote {}", done.registration.display());
            println!(
                "created the store {} (id {}, recorded in the config)",
                done.store, done.store_id
            );
            println!("user namespace: {} (exclusive)", done.user_regex);
            println!(
                "next: add {} to the homeserver's app_service_config_files (see README), \
                 restart it, then: echo-bridge run --config {}",
                done.registration.display(),
                done.config.display()
            );
        }
        Command::Run { .. } => {
            let config = loaded.context("the configuration was not loaded")?;
            echo_bridge::run(config, bridgekeys::appservice::shutdown_signal()).await?;
        }
        Command::Migrate { config, to } => {
            let done = echo_bridge::storage::migrate(&config, &to).await?;
            let r = &done.report;
            println!(
                "copied {} accounts, {} one-time keys, {} Olm sessions, {} Megolm sessions, \
                 {} transactions, {} puppets (key ids continue from {})",
                r.accounts,
                r.one_time_keys,
                r.sessions,
                r.group_sessions,
                r.transactions,
                r.puppets,
                r.key_id_floor
            );
            println!(
                "{} now names the PostgreSQL store (id {}); the sled store was moved to {}",
                config.display(),
                done.store_id,
                done.old_store.display()
            );
        }
        #[cfg(feature = "demo")]
        Command::Demo => echo_bridge::demo::demo().await?,
        #[cfg(not(feature = "demo"))]
        Command::Demo => anyhow::bail!(
            "this echo-bridge was built without the demo (it needs a throwaway Synapse): \
             cargo run --release -p echo-bridge --features demo -- demo"
        ),
    }
    Ok(())
}
