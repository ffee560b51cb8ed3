//! The storage seam: the domain logic hands batches of [`Op`]s to a [`Store`] and
//! rebuilds itself from a [`Snapshot`]. SQLite is the embedded default;
//! PostgreSQL (`[store] kind = "postgres"`) is for a database server.
//!
//! The database holds every consumer ever registered; memory holds only the
//! ones the routing table, the leases and replication still need (see
//! [`settled`]). The others are read back one at a time ([`StoreRead`]).

pub mod faulty;
pub mod postgres;
pub mod sqlite;

pub use faulty::{Faults, FaultyStore};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::config::StoreConfig;
use prealloc_wire::{ConsumerId, ManagerRoute, RouteEntry};
use serde::{Deserialize, Serialize};

/// Opens the configured store for the server: created and migrated if needed.
pub fn open(config: &StoreConfig) -> anyhow::Result<Box<dyn Store>> {
    Ok(match config {
        StoreConfig::Sqlite { path } => Box::new(SqliteStore::open(path)?),
        StoreConfig::Postgres(pg) => Box::new(PostgresStore::open(pg)?),
    })
}

/// Opens the configured store for reads only (admin commands beside a server).
pub fn open_read_only(config: &StoreConfig) -> anyhow::Result<Box<dyn Store>> {
    Ok(match config {
        StoreConfig::Sqlite { path } => Box::new(SqliteStore::open_read_only(path)?),
        StoreConfig::Postgres(pg) => Box::new(PostgresStore::open_read_only(pg)?),
    })
}

/// Where a resource is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceState {
    /// Capacity reserved on its manager; the manager is being asked to provision it.
    Provisioning,
    /// In its pool, ready to be handed to a new consumer.
    Ready,
    /// Handed to a consumer.
    Assigned,
}

impl ResourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceState::Provisioning => "provisioning",
            ResourceState::Ready => "ready",
            ResourceState::Assigned => "assigned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "provisioning" => Some(ResourceState::Provisioning),
            "ready" => Some(ResourceState::Ready),
            "assigned" => Some(ResourceState::Assigned),
            _ => None,
        }
    }
}

/// A resource row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRow {
    pub id: u64,
    pub resource_type: String,
    pub name: String,
    pub location: String,
    pub manager: String,
    pub state: ResourceState,
    pub consumer: Option<String>,
    pub created_ms: u64,
}

/// A consumer, as loaded (consumers live in their resource's row: a registration
/// then writes one row in place instead of inserting into a randomly keyed table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRow {
    pub id: String,
    pub resource: u64,
    pub manager: String,
    pub registered: bool,
    pub created_ms: u64,
    pub registered_ms: Option<u64>,
    /// When the registration was confirmed; `None` while it is provisional.
    pub confirmed_ms: Option<u64>,
}

/// One confirmed copy of a consumer's data, keyed by the consumer's resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRow {
    pub resource: u64,
    pub manager: String,
    pub at_ms: u64,
}

/// One durable change. A batch of them is committed atomically. (Serialized
/// in the batch log of a database several control planes share.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    SetMeta {
        key: String,
        value: String,
    },
    SetAvailability {
        manager: String,
        availability: String,
    },
    PutResource(ResourceRow),
    SetResourceState {
        id: u64,
        state: ResourceState,
        consumer: Option<String>,
    },
    DeleteResource {
        id: u64,
    },
    /// Hands a ready resource to a new consumer.
    Assign {
        resource: u64,
        consumer: String,
        created_ms: u64,
        registered_ms: Option<u64>,
    },
    /// Gives the resource back (ready again) and drops its consumer's replica rows.
    Unassign {
        resource: u64,
    },
    SetRegistered {
        resource: u64,
        registered_ms: u64,
    },
    /// The registration is confirmed: it is no longer reclaimed, nor given back.
    Confirm {
        resource: u64,
        at_ms: u64,
    },
    PutReplica(ReplicaRow),
    /// The routing-table changes the batch publishes, at its version, on a
    /// database several control planes share (`Store::shared`): kept in its
    /// log for the others to publish as they are.
    Published(Published),
}

