//! The poller's logic: long-poll requests, applying routes responses as ordered table writes, backoff.
//!
//! The glue owns the host calls; this state machine decides what to ask the
//! control plane next and turns each [`prealloc_wire::RoutesResponse`] into the table
//! writes that apply it. Write order keeps readers safe (ARCHITECTURE.md):
//! the managers first, then consumer entries, each written whole. Anything
//! wrong with a response leaves the last good table in place; the poller then
//! retries with capped exponential backoff.
//!
//! Envoy's main thread runs the poller, and everything else there waits while
//! it works, so no answer is applied in one go: a snapshot arrives in pages
//! (routes protocol 2, see `prealloc_wire`), and every answer is applied at
//! most `writes_per_turn` writes per main-thread turn ([`Poller::step`]). Each
//! write is a whole entry the control plane committed, and replicas only
//! grow, so readers meanwhile route by entries that are each safe; the
//! position (`since`) moves only once an answer (for a snapshot: its last
//! page) is applied whole.

#[cfg(test)]
use prealloc_wire::RoutesResponse;
use prealloc_wire::{
    Availability, ConsumerId, ConsumerState, ErrorBody, RoutesKind, RoutesQuery, ROUTES_PROTOCOL,
};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;

use crate::config::PollerConfig;
use crate::metrics::Counter;
use crate::pipeline::Bumps;
use crate::table::{encode_managers, is_valid_cluster, TableWrite, MAX_ENTRY_REPLICAS};

/// Extra time granted to a long-poll over the hold asked of the server.
pub const TIMEOUT_MARGIN_MS: u64 = 5000;
/// Longest epoch accepted (it is echoed in the query string).
pub const MAX_EPOCH_LEN: usize = 128;
/// Entries a snapshot page's scan for absent entries looks at per write of the turn.
const SCAN_PER_WRITE: usize = 16;

/// One HTTP call to make to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Envoy cluster to call.
    pub cluster: String,
    /// Headers including `:method`, `:path`, `:authority`.
    pub headers: Vec<(&'static str, String)>,
    pub timeout_ms: u64,
}

/// The result of applying a whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub kind: RoutesKind,
    pub version: u64,
    /// How many table writes were handed to the sink.
    pub writes: usize,
    /// How many of them the sink refused.
    pub failed_writes: usize,
    /// Parts of the response that were refused (logged; the rest applies).
    pub skipped: Vec<String>,
    /// A snapshot page after which more pages follow (the position has not moved yet).
    pub more_pages: bool,
}

/// Where applying an answer stands after a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Applied whole.
    Done(Update),
    /// Writes remain: call [`Poller::step`] on a later main-thread turn.
    More,
}

/// Why a poll did not produce an update; the last good table stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    /// The call could not be made or got no HTTP answer (reset, timeout, no cluster).
    Transport(String),
    /// The control plane answered with a non-200 status.
    Status(u32),
    /// The control plane refused the poll, saying why (its JSON error body).
    Refused {
        status: u32,
        error: String,
        message: String,
    },
    /// The control plane speaks another routes protocol.
    Protocol(u32),
    /// The body is not a routes response.
    Body(String),
    /// The response does not fit the poller's state; the next poll asks for a full snapshot.
    Resync(String),
}

impl fmt::Display for PollError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollError::Transport(m) => write!(f, "routes poll failed: {m}"),
            PollError::Status(s @ 502..=504) => write!(
                f,
                "routes poll answered HTTP {s} (Envoy's answer when the control plane cannot be reached or times out)"
            ),
            PollError::Status(s) => write!(f, "routes poll answered HTTP {s}, expected 200"),
            PollError::Refused {
                status,
                error,
                message,
            } => write!(f, "routes poll refused with HTTP {status} {error}: {message}"),
            PollError::Protocol(0) => write!(
                f,
                "the control plane answered without a routes protocol (a release older than protocol {ROUTES_PROTOCOL}, with one-piece snapshots); run a control plane of this filter's release"
            ),
            PollError::Protocol(p) => write!(
                f,
                "the control plane speaks routes protocol {p}, this filter speaks {ROUTES_PROTOCOL}; run both of the same release"
            ),
            PollError::Body(m) => write!(f, "routes response is not valid: {m}"),
            PollError::Resync(m) => write!(
                f,
                "routes response out of sequence ({m}); asking for a full snapshot"
            ),
        }
    }
}

impl std::error::Error for PollError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A poll should be sent now.
    Ready,
    /// A poll is outstanding.
    InFlight,
    /// Backing off after an error until this time (ms, host clock).
    Waiting(u64),
}

/// A snapshot being received page by page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Paging {
    epoch: String,
    version: u64,
    /// Asked for as `after` by the next poll.
    next: [u8; 16],
}

/// An answer being applied, a turn at a time.
#[derive(Debug)]
struct Applying {
    kind: RoutesKind,
    epoch: String,
    version: u64,
    /// The clusters entries name, by index.
    clusters: Vec<String>,
    /// The managers write, until it is done (first of all).
    managers: Option<Vec<(String, Availability)>>,
    managers_value: String,
    upsert: std::vec::IntoIter<Compact>,
    /// Indexes into `clusters`: each entry's replicas, one after the other.
    replicas: Vec<u16>,
    /// A delta's removals.
    remove: std::vec::IntoIter<[u8; 16]>,
    /// A snapshot page: the consumers it wrote, and the id range it covers
    /// (the scan for entries it no longer has resumes after `scan`).
    page: Option<Page>,
    next: Option<[u8; 16]>,
    writes: usize,
    failed_writes: usize,
    skipped: Vec<String>,
}

/// An entry to write: its replicas are `Applying::replicas[first..first + len]`.
#[derive(Debug)]
struct Compact {
    consumer: [u8; 16],
    state: ConsumerState,
    first: usize,
    len: usize,
}

/// A routes answer as the poller reads it: borrowed from the body where it
/// can be, so a page costs one allocation per entry (its replica list), not
/// one per consumer id and replica (`RoutesResponse` is the owned form).
#[derive(Deserialize)]
struct View<'a> {
    #[serde(default)]
    protocol: u32,
    #[serde(borrow)]
    epoch: Name<'a>,
    version: u64,
    kind: RoutesKind,
    #[serde(borrow)]
    managers: Vec<ManagerView<'a>>,
    #[serde(default, borrow)]
    upsert: Vec<EntryView<'a>>,
    #[serde(default)]
    remove: Vec<Key>,
    #[serde(default)]
    after: Option<Key>,
    #[serde(default)]
    next: Option<Key>,
}

#[derive(Deserialize)]
struct ManagerView<'a> {
    #[serde(borrow)]
    id: Name<'a>,
    #[serde(borrow)]
    cluster: Name<'a>,
    availability: Availability,
}

