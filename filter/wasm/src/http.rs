//! The HTTP filter role: per-request routing (and, when configured, sign-up).

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use super::host;
use super::metrics::Metrics;
use prealloc_filter_core::buckets;
use prealloc_filter_core::config::{FilterConfig, SignupConfig};
use prealloc_filter_core::cookie::{VerifiedCookies, Verifier};
use prealloc_filter_core::headers::HeaderMap;
use prealloc_filter_core::metrics::Counter;
use prealloc_filter_core::pipeline::{self, Action as PlanAction, Cookies, Lookup, Plan};
use prealloc_filter_core::signup::{
    self, GiveBackResult, GiveBacks, LocalReply, RegistrationOutcome, SignupAnswer,
};
use prealloc_filter_core::table::{self, AvailabilityView, OwnedEntry, MANAGERS_KEY};
use prealloc_wire::{
    ConsumerId, Registration, HEADER_CONSUMER, HEADER_RESOURCE, HEADER_RESOURCE_TYPE,
};

/// Per-worker state shared by the root context and its HTTP contexts.
pub struct FilterState {
    pub cfg: FilterConfig,
    /// The cookie keys, pre-keyed once.
    verifier: Verifier,
    /// Cookie values this worker already verified (repeat cookies skip the MAC).
    cookies: RefCell<VerifiedCookies>,
    /// Round-robin counter of this worker.
    rr: Cell<u64>,
    /// Unix seconds as of the last tick, when ticks come at least every second
    /// (cookie expiry has second resolution): no clock call per request.
    clock_s: Cell<Option<u64>>,
    availability: RefCell<AvailabilityView>,
    /// CAS of the managers value last decoded: unchanged CAS, nothing to decode.
    managers_cas: Cell<Option<u32>>,
    pub metrics: Metrics,
    /// Registrations to give back (refused sign-ups), sent from the root context
    /// so that they outlive the request.
    givebacks: RefCell<GiveBacks>,
    /// Give-back calls in flight: token -> (consumer, attempt).
    givebacks_in_flight: RefCell<HashMap<u32, (ConsumerId, u32)>>,
}

impl FilterState {
    pub fn new(cfg: FilterConfig, metrics: Metrics) -> Self {
        FilterState {
            verifier: Verifier::from_config(&cfg.cookie),
            cookies: RefCell::new(VerifiedCookies::default()),
            cfg,
            rr: Cell::new(0),
            clock_s: Cell::new(None),
            availability: RefCell::new(AvailabilityView::all_available()),
            managers_cas: Cell::new(None),
            metrics,
            givebacks: RefCell::new(GiveBacks::default()),
            givebacks_in_flight: RefCell::new(HashMap::new()),
        }
    }

    /// The root tick: the clock, availability, buffered counters, give-backs.
    pub fn on_tick(&self) {
        if self.cfg.availability_refresh <= std::time::Duration::from_secs(1) {
            self.clock_s.set(Some(host::now().as_secs()));
        }
        self.refresh_availability();
        self.metrics.flush();
        self.send_givebacks();
    }

    /// Unix seconds: the tick's reading, or the host clock when ticks are rarer than 1 s.
    pub fn now_s(&self) -> u64 {
        self.clock_s.get().unwrap_or_else(|| host::now().as_secs())
    }

    /// Queues a registration to give back; the next root tick sends it.
    fn give_back(&self, consumer: ConsumerId) {
        if let Ok(mut g) = self.givebacks.try_borrow_mut() {
            g.push(consumer, host::now_ms());
        }
    }

    /// Root tick: sends the give-backs that are due. Must run in the root context
    /// (the call then belongs to it and survives the request that caused it).
    pub fn send_givebacks(&self) {
        let Some(sc) = &self.cfg.signup else { return };
        let now = host::now_ms();
        let due = match self.givebacks.try_borrow_mut() {
            Ok(mut g) if !g.is_empty() => g.take_due(now),
            _ => return,
        };
        for (consumer, attempt) in due {
            let call = signup::giveback_call(sc, &consumer);
            match host::dispatch(&sc.cluster, call.header_refs(), None, sc.timeout) {
                Ok(token) => {
                    if let Ok(mut f) = self.givebacks_in_flight.try_borrow_mut() {
                        f.insert(token, (consumer, attempt));
                    }
                }
                Err(status) => {
                    self.settle_giveback(consumer, attempt, None, &format!("{status:?}"))
                }
            }
        }
    }

    /// Root context: the answer to a give-back call.
    pub fn on_giveback_response(&self, token: u32) {
        let Some((consumer, attempt)) = self
            .givebacks_in_flight
            .try_borrow_mut()
            .ok()
            .and_then(|mut f| f.remove(&token))
        else {
            return;
        };
        let status = host::call_response_status();
        let why = status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
        self.settle_giveback(consumer, attempt, status, &why);
    }

