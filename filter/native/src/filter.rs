//! The HTTP filter (`envoy.filters.http.dynamic_modules`): runs the core's
//! pipeline on each request and applies the plan. The cluster it picks reaches
//! the router through the cluster specifier (`specifier.rs`): no route header,
//! no second route match.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use prealloc_filter_core::config::{self, FilterConfig, PluginConfig};
use prealloc_filter_core::cookie::{VerifiedCookies, Verifier};
use prealloc_filter_core::metrics::Counter;
use prealloc_filter_core::pipeline::{self, Action, Cookies, Lookup, Plan};
use prealloc_filter_core::process_table::ProcessEntry;
use prealloc_filter_core::signup::{
    self, GiveBacks, LocalReply, RegistrationOutcome, SignupAnswer,
};
use prealloc_wire::{ConsumerId, Registration};

use crate::abi::{
    self, EnvoyBuffer, EnvoyHeader, FilterConfigEnvoy, FilterConfigModule, FilterEnvoy,
    FilterModule, ModuleBuffer,
};
use crate::host::{self, guarded, guarded_or};
use crate::state::{self, FILTER_CONFIGS, TABLE, WORKER};

/// Counters of the request path (the poller's are the bootstrap extension's).
fn is_filter_counter(c: Counter) -> bool {
    !matches!(
        c,
        Counter::PollerUpdates
            | Counter::PollerFullSnapshots
            | Counter::PollerErrors
            | Counter::PollerSkipped
            | Counter::SignupGivebacksLost
    )
}

/// One HTTP filter configuration, shared by its streams on every worker.
pub struct FilterShared {
    pub cfg: FilterConfig,
    verifier: Verifier,
    /// Unique per configuration ever created (never reused, unlike an
    /// address): a worker's verified-cookie cache belongs to one generation,
    /// so a new configuration with other keys never sees the old answers.
    generation: u64,
    /// Envoy's counter id per [`Counter::index`].
    counters: Vec<Option<usize>>,
    /// Registrations to give back; the main thread sends them (`bootstrap.rs`),
    /// so they outlive the request that refused them.
    pub givebacks: Mutex<GiveBacks>,
}

impl FilterShared {
    fn give_back(&self, consumer: ConsumerId) {
        let mut q = self.givebacks.lock().unwrap_or_else(|p| p.into_inner());
        q.push(consumer, now_ms());
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn now_s() -> u64 {
    now_ms() / 1000
}

/// Where a sign-up request is.
enum Signup {
    No,
    /// Held while the control plane answers the registration callout.
    Registering {
        callout: u64,
    },
    /// Sent to the first manager; its answer decides cookie or give-back.
    Forwarded(Registration),
    /// The manager accepted: its answer is held while the control plane
    /// confirms the registration (`callout`); then the cookie, or a 503.
    Confirming {
        callout: u64,
        set_cookie: String,
    },
    /// Answered locally, or done.
    Replied,
}

/// One stream's state.
struct Stream {
    shared: Arc<FilterShared>,
    /// A registered cookie's `Set-Cookie` value for the response (cookie upgrade).
    upgrade_cookie: Option<String>,
    signup: Signup,
}

impl Stream {
    fn bump(&self, f: FilterEnvoy, counter: Counter, n: u64) {
        let Some(&Some(id)) = self.shared.counters.get(counter.index()) else {
            return;
        };
        // SAFETY: live stream; no labels.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                f,
                id,
                std::ptr::null(),
                0,
                n,
            );
        }
    }

    fn request_headers(&mut self, f: FilterEnvoy) -> u32 {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.cfg;
        WORKER.with(|w| {
            let Ok(mut w) = w.try_borrow_mut() else {
                return self.refuse(f, "worker state busy");
            };
            let w = &mut *w;
            let mut headers = std::mem::take(&mut w.headers);
            if !host::request_headers(f, &mut headers) {
                w.headers = headers;
                return self.refuse(f, "cannot read the request headers");
            }
            w.refresh_availability();
            let now = now_s();
            let config_id = shared.generation;
            // Disjoint fields of the worker: the cache, the view, the counter.
            let crate::state::Worker {
                rr,
                availability,
                cookies,
                ..
            } = w;
            if cookies.0 != config_id {
                *cookies = (config_id, VerifiedCookies::default());
            }
            let plan = pipeline::route(
                cfg,
                Cookies {
                    verifier: &shared.verifier,
                    cache: Some(&mut cookies.1),
                },
                headers.iter().map(host::pair),
                lookup,
                &availability.1,
                rr,
                now,
            );
            let status = self.apply(f, plan, now);
            w.headers = headers;
            status
        })
    }