#[derive(Deserialize)]
struct EntryView<'a> {
    consumer: Key,
    state: ConsumerState,
    #[serde(borrow)]
    replicas: Vec<Name<'a>>,
}

/// A JSON string, borrowed unless it has escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(V).map(Name)
    }
}

/// A consumer id, read straight into its 16 bytes (checked as `ConsumerId::parse`).
struct Key([u8; 16]);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Name::deserialize(d)?;
        ConsumerId::parse_bytes(&s.0)
            .map(Key)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug)]
struct Page {
    /// In id order (pages come sorted), so the scan looks them up by bisection.
    written: Vec<[u8; 16]>,
    scan: Bound<[u8; 16]>,
    /// Inclusive end of the range; `None`: to the end (the last page).
    end: Option<[u8; 16]>,
    /// The whole range was scanned.
    scanned: bool,
}

/// A range of consumer ids (their bytes), as `BTreeMap::range` takes it.
pub type IdRange = (Bound<[u8; 16]>, Bound<[u8; 16]>);

/// Which consumers have an entry in the table, as the poller needs to know
/// for clearing a snapshot page's absent entries and for its entry count.
/// The default ([`Poller::new`]) is a set the poller keeps itself (shared
/// data cannot be listed); a table that can list its own ids in order (the
/// native build's [`crate::process_table::ProcessTable`]) answers instead,
/// and a second copy of every id is saved.
pub trait HeldIds: fmt::Debug {
    /// `id` now has an entry (`true`) or none (`false`).
    fn note(&mut self, id: [u8; 16], held: bool);
    /// How many ids have an entry.
    fn count(&self) -> usize;
    /// Appends to `out`, in id order, up to `limit` ids with an entry in `range`.
    fn ids_in(&self, range: IdRange, limit: usize, out: &mut Vec<[u8; 16]>);
}

impl HeldIds for BTreeSet<[u8; 16]> {
    fn note(&mut self, id: [u8; 16], held: bool) {
        if held {
            self.insert(id);
        } else {
            self.remove(&id);
        }
    }
    fn count(&self) -> usize {
        self.len()
    }
    fn ids_in(&self, range: IdRange, limit: usize, out: &mut Vec<[u8; 16]>) {
        out.extend(self.range(range).take(limit).copied());
    }
}

/// The table lists its own ids: nothing to note.
impl HeldIds for std::sync::Arc<crate::process_table::ProcessTable> {
    fn note(&mut self, _: [u8; 16], _: bool) {}
    fn count(&self) -> usize {
        self.len()
    }
    fn ids_in(&self, range: IdRange, limit: usize, out: &mut Vec<[u8; 16]>) {
        crate::process_table::ProcessTable::ids_in(self, range, limit, out);
    }
}

/// The poller's state between calls.
#[derive(Debug)]
pub struct Poller {
    cfg: PollerConfig,
    epoch: Option<String>,
    version: u64,
    /// Consumers with an entry, listed in the byte order snapshot pages come
    /// in: a page clears the absent ones of its range.
    written: Box<dyn HeldIds + Send>,
    /// The managers value last written, to skip identical rewrites.
    managers_value: Option<String>,
    failures: u32,
    phase: Phase,
    paging: Option<Paging>,
    applying: Option<Applying>,
}

impl Poller {
    /// A poller that keeps its own set of the ids it wrote.
    pub fn new(cfg: PollerConfig) -> Self {
        Self::with_held_ids(cfg, Box::new(BTreeSet::new()))
    }

    /// A poller that asks `held` which consumers have an entry.
    pub fn with_held_ids(cfg: PollerConfig, held: Box<dyn HeldIds + Send>) -> Self {
        Poller {
            cfg,
            epoch: None,
            version: 0,
            written: held,
            managers_value: None,
            failures: 0,
            phase: Phase::Ready,
            paging: None,
            applying: None,
        }
    }

    /// The query the next poll sends.
    pub fn query(&self) -> RoutesQuery {
        match &self.paging {
            // The next page: answered at once, never held.
            Some(p) => RoutesQuery {
                since: p.version,
                epoch: Some(p.epoch.clone()),
                wait_ms: Some(0),
                node: self.cfg.node_id.clone(),
                after: Some(ConsumerId::from_bytes(p.next)),
            },
            None => RoutesQuery {
                since: self.version,
                epoch: self.epoch.clone(),
                wait_ms: Some(self.cfg.wait_ms),
                node: self.cfg.node_id.clone(),
                after: None,
            },
        }
    }

    /// The node id sent on every poll.
    pub fn node(&self) -> Option<&str> {
        self.cfg.node_id.as_deref()
    }

    /// The applied version and epoch (for logs and tests).
    pub fn position(&self) -> (u64, Option<&str>) {
        (self.version, self.epoch.as_deref())
    }

    /// How many consumers currently have an entry written by this poller.
    pub fn entries(&self) -> usize {
        self.written.count()
    }

    /// Whether an answer is being applied: call [`Poller::step`] on the next turn.
    pub fn applying(&self) -> bool {
        self.applying.is_some()
    }

    /// On every tick and after every answer: the request to send now, if one is due.
    /// Marks the poll in flight; report the outcome with [`Poller::dispatch_failed`]
    /// or [`Poller::on_response`]. None while an answer is being applied.
    pub fn poll_due(&mut self, now_ms: u64) -> Option<Request> {
        if self.applying.is_some() {
            return None;
        }
        match self.phase {
            Phase::InFlight => return None,
            Phase::Waiting(until) if now_ms < until => return None,
            Phase::Ready | Phase::Waiting(_) => {}
        }
        self.phase = Phase::InFlight;
        Some(Request {
            cluster: self.cfg.cluster.clone(),
            headers: vec![
                (":method", "GET".to_owned()),
                (":path", self.query().to_path()),
                (":authority", self.cfg.authority.clone()),
                ("authorization", format!("Bearer {}", self.cfg.token)),
                ("accept", "application/json".to_owned()),
            ],
            timeout_ms: self.cfg.wait_ms.saturating_add(TIMEOUT_MARGIN_MS),
        })
    }

    /// The host refused to dispatch the call (e.g. unknown cluster): back off.
    pub fn dispatch_failed(&mut self, now_ms: u64) -> u64 {
        self.fail(now_ms)
    }

