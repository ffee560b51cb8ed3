//! Times a full routes snapshot of N consumers (what a new Envoy downloads): build
//! the answer and serialise it, as `GET /v1/routes?since=0` does.
//!     cargo run --release -p prealloc-control-plane --example routes_probe -- 1000000

use prealloc_control_plane::routes::Routes;
use prealloc_wire::{ConsumerId, ConsumerState, RouteEntry, RoutesQuery};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let entries: Vec<RouteEntry> = (0..n)
        .map(|i| {
            let mut b = [7u8; 16];
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            RouteEntry {
                consumer: ConsumerId::from_bytes(b),
                state: ConsumerState::Registering,
                replicas: vec![format!("m{}", i % 3 + 1), format!("m{}", (i + 1) % 3 + 1)],
            }
        })
        .collect();
    let routes = Routes::new("e".into(), 1, entries, vec![], 1000, usize::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        let r = routes.answer(&RoutesQuery::default()).expect("full");
        let built = t.elapsed();
        let bytes = r.to_json();
        println!(
            "{n} entries: answer built in {built:.2?}, serialised {} MB in {:.2?} total",
            bytes.len() / 1_000_000,
            t.elapsed()
        );
    }
}
