//! Test support: configs on fresh temp databases, in-process and socket calls, and
//! small hyper managers that implement the manager contract.
//!
//! Every test runs on either store: SQLite by default, PostgreSQL when
//! `PREALLOC_TEST_STORE=postgres` and `PREALLOC_TEST_PG_URL` names a server
//! (`cargo xtask test` starts a throwaway one and runs the suite both ways);
//! each [`Db`] is then a fresh database on that server.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prealloc_control_plane::store::{Faults, FaultyStore};
use prealloc_control_plane::{App, Config, ControlPlane};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ENVOY: &str = "envoy-test-token-0123456789";
pub const ADMIN: &str = "admin-test-token-0123456789";

/// What a test config contains.
pub struct Setup {
    /// (id, admin_url, capacity of `mailbox`, provision)
    pub managers: Vec<(String, String, u64, bool)>,
    pub target_depth: u64,
    pub mode: &'static str,
    pub target: &'static str,
    pub grace_ms: u64,
    pub change_log: usize,
    /// `push.page_entries`: most entries per snapshot page, changes per delta.
    pub page_entries: usize,
    pub extra: String,
    /// Bearer token the control plane sends to every manager.
    pub manager_token: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            managers: (1..=3)
                .map(|i| (format!("m{i}"), "http://127.0.0.1:9".to_owned(), 100, false))
                .collect(),
            target_depth: 10,
            mode: "reported",
            target: "\"all\"",
            grace_ms: 60_000,
            change_log: 1000,
            page_entries: 10_000,
            extra: String::new(),
            manager_token: None,
        }
    }
}

impl Setup {
    pub fn with_managers(urls: &[String]) -> Setup {
        Setup {
            managers: urls
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("m{}", i + 1), u.clone(), 100, false))
                .collect(),
            ..Setup::default()
        }
    }

    /// The config text on `db` (its store comes last: a `[store]` table).
    pub fn toml(&self, db: &Db) -> String {
        match &db.postgres {
            None => self.toml_at(&db.sqlite_path()),
            Some(pg) => format!(
                "{}[store]\nkind = \"postgres\"\nurl = \"{}\"\n",
                self.toml_without_store(),
                pg.url
            ),
        }
    }

    /// The config text on a SQLite file.
    pub fn toml_at(&self, sqlite: &Path) -> String {
        format!(
            "database = {:?}\n{}",
            sqlite.display().to_string(),
            self.toml_without_store()
        )
    }

    /// The config text without its store (`database` or `[store]`).
    pub fn toml_without_store(&self) -> String {
        let mut s = format!(
            "listen = \"127.0.0.1:0\"\ngrace_period_ms = {}\n{}\n\
             [tokens]\nenvoy = \"{ENVOY}\"\nadmin = \"{ADMIN}\"\n\
             [replication]\nmode = \"{}\"\ntarget = {}\nretry_min_ms = 20\nretry_max_ms = 200\ntimeout_ms = 1000\n\
             [provisioning]\nretry_min_ms = 10\nretry_max_ms = 50\ntimeout_ms = 300\nattempts = 3\n\
             [push]\nchange_log = {}\npage_entries = {}\n",
            self.grace_ms,
            self.extra,
            self.mode,
            self.target,
            self.change_log,
            self.page_entries
        );
        for (id, url, cap, provision) in &self.managers {
            s.push_str(&format!(
                "[[managers]]\nid = \"{id}\"\ncluster = \"manager_{id}\"\nlocation = \"eu\"\n\
                 admin_url = \"{url}\"\ncapacity = {{ mailbox = {cap} }}\nprovision = {provision}\n"
            ));
            if let Some(t) = &self.manager_token {
                s.push_str(&format!("token = \"{t}\"\n"));
            }
        }
        s.push_str(&format!(
            "[[pools]]\nresource_type = \"mailbox\"\nlocation = \"eu\"\ntarget_depth = {}\n",
            self.target_depth
        ));
        s
    }

    pub fn config(&self, db: &Db) -> Config {
        Config::parse(&self.toml(db), Path::new("/")).expect("test config is valid")
    }
}

/// A fresh database, and a temp directory for the test's files (the SQLite
/// database, config files); removed on drop.
pub struct Db {
    pub dir: tempfile::TempDir,
    /// Set when the suite runs on PostgreSQL.
    pub postgres: Option<PgDb>,
}

/// A database of its own on the suite's PostgreSQL server.
pub struct PgDb {
    /// The server's URL, as the runner gave it.
    server: String,
    pub name: String,
    /// This database's URL.
    pub url: String,
}

