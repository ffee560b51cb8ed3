//! Fuzz targets: one per decoder of input prealloc does not control.
//!
//! Each target takes arbitrary bytes, drives one decoder the way the product
//! does, and panics only when a property breaks: a decoded value that does
//! not encode back to itself, a route to a cluster nobody named, a header
//! value a client could split, an answer that depends on a cache. A panic
//! anywhere else (an index out of range, an overflow: the fuzz build turns on
//! overflow checks) is a bug of the product, since the data plane must never
//! panic.
//!
//! Two drivers run the same functions:
//! - `fuzz/libfuzzer/` (its own workspace): coverage-guided libFuzzer, built on
//!   the stable toolchain by `cargo xtask fuzz <target>`; it grows the corpus;
//! - `tests/corpus.rs` (plain `cargo test`, in CI): replays every committed
//!   input in `fuzz/corpus/<target>/` and the seeds below.

use prealloc_filter_core::buckets;
use prealloc_filter_core::config::{self, FilterConfig, PluginConfig, PollerConfig};
use prealloc_filter_core::cookie::{self, Claims, VerifiedCookies, Verifier};
use prealloc_filter_core::decision::EntryView;
use prealloc_filter_core::headers::{self, HeaderMap};
use prealloc_filter_core::pipeline::{self, Action, Cookies, Lookup};
use prealloc_filter_core::poller::{Poller, Step};
use prealloc_filter_core::process_table::ProcessTable;
use prealloc_filter_core::signup::{self, RegistrationOutcome};
use prealloc_filter_core::table::{self, AvailabilityView, OwnedEntry, TableWrite};
use prealloc_wire::{Availability, ConsumerId, ConsumerState, Registration, RoutesResponse};
use std::collections::HashMap;

/// What a target did with an input: the deepest path it reached (`"routed"`,
/// `"refused"`, ...). libFuzzer ignores it; the replay test checks that each
/// seed reaches the path it was written for, so no target silently stops at
/// its first check.
pub type Outcome = &'static str;

/// A target: a name (its corpus directory and libFuzzer binary) and the function.
pub type Target = (&'static str, fn(&[u8]) -> Outcome);

/// Every target, in the order `cargo xtask fuzz all` runs them.
pub const TARGETS: &[Target] = &[
    ("cookie", cookie),
    ("request", request),
    ("table", table),
    ("wire", wire),
    ("poller", poller),
    ("signup", signup),
    ("filter_config", filter_config),
    ("control_plane_config", control_plane_config),
];

/// The target named `name`.
pub fn target(name: &str) -> Option<fn(&[u8]) -> Outcome> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const OLD_KEY: &[u8] = b"fedcba9876543210fedcba9876543210";
const NOW: u64 = 1_800_000_000;
const MANAGERS: [&str; 3] = ["manager_m1", "manager_m2", "manager_m3"];

fn filter_config_fixture() -> FilterConfig {
    let json = format!(
        r#"{{"filter":{{"cookie":{{"keys":["{}","{}"]}},
            "signup":{{"path":"/signup","token":"envoy-token-0123456789","resource_type":"mailbox"}}}}}}"#,
        String::from_utf8_lossy(KEY),
        String::from_utf8_lossy(OLD_KEY),
    );
    match config::parse(json.as_bytes()) {
        Ok(PluginConfig::Filter(f)) => f,
        other => panic!("the fixture filter config does not parse: {other:?}"),
    }
}

fn poller_config_fixture() -> PollerConfig {
    // Two writes per turn: every answer with an entry takes several turns.
    match config::parse(br#"{"poller":{"token":"envoy-token-0123456789","writes_per_turn":2}}"#) {
        Ok(PluginConfig::Poller(p)) => p,
        other => panic!("the fixture poller config does not parse: {other:?}"),
    }
}

/// No byte a client could use to end a header line or smuggle another one.
fn assert_header_safe(what: &str, v: &str) {
    assert!(
        !v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0),
        "{what} could split a header: {v:?}"
    );
}

