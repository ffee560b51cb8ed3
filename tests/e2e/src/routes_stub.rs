//! A hyper server speaking the routes long-poll contract (`GET /v1/routes`) from a table the test sets.
//!
//! It stands in for the control plane in the data-plane tests: the test sets
//! managers and consumer entries, each change bumps the version and wakes every
//! held long-poll at once, exactly like the contract in `prealloc_wire`.
//! Faults (an error status or a garbage body), a new epoch and a history gap
//! can be injected. A snapshot is always one page (routes protocol 2 allows it).

use crate::server::{cut_short, json_reply, reply, Reply, ServerHandle};
use hyper::body::Incoming;
use hyper::{Request, Response};
use prealloc_wire::{
    Availability, ConsumerId, ConsumerState, ErrorBody, ManagerRoute, RouteEntry, RoutesKind,
    RoutesResponse, ROUTES_PATH, ROUTES_PROTOCOL,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The longest hold the stub grants, whatever `wait_ms` asks (the contract lets servers cap it).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// One poll as the stub saw it.
#[derive(Debug, Clone)]
pub struct Poll {
    pub since: Option<u64>,
    pub epoch: Option<String>,
    pub wait_ms: Option<u64>,
    pub authorized: bool,
    /// What it answered: a kind, or `None` for an error or injected fault.
    pub kind: Option<RoutesKind>,
    pub status: u16,
    /// The version the answer carried (for error answers, the current version).
    pub version: u64,
    pub arrived: Instant,
    pub answered: Instant,
}

/// An answer that replaces the contract's, for fault tests.
#[derive(Debug, Clone)]
pub struct Fault {
    pub status: u16,
    pub body: String,
}

struct Table {
    token: String,
    epoch: String,
    version: u64,
    managers: Vec<ManagerRoute>,
    entries: BTreeMap<ConsumerId, RouteEntry>,
    /// Which consumer each version touched (managers-only changes touch none).
    history: Vec<(u64, Option<ConsumerId>)>,
    /// Deltas can be served for `since >= oldest_delta_base`; older asks get a full snapshot.
    oldest_delta_base: u64,
    changed_at: BTreeMap<u64, Instant>,
    polls: Vec<Poll>,
    /// `(since, epoch, arrived)` of every poll being held right now.
    held: Vec<(u64, Option<String>, Instant)>,
    fault: Option<Fault>,
    /// Polls are never answered (a control plane that accepts and hangs).
    hang: bool,
    /// Answers claim more bytes than they carry, and the connection closes mid-body.
    truncate: bool,
}

/// The routes stub; stops when dropped.
pub struct RoutesStub {
    table: Arc<Mutex<Table>>,
    notify: watch::Sender<u64>,
    server: ServerHandle,
}

impl RoutesStub {
    /// Starts the stub expecting `Authorization: Bearer <token>`; epoch is unique per stub, version 1, empty table.
    pub fn start(token: &str) -> RoutesStub {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let table = Arc::new(Mutex::new(Table {
            token: token.to_owned(),
            epoch: format!("stub-{nanos:x}"),
            version: 1,
            managers: Vec::new(),
            entries: BTreeMap::new(),
            history: Vec::new(),
            oldest_delta_base: 1,
            changed_at: BTreeMap::new(),
            polls: Vec::new(),
            held: Vec::new(),
            fault: None,
            hang: false,
            truncate: false,
        }));
        let (notify, _) = watch::channel(1u64);
        let server = {
            let table = table.clone();
            let notify = notify.clone();
            ServerHandle::start("routes-stub", move |req| {
                handle(table.clone(), notify.subscribe(), req)
            })
        };
        RoutesStub {
            table,
            notify,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    pub fn epoch(&self) -> String {
        self.lock().epoch.clone()
    }

    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Replaces the managers (one change). Returns the new version.
    pub fn set_managers(&self, managers: Vec<ManagerRoute>) -> u64 {
        self.change(|t| {
            t.managers = managers;
            vec![None]
        })
    }

    /// Sets one manager's availability (one change). Panics if the id is unknown.
    pub fn set_availability(&self, manager: &str, availability: Availability) -> u64 {
        self.change(|t| {
            let m = t
                .managers
                .iter_mut()
                .find(|m| m.id == manager)
                .unwrap_or_else(|| panic!("routes stub: no manager {manager}"));
            m.availability = availability;
            vec![None]
        })
    }

    /// Inserts or replaces a consumer's entry (one change). Returns the new version.
    pub fn upsert(&self, consumer: &ConsumerId, state: ConsumerState, replicas: &[&str]) -> u64 {
        let entry = RouteEntry {
            consumer: consumer.clone(),
            state,
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
        };
        self.upsert_all(vec![entry])
    }

    /// Inserts or replaces several entries in one version.
    pub fn upsert_all(&self, entries: Vec<RouteEntry>) -> u64 {
        self.change(|t| {
            entries
                .into_iter()
                .map(|e| {
                    let c = e.consumer.clone();
                    t.entries.insert(c.clone(), e);
                    Some(c)
                })
                .collect()
        })
    }

    /// Drops a consumer's entry (one change).
    pub fn remove(&self, consumer: &ConsumerId) -> u64 {
        self.change(|t| {
            t.entries.remove(consumer);
            vec![Some(consumer.clone())]
        })
    }

    /// Starts a new epoch (as a control plane with a new database would): every poller gets a full snapshot next.
    pub fn new_epoch(&self, epoch: &str) -> u64 {
        self.change(|t| {
            t.epoch = epoch.to_owned();
            vec![None]
        })
    }

    /// Forgets the change history, so any poller behind the current version gets a full snapshot (a gap).
    pub fn forget_history(&self) {
        let mut t = self.lock();
        t.history.clear();
        t.oldest_delta_base = t.version;
    }

    /// Answers every poll with `fault` until cleared with `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
        // Release held polls so the fault is seen now, not after their wait.
        let v = *self.notify.borrow();
        self.notify.send_replace(v);
    }

    /// From now on polls are accepted and never answered (`false`: served again).
    pub fn set_hang(&self, hang: bool) {
        self.lock().hang = hang;
        let v = *self.notify.borrow();
        self.notify.send_replace(v);
    }

    /// From now on every answer is cut short: its `content-length` promises
    /// more than is sent, so the connection ends mid-body (`false`: whole again).
    pub fn set_truncate(&self, truncate: bool) {
        self.lock().truncate = truncate;
        let v = *self.notify.borrow();
        self.notify.send_replace(v);
    }

    /// When a version was created (by one of the change methods).
    pub fn changed_at(&self, version: u64) -> Option<Instant> {
        self.lock().changed_at.get(&version).copied()
    }

    /// Every poll answered so far.
    pub fn polls(&self) -> Vec<Poll> {
        self.lock().polls.clone()
    }

    /// When the first poll asking for changes after `version` (in the current
    /// epoch) arrived: the moment a poller had applied `version`.
    pub fn applied_at(&self, version: u64) -> Option<Instant> {
        let t = self.lock();
        let answered = t
            .polls
            .iter()
            .filter(|p| {
                p.since.is_some_and(|s| s >= version) && p.epoch.as_deref() == Some(&t.epoch)
            })
            .map(|p| p.arrived);
        let held = t
            .held
            .iter()
            .filter(|(s, e, _)| *s >= version && e.as_deref() == Some(&t.epoch))
            .map(|(_, _, at)| *at);
        answered.chain(held).min()
    }

    /// Polls being held right now.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Waits until `pollers` distinct long-polls are held at the current version
    /// and epoch: each poller asked for changes after it, so it has applied
    /// everything. Panics after `timeout` with the polls seen.
    pub fn wait_until_caught_up(&self, pollers: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let t = self.lock();
                let current = t
                    .held
                    .iter()
                    .filter(|(since, epoch, _)| {
                        *since == t.version && epoch.as_deref() == Some(&t.epoch)
                    })
                    .count();
                if current >= pollers {
                    return;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "no poller caught up with routes version {} within {timeout:?}; polls: {:#?}",
                        t.version, t.polls
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn change(&self, f: impl FnOnce(&mut Table) -> Vec<Option<ConsumerId>>) -> u64 {
        let version = {
            let mut t = self.lock();
            let touched = f(&mut t);
            t.version += 1;
            let v = t.version;
            for c in touched {
                t.history.push((v, c));
            }
            t.changed_at.insert(v, Instant::now());
            v
        };
        self.notify.send_replace(version);
        version
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    let body = ErrorBody {
        error: code.to_owned(),
        message: message.to_owned(),
    };
    json_reply(
        status,
        &serde_json::to_value(body).expect("error body serializes"),
    )
}

struct Query {
    since: Option<u64>,
    epoch: Option<String>,
    wait_ms: Option<u64>,
    bad: Option<String>,
}

fn parse_query(q: &str) -> Query {
    let mut out = Query {
        since: None,
        epoch: None,
        wait_ms: None,
        bad: None,
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => match v.parse() {
                Ok(n) => out.since = Some(n),
                Err(_) => out.bad = Some(format!("since must be an unsigned integer, got {v:?}")),
            },
            "epoch" => out.epoch = Some(v.to_owned()),
            "wait_ms" => match v.parse() {
                Ok(n) => out.wait_ms = Some(n),
                Err(_) => out.bad = Some(format!("wait_ms must be an unsigned integer, got {v:?}")),
            },
            _ => {}
        }
    }
    out
}

/// The answer for a poll at this moment, or `None` when it should be held.
fn answer(t: &Table, since: u64, epoch: Option<&str>) -> Option<RoutesResponse> {
    let base = |kind, upsert, remove| RoutesResponse {
        protocol: ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: t.epoch.clone(),
        version: t.version,
        kind,
        managers: t.managers.clone(),
        upsert,
        remove,
    };
    let full = since == 0
        || epoch != Some(t.epoch.as_str())
        || since < t.oldest_delta_base
        || since > t.version;
    if full {
        // A page lists its entries in the order of the ids' bytes (protocol 2),
        // which is not the order of their text.
        let mut all: Vec<RouteEntry> = t.entries.values().cloned().collect();
        all.sort_by_key(|e| e.consumer.to_bytes());
        return Some(base(RoutesKind::Full, all, Vec::new()));
    }
    if since == t.version {
        return None;
    }
    let touched: BTreeSet<&ConsumerId> = t
        .history
        .iter()
        .filter(|(v, _)| *v > since)
        .filter_map(|(_, c)| c.as_ref())
        .collect();
    let mut upsert = Vec::new();
    let mut remove = Vec::new();
    for c in touched {
        match t.entries.get(c) {
            Some(e) => upsert.push(e.clone()),
            None => remove.push(c.clone()),
        }
    }
    Some(base(RoutesKind::Delta, upsert, remove))
}

async fn handle(
    table: Arc<Mutex<Table>>,
    changes: watch::Receiver<u64>,
    req: Request<Incoming>,
) -> Reply {
    if lock(&table).hang {
        // Until the poller gives up and resets the stream (which drops this future).
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let reply = serve_poll(table.clone(), changes, req).await;
    if !lock(&table).truncate {
        return reply;
    }
    let (mut parts, body) = reply.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    parts.headers.insert(
        hyper::header::CONTENT_LENGTH,
        hyper::header::HeaderValue::from(bytes.len()),
    );
    Response::from_parts(parts, cut_short(bytes.slice(..bytes.len() / 2)))
}

async fn serve_poll(
    table: Arc<Mutex<Table>>,
    mut changes: watch::Receiver<u64>,
    req: Request<Incoming>,
) -> Reply {
    let arrived = Instant::now();
    let path = req.uri().path().to_owned();
    let q = parse_query(req.uri().query().unwrap_or(""));
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let record = |t: &mut Table, authorized, kind, status, version| {
        t.polls.push(Poll {
            since: q.since,
            epoch: q.epoch.clone(),
            wait_ms: q.wait_ms,
            authorized,
            kind,
            status,
            version,
            arrived,
            answered: Instant::now(),
        });
    };

    {
        let mut t = lock(&table);
        let authorized = auth.as_deref() == Some(format!("Bearer {}", t.token).as_str());
        let v = t.version;
        if path != ROUTES_PATH || req.method() != hyper::Method::GET {
            record(&mut t, authorized, None, 404, v);
            return error(
                404,
                "not_found",
                "the routes stub serves only GET /v1/routes",
            );
        }
        if !authorized {
            record(&mut t, false, None, 401, v);
            return error(401, "unauthorized", "missing or wrong bearer token");
        }
        if let Some(f) = t.fault.clone() {
            record(&mut t, true, None, f.status, v);
            return reply(f.status, "application/json", f.body);
        }
        let Some(since) = q.since else {
            record(&mut t, true, None, 400, v);
            return error(400, "bad_query", "since is required");
        };
        if let Some(bad) = &q.bad {
            record(&mut t, true, None, 400, v);
            return error(400, "bad_query", bad);
        }
        if let Some(r) = answer(&t, since, q.epoch.as_deref()) {
            record(&mut t, true, Some(r.kind), 200, r.version);
            return json_reply(
                200,
                &serde_json::to_value(r).expect("routes response serializes"),
            );
        }
        t.held.push((since, q.epoch.clone(), arrived));
    }

    // Held: wake on any change (or fault), else answer Unchanged when the wait ends.
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000)).min(MAX_WAIT);
    // `changes` was subscribed before the table was read, so a change made since
    // then wakes this wait at once instead of being missed.
    let _ = tokio::time::timeout(wait, changes.changed()).await;

    let mut t = lock(&table);
    let since = q.since.unwrap_or(0);
    if let Some(i) = t
        .held
        .iter()
        .position(|(s, e, at)| *s == since && *e == q.epoch && *at == arrived)
    {
        t.held.swap_remove(i);
    }
    let v = t.version;
    if let Some(f) = t.fault.clone() {
        record(&mut t, true, None, f.status, v);
        return reply(f.status, "application/json", f.body);
    }
    let r = answer(&t, since, q.epoch.as_deref()).unwrap_or_else(|| RoutesResponse {
        protocol: ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: t.epoch.clone(),
        version: t.version,
        kind: RoutesKind::Unchanged,
        managers: t.managers.clone(),
        upsert: Vec::new(),
        remove: Vec::new(),
    });
    record(&mut t, true, Some(r.kind), 200, r.version);
    json_reply(
        200,
        &serde_json::to_value(r).expect("routes response serializes"),
    )
}

/// A manager route for tests: id `m1` → cluster `manager_m1`, location `local`, available.
pub fn manager_route(id: &str) -> ManagerRoute {
    ManagerRoute {
        id: id.to_owned(),
        cluster: format!("manager_{id}"),
        location: "local".to_owned(),
        availability: Availability::Available,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_lists_its_entries_in_the_order_of_the_ids_bytes() {
        let stub = RoutesStub::start("token");
        let entries: Vec<RouteEntry> = (0..=255u8)
            .map(|i| RouteEntry {
                consumer: ConsumerId::from_bytes([i.wrapping_mul(97); 16]),
                state: prealloc_wire::ConsumerState::Registering,
                replicas: vec!["m1".into()],
            })
            .collect();
        stub.upsert_all(entries);
        let t = stub.table.lock().unwrap_or_else(|p| p.into_inner());
        let snap = answer(&t, 0, None).expect("a snapshot is never held");
        let ids: Vec<[u8; 16]> = snap.upsert.iter().map(|e| e.consumer.to_bytes()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids.len(), 256);
        assert_eq!(ids, sorted, "the poller refuses a page out of id order");
    }
}
