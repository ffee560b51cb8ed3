//! What is particular to each build: its configuration is checked at load
//! with a message naming the field, and the native module's ABI is the one
//! the pinned Envoy expects.

use crate::support::{Build, DataPlane};
use prealloc_e2e::envoy::{refused_at_start, validate, Endpoint, EnvoyConfig};
use std::time::Duration;

fn config(build: Build) -> EnvoyConfig {
    EnvoyConfig::new(
        vec![("m1".into(), Endpoint::new("127.0.0.1", 1))],
        Endpoint::new("127.0.0.1", 2),
        Endpoint::new("127.0.0.1", 3),
    )
    .with_build(build)
}

each_build! {
    #[tokio::test]
    async fn a_bad_filter_config_is_refused_naming_the_field(build) {
        validate(&config(build)).unwrap_or_else(|e| panic!("the test config itself is valid:\n{e}"));
        let mut bad = config(build);
        bad.filter["cookie"]["keys"] = serde_json::json!(["too short"]);
        let out = validate(&bad).expect_err("Envoy refuses a cookie key under 32 bytes");
        assert!(out.contains("filter.cookie.keys[0]"), "the message names the field:\n{out}");
        let mut bad = config(build);
        bad.filter["when_all_down"] = serde_json::json!("sometimes");
        let out = validate(&bad).expect_err("Envoy refuses an unknown when_all_down");
        assert!(out.contains("when_all_down"), "the message names the field:\n{out}");
    }
}

each_build! {
    #[tokio::test]
    async fn a_bad_poller_config_is_refused_naming_the_field(build) {
        // (`--mode validate` does not start the wasm singleton: start Envoy for real.)
        let mut bad = config(build);
        bad.poller["min_backoff_ms"] = serde_json::json!("soon");
        let out = refused_at_start(&bad, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("Envoy must refuse a poller config with a bad field: {e}"));
        assert!(out.contains("poller.min_backoff_ms"), "the message names the field:\n{out}");
    }
}

#[tokio::test]
async fn the_abi_version_is_the_one_envoy_1_40_accepts() {
    let dp = DataPlane::start(Build::Native);
    let log = dp.envoy.log();
    assert!(
        log.contains("Dynamic module ABI version v0.2.0 matched"),
        "Envoy accepted the module's ABI version without a warning:\n{log}"
    );
    assert!(!log.contains("is deprecated"), "{log}");
}

#[tokio::test]
async fn the_native_build_defines_the_same_stats_as_the_wasm_build() {
    let native = DataPlane::start(Build::Native);
    let wasm = DataPlane::start(Build::Wasm);
    let names = |dp: &DataPlane| -> std::collections::BTreeSet<String> {
        dp.envoy
            .stats_matching("prealloc_")
            .keys()
            .filter_map(|k| k.split('.').next_back())
            .filter(|name| name.starts_with("prealloc_"))
            .map(str::to_owned)
            .collect()
    };
    let (n, w) = (names(&native), names(&wasm));
    assert!(n.len() >= 25, "{n:?}");
    assert_eq!(n, w, "same stat names in both builds");
}
