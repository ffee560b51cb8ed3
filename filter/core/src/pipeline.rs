//! The per-request pipeline, pure: what the host shows (the request headers,
//! the consumer's table entry, the managers' availability) in, a [`Plan`] out.
//!
//! Both builds run exactly this and apply the plan: the wasm glue with
//! proxy-wasm host calls, the native glue with Envoy's dynamic-module
//! callbacks. Neither decides anything of its own, so they cannot drift.
//!
//! ```text
//! headers ──▶ reserved names to remove, sign-up?, cookie ──verify──▶ claims
//!                                     registering claims ──lookup──▶ table entry
//! claims + entry + availability + round-robin counter ──decide──▶ Plan
//! ```

use prealloc_wire::ConsumerId;
use std::rc::Rc;

use crate::config::FilterConfig;
use crate::cookie::{self, Claims, CookieError, SignError, VerifiedCookies, Verifier};
use crate::decision::{self, Decision, EntryView, Source, Via};
use crate::headers::is_reserved;
use crate::metrics::Counter;
use crate::signup::{self, LocalReply};
use crate::table::{AvailabilityView, TableError};

/// What the glue found in its table for a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<E> {
    Hit(E),
    Miss,
    /// The stored value did not decode: treated as a miss, and logged.
    Bad(TableError),
}

/// The counters one request bumps (at most a handful; no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bumps {
    items: [(Option<Counter>, u64); 4],
}

impl Bumps {
    pub fn add(&mut self, counter: Counter, n: u64) {
        if let Some(slot) = self.items.iter_mut().find(|(c, _)| c.is_none()) {
            *slot = (Some(counter), n);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        self.items.iter().filter_map(|&(c, n)| c.map(|c| (c, n)))
    }

    /// How many times `counter` is bumped (tests).
    pub fn get(&self, counter: Counter) -> u64 {
        self.iter()
            .filter(|&(c, _)| c == counter)
            .map(|(_, n)| n)
            .sum()
    }
}

/// What to do with one request. The glue applies it in this order: remove
/// the reserved headers, then the action; it adds `bumps` to its counters.
#[derive(Debug)]
pub struct Plan<'h, E> {
    /// Client-sent headers prealloc reserves (the route header, `x-prealloc-*`):
    /// remove every value of each before anything else. Usually empty.
    pub remove: Vec<&'h [u8]>,
    pub action: Action<E>,
    pub bumps: Bumps,
    /// A table value that did not decode (the request was routed as a miss): log it.
    pub table_error: Option<TableError>,
}

/// The request's fate.
#[derive(Debug)]
pub enum Action<E> {
    /// No verified consumer: leave the route alone (the default cluster).
    Anonymous,
    /// A sign-up: hold the request and ask the control plane for a registration
    /// (`signup::registration_call`).
    Signup,
    /// Send the request to [`Routed::cluster`] and tell the manager who the
    /// consumer is (`x-prealloc-consumer`).
    Route(Routed<E>),
    /// Answer locally: every manager holding the consumer's data is down.
    Reply(LocalReply),
}

/// A routed request: the verified claims, the entry it was routed by, the pick.
/// The glue adds `x-prealloc-consumer` (a client's was removed with the reserved
/// headers, so adding is enough: no replace needed).
#[derive(Debug)]
pub struct Routed<E> {
    claims: Rc<Claims>,
    entry: Option<E>,
    from: (Source, usize),
    pub via: Via,
    /// The table says registered while the cookie says registering: the
    /// response should carry a registered cookie ([`Routed::upgrade_cookie`]).
    pub upgrade: bool,
}

impl<E: EntryView> Routed<E> {
    /// The Envoy cluster to send the request to.
    pub fn cluster(&self) -> &str {
        let (source, i) = self.from;
        let found = match (source, &self.entry) {
            (Source::Table, Some(e)) => e.replicas().nth(i),
            _ => self.claims.replicas.get(i).map(String::as_str),
        };
        // `from` was taken from these very lists; the first manager is a safe
        // answer should that ever not hold (it always holds the data).
        found.or(self.claims.first_manager()).unwrap_or_default()
    }

