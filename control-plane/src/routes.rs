//! The pushed routing table: committed entries, a bounded change log for deltas,
//! and a watch channel that wakes long-polls when the version moves.
//!
//! Answers are bounded (`push.page_entries`): a snapshot is cut into pages in
//! the byte order of consumer ids, a delta stops at the committed version
//! where a page is full (see `prealloc_wire` for the protocol).

use bytes::Bytes;
use prealloc_wire::{
    ConsumerId, ManagerRoute, RouteEntry, RoutesKind, RoutesQuery, RoutesResponse, ROUTES_PROTOCOL,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One change to the table: a new value, or `None` for removal.
pub type Change = (ConsumerId, Option<RouteEntry>);

struct Inner {
    version: u64,
    /// Each entry kept as its JSON: a full snapshot of a million entries is then a
    /// copy of reference counts under the lock and a concatenation outside it.
    /// A B-tree: it never rehashes everything at once on the write path, and
    /// it is ordered by the id's bytes, the order snapshot pages are cut in.
    entries: BTreeMap<[u8; 16], Arc<[u8]>>,
    managers: Vec<ManagerRoute>,
    /// (version, changes that produced it), oldest first.
    log: VecDeque<(u64, Vec<Change>)>,
    log_changes: usize,
    /// Deltas can be answered for any `since >= base`.
    base: u64,
    /// Snapshots being paged in: their version, and when a page of it was
    /// last asked for. The log keeps the changes after each of them (up to
    /// [`PINNED_LOG_FACTOR`] × the log's limit), so that the delta that ends
    /// a snapshot can be answered however long the paging took.
    paging: Vec<(u64, Instant)>,
}

/// How long a snapshot keeps the log from forgetting its changes after its
/// last page was asked for.
const SNAPSHOT_PIN: Duration = Duration::from_secs(60);
/// The most the log grows past `push.change_log` for snapshots being paged in.
const PINNED_LOG_FACTOR: usize = 10;

/// An answer to a routes query, ready to be written out.
pub enum Answer {
    /// A page of the whole table: entries are JSON fragments.
    Full {
        epoch: String,
        version: u64,
        managers: Vec<ManagerRoute>,
        entries: Vec<Arc<[u8]>>,
        /// The cursor the page starts after (`None`: the first page).
        after: Option<ConsumerId>,
        /// The cursor of the next page (`None`: the last page).
        next: Option<ConsumerId>,
    },
    /// A delta or an unchanged answer.
    Typed(RoutesResponse),
}

impl Answer {
    pub fn kind(&self) -> RoutesKind {
        match self {
            Answer::Full { .. } => RoutesKind::Full,
            Answer::Typed(r) => r.kind,
        }
    }

    /// The JSON body of the answer (a `RoutesResponse`).
    pub fn to_json(&self) -> Bytes {
        match self {
            Answer::Typed(r) => Bytes::from(serde_json::to_vec(r).unwrap_or_default()),
            Answer::Full {
                epoch,
                version,
                managers,
                entries,
                after,
                next,
            } => {
                let size: usize = entries.iter().map(|e| e.len() + 1).sum();
                let mut out = Vec::with_capacity(size + 256 + managers.len() * 96);
                out.extend_from_slice(
                    format!("{{\"protocol\":{ROUTES_PROTOCOL},\"epoch\":").as_bytes(),
                );
                let _ = serde_json::to_writer(&mut out, epoch);
                for (name, cursor) in [("after", after), ("next", next)] {
                    if let Some(c) = cursor {
                        out.extend_from_slice(format!(",\"{name}\":\"{c}\"").as_bytes());
                    }
                }
                out.extend_from_slice(
                    format!(",\"version\":{version},\"kind\":\"full\",\"managers\":").as_bytes(),
                );
                let _ = serde_json::to_writer(&mut out, managers);
                out.extend_from_slice(b",\"upsert\":[");
                for (i, e) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(e);
                }
                out.extend_from_slice(b"],\"remove\":[]}");
                Bytes::from(out)
            }
        }
    }
}

