//! The poller role: long-polls the control plane and writes the routing table into shared data.

use std::time::Duration;

use super::host;
use super::metrics::Metrics;
use crate::config::PollerConfig;
use crate::metrics::{Counter, Gauge};
use crate::poller::Poller;
use prealloc_wire::RoutesKind;

pub struct PollerRoot {
    id: u32,
    poller: Poller,
    in_flight: Option<u32>,
    metrics: Metrics,
}

impl PollerRoot {
    pub fn new(id: u32, cfg: PollerConfig, metrics: Metrics) -> Self {
        PollerRoot {
            id,
            poller: Poller::new(cfg),
            in_flight: None,
            metrics,
        }
    }

    /// Sends the next long-poll if one is due (none in flight, backoff over).
    pub fn poll_if_due(&mut self) {
        let now = host::now_ms();
        let Some(req) = self.poller.poll_due(now) else {
            return;
        };
        let headers: Vec<(&str, &str)> =
            req.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match host::dispatch(
            &req.cluster,
            headers,
            None,
            Duration::from_millis(req.timeout_ms),
        ) {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                let delay = self.poller.dispatch_failed(now);
                self.metrics.inc(Counter::PollerErrors);
                host::warn(&format!(
                    "[prealloc poller {}] cannot call cluster {:?} ({status:?}): is it defined in Envoy's clusters? retrying in {delay} ms",
                    self.id, req.cluster
                ));
            }
        }
    }

    pub fn on_response(&mut self, token: u32, body_size: usize) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let status = host::call_response_status();
        let body = host::call_response_body(body_size);
        let now = host::now_ms();
        let mut failed = 0usize;
        let result = self
            .poller
            .on_response(status, &body, now, &mut |key, value| {
                if host::set_shared(key, value.as_bytes()).is_err() {
                    failed += 1;
                }
            });
        drop(body);
        match result {
            Ok(update) => {
                if failed > 0 {
                    self.metrics.inc(Counter::PollerErrors);
                    host::warn(&format!(
                        "[prealloc poller {}] {failed} of {} shared-data writes failed",
                        self.id, update.writes
                    ));
                }
                for s in &update.skipped {
                    host::warn(&format!("[prealloc poller {}] skipped: {s}", self.id));
                }
                self.metrics
                    .add(Counter::PollerSkipped, update.skipped.len() as u64);
                self.metrics.inc(Counter::PollerUpdates);
                if update.kind == RoutesKind::Full {
                    self.metrics.inc(Counter::PollerFullSnapshots);
                    host::info(&format!(
                        "[prealloc poller {}] full snapshot: version {}, {} entries",
                        self.id,
                        update.version,
                        self.poller.entries()
                    ));
                }
                self.metrics
                    .set(Gauge::PollerEntries, self.poller.entries() as u64);
                self.metrics.set(Gauge::PollerVersion, update.version);
            }
            Err(e) => {
                self.metrics.inc(Counter::PollerErrors);
                host::warn(&format!(
                    "[prealloc poller {}] {e}; keeping the last good table, retrying in {} ms",
                    self.id,
                    self.poller.backoff_ms()
                ));
            }
        }
        self.poll_if_due();
    }
}