    pub fn consumer(&self) -> &ConsumerId {
        &self.claims.consumer
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// The `Set-Cookie` value of the upgraded (registered) cookie, when the plan
    /// asks for one: the entry's replica set and a fresh expiry.
    pub fn upgrade_cookie(
        &self,
        cfg: &FilterConfig,
        now_unix_s: u64,
    ) -> Option<Result<String, SignError>> {
        let entry = self.entry.as_ref().filter(|_| self.upgrade)?;
        let expires = now_unix_s.saturating_add(cfg.cookie.max_age_s);
        let claims = decision::upgraded_claims(&self.claims, entry, expires);
        Some(
            cookie::sign_with_config(&cfg.cookie, &claims)
                .map(|v| cookie::set_cookie_header(&cfg.cookie, &v)),
        )
    }
}

/// How a request's cookie is checked: the configuration's keys, and the
/// worker's cache of values it already verified (`None`: verify every time).
pub struct Cookies<'a> {
    pub verifier: &'a Verifier,
    pub cache: Option<&'a mut VerifiedCookies>,
}

/// What a request looks like before any table read: the result of one pass
/// over its headers and the cookie check. Split out so a glue can learn
/// which consumer to look up ([`Inspected::table_key`]) before deciding.
#[derive(Debug)]
pub struct Inspected<'h> {
    pub remove: Vec<&'h [u8]>,
    pub signup: bool,
    pub claims: Result<Rc<Claims>, CookieError>,
}

impl Inspected<'_> {
    /// The consumer whose table entry the decision needs (registering cookies only).
    pub fn table_key(&self) -> Option<&ConsumerId> {
        match &self.claims {
            Ok(c) if decision::needs_table(Some(c)) => Some(&c.consumer),
            _ => None,
        }
    }
}

/// Reads the request headers once: reserved names, sign-up, the cookie.
///
/// `headers` yields (name, value) pairs as the host holds them (raw bytes; a
/// name appearing twice appears twice). It is iterated twice (names, then the
/// `Cookie` values), so it must be cheap to clone.
pub fn inspect<'h, H>(
    cfg: &FilterConfig,
    cookies: Cookies<'_>,
    headers: H,
    now_unix_s: u64,
) -> Inspected<'h>
where
    H: IntoIterator<Item = (&'h [u8], &'h [u8])>,
    H::IntoIter: Clone,
{
    let headers = headers.into_iter();
    let mut remove: Vec<&'h [u8]> = Vec::new();
    let (mut method, mut path): (&[u8], &[u8]) = (b"", b"");
    for (name, value) in headers.clone() {
        if is_reserved(name, &cfg.route_header) {
            if !remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                remove.push(name);
            }
        } else if name == b":method" {
            method = value;
        } else if name == b":path" {
            path = value;
        }
    }
    let signup = cfg
        .signup
        .as_ref()
        .is_some_and(|sc| signup::is_signup(sc, method, path));
    let claims = if signup {
        // A sign-up makes a new consumer whatever cookie it carries.
        Err(CookieError::Missing)
    } else {
        let values = headers
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"))
            .map(|(_, v)| v);
        cookie::verify_first_cached(
            values,
            &cfg.cookie.name,
            cookies.verifier,
            cookies.cache,
            now_unix_s,
        )
    };
    Inspected {
        remove,
        signup,
        claims,
    }
}