/// The `Cookie` header: pair splitting, candidate order, verification with
/// two keys, the per-worker cache, and the signing codec's round trip.
pub fn cookie(data: &[u8]) -> Outcome {
    let verifier = Verifier::new(&[KEY, OLD_KEY]);
    let name = "prealloc";
    let plain = cookie::verify_first(std::iter::once(data), name, &verifier, NOW);
    let mut cache = VerifiedCookies::new(4);
    for _ in 0..2 {
        let cached = cookie::verify_first_cached(
            std::iter::once(data),
            name,
            &verifier,
            Some(&mut cache),
            NOW,
        );
        assert_eq!(
            cached.map(|c| (*c).clone()),
            plain,
            "the cache changed an answer"
        );
    }
    let mut outcome = if plain.is_ok() { "verified" } else { "refused" };
    for value in cookie::cookie_values(std::iter::once(data), name).take(4) {
        let Ok(v) = std::str::from_utf8(value) else {
            continue;
        };
        if let Ok(claims) = verifier.verify(v, NOW) {
            assert!(claims.expires_at > NOW, "an expired cookie verified");
            assert!(
                !claims.replicas.is_empty(),
                "a cookie without a manager verified"
            );
            let again = cookie::sign(&claims, KEY);
            assert_eq!(verifier.verify(&again, NOW).as_ref(), Ok(&claims));
        }
    }
    // The codec the other way: claims built from the bytes sign and verify back.
    if let Some((head, rest)) = data.split_first_chunk::<17>() {
        let (id, flags) = head.split_at(16);
        let claims = Claims {
            consumer: ConsumerId::from_bytes(id.try_into().unwrap_or([0; 16])),
            state: if flags[0] & 1 == 0 {
                ConsumerState::Registering
            } else {
                ConsumerState::Registered
            },
            expires_at: NOW + 1 + u64::from(flags[0] >> 1),
            replicas: String::from_utf8_lossy(rest)
                .split(',')
                .map(str::to_owned)
                .collect(),
        };
        if let Ok(signed) = cookie::try_sign(&claims, KEY) {
            assert_header_safe("a signed cookie", &signed);
            assert_eq!(
                verifier.verify(&signed, NOW),
                Ok(claims),
                "a signed cookie does not verify to its claims"
            );
            if outcome == "refused" {
                outcome = "signed";
            }
        }
    }
    outcome
}

