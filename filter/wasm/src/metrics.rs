//! Envoy stats through define_metric/increment_metric, named in [`prealloc_filter_core::metrics`].

use proxy_wasm::types::MetricType;

use super::host;
use prealloc_filter_core::metrics::{Counter, Gauge};

/// Metric ids of this VM (each worker's VM defines its own; Envoy merges them by name).
pub struct Metrics {
    counters: Vec<Option<u32>>,
    gauges: Vec<Option<u32>>,
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
        }
    }

    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    pub fn add(&self, c: Counter, n: u64) {
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