/// Routing-table changes as one batch published them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub version: u64,
    /// In order; `None` removes the consumer.
    pub changes: Vec<(ConsumerId, Option<RouteEntry>)>,
    /// The whole manager list, when it changed.
    pub managers: Option<Vec<ManagerRoute>>,
}

/// A shared database's batch log no longer holds the batches this control
/// plane has yet to replay (`Store::begin`): only a restart, a fresh load,
/// catches it up.
#[derive(Debug)]
pub struct FellBehind {
    pub next: u64,
    pub oldest: u64,
    /// How long the log keeps batches.
    pub kept_ms: u64,
}

impl std::fmt::Display for FellBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this control plane fell behind the shared database: it needs batch {} but the log \
             starts at {} (it keeps {} minutes); restart it",
            self.next,
            self.oldest,
            self.kept_ms / 60_000
        )
    }
}

impl std::error::Error for FellBehind {}

/// A batch another control plane committed to a shared database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub ops: Vec<Op>,
}

impl Foreign {
    /// The routing-table changes it published, if any.
    pub fn published(&self) -> Option<&Published> {
        self.ops.iter().find_map(|op| match op {
            Op::Published(p) => Some(p),
            _ => None,
        })
    }
}

/// Whether a consumer is settled: registered, confirmed, and out of the route
/// window (its grace period is over). Nothing about it changes any more but
/// late copies, so it lives in the database only, not in memory.
pub fn settled(
    registered_ms: Option<u64>,
    confirmed_ms: Option<u64>,
    now_ms: u64,
    grace_ms: u64,
) -> bool {
    confirmed_ms.is_some() && registered_ms.is_some_and(|at| at.saturating_add(grace_ms) <= now_ms)
}

/// What a load leaves in the database: the consumers [`settled`] at `now_ms`,
/// except the `recent` newest sign-ups (the status page follows them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadWindow {
    pub now_ms: u64,
    pub grace_ms: u64,
    pub recent: usize,
}

impl LoadWindow {
    /// Loads every consumer (nothing counts as settled).
    pub const ALL: LoadWindow = LoadWindow {
        now_ms: 0,
        grace_ms: u64::MAX,
        recent: 0,
    };
}

/// Settled consumers a load left in the database, per first manager and type:
/// their resources still count as used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledCount {
    pub manager: String,
    pub resource_type: String,
    pub location: String,
    pub count: u64,
}

/// Everything needed to rebuild the in-memory state at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub meta: Vec<(String, String)>,
    pub availability: Vec<(String, String)>,
    /// Resources that are ready or provisioning, and those of the consumers loaded.
    pub resources: Vec<ResourceRow>,
    /// Consumers that are not settled (plus the newest few).
    pub consumers: Vec<ConsumerRow>,
    /// Copies of the consumers loaded.
    pub replicas: Vec<ReplicaRow>,
    /// Consumers left in the database.
    pub settled: Vec<SettledCount>,
}

impl Snapshot {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A resource row's columns as both stores read them (`RESOURCE_COLUMNS`
/// in each): [`StoredRow::split`] makes the resource and, when it is
/// assigned, its consumer.
pub(crate) struct StoredRow {
    pub id: i64,
    pub resource_type: String,
    pub name: String,
    pub location: String,
    pub manager: String,
    pub state: String,
    pub consumer: Option<String>,
    pub created_ms: i64,
    pub consumer_created_ms: Option<i64>,
    pub registered_ms: Option<i64>,
    pub confirmed_ms: Option<i64>,
}

impl StoredRow {
    pub fn split(self) -> anyhow::Result<(ResourceRow, Option<ConsumerRow>)> {
        let id = self.id as u64;
        let state = ResourceState::parse(&self.state)
            .ok_or_else(|| anyhow::anyhow!("resource {id} has unknown state {:?}", self.state))?;
        let consumer = self.consumer.as_ref().map(|cid| {
            let registered_ms = self.registered_ms.map(|v| v as u64);
            ConsumerRow {
                id: cid.clone(),
                resource: id,
                manager: self.manager.clone(),
                registered: registered_ms.is_some(),
                created_ms: self.consumer_created_ms.unwrap_or(0) as u64,
                registered_ms,
                confirmed_ms: self.confirmed_ms.map(|v| v as u64),
            }
        });
        let resource = ResourceRow {
            id,
            resource_type: self.resource_type,
            name: self.name,
            location: self.location,
            manager: self.manager,
            state,
            consumer: self.consumer,
            created_ms: self.created_ms as u64,
        };
        Ok((resource, consumer))
    }
}

/// One consumer as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConsumer {
    pub consumer: ConsumerRow,
    pub resource: ResourceRow,
    /// Its copies, oldest first.
    pub replicas: Vec<ReplicaRow>,
}