impl Db {
    /// A database on the suite's store.
    pub fn new() -> Db {
        let dir = tempfile::tempdir().expect("temp dir");
        let postgres = match std::env::var("PREALLOC_TEST_STORE").as_deref() {
            Ok("postgres") => Some(PgDb::create()),
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("PREALLOC_TEST_STORE={other:?}: expected sqlite or postgres"),
        };
        Db { dir, postgres }
    }

    /// A SQLite database whatever the suite's store (tests of SQLite itself).
    pub fn sqlite() -> Db {
        Db {
            dir: tempfile::tempdir().expect("temp dir"),
            postgres: None,
        }
    }

    /// The SQLite file (where it would be, on PostgreSQL).
    pub fn sqlite_path(&self) -> std::path::PathBuf {
        self.dir.path().join("prealloc.db")
    }

    /// The store as a config names it.
    pub fn store_config(&self) -> prealloc_control_plane::config::StoreConfig {
        Setup::default().config(self).store
    }
}

impl PgDb {
    /// A fresh database on the server `PREALLOC_TEST_PG_URL` names.
    pub fn create() -> PgDb {
        let server = std::env::var("PREALLOC_TEST_PG_URL").expect(
            "PREALLOC_TEST_STORE=postgres needs PREALLOC_TEST_PG_URL (a server's URL); \
             `cargo xtask test` starts one",
        );
        let name = format!("t_{:016x}", rand_u64());
        pg_admin(&server, &format!("CREATE DATABASE {name}"));
        // The server's URL with this database instead of its own.
        let (scheme, rest) = server
            .split_once("://")
            .expect("PREALLOC_TEST_PG_URL is a postgres:// URL");
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let url = format!("{scheme}://{authority}/{name}");
        PgDb { server, name, url }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // FORCE: a control plane a failed test left running holds connections.
        let _ = std::panic::catch_unwind(|| {
            pg_admin(
                &self.server,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            )
        });
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// Runs one statement on the server, from a thread of its own (tests call
/// this from inside their runtime).
pub fn pg_admin(server: &str, sql: &str) {
    let (server, sql) = (server.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {server}: {e}"));
            tokio::spawn(conn);
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
    })
    .join()
    .expect("PostgreSQL admin statement");
}

/// A control plane started in-process on a fresh database.
pub struct Plane {
    pub cp: Option<ControlPlane>,
    pub app: App,
    pub db: Db,
}

impl Plane {
    pub async fn start(setup: &Setup) -> Plane {
        let db = Db::new();
        Plane::start_on(setup, db).await
    }

    pub async fn start_on(setup: &Setup, db: Db) -> Plane {
        let config = setup.config(&db);
        Plane::start_with(config, db).await
    }

    /// Starts with a config a test adjusted (from [`Setup::config`] on `db`).
    pub async fn start_with(config: Config, db: Db) -> Plane {
        let cp = ControlPlane::start(config)
            .await
            .expect("control plane starts");
        let app = cp.app();
        Plane {
            cp: Some(cp),
            app,
            db,
        }
    }

    /// Starts on the suite's real database behind fault toggles.
    pub async fn start_faulty(setup: &Setup) -> (Plane, Arc<Faults>) {
        let db = Db::new();
        let inner =
            prealloc_control_plane::store::open(&db.store_config()).expect("database opens");
        let (store, faults) = FaultyStore::new(inner);
        let cp = ControlPlane::start_with_store(setup.config(&db), Box::new(store))
            .await
            .expect("control plane starts");
        let app = cp.app();
        let plane = Plane {
            cp: Some(cp),
            app,
            db,
        };
        (plane, faults)
    }

    /// Stops gracefully and hands back the database for a restart.
    pub async fn stop(mut self) -> Db {
        if let Some(cp) = self.cp.take() {
            cp.shutdown().await;
        }
        self.db
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, v) = self.call_full(method, path, token, body).await;
        (status, v)
    }

    pub async fn call_full(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, hyper::HeaderMap, Value) {
        let req = request(method, path, token, body);
        let resp = self.app.handle(req).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("in-memory body").to_bytes();
        (parts.status, parts.headers, parse(&bytes))
    }