    /// Applies the core's plan through the ABI; decides nothing itself.
    fn apply(&mut self, f: FilterEnvoy, plan: Plan<'_, ProcessEntry<'static>>, now: u64) -> u32 {
        let cfg = &self.shared.cfg;
        for name in &plan.remove {
            host::set_header(f, abi::REQUEST_HEADER, name, b"");
        }
        for (counter, n) in plan.bumps.iter() {
            self.bump(f, counter, n);
        }
        if let Some(e) = &plan.table_error {
            host::log(
                abi::LOG_WARN,
                &format!("[prealloc] ignoring a bad table entry: {e}"),
            );
        }
        match plan.action {
            // The cluster specifier already chose the default cluster.
            Action::Anonymous => abi::HEADERS_CONTINUE,
            Action::Signup => match cfg.signup.clone() {
                Some(sc) => self.start_signup(f, &sc),
                None => abi::HEADERS_CONTINUE,
            },
            Action::Route(routed) => {
                // The client's copy was removed above: adding is enough.
                host::add_header(
                    f,
                    abi::REQUEST_HEADER,
                    prealloc_wire::HEADER_CONSUMER,
                    routed.consumer().as_str(),
                );
                route_to(f, routed.cluster());
                match routed.upgrade_cookie(cfg, now) {
                    Some(Ok(set_cookie)) => self.upgrade_cookie = Some(set_cookie),
                    Some(Err(e)) if host::log_enabled(abi::LOG_DEBUG) => host::log(
                        abi::LOG_DEBUG,
                        &format!(
                            "[prealloc] not upgrading the cookie of {}: {e}",
                            routed.consumer()
                        ),
                    ),
                    _ => {}
                }
                abi::HEADERS_CONTINUE
            }
            Action::Reply(reply) => {
                self.signup = Signup::Replied;
                reply_with(f, &reply);
                abi::HEADERS_STOP_ITERATION
            }
        }
    }

    /// Fails closed: a request the filter could not judge is answered 503.
    fn refuse(&mut self, f: FilterEnvoy, why: &str) -> u32 {
        host::log(abi::LOG_ERROR, &format!("[prealloc] {why}; answering 503"));
        self.signup = Signup::Replied;
        let reply = LocalReply::unavailable(
            "internal",
            "the routing filter failed on this request; retry",
            self.shared.cfg.retry_after_s,
        );
        reply_with(f, &reply);
        abi::HEADERS_STOP_ITERATION
    }

    fn start_signup(&mut self, f: FilterEnvoy, sc: &config::SignupConfig) -> u32 {
        let (init, id) = callout(f, sc, &signup::registration_call(sc));
        if init == abi::CALLOUT_INIT_SUCCESS {
            self.signup = Signup::Registering { callout: id };
            return abi::HEADERS_STOP_ITERATION;
        }
        host::log(
            abi::LOG_WARN,
            &format!("[prealloc] cannot call the control plane cluster {:?} (callout init result {init}); answering 503", sc.cluster),
        );
        self.bump(f, Counter::SignupsUnavailable, 1);
        self.signup = Signup::Replied;
        reply_with(
            f,
            &LocalReply::unavailable(
                "control_plane_unreachable",
                "the registration service cannot be reached; retry later",
                self.shared.cfg.retry_after_s,
            ),
        );
        abi::HEADERS_STOP_ITERATION
    }