/// Decides an inspected request. `lookup` is called only for a registering
/// cookie (with [`Inspected::table_key`]); `rr` is the worker's round-robin
/// counter, advanced once per routed request.
pub fn decide<'h, E: EntryView>(
    cfg: &FilterConfig,
    inspected: Inspected<'h>,
    lookup: impl FnOnce(&ConsumerId) -> Lookup<E>,
    availability: &AvailabilityView,
    rr: &mut u64,
) -> Plan<'h, E> {
    let Inspected {
        remove,
        signup,
        claims,
    } = inspected;
    let mut bumps = Bumps::default();
    if !remove.is_empty() {
        bumps.add(Counter::ReservedHeadersRemoved, remove.len() as u64);
    }
    let plan = |action, bumps, table_error| Plan {
        remove,
        action,
        bumps,
        table_error,
    };
    if signup {
        return plan(Action::Signup, bumps, None);
    }
    let claims = match claims {
        Ok(c) => c,
        Err(e) => {
            bumps.add(Counter::cookie_rejected(e), 1);
            bumps.add(Counter::RequestsAnonymous, 1);
            return plan(Action::Anonymous, bumps, None);
        }
    };
    let mut table_error = None;
    let entry = if decision::needs_table(Some(&claims)) {
        match lookup(&claims.consumer) {
            Lookup::Hit(e) => {
                bumps.add(Counter::TableHits, 1);
                Some(e)
            }
            Lookup::Miss => {
                bumps.add(Counter::TableMisses, 1);
                None
            }
            Lookup::Bad(e) => {
                bumps.add(Counter::TableErrors, 1);
                table_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let turn = *rr;
    *rr = rr.wrapping_add(1);
    let decided = decision::decide(
        Some(&claims),
        entry.as_ref(),
        availability,
        turn,
        cfg.when_all_down,
    );
    let (from, via, upgrade) = match decided {
        Decision::Anonymous => {
            bumps.add(Counter::RequestsAnonymous, 1);
            return plan(Action::Anonymous, bumps, table_error);
        }
        Decision::UnknownClusters => {
            bumps.add(Counter::CookiesRejectedUnknownCluster, 1);
            bumps.add(Counter::RequestsAnonymous, 1);
            return plan(Action::Anonymous, bumps, table_error);
        }
        Decision::AllDown { .. } => {
            bumps.add(Counter::AllDownReplies, 1);
            return plan(Action::Reply(all_down_reply(cfg)), bumps, table_error);
        }
        Decision::Route {
            from, via, upgrade, ..
        } => (from, via, upgrade),
    };
    bumps.add(Counter::routed(via), 1);
    let routed = Routed {
        claims,
        entry,
        from,
        via,
        upgrade,
    };
    plan(Action::Route(routed), bumps, table_error)
}

/// [`inspect`] then [`decide`]: the whole pipeline in one call.
pub fn route<'h, H, E>(
    cfg: &FilterConfig,
    cookies: Cookies<'_>,
    headers: H,
    lookup: impl FnOnce(&ConsumerId) -> Lookup<E>,
    availability: &AvailabilityView,
    rr: &mut u64,
    now_unix_s: u64,
) -> Plan<'h, E>
where
    H: IntoIterator<Item = (&'h [u8], &'h [u8])>,
    H::IntoIter: Clone,
    E: EntryView,
{
    let inspected = inspect(cfg, cookies, headers, now_unix_s);
    decide(cfg, inspected, lookup, availability, rr)
}

/// The 503 for a consumer all of whose managers are down.
pub fn all_down_reply(cfg: &FilterConfig) -> LocalReply {
    LocalReply {
        status: 503,
        retry_after_s: cfg.retry_after_s,
        body: r#"{"error":"replicas_unavailable","message":"every backend holding this account's data is down; retry later"}"#.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, PluginConfig};
    use crate::cookie::sign;
    use crate::table::OwnedEntry;
    use prealloc_wire::ConsumerState;
    use proptest::prelude::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_000_000;

    fn config(extra: &str) -> FilterConfig {
        let json = format!(r#"{{"filter":{{"cookie":{{"keys":["{KEY}"]}}{extra}}}}}"#);
        match parse(json.as_bytes()).unwrap() {
            PluginConfig::Filter(f) => f,
            PluginConfig::Poller(_) => panic!("a filter config"),
        }
    }

    fn cookie(state: ConsumerState, replicas: &[&str]) -> String {
        let claims = Claims {
            consumer: ConsumerId::from_bytes([3; 16]),
            state,
            expires_at: NOW + 60,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
        };
        format!("prealloc={}", sign(&claims, KEY.as_bytes()))
    }

    fn entry(value: &str) -> Lookup<OwnedEntry> {
        match OwnedEntry::decode(value.as_bytes().to_vec()) {
            Ok(Some(e)) => Lookup::Hit(e),
            Ok(None) => Lookup::Miss,
            Err(e) => Lookup::Bad(e),
        }
    }

    /// One request through the pipeline, summarised as "cluster" / "anonymous" / "503" / "signup".
    fn run(
        cfg: &FilterConfig,
        headers: &[(&str, &str)],
        table: &str,
        down: &[&str],
    ) -> (String, Plan<'static, OwnedEntry>) {
        let owned: Vec<(Vec<u8>, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        let owned: &'static [(Vec<u8>, Vec<u8>)] = Box::leak(owned.into_boxed_slice());
        let verifier = Verifier::from_config(&cfg.cookie);
        let avail = AvailabilityView::with_down(down.iter().copied());
        let mut rr = 0;
        let cookies = Cookies {
            verifier: &verifier,
            cache: None,
        };
        let plan = route(
            cfg,
            cookies,
            owned.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
            |_| entry(table),
            &avail,
            &mut rr,
            NOW,
        );
        let summary = match &plan.action {
            Action::Anonymous => "anonymous".to_owned(),
            Action::Signup => "signup".to_owned(),
            Action::Reply(r) => r.status.to_string(),
            Action::Route(r) => r.cluster().to_owned(),
        };
        (summary, plan)
    }

    #[test]
    fn the_pipeline_table() {
        use ConsumerState::{Registered as R, Registering as G};
        let cfg = config("");
        let g = cookie(G, &["a"]);
        let r = cookie(R, &["a", "b"]);
        // (headers, table value, down, outcome, counters)
        type Row<'a> = (
            Vec<(&'a str, &'a str)>,
            &'a str,
            Vec<&'a str>,
            &'a str,
            Vec<Counter>,
        );
        let rows: Vec<Row> = vec![
            (
                vec![],
                "",
                vec![],
                "anonymous",
                vec![Counter::CookiesRejectedMissing, Counter::RequestsAnonymous],
            ),
            (
                vec![("cookie", "prealloc=junk")],
                "",
                vec![],
                "anonymous",
                vec![
                    Counter::CookiesRejectedMalformed,
                    Counter::RequestsAnonymous,
                ],
            ),
            (
                vec![("cookie", &g)],
                "",
                vec![],
                "a",
                vec![Counter::TableMisses, Counter::RequestsFirstManager],
            ),
            (
                vec![("cookie", &g)],
                "1|g|a,b",
                vec!["a"],
                "b",
                vec![Counter::TableHits, Counter::RequestsTable],
            ),
            (
                vec![("cookie", &g)],
                "1|x|a",
                vec![],
                "a",
                vec![Counter::TableErrors, Counter::RequestsFirstManager],
            ),
            (
                vec![("cookie", &g)],
                "",
                vec!["a"],
                "503",
                vec![Counter::TableMisses, Counter::AllDownReplies],
            ),
            (
                vec![("cookie", &r)],
                "1|g|zzz",
                vec!["a"],
                "b",
                vec![Counter::RequestsCookie],
            ),
            (
                vec![("x-prealloc-cluster", "evil"), ("cookie", &r)],
                "",
                vec!["b"],
                "a",
                vec![Counter::ReservedHeadersRemoved, Counter::RequestsCookie],
            ),
        ];
        for (headers, table, down, want, counters) in rows {
            let (got, plan) = run(&cfg, &headers, table, &down);
            assert_eq!(got, want, "{headers:?} {table:?} {down:?}");
            let bumped: Vec<Counter> = plan.bumps.iter().map(|(c, _)| c).collect();
            assert_eq!(bumped, counters, "{headers:?} {table:?}");
        }
    }

    #[test]
    fn reserved_headers_are_removed_once_each_whatever_their_case() {
        let cfg = config("");
        let (_, plan) = run(
            &cfg,
            &[
                ("X-Prealloc-Cluster", "a"),
                ("x-prealloc-cluster", "b"),
                ("x-prealloc-consumer", "c"),
                ("x-other", "d"),
            ],
            "",
            &[],
        );
        let removed: Vec<&[u8]> = plan.remove.clone();
        assert_eq!(
            removed,
            [&b"X-Prealloc-Cluster"[..], b"x-prealloc-consumer"]
        );
        assert_eq!(plan.bumps.get(Counter::ReservedHeadersRemoved), 2);
    }

    #[test]
    fn a_sign_up_ignores_the_cookie_and_an_entry_saying_registered_upgrades() {
        let cfg = config(r#","signup":{"path":"/signup","token":"t","resource_type":"mailbox"}"#);
        let g = cookie(ConsumerState::Registering, &["a"]);
        let (got, _) = run(
            &cfg,
            &[
                (":method", "POST"),
                (":path", "/signup?x=1"),
                ("cookie", &g),
            ],
            "",
            &[],
        );
        assert_eq!(got, "signup");
        let (got, plan) = run(&cfg, &[(":method", "GET"), ("cookie", &g)], "1|r|a,b", &[]);
        assert_eq!(got, "a");
        let Action::Route(routed) = plan.action else {
            panic!()
        };
        assert!(routed.upgrade);
        let set_cookie = routed.upgrade_cookie(&cfg, NOW).unwrap().unwrap();
        let value = set_cookie
            .strip_prefix("prealloc=")
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let claims = cookie::verify(value, &[KEY.as_bytes()], NOW).unwrap();
        assert_eq!(claims.state, ConsumerState::Registered);
        assert_eq!(claims.replicas, ["a", "b"]);
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..max)
    }

    proptest! {
        /// No input panics, and whatever is routed goes to a cluster that the
        /// verified cookie or the table entry names: never anywhere else.
        #[test]
        fn any_request_gets_a_plan_that_names_only_known_clusters(
            junk in prop::collection::vec((bytes(24), bytes(64)), 0..8),
            state in prop_oneof![Just(ConsumerState::Registering), Just(ConsumerState::Registered)],
            replicas in prop::collection::vec("[a-d]", 1..4),
            with_cookie in any::<bool>(),
            table in prop_oneof![Just(String::new()), "1\\|[gr]\\|[a-d](,[a-d]){0,3}", ".{0,20}"],
            down in prop::collection::vec("[a-d]", 0..4),
            rr in any::<u64>(),
            when in prop_oneof![Just(""), Just(r#","when_all_down":"first_manager""#)],
        ) {
            let cfg = config(when);
            let verifier = Verifier::from_config(&cfg.cookie);
            let replica_refs: Vec<&str> = replicas.iter().map(String::as_str).collect();
            let c = cookie(state, &replica_refs);
            let mut headers: Vec<(&[u8], &[u8])> =
                junk.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            if with_cookie {
                headers.push((b"cookie", c.as_bytes()));
            }
            let avail = AvailabilityView::with_down(down.iter().map(String::as_str));
            let mut counter = rr;
            let mut cache = VerifiedCookies::new(8);
            let cookies = Cookies { verifier: &verifier, cache: Some(&mut cache) };
            let plan = route(&cfg, cookies, headers.iter().copied(), |_| entry(&table), &avail, &mut counter, NOW);
            for (name, _) in &headers {
                if is_reserved(name, &cfg.route_header) {
                    prop_assert!(plan.remove.iter().any(|r| r.eq_ignore_ascii_case(name)));
                }
            }
            if let Action::Route(routed) = &plan.action {
                prop_assert!(with_cookie, "only a verified cookie routes");
                let cluster = routed.cluster();
                let allowed: Vec<String> = match (state, entry(&table)) {
                    (ConsumerState::Registered, _) => replicas.clone(),
                    (ConsumerState::Registering, Lookup::Hit(e)) => e.replicas().map(str::to_owned).collect(),
                    (ConsumerState::Registering, _) => vec![replicas[0].clone()],
                };
                prop_assert!(allowed.iter().any(|a| a == cluster), "{cluster} not in {allowed:?}");
                prop_assert_eq!(routed.consumer(), &ConsumerId::from_bytes([3; 16]));
            }
        }
    }
}
