//! Wiring: opens the store, rebuilds the state, starts the writer and the
//! background tasks, and stops them all in order. It sits on top: nothing
//! below imports it (the shared state is `state.rs`, the writes `command.rs`).

use crate::command::Writer;
use crate::config::{Config, ReplicationMode};
use crate::registry::Registry;
use crate::routes::Routes;
use crate::state::{Core, Plane};
use crate::store::{Op, Store};
use anyhow::Context;
use prealloc_wire::Availability;
use rand::RngCore;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// A running control plane without a socket: tests call [`ControlPlane::app`].
pub struct ControlPlane {
    plane: Plane,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    tasks: JoinSet<()>,
}

fn random_epoch() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ControlPlane {
    /// Opens the store named in the config and starts everything.
    pub async fn start(config: Config) -> anyhow::Result<ControlPlane> {
        let store = crate::store::open(&config.store)?;
        ControlPlane::start_with_store(config, store).await
    }

    /// Starts on any store (the seam a server database plugs into).
    pub async fn start_with_store(
        config: Config,
        mut store: Box<dyn Store>,
    ) -> anyhow::Result<ControlPlane> {
        let window = crate::registry::load_window(&config, crate::now_ms());
        let mut snap = store.load(window).context("cannot read the database")?;
        if snap.meta("epoch").is_none() {
            // A new database: its epoch identifies it to pollers for its whole life.
            let ops = vec![
                Op::SetMeta {
                    key: "epoch".into(),
                    value: random_epoch(),
                },
                Op::SetMeta {
                    key: "version".into(),
                    value: "1".into(),
                },
            ];
            store
                .commit(&ops)
                .context("cannot initialise the database")?;
            snap = store.load(window)?;
        }
        if snap.meta(crate::registry::ID_KEY).is_none() {
            // Its consumer ids' key (`ids.rs`), for its whole life; a database
            // from before gets one too (its older ids stay findable).
            let ops = vec![Op::SetMeta {
                key: crate::registry::ID_KEY.into(),
                value: crate::ids::IdKey::random_hex(),
            }];
            store
                .commit(&ops)
                .context("cannot initialise the database")?;
            snap = store.load(window)?;
        }
        let epoch = snap.meta("epoch").unwrap_or_default().to_owned();
        let version: u64 = snap
            .meta("version")
            .unwrap_or("1")
            .parse()
            .context("meta `version` in the database is not a number")?;
        let registry = Registry::from_snapshot(&config, &snap)?;
        let (entries, leaving) = registry.route_window(crate::now_ms());
        let leases = registry.leases();
        let registering = registry.registering();
        let routes = Routes::new(
            epoch,
            version.max(1),
            entries,
            registry.manager_routes(),
            config.push.change_log,
            config.push.page_entries,
        );
        let pools = registry.pools().len();
        let provisioning = registry.provisioning();
        let active = config.replication.mode == ReplicationMode::Active;
        let db = store
            .reader()
            .context("cannot open a second connection to the database")?;
        let mut core = Core::new(config, registry, db, routes);
        let replicate_rx = active.then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            core.replicate_tx = Some(tx);
            rx
        });
        // A shared database: woken when another control plane commits, and
        // the background duties only while this one holds their lease.
        let foreign_commits = store.foreign_commits();
        let duty_lease = store.duties();
        if duty_lease.is_some() {
            core.duties.send_replace(false);
        }
        let core = Arc::new(core);
        if duty_lease.is_none() {
            core.expiry.push(leaving);
            core.leases.push(leases);
        }
        let (tx, rx) = mpsc::channel(65_536);
        let writer = Writer::new(tx, core.writer_failure.subscribe());
        let writer_core = core.clone();
        let writer_thread = std::thread::Builder::new()
            .name("prealloc-writer".into())
            .spawn(move || crate::writer::run(writer_core, store, rx))
            .context("cannot start the writer thread")?;
        let plane = Plane {
            core: core.clone(),
            writer,
        };
        let mut tasks = JoinSet::new();
        if let Some(mut woken) = foreign_commits {
            let writer = plane.writer.clone();
            tasks.spawn(async move {
                while woken.recv().await.is_some() {
                    writer.catch_up();
                }
            });
        }
        for pool in 0..pools {
            tasks.spawn(crate::allocator::run_pool(plane.clone(), pool));
        }
        if let Some(lease) = duty_lease {
            tasks.spawn(follow_duties(plane.clone(), lease));
        } else {
            for (id, manager) in provisioning {
                tasks.spawn(crate::allocator::provision(plane.clone(), id, manager));
            }
        }
        // Consumers that were only waiting for a manager that is down now
        // (retired in the config, or marked down before a restart) settle.
        let down: Vec<String> = core
            .registry()
            .managers()
            .iter()
            .filter(|m| m.availability == Availability::Down)
            .map(|m| m.id.clone())
            .collect();
        if !down.is_empty() {
            let plane = plane.clone();
            tasks.spawn(async move {
                for manager in down {
                    let write = crate::command::SetAvailability {
                        manager: manager.clone(),
                        availability: Availability::Down,
                    };
                    if let Err(e) = plane.writer.call(write).await {
                        tracing::warn!(%manager, error = ?e, "could not settle the consumers waiting for a down manager");
                    }
                }
            });
        }
        tasks.spawn(crate::expiry::run(plane.clone()));
        tasks.spawn(crate::expiry::run_leases(plane.clone()));
        if let Some(rx) = replicate_rx {
            if let (Some(tx), true) = (&core.replicate_tx, core.on_duty()) {
                for c in registering {
                    let _ = tx.send(c);
                }
            }
            tasks.spawn(crate::replicator::run(plane.clone(), rx));
        }
        tracing::info!(
            epoch = core.routes.epoch(),
            version = core.routes.version(),
            consumers = core.registry().consumer_count(),
            routes = core.routes.len(),
            store = %core.config.store,
            "control plane started"
        );
        Ok(ControlPlane {
            plane,
            writer_thread: Some(writer_thread),
            tasks,
        })
    }

    /// The HTTP application (no socket).
    pub fn app(&self) -> crate::api::App {
        crate::api::App::new(self.plane.clone())
    }

    pub fn plane(&self) -> &Plane {
        &self.plane
    }

    /// Stops background tasks, lets the writer finish what is queued, and closes the store.
    pub async fn shutdown(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        self.plane.core.stop.send_replace(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.plane.writer.stop().await;
        if let Some(t) = self.writer_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::info!("control plane stopped");
    }
}