    fn settle_giveback(&self, consumer: ConsumerId, attempt: u32, status: Option<u32>, why: &str) {
        let Ok(mut g) = self.givebacks.try_borrow_mut() else {
            return;
        };
        match g.settle(consumer.clone(), attempt, status, host::now_ms()) {
            GiveBackResult::Done => {}
            GiveBackResult::Retry => host::warn(&format!(
                "[prealloc] giving back the registration of {consumer} failed ({why}); will retry"
            )),
            GiveBackResult::Lost => {
                self.metrics.inc(Counter::SignupGivebacksLost);
                host::log(
                    proxy_wasm::types::LogLevel::Error,
                    &format!(
                        "[prealloc] could not give back the registration of {consumer} after {} attempts ({why}); free it with DELETE /v1/registrations/{consumer}",
                        attempt + 1
                    ),
                );
            }
        }
    }

    /// Re-reads `prealloc.managers` (root tick); a bad value keeps the previous view.
    pub fn refresh_availability(&self) {
        let (value, cas) = host::get_shared(MANAGERS_KEY);
        if cas.is_some() && cas == self.managers_cas.get() {
            return;
        }
        let view = match value {
            None => AvailabilityView::all_available(),
            Some(v) => match table::decode_managers(&v) {
                Ok(view) => view,
                Err(e) => {
                    host::warn(&format!(
                        "[prealloc] ignoring shared data {MANAGERS_KEY}: {e}"
                    ));
                    return;
                }
            },
        };
        if let Ok(mut a) = self.availability.try_borrow_mut() {
            *a = view;
            self.managers_cas.set(cas);
        }
    }
}

/// Where a sign-up request is.
enum Signup {
    /// Not a sign-up.
    No,
    /// Held while the control plane answers the registration call `token`.
    Registering { token: u32 },
    /// Sent to the first manager; its answer decides cookie or give-back.
    Forwarded(Registration),
    /// The manager accepted: its answer is held while the control plane
    /// confirms the registration (call `token`); then the cookie, or a 503.
    Confirming { token: u32, set_cookie: String },
    /// Answered locally, or done.
    Replied,
}

pub struct Http {
    id: u32,
    st: Rc<FilterState>,
    /// A registered cookie's `Set-Cookie` value for the response (cookie upgrade).
    upgrade_cookie: Option<String>,
    signup: Signup,
}

impl Http {
    pub fn new(id: u32, st: Rc<FilterState>) -> Self {
        Http {
            id,
            st,
            upgrade_cookie: None,
            signup: Signup::No,
        }
    }

    fn route(&mut self) -> Action {
        let st = Rc::clone(&self.st);
        let cfg = &st.cfg;
        let raw = host::header_map_raw(MapType::HttpRequestHeaders);
        let Some(map) = raw.as_deref().and_then(HeaderMap::parse) else {
            // Without the header list the reserved headers cannot be enumerated;
            // remove every one prealloc defines by name, so a client still cannot
            // pick a cluster, and route as anonymous.
            for name in [
                &cfg.route_header[..],
                HEADER_CONSUMER,
                HEADER_RESOURCE,
                HEADER_RESOURCE_TYPE,
            ] {
                host::remove_header(MapType::HttpRequestHeaders, name);
            }
            host::clear_route_cache();
            host::warn(&format!(
                "[prealloc http {}] cannot read the request headers; routing as anonymous",
                self.id
            ));
            return Action::Continue;
        };
        let now = st.now_s();
        // Until this worker has the managers list, look for it on every request
        // (not only on the tick): a cookie's clusters are trusted only until then.
        if !st.availability.try_borrow().is_ok_and(|a| a.has_list()) {
            st.refresh_availability();
        }
        let mut rr = st.rr.get();
        let all_available = AvailabilityView::all_available();
        let avail_guard = st.availability.try_borrow();
        let avail = avail_guard.as_deref().unwrap_or(&all_available);
        let mut cache = st.cookies.try_borrow_mut().ok();
        let cookies = Cookies {
            verifier: &st.verifier,
            cache: cache.as_deref_mut(),
        };
        let plan = pipeline::route(cfg, cookies, map.iter(), lookup_shared, avail, &mut rr, now);
        drop(avail_guard);
        drop(cache);
        st.rr.set(rr);
        self.apply(plan, now)
    }