/// One request through the whole pipeline: the proxy-wasm header map reader,
/// reserved-header stripping, sign-up matching, the cookie, the table entry
/// and the routing decision. Byte 0 chooses the cookie, the entry and the
/// managers' availability; the rest is the serialized header map.
pub fn request(data: &[u8]) -> Outcome {
    let Some((&flags, rest)) = data.split_first() else {
        return "empty";
    };
    let Some(map) = HeaderMap::parse(rest) else {
        return "not a header map";
    };
    let cfg = filter_config_fixture();
    let state = if flags & 1 == 0 {
        ConsumerState::Registering
    } else {
        ConsumerState::Registered
    };
    // Cookies may name clusters that are no managers: those must never be routed to.
    let cookie_replicas: &[&str] = match (flags >> 1) & 3 {
        0 => &["manager_m1"],
        1 => &["manager_m2", "manager_m3"],
        2 => &["prealloc_control_plane"],
        _ => &["manager_m3", "not_a_manager", "manager_m1"],
    };
    let claims = Claims {
        consumer: ConsumerId::from_bytes([7; 16]),
        state,
        expires_at: NOW + 60,
        replicas: cookie_replicas.iter().map(|s| s.to_string()).collect(),
    };
    let cookie_header = format!("prealloc={}", cookie::sign(&claims, KEY));
    let entry_value: &[u8] = match (flags >> 3) & 3 {
        0 => b"",
        1 => b"1|g|manager_m1",
        2 => b"1|r|manager_m1,manager_m2,prealloc_control_plane",
        _ => b"1|x|",
    };
    let availability = if flags & 0x80 == 0 {
        AvailabilityView::default()
    } else {
        AvailabilityView::of_managers(MANAGERS.iter().enumerate().map(|(i, m)| {
            let down = flags & (0x20 << i.min(1)) != 0 && i < 2;
            (
                *m,
                if down {
                    Availability::Down
                } else {
                    Availability::Available
                },
            )
        }))
    };
    let mut pairs: Vec<(&[u8], &[u8])> = map.iter().collect();
    if flags & 0x40 != 0 {
        pairs.push((b"cookie", cookie_header.as_bytes()));
    }
    let verifier = Verifier::from_config(&cfg.cookie);
    let mut cache = VerifiedCookies::new(4);
    let mut rr = u64::from(flags);
    let lookup = |_: &ConsumerId| match OwnedEntry::decode(entry_value.to_vec()) {
        Ok(Some(e)) => Lookup::Hit(e),
        Ok(None) => Lookup::Miss,
        Err(e) => Lookup::Bad(e),
    };
    let plan = pipeline::route(
        &cfg,
        Cookies {
            verifier: &verifier,
            cache: Some(&mut cache),
        },
        pairs.iter().copied(),
        lookup,
        &availability,
        &mut rr,
        NOW,
    );
    for (name, _) in &pairs {
        if headers::is_reserved(name, &cfg.route_header) {
            assert!(
                plan.remove.iter().any(|r| r.eq_ignore_ascii_case(name)),
                "reserved header {:?} left on the request",
                String::from_utf8_lossy(name)
            );
        }
    }
    if let Action::Route(routed) = &plan.action {
        let cluster = routed.cluster();
        // The cookie that routes is the first one that verifies, checked here
        // without the pipeline's cache (the fixture's, or one in the input).
        let verified = cookie::verify_first(
            pairs
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"))
                .map(|(_, v)| *v),
            &cfg.cookie.name,
            &verifier,
            NOW,
        );
        assert_eq!(
            verified.as_ref(),
            Ok(routed.claims()),
            "routed by claims no cookie of the request verifies to"
        );
        let named_by_cookie = routed.claims().replicas.iter().any(|r| r == cluster);
        let named_by_entry = matches!(OwnedEntry::decode(entry_value.to_vec()), Ok(Some(e)) if e.replicas().any(|r| r == cluster));
        assert!(
            named_by_cookie || named_by_entry,
            "routed to {cluster}, which neither the cookie nor the table names"
        );
        assert!(
            availability.is_routable(cluster),
            "routed to {cluster}, which is not a routable manager"
        );
        assert_eq!(routed.consumer(), &routed.claims().consumer);
        if let Some(Ok(set_cookie)) = routed.upgrade_cookie(&cfg, NOW) {
            assert_header_safe("an upgraded cookie", &set_cookie);
        }
    }
    match plan.action {
        Action::Route(_) => "routed",
        Action::Signup => "signup",
        Action::Anonymous => "anonymous",
        Action::Reply(_) => "reply",
    }
}

/// The table codecs: a consumer entry (the wasm build's shared data), the
/// managers list, and the native build's process table fed with both.
pub fn table(data: &[u8]) -> Outcome {
    let mut outcome = "refused";
    if let Ok(Some(e)) = table::decode_entry(data) {
        outcome = "entry";
        let replicas: Vec<&str> = e.replicas().collect();
        assert!(!replicas.is_empty(), "an entry without a manager decoded");
        for r in &replicas {
            assert!(table::is_valid_cluster(r), "entry names cluster {r:?}");
        }
        let again = table::encode_entry(e.state, replicas.iter().copied());
        let back = table::decode_entry(again.as_bytes());
        assert!(
            matches!(&back, Ok(Some(b)) if b.state == e.state && b.replicas().eq(replicas.iter().copied())),
            "entry {again:?} does not decode back: {back:?}"
        );
        let t = ProcessTable::new();
        let consumer = ConsumerId::from_bytes([1; 16]);
        if t.apply(TableWrite::Entry {
            consumer: &consumer,
            state: e.state,
            replicas: &replicas,
        })
        .is_ok()
        {
            let got = t.get(&consumer).map(|g| {
                (
                    g.state(),
                    g.replicas().map(str::to_owned).collect::<Vec<_>>(),
                )
            });
            let want: Vec<String> = replicas.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                got,
                Some((e.state, want)),
                "the process table changed an entry"
            );
        }
    }
    if bucket(data) > 0 {
        outcome = "bucket";
    }
    if let Ok(view) = table::decode_managers(data) {
        for m in MANAGERS {
            if view.is_down(m) {
                assert!(view.is_known(m) || !view.has_list(), "{m} down but unknown");
            }
        }
        if outcome == "refused" {
            outcome = "managers";
        }
    }
    outcome
}