    pub async fn register(&self) -> Value {
        let (s, v) = self
            .call(
                Method::POST,
                "/v1/registrations",
                Some(ENVOY),
                Some(serde_json::json!({"resource_type": "mailbox"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "registration answered {v}");
        v
    }

    pub async fn replica(&self, consumer: &str, manager: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            &format!("/v1/consumers/{consumer}/replicas"),
            Some(ADMIN),
            Some(serde_json::json!({ "manager": manager })),
        )
        .await
    }

    pub async fn consumer(&self, consumer: &str) -> (StatusCode, Value) {
        self.call(
            Method::GET,
            &format!("/v1/consumers/{consumer}"),
            Some(ADMIN),
            None,
        )
        .await
    }

    pub async fn routes(&self, query: &str) -> Value {
        let (s, v) = self
            .call(
                Method::GET,
                &format!("/v1/routes?protocol=2&{query}"),
                Some(ENVOY),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "routes answered {v}");
        v
    }

    pub async fn pools(&self) -> Value {
        self.call(Method::GET, "/v1/pools", Some(ADMIN), None)
            .await
            .1
    }

    /// Waits until the pool reports `depth` ready resources.
    pub async fn wait_depth(&self, depth: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.pools().await;
            if p[0]["depth"].as_u64() == Some(depth) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pool never reached depth {depth}: {p}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A counter or gauge from `GET /metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let req = request(Method::GET, "/metrics", None, None);
        let resp = self.app.handle(req).await;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Polls the consumer record until `pred` holds.
    pub async fn wait_consumer(
        &self,
        consumer: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, v) = self.consumer(consumer).await;
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "consumer never {what}: {v}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn request(
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    b.body(Full::new(body)).expect("valid request")
}

pub fn parse(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
    }
}

/// One HTTP/1 call over a real socket.
pub async fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let mut req = request(method, path, token, body);
    *req.uri_mut() = format!("http://{addr}{path}").parse().expect("uri");
    let resp = client.request(req).await.expect("control plane answers");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, parse(&bytes))
}

pub fn ids(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    e.get("consumer")
                        .and_then(Value::as_str)
                        .or(e.as_str())
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A manager implementing the manager contract, recording what it was asked.
pub struct TestManager {
    pub url: String,
    pub state: Arc<ManagerState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct ManagerState {
    pub data: Mutex<HashMap<String, Bytes>>,
    pub provisioned: Mutex<Vec<u64>>,
    /// Requests still to fail with 500, per kind.
    pub fail_provision: AtomicU32,
    pub fail_put: AtomicU32,
    /// PUTs still to store the copy and then answer too late (after the
    /// control plane's timeout): the copy landed, the caller never heard.
    pub slow_puts: AtomicU32,
    /// Provisioning answers after this many ms.
    pub provision_delay_ms: AtomicU32,
    pub puts: AtomicU32,
    /// Data reads received (answered or 404).
    pub gets: AtomicU32,
    pub tokens_seen: Mutex<Vec<Option<String>>>,
}

fn take_one(a: &AtomicU32) -> bool {
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl TestManager {
    pub async fn start() -> TestManager {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(ManagerState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestManager { url, state, task }
    }

    /// What the sign-up does: the manager now holds the consumer's data.
    pub fn hold(&self, consumer: &str, data: &[u8]) {
        self.state
            .data
            .lock()
            .unwrap()
            .insert(consumer.to_owned(), Bytes::copy_from_slice(data));
    }

    pub fn held(&self, consumer: &str) -> Option<Bytes> {
        self.state.data.lock().unwrap().get(consumer).cloned()
    }
}

impl Drop for TestManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    st: Arc<ManagerState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    st.tokens_seen.lock().unwrap().push(
        req.headers()
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
    );
    let body = req.into_body().collect().await?.to_bytes();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let reply = |s: StatusCode, b: Bytes| {
        let mut r = Response::new(Full::new(b));
        *r.status_mut() = s;
        Ok(r)
    };
    match (method, segs.as_slice()) {
        (Method::POST, ["prealloc", "v1", "resources"]) => {
            let d = st.provision_delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d.into())).await;
            }
            if take_one(&st.fail_provision) {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::from_static(b"nope"),
                );
            }
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let id = v["id"].as_u64().unwrap_or(0);
            assert_eq!(
                v["name"].as_str(),
                Some(format!("{}-{id}", v["type"].as_str().unwrap_or("")).as_str())
            );
            st.provisioned.lock().unwrap().push(id);
            reply(StatusCode::CREATED, Bytes::new())
        }
        (Method::GET, ["prealloc", "v1", "consumers", id, "data"]) => {
            st.gets.fetch_add(1, Ordering::SeqCst);
            let held = st.data.lock().unwrap().get(*id).cloned();
            match held {
                Some(d) => reply(StatusCode::OK, d),
                None => reply(StatusCode::NOT_FOUND, Bytes::new()),
            }
        }
        (Method::PUT, ["prealloc", "v1", "consumers", id, "data"]) => {
            if take_one(&st.fail_put) {
                return reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
            }
            st.puts.fetch_add(1, Ordering::SeqCst);
            st.data.lock().unwrap().insert((*id).to_owned(), body);
            if take_one(&st.slow_puts) {
                // Longer than the test config's replication.timeout_ms (1000).
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            reply(StatusCode::NO_CONTENT, Bytes::new())
        }
        _ => reply(StatusCode::NOT_FOUND, Bytes::new()),
    }
}
