//! Shared fixtures: plugin configurations, cookies minted with the filter's own API, table writes, request helpers.

use prealloc_filter_core::cookie::{sign, Claims};
use prealloc_wasm_host::{Host, HttpStream, Vm};
use prealloc_wire::{ConsumerId, ConsumerState};
use serde_json::{json, Value};

/// The signing key of the default filter configuration (at least 32 bytes).
pub const KEY: &[u8] = b"test-signing-key-0123456789abcdef-0001";
/// A second, older key still listed for verification (rotation).
pub const OLD_KEY: &[u8] = b"test-signing-key-0123456789abcdef-0000";
/// A key the filter does not know: cookies signed with it are forged.
pub const FORGER_KEY: &[u8] = b"not-the-key-of-this-filter-0123456789ab";

pub const ROUTE_HEADER: &str = "x-prealloc-cluster";
pub const CONSUMER_HEADER: &str = "x-prealloc-consumer";
pub const MANAGERS_KEY: &str = "prealloc.managers";

/// Counter names the filter defines (see filter/README.md).
pub mod metric {
    /// Requests by decision: anonymous, first_manager, table, cookie, all_down_first_manager.
    pub fn decision(via: &str) -> String {
        format!("prealloc_requests_{via}")
    }
    /// Rejected cookies by reason: missing, malformed, bad_mac, expired, unsupported_version.
    pub fn cookie_rejected(reason: &str) -> String {
        format!("prealloc_cookies_rejected_{reason}")
    }
    pub const ALL_DOWN_REPLIES: &str = "prealloc_all_down_replies";
    pub const POLLER_UPDATES: &str = "prealloc_poller_updates";
    pub const POLLER_ERRORS: &str = "prealloc_poller_errors";
}

/// The default filter plugin configuration, as JSON to adjust per test.
pub fn filter_json() -> Value {
    json!({"filter": {
        "cookie": {
            "keys": [String::from_utf8(KEY.to_vec()).unwrap(), String::from_utf8(OLD_KEY.to_vec()).unwrap()],
        },
    }})
}

/// A poller plugin configuration with short backoffs.
pub fn poller_json() -> Value {
    json!({"poller": {
        "cluster": "prealloc_control_plane",
        "authority": "prealloc-control-plane",
        "token": "envoy-token",
        "wait_ms": 30000,
        "min_backoff_ms": 100,
        "max_backoff_ms": 400,
    }})
}

/// A host with one filter worker VM configured with `config`.
pub fn filter_with(config: Value) -> (Host, Vm) {
    let host = Host::new();
    let vm = host.new_vm();
    assert!(
        vm.configure_plugin(&config.to_string()),
        "the filter refused {config}"
    );
    (host, vm)
}

/// A host with one filter worker VM in the default configuration.
pub fn filter() -> (Host, Vm) {
    filter_with(filter_json())
}

/// Consumer number `n` (a valid consumer id).
pub fn consumer(n: u8) -> ConsumerId {
    ConsumerId::from_bytes([n; 16])
}

/// A `Cookie` header value carrying a cookie signed with `key`.
pub fn cookie_signed(
    key: &[u8],
    consumer: &ConsumerId,
    state: ConsumerState,
    replicas: &[&str],
    expires_at: u64,
) -> String {
    let claims = Claims {
        consumer: consumer.clone(),
        state,
        expires_at,
        replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
    };
    format!("prealloc={}", sign(&claims, key))
}

/// A valid `Cookie` header value for the host's current time (expires in an hour).
pub fn cookie(
    host: &Host,
    consumer: &ConsumerId,
    state: ConsumerState,
    replicas: &[&str],
) -> String {
    cookie_signed(KEY, consumer, state, replicas, host.now_unix_s() + 3600)
}

/// Writes the consumer's routing-table entry in the format of ARCHITECTURE.md:
/// a line `<id> 1|<state>|<replicas>` in its bucket, the lines sorted by id.
pub fn set_entry(host: &Host, consumer: &ConsumerId, state: ConsumerState, replicas: &[&str]) {
    let state = match state {
        ConsumerState::Registering => "g",
        ConsumerState::Registered => "r",
    };
    let key = entry_key(consumer);
    let old = host.shared_data_str(&key).unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| !l.starts_with(consumer.as_str()))
        .map(str::to_owned)
        .collect();
    lines.push(format!("{consumer} 1|{state}|{}", replicas.join(",")));
    lines.sort();
    host.set_shared_data(&key, format!("{}\n", lines.join("\n")).as_bytes());
}

/// The shared-data key of the bucket holding the consumer's entry:
/// `prealloc.b.` and the id's first two bytes in hex.
pub fn entry_key(consumer: &ConsumerId) -> String {
    let b = consumer.to_bytes();
    format!("prealloc.b.{:02x}{:02x}", b[0], b[1])
}

/// The consumer's entry as the poller wrote it (`1|g|manager_m1`), if its
/// bucket holds one.
pub fn entry_in(host: &Host, consumer: &ConsumerId) -> Option<String> {
    let bucket = host.shared_data_str(&entry_key(consumer))?;
    let prefix = format!("{consumer} ");
    bucket
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::to_owned)
}

/// Writes the managers' availability and lets the filter worker refresh its cache (one tick).
pub fn set_availability(host: &Host, vm: &Vm, lines: &[(&str, &str)]) {
    let value: Vec<String> = lines.iter().map(|(c, a)| format!("{c} {a}")).collect();
    host.set_shared_data(MANAGERS_KEY, value.join("\n").as_bytes());
    host.tick(vm);
}

/// A GET request with the given extra headers.
pub fn get_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        (":method", "GET"),
        (":path", "/inbox"),
        (":authority", "app.example"),
        (":scheme", "https"),
    ];
    h.extend_from_slice(extra);
    h
}

/// Sends a request with `extra` headers and returns the stream after its request headers.
pub fn send<'v>(vm: &'v Vm, extra: &[(&str, &str)]) -> HttpStream<'v> {
    let mut s = vm.new_http_stream();
    s.request_headers(&get_with(extra), true);
    s
}

/// The cluster a request with `extra` headers is routed to (None: the route's default).
pub fn route_of(vm: &Vm, extra: &[(&str, &str)]) -> Option<String> {
    send(vm, extra).forwarded_request_header(ROUTE_HEADER)
}

/// Routes `n` requests carrying `cookie` and counts them per cluster.
pub fn spread(vm: &Vm, cookie: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let cluster = route_of(vm, &[("cookie", cookie)]).unwrap_or_else(|| "<default>".to_owned());
        *counts.entry(cluster).or_insert(0) += 1;
    }
    counts
}

/// Asserts `counts` covers exactly `clusters`, each within ±1 of an even share.
pub fn assert_even_over(counts: &std::collections::BTreeMap<String, usize>, clusters: &[&str]) {
    let mut expected: Vec<&str> = clusters.to_vec();
    expected.sort_unstable();
    let got: Vec<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(
        got, expected,
        "requests went to exactly these clusters: {counts:?}"
    );
    let total: usize = counts.values().sum();
    let share = total / clusters.len();
    for (cluster, n) in counts {
        assert!(
            n.abs_diff(share) <= 1,
            "{cluster} got {n} of {total}, expected {share}±1: {counts:?}"
        );
    }
}
