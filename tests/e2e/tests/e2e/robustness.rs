//! Garbage through the real Envoy, for both builds: arbitrary cookie bytes
//! (obs-text included), mangled valid cookies and look-alike reserved headers
//! never crash Envoy or the module, never reach a manager, and a valid cookie
//! still routes afterwards.

use crate::support::{cookie_for, new_consumer, DataPlane};
use prealloc_wire::ConsumerState;
use std::io::{Read, Write};

/// A small deterministic generator (xorshift64*), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One raw HTTP/1.1 request with arbitrary header bytes; the response's status and body.
fn raw_get(addr: std::net::SocketAddr, headers: &[(Vec<u8>, Vec<u8>)]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut req = b"GET /r HTTP/1.1\r\nhost: prealloc.test\r\nconnection: close\r\n".to_vec();
    for (n, v) in headers {
        req.extend_from_slice(n);
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

each_build! {
    #[tokio::test]
    async fn garbage_cookies_and_look_alike_headers_never_crash_and_never_reach_a_manager(build) {
        let dp = DataPlane::start(build);
        let alice = new_consumer();
        dp.manager("m1").hold(alice.as_str());
        let valid = cookie_for(&alice, ConsumerState::Registered, &["m1"]);
        let addr = dp.envoy.addr();
        let names: [&[u8]; 6] = [
            b"x-prealloc-cluster", b"X-Prealloc-Consumer", b"x-prealloc-resource",
            b"x-prealloc-anything", b"cookie", b"x-other",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut rejected = 0;
        for i in 0..300 {
            let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            // A cookie: garbage (visible ASCII, spaces, obs-text; Envoy itself refuses
            // control bytes), or the valid one mangled at one byte.
            let cookie: Vec<u8> = if i % 2 == 0 {
                let len = rng.below(200);
                let mut v = b"prealloc=".to_vec();
                v.extend((0..len).map(|_| match rng.next() as u8 { b @ (0..=0x1f | 0x7f) => b ^ 0x40, b => b }));
                v
            } else {
                let mut v = valid.clone().into_bytes();
                let at = 9 + rng.below(v.len() - 9);
                let swaps = b"AZaz09-_.=;\"\x80\xff";
                v[at] = swaps[rng.below(swaps.len())];
                v
            };
            headers.push((b"cookie".to_vec(), cookie));
            for _ in 0..rng.below(4) {
                let name = names[rng.below(names.len())];
                headers.push((name.to_vec(), b"manager_m2".to_vec()));
            }
            let (status, text) = raw_get(addr, &headers);
            assert!(status != 0, "Envoy stopped answering at request {i}: {text}");
            // Envoy may refuse some byte sequences itself (400); nothing may be routed
            // to a manager but the valid cookie's own one, and the filter never fails.
            assert!(status == 200 || status == 400, "request {i} answered {status}: {text}");
            if status == 400 {
                rejected += 1;
            }
        }
        assert!(rejected < 150, "most requests got through to the filter ({rejected} refused by Envoy)");
        // Still routing: the valid cookie reaches its manager.
        let r = dp.client().get("/", &[("cookie", &valid)]).await;
        assert_eq!(r.served_by().as_deref(), Some("m1"), "{}", r.text());
        for m in ["m2", "m3"] {
            assert!(dp.manager(m).requests().is_empty(), "{m} got a request");
        }
        dp.assert_no_violations();
    }
}
