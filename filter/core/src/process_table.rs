//! The routing table in process memory (the native build): one writer (the
//! poller on Envoy's main thread), many readers (every worker), no global lock
//! on the read path and no copy of strings per lookup.
//!
//! - Cluster names are interned once into an append-only array of
//!   `OnceLock`s; an entry stores small ids, a reader resolves them without
//!   locking. Ids are never reused, so an id a reader holds keeps its meaning.
//! - Consumer entries live in [`SHARDS`] shards by the first 12 bits of the
//!   id, each a vector sorted by id behind its own `RwLock`. Ids are uniform
//!   (the control plane mints them as ciphertext), so a shard holds about
//!   n / 4096 entries: a lookup is one uncontended read lock and a bisection
//!   of a few kilobytes, a write moves at most that much. An entry is
//!   24 bytes (its id, state and up to three replica ids); longer replica
//!   sets live beside the shard. Sorted shards also answer "which ids lie in
//!   this range" ([`ProcessTable::ids_in`]), which is how a snapshot page
//!   clears the entries it no longer has, without a second set of ids.
//! - Availability is a small view swapped whole; readers cache it per thread
//!   and re-read it only when [`ProcessTable::availability_version`] moved.
//!
//! Write order is the same as the shared-data table's: the managers first,
//! then each entry whole, so a reader never sees an entry naming a cluster it
//! cannot resolve, nor a half-written entry.

use prealloc_wire::{ConsumerId, ConsumerState};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::decision::EntryView;
use crate::table::{AvailabilityView, TableWrite};

/// Shards of the consumer map: one per value of an id's first 12 bits.
pub const SHARDS: usize = 4096;
/// Most distinct cluster names the table can intern.
pub const MAX_CLUSTERS: usize = 4096;
/// Replica ids kept in an entry's slot; longer sets live in the shard's `long`.
const INLINE: usize = 3;
/// `Slot::len` of an entry whose replica ids are in the shard's `long`.
const LONG: u8 = u8::MAX;

/// FNV-1a, for interning cluster names (short strings, one writer).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// One entry as stored: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: [u8; 16],
    ids: [u16; INLINE],
    state: ConsumerState,
    /// How many of `ids` are used, or [`LONG`].
    len: u8,
}

#[derive(Debug, Default)]
struct Shard {
    /// Sorted by key, keys distinct.
    slots: Vec<Slot>,
    /// Replica ids of the entries with more than [`INLINE`], by key.
    long: BTreeMap<[u8; 16], Box<[u16]>>,
}

impl Shard {
    fn find(&self, key: &[u8; 16]) -> Result<usize, usize> {
        self.slots.binary_search_by(|s| s.key.cmp(key))
    }

    fn packed(&self, slot: &Slot) -> Packed {
        if slot.len == LONG {
            let ids = self.long.get(&slot.key).cloned().unwrap_or_default();
            return Packed::Spilled {
                state: slot.state,
                ids,
            };
        }
        Packed::Inline {
            state: slot.state,
            len: slot.len,
            ids: slot.ids,
        }
    }

    /// Writes an entry; whether it is new.
    fn insert(&mut self, key: [u8; 16], state: ConsumerState, ids: &[u16]) -> bool {
        let mut slot = Slot {
            key,
            ids: [0; INLINE],
            state,
            len: LONG,
        };
        if ids.len() <= INLINE {
            for (to, from) in slot.ids.iter_mut().zip(ids) {
                *to = *from;
            }
            slot.len = ids.len() as u8;
            if !self.long.is_empty() {
                self.long.remove(&key);
            }
        } else {
            self.long.insert(key, ids.into());
        }
        match self.find(&key) {
            Ok(i) => {
                if let Some(s) = self.slots.get_mut(i) {
                    *s = slot;
                }
                false
            }
            Err(i) => {
                // Grow by an eighth, not by doubling: a shard is small, its
                // copy cheap, and the memory is most of the table's.
                if self.slots.len() == self.slots.capacity() {
                    self.slots.reserve_exact((self.slots.len() / 8).max(4));
                }
                self.slots.insert(i, slot);
                true
            }
        }
    }

