//! Self-tests of the harness pieces that need no Envoy: the recording managers.

use prealloc_e2e::client::Client;
use prealloc_e2e::manager::{assert_no_violations, DefaultBackend, RequestKind, TestManager};

const ALICE: &str = "AAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn manager_records_whether_it_held_the_consumer() {
    let m = TestManager::start("m1");
    let mut c = Client::new(m.addr());

    let before = c.get("/inbox", &[("x-prealloc-consumer", ALICE)]).await;
    assert_eq!(before.status, 404, "not held yet: user not found");
    assert_eq!(before.json()["manager"], "m1");
    assert_eq!(m.violations().len(), 1);

    m.hold(ALICE);
    let after = c.get("/inbox", &[("x-prealloc-consumer", ALICE)]).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.json()["held"], true);
    assert_eq!(after.served_by().as_deref(), Some("m1"));

    let anon = c.get("/", &[]).await;
    assert_eq!(anon.status, 200);
    assert_eq!(m.count(RequestKind::Anonymous), 1);
    assert_eq!(m.requests_of(ALICE).len(), 2);
    assert_eq!(
        m.violations().len(),
        1,
        "anonymous requests are never violations"
    );
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_no_violations([&m])));
    assert!(
        caught.is_err(),
        "assert_no_violations must fail on a violation"
    );
}

#[tokio::test]
async fn manager_accepts_or_refuses_signups() {
    let m = TestManager::start("m1");
    let mut c = Client::new(m.addr());
    let signup = |c: &'static str| {
        [
            ("x-prealloc-consumer", c),
            ("x-prealloc-resource", "mailbox-1"),
            ("x-prealloc-resource-type", "mailbox"),
        ]
    };
    let r = c
        .send("POST", "/signup", &signup(ALICE), b"{}")
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert!(m.holds(ALICE));

    const BOB: &str = "BBBBBBBBBBBBBBBBBBBBBA";
    m.refuse_signups();
    let r = c
        .send("POST", "/signup", &signup(BOB), b"{}")
        .await
        .unwrap();
    assert_eq!(r.status, 409);
    assert!(!m.holds(BOB));
    let signups = m.signups();
    assert_eq!(signups.len(), 2);
    assert!(signups[0].accepted && !signups[1].accepted);
    assert_eq!(signups[0].resource, "mailbox-1");
    assert_no_violations([&m]);
}

#[tokio::test]
async fn manager_replication_endpoints_copy_the_data() {
    let m1 = TestManager::start("m1");
    let m2 = TestManager::start("m2");
    m2.require_token("secret");
    m1.hold(ALICE);
    let path = format!("/prealloc/v1/consumers/{ALICE}/data");

    let got = Client::new(m1.addr()).get(&path, &[]).await;
    assert_eq!(got.status, 200);
    let mut c2 = Client::new(m2.addr());
    let denied = c2.send("PUT", &path, &[], &got.body).await.unwrap();
    assert_eq!(denied.status, 401);
    assert!(!m2.holds(ALICE));
    let put = c2
        .send(
            "PUT",
            &path,
            &[("authorization", "Bearer secret")],
            &got.body,
        )
        .await
        .unwrap();
    assert_eq!(put.status, 204);
    assert_eq!(m2.data(ALICE), m1.data(ALICE));
    let missing = Client::new(m1.addr())
        .get("/prealloc/v1/consumers/BBBBBBBBBBBBBBBBBBBBBA/data", &[])
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(m1.count(RequestKind::Replication), 2);
    assert_no_violations([&m1, &m2]);
}

#[tokio::test]
async fn manager_provisioning_is_idempotent_on_id() {
    let m = TestManager::start("m1");
    let mut c = Client::new(m.addr());
    let body = br#"{"id":42,"type":"mailbox","name":"mailbox-42"}"#;
    for _ in 0..2 {
        let r = c
            .send("POST", "/prealloc/v1/resources", &[], body)
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    }
    assert_eq!(m.provisioned().len(), 1);
    assert_eq!(m.provisioned()[0].name, "mailbox-42");
    let bad = c
        .send("POST", "/prealloc/v1/resources", &[], b"nope")
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn default_backend_counts_consumer_requests_as_violations() {
    let d = DefaultBackend::start();
    let mut c = Client::new(d.addr());
    assert_eq!(c.get("/", &[]).await.json()["manager"], "default");
    c.get("/", &[("x-prealloc-consumer", ALICE)]).await;
    assert_eq!(d.violations().len(), 1);
}
