//! One group commit being built: the store ops that make it durable and the
//! effects to publish once it is (route changes, pool wake-ups, follow-up work).

use crate::routes::Change;
use crate::store::Op;
use prealloc_wire::ConsumerId;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeSet;

/// What the commands of one batch did, counted for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub commands: u64,
    pub registrations: u64,
    pub pool_empty: u64,
    pub bad_request: u64,
    pub released: u64,
    pub reclaimed: u64,
    pub replicas: u64,
    pub registered: u64,
}

/// The batch the writer is applying. Commands only add to it; nothing in it is
/// visible outside the writer until the store committed it.
pub struct Batch {
    /// The batch's clock (ms since the Unix epoch), one reading for every command.
    pub now_ms: u64,
    pub ops: Vec<Op>,
    /// Routing-table changes in order (`None` removes the consumer).
    pub changes: Vec<Change>,
    /// A manager's availability changed: the managers list is published again.
    pub managers_changed: bool,
    /// Pools whose allocator must look again (their depth or eligibility moved).
    pub pools: BTreeSet<usize>,
    /// Every pool must look again (an availability change touches them all).
    pub all_pools: bool,
    /// New registering consumers (active replication copies their data).
    pub to_replicate: Vec<ConsumerId>,
    /// Consumers that became registered: when each leaves the routing table.
    pub leaving: Vec<(u64, ConsumerId)>,
    /// New provisional registrations: when each lease ends.
    pub leases: Vec<(u64, ConsumerId)>,
    /// Sign-up to copy delays of the replicas recorded.
    pub lags_ms: Vec<u64>,
    pub counts: Counts,
    /// Consumer ids are drawn from here.
    pub rng: StdRng,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            now_ms: 0,
            ops: Vec::new(),
            changes: Vec::new(),
            managers_changed: false,
            pools: BTreeSet::new(),
            all_pools: false,
            to_replicate: Vec::new(),
            leaving: Vec::new(),
            leases: Vec::new(),
            lags_ms: Vec::new(),
            counts: Counts::default(),
            rng: StdRng::from_entropy(),
        }
    }

    /// Empties the batch for the next round (keeping its allocations).
    pub fn begin(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.ops.clear();
        self.changes.clear();
        self.managers_changed = false;
        self.pools.clear();
        self.all_pools = false;
        self.to_replicate.clear();
        self.leaving.clear();
        self.leases.clear();
        self.lags_ms.clear();
        self.counts = Counts::default();
    }

    /// Whether the routing table moves with this batch (and so its version).
    pub fn routes_changed(&self) -> bool {
        !self.changes.is_empty() || self.managers_changed
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}
