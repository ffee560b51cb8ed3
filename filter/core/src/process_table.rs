//! The routing table in process memory (the native build): one writer (the
//! poller on Envoy's main thread), many readers (every worker), no global lock
//! on the read path and no copy of strings per lookup.
//!
//! - Cluster names are interned once into an append-only array of
//!   `OnceLock`s; an entry stores small ids, a reader resolves them without
//!   locking. Ids are never reused, so an id a reader holds keeps its meaning.
//! - Consumer entries live in [`SHARDS`] hash maps, each behind its own
//!   `RwLock`: a lookup takes one uncontended read lock on one shard and
//!   copies a few bytes out.
//! - Availability is a small view swapped whole; readers cache it per thread
//!   and re-read it only when [`ProcessTable::availability_version`] moved.
//!
//! Write order is the same as the shared-data table's: the managers first,
//! then each entry whole, so a reader never sees an entry naming a cluster it
//! cannot resolve, nor a half-written entry.

use prealloc_wire::{ConsumerId, ConsumerState};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::decision::EntryView;
use crate::table::{AvailabilityView, TableWrite};

/// Shards of the consumer map (a power of two).
pub const SHARDS: usize = 64;
/// Most distinct cluster names the table can intern.
pub const MAX_CLUSTERS: usize = 4096;
/// Replica ids kept inline in an entry; longer sets spill to the heap.
const INLINE: usize = 7;

/// Consumer ids are random: their first bytes are already a good hash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
}

type Shard = RwLock<HashMap<[u8; 16], Packed, BuildHasherDefault<IdHasher>>>;

/// A consumer's entry as stored: state and replica cluster ids, first manager first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packed {
    Inline {
        state: ConsumerState,
        len: u8,
        ids: [u16; INLINE],
    },
    Spilled {
        state: ConsumerState,
        ids: Box<[u16]>,
    },
}

impl Packed {
    fn new(state: ConsumerState, ids: &[u16]) -> Packed {
        if ids.len() <= INLINE {
            let mut inline = [0u16; INLINE];
            for (slot, id) in inline.iter_mut().zip(ids) {
                *slot = *id;
            }
            Packed::Inline {
                state,
                len: ids.len() as u8,
                ids: inline,
            }
        } else {
            Packed::Spilled {
                state,
                ids: ids.into(),
            }
        }
    }

    pub fn state(&self) -> ConsumerState {
        match self {
            Packed::Inline { state, .. } | Packed::Spilled { state, .. } => *state,
        }
    }

    pub fn ids(&self) -> &[u16] {
        match self {
            Packed::Inline { len, ids, .. } => ids.get(..usize::from(*len)).unwrap_or_default(),
            Packed::Spilled { ids, .. } => ids,
        }
    }
}

/// An entry read from the table, resolving its ids against the table's names.
#[derive(Debug, Clone)]
pub struct ProcessEntry<'t> {
    packed: Packed,
    table: &'t ProcessTable,
}

impl EntryView for ProcessEntry<'_> {
    fn state(&self) -> ConsumerState {
        self.packed.state()
    }
    fn replicas(&self) -> impl Iterator<Item = &str> + Clone {
        self.packed
            .ids()
            .iter()
            .filter_map(|&id| self.table.name(id))
    }
}

/// Why a write was refused (the rest of the response still applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// More than [`MAX_CLUSTERS`] distinct cluster names.
    TooManyClusters,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::TooManyClusters => {
                write!(f, "more than {MAX_CLUSTERS} distinct manager clusters")
            }
        }
    }
}

impl std::error::Error for WriteError {}

/// The process-wide routing table.
pub struct ProcessTable {
    names: Box<[OnceLock<Box<str>>]>,
    /// Writer side of the interning (one writer; the lock is never on a read path).
    ids: Mutex<HashMap<Box<str>, u16>>,
    shards: Box<[Shard]>,
    entries: AtomicUsize,
    availability: RwLock<Arc<AvailabilityView>>,
    availability_version: AtomicU64,
}

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable")
            .field("entries", &self.len())
            .field("availability_version", &self.availability_version())
            .finish_non_exhaustive()
    }
}

impl Default for ProcessTable {
    fn default() -> Self {
        ProcessTable::new()
    }
}

impl ProcessTable {
    pub fn new() -> ProcessTable {
        ProcessTable {
            names: (0..MAX_CLUSTERS).map(|_| OnceLock::new()).collect(),
            ids: Mutex::new(HashMap::new()),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            entries: AtomicUsize::new(0),
            availability: RwLock::new(Arc::new(AvailabilityView::all_available())),
            availability_version: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &[u8; 16]) -> Option<&Shard> {
        self.shards.get(usize::from(key[15]) % SHARDS)
    }

    /// A cluster name by id (lock-free).
    pub fn name(&self, id: u16) -> Option<&str> {
        self.names.get(usize::from(id))?.get().map(|s| &**s)
    }

    fn intern(&self, cluster: &str) -> Result<u16, WriteError> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = ids.get(cluster) {
            return Ok(id);
        }
        let id = ids.len();
        let slot = self.names.get(id).ok_or(WriteError::TooManyClusters)?;
        // Published before any entry can name it (the caller writes entries after).
        let _ = slot.set(cluster.into());
        let id = u16::try_from(id).map_err(|_| WriteError::TooManyClusters)?;
        ids.insert(cluster.into(), id);
        Ok(id)
    }

