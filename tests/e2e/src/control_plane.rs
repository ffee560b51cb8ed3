//! Launcher for the real control plane binary: writes its TOML config, starts it on a free port, restarts it (kill -9).
//!
//! The config format is the control plane's (control-plane/README.md,
//! control-plane/examples/prealloc.toml). The database lives in the
//! launcher's temp dir, so a restart (after a kill -9) finds it again.

use crate::client::{blocking_get, Client, Response};
use crate::envoy::workspace_root;
use prealloc_wire::{Availability, ConsumerId};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The bearer token Envoys use in tests (same as the Envoy launcher's poller token).
pub const TEST_ENVOY_TOKEN: &str = crate::envoy::TEST_ENVOY_TOKEN;
/// The admin/manager bearer token in tests.
pub const TEST_ADMIN_TOKEN: &str = "prealloc-e2e-admin-token";

/// The control plane binary: `PREALLOC_CONTROL_PLANE`, else `<workspace>/target/debug/prealloc-control-plane`.
/// Panics naming the variable and `cargo xtask test` when it is missing.
pub fn control_plane_binary() -> PathBuf {
    crate::envoy::locate(
        "PREALLOC_CONTROL_PLANE",
        workspace_root().join("target/debug/prealloc-control-plane"),
        "the control plane binary",
    )
}

/// One `[[managers]]` entry.
#[derive(Debug, Clone)]
pub struct ManagerSpec {
    pub id: String,
    /// Envoy cluster; `manager_<id>` by convention.
    pub cluster: String,
    pub location: String,
    /// Base URL of the manager contract, e.g. [`crate::manager::TestManager::url`].
    pub admin_url: String,
    /// Resources per resource type.
    pub capacity: Vec<(String, u64)>,
    /// Ask the manager to provision each resource.
    pub provision: bool,
    /// Bearer token the control plane sends to the manager.
    pub token: Option<String>,
}

impl ManagerSpec {
    /// Manager `id` at `url`, cluster `manager_<id>`, location `local`, 1000 `mailbox`es.
    pub fn new(id: &str, url: &str) -> ManagerSpec {
        ManagerSpec {
            id: id.to_owned(),
            cluster: format!("manager_{id}"),
            location: "local".to_owned(),
            admin_url: url.to_owned(),
            capacity: vec![("mailbox".to_owned(), 1000)],
            provision: false,
            token: None,
        }
    }
}

/// Replication mode of the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Managers report copies (`POST /v1/consumers/{id}/replicas`).
    Reported,
    /// The control plane copies data through GET/PUT `/prealloc/v1/consumers/{id}/data`.
    Active,
}

/// Everything written to the control plane's TOML config.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    pub managers: Vec<ManagerSpec>,
    /// `(resource_type, location, target_depth)`.
    pub pools: Vec<(String, String, u64)>,
    pub replication: Replication,
    /// `None` = "all" managers of the location.
    pub replication_target: Option<usize>,
    pub grace_period_ms: u64,
    /// How long a registration waits for its confirmation (`None`: the control plane's default).
    pub registration_lease_ms: Option<u64>,
    /// More keys of the `[replication]` table (e.g. `retry_max_ms`).
    pub replication_extra: toml::Table,
    pub envoy_token: String,
    pub admin_token: String,
    /// Raw TOML appended at the end (e.g. a `[push]` or `[provisioning]` table) for anything not modelled here.
    pub extra_toml: String,
    /// `RUST_LOG` of the binary (`None`: `PREALLOC_CP_LOG`, else `info`).
    pub log_level: Option<String>,
    /// A PostgreSQL URL: the state lives there (`[store] kind = "postgres"`)
    /// instead of the SQLite file in the temp dir.
    pub postgres_url: Option<String>,
    /// With `postgres_url`: several control planes share the database (`store.shared`).
    pub postgres_shared: bool,
}

impl ControlPlaneConfig {
    /// Test defaults: one `mailbox` pool of depth 20 in `local`, reported replication to all, 60 s grace.
    pub fn new(managers: Vec<ManagerSpec>) -> ControlPlaneConfig {
        ControlPlaneConfig {
            managers,
            pools: vec![("mailbox".to_owned(), "local".to_owned(), 20)],
            replication: Replication::Reported,
            replication_target: None,
            grace_period_ms: 60_000,
            registration_lease_ms: None,
            replication_extra: toml::Table::new(),
            envoy_token: TEST_ENVOY_TOKEN.to_owned(),
            admin_token: TEST_ADMIN_TOKEN.to_owned(),
            extra_toml: String::new(),
            log_level: None,
            postgres_url: None,
            postgres_shared: false,
        }
    }

