//! The poller role: long-polls the control plane and writes the routing
//! table into shared data, in buckets ([`prealloc_filter_core::buckets`]).

use std::time::Duration;

use super::host;
use super::metrics::Metrics;
use prealloc_filter_core::buckets::{BucketWriter, SharedData};
use prealloc_filter_core::config::PollerConfig;
use prealloc_filter_core::metrics::{Counter, Gauge};
use prealloc_filter_core::poller::{PollError, Poller, Step};

pub struct PollerRoot {
    id: u32,
    poller: Poller,
    in_flight: Option<u32>,
    /// The bucket being written; flushed at the end of every turn.
    buckets: BucketWriter,
    metrics: Metrics,
    /// The tick period between polls (retries, backoff).
    tick: Duration,
    /// Ticking every millisecond while an answer is being applied.
    fast: bool,
}

impl PollerRoot {
    pub fn new(id: u32, cfg: PollerConfig, metrics: Metrics) -> Self {
        PollerRoot {
            id,
            tick: Duration::from_millis(cfg.min_backoff_ms.clamp(10, 1000)),
            fast: false,
            poller: Poller::new(cfg),
            in_flight: None,
            buckets: BucketWriter::new(),
            metrics,
        }
    }

    /// The tick period between polls.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The node id this poller sends.
    pub fn node(&self) -> Option<&str> {
        self.poller.node()
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
        let buckets = &mut self.buckets;
        let result = self
            .poller
            .on_response(status, &body, now, &mut |w| buckets.write(&mut Host, w));
        drop(body);
        self.end_turn();
        self.after_step(result);
    }

    /// Every tick: the next writes of the answer being applied, else the next poll.
    pub fn on_tick(&mut self) {
        if self.poller.applying() {
            let buckets = &mut self.buckets;
            let step = self.poller.step(&mut |w| buckets.write(&mut Host, w));
            self.end_turn();
            self.after_step(Ok(step));
        } else {
            self.poll_if_due();
        }
    }

    /// Stores the bucket left open by a turn of writes, so that the turn's
    /// writes are all visible before the main thread moves on.
    fn end_turn(&mut self) {
        self.buckets.flush(&mut Host);
        let lost = self.buckets.take_failed();
        if lost > 0 {
            self.metrics.inc(Counter::PollerErrors);
            host::warn(&format!(
                "[prealloc poller {}] the host refused a shared-data store: {lost} table writes lost",
                self.id
            ));
        }
    }

    /// Reports an answer applied whole (or a failed poll) and polls on; while
    /// writes remain, the next tick comes after 1 ms instead of `tick`.
    fn after_step(&mut self, result: Result<Step, PollError>) {
        let result = match result {
            Ok(Step::More) => {
                if !self.fast {
                    self.fast = host::set_tick_period(Duration::from_millis(1));
                }
                return;
            }
            Ok(Step::Done(update)) => Ok(update),
            Err(e) => Err(e),
        };
        if self.fast {
            host::set_tick_period(self.tick);
            self.fast = false;
        }
        let report = self.poller.report(&result);
        for (counter, n) in report.bumps.iter() {
            self.metrics.add(counter, n);
        }
        if let Some((entries, version)) = report.gauges {
            self.metrics.set(Gauge::PollerEntries, entries);
            self.metrics.set(Gauge::PollerVersion, version);
        }
        if let Some(info) = &report.info {
            host::info(&format!("[prealloc poller {}] {info}", self.id));
        }
        for w in &report.warnings {
            host::warn(&format!("[prealloc poller {}] {w}", self.id));
        }
        self.poll_if_due();
    }
}

/// The proxy-wasm host's shared data (this VM id's).
struct Host;

impl SharedData for Host {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        host::get_shared(key).0
    }
    fn set(&mut self, key: &str, value: &[u8]) -> bool {
        host::set_shared(key, value).is_ok()
    }
}
