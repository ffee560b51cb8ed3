//! Prometheus metrics: counters and histograms updated in place, gauges read at scrape time.

use crate::pollers::Pollers;
use crate::registry::Registry;
use crate::routes::Routes;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-bucket histogram of seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe_secs(&self, secs: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_ns
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// `(upper bound in seconds, observations at or below it)`, cumulative.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LAG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
];

/// Every counter and histogram of the control plane.
pub struct Metrics {
    pub registrations: AtomicU64,
    pub registrations_pool_empty: AtomicU64,
    pub registrations_bad_request: AtomicU64,
    pub registrations_released: AtomicU64,
    pub registrations_reclaimed: AtomicU64,
    pub routes_protocol_refused: AtomicU64,
    pub replicas_recorded: AtomicU64,
    pub consumers_registered: AtomicU64,
    pub provision_attempt_failures: AtomicU64,
    pub provision_abandoned: AtomicU64,
    pub copies: AtomicU64,
    pub copy_failures: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub committed_commands: AtomicU64,
    /// Sign-up to each confirmed extra copy.
    pub replication_lag: Histogram,
    pub commit_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            registrations: AtomicU64::new(0),
            registrations_pool_empty: AtomicU64::new(0),
            registrations_bad_request: AtomicU64::new(0),
            registrations_released: AtomicU64::new(0),
            registrations_reclaimed: AtomicU64::new(0),
            routes_protocol_refused: AtomicU64::new(0),
            replicas_recorded: AtomicU64::new(0),
            consumers_registered: AtomicU64::new(0),
            provision_attempt_failures: AtomicU64::new(0),
            provision_abandoned: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            copy_failures: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_failures: AtomicU64::new(0),
            committed_commands: AtomicU64::new(0),
            replication_lag: Histogram::new(LAG_BUCKETS),
            commit_seconds: Histogram::new(COMMIT_BUCKETS),
        }
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        v.load(Ordering::Relaxed)
    );
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The Prometheus text exposition.
    /// `connected_within_ms`: a poller seen this recently (or with a poll
    /// held) counts as connected.
    pub fn render(
        &self,
        registry: &Registry,
        routes: &Routes,
        pollers: &Pollers,
        connected_within_ms: u64,
    ) -> String {
        let mut o = String::with_capacity(4096);
        counter(
            &mut o,
            "prealloc_registrations_total",
            "Registrations answered 201.",
            &self.registrations,
        );
        let _ = writeln!(o, "# HELP prealloc_registrations_refused_total Registrations refused, by reason.\n# TYPE prealloc_registrations_refused_total counter");
        let _ = writeln!(
            o,
            "prealloc_registrations_refused_total{{reason=\"pool_empty\"}} {}",
            self.registrations_pool_empty.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "prealloc_registrations_refused_total{{reason=\"bad_request\"}} {}",
            self.registrations_bad_request.load(Ordering::Relaxed)
        );
        counter(
            &mut o,
            "prealloc_registrations_released_total",
            "Registrations given back (DELETE /v1/registrations).",
            &self.registrations_released,
        );
        counter(
            &mut o,
            "prealloc_registrations_reclaimed_total",
            "Provisional registrations never confirmed within registration_lease_ms: resource back in the pool.",
            &self.registrations_reclaimed,
        );
        counter(
            &mut o,
            "prealloc_routes_protocol_refused_total",
            "Routes polls refused for speaking another routes protocol (a filter of another release).",
            &self.routes_protocol_refused,
        );
        counter(
            &mut o,
            "prealloc_replicas_recorded_total",
            "Confirmed copies recorded beyond the first manager.",
            &self.replicas_recorded,
        );
        counter(
            &mut o,
            "prealloc_consumers_registered_total",
            "Consumers that reached their replication target.",
            &self.consumers_registered,
        );
        counter(
            &mut o,
            "prealloc_provision_attempt_failures_total",
            "Provisioning calls that failed (retried).",
            &self.provision_attempt_failures,
        );
        counter(
            &mut o,
            "prealloc_provision_abandoned_total",
            "Reservations given back after every provisioning attempt failed.",
            &self.provision_abandoned,
        );
        counter(
            &mut o,
            "prealloc_active_copies_total",
            "Active-mode copies confirmed by the target manager.",
            &self.copies,
        );
        counter(
            &mut o,
            "prealloc_active_copy_failures_total",
            "Active-mode copy attempts that failed (retried).",
            &self.copy_failures,
        );
        counter(
            &mut o,
            "prealloc_store_commits_total",
            "Store transactions committed.",
            &self.commits,
        );
        counter(
            &mut o,
            "prealloc_store_commit_failures_total",
            "Store transactions that failed.",
            &self.commit_failures,
        );
        counter(
            &mut o,
            "prealloc_store_commands_total",
            "Write commands committed (commands / commits = group size).",
            &self.committed_commands,
        );
        self.replication_lag.render(
            &mut o,
            "prealloc_replication_lag_seconds",
            "Time from sign-up to each confirmed extra copy.",
        );
        self.commit_seconds.render(
            &mut o,
            "prealloc_store_commit_seconds",
            "Duration of one durable group commit.",
        );

        let _ = writeln!(o, "# HELP prealloc_pool_depth Ready resources on available managers.\n# TYPE prealloc_pool_depth gauge");
        for (i, p) in registry.pools().iter().enumerate() {
            let _ = writeln!(
                o,
                "prealloc_pool_depth{{resource_type=\"{}\",location=\"{}\"}} {}",
                esc(&p.resource_type),
                esc(&p.location),
                registry.depth(i)
            );
        }
        let _ = writeln!(o, "# HELP prealloc_pool_target_depth Configured target depth.\n# TYPE prealloc_pool_target_depth gauge");
        for p in registry.pools() {
            let _ = writeln!(
                o,
                "prealloc_pool_target_depth{{resource_type=\"{}\",location=\"{}\"}} {}",
                esc(&p.resource_type),
                esc(&p.location),
                p.target_depth
            );
        }
        let _ = writeln!(o, "# HELP prealloc_pool_provisioning Resources reserved and being provisioned.\n# TYPE prealloc_pool_provisioning gauge");
        for p in registry.pools() {
            let _ = writeln!(
                o,
                "prealloc_pool_provisioning{{resource_type=\"{}\",location=\"{}\"}} {}",
                esc(&p.resource_type),
                esc(&p.location),
                p.provisioning
            );
        }
        let _ = writeln!(o, "# HELP prealloc_preallocations_total Resources made ready since start (rate() gives the pre-allocation rate).\n# TYPE prealloc_preallocations_total counter");
        for p in registry.pools() {
            let _ = writeln!(
                o,
                "prealloc_preallocations_total{{resource_type=\"{}\",location=\"{}\"}} {}",
                esc(&p.resource_type),
                esc(&p.location),
                p.preallocated_total
            );
        }
        let _ = writeln!(o, "# HELP prealloc_manager_capacity Configured capacity per resource type.\n# TYPE prealloc_manager_capacity gauge");
        for m in registry.managers() {
            for (t, c) in &m.capacity {
                let _ = writeln!(
                    o,
                    "prealloc_manager_capacity{{manager=\"{}\",resource_type=\"{}\"}} {c}",
                    esc(&m.id),
                    esc(t)
                );
            }
        }
        let _ = writeln!(o, "# HELP prealloc_manager_free_capacity Capacity not reserved, ready or assigned.\n# TYPE prealloc_manager_free_capacity gauge");
        for m in registry.managers() {
            for t in m.capacity.keys() {
                let _ = writeln!(
                    o,
                    "prealloc_manager_free_capacity{{manager=\"{}\",resource_type=\"{}\"}} {}",
                    esc(&m.id),
                    esc(t),
                    m.free(t)
                );
            }
        }
        let _ = writeln!(o, "# HELP prealloc_manager_availability 1 for the manager's current availability.\n# TYPE prealloc_manager_availability gauge");
        for m in registry.managers() {
            for a in ["available", "draining", "down"] {
                let v = u8::from(m.availability.as_str() == a);
                let _ = writeln!(
                    o,
                    "prealloc_manager_availability{{manager=\"{}\",availability=\"{a}\"}} {v}",
                    esc(&m.id)
                );
            }
        }
        let _ = writeln!(o, "# HELP prealloc_consumers Consumers registered and not given back (in memory or settled in the database).\n# TYPE prealloc_consumers gauge\nprealloc_consumers {}", registry.consumer_count());
        let _ = writeln!(o, "# HELP prealloc_consumers_in_memory Consumers held in memory: registering, provisional, in the route window or among the newest; the others are settled, in the database only.\n# TYPE prealloc_consumers_in_memory gauge\nprealloc_consumers_in_memory {}", registry.consumers_in_memory());
        let _ = writeln!(o, "# HELP prealloc_routes_version Version of the pushed routing table.\n# TYPE prealloc_routes_version gauge\nprealloc_routes_version {}", routes.version());
        let _ = writeln!(o, "# HELP prealloc_routes_entries Consumers in the routing table.\n# TYPE prealloc_routes_entries gauge\nprealloc_routes_entries {}", routes.len());
        let _ = writeln!(o, "# HELP prealloc_routes_waiting_pollers Long-polls currently held.\n# TYPE prealloc_routes_waiting_pollers gauge\nprealloc_routes_waiting_pollers {}", routes.waiting());
        let _ = writeln!(o, "# HELP prealloc_pollers_connected Envoys (poller node ids) with a poll held or seen within twice push.max_wait_ms.\n# TYPE prealloc_pollers_connected gauge\nprealloc_pollers_connected {}", pollers.connected(crate::now_ms(), connected_within_ms));
        o
    }
}