    /// The delay the next retry waits after the current number of consecutive failures.
    pub fn backoff_ms(&self) -> u64 {
        let shift = self.failures.saturating_sub(1).min(32);
        self.cfg
            .min_backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.cfg.max_backoff_ms)
    }

    fn fail(&mut self, now_ms: u64) -> u64 {
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff_ms();
        self.phase = Phase::Waiting(now_ms.saturating_add(delay));
        delay
    }

    /// Takes the answer of the outstanding poll. `status` is the `:status`
    /// (None when the call failed without an HTTP answer). A good answer is
    /// checked whole, then applied: its first `writes_per_turn` writes now
    /// (`sink` returns whether the host took the write), the rest by
    /// [`Poller::step`] on later turns. On an error the next poll waits the
    /// backoff; after a whole answer it is due at once (long-poll loop).
    pub fn on_response(
        &mut self,
        status: Option<u32>,
        body: &[u8],
        now_ms: u64,
        sink: &mut dyn FnMut(TableWrite<'_>) -> bool,
    ) -> Result<Step, PollError> {
        let result = match status {
            None => Err(PollError::Transport(
                "no HTTP response (connection failure, timeout, or an answer larger than \
                 Envoy's http.async_response_buffer_limit: lower the control plane's \
                 push.page_entries)"
                    .into(),
            )),
            Some(200) => serde_json::from_slice::<View<'_>>(body)
                .map_err(|e| PollError::Body(e.to_string()))
                .and_then(|r| self.start(r)),
            Some(s) => Err(match serde_json::from_slice::<ErrorBody>(body) {
                Ok(e) => PollError::Refused {
                    status: s,
                    error: e.error,
                    message: e.message,
                },
                Err(_) => PollError::Status(s),
            }),
        };
        match result {
            Ok(()) => {
                self.failures = 0;
                self.phase = Phase::Ready;
                Ok(self.step(sink))
            }
            Err(e) => {
                self.fail(now_ms);
                Err(e)
            }
        }
    }

    /// Applies an answer whole, in one go (the tests' shorthand; the glues
    /// go through `on_response` and `step`).
    #[cfg(test)]
    fn apply(
        &mut self,
        r: RoutesResponse,
        sink: &mut dyn FnMut(TableWrite<'_>) -> bool,
    ) -> Result<Update, PollError> {
        let body = serde_json::to_vec(&r).map_err(|e| PollError::Body(e.to_string()))?;
        let view = serde_json::from_slice::<View<'_>>(&body)
            .map_err(|e| PollError::Body(e.to_string()))?;
        self.start(view)?;
        loop {
            if let Step::Done(u) = self.step(sink) {
                return Ok(u);
            }
        }
    }

    /// Checks a decoded answer against the poller's state; when it is usable,
    /// queues it for [`Poller::step`]. Nothing is written here.
    fn start(&mut self, r: View<'_>) -> Result<(), PollError> {
        if r.protocol != ROUTES_PROTOCOL {
            return Err(PollError::Protocol(r.protocol));
        }
        let epoch = r.epoch.0.as_ref();
        if epoch.is_empty()
            || epoch.len() > MAX_EPOCH_LEN
            || !epoch
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        {
            return Err(PollError::Body(format!(
                "epoch {epoch:?} must be 1..={MAX_EPOCH_LEN} URL-safe characters"
            )));
        }
        if let Some(why) = self.out_of_sequence(&r) {
            self.epoch = None;
            self.version = 0;
            self.paging = None;
            return Err(PollError::Resync(why));
        }

        let mut skipped = Vec::new();
        // Manager id -> index of its cluster in `clusters`.
        let mut ids: HashMap<&str, u16> = HashMap::with_capacity(r.managers.len());
        let mut clusters: Vec<String> = Vec::with_capacity(r.managers.len());
        let mut lines = Vec::with_capacity(r.managers.len());
        for m in &r.managers {
            let (id, cluster) = (m.id.0.as_ref(), m.cluster.0.as_ref());
            if id.is_empty() || !is_valid_cluster(cluster) {
                skipped.push(format!(
                    "manager {id:?}: cluster {cluster:?} is not a valid cluster name"
                ));
                continue;
            }
            lines.push((cluster.to_owned(), m.availability));
            let index = match clusters.iter().position(|c| c == cluster) {
                Some(i) => i,
                None => {
                    clusters.push(cluster.to_owned());
                    clusters.len() - 1
                }
            };
            let Ok(index) = u16::try_from(index) else {
                skipped.push(format!("manager {id:?}: more than {} clusters", u16::MAX));
                continue;
            };
            if ids.insert(id, index).is_some() {
                skipped.push(format!("manager {id:?} listed twice; the last one wins"));
            }
        }
        let managers_value = encode_managers(lines.iter().map(|(c, a)| (c.as_str(), *a)));
        let first_page = r.kind == RoutesKind::Full && r.after.is_none();
        let managers = (first_page
            || self.managers_value.as_deref() != Some(managers_value.as_str()))
        .then_some(lines);
        let full = r.kind == RoutesKind::Full;
        let keeps = if full {
            "dropping its entry"
        } else {
            "keeping the previous entry"
        };
        // Each entry's replicas as cluster indexes, checked now; the writes come in turns.
        let mut entries = Vec::with_capacity(r.upsert.len());
        let mut replicas: Vec<u16> = Vec::with_capacity(r.upsert.len() * 2);
        for e in &r.upsert {
            let first = replicas.len();
            let mut unknown = None;
            for id in &e.replicas {
                match ids.get(id.0.as_ref()) {
                    Some(&c) if !replicas.get(first..).unwrap_or_default().contains(&c) => {
                        replicas.push(c)
                    }
                    Some(_) => {}
                    None => {
                        unknown = Some(id.0.as_ref());
                        break;
                    }
                }
            }
            let len = replicas.len() - first;
            let problem = if let Some(id) = unknown {
                Some(format!("names unknown manager {id:?}"))
            } else if len == 0 {
                Some("has no replicas".to_owned())
            } else if len > MAX_ENTRY_REPLICAS {
                Some(format!("has more than {MAX_ENTRY_REPLICAS} replicas"))
            } else {
                None
            };
            if let Some(p) = problem {
                replicas.truncate(first);
                skipped.push(format!(
                    "entry of consumer {}: {p}; {keeps}",
                    ConsumerId::from_bytes(e.consumer.0)
                ));
                continue;
            }
            entries.push(Compact {
                consumer: e.consumer.0,
                state: e.state,
                first,
                len,
            });
        }
        let page = full.then(|| Page {
            written: Vec::with_capacity(entries.len()),
            scan: match &r.after {
                Some(a) => Bound::Excluded(a.0),
                None => Bound::Unbounded,
            },
            end: r.next.as_ref().map(|k| k.0),
            scanned: false,
        });
        self.applying = Some(Applying {
            kind: r.kind,
            epoch: epoch.to_owned(),
            version: r.version,
            clusters,
            managers,
            managers_value,
            upsert: entries.into_iter(),
            replicas,
            remove: if r.kind == RoutesKind::Delta {
                r.remove.iter().map(|k| k.0).collect()
            } else {
                Vec::new()
            }
            .into_iter(),
            page,
            next: if full { r.next.map(|k| k.0) } else { None },
            writes: 0,
            failed_writes: 0,
            skipped,
        });
        Ok(())
    }

    /// Why `r` cannot follow what this poller holds, if it cannot.
    fn out_of_sequence(&self, r: &View<'_>) -> Option<String> {
        let epoch = r.epoch.0.as_ref();
        if r.kind == RoutesKind::Full {
            if let Some(after) = &r.after {
                let continues = self.paging.as_ref().is_some_and(|p| {
                    p.next == after.0 && p.epoch == epoch && p.version == r.version
                });
                if !continues {
                    return Some(format!(
                        "snapshot page after {} of epoch {epoch:?} version {}, but the page asked for is {:?}",
                        ConsumerId::from_bytes(after.0),
                        r.version,
                        self.paging.as_ref().map(|p| (&p.epoch, p.version, ConsumerId::from_bytes(p.next)))
                    ));
                }
            }
            let lo = r.after.as_ref().map(|k| k.0);
            let hi = r.next.as_ref().map(|k| k.0);
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if hi <= lo {
                    return Some(format!(
                        "snapshot page ends at {}, before it starts",
                        ConsumerId::from_bytes(hi)
                    ));
                }
            }
            // Each entry must lie in the page's range, in id order, or
            // clearing the range's absent entries would be wrong.
            let mut last = lo;
            for e in &r.upsert {
                let b = e.consumer.0;
                if last.is_some_and(|l| b <= l) || hi.is_some_and(|hi| b > hi) {
                    return Some(format!(
                        "snapshot page holds consumer {} outside its range or out of id order",
                        ConsumerId::from_bytes(b)
                    ));
                }
                last = Some(b);
            }
            return None;
        }
        if self.paging.is_some() {
            return Some(format!("{:?} while a snapshot is being paged in", r.kind));
        }
        if self.epoch.as_deref() != Some(epoch) {
            return Some(format!(
                "{:?} for epoch {epoch:?}, ours is {:?}",
                r.kind, self.epoch
            ));
        }
        if r.version < self.version
            || (r.kind == RoutesKind::Unchanged && r.version != self.version)
        {
            return Some(format!(
                "{:?} at version {}, ours is {}",
                r.kind, r.version, self.version
            ));
        }
        None
    }

    /// Applies up to `writes_per_turn` more writes of the answer taken by
    /// [`Poller::on_response`]: managers first, then entries, then removals.
    /// `Done` once the answer is applied whole (the position then moves).
    /// Call it while [`Poller::applying`]; otherwise there is nothing to
    /// apply, and it writes nothing and says `More`.
    pub fn step(&mut self, sink: &mut dyn FnMut(TableWrite<'_>) -> bool) -> Step {
        let Some(mut a) = self.applying.take() else {
            return Step::More;
        };
        let mut budget = self.cfg.writes_per_turn.max(1);
        let mut write = |writes: &mut usize, failed: &mut usize, w: TableWrite<'_>| {
            *writes += 1;
            if !sink(w) {
                *failed += 1;
            }
        };
        if let Some(lines) = a.managers.take() {
            let refs: Vec<(&str, Availability)> =
                lines.iter().map(|(c, av)| (c.as_str(), *av)).collect();
            write(
                &mut a.writes,
                &mut a.failed_writes,
                TableWrite::Managers(&refs),
            );
            budget -= 1;
        }
        let mut replica_clusters: Vec<&str> = Vec::with_capacity(8);
        while budget > 0 {
            let Some(e) = a.upsert.next() else { break };
            budget -= 1;
            replica_clusters.clear();
            let ids = a.replicas.get(e.first..e.first + e.len).unwrap_or_default();
            replica_clusters.extend(
                ids.iter()
                    .filter_map(|&i| a.clusters.get(usize::from(i)).map(String::as_str)),
            );
            let consumer = ConsumerId::from_bytes(e.consumer);
            write(
                &mut a.writes,
                &mut a.failed_writes,
                TableWrite::Entry {
                    consumer: &consumer,
                    state: e.state,
                    replicas: &replica_clusters,
                },
            );
            self.written.note(e.consumer, true);
            if let Some(p) = &mut a.page {
                p.written.push(e.consumer);
            }
        }
        while budget > 0 {
            let Some(b) = a.remove.next() else { break };
            budget -= 1;
            let id = ConsumerId::from_bytes(b);
            write(&mut a.writes, &mut a.failed_writes, TableWrite::Remove(&id));
            self.written.note(b, false);
        }
        // A snapshot page: clear the entries of its range it does not have.
        // Looking at an entry is cheap next to a write: a turn looks at up to
        // SCAN_PER_WRITE entries per write it has left.
        if a.upsert.len() == 0 {
            if let Some(p) = &mut a.page {
                let mut looks = budget.saturating_mul(SCAN_PER_WRITE);
                while budget > 0 && looks > 0 && !p.scanned {
                    let end = match (p.scan, p.end) {
                        (Bound::Excluded(s), Some(e)) if s >= e => {
                            p.scanned = true;
                            break;
                        }
                        (_, Some(e)) => Bound::Included(e),
                        (_, None) => Bound::Unbounded,
                    };
                    let want = budget.min(looks);
                    let mut batch = Vec::with_capacity(want);
                    self.written.ids_in((p.scan, end), want, &mut batch);
                    p.scanned = batch.len() < want;
                    if let Some(&last) = batch.last() {
                        p.scan = Bound::Excluded(last);
                    }
                    looks -= batch.len();
                    for b in batch {
                        if p.written.binary_search(&b).is_err() {
                            budget -= 1;
                            write(
                                &mut a.writes,
                                &mut a.failed_writes,
                                TableWrite::Remove(&ConsumerId::from_bytes(b)),
                            );
                            self.written.note(b, false);
                        }
                    }
                }
            }
        }
        let scanning = a.page.as_ref().is_some_and(|p| !p.scanned);
        if a.upsert.len() > 0 || a.remove.len() > 0 || scanning {
            self.applying = Some(a);
            return Step::More;
        }
        Step::Done(self.finish(a))
    }

    /// The answer is applied whole: move the position.
    fn finish(&mut self, a: Applying) -> Update {
        self.managers_value = Some(a.managers_value);
        let more_pages = match (a.kind, a.next) {
            (RoutesKind::Full, Some(next)) => {
                self.paging = Some(Paging {
                    epoch: a.epoch,
                    version: a.version,
                    next,
                });
                true
            }
            _ => {
                self.paging = None;
                self.epoch = Some(a.epoch);
                self.version = a.version;
                false
            }
        };
        Update {
            kind: a.kind,
            version: a.version,
            writes: a.writes,
            failed_writes: a.failed_writes,
            skipped: a.skipped,
            more_pages,
        }
    }
}