    /// The control plane answered the registration callout: forward or reply.
    fn on_registration(
        &mut self,
        f: FilterEnvoy,
        status: Option<u32>,
        retry_after: Option<&[u8]>,
        body: &[u8],
    ) {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.cfg;
        let Some(sc) = &cfg.signup else { return };
        let timeout_ms = u64::try_from(sc.timeout.as_millis()).unwrap_or(u64::MAX);
        match signup::on_registration_response(
            status,
            retry_after,
            body,
            cfg.retry_after_s,
            timeout_ms,
        ) {
            RegistrationOutcome::Forward(reg) => {
                for (name, value) in signup::forward_headers(&reg) {
                    host::set_header(f, abi::REQUEST_HEADER, name.as_bytes(), value.as_bytes());
                }
                route_to(f, &reg.cluster);
                self.signup = Signup::Forwarded(reg);
                host::continue_decoding(f);
            }
            RegistrationOutcome::Reply(reply) => {
                host::log(
                    abi::LOG_WARN,
                    &format!(
                        "[prealloc] sign-up refused by the control plane ({}): {}",
                        status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}")),
                        reply.body
                    ),
                );
                self.bump(f, Counter::SignupsUnavailable, 1);
                self.signup = Signup::Replied;
                reply_with(f, &reply);
            }
            RegistrationOutcome::GiveBackAndReply(consumer, reply) => {
                host::log(
                    abi::LOG_WARN,
                    &format!("[prealloc] unusable registration for {consumer}; giving it back"),
                );
                shared.give_back(consumer);
                self.bump(f, Counter::SignupsUnavailable, 1);
                self.signup = Signup::Replied;
                reply_with(f, &reply);
            }
        }
    }

    fn response_headers(&mut self, f: FilterEnvoy) -> u32 {
        match std::mem::replace(&mut self.signup, Signup::Replied) {
            Signup::Forwarded(reg) => return self.on_signup_response(f, reg),
            other => {
                self.signup = other;
                if let Some(c) = self.upgrade_cookie.take() {
                    if host::add_header(f, abi::RESPONSE_HEADER, "set-cookie", &c) {
                        self.bump(f, Counter::CookiesUpgraded, 1);
                    }
                }
            }
        }
        abi::HEADERS_CONTINUE
    }

    /// The first manager answered the forwarded sign-up: an accepted one is
    /// held until the control plane confirms the registration.
    fn on_signup_response(&mut self, f: FilterEnvoy, reg: Registration) -> u32 {
        let shared = Arc::clone(&self.shared);
        let status = host::header(f, abi::RESPONSE_HEADER, ":status")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse::<u32>().ok());
        match signup::on_signup_response(&shared.cfg.cookie, &reg, status, now_s()) {
            SignupAnswer::Accepted { set_cookie } => {
                let Some(sc) = &shared.cfg.signup else {
                    return abi::HEADERS_CONTINUE;
                };
                let (init, id) = callout(f, sc, &signup::confirm_call(sc, &reg.consumer));
                if init == abi::CALLOUT_INIT_SUCCESS {
                    self.signup = Signup::Confirming {
                        callout: id,
                        set_cookie,
                    };
                    return abi::HEADERS_STOP_ITERATION;
                }
                host::log(
                    abi::LOG_WARN,
                    &format!(
                        "[prealloc] cannot confirm the registration of {} (callout init result {init}); answering 503",
                        reg.consumer
                    ),
                );
                self.bump(f, Counter::SignupsUnavailable, 1);
                reply_with(
                    f,
                    &LocalReply::unavailable(
                        "control_plane_unreachable",
                        "the registration service could not confirm the sign-up; sign up again",
                        shared.cfg.retry_after_s,
                    ),
                );
                abi::HEADERS_STOP_ITERATION
            }
            SignupAnswer::Unsigned(why) => {
                host::log(abi::LOG_WARN, &format!("[prealloc] {why}"));
                abi::HEADERS_CONTINUE
            }
            SignupAnswer::Refused => {
                host::log(
                    abi::LOG_INFO,
                    &format!(
                        "[prealloc] manager {} refused the sign-up of {} ({}); giving the registration back",
                        reg.cluster,
                        reg.consumer,
                        status.map_or_else(|| "no status".to_owned(), |s| format!("HTTP {s}"))
                    ),
                );
                self.bump(f, Counter::SignupsRefused, 1);
                shared.give_back(reg.consumer);
                abi::HEADERS_CONTINUE
            }
        }
    }

    /// The control plane answered the confirmation: the cookie, or a 503 instead.
    fn on_confirmation(&mut self, f: FilterEnvoy, status: Option<u32>, set_cookie: &str) {
        match signup::on_confirm_response(status, self.shared.cfg.retry_after_s) {
            Ok(()) => {
                host::add_header(f, abi::RESPONSE_HEADER, "set-cookie", set_cookie);
                self.bump(f, Counter::SignupsOk, 1);
                host::continue_encoding(f);
            }
            Err(reply) => {
                host::log(
                    abi::LOG_WARN,
                    &format!(
                        "[prealloc] the registration was not confirmed: {}; answering 503 without a cookie",
                        reply.body
                    ),
                );
                self.bump(f, Counter::SignupsUnavailable, 1);
                reply_with(f, &reply);
            }
        }
    }
}