    /// Applies the core's plan with host calls; decides nothing itself.
    fn apply(&mut self, plan: Plan<'_, OwnedEntry>, now: u64) -> Action {
        let st = Rc::clone(&self.st);
        let cfg = &st.cfg;
        for name in &plan.remove {
            if let Ok(n) = std::str::from_utf8(name) {
                host::remove_header(MapType::HttpRequestHeaders, n);
            }
        }
        for (counter, n) in plan.bumps.iter() {
            st.metrics.add(counter, n);
        }
        if let Some(e) = &plan.table_error {
            host::warn(&format!(
                "[prealloc http {}] ignoring a bad table entry: {e}",
                self.id
            ));
        }
        match plan.action {
            PlanAction::Anonymous => {
                if !plan.remove.is_empty() {
                    host::clear_route_cache();
                }
                Action::Continue
            }
            PlanAction::Signup => match &cfg.signup {
                Some(sc) => self.start_signup(sc),
                None => Action::Continue,
            },
            PlanAction::Route(routed) => {
                // The client's copies were removed above: adding is enough.
                host::add_header(
                    MapType::HttpRequestHeaders,
                    &cfg.route_header,
                    routed.cluster(),
                );
                host::add_header(
                    MapType::HttpRequestHeaders,
                    HEADER_CONSUMER,
                    routed.consumer().as_str(),
                );
                host::clear_route_cache();
                match routed.upgrade_cookie(cfg, now) {
                    Some(Ok(set_cookie)) => self.upgrade_cookie = Some(set_cookie),
                    // Happens on every request of such a consumer (e.g. more replicas than a
                    // cookie carries): keep it at debug, routing by the table still works.
                    Some(Err(e)) if host::debug_enabled() => host::debug(&format!(
                        "[prealloc http {}] not upgrading the cookie of {}: {e}",
                        self.id,
                        routed.consumer()
                    )),
                    _ => {}
                }
                Action::Continue
            }
            PlanAction::Reply(reply) => {
                if host::debug_enabled() {
                    host::debug(&format!(
                        "[prealloc http {}] every replica of the consumer is down: 503",
                        self.id
                    ));
                }
                send_reply(&reply);
                Action::Pause
            }
        }
    }

    /// Holds the sign-up and asks the control plane for a registration.
    fn start_signup(&mut self, sc: &SignupConfig) -> Action {
        let call = signup::registration_call(sc);
        match host::dispatch(
            &sc.cluster,
            call.header_refs(),
            call.body.as_deref(),
            sc.timeout,
        ) {
            Ok(token) => {
                self.signup = Signup::Registering { token };
                Action::Pause
            }
            Err(status) => {
                host::warn(&format!(
                    "[prealloc http {}] cannot call the control plane cluster {:?} ({status:?}); answering 503",
                    self.id, sc.cluster
                ));
                self.st.metrics.inc(Counter::SignupsUnavailable);
                self.signup = Signup::Replied;
                send_reply(&LocalReply::unavailable(
                    "control_plane_unreachable",
                    "the registration service cannot be reached; retry later",
                    self.st.cfg.retry_after_s,
                ));
                Action::Pause
            }
        }
    }

