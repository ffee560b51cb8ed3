//! The control plane on PostgreSQL (`[store] kind = "postgres"`), with real
//! Envoy and a real PostgreSQL server: the story holds, and PostgreSQL
//! restarted under sign-ups makes the control plane answer 503 with
//! Retry-After meanwhile, reconnect by itself, and lose nothing it acknowledged.

use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::postgres::Postgres;
use prealloc_e2e::story::{
    consumer_cookie, post_signup, run_story, send_requests, Stack, StackOptions, StoryOptions,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Outcomes {
    acknowledged: Vec<prealloc_wire::ConsumerId>,
    refused: usize,
    other: Vec<String>,
}

each_build! {
    #[tokio::test]
    async fn on_postgres_the_story_holds_and_a_restart_under_signups_loses_nothing_acknowledged(build) {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
        let mut opts = StackOptions::new(Replication::Reported).with_build(build);
        opts.postgres_url = Some(pg.url());
        let mut stack = Stack::start(&opts);
        run_story(&stack, &StoryOptions::default(), &mut |l| {
            println!("[postgres] {l}")
        })
        .await
        .unwrap_or_else(|e| panic!("the story on PostgreSQL: {e}"));
        stack.assert_no_violations();

        // Sign-ups through Envoy, four at a time, while PostgreSQL stops and comes back.
        let outcomes = Arc::new(Mutex::new(Outcomes::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let envoy = stack.envoys[0].addr();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (outcomes, stop) = (outcomes.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut client = Client::new(envoy);
                    while !stop.load(Ordering::SeqCst) {
                        let r = match post_signup(&mut client).await {
                            Ok(r) => r,
                            Err(e) => {
                                outcomes.lock().unwrap().other.push(format!("request: {e}"));
                                continue;
                            }
                        };
                        {
                            let mut o = outcomes.lock().unwrap();
                            match r.status {
                                200..=299 => match consumer_cookie(&r) {
                                    Ok(Some((_, claims))) => o.acknowledged.push(claims.consumer),
                                    other => o.other.push(format!("2xx without a cookie: {other:?}")),
                                },
                                503 if r.header("retry-after").is_some() => o.refused += 1,
                                s => o.other.push(format!("{s}: {}", r.text())),
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        let acknowledged = || outcomes.lock().unwrap().acknowledged.len();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let before_outage = acknowledged();
        assert!(
            before_outage > 0,
            "no sign-up went through before the outage"
        );
        pg.stop_immediately().unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let refused_in_outage = outcomes.lock().unwrap().refused;
        pg.restart().unwrap();
        let back = acknowledged();
        let deadline = Instant::now() + Duration::from_secs(20);
        while acknowledged() < back + 10 {
            assert!(
                Instant::now() < deadline,
                "sign-ups did not resume after PostgreSQL came back:\n{}",
                stack.cp.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        let o = std::mem::take(&mut *outcomes.lock().unwrap());
        assert!(
            refused_in_outage > 0,
            "no sign-up was refused with 503 + Retry-After while PostgreSQL was down"
        );
        assert!(o.other.is_empty(), "unexpected answers: {:?}", o.other);
        println!(
            "[postgres] {} sign-ups acknowledged ({before_outage} before the outage), {} refused with 503",
            o.acknowledged.len(),
            o.refused
        );

        // Nothing acknowledged is lost: a control plane killed and started
        // again reads every one back from PostgreSQL, each on its own resource.
        stack.cp.restart();
        for c in &o.acknowledged {
            let v = stack.cp.consumer(c).await;
            assert_eq!(v["consumer"], c.as_str(), "{v}");
        }
        let doubled = pg
            .psql(
                "SELECT count(*) - count(DISTINCT consumer) FROM resources WHERE consumer IS NOT NULL",
            )
            .unwrap();
        assert_eq!(doubled, "0", "a consumer holds two resources");
        stack.assert_no_violations();
    }
}

/// `store.password_env` and `store.password_file` give the password (SCRAM
/// authentication); a wrong one fails with PostgreSQL's reason, and the
/// password is never printed.
#[test]
fn the_store_password_comes_from_the_environment_or_a_file_and_is_never_printed() {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    let secret = "s3cret-Pa55word-for-the-test";
    pg.add_password_role("app", secret).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://app@127.0.0.1:{}/app", pg.port());
    let tokens = "[tokens]\nenvoy = \"envoy-test-token-0123456789\"\nadmin = \"admin-test-token-0123456789\"\n";
    let config = |password: &str| {
        let path = dir.path().join("prealloc.toml");
        std::fs::write(
            &path,
            format!("{tokens}[store]\nkind = \"postgres\"\nurl = \"{url}\"\n{password}\n"),
        )
        .unwrap();
        path
    };
    // `pools` reads the database: it gets as far as finding no tables when
    // the password was right, and is refused when it was not.
    let pools = |config: &std::path::Path, env: Option<&str>| {
        let mut cmd =
            std::process::Command::new(prealloc_e2e::control_plane::control_plane_binary());
        cmd.args(["pools", "--config"]).arg(config);
        cmd.env_remove("PREALLOC_PG_PASSWORD");
        if let Some(p) = env {
            cmd.env("PREALLOC_PG_PASSWORD", p);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let by_env = config("password_env = \"PREALLOC_PG_PASSWORD\"");
    let e = pools(&by_env, Some(secret));
    assert!(e.contains("holds no prealloc tables"), "{e}");
    let wrong = "wrong-Pa55word-given";
    let e = pools(&by_env, Some(wrong));
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(
        !e.contains(wrong) && !e.contains(secret),
        "a password was printed: {e}"
    );
    let e = pools(&by_env, None);
    assert!(e.contains("PREALLOC_PG_PASSWORD is not set"), "{e}");

    std::fs::write(dir.path().join("pg-password"), format!("{secret}\n")).unwrap();
    let by_file = config("password_file = \"pg-password\"");
    let e = pools(&by_file, None);
    assert!(e.contains("holds no prealloc tables"), "{e}");
    std::fs::write(dir.path().join("pg-password"), format!("{wrong}\n")).unwrap();
    let e = pools(&by_file, None);
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(
        !e.contains(wrong) && !e.contains(secret),
        "a password was printed: {e}"
    );
}

// Three control planes on one shared PostgreSQL database behind one Envoy
// (its `prealloc_control_plane` cluster lists all three): sign-ups through
// Envoy and replica reports to any instance, the one holding the duty lease
// killed with -9 mid-load. Nothing acknowledged is lost, no resource is
// handed out twice, sign-ups carry on through the others, and no request
// reaches a manager without the consumer's data.
each_build! {
    #[tokio::test]
    async fn three_shared_control_planes_one_killed_mid_load_lose_nothing_acknowledged(build) {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
        let mut opts = StackOptions::new(Replication::Reported).with_build(build);
        opts.postgres_url = Some(pg.url());
        opts.control_planes = 3;
        let mut stack = Stack::start(&opts);
        let envoy = stack.envoys[0].addr();
        let urls: Vec<String> = std::iter::once(stack.cp.url())
            .chain(stack.more_cps.iter().map(|c| c.url()))
            .collect();
        let holder = stack.more_cps[0].url();
        let token = stack.cp.config().admin_token.clone();

        #[derive(Default)]
        struct Acked {
            consumers: Vec<(prealloc_wire::ConsumerId, String)>,
            replicas: Vec<(prealloc_wire::ConsumerId, String)>,
            after_kill: usize,
            other: Vec<String>,
        }
        let acked = Arc::new(Mutex::new(Acked::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let m2 = stack.manager("m2").holder();
        let tasks: Vec<_> = (0..4)
            .map(|k| {
                let (acked, stop, killed, m2) =
                    (acked.clone(), stop.clone(), killed.clone(), m2.clone());
                let (urls, token, holder) = (urls.clone(), token.clone(), holder.clone());
                tokio::spawn(async move {
                    let mut client = Client::new(envoy);
                    let mut n = k;
                    while !stop.load(Ordering::SeqCst) {
                        let r = match post_signup(&mut client).await {
                            Ok(r) => r,
                            Err(_) => {
                                client = Client::new(envoy);
                                continue;
                            }
                        };
                        if r.status == 503 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        let Ok(Some((value, claims))) = consumer_cookie(&r) else {
                            acked
                                .lock()
                                .unwrap()
                                .other
                                .push(format!("{}: {}", r.status, r.text()));
                            continue;
                        };
                        let c = claims.consumer;
                        {
                            let mut a = acked.lock().unwrap();
                            a.consumers.push((c.clone(), format!("prealloc={value}")));
                            if killed.load(Ordering::SeqCst) {
                                a.after_kill += 1;
                            }
                        }
                        // m2 gets a copy, reported to any instance but the one to be killed.
                        m2.hold(c.as_str());
                        n += 1;
                        let url = urls.iter().filter(|u| **u != holder).nth(n % 2).unwrap();
                        let addr: std::net::SocketAddr =
                            url.trim_start_matches("http://").parse().unwrap();
                        let auth = format!("Bearer {token}");
                        let body = r#"{"manager":"m2"}"#;
                        let rep = Client::new(addr)
                            .send(
                                "POST",
                                &format!("/v1/consumers/{c}/replicas"),
                                &[
                                    ("authorization", auth.as_str()),
                                    ("content-type", "application/json"),
                                ],
                                body.as_bytes(),
                            )
                            .await;
                        if let Ok(rep) = rep {
                            if rep.status == 200 {
                                acked.lock().unwrap().replicas.push((c, "m2".into()));
                            }
                        }
                    }
                })
            })
            .collect();
        let count = || acked.lock().unwrap().consumers.len();
        let deadline = Instant::now() + Duration::from_secs(20);
        while count() < 40 {
            assert!(
                Instant::now() < deadline,
                "sign-ups through Envoy did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack.more_cps[0].kill9();
        killed.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().after_kill < 40 {
            assert!(
                Instant::now() < deadline,
                "sign-ups did not carry on through the other control planes:\n{}",
                stack.cp.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        let a = std::mem::take(&mut *acked.lock().unwrap());
        assert!(a.other.is_empty(), "unexpected answers: {:?}", a.other);
        println!(
            "[shared] {} sign-ups acknowledged ({} after the kill), {} replica reports",
            a.consumers.len(),
            a.after_kill,
            a.replicas.len()
        );
        // Every acknowledged sign-up and copy is on the survivors.
        let survivor = &stack.more_cps[1];
        for (c, _) in &a.consumers {
            let v = survivor.consumer(c).await;
            assert_eq!(v["consumer"], c.as_str(), "{v}");
        }
        for (c, m) in &a.replicas {
            let v = survivor.consumer(c).await;
            let held: Vec<&str> = v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r["manager"].as_str())
                .collect();
            assert!(
                held.contains(&m.as_str()),
                "{c}: acknowledged copy on {m} lost: {v}"
            );
        }
        let doubled = pg
            .psql(
                "SELECT count(*) - count(DISTINCT consumer) FROM resources WHERE consumer IS NOT NULL",
            )
            .unwrap();
        assert_eq!(doubled, "0", "a consumer holds two resources");
        let twice = pg
            .psql("SELECT count(*) FROM (SELECT consumer FROM resources WHERE consumer IS NOT NULL GROUP BY consumer HAVING count(*) > 1) d")
            .unwrap();
        assert_eq!(twice, "0");
        // Requests with the consumers' cookies reach only managers holding their data.
        let mut client = Client::new(envoy);
        for (_, cookie) in a.consumers.iter().step_by(5) {
            let _ = send_requests(&mut client, cookie, 3).await;
        }
        stack.assert_no_violations();
    }
}

/// PostgreSQL restarted under two shared control planes: both refuse writes
/// meanwhile (503 with Retry-After), reconnect by themselves, catch up with
/// each other, and exactly one of them holds the duties again.
#[tokio::test]
async fn shared_control_planes_ride_out_a_postgres_restart() {
    use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec};
    let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = ControlPlaneConfig::new(vec![
        ManagerSpec::new("m1", "http://127.0.0.1:9"),
        ManagerSpec::new("m2", "http://127.0.0.1:9"),
    ]);
    cfg.postgres_url = Some(pg.url());
    cfg.postgres_shared = true;
    let cps = [ControlPlane::start(cfg.clone()), ControlPlane::start(cfg)];
    let body = serde_json::json!({"resource_type": "mailbox"});
    let signup = async |cp: &ControlPlane| cp.admin("POST", "/v1/registrations", Some(&body)).await;
    let on_duty =
        async |cp: &ControlPlane| cp.admin("GET", "/healthz", None).await.json()["duties"] == true;
    let eventually = async |what: &str, cp: &ControlPlane| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = signup(cp).await;
            if r.status == 201 {
                return r.json()["consumer"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut acked = vec![
        eventually("the first sign-up", &cps[0]).await,
        eventually("the first sign-up", &cps[1]).await,
    ];

    pg.stop_immediately().unwrap();
    for cp in &cps {
        let r = signup(cp).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    }
    pg.restart().unwrap();
    acked.push(eventually("sign-ups again after the restart", &cps[0]).await);
    acked.push(eventually("sign-ups again after the restart", &cps[1]).await);

    // Each knows every consumer acknowledged by either, before and after.
    for c in &acked {
        let c = prealloc_wire::ConsumerId::parse(c).unwrap();
        for cp in &cps {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = cp.admin("GET", &format!("/v1/consumers/{c}"), None).await;
                if r.status == 200 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{c} unknown: {} {}",
                    r.status,
                    r.text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (x, y) = (on_duty(&cps[0]).await, on_duty(&cps[1]).await);
        assert!(!(x && y), "both hold the duties");
        if x || y {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nobody holds the duties after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Active replication on two shared control planes: the one holding the
// duties copies; killed with -9 before the copies could land, the other
// takes the duties over and finishes them.
each_build! {
    #[tokio::test]
    async fn active_copies_resume_on_another_control_plane_when_the_duty_holder_dies(build) {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
        let mut opts = StackOptions::new(Replication::Active).with_build(build);
        opts.postgres_url = Some(pg.url());
        opts.control_planes = 2;
        let mut stack = Stack::start(&opts);
        for m in &stack.managers {
            m.set_accept_copies(false);
        }
        let mut client = Client::new(stack.envoys[0].addr());
        let su = stack
            .sign_up(&mut client, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The duty holder (the first started) tries, and is refused.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = stack.consumer(&su.consumer).await.unwrap();
        assert_eq!(v.state, "registering", "{v:?}");
        let duties = |cp: &prealloc_e2e::control_plane::ControlPlane| {
            let (_, body) =
                prealloc_e2e::client::blocking_get(cp.addr(), "/healthz", Duration::from_secs(2))
                    .unwrap();
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["duties"] == true
        };
        assert!(
            duties(&stack.more_cps[0]) && !duties(&stack.cp),
            "the first started holds the duties"
        );
        stack.more_cps[0].kill9();
        for m in &stack.managers {
            m.set_accept_copies(true);
        }
        let v = stack
            .wait_consumer(
                &su.consumer,
                "copied by the other control plane",
                Duration::from_secs(20),
                |v| v.state == "registered",
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", stack.cp.log_tail(30)));
        assert_eq!(v.replicas.len(), 3, "{v:?}");
        for m in &stack.managers {
            assert!(m.holds(su.consumer.as_str()), "{} holds no copy", m.name());
        }
        let mut client = Client::new(stack.envoys[0].addr());
        send_requests(&mut client, &su.cookie, 6).await.unwrap();
        stack.assert_no_violations();
    }
}
