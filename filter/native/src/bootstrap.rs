//! The bootstrap extension (`envoy.bootstrap.dynamic_modules`), on Envoy's main
//! thread: the poller (the core's state machine; its table writes go into the
//! process table every worker reads) and the give-backs of refused sign-ups.

use std::ffi::c_void;
use std::sync::Arc;

use prealloc_filter_core::config::{self, PluginConfig};
use prealloc_filter_core::metrics::{Counter, Gauge};
use prealloc_filter_core::poller::{PollError, Poller, Step};
use prealloc_filter_core::signup::{self, GiveBackResult};
use prealloc_wire::ConsumerId;

use crate::abi::{
    self, BootstrapConfigEnvoy, BootstrapConfigModule, BootstrapEnvoy, BootstrapModule,
    EnvoyBuffer, EnvoyHeader, EventCallback, ModuleBuffer, Timer,
};
use crate::filter::{now_ms, FilterShared, GiveBacksInFlight};
use crate::host::{self, guarded};
use crate::state::{FILTER_CONFIGS, TABLE};

struct Bootstrap {
    config_envoy: BootstrapConfigEnvoy,
    poller: Poller,
    /// The outstanding long-poll's callout id.
    in_flight: Option<u64>,
    timer: Timer,
    tick_ms: u64,
    counters: Vec<Option<usize>>,
    gauges: Vec<Option<usize>>,
    givebacks: GiveBacksInFlight,
}

impl Bootstrap {
    fn bump(&self, counter: Counter, n: u64) {
        if let Some(&Some(id)) = self.counters.get(counter.index()) {
            // SAFETY: this extension's live config; no labels.
            unsafe {
                abi::envoy_dynamic_module_callback_bootstrap_extension_config_increment_counter(
                    self.config_envoy,
                    id,
                    std::ptr::null(),
                    0,
                    n,
                );
            }
        }
    }

    fn set(&self, gauge: Gauge, value: u64) {
        if let Some(&Some(id)) = self.gauges.get(gauge.index()) {
            // SAFETY: as `bump`.
            unsafe {
                abi::envoy_dynamic_module_callback_bootstrap_extension_config_set_gauge(
                    self.config_envoy,
                    id,
                    std::ptr::null(),
                    0,
                    value,
                );
            }
        }
    }