    /// The control plane answered the registration call: forward or reply.
    fn on_registration(&mut self, body_size: usize) {
        let st = Rc::clone(&self.st);
        let Some(sc) = &st.cfg.signup else { return };
        let status = host::call_response_status();
        let retry_after = host::header_bytes(MapType::HttpCallResponseHeaders, "retry-after");
        let body = host::call_response_body(body_size);
        let timeout_ms = u64::try_from(sc.timeout.as_millis()).unwrap_or(u64::MAX);
        match signup::on_registration_response(
            status,
            retry_after.as_deref(),
            &body,
            st.cfg.retry_after_s,
            timeout_ms,
        ) {
            RegistrationOutcome::Forward(reg) => {
                host::set_header(
                    MapType::HttpRequestHeaders,
                    &st.cfg.route_header,
                    &reg.cluster,
                );
                for (name, value) in signup::forward_headers(&reg) {
                    host::set_header(MapType::HttpRequestHeaders, name, value);
                }
                host::clear_route_cache();
                self.signup = Signup::Forwarded(reg);
                host::resume_request();
            }
            RegistrationOutcome::Reply(reply) => {
                host::warn(&format!(
                    "[prealloc http {}] sign-up refused by the control plane ({}): {}",
                    self.id,
                    status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}")),
                    reply.body
                ));
                st.metrics.inc(Counter::SignupsUnavailable);
                self.signup = Signup::Replied;
                send_reply(&reply);
            }
            RegistrationOutcome::GiveBackAndReply(consumer, reply) => {
                host::warn(&format!(
                    "[prealloc http {}] unusable registration for {consumer}; giving it back",
                    self.id
                ));
                st.give_back(consumer);
                st.metrics.inc(Counter::SignupsUnavailable);
                self.signup = Signup::Replied;
                send_reply(&reply);
            }
        }
    }

    /// The first manager answered the forwarded sign-up: an accepted one is
    /// held until the control plane confirms the registration.
    fn on_signup_response(&mut self, reg: Registration) -> Action {
        let st = Rc::clone(&self.st);
        let status = host::header_bytes(MapType::HttpResponseHeaders, ":status").and_then(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
        });
        match signup::on_signup_response(&st.cfg.cookie, &reg, status, st.now_s()) {
            SignupAnswer::Accepted { set_cookie } => {
                let Some(sc) = &st.cfg.signup else {
                    return Action::Continue;
                };
                let call = signup::confirm_call(sc, &reg.consumer);
                match host::dispatch(&sc.cluster, call.header_refs(), None, sc.timeout) {
                    Ok(token) => {
                        self.signup = Signup::Confirming { token, set_cookie };
                        Action::Pause
                    }
                    Err(status) => {
                        host::warn(&format!(
                            "[prealloc http {}] cannot confirm the registration of {} ({status:?}); answering 503",
                            self.id, reg.consumer
                        ));
                        st.metrics.inc(Counter::SignupsUnavailable);
                        self.signup = Signup::Replied;
                        send_reply(&LocalReply::unavailable(
                            "control_plane_unreachable",
                            "the registration service could not confirm the sign-up; sign up again",
                            st.cfg.retry_after_s,
                        ));
                        Action::Pause
                    }
                }
            }
            SignupAnswer::Unsigned(why) => {
                host::warn(&format!("[prealloc http {}] {why}", self.id));
                Action::Continue
            }
            SignupAnswer::Refused => {
                host::info(&format!(
                    "[prealloc http {}] manager {} refused the sign-up of {} ({}); giving the registration back",
                    self.id,
                    reg.cluster,
                    reg.consumer,
                    status.map_or_else(|| "no status".to_owned(), |s| format!("HTTP {s}"))
                ));
                st.metrics.inc(Counter::SignupsRefused);
                st.give_back(reg.consumer);
                Action::Continue
            }
        }
    }

    /// The control plane answered the confirmation: the cookie, or a 503 instead.
    fn on_confirmation(&mut self, set_cookie: &str) {
        let st = Rc::clone(&self.st);
        match signup::on_confirm_response(host::call_response_status(), st.cfg.retry_after_s) {
            Ok(()) => {
                host::add_header(MapType::HttpResponseHeaders, "set-cookie", set_cookie);
                st.metrics.inc(Counter::SignupsOk);
                host::resume_response();
            }
            Err(reply) => {
                host::warn(&format!(
                    "[prealloc http {}] the registration was not confirmed: {}; answering 503 without a cookie",
                    self.id, reply.body
                ));
                st.metrics.inc(Counter::SignupsUnavailable);
                send_reply(&reply);
            }
        }
    }
}

/// The table read of the pipeline: one shared-data read of the consumer's
/// bucket, and a search of its lines.
fn lookup_shared(consumer: &ConsumerId) -> Lookup<OwnedEntry> {
    match host::get_shared(&buckets::consumer_bucket_key(consumer)).0 {
        None => Lookup::Miss,
        Some(value) => match buckets::owned_entry(value, consumer) {
            Ok(Some(e)) => Lookup::Hit(e),
            Ok(None) => Lookup::Miss,
            Err(e) => Lookup::Bad(e),
        },
    }
}

fn send_reply(reply: &LocalReply) {
    let retry = reply.retry_after_s.to_string();
    host::send_response(
        reply.status,
        vec![
            ("retry-after", retry.as_str()),
            ("content-type", "application/json"),
        ],
        reply.body.as_bytes(),
    );
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        super::panic::enter("on_http_call_response", self.id);
        if matches!(self.signup, Signup::Registering { token: t } if t == token) {
            self.on_registration(body_size);
        } else if matches!(&self.signup, Signup::Confirming { token: t, .. } if *t == token) {
            if let Signup::Confirming { set_cookie, .. } =
                std::mem::replace(&mut self.signup, Signup::Replied)
            {
                self.on_confirmation(&set_cookie);
            }
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        super::panic::enter("on_http_request_headers", self.id);
        self.route()
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // While the registration is pending, buffer the body: continuing would
        // send the headers on before the route is known.
        match self.signup {
            Signup::Registering { .. } | Signup::Replied => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.signup {
            Signup::Registering { .. } | Signup::Replied => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        super::panic::enter("on_http_response_headers", self.id);
        if matches!(self.signup, Signup::Forwarded(_)) {
            if let Signup::Forwarded(reg) = std::mem::replace(&mut self.signup, Signup::Replied) {
                return self.on_signup_response(reg);
            }
        } else if let Some(c) = self.upgrade_cookie.take() {
            if host::add_header(MapType::HttpResponseHeaders, "set-cookie", &c) {
                self.st.metrics.inc(Counter::CookiesUpgraded);
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // The manager's answer is held while the registration is confirmed:
        // continuing would send its headers before the cookie is known.
        match self.signup {
            Signup::Confirming { .. } => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.signup {
            Signup::Confirming { .. } => Action::Pause,
            _ => Action::Continue,
        }
    }
}