    /// The TOML file for `listen` and `database` (unless on PostgreSQL).
    pub fn to_toml(&self, listen: &str, database: &Path) -> String {
        use toml::Value;
        let s = |v: &str| Value::String(v.to_owned());
        let mut root = toml::Table::new();
        root.insert("listen".into(), s(listen));
        match &self.postgres_url {
            None => {
                root.insert("database".into(), s(&database.display().to_string()));
            }
            Some(url) => {
                let mut store = toml::Table::new();
                store.insert("kind".into(), s("postgres"));
                store.insert("url".into(), s(url));
                if self.postgres_shared {
                    store.insert("shared".into(), Value::Boolean(true));
                }
                root.insert("store".into(), Value::Table(store));
            }
        }
        root.insert(
            "grace_period_ms".into(),
            Value::Integer(self.grace_period_ms as i64),
        );
        if let Some(ms) = self.registration_lease_ms {
            root.insert("registration_lease_ms".into(), Value::Integer(ms as i64));
        }
        let mut tokens = toml::Table::new();
        tokens.insert("envoy".into(), s(&self.envoy_token));
        tokens.insert("admin".into(), s(&self.admin_token));
        root.insert("tokens".into(), Value::Table(tokens));
        let mut repl = toml::Table::new();
        repl.insert(
            "mode".into(),
            s(match self.replication {
                Replication::Reported => "reported",
                Replication::Active => "active",
            }),
        );
        repl.insert(
            "target".into(),
            match self.replication_target {
                None => s("all"),
                Some(n) => Value::Integer(n as i64),
            },
        );
        for (k, v) in &self.replication_extra {
            repl.insert(k.clone(), v.clone());
        }
        root.insert("replication".into(), Value::Table(repl));
        let managers = self
            .managers
            .iter()
            .map(|m| {
                let mut t = toml::Table::new();
                t.insert("id".into(), s(&m.id));
                t.insert("cluster".into(), s(&m.cluster));
                t.insert("location".into(), s(&m.location));
                t.insert("admin_url".into(), s(&m.admin_url));
                let cap: toml::Table = m
                    .capacity
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::Integer(*v as i64)))
                    .collect();
                t.insert("capacity".into(), Value::Table(cap));
                t.insert("provision".into(), Value::Boolean(m.provision));
                if let Some(tok) = &m.token {
                    t.insert("token".into(), s(tok));
                }
                Value::Table(t)
            })
            .collect();
        root.insert("managers".into(), Value::Array(managers));
        let pools = self
            .pools
            .iter()
            .map(|(ty, loc, depth)| {
                let mut t = toml::Table::new();
                t.insert("resource_type".into(), s(ty));
                t.insert("location".into(), s(loc));
                t.insert("target_depth".into(), Value::Integer(*depth as i64));
                Value::Table(t)
            })
            .collect();
        root.insert("pools".into(), Value::Array(pools));
        let mut out = toml::to_string(&root).expect("control plane config serializes");
        if !self.extra_toml.is_empty() {
            out.push('\n');
            out.push_str(&self.extra_toml);
            out.push('\n');
        }
        out
    }
}

/// A running control plane; killed when dropped (its temp dir with config, database and log goes too).
pub struct ControlPlane {
    cfg: ControlPlaneConfig,
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    starts: u32,
    /// How long a (re)start may take before the harness gives up.
    start_timeout: Duration,
    keep_files: bool,
}

/// How long start-up may take (database open, first pre-allocation).
const START_TIMEOUT: Duration = Duration::from_secs(30);

impl ControlPlane {
    /// Writes the config (listen `127.0.0.1:0`, database in a temp dir) and starts the binary.
    pub fn start(cfg: ControlPlaneConfig) -> ControlPlane {
        Self::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Like [`ControlPlane::start`], listening on `listen` (port 0: a free one).
    pub fn start_on(cfg: ControlPlaneConfig, listen: SocketAddr) -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("prealloc-cp-")
            .tempdir()
            .expect("temp dir for the control plane");
        let mut cp = ControlPlane {
            cfg,
            child: None,
            addr: listen,
            dir,
            starts: 0,
            start_timeout: START_TIMEOUT,
            keep_files: std::env::var_os("PREALLOC_KEEP_LOGS").is_some(),
        };
        cp.launch();
        cp
    }