    /// Applies one write of the poller.
    pub fn apply(&self, write: TableWrite<'_>) -> Result<(), WriteError> {
        match write {
            TableWrite::Managers(managers) => {
                for (cluster, _) in managers {
                    self.intern(cluster)?;
                }
                let view = AvailabilityView::of_managers(managers.iter().copied());
                *self.availability.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
                self.availability_version.fetch_add(1, Ordering::Release);
            }
            TableWrite::Entry {
                consumer,
                state,
                replicas,
            } => {
                let ids = replicas
                    .iter()
                    .map(|c| self.intern(c))
                    .collect::<Result<Vec<u16>, _>>()?;
                let key = consumer.to_bytes();
                if let Some(shard) = self.shard(&key) {
                    let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
                    if map.insert(key, Packed::new(state, &ids)).is_none() {
                        self.entries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            TableWrite::Remove(consumer) => {
                let key = consumer.to_bytes();
                if let Some(shard) = self.shard(&key) {
                    let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
                    if map.remove(&key).is_some() {
                        self.entries.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    }

    /// The consumer's entry (one shard read lock; a few bytes copied out).
    pub fn get(&self, consumer: &ConsumerId) -> Option<ProcessEntry<'_>> {
        let key = consumer.to_bytes();
        let map = self.shard(&key)?.read().unwrap_or_else(|p| p.into_inner());
        let packed = map.get(&key)?.clone();
        drop(map);
        Some(ProcessEntry {
            packed,
            table: self,
        })
    }

    /// Bumped on every availability change: a reader's cache is stale when it moved.
    pub fn availability_version(&self) -> u64 {
        self.availability_version.load(Ordering::Acquire)
    }

    pub fn availability(&self) -> Arc<AvailabilityView> {
        self.availability
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Consumer entries held.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prealloc_wire::Availability;
    use proptest::prelude::*;

    fn id(n: u8) -> ConsumerId {
        ConsumerId::from_bytes([n; 16])
    }

    #[test]
    fn entries_round_trip_with_their_replica_order() {
        let t = ProcessTable::new();
        t.apply(TableWrite::Managers(&[
            ("m1", Availability::Available),
            ("m2", Availability::Down),
        ]))
        .unwrap();
        let c = id(1);
        t.apply(TableWrite::Entry {
            consumer: &c,
            state: ConsumerState::Registering,
            replicas: &["m2", "m1", "m9"],
        })
        .unwrap();
        let e = t.get(&c).unwrap();
        assert_eq!(e.state(), ConsumerState::Registering);
        assert_eq!(e.replicas().collect::<Vec<_>>(), ["m2", "m1", "m9"]);
        assert!(t.availability().is_down("m2"));
        assert_eq!(t.len(), 1);
        t.apply(TableWrite::Remove(&c)).unwrap();
        assert!(t.get(&c).is_none());
        assert!(t.is_empty());
        t.apply(TableWrite::Remove(&c)).unwrap();
        assert_eq!(t.len(), 0, "removing twice counts once");
    }

    #[test]
    fn long_replica_sets_spill_and_availability_versions_move() {
        let t = ProcessTable::new();
        let names: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let c = id(2);
        t.apply(TableWrite::Entry {
            consumer: &c,
            state: ConsumerState::Registered,
            replicas: &refs,
        })
        .unwrap();
        assert_eq!(t.get(&c).unwrap().replicas().collect::<Vec<_>>(), refs);
        let v = t.availability_version();
        t.apply(TableWrite::Managers(&[("c1", Availability::Down)]))
            .unwrap();
        assert!(t.availability_version() > v);
        assert!(t.availability().is_down("c1"));
    }

    #[test]
    fn too_many_clusters_is_an_error_not_a_panic() {
        let t = ProcessTable::new();
        for i in 0..MAX_CLUSTERS {
            t.intern(&format!("c{i}")).unwrap();
        }
        let c = id(3);
        let err = t.apply(TableWrite::Entry {
            consumer: &c,
            state: ConsumerState::Registering,
            replicas: &["one-too-many"],
        });
        assert_eq!(err, Err(WriteError::TooManyClusters));
        assert!(t.get(&c).is_none());
    }

    proptest! {
        /// The table behaves like a plain map of what was last written.
        #[test]
        fn the_table_is_a_map_of_the_last_write(ops in prop::collection::vec((0u8..8, prop::option::of(prop::collection::vec("[a-e]", 1..10))), 0..60)) {
            let t = ProcessTable::new();
            let mut model: HashMap<u8, Vec<String>> = HashMap::new();
            for (who, write) in &ops {
                let c = id(*who);
                match write {
                    Some(replicas) => {
                        let refs: Vec<&str> = replicas.iter().map(String::as_str).collect();
                        t.apply(TableWrite::Entry { consumer: &c, state: ConsumerState::Registering, replicas: &refs }).unwrap();
                        model.insert(*who, replicas.clone());
                    }
                    None => {
                        t.apply(TableWrite::Remove(&c)).unwrap();
                        model.remove(who);
                    }
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for who in 0u8..8 {
                let got = t.get(&id(who)).map(|e| e.replicas().map(str::to_owned).collect::<Vec<_>>());
                prop_assert_eq!(got, model.get(&who).cloned());
            }
        }
    }
}
