//! The `prealloc-control-plane` binary: `serve`, config checks and admin listings.

use clap::{Parser, Subcommand};
use prealloc_control_plane::config::Config;
use prealloc_control_plane::registry::Registry;
use prealloc_control_plane::store::{Store, StoreRead};
use std::path::PathBuf;
use std::process::ExitCode;

/// prealloc control plane: pre-allocates resources on managers, registers new
/// consumers, tracks replication and pushes the routing table to every Envoy.
///
/// Start it with `serve --config prealloc.toml` (see control-plane/examples/prealloc.toml).
/// The admin commands read the same database, so they work beside a running server.
#[derive(Parser)]
#[command(name = "prealloc-control-plane", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the HTTP API (routes long-poll, registrations, replicas, admin) until SIGTERM or ctrl-c.
    Serve {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log as JSON lines instead of text (RUST_LOG sets the level, default info).
        #[arg(long)]
        json_logs: bool,
    },
    /// Check a config file and print what it describes.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List managers with availability and free capacity (reads the database).
    Managers {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List pools with depth and target (reads the database).
    Pools {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List consumers with state and replicas (reads the database).
    Consumers {
        #[arg(long, short)]
        config: PathBuf,
        /// Only consumers in this state: registering or registered.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prealloc-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// The state as a running control plane would hold it, and the database for
/// what it leaves there (settled consumers).
fn load_registry(config: &std::path::Path) -> anyhow::Result<(Box<dyn Store>, Registry)> {
    let cfg = Config::load(config)?;
    let mut store = prealloc_control_plane::store::open_read_only(&cfg.store)?;
    let snap = store.load(prealloc_control_plane::registry::load_window(
        &cfg,
        prealloc_control_plane::now_ms(),
    ))?;
    let reg = Registry::from_snapshot(&cfg, &snap)?;
    Ok((store, reg))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { config, json_logs } => {
            init_logs(json_logs);
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(cfg.listen)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot listen on {}: {e}; change `listen` in the config",
                            cfg.listen
                        )
                    })?;
                let addr = listener.local_addr()?;
                let cp = prealloc_control_plane::ControlPlane::start(cfg).await?;
                tracing::info!(%addr, "listening");
                // Printed on stdout so launchers can learn the port when listen ends in :0.
                println!("listening on {addr}");
                prealloc_control_plane::server::serve(cp, listener, shutdown_signal()).await
            })
        }
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!("config ok: listen {} store {}", cfg.listen, cfg.store);
            println!(
                "{} managers, {} pools, replication {:?} target {:?}, grace {} ms",
                cfg.managers.len(),
                cfg.pools.len(),
                cfg.replication.mode,
                cfg.replication.target,
                cfg.grace_period_ms
            );
            Ok(())
        }
        Cmd::Managers { config } => {
            let (_, reg) = load_registry(&config)?;
            println!(
                "{:<12} {:<20} {:<12} {:<10} capacity (used/capacity, free)",
                "id", "cluster", "location", "availability"
            );
            for i in 0..reg.managers().len() {
                let v = reg.manager_view(i);
                let caps: Vec<String> = v
                    .capacity
                    .iter()
                    .map(|(t, c)| format!("{t} {}/{} free {}", c.used, c.capacity, c.free))
                    .collect();
                println!(
                    "{:<12} {:<20} {:<12} {:<10} {}",
                    v.id,
                    v.cluster,
                    v.location,
                    v.availability.as_str(),
                    caps.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Pools { config } => {
            let (_, reg) = load_registry(&config)?;
            println!(
                "{:<16} {:<12} {:>8} {:>8} {:>12} per manager",
                "resource_type", "location", "depth", "target", "provisioning"
            );
            for i in 0..reg.pools().len() {
                let v = reg.pool_view(i);
                let per: Vec<String> = v
                    .ready_by_manager
                    .iter()
                    .map(|(m, n)| format!("{m}={n}"))
                    .collect();
                println!(
                    "{:<16} {:<12} {:>8} {:>8} {:>12} {}",
                    v.resource_type,
                    v.location,
                    v.depth,
                    v.target_depth,
                    v.provisioning,
                    per.join(" ")
                );
            }
            Ok(())
        }
        Cmd::Consumers {
            config,
            state,
            limit,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some("registering") => Some(prealloc_wire::ConsumerState::Registering),
                Some("registered") => Some(prealloc_wire::ConsumerState::Registered),
                Some(other) => {
                    anyhow::bail!("--state {other:?}: expected registering or registered")
                }
            };
            let (mut store, reg) = load_registry(&config)?;
            println!(
                "{:<24} {:<12} {:<20} replicas",
                "consumer", "state", "resource"
            );
            // Registering ones are all in memory; registered ones may be settled.
            let ids = match state {
                Some(prealloc_wire::ConsumerState::Registering) => reg.list_consumers(state, limit),
                _ => store
                    .consumer_ids(state.is_some(), limit)?
                    .iter()
                    .filter_map(|id| prealloc_wire::ConsumerId::parse(id).ok())
                    .collect(),
            };
            for c in ids {
                let record = match reg.consumer_record(&c) {
                    Some(r) => Some(r),
                    None => store
                        .consumer(c.as_str(), reg.resource_hint(&c))?
                        .and_then(|s| reg.stored_record(&s)),
                };
                if let Some(r) = record {
                    let reps: Vec<&str> = r.replicas.iter().map(|x| x.manager.as_str()).collect();
                    println!(
                        "{:<24} {:<12} {:<20} {}",
                        r.consumer,
                        r.state.as_str(),
                        r.resource.name,
                        reps.join(",")
                    );
                }
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