/// A control-plane call from the stream: (init result, callout id).
fn callout(f: FilterEnvoy, sc: &config::SignupConfig, call: &signup::Call) -> (u32, u64) {
    let refs = call.header_refs();
    let headers = host::module_headers(&refs);
    let body = call.body.as_deref().unwrap_or_default();
    let mut id = 0u64;
    let timeout = u64::try_from(sc.timeout.as_millis()).unwrap_or(u64::MAX);
    // SAFETY: live stream; every buffer outlives the call and Envoy copies them.
    let init = unsafe {
        abi::envoy_dynamic_module_callback_http_filter_http_callout(
            f,
            &mut id,
            ModuleBuffer::of(sc.cluster.as_bytes()),
            headers.as_ptr(),
            headers.len(),
            ModuleBuffer::of(body),
            timeout,
        )
    };
    (init, id)
}

/// The pipeline's table read: one shard read lock in process memory.
fn lookup(consumer: &ConsumerId) -> Lookup<ProcessEntry<'static>> {
    match TABLE.get(consumer) {
        Some(e) => Lookup::Hit(e),
        None => Lookup::Miss,
    }
}

/// Sends the request to `cluster`: the cluster specifier picks it up while
/// Envoy re-runs cluster selection.
fn route_to(f: FilterEnvoy, cluster: &str) {
    state::with_pending_cluster(cluster, || {
        // SAFETY: live stream.
        unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cluster_cache(f) }
    });
}

fn reply_with(f: FilterEnvoy, reply: &LocalReply) {
    host::send_response(f, reply.status, reply.retry_after_s, &reply.body);
}

// ---------------------------------------------------------------------------
// Hooks. Each body runs in `guarded`: no panic crosses into Envoy.

/// Parses the filter's configuration (the wasm filter's JSON: `{"filter": {...}}`)
/// and defines its counters; null (Envoy refuses the filter) on a bad config.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: FilterConfigEnvoy,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> FilterConfigModule {
    guarded("on_http_filter_config_new", std::ptr::null(), || {
        // SAFETY: Envoy's buffer, valid during this hook.
        let bytes = unsafe { host::bytes(config) };
        let cfg = match config::parse(bytes) {
            Ok(PluginConfig::Filter(cfg)) => cfg,
            Ok(PluginConfig::Poller(_)) => {
                host::log(abi::LOG_ERROR, "[prealloc] filter_config holds a poller configuration ({\"poller\": ...}); the HTTP filter needs {\"filter\": {...}} (the poller is the bootstrap extension); configuration refused");
                return std::ptr::null();
            }
            Err(e) => {
                host::log(
                    abi::LOG_ERROR,
                    &format!("[prealloc] filter_config: {e}; configuration refused"),
                );
                return std::ptr::null();
            }
        };
        let counters = Counter::ALL
            .iter()
            .map(|&c| {
                is_filter_counter(c)
                    .then(|| define_counter(config_envoy, c.name()))
                    .flatten()
            })
            .collect();
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let shared = Arc::new(FilterShared {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            verifier: Verifier::from_config(&cfg.cookie),
            cfg,
            counters,
            givebacks: Mutex::new(GiveBacks::default()),
        });
        FILTER_CONFIGS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&shared));
        host::log(abi::LOG_INFO, "[prealloc] native filter configured");
        Box::into_raw(Box::new(shared)) as FilterConfigModule
    })
}

