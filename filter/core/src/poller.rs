//! The poller's logic: long-poll requests, applying routes responses as ordered shared-data writes, backoff.
//!
//! The glue owns the host calls; this state machine decides what to ask the
//! control plane next and turns each [`RoutesResponse`] into the list of
//! `set_shared_data` writes that apply it. Write order keeps readers safe
//! (ARCHITECTURE.md): the managers key first, then consumer entries, each
//! written whole. Anything wrong with a response leaves the last good table in
//! place; the poller then retries with capped exponential backoff.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use prealloc_wire::{ConsumerId, RoutesKind, RoutesQuery, RoutesResponse};
use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::config::PollerConfig;
use crate::metrics::Counter;
use crate::pipeline::Bumps;
use crate::table::{encode_managers, is_valid_cluster, TableWrite, MAX_ENTRY_REPLICAS};

/// Extra time granted to a long-poll over the hold asked of the server.
pub const TIMEOUT_MARGIN_MS: u64 = 5000;
/// Longest epoch accepted (it is echoed in the query string).
pub const MAX_EPOCH_LEN: usize = 128;

/// One HTTP call to make to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Envoy cluster to call.
    pub cluster: String,
    /// Headers including `:method`, `:path`, `:authority`.
    pub headers: Vec<(&'static str, String)>,
    pub timeout_ms: u64,
}

/// The result of applying a good response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub kind: RoutesKind,
    pub version: u64,
    /// How many shared-data writes were handed to the sink.
    pub writes: usize,
    /// Parts of the response that were refused (logged; the rest applies).
    pub skipped: Vec<String>,
}

/// Why a poll did not produce an update; the last good table stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    /// The call could not be made or got no HTTP answer (reset, timeout, no cluster).
    Transport(String),
    /// The control plane answered with a non-200 status.
    Status(u32),
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

/// The poller's state between calls.
#[derive(Debug)]
pub struct Poller {
    cfg: PollerConfig,
    epoch: Option<String>,
    version: u64,
    /// Consumers this poller wrote a non-empty entry for: a full snapshot clears the absent ones.
    written: HashSet<[u8; 16]>,
    /// The managers value last written, to skip identical rewrites.
    managers_value: Option<String>,
    failures: u32,
    phase: Phase,
}

impl Poller {
    pub fn new(cfg: PollerConfig) -> Self {
        Poller {
            cfg,
            epoch: None,
            version: 0,
            written: HashSet::new(),
            managers_value: None,
            failures: 0,
            phase: Phase::Ready,
        }
    }

