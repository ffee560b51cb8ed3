//! The data plane under test: three recording managers, a default backend, the routes stub and a real Envoy.

use prealloc_e2e::client::Client;
pub use prealloc_e2e::envoy::Build;
use prealloc_e2e::envoy::{Envoy, EnvoyConfig, EnvoyOptions, TEST_COOKIE_KEY, TEST_ENVOY_TOKEN};
use prealloc_e2e::manager::{assert_no_violations, DefaultBackend, TestManager};
use prealloc_e2e::routes_stub::{manager_route, RoutesStub};
use prealloc_filter_core::cookie::{sign, Claims};
use prealloc_wire::{ConsumerId, ConsumerState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Defines a real-Envoy test once per build of the data plane, as
/// `<name>::wasm` and `<name>::native`; the body gets the build as `build`.
macro_rules! each_build {
    ($(#[$attr:meta])* async fn $name:ident($build:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($build: $crate::support::Build) $body

            $(#[$attr])*
            async fn wasm() {
                run($crate::support::Build::Wasm).await
            }

            $(#[$attr])*
            async fn native() {
                run($crate::support::Build::Native).await
            }
        }
    };
}

pub const MANAGER_IDS: [&str; 3] = ["m1", "m2", "m3"];
/// How long a poller may take to catch up with the stub in a test.
pub const CATCH_UP: Duration = Duration::from_secs(10);

pub struct DataPlane {
    pub managers: Vec<TestManager>,
    pub default: DefaultBackend,
    pub routes: RoutesStub,
    pub envoy: Envoy,
}

impl DataPlane {
    /// Everything with the test defaults, the routes stub knowing the three managers,
    /// and the poller caught up with it.
    pub fn start(build: Build) -> DataPlane {
        Self::start_with(build, |_| {})
    }

    /// Like [`DataPlane::start`], letting the test adjust the Envoy config first
    /// (e.g. `cfg.filter["when_all_down"] = "first_manager".into()`).
    pub fn start_with(build: Build, adjust: impl FnOnce(&mut EnvoyConfig)) -> DataPlane {
        let managers: Vec<TestManager> = MANAGER_IDS
            .iter()
            .map(|id| TestManager::start(id))
            .collect();
        let default = DefaultBackend::start();
        let routes = RoutesStub::start(TEST_ENVOY_TOKEN);
        routes.set_managers(MANAGER_IDS.iter().map(|id| manager_route(id)).collect());
        let mut cfg = EnvoyConfig::new(
            managers
                .iter()
                .map(|m| (m.name().to_owned(), m.addr().into()))
                .collect(),
            default.addr().into(),
            routes.addr().into(),
        );
        cfg.build = build;
        adjust(&mut cfg);
        let envoy = Envoy::start(&cfg, &EnvoyOptions::default());
        let dp = DataPlane {
            managers,
            default,
            routes,
            envoy,
        };
        dp.caught_up();
        dp
    }

    pub fn manager(&self, id: &str) -> &TestManager {
        self.managers
            .iter()
            .find(|m| m.name() == id)
            .unwrap_or_else(|| panic!("no manager {id}"))
    }

    /// A client on one keep-alive connection to Envoy (one worker, one round-robin counter).
    pub fn client(&self) -> Client {
        Client::new(self.envoy.addr())
    }

    /// Waits until Envoy's poller holds a long-poll at the stub's current version.
    pub fn caught_up(&self) {
        self.routes.wait_until_caught_up(1, CATCH_UP);
    }

    /// Asserts the invariant over every manager and the default backend.
    pub fn assert_no_violations(&self) {
        assert_no_violations(self.managers.iter().chain([self.default.as_manager()]));
    }
}

/// A fresh random consumer id.
pub fn new_consumer() -> ConsumerId {
    ConsumerId::from_bytes(rand_bytes())
}

fn rand_bytes() -> [u8; 16] {
    // Unique per call without a rand dependency: time, a counter and the thread id, hashed.
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_usize(i);
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `Cookie` header value for a consumer; `replicas` are manager ids, first manager first.
pub fn cookie_for(consumer: &ConsumerId, state: ConsumerState, replicas: &[&str]) -> String {
    cookie_signed(
        consumer,
        state,
        replicas,
        now_unix() + 3600,
        TEST_COOKIE_KEY.as_bytes(),
    )
}

pub fn cookie_signed(
    consumer: &ConsumerId,
    state: ConsumerState,
    replicas: &[&str],
    expires_at: u64,
    key: &[u8],
) -> String {
    let claims = Claims {
        consumer: consumer.clone(),
        state,
        expires_at,
        replicas: replicas.iter().map(|id| format!("manager_{id}")).collect(),
    };
    format!("prealloc={}", sign(&claims, key))
}

/// Sends `n` GETs with `cookie` over one connection; returns who served each (the `x-served-by` header,
/// or `status <code>` for answers no harness server gave).
pub async fn served_by(client: &mut Client, cookie: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = client
            .get(&format!("/mail/{i}"), &[("cookie", cookie)])
            .await;
        out.push(
            r.served_by()
                .unwrap_or_else(|| format!("status {}", r.status)),
        );
    }
    out
}

/// How many times each name occurs.
pub fn tally(names: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}