    fn launch(&mut self) {
        let bin = control_plane_binary();
        let listen = self.addr.to_string();
        let config_path = self.dir.path().join("prealloc.toml");
        std::fs::write(
            &config_path,
            self.cfg.to_toml(&listen, &self.database_path()),
        )
        .expect("write control plane config");
        let log_path = self.log_path();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("control plane log file");
        self.starts += 1;
        let _ = writeln!(log, "=== start #{} on {listen} ===", self.starts);
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                self.cfg.log_level.clone().unwrap_or_else(|| {
                    std::env::var("PREALLOC_CP_LOG").unwrap_or_else(|_| "info".into())
                }),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone().expect("log file handle")))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // The binary prints "listening on <addr>" on stdout once it serves; the rest of stdout goes to the log.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line
                    .strip_prefix("listening on ")
                    .and_then(|a| a.trim().parse().ok())
                {
                    let _ = tx.send(a);
                }
                let _ = writeln!(log, "{line}");
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + self.start_timeout;
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(a) => break a,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "control plane exited before listening:\n{}",
                        self.log_tail(40)
                    )
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "control plane exited during start-up ({status}):\n{}",
                    self.log_tail(40)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "control plane did not print 'listening on' within {:?}:\n{}",
                    self.start_timeout,
                    self.log_tail(40)
                );
            }
        };
        self.addr = addr;
        self.wait_healthy(deadline);
    }

    fn wait_healthy(&self, deadline: Instant) {
        let mut last: String;
        loop {
            match blocking_get(self.addr, "/healthz", Duration::from_secs(1)) {
                Ok((200, _)) => return,
                Ok((s, b)) => last = format!("{s} {b}"),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "control plane /healthz not ok ({last}):\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process with SIGKILL (no shutdown of any kind), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill -9, then start again on the same port with the same database.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// Lets later restarts take up to `d` (a big database takes long to load).
    pub fn set_start_timeout(&mut self, d: Duration) {
        self.start_timeout = d;
    }

    /// The process id while it runs (for memory sampling).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &ControlPlaneConfig {
        &self.cfg
    }

    /// Keeps the temp dir (config, database, log) when dropped, e.g. for the demo.
    pub fn keep_files_on_drop(&mut self) {
        self.keep_files = true;
    }

    /// The temp dir with the config, the database and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn database_path(&self) -> PathBuf {
        self.dir.path().join("prealloc.db")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("control-plane.log")
    }

    /// The last `lines` lines of the log (stderr and stdout of every start).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, body) = blocking_get(self.addr, "/metrics", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("control plane /metrics: {e}"));
        assert_eq!(
            status, 200,
            "control plane /metrics answered {status}: {body}"
        );
        body
    }

    /// Sends a request with the admin token.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Response {
        let auth = format!("Bearer {}", self.cfg.admin_token);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("authorization", auth.as_str())];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        Client::new(self.addr)
            .send(method, path, &headers, body.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{method} {path} to the control plane: {e}"))
    }

    /// Reports that `manager` durably holds a copy of the consumer's data (reported mode).
    pub async fn report_replica(&self, consumer: &ConsumerId, manager: &str) -> Response {
        self.admin(
            "POST",
            &format!("/v1/consumers/{consumer}/replicas"),
            Some(&serde_json::json!({ "manager": manager })),
        )
        .await
    }

    /// Sets a manager's availability.
    pub async fn set_availability(&self, manager: &str, availability: Availability) -> Response {
        self.admin(
            "PUT",
            &format!("/v1/managers/{manager}/availability"),
            Some(&serde_json::json!({ "availability": availability })),
        )
        .await
    }

    /// Waits until the control plane no longer knows `consumer` (given back
    /// or reclaimed), for at most 15 s.
    pub async fn wait_forgotten(&self, consumer: &ConsumerId) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let r = self
                .admin("GET", &format!("/v1/consumers/{consumer}"), None)
                .await;
            if r.status == 404 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{consumer} is still known (not given back or reclaimed): {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /v1/consumers/{id}` as JSON (panics unless 200).
    pub async fn consumer(&self, consumer: &ConsumerId) -> serde_json::Value {
        let r = self
            .admin("GET", &format!("/v1/consumers/{consumer}"), None)
            .await;
        assert_eq!(r.status, 200, "GET consumer {consumer}: {}", r.text());
        r.json()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
        if self.keep_files {
            eprintln!("control plane files kept in {}", self.dir.path().display());
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            let _ = dir.keep();
        }
    }
}
