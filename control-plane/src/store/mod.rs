//! The storage seam: the domain logic hands batches of [`Op`]s to a [`Store`] and
//! rebuilds itself from a [`Snapshot`]; SQLite is the built-in implementation.

pub mod faulty;
pub mod sqlite;

pub use faulty::{Faults, FaultyStore};
pub use sqlite::SqliteStore;

/// Where a resource is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    pub resource: u64,
    pub manager: String,
    pub at_ms: u64,
}

/// One durable change. A batch of them is committed atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// Everything needed to rebuild the in-memory state at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub meta: Vec<(String, String)>,
    pub availability: Vec<(String, String)>,
    pub resources: Vec<ResourceRow>,
    pub consumers: Vec<ConsumerRow>,
    pub replicas: Vec<ReplicaRow>,
}

impl Snapshot {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A durable store. `commit` must not return before the batch is durable.
pub trait Store: Send + 'static {
    /// Reads everything back (at start, or after a failed commit).
    fn load(&mut self) -> anyhow::Result<Snapshot>;
    /// Applies the batch in one transaction; all or nothing, durable on `Ok`.
    fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()>;
}