    /// A control-plane call from the main thread; `None` if Envoy refused to start it.
    fn callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let headers = host::module_headers(headers);
        let mut id = 0u64;
        // SAFETY: main thread (every bootstrap hook runs there); every buffer
        // outlives the call and Envoy copies them.
        let init = unsafe {
            abi::envoy_dynamic_module_callback_bootstrap_extension_http_callout(
                self.config_envoy,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        if init == abi::CALLOUT_INIT_SUCCESS {
            Ok(id)
        } else {
            Err(init)
        }
    }

    /// Sends the next long-poll if one is due (none in flight, backoff over).
    fn poll_if_due(&mut self) {
        let now = now_ms();
        let Some(req) = self.poller.poll_due(now) else {
            return;
        };
        let headers: Vec<(&str, &str)> =
            req.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match self.callout(&req.cluster, &headers, b"", req.timeout_ms) {
            Ok(id) => self.in_flight = Some(id),
            Err(init) => {
                let delay = self.poller.dispatch_failed(now);
                self.bump(Counter::PollerErrors, 1);
                host::log(
                    abi::LOG_WARN,
                    &format!(
                        "[prealloc poller] cannot call cluster {:?} (callout init result {init}): is it defined in Envoy's clusters? retrying in {delay} ms",
                        req.cluster
                    ),
                );
            }
        }
    }

    fn on_poll_response(&mut self, status: Option<u32>, body: &[u8]) {
        self.in_flight = None;
        let result = self
            .poller
            .on_response(status, body, now_ms(), &mut |write| {
                TABLE.apply(write).is_ok()
            });
        self.after_step(result);
    }

    /// Applies the next writes of the answer being applied (one main-thread turn).
    fn step(&mut self) {
        let step = self.poller.step(&mut |write| TABLE.apply(write).is_ok());
        self.after_step(Ok(step));
    }

    /// Reports an answer applied whole (or a failed poll) and polls on; while
    /// writes remain, the timer fires again on the next turn of the event loop.
    fn after_step(&mut self, result: Result<Step, PollError>) {
        let result = match result {
            Ok(Step::More) => {
                self.arm(0);
                return;
            }
            Ok(Step::Done(update)) => Ok(update),
            Err(e) => Err(e),
        };
        let report = self.poller.report(&result);
        for (counter, n) in report.bumps.iter() {
            self.bump(counter, n);
        }
        if let Some((entries, version)) = report.gauges {
            self.set(Gauge::PollerEntries, entries);
            self.set(Gauge::PollerVersion, version);
        }
        if let Some(info) = &report.info {
            host::log(abi::LOG_INFO, &format!("[prealloc poller] {info}"));
        }
        for w in &report.warnings {
            host::log(abi::LOG_WARN, &format!("[prealloc poller] {w}"));
        }
        self.poll_if_due();
    }

    /// (Re-)arms the timer to fire in `ms`.
    fn arm(&self, ms: u64) {
        if !self.timer.is_null() {
            // SAFETY: our live timer, main thread.
            unsafe {
                abi::envoy_dynamic_module_callback_bootstrap_extension_timer_enable(self.timer, ms)
            };
        }
    }

    /// Sends the give-backs that are due, for every live filter configuration.
    fn send_givebacks(&mut self) {
        let configs: Vec<Arc<FilterShared>> = FILTER_CONFIGS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = now_ms();
        for shared in configs {
            let Some(sc) = &shared.cfg.signup else {
                continue;
            };
            let due = shared
                .givebacks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_due(now);
            for (consumer, attempt) in due {
                let call = signup::giveback_call(sc, &consumer);
                let refs = call.header_refs();
                let timeout = u64::try_from(sc.timeout.as_millis()).unwrap_or(u64::MAX);
                match self.callout(&sc.cluster, &refs, b"", timeout) {
                    Ok(id) => {
                        self.givebacks
                            .insert(id, (Arc::clone(&shared), consumer, attempt));
                    }
                    Err(init) => self.settle(
                        &shared,
                        consumer,
                        attempt,
                        None,
                        &format!("callout init result {init}"),
                    ),
                }
            }
        }
    }

    fn settle(
        &self,
        shared: &FilterShared,
        consumer: ConsumerId,
        attempt: u32,
        status: Option<u32>,
        why: &str,
    ) {
        let result = shared
            .givebacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settle(consumer.clone(), attempt, status, now_ms());
        match result {
            GiveBackResult::Done => {}
            GiveBackResult::Retry => host::log(
                abi::LOG_WARN,
                &format!("[prealloc] giving back the registration of {consumer} failed ({why}); will retry"),
            ),
            GiveBackResult::Lost => {
                self.bump(Counter::SignupGivebacksLost, 1);
                host::log(
                    abi::LOG_ERROR,
                    &format!(
                        "[prealloc] could not give back the registration of {consumer} after {} attempts ({why}); free it with DELETE /v1/registrations/{consumer}",
                        attempt + 1
                    ),
                );
            }
        }
    }
}

fn state<'a>(m: *const c_void) -> Option<&'a mut Bootstrap> {
    // SAFETY: the box from `config_new` (the extension pointer is the same box);
    // every bootstrap hook runs on the main thread, one at a time.
    unsafe { (m as *mut Bootstrap).as_mut() }
}

fn define(config_envoy: BootstrapConfigEnvoy, name: &str, gauge: bool) -> Option<usize> {
    let mut id = 0usize;
    let name = ModuleBuffer::of(name.as_bytes());
    // SAFETY: the config being created (metrics may only be defined now); no labels.
    let r = unsafe {
        if gauge {
            abi::envoy_dynamic_module_callback_bootstrap_extension_config_define_gauge(
                config_envoy,
                name,
                std::ptr::null(),
                0,
                &mut id,
            )
        } else {
            abi::envoy_dynamic_module_callback_bootstrap_extension_config_define_counter(
                config_envoy,
                name,
                std::ptr::null(),
                0,
                &mut id,
            )
        }
    };
    (r == abi::METRICS_SUCCESS).then_some(id)
}

/// Parses `{"poller": {...}}` (the wasm poller's JSON) and defines the poller's
/// metrics; null (Envoy refuses to start) on a bad config.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_config_new(
    config_envoy: BootstrapConfigEnvoy,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> BootstrapConfigModule {
    guarded(
        "on_bootstrap_extension_config_new",
        std::ptr::null(),
        || {
            // SAFETY: Envoy's buffer, valid during this hook.
            let bytes = unsafe { host::bytes(config) };
            let cfg = match config::parse(bytes) {
                Ok(PluginConfig::Poller(cfg)) => cfg,
                Ok(PluginConfig::Filter(_)) => {
                    host::log(abi::LOG_ERROR, "[prealloc] extension_config holds a filter configuration ({\"filter\": ...}); the bootstrap extension is the poller and needs {\"poller\": {...}}; configuration refused");
                    return std::ptr::null();
                }
                Err(e) => {
                    host::log(
                        abi::LOG_ERROR,
                        &format!("[prealloc] extension_config: {e}; configuration refused"),
                    );
                    return std::ptr::null();
                }
            };
            let poller_counter = |c: Counter| {
                matches!(
                    c,
                    Counter::PollerUpdates
                        | Counter::PollerFullSnapshots
                        | Counter::PollerErrors
                        | Counter::PollerSkipped
                        | Counter::SignupGivebacksLost
                )
            };
            let counters = Counter::ALL
                .iter()
                .map(|&c| {
                    poller_counter(c)
                        .then(|| define(config_envoy, c.name(), false))
                        .flatten()
                })
                .collect();
            let gauges = Gauge::ALL
                .iter()
                .map(|g| define(config_envoy, g.name(), true))
                .collect();
            let mut cfg = cfg;
            // Without a configured node id: one unique to this Envoy process.
            if cfg.node_id.is_none() {
                cfg.node_id = Some(format!("envoy-{}", std::process::id()));
            }
            let state = Bootstrap {
                config_envoy,
                tick_ms: cfg.min_backoff_ms.clamp(10, 1000),
                poller: Poller::with_held_ids(cfg, Box::new(Arc::clone(&TABLE))),
                in_flight: None,
                timer: std::ptr::null_mut(),
                counters,
                gauges,
                givebacks: GiveBacksInFlight::new(),
            };
            // Envoy starts serving once this is signalled; routing without a table is
            // safe (the cookie's first manager), so the first poll is not awaited.
            // SAFETY: main thread, this extension's config, signalled once.
            unsafe {
                abi::envoy_dynamic_module_callback_bootstrap_extension_config_signal_init_complete(
                    config_envoy,
                )
            };
            host::log(abi::LOG_INFO, "[prealloc poller] native poller configured");
            Box::into_raw(Box::new(state)) as BootstrapConfigModule
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_config_destroy(
    config: BootstrapConfigModule,
) {
    guarded("on_bootstrap_extension_config_destroy", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: the box from `config_new`, destroyed once, on the main thread.
        let state = unsafe { Box::from_raw(config as *mut Bootstrap) };
        if !state.timer.is_null() {
            // SAFETY: our timer, deleted once, on the main thread.
            unsafe {
                abi::envoy_dynamic_module_callback_bootstrap_extension_timer_delete(state.timer)
            };
        }
    })
}

/// The extension object is the config's state itself (one per Envoy).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_new(
    config: BootstrapConfigModule,
    _extension: BootstrapEnvoy,
) -> BootstrapModule {
    config
}

/// Callouts work from here on: arm the timer and send the first poll.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_server_initialized(
    _extension: BootstrapEnvoy,
    m: BootstrapModule,
) {
    guarded("on_bootstrap_extension_server_initialized", (), || {
        let Some(s) = state(m) else { return };
        // SAFETY: main thread, this extension's live config.
        s.timer = unsafe {
            abi::envoy_dynamic_module_callback_bootstrap_extension_timer_new(s.config_envoy)
        };
        s.poll_if_due();
        if !s.timer.is_null() {
            // SAFETY: our live timer, main thread.
            unsafe {
                abi::envoy_dynamic_module_callback_bootstrap_extension_timer_enable(
                    s.timer, s.tick_ms,
                )
            };
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_timer_fired(
    _config_envoy: BootstrapConfigEnvoy,
    m: BootstrapConfigModule,
    timer: Timer,
) {
    guarded("on_bootstrap_extension_timer_fired", (), || {
        let Some(s) = state(m) else { return };
        debug_assert_eq!(timer, s.timer);
        if s.poller.applying() {
            // Re-arms the timer itself: at once while writes remain.
            s.step();
        } else {
            s.poll_if_due();
        }
        s.send_givebacks();
        if !s.poller.applying() {
            s.arm(s.tick_ms);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_http_callout_done(
    _config_envoy: BootstrapConfigEnvoy,
    m: BootstrapConfigModule,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    guarded("on_bootstrap_extension_http_callout_done", (), || {
        let Some(s) = state(m) else { return };
        // SAFETY: this hook's own arguments, read within it.
        let (status, _, body) =
            unsafe { host::callout_answer(result, headers, headers_len, chunks, chunks_len) };
        if s.in_flight == Some(callout_id) {
            s.on_poll_response(status, &body);
        } else if let Some((shared, consumer, attempt)) = s.givebacks.remove(&callout_id) {
            let why = status.map_or_else(|| "no answer".to_owned(), |c| format!("HTTP {c}"));
            s.settle(&shared, consumer, attempt, status, &why);
        }
    })
}

/// Nothing to wind down: completion is signalled at once (Envoy waits for it).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_shutdown(
    _extension: BootstrapEnvoy,
    _m: BootstrapModule,
    completion: EventCallback,
    context: *mut c_void,
) {
    if let Some(done) = completion {
        // SAFETY: Envoy's completion callback with its own context, called once.
        unsafe { done(context) };
    }
}

// Hooks Envoy requires but prealloc does not use.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_destroy(_m: BootstrapModule) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_worker_thread_initialized(
    _extension: BootstrapEnvoy,
    _m: BootstrapModule,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_drain_started(
    _extension: BootstrapEnvoy,
    _m: BootstrapModule,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_config_scheduled(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _event: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_file_changed(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _path: EnvoyBuffer,
    _events: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_admin_request(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _method: EnvoyBuffer,
    _path: EnvoyBuffer,
    _body: EnvoyBuffer,
) -> u32 {
    404
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_cluster_add_or_update(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _cluster: EnvoyBuffer,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_cluster_removal(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _cluster: EnvoyBuffer,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_listener_add_or_update(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _listener: EnvoyBuffer,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_listener_removal(
    _config_envoy: BootstrapConfigEnvoy,
    _m: BootstrapConfigModule,
    _listener: EnvoyBuffer,
) {
}