/// Reads of what is committed, one consumer at a time.
pub trait StoreRead: Send {
    /// The consumer with this id, if it was ever registered and not given
    /// back. `resource` is where its id says it is (`ids.rs`): a read by
    /// primary key, checked against the id; ids from before the scheme are
    /// found in the table of them the migration kept.
    fn consumer(&mut self, id: &str, resource: u64) -> anyhow::Result<Option<StoredConsumer>>;
    /// Consumer ids in resource order (about the order they signed up), only
    /// registered ones if asked, at most `limit`.
    fn consumer_ids(&mut self, registered_only: bool, limit: usize) -> anyhow::Result<Vec<String>>;
}

/// A durable store. `commit` must not return before the batch is durable.
pub trait Store: StoreRead + 'static {
    /// Reads back everything but the settled consumers (at start, or after a failed commit).
    fn load(&mut self, window: LoadWindow) -> anyhow::Result<Snapshot>;
    /// Applies the batch in one transaction; all or nothing, durable on `Ok`.
    fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()>;
    /// A second handle for reads beside the writer (the API's lookups).
    fn reader(&self) -> anyhow::Result<Box<dyn StoreRead>>;
    /// Whether several control planes share this database: batches then
    /// carry their routing changes (`Op::Published`) for the others.
    fn shared(&self) -> bool {
        false
    }
    /// Starts a writer round on a database several control planes share:
    /// takes its commit lock (held until the next `commit`) and returns the
    /// batches the others committed since this store last looked, in order.
    /// A store one control plane writes returns nothing.
    fn begin(&mut self) -> anyhow::Result<Vec<Foreign>> {
        Ok(Vec::new())
    }
    /// Wakes the writer when another control plane committed (a shared
    /// database); `None` where no one else writes.
    fn foreign_commits(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        None
    }
    /// Whether this control plane runs the fleet's background duties
    /// (pre-allocation, expiry, reclaiming, active replication) on a shared
    /// database: true while it holds the database's duty lease, which passes
    /// to another when it dies. `None`: it always does (nobody else writes).
    fn duties(&mut self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

impl StoreRead for Box<dyn Store> {
    fn consumer(&mut self, id: &str, resource: u64) -> anyhow::Result<Option<StoredConsumer>> {
        (**self).consumer(id, resource)
    }

    fn consumer_ids(&mut self, registered_only: bool, limit: usize) -> anyhow::Result<Vec<String>> {
        (**self).consumer_ids(registered_only, limit)
    }
}

impl Store for Box<dyn Store> {
    fn load(&mut self, window: LoadWindow) -> anyhow::Result<Snapshot> {
        (**self).load(window)
    }

    fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        (**self).commit(ops)
    }

    fn reader(&self) -> anyhow::Result<Box<dyn StoreRead>> {
        (**self).reader()
    }

    fn shared(&self) -> bool {
        (**self).shared()
    }

    fn begin(&mut self) -> anyhow::Result<Vec<Foreign>> {
        (**self).begin()
    }

    fn foreign_commits(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        (**self).foreign_commits()
    }

    fn duties(&mut self) -> Option<tokio::sync::watch::Receiver<bool>> {
        (**self).duties()
    }
}
