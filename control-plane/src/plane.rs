//! Wiring: opens the store, rebuilds the state, starts the writer and the background
//! tasks, and stops them all in order.

use crate::config::{Config, ReplicationMode};
use crate::manager_client::ManagerClient;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::routes::Routes;
use crate::store::{Op, SqliteStore, Store};
use crate::writer::{self, Command};
use anyhow::Context;
use prealloc_wire::ConsumerId;
use rand::RngCore;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

/// Registered consumers waiting for their grace period to end, earliest first.
#[derive(Default)]
pub struct Expiry {
    queue: Mutex<VecDeque<(u64, ConsumerId)>>,
    notify: Notify,
}

impl Expiry {
    /// Queues consumers registered at the given times.
    pub fn push(&self, registered: Vec<(ConsumerId, u64)>, grace_ms: u64) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for (c, at) in registered {
            q.push_back((at.saturating_add(grace_ms), c));
        }
        drop(q);
        self.notify.notify_one();
    }
}

/// State shared by the API, the writer and the background tasks.
pub struct Core {
    pub config: Config,
    registry: Mutex<Registry>,
    pub routes: Routes,
    pub metrics: Metrics,
    /// One per pool: wakes its allocator when depth or eligibility changed.
    pub pool_notify: Vec<Notify>,
    pub expiry: Expiry,
    /// Active mode: consumers that need copies.
    pub replicate_tx: Option<mpsc::UnboundedSender<ConsumerId>>,
    pub client: ManagerClient,
    /// Bounds provisioning calls in flight (`provisioning.concurrency`).
    pub provision_permits: tokio::sync::Semaphore,
    pub stop: watch::Sender<bool>,
}

impl Core {
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A cheap handle: the shared core and the writer's queue.
#[derive(Clone)]
pub struct Plane {
    pub core: Arc<Core>,
    pub writer: mpsc::Sender<Command>,
}

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
    /// Opens the database named in the config and starts everything.
    pub async fn start(config: Config) -> anyhow::Result<ControlPlane> {
        let store = SqliteStore::open(&config.database)?;
        ControlPlane::start_with_store(config, Box::new(store)).await
    }

    /// Starts on any store (the seam a server database plugs into).
    pub async fn start_with_store(
        config: Config,
        mut store: Box<dyn Store>,
    ) -> anyhow::Result<ControlPlane> {
        let mut snap = store.load().context("cannot read the database")?;
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
            snap = store.load()?;
        }
        let epoch = snap.meta("epoch").unwrap_or_default().to_owned();
        let version: u64 = snap
            .meta("version")
            .unwrap_or("1")
            .parse()
            .context("meta `version` in the database is not a number")?;
        let registry = Registry::from_snapshot(&config, &snap)?;
        let now = crate::now_ms();
        let (registering, registered) = registry.consumers_by_state();
        let grace = config.grace_period_ms;
        let in_grace: Vec<(ConsumerId, u64)> = registered
            .into_iter()
            .filter(|(_, at)| at.saturating_add(grace) > now)
            .collect();
        let entries = registering
            .iter()
            .chain(in_grace.iter().map(|(c, _)| c))
            .filter_map(|c| registry.route_entry(c))
            .collect();
        let routes = Routes::new(
            epoch,
            version.max(1),
            entries,
            registry.manager_routes(),
            config.push.change_log,
        );
        let pools = registry.pools().len();
        let (replicate_tx, replicate_rx) = if config.replication.mode == ReplicationMode::Active {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (stop, _) = watch::channel(false);
        let provisioning = registry.provisioning();
        let config_concurrency = config.provisioning.concurrency;
        let core = Arc::new(Core {
            config,
            registry: Mutex::new(registry),
            routes,
            metrics: Metrics::default(),
            pool_notify: (0..pools).map(|_| Notify::new()).collect(),
            expiry: Expiry::default(),
            replicate_tx,
            client: ManagerClient::default(),
            provision_permits: tokio::sync::Semaphore::new(config_concurrency),
            stop,
        });
        core.expiry.push(in_grace, grace);
        let (tx, rx) = mpsc::channel(65_536);
        let writer_core = core.clone();
        let writer_thread = std::thread::Builder::new()
            .name("prealloc-writer".into())
            .spawn(move || writer::run(writer_core, store, rx))
            .context("cannot start the writer thread")?;
        let plane = Plane {
            core: core.clone(),
            writer: tx,
        };
        let mut tasks = JoinSet::new();
        for pool in 0..pools {
            tasks.spawn(crate::allocator::run_pool(plane.clone(), pool));
        }
        for (id, manager) in provisioning {
            tasks.spawn(crate::allocator::provision(plane.clone(), id, manager));
        }
        tasks.spawn(expire_loop(plane.clone()));
        if let Some(rx) = replicate_rx {
            if let Some(tx) = &core.replicate_tx {
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
            database = %core.config.database.display(),
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
        let _ = self.plane.writer.send(Command::Stop).await;
        if let Some(t) = self.writer_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::info!("control plane stopped");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Without an orderly shutdown, at least stop the writer so the store closes.
        self.plane.core.stop.send_replace(true);
        self.tasks.abort_all();
        let _ = self.plane.writer.try_send(Command::Stop);
    }
}

/// Removes registered consumers from the routing table when their grace period ends.
async fn expire_loop(plane: Plane) {
    let core = &plane.core;
    loop {
        let notified = core.expiry.notify.notified();
        let (due, next) = {
            let mut q = core.expiry.queue.lock().unwrap_or_else(|p| p.into_inner());
            let now = crate::now_ms();
            let mut due = Vec::new();
            while let Some((at, _)) = q.front() {
                if *at > now {
                    break;
                }
                due.push(q.pop_front().expect("front exists").1);
            }
            (due, q.front().map(|(at, _)| *at))
        };
        if !due.is_empty() {
            let _ = writer::call(&plane.writer, |reply| Command::Expire {
                consumers: due,
                reply,
            })
            .await;
            continue;
        }
        match next {
            Some(at) => {
                let wait = at.saturating_sub(crate::now_ms());
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}