/// A shared database: takes the background duties up when this control plane
/// gets their lease (everything pending, from the state it holds, as a start
/// does), and drops its deadlines when it loses it (the new holder has them).
async fn follow_duties(plane: Plane, mut lease: tokio::sync::watch::Receiver<bool>) {
    let core = plane.core.clone();
    loop {
        let held = *lease.borrow_and_update();
        if held != core.on_duty() {
            core.duties.send_replace(held);
            if held {
                let now = crate::now_ms();
                let (leaving, leases, registering, provisioning) = {
                    let reg = core.registry();
                    let (_, leaving) = reg.route_window(now);
                    (leaving, reg.leases(), reg.registering(), reg.provisioning())
                };
                core.expiry.push(leaving);
                core.leases.push(leases);
                if let Some(tx) = &core.replicate_tx {
                    for c in registering {
                        let _ = tx.send(c);
                    }
                }
                // Provisioning is idempotent on the id (the manager contract):
                // what the last holder left in flight is asked for again.
                for (id, manager) in provisioning {
                    tokio::spawn(crate::allocator::provision(plane.clone(), id, manager));
                }
                core.pool_notify.iter().for_each(|n| n.notify_one());
            } else {
                core.expiry.clear();
                core.leases.clear();
            }
        }
        if lease.changed().await.is_err() {
            core.duties.send_replace(false);
            return;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Without an orderly shutdown, at least stop the writer so the store closes.
        self.plane.core.stop.send_replace(true);
        self.tasks.abort_all();
        self.plane.writer.try_stop();
    }
}
