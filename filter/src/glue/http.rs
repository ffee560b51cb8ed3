//! The HTTP filter role: per-request routing (and, when configured, sign-up).

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::host;
use super::metrics::Metrics;
use crate::config::{FilterConfig, MAX_KEYS};
use crate::cookie::{self, Claims};
use crate::decision::{self, Decision};
use crate::headers::{is_reserved, HeaderMap};
use crate::metrics::Counter;
use crate::table::{self, AvailabilityView, MANAGERS_KEY};
use prealloc_wire::HEADER_CONSUMER;

/// Per-worker state shared by the root context and its HTTP contexts.
pub struct FilterState {
    pub cfg: FilterConfig,
    /// Round-robin counter of this worker.
    rr: Cell<u64>,
    availability: RefCell<AvailabilityView>,
    /// CAS of the managers value last decoded: unchanged CAS, nothing to decode.
    managers_cas: Cell<Option<u32>>,
    pub metrics: Metrics,
}

impl FilterState {
    pub fn new(cfg: FilterConfig, metrics: Metrics) -> Self {
        FilterState {
            cfg,
            rr: Cell::new(0),
            availability: RefCell::new(AvailabilityView::all_available()),
            managers_cas: Cell::new(None),
            metrics,
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

    fn next_rr(&self) -> u64 {
        let n = self.rr.get();
        self.rr.set(n.wrapping_add(1));
        n
    }
}

pub struct Http {
    id: u32,
    st: Rc<FilterState>,
    /// A `Set-Cookie` value to add to the response (cookie upgrade or sign-up).
    set_cookie: Option<String>,
}

impl Http {
    pub fn new(id: u32, st: Rc<FilterState>) -> Self {
        Http {
            id,
            st,
            set_cookie: None,
        }
    }

    fn route(&mut self) -> Action {
        let st = Rc::clone(&self.st);
        let cfg = &st.cfg;
        let Some(raw) = host::header_map_raw(MapType::HttpRequestHeaders) else {
            host::warn(&format!(
                "[prealloc http {}] cannot read request headers; routing as anonymous",
                self.id
            ));
            return Action::Continue;
        };
        let Some(map) = HeaderMap::parse(&raw) else {
            host::warn(&format!(
                "[prealloc http {}] request header map is malformed; routing as anonymous",
                self.id
            ));
            return Action::Continue;
        };

        // A client never picks a cluster nor claims a consumer: drop what it sent.
        let mut removed = 0u64;
        for (name, _) in map.iter() {
            if is_reserved(name, &cfg.route_header) {
                if let Ok(n) = std::str::from_utf8(name) {
                    host::remove_header(MapType::HttpRequestHeaders, n);
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            st.metrics.add(Counter::ReservedHeadersRemoved, removed);
        }

        let now = host::now().as_secs();
        let mut key_buf: [&[u8]; MAX_KEYS] = [&[]; MAX_KEYS];
        let mut n_keys = 0;
        for (slot, k) in key_buf.iter_mut().zip(cfg.cookie.keys.iter()) {
            *slot = k.as_slice();
            n_keys += 1;
        }
        let keys = key_buf.get(..n_keys).unwrap_or(&[]);
        let claims = match cookie::verify_first(map.values("cookie"), &cfg.cookie.name, keys, now) {
            Ok(c) => Some(c),
            Err(e) => {
                st.metrics.inc(Counter::cookie_rejected(e));
                None
            }
        };

        // One shared-data read, only for registering consumers.
        let entry_raw = match &claims {
            Some(c) if decision::needs_table(Some(c)) => {
                host::get_shared(&table::consumer_key(&c.consumer)).0
            }
            _ => None,
        };
        let entry = if decision::needs_table(claims.as_ref()) {
            match entry_raw.as_deref().map(table::decode_entry) {
                Some(Ok(Some(e))) => {
                    st.metrics.inc(Counter::TableHits);
                    Some(e)
                }
                None | Some(Ok(None)) => {
                    st.metrics.inc(Counter::TableMisses);
                    None
                }
                Some(Err(e)) => {
                    st.metrics.inc(Counter::TableErrors);
                    host::warn(&format!(
                        "[prealloc http {}] ignoring a bad table entry: {e}",
                        self.id
                    ));
                    None
                }
            }
        } else {
            None
        };

        let rr = st.next_rr();
        let all_available = AvailabilityView::all_available();
        let avail_guard = st.availability.try_borrow();
        let avail = avail_guard.as_deref().unwrap_or(&all_available);
        match decision::decide(claims.as_ref(), entry, avail, rr, cfg.when_all_down) {
            Decision::Anonymous => {
                st.metrics.inc(Counter::RequestsAnonymous);
                if removed > 0 {
                    host::clear_route_cache();
                }
                Action::Continue
            }
            Decision::Route {
                cluster,
                consumer,
                via,
                upgrade,
            } => {
                st.metrics.inc(Counter::routed(via));
                host::set_header(MapType::HttpRequestHeaders, &cfg.route_header, cluster);
                host::set_header(
                    MapType::HttpRequestHeaders,
                    HEADER_CONSUMER,
                    consumer.as_str(),
                );
                host::clear_route_cache();
                if upgrade {
                    if let (Some(c), Some(e)) = (&claims, entry) {
                        self.prepare_upgrade(c, &e, now);
                    }
                }
                Action::Continue
            }
            Decision::AllDown { consumer } => {
                st.metrics.inc(Counter::AllDownReplies);
                if host::debug_enabled() {
                    host::debug(&format!(
                        "[prealloc http {}] every replica of {consumer} is down: 503",
                        self.id
                    ));
                }
                let retry = cfg.retry_after_s.to_string();
                host::send_response(
                    503,
                    vec![("retry-after", retry.as_str()), ("content-type", "application/json")],
                    br#"{"error":"replicas_unavailable","message":"every backend holding this account's data is down; retry later"}"#,
                );
                Action::Pause
            }
        }
    }

    fn prepare_upgrade(&mut self, claims: &Claims, entry: &table::Entry<'_>, now: u64) {
        let cfg = &self.st.cfg.cookie;
        let upgraded = decision::upgraded_claims(claims, entry, now.saturating_add(cfg.max_age_s));
        match cookie::sign_with_config(cfg, &upgraded) {
            Ok(value) => self.set_cookie = Some(cookie::set_cookie_header(cfg, &value)),
            Err(e) => host::warn(&format!(
                "[prealloc http {}] cannot upgrade the cookie: {e}",
                self.id
            )),
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.route()
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(c) = self.set_cookie.take() {
            if host::add_header(MapType::HttpResponseHeaders, "set-cookie", &c) {
                self.st.metrics.inc(Counter::CookiesUpgraded);
            }
        }
        Action::Continue
    }
}
