//! Envoy stats through define_metric/increment_metric, named in [`prealloc_filter_core::metrics`].

use proxy_wasm::types::MetricType;
use std::cell::Cell;

use super::host;
use prealloc_filter_core::metrics::{Counter, Gauge};

/// Metric ids of this VM (each worker's VM defines its own; Envoy merges them by name).
///
/// A buffered set (the HTTP filter's) adds to per-worker sums and sends them
/// on [`Metrics::flush`] (the root tick): no host call per request for stats.
pub struct Metrics {
    counters: Vec<Option<u32>>,
    gauges: Vec<Option<u32>>,
    /// Unsent increments per counter, when buffered.
    pending: Option<Vec<Cell<u64>>>,
}

impl Metrics {
    pub fn define() -> Self {
        Metrics {
            counters: Counter::ALL
                .iter()
                .map(|c| host::define_metric(MetricType::Counter, c.name()))
                .collect(),
            gauges: Gauge::ALL
                .iter()
                .map(|g| host::define_metric(MetricType::Gauge, g.name()))
                .collect(),
            pending: None,
        }
    }

    /// Like [`Metrics::define`], with counter increments held until [`Metrics::flush`].
    pub fn define_buffered() -> Self {
        let mut m = Metrics::define();
        m.pending = Some(Counter::ALL.iter().map(|_| Cell::new(0)).collect());
        m
    }

    /// Sends the buffered increments (one host call per counter that moved).
    pub fn flush(&self) {
        let Some(pending) = &self.pending else { return };
        for (slot, id) in pending.iter().zip(&self.counters) {
            let n = slot.replace(0);
            if let (true, Some(id)) = (n > 0, id) {
                host::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    pub fn add(&self, c: Counter, n: u64) {
        if let Some(slot) = self.pending.as_ref().and_then(|p| p.get(c.index())) {
            slot.set(slot.get().saturating_add(n));
            return;
        }
        if let Some(Some(id)) = self.counters.get(c.index()) {
            host::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn set(&self, g: Gauge, v: u64) {
        if let Some(Some(id)) = self.gauges.get(g.index()) {
            host::record_metric(*id, v);
        }
    }
}
