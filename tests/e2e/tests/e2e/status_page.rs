//! The status page in a real browser: headless Chromium (Debian's package)
//! against the real control plane with a real Envoy polling it. Sign-in with a
//! wrong token then the admin token, the figures of a known state, the page
//! following changes made through the API without a reload, a manager marked
//! down from the page, and a screenshot (`target/status-page-<build>.png`;
//! with `PREALLOC_BLESS=1` the native one also goes to `docs/status-page.png`,
//! the one the README shows). Once per build: the Envoy on the page polls with it.

use prealloc_e2e::browser::{save, Browser, Page};
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{Replication, TEST_ADMIN_TOKEN};
use prealloc_e2e::envoy::workspace_root;
use prealloc_e2e::story::{Stack, StackOptions, STEP_TIMEOUT};
use prealloc_wire::Availability;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The page must never be more than this far behind the control plane.
const LIVE: Duration = Duration::from_secs(2);

/// `innerText` of what `selector` picks (`null` when nothing does).
fn text_of(selector: &str) -> String {
    format!(
        "document.querySelector({})?.innerText ?? null",
        serde_json::to_string(selector).unwrap()
    )
}

/// Waits until the page shows `want` in `selector`, at most `within`.
async fn shows(page: &mut Page, selector: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let expr = format!(
        "({}) === {}",
        text_of(selector),
        serde_json::to_string(want).unwrap()
    );
    if let Err(e) = page.wait_for(&expr, within).await {
        let seen = page.eval(&text_of(selector)).await;
        panic!("{selector} should show {want:?} within {within:?}: {e}; it shows {seen:?}");
    }
    start.elapsed()
}