/// Shared data for the bucket writer: a map.
#[derive(Default)]
struct Shared(HashMap<String, Vec<u8>>);

impl buckets::SharedData for Shared {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.get(key).cloned()
    }
    fn set(&mut self, key: &str, value: &[u8]) -> bool {
        self.0.insert(key.to_owned(), value.to_vec());
        true
    }
}

/// What a filter reads for `c` in `store`: its state and replicas, if found.
fn bucket_entry(store: &Shared, c: &ConsumerId) -> Option<(ConsumerState, Vec<String>)> {
    use buckets::SharedData;
    let value = store.get(&buckets::consumer_bucket_key(c))?;
    let e = buckets::owned_entry(value, c).ok()??;
    Some((e.state(), e.replicas().map(str::to_owned).collect()))
}

/// The bytes as a stored bucket (the wasm build's shared data): the reader
/// never panics, and the poller's writer, adding one entry to it, keeps every
/// entry a reader found there and makes the new one found. How many entries
/// were found in it.
fn bucket(data: &[u8]) -> usize {
    let mut store = Shared::default();
    store.0.insert(buckets::bucket_key(0), data.to_vec());
    let found: Vec<(ConsumerId, (ConsumerState, Vec<String>))> = data
        .split(|&b| b == b'\n')
        .filter_map(|line| line.get(..prealloc_wire::CONSUMER_ID_LEN))
        .filter_map(|id| ConsumerId::parse(std::str::from_utf8(id).ok()?).ok())
        .filter(|c| buckets::bucket_of(c) == 0)
        .filter_map(|c| Some((c.clone(), bucket_entry(&store, &c)?)))
        .collect();
    let new = ConsumerId::from_bytes([0, 0, 0x5a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
    let mut w = buckets::BucketWriter::new();
    w.write(
        &mut store,
        TableWrite::Entry {
            consumer: &new,
            state: ConsumerState::Registered,
            replicas: &MANAGERS[..2],
        },
    );
    w.flush(&mut store);
    let want = MANAGERS[..2].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        bucket_entry(&store, &new),
        Some((ConsumerState::Registered, want)),
        "the written entry is not found"
    );
    let n = found.len();
    for (c, before) in found {
        if c != new {
            assert_eq!(
                bucket_entry(&store, &c),
                Some(before),
                "{c}'s entry changed"
            );
        }
    }
    n
}

/// The wire types as Envoy and managers receive them: routes answers,
/// registrations, consumer ids. What decodes encodes back to itself.
pub fn wire(data: &[u8]) -> Outcome {
    if let Ok(r) = serde_json::from_slice::<RoutesResponse>(data) {
        let json = serde_json::to_vec(&r).unwrap_or_default();
        let back = serde_json::from_slice::<RoutesResponse>(&json).ok();
        assert_eq!(back.as_ref(), Some(&r), "routes answer does not round-trip");
        return "routes";
    }
    if let Ok(r) = serde_json::from_slice::<Registration>(data) {
        let json = serde_json::to_vec(&r).unwrap_or_default();
        let back = serde_json::from_slice::<Registration>(&json).ok();
        assert_eq!(back.as_ref(), Some(&r), "registration does not round-trip");
        return "registration";
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = ConsumerId::parse(s) {
            assert_eq!(id.as_str(), s, "a consumer id has one spelling");
            assert_eq!(ConsumerId::from_bytes(id.to_bytes()), id);
            return "consumer id";
        }
    }
    "refused"
}

/// The poller: answers of `/v1/routes` (the bytes, split at the first
/// newline into two successive answers) applied to the native process table,
/// checked against a plain map of what was written.
pub fn poller(data: &[u8]) -> Outcome {
    // As the native build runs it: the table lists the ids it holds.
    let t = std::sync::Arc::new(ProcessTable::new());
    let mut p = Poller::with_held_ids(poller_config_fixture(), Box::new(t.clone()));
    let mut model: HashMap<ConsumerId, (ConsumerState, Vec<String>)> = HashMap::new();
    let (first, second) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut now = 1_000;
    let mut accepted = 0;
    for body in [first, second] {
        let _ = p.poll_due(now);
        let mut sink = |w: TableWrite<'_>| {
            let applied = t.apply(w).is_ok();
            match w {
                TableWrite::Entry {
                    consumer,
                    state,
                    replicas,
                } => {
                    for r in replicas {
                        assert!(table::is_valid_cluster(r), "poller wrote cluster {r:?}");
                    }
                    if applied {
                        model.insert(
                            consumer.clone(),
                            (state, replicas.iter().map(|s| s.to_string()).collect()),
                        );
                    }
                }
                TableWrite::Remove(consumer) => {
                    model.remove(consumer);
                }
                TableWrite::Managers(m) => {
                    for (c, _) in m {
                        assert!(table::is_valid_cluster(c), "poller wrote manager {c:?}");
                    }
                }
            }
            applied
        };
        if let Ok(mut step) = p.on_response(Some(200), body, now, &mut sink) {
            accepted += 1;
            // A big answer takes several turns; nothing is polled meanwhile.
            while step == Step::More {
                assert!(p.poll_due(now).is_none(), "a poll while applying");
                step = p.step(&mut sink);
            }
        }
        now += 10;
    }
    assert_eq!(
        t.len(),
        model.len(),
        "process table and writes disagree on the count"
    );
    assert_eq!(p.entries(), t.len());
    for (consumer, (state, replicas)) in &model {
        let got = t.get(consumer).map(|g| {
            (
                g.state(),
                g.replicas().map(str::to_owned).collect::<Vec<_>>(),
            )
        });
        assert_eq!(
            got.as_ref(),
            Some(&(*state, replicas.clone())),
            "process table and writes disagree on {consumer}"
        );
    }
    match accepted {
        0 => "refused",
        1 => "one accepted",
        _ => "both accepted",
    }
}

