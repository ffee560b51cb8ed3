//! The whole story with real parts (Envoy 1.40, the .wasm, the control plane on SQLite, three managers), in both replication modes and across two Envoys.

use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::story::{run_story, spread, Stack, StackOptions, StoryOptions, StoryReport};

async fn story(opts: StackOptions, story: StoryOptions, name: &str) -> (Stack, StoryReport) {
    let stack = Stack::start(&opts);
    let mut transcript = Vec::new();
    let result = run_story(&stack, &story, &mut |line| {
        println!("[{name}] {line}");
        transcript.push(line);
    })
    .await;
    let report = result
        .unwrap_or_else(|e| panic!("{name}: {e}\ntranscript so far:\n{}", transcript.join("\n")));
    stack.assert_no_violations();
    // Each phase's requests over the managers that served it (run_story checked they were the replica set).
    for (phase, t) in &report.phases {
        let over: Vec<String> = t.keys().cloned().collect();
        println!(
            "[{name}] spread {phase}: {t:?} (max-min {})",
            spread(t, &over)
        );
    }
    (stack, report)
}

each_build! {
    #[tokio::test]
    async fn active_replication_story_signup_pinned_round_robin_upgrade_and_table_exit(build) {
        let (stack, report) = story(
            StackOptions::new(Replication::Active).with_build(build),
            StoryOptions {
                requests: 12,
                ..StoryOptions::default()
            },
            "active",
        )
        .await;
        // The control plane copied the data itself: every manager holds the same bytes as the first.
        let c = report.signed_up.consumer.as_str();
        let original = stack
            .manager(&report.signed_up.first)
            .data(c)
            .expect("first manager holds the data");
        for m in &stack.managers {
            assert_eq!(
                m.data(c).as_ref(),
                Some(&original),
                "{} holds a different copy",
                m.name()
            );
        }
        let gets = stack
            .manager(&report.signed_up.first)
            .count(prealloc_e2e::manager::RequestKind::Replication);
        assert!(
            gets >= 2,
            "the control plane read the first manager's data for each copy ({gets} calls)"
        );
    }
}

each_build! {
    #[tokio::test]
    async fn reported_replication_story_never_routes_to_an_unreported_copy(build) {
        let (stack, report) = story(
            StackOptions::new(Replication::Reported).with_build(build),
            StoryOptions {
                requests: 12,
                ..StoryOptions::default()
            },
            "reported",
        )
        .await;
        let c = report.signed_up.consumer.as_str();
        let [first, second, third] = [&report.order[0], &report.order[1], &report.order[2]];
        // The second manager held a copy during the pinned phase and the third during the two-replica phase;
        // neither got a request then (run_story checked each phase's split); here: the totals per manager.
        let n = |m: &str| stack.manager(m).requests_of(c).len();
        assert_eq!(
            n(second) + n(third) + n(first),
            12 * 4 + 3,
            "every request reached a manager"
        );
        assert_eq!(
            n(third),
            4 + 4,
            "the third manager only got requests after its copy was reported"
        );
        // No manager API call in reported mode: the control plane never copied anything.
        for m in &stack.managers {
            assert_eq!(
                m.count(prealloc_e2e::manager::RequestKind::Replication),
                0,
                "{}",
                m.name()
            );
        }
    }
}

each_build! {
    #[tokio::test]
    async fn two_envoys_sign_up_through_one_and_continue_through_the_other(build) {
        let mut opts = StackOptions::new(Replication::Active).with_build(build);
        opts.envoys = 2;
        let (stack, report) = story(
            opts,
            StoryOptions {
                signup_via: 0,
                continue_via: 1,
                requests: 6,
            },
            "two envoys",
        )
        .await;
        // The second Envoy routed everything after the sign-up, from the table the control plane pushed to it.
        assert!(stack.envoys[1].settled_stat("prealloc_requests_table") >= 12);
        assert!(stack.envoys[1].settled_stat("prealloc_cookies_upgraded") >= 1);
        assert_eq!(stack.envoys[0].settled_stat("prealloc_signups_ok"), 1);
        assert_eq!(stack.envoys[1].settled_stat("prealloc_signups_ok"), 0);
        let _ = report;
    }
}