/// What `GET /v1/managers` says, as the page writes it: id → (availability, capacity text).
async fn managers_from_api(stack: &Stack) -> Vec<(String, String, String)> {
    let r = stack.cp.admin("GET", "/v1/managers", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v.as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|m| {
            let cap = m["capacity"]["mailbox"].clone();
            (
                m["id"].as_str().unwrap().to_owned(),
                m["availability"].as_str().unwrap().to_owned(),
                format!("mailbox: {} / {}", cap["free"], cap["capacity"]),
            )
        })
        .collect()
}

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_status_page_in_chromium_signs_in_follows_the_state_and_marks_a_manager_down(build) {
        let mut opts = StackOptions::new(Replication::Reported).with_build(build);
        opts.node_ids = vec![Some("edge-1".to_owned())];
        opts.pool_depth = 5;
        let stack = Stack::start(&opts);
        let mut client = Client::new(stack.envoys[0].addr());
        let s = stack
            .sign_up(&mut client, STEP_TIMEOUT)
            .await
            .expect("sign-up through Envoy");
        stack.wait_envoys_caught_up().expect("the Envoy polls");

        let browser = Browser::start().unwrap_or_else(|e| panic!("{e}"));
        let mut page = browser.page().await.unwrap_or_else(|e| panic!("{e}"));
        let status_url = format!("{}/status", stack.cp.url());

        // Not signed in: the form. A wrong token is refused with a visible message.
        page.navigate(&status_url).await.unwrap();
        assert_eq!(
            page.eval("document.querySelector('input[name=token]').type")
                .await
                .unwrap(),
            "password"
        );
        page.type_into("#token", "not-the-token").await.unwrap();
        page.forget_events();
        page.click("button[type=submit]").await.unwrap();
        page.wait_event("Page.loadEventFired").await.unwrap();
        let message = page.eval(&text_of("#message")).await.unwrap();
        assert!(
            message.as_str().unwrap_or("").contains("not valid"),
            "a wrong token is told so on the form: {message}"
        );
        let visible = page
            .eval("getComputedStyle(document.querySelector('#message')).display !== 'none'")
            .await
            .unwrap();
        assert_eq!(visible, true);

        // The admin token signs in: the page, with the session in an HttpOnly cookie.
        page.type_into("#token", TEST_ADMIN_TOKEN).await.unwrap();
        page.forget_events();
        page.click("button[type=submit]").await.unwrap();
        page.wait_event("Page.loadEventFired").await.unwrap();
        assert_eq!(page.eval("location.pathname").await.unwrap(), "/status");
        shows(&mut page, "#role", "signed in: admin", STEP_TIMEOUT).await;
        let cookies = page.eval("document.cookie").await.unwrap();
        assert!(
            !cookies.as_str().unwrap_or("").contains("prealloc_status"),
            "the session cookie is HttpOnly: scripts never see it ({cookies})"
        );
        // A marker that a reload would wipe.
        page.eval("window.notReloaded = true").await.unwrap();

        // The known state: one consumer, pinned (1 of 3 copies), three managers as
        // the API says, the pool, the Envoy by its node id at the current version.
        shows(&mut page, "#consumers", "1", STEP_TIMEOUT).await;
        shows(&mut page, "#registering", "1", LIVE).await;
        shows(&mut page, "#in-table", "1", LIVE).await;
        let row = format!("#recent tr[data-consumer='{}']", s.consumer);
        shows(
            &mut page,
            &format!("{row} td:nth-child(2)"),
            "registering",
            LIVE,
        )
        .await;
        shows(&mut page, &format!("{row} td:nth-child(3)"), &s.first, LIVE).await;
        shows(&mut page, &format!("{row} td:nth-child(4)"), "1 of 3", LIVE).await;
        let pool = "#pools tbody tr:first-child";
        shows(
            &mut page,
            &format!("{pool} td:nth-child(1)"),
            "mailbox",
            LIVE,
        )
        .await;
        shows(&mut page, &format!("{pool} td:nth-child(4)"), "5", LIVE).await;
        // Pre-allocation refills the pool the sign-up took from; the page follows.
        shows(
            &mut page,
            &format!("{pool} td:nth-child(3)"),
            "5",
            STEP_TIMEOUT,
        )
        .await;
        for (id, availability, capacity) in managers_from_api(&stack).await {
            let tr = format!("#managers tr[data-manager='{id}']");
            shows(
                &mut page,
                &format!("{tr} td:nth-child(3)"),
                &availability,
                LIVE,
            )
            .await;
            shows(&mut page, &format!("{tr} td:nth-child(4)"), &capacity, LIVE).await;
        }
        let version = stack.routes_version().expect("routes version").to_string();
        let poller = "#pollers tbody tr:first-child";
        shows(
            &mut page,
            &format!("{poller} td:nth-child(1)"),
            "edge-1",
            LIVE,
        )
        .await;
        shows(
            &mut page,
            &format!("{poller} td:nth-child(2)"),
            &version,
            LIVE,
        )
        .await;

        // Changes through the API reach the page without a reload, within LIVE.
        let second = stack
            .managers
            .iter()
            .map(|m| m.name().to_owned())
            .find(|m| *m != s.first)
            .unwrap();
        let r = stack.cp.report_replica(&s.consumer, &second).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let took = shows(&mut page, &format!("{row} td:nth-child(4)"), "2 of 3", LIVE).await;
        println!("a reported copy reached the page in {took:?}");
        let third = stack
            .managers
            .iter()
            .map(|m| m.name().to_owned())
            .find(|m| *m != s.first && *m != second)
            .unwrap();
        let r = stack
            .cp
            .set_availability(&third, Availability::Draining)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let tr = format!("#managers tr[data-manager='{third}']");
        let took = shows(
            &mut page,
            &format!("{tr} td:nth-child(3)"),
            "draining",
            LIVE,
        )
        .await;
        println!("an availability change reached the page in {took:?}");
        assert_eq!(
            page.eval("window.notReloaded === true").await.unwrap(),
            true,
            "no reload"
        );

        // The draining manager marked down from the page: the API and the page say so.
        page.click(&format!("{tr} button[data-availability=down]"))
            .await
            .unwrap();
        let deadline = Instant::now() + LIVE;
        loop {
            let now = managers_from_api(&stack).await;
            if now.iter().any(|(id, a, _)| *id == third && a == "down") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "GET /v1/managers after the click: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shows(&mut page, &format!("{tr} td:nth-child(3)"), "down", LIVE).await;
        assert_eq!(
            page.eval(&format!(
                "document.querySelector(\"{tr} button[data-availability=down]\").disabled"
            ))
            .await
            .unwrap(),
            true,
            "the current availability's button is disabled"
        );
        // The target no longer waits for the manager that is down: two copies, both held.
        shows(
            &mut page,
            &format!("{row} td:nth-child(2)"),
            "registered",
            LIVE,
        )
        .await;
        shows(&mut page, &format!("{row} td:nth-child(4)"), "2 of 2", LIVE).await;
        shows(&mut page, "#registering", "0", LIVE).await;
        assert!(page.eval(&text_of("#availability-error")).await.unwrap() == json!(""));

        let png = page.screenshot(1280).await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let name = format!("target/status-page-{}.png", build.name());
        save(&workspace_root().join(name), &png).unwrap();
        if std::env::var_os("PREALLOC_BLESS").is_some() && build == prealloc_e2e::envoy::Build::Native {
            save(&workspace_root().join("docs/status-page.png"), &png).unwrap();
        }
        stack.assert_no_violations();
    }
}