fn define_counter(config_envoy: FilterConfigEnvoy, name: &str) -> Option<usize> {
    let mut id = 0usize;
    // SAFETY: the config being created (metrics may only be defined now); no labels.
    let r = unsafe {
        abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
            config_envoy,
            ModuleBuffer::of(name.as_bytes()),
            std::ptr::null(),
            0,
            &mut id,
        )
    };
    (r == abi::METRICS_SUCCESS).then_some(id)
}

/// # Safety (for all hooks below)
/// Module pointers are the boxes this module returned; Envoy hands them back
/// unchanged and never after the matching destroy hook.
fn shared_of<'a>(config: FilterConfigModule) -> Option<&'a Arc<FilterShared>> {
    // SAFETY: see above; a null config never reaches the stream hooks.
    unsafe { (config as *const Arc<FilterShared>).as_ref() }
}

fn stream_of<'a>(m: FilterModule) -> Option<&'a mut Stream> {
    // SAFETY: the stream box returned by `on_http_filter_new`; Envoy calls a
    // stream's hooks one at a time on its worker.
    unsafe { (m as *mut Stream).as_mut() }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: FilterConfigModule) {
    guarded("on_http_filter_config_destroy", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: the box from `config_new`, destroyed once.
        let shared = unsafe { Box::from_raw(config as *mut Arc<FilterShared>) };
        FILTER_CONFIGS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| !Arc::ptr_eq(c, &shared));
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: FilterConfigModule,
    _filter: FilterEnvoy,
) -> FilterModule {
    guarded("on_http_filter_new", std::ptr::null(), || {
        let Some(shared) = shared_of(config) else {
            return std::ptr::null();
        };
        let stream = Stream {
            shared: Arc::clone(shared),
            upgrade_cookie: None,
            signup: Signup::No,
        };
        Box::into_raw(Box::new(stream)) as FilterModule
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    f: FilterEnvoy,
    m: FilterModule,
    _end_of_stream: bool,
) -> u32 {
    // A panic fails closed: the request is answered 503, never sent on unjudged.
    guarded_or(
        "on_http_filter_request_headers",
        || fail_closed(f),
        || match stream_of(m) {
            Some(stream) => stream.request_headers(f),
            None => fail_closed(f),
        },
    )
}

fn fail_closed(f: FilterEnvoy) -> u32 {
    host::send_response(
        f,
        503,
        5,
        r#"{"error":"internal","message":"the routing filter failed on this request; retry"}"#,
    );
    abi::HEADERS_STOP_ITERATION
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _f: FilterEnvoy,
    m: FilterModule,
    _end_of_stream: bool,
) -> u32 {
    guarded(
        "on_http_filter_request_body",
        abi::BODY_CONTINUE,
        || match stream_of(m).map(|s| &s.signup) {
            // Buffered while the registration is pending: going on would send the
            // headers before the route is known.
            Some(Signup::Registering { .. } | Signup::Replied) => {
                abi::BODY_STOP_ITERATION_AND_BUFFER
            }
            _ => abi::BODY_CONTINUE,
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _f: FilterEnvoy,
    m: FilterModule,
) -> u32 {
    guarded(
        "on_http_filter_request_trailers",
        abi::TRAILERS_CONTINUE,
        || match stream_of(m).map(|s| &s.signup) {
            Some(Signup::Registering { .. } | Signup::Replied) => abi::TRAILERS_STOP_ITERATION,
            _ => abi::TRAILERS_CONTINUE,
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    f: FilterEnvoy,
    m: FilterModule,
    _end_of_stream: bool,
) -> u32 {
    guarded(
        "on_http_filter_response_headers",
        abi::HEADERS_CONTINUE,
        || match stream_of(m) {
            Some(s) => s.response_headers(f),
            None => abi::HEADERS_CONTINUE,
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _f: FilterEnvoy,
    m: FilterModule,
    _end_of_stream: bool,
) -> u32 {
    guarded(
        "on_http_filter_response_body",
        abi::BODY_CONTINUE,
        || match stream_of(m).map(|s| &s.signup) {
            // The manager's answer is held while the registration is confirmed:
            // going on would send its headers before the cookie is known.
            Some(Signup::Confirming { .. }) => abi::BODY_STOP_ITERATION_AND_BUFFER,
            _ => abi::BODY_CONTINUE,
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _f: FilterEnvoy,
    m: FilterModule,
) -> u32 {
    guarded(
        "on_http_filter_response_trailers",
        abi::TRAILERS_CONTINUE,
        || match stream_of(m).map(|s| &s.signup) {
            Some(Signup::Confirming { .. }) => abi::TRAILERS_STOP_ITERATION,
            _ => abi::TRAILERS_CONTINUE,
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _f: FilterEnvoy,
    _m: FilterModule,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(m: FilterModule) {
    guarded("on_http_filter_destroy", (), || {
        if !m.is_null() {
            // SAFETY: the stream box from `on_http_filter_new`, destroyed once.
            drop(unsafe { Box::from_raw(m as *mut Stream) });
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    f: FilterEnvoy,
    m: FilterModule,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    guarded("on_http_filter_http_callout_done", (), || {
        let Some(stream) = stream_of(m) else { return };
        // SAFETY: this hook's own arguments, read within it.
        let (status, retry_after, body) =
            unsafe { host::callout_answer(result, headers, headers_len, chunks, chunks_len) };
        match std::mem::replace(&mut stream.signup, Signup::Replied) {
            Signup::Registering { callout } if callout == callout_id => {
                stream.on_registration(f, status, retry_after.as_deref(), &body);
            }
            Signup::Confirming {
                callout,
                set_cookie,
            } if callout == callout_id => {
                stream.on_confirmation(f, status, &set_cookie);
            }
            other => stream.signup = other,
        }
    })
}

// Hooks Envoy requires but prealloc does not use.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _f: FilterEnvoy,
    _m: FilterModule,
    _id: u64,
    _h: *const EnvoyHeader,
    _n: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _f: FilterEnvoy,
    _m: FilterModule,
    _id: u64,
    _d: *const EnvoyBuffer,
    _n: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _f: FilterEnvoy,
    _m: FilterModule,
    _id: u64,
    _t: *const EnvoyHeader,
    _n: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _f: FilterEnvoy,
    _m: FilterModule,
    _id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _f: FilterEnvoy,
    _m: FilterModule,
    _id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _f: FilterEnvoy,
    _m: FilterModule,
    _event: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _f: FilterEnvoy,
    _m: FilterModule,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _f: FilterEnvoy,
    _m: FilterModule,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _f: FilterEnvoy,
    _m: FilterModule,
    _code: u32,
    _details: EnvoyBuffer,
    _reset: bool,
) -> u32 {
    abi::LOCAL_REPLY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _event: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _id: u64,
    _result: u32,
    _h: *const EnvoyHeader,
    _hn: usize,
    _b: *const EnvoyBuffer,
    _bn: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _id: u64,
    _h: *const EnvoyHeader,
    _n: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _id: u64,
    _d: *const EnvoyBuffer,
    _n: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _id: u64,
    _t: *const EnvoyHeader,
    _n: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _c: FilterConfigEnvoy,
    _m: FilterConfigModule,
    _id: u64,
    _reason: u32,
) {
}

/// prealloc has no per-route configuration: such a route is refused, loudly.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    host::log(abi::LOG_ERROR, "[prealloc] the native filter takes no per-route configuration; remove typed_per_filter_config for it");
    std::ptr::null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _config: *const c_void,
) {
}

/// Give-backs in flight, sent by the bootstrap extension: callout id ->
/// (configuration, consumer, attempt).
pub type GiveBacksInFlight = HashMap<u64, (Arc<FilterShared>, ConsumerId, u32)>;