/// What a glue reports after a poll: the same counters, gauges and log lines
/// in both builds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub bumps: Bumps,
    /// `prealloc_poller_entries` and `prealloc_poller_version`, after a good poll.
    pub gauges: Option<(u64, u64)>,
    pub info: Option<String>,
    pub warnings: Vec<String>,
}

impl Poller {
    /// The report of a whole answer applied, or of a failed poll.
    pub fn report(&self, result: &Result<Update, PollError>) -> Report {
        let mut r = Report::default();
        match result {
            Ok(update) => {
                if update.failed_writes > 0 {
                    r.bumps.add(Counter::PollerErrors, 1);
                    r.warnings.push(format!(
                        "{} of {} table writes failed",
                        update.failed_writes, update.writes
                    ));
                }
                for s in &update.skipped {
                    r.warnings.push(format!("skipped: {s}"));
                }
                if !update.skipped.is_empty() {
                    r.bumps
                        .add(Counter::PollerSkipped, update.skipped.len() as u64);
                }
                r.bumps.add(Counter::PollerUpdates, 1);
                if update.kind == RoutesKind::Full && !update.more_pages {
                    r.bumps.add(Counter::PollerFullSnapshots, 1);
                    r.info = Some(format!(
                        "full snapshot: version {}, {} entries",
                        update.version,
                        self.entries()
                    ));
                }
                r.gauges = Some((self.entries() as u64, self.version));
            }
            Err(e) => {
                r.bumps.add(Counter::PollerErrors, 1);
                r.warnings.push(format!(
                    "{e}; keeping the last good table, retrying in {} ms",
                    self.backoff_ms()
                ));
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{encode_entry, encode_managers, MANAGERS_KEY};
    use prealloc_wire::{Availability, ConsumerState, ManagerRoute, RouteEntry, RoutesResponse};
    use proptest::prelude::*;

    /// A consumer's key in the tests' rendering of writes.
    fn consumer_key(id: &ConsumerId) -> String {
        format!("prealloc.c.{id}")
    }

    /// A write as the tests compare them: a key (the managers', or one per
    /// consumer) and its encoded value, empty for a removal.
    fn rendered(w: TableWrite<'_>) -> (String, String) {
        match w {
            TableWrite::Managers(m) => {
                (MANAGERS_KEY.to_owned(), encode_managers(m.iter().copied()))
            }
            TableWrite::Entry {
                consumer,
                state,
                replicas,
            } => (
                consumer_key(consumer),
                encode_entry(state, replicas.iter().copied()),
            ),
            TableWrite::Remove(consumer) => (consumer_key(consumer), String::new()),
        }
    }

    /// Test view of an update: the writes collected in order.
    #[derive(Debug)]
    struct Collected {
        kind: RoutesKind,
        writes: Vec<(String, String)>,
        skipped: Vec<String>,
    }

    trait Collect {
        fn apply_c(&mut self, r: RoutesResponse) -> Result<Collected, PollError>;
        fn respond(
            &mut self,
            status: Option<u32>,
            body: &[u8],
            now: u64,
        ) -> Result<Collected, PollError>;
    }

    impl Collect for Poller {
        fn apply_c(&mut self, r: RoutesResponse) -> Result<Collected, PollError> {
            let mut writes = Vec::new();
            let u = self.apply(r, &mut |w| {
                writes.push(rendered(w));
                true
            })?;
            assert_eq!(u.writes, writes.len());
            Ok(Collected {
                kind: u.kind,
                writes,
                skipped: u.skipped,
            })
        }
        fn respond(
            &mut self,
            status: Option<u32>,
            body: &[u8],
            now: u64,
        ) -> Result<Collected, PollError> {
            let mut writes = Vec::new();
            let mut sink = |w: TableWrite<'_>| {
                writes.push(rendered(w));
                true
            };
            let mut step = self.on_response(status, body, now, &mut sink)?;
            let u = loop {
                match step {
                    Step::Done(u) => break u,
                    Step::More => {
                        assert_eq!(self.poll_due(now), None, "no poll while applying");
                        step = self.step(&mut sink);
                    }
                }
            };
            assert_eq!(u.writes, writes.len());
            Ok(Collected {
                kind: u.kind,
                writes,
                skipped: u.skipped,
            })
        }
    }

    fn cfg() -> PollerConfig {
        PollerConfig {
            cluster: "prealloc_control_plane".into(),
            authority: "cp".into(),
            token: "tok".into(),
            wait_ms: 30_000,
            min_backoff_ms: 100,
            max_backoff_ms: 1000,
            node_id: None,
            writes_per_turn: 3,
        }
    }

    #[test]
    fn the_node_id_goes_on_every_poll() {
        let mut p = Poller::new(PollerConfig {
            node_id: Some("edge-7".into()),
            ..cfg()
        });
        let req = p.poll_due(0).unwrap();
        let path = &req.headers.iter().find(|(k, _)| *k == ":path").unwrap().1;
        assert_eq!(
            path,
            "/v1/routes?protocol=2&since=0&wait_ms=30000&node=edge-7"
        );
    }

    fn id(n: u8) -> ConsumerId {
        ConsumerId::from_bytes([n; 16])
    }

    fn mgr(id: &str, a: Availability) -> ManagerRoute {
        ManagerRoute {
            id: id.into(),
            cluster: format!("manager_{id}"),
            location: "eu".into(),
            availability: a,
        }
    }

    fn entry(n: u8, state: ConsumerState, replicas: &[&str]) -> RouteEntry {
        RouteEntry {
            consumer: id(n),
            state,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn resp(
        epoch: &str,
        version: u64,
        kind: RoutesKind,
        upsert: Vec<RouteEntry>,
        remove: Vec<ConsumerId>,
    ) -> RoutesResponse {
        RoutesResponse {
            protocol: ROUTES_PROTOCOL,
            epoch: epoch.into(),
            version,
            kind,
            managers: vec![
                mgr("m1", Availability::Available),
                mgr("m2", Availability::Available),
            ],
            upsert,
            remove,
            after: None,
            next: None,
        }
    }

    fn key(n: u8) -> String {
        consumer_key(&id(n))
    }

    fn w(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    use ConsumerState::{Registered as R, Registering as G};

    #[test]
    fn first_poll_asks_for_a_full_snapshot() {
        let mut p = Poller::new(cfg());
        let req = p.poll_due(0).unwrap();
        assert_eq!(req.cluster, "prealloc_control_plane");
        assert_eq!(req.timeout_ms, 35_000);
        let h: HashMap<_, _> = req.headers.iter().cloned().collect();
        assert_eq!(h[":path"], "/v1/routes?protocol=2&since=0&wait_ms=30000");
        assert_eq!(h[":method"], "GET");
        assert_eq!(h[":authority"], "cp");
        assert_eq!(h["authorization"], "Bearer tok");
        // One poll at a time.
        assert_eq!(p.poll_due(0), None);
    }

    #[test]
    fn full_then_delta_then_unchanged() {
        let mut p = Poller::new(cfg());
        p.poll_due(0);
        let full = resp(
            "e1",
            5,
            RoutesKind::Full,
            vec![entry(1, G, &["m1"]), entry(2, R, &["m1", "m2"])],
            vec![],
        );
        let u = p
            .respond(Some(200), &serde_json::to_vec(&full).unwrap(), 0)
            .unwrap();
        assert_eq!(
            u.writes,
            vec![
                w(MANAGERS_KEY, "manager_m1 available\nmanager_m2 available"),
                w(&key(1), "1|g|manager_m1"),
                w(&key(2), "1|r|manager_m1,manager_m2"),
            ]
        );
        assert_eq!(u.kind, RoutesKind::Full);
        assert_eq!(p.position(), (5, Some("e1")));
        let next = p.poll_due(1).unwrap();
        assert!(next.headers.contains(&(
            ":path",
            "/v1/routes?protocol=2&since=5&epoch=e1&wait_ms=30000".into()
        )));

        // Delta: grow 1's replica set, remove 2; managers unchanged -> not rewritten.
        let delta = resp(
            "e1",
            7,
            RoutesKind::Delta,
            vec![entry(1, G, &["m1", "m2"])],
            vec![id(2)],
        );
        let u = p
            .respond(Some(200), &serde_json::to_vec(&delta).unwrap(), 1)
            .unwrap();
        assert_eq!(
            u.writes,
            vec![w(&key(1), "1|g|manager_m1,manager_m2"), w(&key(2), "")]
        );
        assert_eq!(p.entries(), 1);

        // Unchanged with a manager going down: only the managers key is written.
        p.poll_due(2);
        let mut un = resp("e1", 7, RoutesKind::Unchanged, vec![], vec![]);
        un.managers[1].availability = Availability::Down;
        let u = p
            .respond(Some(200), &serde_json::to_vec(&un).unwrap(), 2)
            .unwrap();
        assert_eq!(
            u.writes,
            vec![w(MANAGERS_KEY, "manager_m1 available\nmanager_m2 down")]
        );
    }

    #[test]
    fn full_snapshot_clears_entries_it_no_longer_has() {
        let mut p = Poller::new(cfg());
        p.apply_c(resp(
            "e1",
            1,
            RoutesKind::Full,
            vec![entry(1, G, &["m1"]), entry(2, G, &["m1"])],
            vec![],
        ))
        .unwrap();
        // New epoch (control plane database replaced): full snapshot with only 2 and 3.
        let u = p
            .apply_c(resp(
                "e2",
                1,
                RoutesKind::Full,
                vec![entry(2, G, &["m2"]), entry(3, G, &["m1"])],
                vec![],
            ))
            .unwrap();
        assert_eq!(
            u.writes[0].0, MANAGERS_KEY,
            "managers first on a full snapshot"
        );
        assert_eq!(
            u.writes[1..].to_vec(),
            vec![
                w(&key(2), "1|g|manager_m2"),
                w(&key(3), "1|g|manager_m1"),
                w(&key(1), "")
            ]
        );
        assert_eq!(p.entries(), 2);
    }

    #[test]
    fn out_of_sequence_answers_force_a_full_snapshot() {
        for bad in [
            resp(
                "other",
                9,
                RoutesKind::Delta,
                vec![entry(1, G, &["m1"])],
                vec![],
            ),
            resp("e1", 2, RoutesKind::Delta, vec![], vec![]),
            resp("e1", 6, RoutesKind::Unchanged, vec![], vec![]),
            resp("other", 5, RoutesKind::Unchanged, vec![], vec![]),
        ] {
            let mut p = Poller::new(cfg());
            p.apply_c(resp("e1", 5, RoutesKind::Full, vec![], vec![]))
                .unwrap();
            p.poll_due(0);
            let e = p
                .respond(Some(200), &serde_json::to_vec(&bad).unwrap(), 0)
                .unwrap_err();
            assert!(matches!(e, PollError::Resync(_)), "{e}");
            assert_eq!(p.query().since, 0);
            assert_eq!(p.query().epoch, None);
        }
        // A delta before any full snapshot is out of sequence too.
        let mut p = Poller::new(cfg());
        assert!(matches!(
            p.apply_c(resp("e1", 1, RoutesKind::Delta, vec![], vec![])),
            Err(PollError::Resync(_))
        ));
    }

    #[test]
    fn entries_naming_unknown_managers_are_skipped_not_fatal() {
        let mut p = Poller::new(cfg());
        let u = p
            .apply_c(resp(
                "e1",
                1,
                RoutesKind::Full,
                vec![
                    entry(1, G, &["m1", "m9"]),
                    entry(2, G, &[]),
                    entry(3, R, &["m2", "m2", "m1"]),
                ],
                vec![],
            ))
            .unwrap();
        assert_eq!(
            u.writes[1..].to_vec(),
            vec![w(&key(3), "1|r|manager_m2,manager_m1")]
        );
        assert_eq!(u.skipped.len(), 2, "{:?}", u.skipped);
        assert!(u.skipped[0].contains("unknown manager \"m9\""));
    }

    #[test]
    fn managers_with_bad_clusters_are_skipped() {
        let mut p = Poller::new(cfg());
        let mut r = resp(
            "e1",
            1,
            RoutesKind::Full,
            vec![entry(1, G, &["bad"])],
            vec![],
        );
        r.managers.push(ManagerRoute {
            id: "bad".into(),
            cluster: "has space".into(),
            location: "eu".into(),
            availability: Availability::Available,
        });
        let u = p.apply_c(r).unwrap();
        assert_eq!(u.writes.len(), 1, "only the managers key: {:?}", u.writes);
        assert_eq!(u.skipped.len(), 2);
    }

    #[test]
    fn errors_keep_the_table_and_back_off_capped() {
        let mut p = Poller::new(cfg());
        p.apply_c(resp(
            "e1",
            3,
            RoutesKind::Full,
            vec![entry(1, G, &["m1"])],
            vec![],
        ))
        .unwrap();
        let mut now = 0;
        let mut delays = vec![];
        for (status, body) in [
            (None, &b""[..]),
            (Some(503), &b"{}"[..]),
            (Some(200), &b"not json"[..]),
            (Some(200), &br#"{"protocol":2,"epoch":"e1","version":4,"kind":"delta","managers":[],"upsert":[{"consumer":"short","state":"registering","replicas":["m1"]}]}"#[..]),
            (Some(200), &br#"{"protocol":2,"epoch":"bad epoch","version":4,"kind":"full","managers":[]}"#[..]),
            (Some(200), &b"{}"[..]),
        ] {
            assert!(p.poll_due(now).is_some(), "poll due at {now}");
            assert!(p.respond(status, body, now).is_err());
            assert_eq!(p.position(), (3, Some("e1")), "last good position kept");
            assert_eq!(p.poll_due(now), None, "waits after an error");
            delays.push(p.backoff_ms());
            now += p.backoff_ms();
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert!(p.poll_due(now).is_some());
        p.dispatch_failed(now);
        assert_eq!(p.backoff_ms(), 1000);
        // Success resets the backoff.
        let ok = resp("e1", 3, RoutesKind::Unchanged, vec![], vec![]);
        now += 1000;
        assert!(p.poll_due(now).is_some());
        p.respond(Some(200), &serde_json::to_vec(&ok).unwrap(), now)
            .unwrap();
        assert!(
            p.poll_due(now).is_some(),
            "long-poll loop: next poll at once"
        );
        assert_eq!(p.backoff_ms(), 100);
        assert!(PollError::Status(503)
            .to_string()
            .contains("cannot be reached"));
        assert!(PollError::Status(401).to_string().contains("expected 200"));
    }

    fn page(
        epoch: &str,
        version: u64,
        after: Option<u8>,
        next: Option<u8>,
        upsert: Vec<RouteEntry>,
    ) -> RoutesResponse {
        RoutesResponse {
            after: after.map(id),
            next: next.map(id),
            ..resp(epoch, version, RoutesKind::Full, upsert, vec![])
        }
    }

    #[test]
    fn snapshot_pages_apply_in_order_and_clear_their_ranges() {
        let mut p = Poller::new(cfg());
        p.apply_c(resp(
            "e1",
            4,
            RoutesKind::Full,
            (1..=6).map(|n| entry(n, G, &["m1"])).collect(),
            vec![],
        ))
        .unwrap();
        // A new epoch, paged: the first page covers ids up to 3.
        p.poll_due(0);
        let u = p
            .respond(
                Some(200),
                &serde_json::to_vec(&page(
                    "e2",
                    9,
                    None,
                    Some(3),
                    vec![entry(2, R, &["m1", "m2"]), entry(3, G, &["m2"])],
                ))
                .unwrap(),
                0,
            )
            .unwrap();
        assert_eq!(
            u.writes[1..].to_vec(),
            vec![
                w(&key(2), "1|r|manager_m1,manager_m2"),
                w(&key(3), "1|g|manager_m2"),
                w(&key(1), ""),
            ],
            "the page's range loses what the page does not have, nothing beyond it"
        );
        assert_eq!(
            p.position(),
            (4, Some("e1")),
            "the position waits for the last page"
        );
        let q = p.query();
        assert_eq!(
            (q.since, q.epoch.as_deref(), q.after, q.wait_ms),
            (9, Some("e2"), Some(id(3)), Some(0))
        );
        let path = &p.poll_due(1).unwrap().headers[1].1;
        assert!(path.ends_with(&format!("&after={}", id(3))), "{path}");

        // The last page: ids after 3.
        let u = p
            .respond(
                Some(200),
                &serde_json::to_vec(&page("e2", 9, Some(3), None, vec![entry(5, G, &["m1"])]))
                    .unwrap(),
                1,
            )
            .unwrap();
        assert_eq!(
            u.writes,
            vec![w(&key(5), "1|g|manager_m1"), w(&key(4), ""), w(&key(6), "")]
        );
        assert_eq!(p.position(), (9, Some("e2")));
        assert_eq!(p.entries(), 3);
        assert_eq!(p.query().after, None);
        assert_eq!(p.query().since, 9);
    }

    #[test]
    fn pages_that_do_not_continue_the_snapshot_start_over() {
        let start = || {
            let mut p = Poller::new(cfg());
            p.apply_c(page("e1", 5, None, Some(3), vec![entry(1, G, &["m1"])]))
                .unwrap();
            p
        };
        for bad in [
            page("e1", 5, Some(2), None, vec![]),
            page("e1", 6, Some(3), None, vec![]),
            page("e9", 5, Some(3), None, vec![]),
            page("e1", 5, Some(3), Some(3), vec![]),
            page("e1", 5, Some(3), Some(7), vec![entry(9, G, &["m1"])]),
            page("e1", 5, Some(3), None, vec![entry(2, G, &["m1"])]),
            resp("e1", 6, RoutesKind::Delta, vec![], vec![]),
            resp("e1", 5, RoutesKind::Unchanged, vec![], vec![]),
        ] {
            let mut p = start();
            p.poll_due(0);
            let e = p
                .respond(Some(200), &serde_json::to_vec(&bad).unwrap(), 0)
                .unwrap_err();
            assert!(matches!(e, PollError::Resync(_)), "{bad:?}: {e}");
            assert_eq!((p.query().since, p.query().after), (0, None), "{bad:?}");
            assert_eq!(p.entries(), 1, "nothing written: {bad:?}");
        }
        // A first page (no `after`) always starts a snapshot afresh.
        let mut p = start();
        p.apply_c(page("e2", 1, None, None, vec![])).unwrap();
        assert_eq!((p.position(), p.entries()), ((1, Some("e2")), 0));
    }

    #[test]
    fn a_big_answer_is_applied_a_few_writes_per_turn() {
        let mut p = Poller::new(cfg());
        p.poll_due(0);
        let full = resp(
            "e1",
            3,
            RoutesKind::Full,
            (1..=7).map(|n| entry(n, G, &["m1"])).collect(),
            vec![],
        );
        let mut writes = Vec::new();
        let mut turns = 1;
        let mut step = p
            .on_response(
                Some(200),
                &serde_json::to_vec(&full).unwrap(),
                0,
                &mut |w| {
                    writes.push(rendered(w));
                    true
                },
            )
            .unwrap();
        while step == Step::More {
            assert!(p.applying());
            assert_eq!(p.poll_due(0), None, "no poll while applying");
            assert_eq!(
                p.position(),
                (0, None),
                "the position waits for the whole answer"
            );
            assert!(
                writes.len() <= 3 * turns,
                "{} writes in {turns} turns",
                writes.len()
            );
            step = p.step(&mut |w| {
                writes.push(rendered(w));
                true
            });
            turns += 1;
        }
        assert_eq!(turns, 3, "managers + 7 entries, 3 writes per turn");
        let Step::Done(u) = step else {
            panic!("the loop ends on Done")
        };
        assert_eq!((u.writes, u.failed_writes, u.more_pages), (8, 0, false));
        assert_eq!(writes.len(), 8);
        assert_eq!(p.position(), (3, Some("e1")));
        assert!(p.poll_due(0).is_some());
        // Writes the host refuses are counted and reported.
        p.respond(
            Some(200),
            &serde_json::to_vec(&resp(
                "e1",
                4,
                RoutesKind::Delta,
                vec![entry(1, R, &["m1"])],
                vec![],
            ))
            .unwrap(),
            0,
        )
        .unwrap();
        p.poll_due(0);
        let delta = resp(
            "e1",
            5,
            RoutesKind::Delta,
            vec![entry(2, R, &["m1"])],
            vec![id(3)],
        );
        let step = p
            .on_response(
                Some(200),
                &serde_json::to_vec(&delta).unwrap(),
                0,
                &mut |_| false,
            )
            .unwrap();
        let Step::Done(u) = step else {
            panic!("2 writes fit a turn")
        };
        assert_eq!(u.failed_writes, 2);
        let r = p.report(&Ok(u));
        assert!(
            r.warnings[0].contains("2 of 2 table writes failed"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn another_protocol_is_refused_clearly_and_keeps_the_table() {
        let mut p = Poller::new(cfg());
        p.apply_c(resp(
            "e1",
            3,
            RoutesKind::Full,
            vec![entry(1, G, &["m1"])],
            vec![],
        ))
        .unwrap();
        // A control plane of an older release: no protocol in its answer.
        p.poll_due(0);
        let old = br#"{"epoch":"e1","version":4,"kind":"full","managers":[],"upsert":[]}"#;
        let e = p.respond(Some(200), old, 0).unwrap_err();
        assert_eq!(e, PollError::Protocol(0));
        assert!(e.to_string().contains("older than protocol 2"), "{e}");
        assert_eq!((p.position(), p.entries()), ((3, Some("e1")), 1));
        // A control plane refusing this poller's protocol says why; the message is kept.
        p.poll_due(10_000);
        let body = br#"{"error":"unsupported_protocol","message":"upgrade the filter"}"#;
        let e = p.respond(Some(400), body, 10_000).unwrap_err();
        assert!(
            matches!(&e, PollError::Refused { status: 400, error, .. } if error == "unsupported_protocol")
        );
        assert_eq!(
            e.to_string(),
            "routes poll refused with HTTP 400 unsupported_protocol: upgrade the filter"
        );
        assert_eq!(p.entries(), 1);
    }

    proptest! {
        /// However a table is cut into pages and turns, the table written is
        /// the last page set's table, and the position moves once.
        #[test]
        fn any_paging_and_any_turn_size_give_the_snapshot(
            before in proptest::collection::btree_set(any::<u8>(), 0..20),
            after in proptest::collection::btree_set(any::<u8>(), 0..20),
            page_size in 1usize..6,
            per_turn in 1usize..5,
            process_table in any::<bool>(),
        ) {
            // Ids held either by the poller's own set or by a process table
            // that every write also goes to.
            let process = std::sync::Arc::new(crate::process_table::ProcessTable::new());
            let cfg = PollerConfig { writes_per_turn: per_turn, ..cfg() };
            let mut p = if process_table {
                Poller::with_held_ids(cfg, Box::new(process.clone()))
            } else {
                Poller::new(cfg)
            };
            let mut table: HashMap<String, String> = HashMap::new();
            let mut sink = |w: TableWrite<'_>| {
                assert_eq!(process.apply(w), Ok(()));
                let (k, v) = rendered(w);
                if v.is_empty() { table.remove(&k); } else { table.insert(k, v); }
                true
            };
            p.apply(resp("e1", 2, RoutesKind::Full, before.iter().map(|&n| entry(n, G, &["m1"])).collect(), vec![]), &mut sink).unwrap();
            let ids: Vec<u8> = after.iter().copied().collect();
            let chunks: Vec<&[u8]> = if ids.is_empty() { vec![&[]] } else { ids.chunks(page_size).collect() };
            let mut cursor = None;
            for (i, c) in chunks.iter().enumerate() {
                let next = (i + 1 < chunks.len()).then(|| *c.last().unwrap());
                let r = page("e2", 7, cursor, next, c.iter().map(|&n| entry(n, R, &["m2"])).collect());
                p.poll_due(0);
                let mut step = p.on_response(Some(200), &serde_json::to_vec(&r).unwrap(), 0, &mut sink).unwrap();
                while step == Step::More {
                    prop_assert_eq!(p.position(), (2, Some("e1")));
                    step = p.step(&mut sink);
                }
                cursor = next;
            }
            prop_assert_eq!(p.position(), (7, Some("e2")));
            let want: HashMap<String, String> = after.iter().map(|&n| (key(n), "1|r|manager_m2".to_owned())).chain([(MANAGERS_KEY.to_owned(), "manager_m1 available\nmanager_m2 available".to_owned())]).collect();
            prop_assert_eq!(table, want);
            prop_assert_eq!(p.entries(), after.len());
            prop_assert_eq!(process.len(), after.len());
        }

        #[test]
        fn applier_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut p = Poller::new(cfg());
            p.poll_due(0);
            let _ = p.respond(Some(200), &body, 0);
        }

        #[test]
        fn applier_never_panics_on_arbitrary_responses(
            epoch in "[a-z0-9 ]{0,6}",
            version in 0u64..10,
            kind in prop_oneof![Just(RoutesKind::Full), Just(RoutesKind::Delta), Just(RoutesKind::Unchanged)],
            managers in proptest::collection::vec(("[a-c]{0,2}", "[a-z_ ,]{0,6}"), 0..4),
            upsert in proptest::collection::vec((any::<u8>(), any::<bool>(), proptest::collection::vec("[a-c]{0,2}", 0..4)), 0..6),
            remove in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let mut p = Poller::new(cfg());
            let _ = p.apply_c(resp("e", 1, RoutesKind::Full, vec![], vec![]));
            let r = RoutesResponse {
                protocol: ROUTES_PROTOCOL,
                after: None,
                next: None,
                epoch,
                version,
                kind,
                managers: managers.into_iter().map(|(id, cluster)| ManagerRoute { id, cluster, location: String::new(), availability: Availability::Down }).collect(),
                upsert: upsert.into_iter().map(|(n, reg, replicas)| RouteEntry { consumer: id(n), state: if reg { R } else { G }, replicas }).collect(),
                remove: remove.into_iter().map(id).collect(),
            };
            if let Ok(u) = p.apply_c(r) {
                // Every written entry decodes and names only valid clusters.
                for (k, v) in &u.writes {
                    if k == MANAGERS_KEY {
                        prop_assert!(crate::table::decode_managers(v.as_bytes()).is_ok());
                    } else {
                        prop_assert!(crate::table::decode_entry(v.as_bytes()).is_ok(), "{}", v);
                    }
                }
                if let Some(i) = u.writes.iter().position(|(k, _)| k == MANAGERS_KEY) {
                    prop_assert_eq!(i, 0, "managers key first");
                }
            }
        }
    }
}
