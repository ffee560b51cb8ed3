//! No input traps the real VM: arbitrary cookie bytes, non-UTF-8 headers, garbage control-plane answers.

use crate::support::*;
use prealloc_wasm_host::Host;
use prealloc_wire::{ConsumerId, ConsumerState};

/// A small deterministic generator (xorshift64*), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, max: usize, alphabet: &[u8]) -> Vec<u8> {
        let n = (self.next() % (max as u64 + 1)) as usize;
        (0..n)
            .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
            .collect()
    }
}

const COOKIE_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=;\" \t";

#[test]
fn arbitrary_cookie_bytes_never_trap_and_stay_anonymous() {
    let (host, vm) = filter();
    host.echo_logs(false);
    let all_bytes: Vec<u8> = (0u8..=255).filter(|b| *b != 0).collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let valid = cookie(
        &host,
        &consumer(1),
        ConsumerState::Registering,
        &["manager_a"],
    );
    for i in 0..400 {
        let mut value = b"prealloc=".to_vec();
        match i % 3 {
            0 => value.extend(rng.bytes(120, COOKIE_ALPHABET)),
            1 => value.extend(rng.bytes(120, &all_bytes)),
            // A valid cookie with a few bytes changed.
            _ => {
                let mut v = valid.clone().into_bytes();
                for _ in 0..1 + rng.next() % 3 {
                    let at = 9 + (rng.next() as usize % (v.len() - 9));
                    v[at] = COOKIE_ALPHABET[(rng.next() % COOKIE_ALPHABET.len() as u64) as usize];
                }
                value = v;
            }
        }
        if value == valid.as_bytes() {
            continue;
        }
        let mut s = vm.new_http_stream();
        s.request_headers_bytes(
            &[(":method", b"GET"), (":path", b"/"), ("cookie", &value)],
            true,
        );
        // Whatever the bytes, the request is never steered: default route, no consumer.
        assert_eq!(
            s.forwarded_request_header(ROUTE_HEADER),
            None,
            "cookie {:?}",
            String::from_utf8_lossy(&value)
        );
        assert_eq!(s.forwarded_request_header(CONSUMER_HEADER), None);
    }
}

#[test]
fn non_utf8_header_values_never_trap_the_filter() {
    let (host, vm) = filter();
    let c = cookie(
        &host,
        &consumer(1),
        ConsumerState::Registering,
        &["manager_a"],
    );
    let mut s = vm.new_http_stream();
    s.request_headers_bytes(
        &[
            (":method", b"GET"),
            (":path", b"/caf\xe9"),
            ("x-name", b"\xff\xfe\x80"),
            ("x-prealloc-cluster", b"manager_\xff"),
            ("cookie", b"a=\xff; b=\xc3"),
            ("cookie", c.as_bytes()),
        ],
        true,
    );
    assert_eq!(
        s.forwarded_request_header(ROUTE_HEADER).as_deref(),
        Some("manager_a")
    );
    assert_eq!(s.forwarded_request_header_values(ROUTE_HEADER).len(), 1);
}

#[test]
fn garbage_table_and_availability_values_never_trap_and_never_misroute() {
    let (host, vm) = filter();
    host.echo_logs(false);
    let mut rng = Rng(42);
    let me = consumer(1);
    let c = cookie(&host, &me, ConsumerState::Registering, &["manager_a"]);
    let alphabet = b"1|gr,manager_ab \n\xff";
    for i in 0..200 {
        // The consumer's line with a garbage entry (or a garbage bucket).
        let mut entry = if i % 4 == 0 {
            Vec::new()
        } else {
            format!("{me} ").into_bytes()
        };
        entry.extend(rng.bytes(60, alphabet));
        host.set_shared_data(&entry_key(&me), &entry);
        host.set_shared_data(MANAGERS_KEY, &rng.bytes(60, alphabet));
        host.tick(&vm);
        let s = send(&vm, &[("cookie", &c)]);
        if let Some(cluster) = s
            .local_reply()
            .map(|_| None)
            .unwrap_or_else(|| s.forwarded_request_header(ROUTE_HEADER))
        {
            // Any routed cluster must come from a value that decodes; a garbage entry falls back to the first manager.
            let text = String::from_utf8_lossy(&entry);
            assert!(
                cluster == "manager_a" || text.split(['|', ',']).any(|part| part == cluster),
                "routed to {cluster:?} with entry {text:?}"
            );
        }
    }
}

#[test]
fn garbage_control_plane_answers_never_trap_the_poller() {
    let host = Host::new();
    host.echo_logs(false);
    let poller = host.new_vm();
    assert!(poller.configure_plugin(&poller_json().to_string()));
    let mut rng = Rng(7);
    let good = br#"{"epoch":"e1","version":3,"kind":"full","managers":[{"id":"m1","cluster":"manager_m1","location":"eu","availability":"available"}],"upsert":[{"consumer":"AAAAAAAAAAAAAAAAAAAAAA","state":"registering","replicas":["m1"]}],"remove":[]}"#;
    let mut answered = 0;
    while answered < 150 {
        let Some(call) = host.pending_http_calls().into_iter().next() else {
            host.tick(&poller);
            continue;
        };
        let body: Vec<u8> = match answered % 3 {
            0 => rng.bytes(200, b"{}[]\":,0123456789abcdefghijklmnopqrstuvwxyz \xff"),
            // A good answer cut short or with one byte changed.
            1 => good[..(rng.next() as usize % good.len())].to_vec(),
            _ => {
                let mut b = good.to_vec();
                let at = rng.next() as usize % b.len();
                b[at] = (rng.next() % 256) as u8;
                b
            }
        };
        host.answer_http_call(call.token, 200, &[], &body);
        answered += 1;
    }
    // Garbage never wrote a half-decoded entry: every line of every bucket is
    // a consumer of that bucket with the one entry a good answer carries.
    for key in host.shared_data_keys("prealloc.b.") {
        let v = host.shared_data_str(&key).unwrap();
        for line in v.lines() {
            let (id, e) = line.split_once(' ').unwrap();
            let id = ConsumerId::parse(id).unwrap();
            assert_eq!(entry_key(&id), key, "{line:?} in the wrong bucket");
            assert_eq!(e, "1|g|manager_m1", "{key} = {v:?}");
        }
    }
}

/// No input of ours reaches a panic; the SDK's own checks can, when a host
/// breaks the ABI (here: request headers for a context that was never created).
/// The panic hook then names the panic and the last callback at critical level.
#[test]
fn a_trap_is_logged_at_critical_level_with_where_it_happened() {
    let (host, vm) = filter();
    let mut s = vm.new_http_stream();
    s.request_headers(&[(":method", "GET"), (":path", "/")], true);
    let last = s.id();
    s.finish();
    let trap = vm
        .try_call_export("proxy_on_request_headers", (999_999, 0, 1))
        .expect_err("an unknown context traps in the SDK");
    assert!(trap.contains("999999"), "{trap}");
    let critical: Vec<String> = host
        .logs()
        .into_iter()
        .filter(|l| l.level == 5)
        .map(|l| l.message)
        .collect();
    assert_eq!(critical.len(), 1, "one critical line: {critical:?}");
    let line = &critical[0];
    assert!(line.contains("[prealloc] panic"), "{line}");
    assert!(line.contains("invalid context_id"), "{line}");
    assert!(
        line.contains(&format!("on_http_request_headers of context {last}")),
        "{line}"
    );
}
