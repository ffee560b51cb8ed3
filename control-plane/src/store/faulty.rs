//! A store wrapper with fault toggles (in the spirit of raft-rs's `MemStorage`):
//! tests flip a switch and every failure path above the store seam becomes a
//! plain test against a real database underneath.

use super::{LoadWindow, Op, Snapshot, Store, StoreRead, StoredConsumer};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The switches of a [`FaultyStore`], shared with the test that holds them.
#[derive(Debug, Default)]
pub struct Faults {
    /// `commit` fails (nothing is written).
    pub fail_commits: AtomicBool,
    /// `load` fails (the database cannot be read back).
    pub fail_loads: AtomicBool,
    /// `commit` panics (the writer thread dies).
    pub panic_on_commit: AtomicBool,
    /// Commits that reached the inner store.
    pub commits: AtomicU64,
    /// Commits refused by `fail_commits`.
    pub failed_commits: AtomicU64,
    /// Calls of `load`.
    pub loads: AtomicU64,
}

impl Faults {
    pub fn set_fail_commits(&self, on: bool) {
        self.fail_commits.store(on, Ordering::SeqCst);
    }

    pub fn set_fail_loads(&self, on: bool) {
        self.fail_loads.store(on, Ordering::SeqCst);
    }

    pub fn set_panic_on_commit(&self, on: bool) {
        self.panic_on_commit.store(on, Ordering::SeqCst);
    }
}

/// Wraps a store; each toggle in [`Faults`] injects one failure.
pub struct FaultyStore<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S) -> (FaultyStore<S>, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            FaultyStore {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl<S: Store> StoreRead for FaultyStore<S> {
    fn consumer(&mut self, id: &str, resource: u64) -> anyhow::Result<Option<StoredConsumer>> {
        self.inner.consumer(id, resource)
    }

    fn consumer_ids(&mut self, registered_only: bool, limit: usize) -> anyhow::Result<Vec<String>> {
        self.inner.consumer_ids(registered_only, limit)
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn load(&mut self, window: LoadWindow) -> anyhow::Result<Snapshot> {
        self.faults.loads.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_loads.load(Ordering::SeqCst) {
            anyhow::bail!("injected failure: connection refused");
        }
        self.inner.load(window)
    }

    fn reader(&self) -> anyhow::Result<Box<dyn StoreRead>> {
        self.inner.reader()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn begin(&mut self) -> anyhow::Result<Vec<super::Foreign>> {
        self.inner.begin()
    }

    fn foreign_commits(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        self.inner.foreign_commits()
    }

    fn duties(&mut self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.inner.duties()
    }

    fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        if self.faults.panic_on_commit.load(Ordering::SeqCst) {
            panic!("injected panic in commit ({} ops)", ops.len());
        }
        if self.faults.fail_commits.load(Ordering::SeqCst) {
            self.faults.failed_commits.fetch_add(1, Ordering::SeqCst);
            anyhow::bail!("injected failure: disk I/O error");
        }
        self.faults.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(ops)
    }
}
