//! The poller keeps the last good table through control-plane errors (garbage,
//! 500, truncated, oversized, wrong-epoch and hanging answers), never traps, and
//! resyncs on a new epoch.

use crate::support::{cookie_for, new_consumer, served_by, tally, DataPlane, CATCH_UP};
use prealloc_e2e::routes_stub::Fault;
use prealloc_wire::{ConsumerState, RoutesKind};
use std::time::{Duration, Instant};

each_build! {
    #[tokio::test]
    async fn new_epoch_replaces_the_whole_table(build) {
        let dp = DataPlane::start(build);
        let olga = new_consumer();
        for m in ["m1", "m2"] {
            dp.manager(m).hold(olga.as_str());
        }
        dp.routes
            .upsert(&olga, ConsumerState::Registering, &["m1", "m2"]);
        dp.caught_up();
        let fulls = dp.envoy.stat("prealloc_poller_full_snapshots");

        // A control plane with a new database no longer knows olga's entry. The
        // poller is kept away (errors) while that happens, so only the new epoch's
        // full snapshot can tell it, and the snapshot must drop the entry.
        let errors = dp.envoy.stat("prealloc_poller_errors");
        dp.routes.set_fault(Some(Fault {
            status: 503,
            body: "{}".into(),
        }));
        dp.envoy
            .wait_for_stat("prealloc_poller_errors", CATCH_UP, |v| v > errors);
        dp.routes.remove(&olga);
        dp.routes.forget_history();
        dp.routes.new_epoch("epoch-2");
        dp.routes.set_fault(None);
        dp.caught_up();
        dp.envoy.wait_for_stat(
            "prealloc_poller_full_snapshots",
            Duration::from_secs(5),
            |v| v > fulls,
        );
        let last_full = dp
            .routes
            .polls()
            .into_iter()
            .rfind(|p| p.kind == Some(RoutesKind::Full))
            .unwrap();
        assert_eq!(last_full.version, dp.routes.version());
        let cookie = cookie_for(&olga, ConsumerState::Registering, &["m1"]);
        let served = served_by(&mut dp.client(), &cookie, 6).await;
        assert!(served.iter().all(|s| s == "m1"), "{served:?}");
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn bad_answers_keep_the_last_good_table_and_never_trap(build) {
        // A short long-poll, so a hanging answer times out after 0.5 s + the margin.
        let dp = DataPlane::start_with(build, |cfg| cfg.poller["wait_ms"] = 500.into());
        let nina = new_consumer();
        for m in ["m1", "m2"] {
            dp.manager(m).hold(nina.as_str());
        }
        dp.routes
            .upsert(&nina, ConsumerState::Registering, &["m1", "m2"]);
        dp.caught_up();
        let cookie = cookie_for(&nina, ConsumerState::Registering, &["m1"]);
        // Applied, the wrong-epoch delta would send nina to m3, which lacks her
        // data, and the oversized snapshot would drop her entry.
        let wrong_epoch = serde_json::json!({
            "protocol": 2, "epoch": "another-database", "version": dp.routes.version() + 1, "kind": "delta",
            "managers": [], "remove": [],
            "upsert": [{"consumer": nina.as_str(), "state": "registering", "replicas": ["m3"]}],
        })
        .to_string();
        // A control plane of an older release (routes protocol 1: no `protocol`,
        // one-piece snapshots): read as protocol 2, this would send nina to m3.
        let old_protocol = serde_json::json!({
            "epoch": "e-old", "version": 1, "kind": "full", "managers": [
                {"id": "m3", "cluster": "manager_m3", "location": "local", "availability": "available"}
            ], "remove": [],
            "upsert": [{"consumer": nina.as_str(), "state": "registering", "replicas": ["m3"]}],
        })
        .to_string();
        // A control plane of a newer release refusing this poller's protocol.
        let refused = r#"{"error":"unsupported_protocol","message":"this control plane speaks protocol=3"}"#;
        // Larger than Envoy's default http.async_response_buffer_limit (32 MiB).
        let oversized = format!(
            r#"{{"epoch":"x","version":99,"kind":"full","managers":[],"remove":[],"upsert":[],"pad":"{}"}}"#,
            "m3".repeat(20 << 20)
        );

        let mut seen = Vec::new();
        for (what, fault) in [
            ("garbage", Some((200, "{not json".to_owned()))),
            ("500", Some((500, r#"{"error":"internal","message":"boom"}"#.to_owned()))),
            ("wrong-epoch delta", Some((200, wrong_epoch))),
            ("older protocol", Some((200, old_protocol))),
            ("protocol refused", Some((400, refused.to_owned()))),
            ("oversized (40 MiB)", Some((200, oversized))),
            ("truncated mid-body", None),
            ("hanging", None),
        ] {
            let before = dp.envoy.stat("prealloc_poller_errors");
            let t0 = Instant::now();
            match (what, fault) {
                (_, Some((status, body))) => dp.routes.set_fault(Some(Fault { status, body })),
                ("truncated mid-body", None) => dp.routes.set_truncate(true),
                _ => dp.routes.set_hang(true),
            }
            dp.envoy
                .wait_for_stat("prealloc_poller_errors", CATCH_UP, |v| v > before);
            seen.push(format!("{what}: counted after {:?}", t0.elapsed()));
            let counts = tally(&served_by(&mut dp.client(), &cookie, 10).await);
            assert_eq!(
                counts.values().copied().collect::<Vec<_>>(),
                [5, 5],
                "{what}: still both replicas: {counts:?}"
            );
            dp.routes.set_fault(None);
            dp.routes.set_truncate(false);
            dp.routes.set_hang(false);
            // A healthy poll before the next fault, so its error is its own.
            dp.caught_up();
        }
        println!("poller faults ({}): {}", build.name(), seen.join("; "));

        // Healthy again: the next change arrives, and nothing trapped on the way.
        dp.manager("m3").hold(nina.as_str());
        dp.routes
            .upsert(&nina, ConsumerState::Registering, &["m1", "m2", "m3"]);
        dp.caught_up();
        let counts = tally(&served_by(&mut dp.client(), &cookie, 9).await);
        assert_eq!(counts.len(), 3, "{counts:?}");
        let log = dp.envoy.log();
        assert!(!log.contains("[prealloc] panic in"), "the filter trapped:\n{log}");
        // Each protocol mismatch is logged saying what to do.
        for says in [
            "the control plane answered without a routes protocol (a release older than protocol 2",
            "routes poll refused with HTTP 400 unsupported_protocol: this control plane speaks protocol=3",
        ] {
            assert!(log.contains(says), "the log does not say {says:?}:\n{log}");
        }
        dp.assert_no_violations();
    }
}