    /// The query the next poll sends.
    pub fn query(&self) -> RoutesQuery {
        RoutesQuery {
            since: self.version,
            epoch: self.epoch.clone(),
            wait_ms: Some(self.cfg.wait_ms),
            node: self.cfg.node_id.clone(),
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
        self.written.len()
    }

    /// On every tick and after every answer: the request to send now, if one is due.
    /// Marks the poll in flight; report the outcome with [`Poller::dispatch_failed`]
    /// or [`Poller::on_response`].
    pub fn poll_due(&mut self, now_ms: u64) -> Option<Request> {
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

    /// Applies the answer of the outstanding poll. `status` is the `:status`
    /// (None when the call failed without an HTTP answer). On success the next
    /// poll is due at once (long-poll loop); on error it waits the backoff.
    pub fn on_response(
        &mut self,
        status: Option<u32>,
        body: &[u8],
        now_ms: u64,
        sink: &mut dyn FnMut(TableWrite<'_>),
    ) -> Result<Update, PollError> {
        let result = match status {
            None => Err(PollError::Transport(
                "no HTTP response (connection failure, timeout, or a full snapshot larger \
                 than Envoy's http.async_response_buffer_limit, see envoy/README.md)"
                    .into(),
            )),
            Some(200) => serde_json::from_slice::<RoutesResponse>(body)
                .map_err(|e| PollError::Body(e.to_string()))
                .and_then(|r| self.apply(r, sink)),
            Some(s) => Err(PollError::Status(s)),
        };
        match &result {
            Ok(_) => {
                self.failures = 0;
                self.phase = Phase::Ready;
            }
            Err(_) => {
                self.fail(now_ms);
            }
        }
        result
    }

    /// Applies a decoded response: hands each table write to `sink` in order
    /// (managers first, then each entry whole), then advances
    /// the poller's position. Writes are streamed rather than collected so a
    /// full snapshot of a large table is not held twice in memory; whatever
    /// makes the whole response unusable is checked before the first write.
    pub fn apply(
        &mut self,
        r: RoutesResponse,
        sink: &mut dyn FnMut(TableWrite<'_>),
    ) -> Result<Update, PollError> {
        if r.epoch.is_empty()
            || r.epoch.len() > MAX_EPOCH_LEN
            || !r
                .epoch
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        {
            return Err(PollError::Body(format!(
                "epoch {:?} must be 1..={MAX_EPOCH_LEN} URL-safe characters",
                r.epoch
            )));
        }
        if r.kind != RoutesKind::Full {
            let same_epoch = self.epoch.as_deref() == Some(r.epoch.as_str());
            let why = if !same_epoch {
                Some(format!(
                    "{:?} for epoch {:?}, ours is {:?}",
                    r.kind, r.epoch, self.epoch
                ))
            } else if r.version < self.version
                || (r.kind == RoutesKind::Unchanged && r.version != self.version)
            {
                Some(format!(
                    "{:?} at version {}, ours is {}",
                    r.kind, r.version, self.version
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.epoch = None;
                self.version = 0;
                return Err(PollError::Resync(why));
            }
        }

        let mut skipped = Vec::new();
        let mut writes = 0usize;
        let mut write = |w: TableWrite<'_>| {
            sink(w);
            writes += 1;
        };

        // Managers: id -> cluster, and the availability value, written first.
        let mut clusters: HashMap<&str, &str> = HashMap::with_capacity(r.managers.len());
        let mut lines = Vec::with_capacity(r.managers.len());
        for m in &r.managers {
            if m.id.is_empty() || !is_valid_cluster(&m.cluster) {
                skipped.push(format!(
                    "manager {:?}: cluster {:?} is not a valid cluster name",
                    m.id, m.cluster
                ));
                continue;
            }
            if clusters.insert(m.id.as_str(), m.cluster.as_str()).is_some() {
                skipped.push(format!(
                    "manager {:?} listed twice; the last one wins",
                    m.id
                ));
            }
            lines.push((m.cluster.as_str(), m.availability));
        }
        let managers_value = encode_managers(lines.iter().copied());
        if r.kind == RoutesKind::Full
            || self.managers_value.as_deref() != Some(managers_value.as_str())
        {
            write(TableWrite::Managers(&lines));
        }

        // Consumer entries.
        let mut upserted: HashSet<[u8; 16]> = HashSet::new();
        let mut removed: Vec<[u8; 16]> = Vec::new();
        for e in &r.upsert {
            let mut replica_clusters: Vec<&str> = Vec::with_capacity(e.replicas.len());
            let mut unknown = None;
            for id in &e.replicas {
                match clusters.get(id.as_str()) {
                    Some(c) if !replica_clusters.contains(c) => replica_clusters.push(c),
                    Some(_) => {}
                    None => {
                        unknown = Some(id.as_str());
                        break;
                    }
                }
            }
            let problem = if let Some(id) = unknown {
                Some(format!("names unknown manager {id:?}"))
            } else if replica_clusters.is_empty() {
                Some("has no replicas".to_owned())
            } else if replica_clusters.len() > MAX_ENTRY_REPLICAS {
                Some(format!("has more than {MAX_ENTRY_REPLICAS} replicas"))
            } else {
                None
            };
            if let Some(p) = problem {
                skipped.push(format!(
                    "entry of consumer {}: {p}; keeping the previous entry",
                    e.consumer
                ));
                continue;
            }
            write(TableWrite::Entry {
                consumer: &e.consumer,
                state: e.state,
                replicas: &replica_clusters,
            });
            upserted.insert(id_bytes(&e.consumer));
        }
        match r.kind {
            RoutesKind::Full => {
                // Clear what we wrote before and the snapshot no longer has.
                let mut stale: Vec<&[u8; 16]> = self.written.difference(&upserted).collect();
                stale.sort_unstable();
                for b in stale {
                    write(TableWrite::Remove(&ConsumerId::from_bytes(*b)));
                }
            }
            RoutesKind::Delta => {
                for id in &r.remove {
                    write(TableWrite::Remove(id));
                    removed.push(id_bytes(id));
                }
            }
            RoutesKind::Unchanged => {}
        }

        // Advance only now that the whole response was understood.
        match r.kind {
            RoutesKind::Full => self.written = upserted,
            _ => {
                self.written.extend(upserted);
                for b in &removed {
                    self.written.remove(b);
                }
            }
        }
        self.managers_value = Some(managers_value);
        self.epoch = Some(r.epoch);
        self.version = r.version;
        Ok(Update {
            kind: r.kind,
            version: r.version,
            writes,
            skipped,
        })
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
    /// The report of a poll's result; `failed_writes` counts the table writes
    /// the host refused.
    pub fn report(&self, result: &Result<Update, PollError>, failed_writes: usize) -> Report {
        let mut r = Report::default();
        match result {
            Ok(update) => {
                if failed_writes > 0 {
                    r.bumps.add(Counter::PollerErrors, 1);
                    r.warnings.push(format!(
                        "{failed_writes} of {} table writes failed",
                        update.writes
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
                if update.kind == RoutesKind::Full {
                    r.bumps.add(Counter::PollerFullSnapshots, 1);
                    r.info = Some(format!(
                        "full snapshot: version {}, {} entries",
                        update.version,
                        self.entries()
                    ));
                }
                r.gauges = Some((self.entries() as u64, update.version));
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

fn id_bytes(id: &ConsumerId) -> [u8; 16] {
    let mut out = [0u8; 16];
    let _ = URL_SAFE_NO_PAD.decode_slice(id.as_str(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{consumer_key, MANAGERS_KEY};
    use prealloc_wire::{Availability, ConsumerState, ManagerRoute, RouteEntry};
    use proptest::prelude::*;

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
            let u = self.apply(r, &mut |w| writes.push(w.shared_data()))?;
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
            let u = self.on_response(status, body, now, &mut |w| writes.push(w.shared_data()))?;
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
        assert_eq!(path, "/v1/routes?since=0&wait_ms=30000&node=edge-7");
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
            epoch: epoch.into(),
            version,
            kind,
            managers: vec![
                mgr("m1", Availability::Available),
                mgr("m2", Availability::Available),
            ],
            upsert,
            remove,
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
        assert_eq!(h[":path"], "/v1/routes?since=0&wait_ms=30000");
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
        assert!(next
            .headers
            .contains(&(":path", "/v1/routes?since=5&epoch=e1&wait_ms=30000".into())));

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
            (Some(200), &br#"{"epoch":"e1","version":4,"kind":"delta","managers":[],"upsert":[{"consumer":"short","state":"registering","replicas":["m1"]}]}"#[..]),
            (Some(200), &br#"{"epoch":"bad epoch","version":4,"kind":"full","managers":[]}"#[..]),
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

    proptest! {
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