/// The routing table as pushed to Envoys. Only committed changes enter it.
pub struct Routes {
    epoch: String,
    log_limit: usize,
    /// Most entries of a snapshot page, most changes of a delta.
    page_entries: usize,
    inner: Mutex<Inner>,
    version_tx: watch::Sender<u64>,
    waiting: AtomicI64,
}

fn encode(e: &RouteEntry) -> Arc<[u8]> {
    Arc::from(serde_json::to_vec(e).unwrap_or_default())
}

impl Routes {
    pub fn new(
        epoch: String,
        version: u64,
        entries: Vec<RouteEntry>,
        managers: Vec<ManagerRoute>,
        log_limit: usize,
        page_entries: usize,
    ) -> Routes {
        let (version_tx, _) = watch::channel(version);
        Routes {
            epoch,
            log_limit,
            page_entries: page_entries.max(1),
            inner: Mutex::new(Inner {
                version,
                entries: entries
                    .into_iter()
                    .map(|e| (e.consumer.to_bytes(), encode(&e)))
                    .collect(),
                managers,
                log: VecDeque::new(),
                log_changes: 0,
                base: version,
                paging: Vec::new(),
            }),
            version_tx,
            waiting: AtomicI64::new(0),
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn version(&self) -> u64 {
        self.lock().version
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, consumer: &ConsumerId) -> bool {
        self.lock().entries.contains_key(&consumer.to_bytes())
    }

    /// Pollers currently held.
    pub fn waiting(&self) -> i64 {
        self.waiting.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies committed changes as `version` and wakes every waiting poller.
    pub fn publish(&self, version: u64, changes: Vec<Change>, managers: Option<Vec<ManagerRoute>>) {
        // Encode before taking the lock: long-polls and snapshots wait on it.
        let encoded: Vec<Option<Arc<[u8]>>> = changes
            .iter()
            .map(|(_, e)| e.as_ref().map(encode))
            .collect();
        let mut g = self.lock();
        debug_assert!(version > g.version, "versions only grow");
        for ((id, _), e) in changes.iter().zip(encoded) {
            match e {
                Some(e) => {
                    g.entries.insert(id.to_bytes(), e);
                }
                None => {
                    g.entries.remove(&id.to_bytes());
                }
            }
        }
        if let Some(m) = managers {
            g.managers = m;
        }
        g.log_changes += changes.len().max(1);
        g.log.push_back((version, changes));
        g.version = version;
        let now = Instant::now();
        g.paging
            .retain(|(_, seen)| now.duration_since(*seen) < SNAPSHOT_PIN);
        let pinned = g.paging.iter().map(|(v, _)| *v).min();
        let hard_limit = self.log_limit.saturating_mul(PINNED_LOG_FACTOR);
        while g.log_changes > self.log_limit && g.log.len() > 1 {
            // Forgetting the oldest version `v` makes `base = v`: a snapshot
            // at `p >= v` can still be caught up from.
            let front = g.log.front().map_or(0, |(v, _)| *v);
            if pinned.is_some_and(|p| front > p) && g.log_changes <= hard_limit {
                break;
            }
            let (v, c) = g.log.pop_front().expect("len > 1");
            g.log_changes -= c.len().max(1);
            g.base = v;
        }
        drop(g);
        self.version_tx.send_replace(version);
    }

    /// A snapshot page: the entries after `after`, at most a page of them.
    fn page(&self, g: &Inner, version: u64, after: Option<ConsumerId>) -> Answer {
        let from = match &after {
            Some(c) => Bound::Excluded(c.to_bytes()),
            None => Bound::Unbounded,
        };
        let mut it = g.entries.range((from, Bound::Unbounded));
        let mut last = None;
        let entries: Vec<Arc<[u8]>> = it
            .by_ref()
            .take(self.page_entries)
            .map(|(k, e)| {
                last = Some(*k);
                e.clone()
            })
            .collect();
        // More to come: the next page starts after the last id of this one.
        let next = it.next().and(last).map(ConsumerId::from_bytes);
        Answer::Full {
            epoch: self.epoch.clone(),
            version,
            managers: g.managers.clone(),
            entries,
            after,
            next,
        }
    }

    /// The first page of a new snapshot at the current version.
    fn first_page(&self, g: &mut Inner) -> Answer {
        let a = self.page(g, g.version, None);
        if let Answer::Full { next: Some(_), .. } = &a {
            Self::pin(g, g.version);
        }
        a
    }

    /// Keeps the changes after `version` while its snapshot is paged in.
    fn pin(g: &mut Inner, version: u64) {
        let now = Instant::now();
        match g.paging.iter_mut().find(|(v, _)| *v == version) {
            Some(p) => p.1 = now,
            None => g.paging.push((version, now)),
        }
    }

    /// The answer to a query right now, or `None` when the caller should wait.
    pub fn answer(&self, q: &RoutesQuery) -> Option<Answer> {
        let mut g = self.lock();
        let same_epoch = q.epoch.as_deref() == Some(self.epoch.as_str());
        if let (Some(after), true) = (&q.after, same_epoch) {
            // The next page of a snapshot taken at `since`, unless its
            // changes are forgotten already (it could never be caught up):
            // then a new snapshot at once.
            if q.since < g.base || q.since > g.version {
                return Some(self.first_page(&mut g));
            }
            Self::pin(&mut g, q.since);
            return Some(self.page(&g, q.since, Some(after.clone())));
        }
        if q.since == 0 || !same_epoch || q.since > g.version || q.since < g.base {
            return Some(self.first_page(&mut g));
        }
        if q.since == g.version {
            return None;
        }
        // A single commit with more than a page of changes (e.g. a manager
        // marked down settles many consumers at once) is not sent as one
        // delta: a new snapshot, in pages, carries it.
        let first = g.log.iter().find(|(v, _)| *v > q.since);
        if first.is_some_and(|(_, c)| c.len() > self.page_entries) {
            return Some(self.first_page(&mut g));
        }
        // Coalesce: the last change of each consumer after `since` wins. At
        // most a page of changes: the delta ends at the last version whose
        // changes still fit (at least one version).
        let mut last: HashMap<&ConsumerId, &Option<RouteEntry>> = HashMap::new();
        let mut order: Vec<&ConsumerId> = Vec::new();
        let mut version = q.since;
        let mut counted = 0usize;
        for (v, changes) in g.log.iter() {
            if *v <= q.since {
                continue;
            }
            if counted > 0 && counted + changes.len() > self.page_entries {
                break;
            }
            counted += changes.len();
            version = *v;
            for (id, e) in changes {
                if last.insert(id, e).is_none() {
                    order.push(id);
                }
            }
        }
        let mut upsert = Vec::new();
        let mut remove = Vec::new();
        for id in order {
            match last[id] {
                Some(e) => upsert.push(e.clone()),
                None => remove.push(id.clone()),
            }
        }
        Some(Answer::Typed(RoutesResponse {
            protocol: ROUTES_PROTOCOL,
            epoch: self.epoch.clone(),
            version,
            kind: RoutesKind::Delta,
            managers: g.managers.clone(),
            upsert,
            remove,
            after: None,
            next: None,
        }))
    }

    /// The answer after holding up to `wait` for a change (or until `stop` fires).
    pub async fn poll(
        &self,
        q: &RoutesQuery,
        wait: std::time::Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Answer {
        // Subscribe before looking, so a change between the look and the wait still wakes us.
        let mut rx = self.version_tx.subscribe();
        if let Some(r) = self.answer(q) {
            return r;
        }
        if !wait.is_zero() && !*stop.borrow() {
            self.waiting.fetch_add(1, Ordering::Relaxed);
            struct Held<'a>(&'a AtomicI64);
            impl Drop for Held<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let _held = Held(&self.waiting);
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = stop.changed() => break,
                }
                if let Some(r) = self.answer(q) {
                    return r;
                }
            }
        }
        self.answer(q).unwrap_or_else(|| {
            let g = self.lock();
            // The version `answer` found unchanged: should a change have come
            // in since, the next poll gets it (an answer claiming a newer
            // version without its changes would be out of sequence).
            Answer::Typed(RoutesResponse {
                protocol: ROUTES_PROTOCOL,
                epoch: self.epoch.clone(),
                version: q.since,
                kind: RoutesKind::Unchanged,
                managers: g.managers.clone(),
                upsert: vec![],
                remove: vec![],
                after: None,
                next: None,
            })
        })
    }
}