    /// Clears an entry; whether there was one.
    fn remove(&mut self, key: &[u8; 16]) -> bool {
        let Ok(i) = self.find(key) else {
            return false;
        };
        let slot = self.slots.remove(i);
        if slot.len == LONG {
            self.long.remove(key);
        }
        true
    }
}

/// A consumer's entry as read: state and replica cluster ids, first manager first.
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
    ids: Mutex<HashMap<Box<str>, u16, BuildHasherDefault<Fnv>>>,
    shards: Box<[RwLock<Shard>]>,
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
            ids: Mutex::new(HashMap::default()),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            entries: AtomicUsize::new(0),
            availability: RwLock::new(Arc::new(AvailabilityView::all_available())),
            availability_version: AtomicU64::new(0),
        }
    }

    fn shard_index(key: &[u8; 16]) -> usize {
        (usize::from(key[0]) << 4) | usize::from(key[1] >> 4)
    }

    fn shard(&self, key: &[u8; 16]) -> Option<&RwLock<Shard>> {
        self.shards.get(Self::shard_index(key))
    }

    /// A cluster name by id (lock-free).
    pub fn name(&self, id: u16) -> Option<&str> {
        self.names.get(usize::from(id))?.get().map(|s| &**s)
    }

    /// The ids of `clusters`, interning the new ones (one lock for them all).
    fn intern_all(&self, clusters: &[&str], out: &mut Vec<u16>) -> Result<(), WriteError> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for cluster in clusters {
            let id = match ids.get(*cluster) {
                Some(&id) => id,
                None => {
                    let id = ids.len();
                    let slot = self.names.get(id).ok_or(WriteError::TooManyClusters)?;
                    // Published before any entry can name it (the caller writes entries after).
                    let _ = slot.set((*cluster).into());
                    let id = u16::try_from(id).map_err(|_| WriteError::TooManyClusters)?;
                    ids.insert((*cluster).into(), id);
                    id
                }
            };
            out.push(id);
        }
        Ok(())
    }

    /// Applies one write of the poller.
    pub fn apply(&self, write: TableWrite<'_>) -> Result<(), WriteError> {
        match write {
            TableWrite::Managers(managers) => {
                let clusters: Vec<&str> = managers.iter().map(|(c, _)| *c).collect();
                self.intern_all(&clusters, &mut Vec::with_capacity(clusters.len()))?;
                let view = AvailabilityView::of_managers(managers.iter().copied());
                *self.availability.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
                self.availability_version.fetch_add(1, Ordering::Release);
            }
            TableWrite::Entry {
                consumer,
                state,
                replicas,
            } => {
                let mut ids = Vec::with_capacity(replicas.len());
                self.intern_all(replicas, &mut ids)?;
                let key = consumer.to_bytes();
                if let Some(shard) = self.shard(&key) {
                    let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
                    if shard.insert(key, state, &ids) {
                        self.entries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            TableWrite::Remove(consumer) => {
                let key = consumer.to_bytes();
                if let Some(shard) = self.shard(&key) {
                    let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
                    if shard.remove(&key) {
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
        let shard = self.shard(&key)?.read().unwrap_or_else(|p| p.into_inner());
        let slot = shard.slots.get(shard.find(&key).ok()?)?;
        let packed = shard.packed(slot);
        drop(shard);
        Some(ProcessEntry {
            packed,
            table: self,
        })
    }

    /// Appends to `out`, in id order, up to `limit` ids with an entry that lie
    /// in `range` (one shard's read lock at a time).
    pub fn ids_in(&self, range: crate::poller::IdRange, limit: usize, out: &mut Vec<[u8; 16]>) {
        let first = match &range.0 {
            Bound::Included(k) | Bound::Excluded(k) => Self::shard_index(k),
            Bound::Unbounded => 0,
        };
        let last = match &range.1 {
            Bound::Included(k) | Bound::Excluded(k) => Self::shard_index(k),
            Bound::Unbounded => SHARDS - 1,
        };
        let mut left = limit;
        for shard in self.shards.iter().take(last + 1).skip(first) {
            if left == 0 {
                return;
            }
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            let from = match &range.0 {
                Bound::Included(k) => shard.slots.partition_point(|s| s.key < *k),
                Bound::Excluded(k) => shard.slots.partition_point(|s| s.key <= *k),
                Bound::Unbounded => 0,
            };
            let within = |s: &&Slot| match &range.1 {
                Bound::Included(k) => s.key <= *k,
                Bound::Excluded(k) => s.key < *k,
                Bound::Unbounded => true,
            };
            let before = out.len();
            out.extend(
                shard
                    .slots
                    .get(from..)
                    .unwrap_or_default()
                    .iter()
                    .take_while(within)
                    .take(left)
                    .map(|s| s.key),
            );
            left -= out.len() - before;
        }
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
            t.intern_all(&[&format!("c{i}")], &mut Vec::new()).unwrap();
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

        /// Entries sharing shards and shards' edges, short and long replica
        /// sets: the table is a map of the last write, and `ids_in` lists
        /// exactly the ids of a range, in order, up to the limit.
        #[test]
        fn ids_in_lists_a_range_of_the_map(
            ops in prop::collection::vec((0usize..12, prop::option::of(1usize..6)), 0..80),
            lo in prop::option::of((0usize..12, any::<bool>())),
            hi in prop::option::of((0usize..12, any::<bool>())),
            limit in 0usize..15,
        ) {
            // Twelve ids over three shards: 0x0F0, 0x0F1 (its first id at the
            // shard's start) and 0x100 (the next first byte).
            let keys: Vec<[u8; 16]> = (0..12u8)
                .map(|i| {
                    let mut k = [i; 16];
                    k[0] = [0x0f, 0x0f, 0x10][usize::from(i / 4)];
                    k[1] = [0x00, 0x10, 0x00][usize::from(i / 4)] | (i % 4);
                    k
                })
                .collect();
            let t = ProcessTable::new();
            let mut model: std::collections::BTreeMap<[u8; 16], usize> = Default::default();
            let names = ["a", "b", "c", "d", "e", "f"];
            for (who, write) in &ops {
                let c = ConsumerId::from_bytes(keys[*who]);
                match write {
                    Some(n) => {
                        t.apply(TableWrite::Entry { consumer: &c, state: ConsumerState::Registered, replicas: &names[..*n] }).unwrap();
                        model.insert(keys[*who], *n);
                    }
                    None => {
                        t.apply(TableWrite::Remove(&c)).unwrap();
                        model.remove(&keys[*who]);
                    }
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for (k, n) in &model {
                let e = t.get(&ConsumerId::from_bytes(*k)).unwrap();
                prop_assert_eq!(e.replicas().collect::<Vec<_>>(), &names[..*n]);
            }
            let bound = |b: Option<(usize, bool)>| match b {
                Some((i, true)) => Bound::Included(keys[i]),
                Some((i, false)) => Bound::Excluded(keys[i]),
                None => Bound::Unbounded,
            };
            let range = (bound(lo), bound(hi));
            let mut got = Vec::new();
            t.ids_in(range, limit, &mut got);
            let ordered = lo.zip(hi).is_none_or(|(l, h)| keys[l.0] <= keys[h.0]);
            if ordered && !(lo.zip(hi).is_some_and(|(l, h)| l.0 == h.0 && !(l.1 && h.1))) {
                let want: Vec<[u8; 16]> = model.range(range).map(|(k, _)| *k).take(limit).collect();
                prop_assert_eq!(got, want);
            } else {
                prop_assert!(got.is_empty(), "an empty range lists nothing: {:?}", got);
            }
        }
    }
}
