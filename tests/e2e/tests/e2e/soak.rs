//! The soak of `cargo xtask soak`, for 20 seconds: every fault once, under
//! sign-ups, traffic and active replication.

use prealloc_e2e::soak::{self, SoakOptions};
use std::time::Duration;

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_short_soak_with_every_fault_loses_nothing(build) {
        let report = soak::run(&SoakOptions::new(Duration::from_secs(20), build), &mut |l| println!("{l}")).await;
        println!("{}", report.summary());
        assert_eq!(report.faults.len(), 7, "every fault ran: {:?}", report.faults);
        assert!(report.signups > 50 && report.served > 500, "too little load: {}", report.summary());
        assert!(report.passed(), "{}", report.summary());
    }
}
