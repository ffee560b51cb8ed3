//! The state shared by the API, the writer and the background tasks, and the
//! [`Plane`] handle they all hold. Wiring it together is `plane.rs`'s job.

use crate::command::Writer;
use crate::config::Config;
use crate::manager_client::ManagerClient;
use crate::metrics::Metrics;
use crate::pollers::Pollers;
use crate::registry::Registry;
use crate::routes::Routes;
use crate::sessions::Sessions;
use crate::store::{StoreRead, StoredConsumer};
use prealloc_wire::ConsumerId;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch, Notify};

/// Consumers waiting for a deadline, earliest first: the end of a registered
/// consumer's grace period (`Core::expiry`), or of a provisional
/// registration's lease (`Core::leases`).
#[derive(Default)]
pub struct Deadlines {
    queue: Mutex<VecDeque<(u64, ConsumerId)>>,
    pub notify: Notify,
}

impl Deadlines {
    /// Queues consumers with the time each leaves the routing table.
    pub fn push(&self, leaving: impl IntoIterator<Item = (u64, ConsumerId)>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(leaving);
        drop(q);
        self.notify.notify_one();
    }

    /// Forgets every deadline (another control plane keeps them now).
    pub fn clear(&self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Takes the consumers due at `now_ms`; also says when the next one is due.
    pub fn take_due(&self, now_ms: u64) -> (Vec<ConsumerId>, Option<u64>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        while let Some((at, _)) = q.front() {
            if *at > now_ms {
                break;
            }
            due.extend(q.pop_front().map(|(_, c)| c));
        }
        (due, q.front().map(|(at, _)| *at))
    }
}

/// State shared by the API, the writer and the background tasks.
pub struct Core {
    pub config: Config,
    registry: Mutex<Registry>,
    /// Reads of committed consumers beside the writer (settled ones are only there).
    db: Mutex<Box<dyn StoreRead>>,
    pub routes: Routes,
    pub metrics: Metrics,
    /// The Envoys polling the routes, as last seen.
    pub pollers: Pollers,
    /// Status-page sign-ins.
    pub sessions: Sessions,
    /// One per pool: wakes its allocator when depth or eligibility changed.
    pub pool_notify: Vec<Notify>,
    /// Registered consumers: when each leaves the routing table.
    pub expiry: Deadlines,
    /// Provisional registrations: when each lease ends.
    pub leases: Deadlines,
    /// Active mode: consumers that need copies.
    pub replicate_tx: Option<mpsc::UnboundedSender<ConsumerId>>,
    pub client: ManagerClient,
    /// Bounds provisioning calls in flight (`provisioning.concurrency`).
    pub provision_permits: tokio::sync::Semaphore,
    /// Flipped once at shutdown: background tasks end, long-polls answer.
    pub stop: watch::Sender<bool>,
    /// Set, with the reason, if the writer thread dies.
    pub writer_failure: watch::Sender<Option<String>>,
    /// Whether this control plane runs the background duties (pre-allocation,
    /// expiry, reclaiming, active replication): always, unless several share
    /// the database, where one holds the duty lease at a time.
    pub duties: watch::Sender<bool>,
}

impl Core {
    pub fn new(config: Config, registry: Registry, db: Box<dyn StoreRead>, routes: Routes) -> Core {
        let pools = registry.pools().len();
        let permits = config.provisioning.concurrency;
        Core {
            config,
            registry: Mutex::new(registry),
            db: Mutex::new(db),
            routes,
            metrics: Metrics::default(),
            pollers: Pollers::default(),
            sessions: Sessions::default(),
            pool_notify: (0..pools).map(|_| Notify::new()).collect(),
            expiry: Deadlines::default(),
            leases: Deadlines::default(),
            replicate_tx: None,
            client: ManagerClient::default(),
            provision_permits: tokio::sync::Semaphore::new(permits),
            stop: watch::channel(false).0,
            writer_failure: watch::channel(None).0,
            duties: watch::channel(true).0,
        }
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A consumer as committed, read from the database (a point read by id).
    pub fn stored_consumer(&self, id: &ConsumerId) -> anyhow::Result<Option<StoredConsumer>> {
        let resource = self.registry().resource_hint(id);
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.consumer(id.as_str(), resource)
    }

    /// Consumer ids as committed, in id order, at most `limit`.
    pub fn stored_consumer_ids(
        &self,
        registered_only: bool,
        limit: usize,
    ) -> anyhow::Result<Vec<String>> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.consumer_ids(registered_only, limit)
    }

    /// Whether this control plane runs the background duties now.
    pub fn on_duty(&self) -> bool {
        *self.duties.borrow()
    }

    /// Replaces the in-memory state (after a failed commit, from the store).
    pub fn replace_registry(&self, fresh: Registry) {
        *self.registry() = fresh;
    }
}

/// A cheap handle: the shared core and the writer's queue.
#[derive(Clone)]
pub struct Plane {
    pub core: Arc<Core>,
    pub writer: Writer,
}