/// The control plane's answers to the sign-up calls (registration, give-back,
/// confirmation): byte 0 picks the status, the rest is the body (and, after a
/// first newline, the `Retry-After` value).
pub fn signup(data: &[u8]) -> Outcome {
    let Some((&s, rest)) = data.split_first() else {
        return "empty";
    };
    let status = match s {
        0 => None,
        1..=100 => Some(201),
        101..=150 => Some(503),
        _ => Some(u32::from(s) + 300),
    };
    let (retry_after, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let reply = match signup::on_registration_response(status, retry_after, body, 5, 2000) {
        RegistrationOutcome::Forward(reg) => {
            assert!(
                table::is_valid_cluster(&reg.cluster),
                "forwards to {:?}",
                reg.cluster
            );
            for (name, value) in signup::forward_headers(&reg) {
                assert_header_safe(name, value);
            }
            let cfg = filter_config_fixture();
            if let signup::SignupAnswer::Accepted { set_cookie } =
                signup::on_signup_response(&cfg.cookie, &reg, Some(201), NOW)
            {
                assert_header_safe("the sign-up cookie", &set_cookie);
            }
            None
        }
        RegistrationOutcome::Reply(r) | RegistrationOutcome::GiveBackAndReply(_, r) => Some(r),
    };
    let outcome = if reply.is_none() {
        "forwarded"
    } else {
        "replied"
    };
    let confirm = signup::on_confirm_response(status, 5).err();
    for r in reply.iter().chain(confirm.iter()) {
        assert!(
            (1..=signup::MAX_RETRY_AFTER_S).contains(&r.retry_after_s),
            "Retry-After {}",
            r.retry_after_s
        );
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("local reply body is not JSON ({e}): {}", r.body));
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{}",
            r.body
        );
    }
    outcome
}

/// The plugin configurations Envoy hands the filter (filter, poller, cluster
/// specifier): what parses is usable.
pub fn filter_config(data: &[u8]) -> Outcome {
    let parsed = config::parse(data);
    if let Ok(PluginConfig::Filter(f)) = &parsed {
        let claims = Claims {
            consumer: ConsumerId::from_bytes([9; 16]),
            state: ConsumerState::Registering,
            expires_at: NOW + 60,
            replicas: vec!["manager_m1".to_owned()],
        };
        let signed = cookie::sign_with_config(&f.cookie, &claims)
            .unwrap_or_else(|e| panic!("a parsed config cannot sign: {e:?}"));
        assert_eq!(
            Verifier::from_config(&f.cookie).verify(&signed, NOW),
            Ok(claims)
        );
        let header = cookie::set_cookie_header(&f.cookie, &signed);
        assert_header_safe("Set-Cookie", &header);
        assert_header_safe("the route header name", &f.route_header);
        if let Some(sc) = &f.signup {
            for call in [
                signup::registration_call(sc),
                signup::confirm_call(sc, &ConsumerId::from_bytes([9; 16])),
            ] {
                for (name, value) in call.header_refs() {
                    assert_header_safe(name, value);
                }
            }
        }
    }
    match (parsed, config::parse_specifier(data)) {
        (Ok(PluginConfig::Filter(_)), _) => "filter",
        (Ok(PluginConfig::Poller(_)), _) => "poller",
        (_, Ok(_)) => "specifier",
        _ => "refused",
    }
}

/// The control plane's TOML configuration: parsing and validation never
/// panic, whatever the file holds.
pub fn control_plane_config(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return "not utf-8";
    };
    match prealloc_control_plane::config::Config::parse(text, &std::env::temp_dir()) {
        Ok(_) => "valid",
        Err(_) => "invalid",
    }
}

/// Inputs every target starts from (and the replay test runs), each with the
/// outcome it must reach: what the product sends and receives when things go
/// right, and a few things that must be refused, so the fuzzer begins deep
/// inside each decoder.
pub fn seeds(name: &str) -> Vec<(Outcome, Vec<u8>)> {
    let claims = Claims {
        consumer: ConsumerId::from_bytes([7; 16]),
        state: ConsumerState::Registered,
        expires_at: NOW + 600,
        replicas: vec!["manager_m1".to_owned(), "manager_m2".to_owned()],
    };
    let signed = cookie::sign(&claims, KEY);
    let id = ConsumerId::from_bytes([7; 16]);
    let managers = r#"[{"id":"m1","cluster":"manager_m1","location":"local","availability":"available"},{"id":"m2","cluster":"manager_m2","location":"local","availability":"down"}]"#;
    let routes = format!(
        r#"{{"protocol":2,"epoch":"e1","version":3,"kind":"full","managers":{managers},"upsert":[{{"consumer":"{id}","state":"registering","replicas":["m1"]}}],"remove":[]}}"#
    );
    let later = ConsumerId::from_bytes([9; 16]);
    let first_page = routes.replace(r#""remove":[]"#, &format!(r#""remove":[],"next":"{id}""#));
    let last_page = format!(
        r#"{{"protocol":2,"epoch":"e1","version":3,"kind":"full","managers":{managers},"upsert":[{{"consumer":"{later}","state":"registered","replicas":["m1","m2"]}}],"after":"{id}"}}"#
    );
    let delta = format!(
        r#"{{"protocol":2,"epoch":"e1","version":4,"kind":"delta","managers":{managers},"upsert":[{{"consumer":"{id}","state":"registered","replicas":["m1","m2"]}}],"remove":[]}}"#
    );
    let registration = format!(
        r#"{{"consumer":"{id}","manager":"m1","cluster":"manager_m1","resource":{{"id":1,"type":"mailbox","name":"mailbox-1","location":"local"}}}}"#
    );
    match name {
        "cookie" => vec![
            ("verified", format!("prealloc={signed}").into_bytes()),
            ("verified", format!("a=b; prealloc=\"{signed}\"; prealloc=junk").into_bytes()),
            // A tampered cookie; its bytes also make claims that sign and verify back.
            ("signed", format!("prealloc={signed}x").into_bytes()),
            ("refused", b"prealloc=x".to_vec()),
        ],
        "request" => {
            let cookie = format!("theme=dark; prealloc={signed}");
            let pairs: [(&[u8], &[u8]); 5] = [
                (b":method", b"GET"),
                (b":path", b"/inbox"),
                (b"cookie", cookie.as_bytes()),
                (b"x-prealloc-consumer", b"AAAAAAAAAAAAAAAAAAAAAA"),
                (b"x_prealloc_cluster", b"prealloc_control_plane"),
            ];
            let signup: [(&[u8], &[u8]); 2] = [(b":method", b"POST"), (b":path", b"/signup")];
            let get: [(&[u8], &[u8]); 2] = [(b":method", b"GET"), (b":path", b"/")];
            let with = |flags: u8, pairs: &[(&[u8], &[u8])]| {
                let mut v = vec![flags];
                v.extend(headers::serialize(pairs));
                v
            };
            vec![
                ("routed", with(0x80, &pairs)),
                // A registering cookie with a table entry: the entry's replicas.
                ("routed", with(0x48 | 0x80, &get)),
                // A signed cookie naming the control plane's cluster.
                ("anonymous", with(0x44 | 0x80, &get)),
                ("signup", with(0x41, &signup)),
                ("not a header map", vec![0, 9, 0, 0, 0]),
            ]
        }
        "table" => vec![
            ("entry", b"1|g|manager_m1".to_vec()),
            ("entry", b"1|r|manager_m1,manager_m2".to_vec()),
            (
                "bucket",
                b"AAAAAAAAAAAAAAAAAAAAAA 1|g|manager_m1\nAAD__________________w 1|r|manager_m1,manager_m2\n"
                    .to_vec(),
            ),
            (
                "managers",
                table::encode_managers([
                    ("manager_m1", Availability::Available),
                    ("manager_m2", Availability::Down),
                ])
                .into_bytes(),
            ),
        ],
        "wire" => vec![
            ("routes", routes.clone().into_bytes()),
            ("registration", registration.clone().into_bytes()),
            ("consumer id", id.as_str().as_bytes().to_vec()),
        ],
        "poller" => vec![
            ("both accepted", format!("{routes}\n{delta}").into_bytes()),
            ("both accepted", format!("{first_page}\n{last_page}").into_bytes()),
            ("one accepted", format!("{routes}\n{{").into_bytes()),
            // A control plane of an older release: no protocol.
            ("refused", routes.replace(r#""protocol":2,"#, "").into_bytes()),
        ],
        "signup" => {
            let mut ok = vec![1];
            ok.extend(registration.as_bytes());
            let mut refused = vec![120];
            refused.extend(b"30\n{\"error\":\"pool_empty\",\"message\":\"no resource ready\"}");
            vec![("forwarded", ok), ("replied", refused)]
        }
        "filter_config" => vec![
            (
                "filter",
                format!(
                    r#"{{"filter":{{"cookie":{{"keys":["{}"],"max_age_s":3600}},"signup":{{"path":"/signup","token":"envoy-token-0123456789","resource_type":"mailbox"}}}}}}"#,
                    String::from_utf8_lossy(KEY)
                )
                .into_bytes(),
            ),
            ("poller", br#"{"poller":{"token":"envoy-token-0123456789","wait_ms":30000}}"#.to_vec()),
            ("specifier", br#"{"default_cluster":"default"}"#.to_vec()),
        ],
        "control_plane_config" => vec![(
            "valid",
            include_bytes!("../../control-plane/examples/prealloc.toml").to_vec(),
        )],
        _ => Vec::new(),
    }
}
