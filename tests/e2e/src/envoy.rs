//! Launcher for the real Envoy binary with prealloc's config template, and readers for its admin endpoints.
//!
//! The configuration lives once, in `envoy/prealloc.yaml.tmpl`; [`EnvoyConfig::render`]
//! fills its placeholders (tests, the demo and the docker-compose example use it).
//! [`Envoy::start`] lets Envoy bind port 0 for both the listener and the admin
//! (it reports the admin address through `--admin-address-path`, the listener
//! through `/listeners`), so parallel tests never race for ports.

use crate::client::blocking_get;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The config template, compiled in so a test binary needs no working directory.
pub const TEMPLATE: &str = include_str!("../../../envoy/prealloc.yaml.tmpl");
const MANAGER_BEGIN: &str = "    # BEGIN manager cluster\n";
const MANAGER_END: &str = "    # END manager cluster\n";
const CONTROL_PLANE_BEGIN: &str = "              # BEGIN control plane endpoint\n";
const CONTROL_PLANE_END: &str = "              # END control plane endpoint\n";

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/e2e lies two levels below the workspace root")
        .to_path_buf()
}

/// The Envoy binary: `PREALLOC_ENVOY`, else `<workspace>/.tools/venv/bin/envoy`.
/// Panics naming the variable and `cargo xtask test` when it is missing.
pub fn envoy_binary() -> PathBuf {
    locate(
        "PREALLOC_ENVOY",
        workspace_root().join(".tools/venv/bin/envoy"),
        "Envoy 1.40",
    )
}

/// The filter: `PREALLOC_WASM`, else `<workspace>/target/wasm32-wasip1/release/prealloc_filter.wasm`.
/// Panics naming the variable and `cargo xtask test` when it is missing.
pub fn wasm_path() -> PathBuf {
    locate(
        "PREALLOC_WASM",
        workspace_root().join("target/wasm32-wasip1/release/prealloc_filter.wasm"),
        "the filter .wasm",
    )
}

/// The native module: `PREALLOC_NATIVE`, else `<workspace>/target/release/libprealloc_native.so`.
/// Panics naming the variable and `cargo xtask test` when it is missing.
pub fn native_path() -> PathBuf {
    locate(
        "PREALLOC_NATIVE",
        workspace_root().join("target/release/libprealloc_native.so"),
        "the native module libprealloc_native.so",
    )
}

/// Which build of the data plane an Envoy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Build {
    /// `prealloc_filter.wasm` (proxy-wasm, V8).
    Wasm,
    /// `libprealloc_native.so` (an Envoy dynamic module).
    Native,
}

impl Build {
    pub const ALL: [Build; 2] = [Build::Wasm, Build::Native];

    pub fn name(self) -> &'static str {
        match self {
            Build::Wasm => "wasm",
            Build::Native => "native",
        }
    }
}

impl std::str::FromStr for Build {
    type Err = String;
    fn from_str(s: &str) -> Result<Build, String> {
        match s {
            "wasm" => Ok(Build::Wasm),
            "native" => Ok(Build::Native),
            other => Err(format!("unknown build {other:?}: use wasm or native")),
        }
    }
}

/// Keeps the template's blocks of `build` (without their markers) and drops
/// the other build's.
pub fn select_build(template: &str, build: Build) -> String {
    let mut out = String::with_capacity(template.len());
    let mut skipping = false;
    for line in template.split_inclusive('\n') {
        let marker = line.trim();
        match marker
            .strip_prefix("# BEGIN ")
            .or(marker.strip_prefix("# END "))
        {
            Some(name) if Build::ALL.iter().any(|b| b.name() == name) => {
                skipping = marker.starts_with("# BEGIN") && name != build.name();
                continue;
            }
            _ => {}
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}

pub(crate) fn locate(var: &str, default: PathBuf, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    if !path.is_file() {
        panic!(
            "{what} not found at {}: set {var} to its path, or run `cargo xtask test`, \
             which installs and builds everything and sets {var}",
            path.display()
        );
    }
    path
}

/// Where a cluster's single endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl Endpoint {
    pub fn new(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.to_owned(),
            port,
        }
    }
}

/// Everything the template needs. Defaults suit a test: loopback, port 0.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    pub listen_address: String,
    /// 0 lets Envoy choose (read back with [`Envoy::addr`]).
    pub listen_port: u16,
    pub admin_address: String,
    pub admin_port: u16,
    pub wasm_path: PathBuf,
    /// Managers by id; each becomes cluster `manager_<id>`.
    pub managers: Vec<(String, Endpoint)>,
    pub default_backend: Endpoint,
    pub control_plane: Endpoint,
    /// More control planes on the same shared database: more endpoints of
    /// the `prealloc_control_plane` cluster.
    pub more_control_planes: Vec<Endpoint>,
    /// The filter's plugin configuration, without the `{"filter": ...}` wrapper.
    pub filter: Value,
    /// The poller's plugin configuration, without the `{"poller": ...}` wrapper.
    pub poller: Value,
    /// Header the route reads with `cluster_header`; must match the filter's `route_header`.
    pub route_header: String,
    /// Which build of the data plane runs.
    pub build: Build,
}

/// A cookie key for tests (at least 32 bytes, as the filter requires).
pub const TEST_COOKIE_KEY: &str = "prealloc-e2e-test-cookie-key-0123456789abcdef";
/// The bearer token the poller presents in tests.
pub const TEST_ENVOY_TOKEN: &str = "prealloc-e2e-envoy-token";

impl EnvoyConfig {
    /// A config with test defaults: the filter with [`TEST_COOKIE_KEY`] and a
    /// fast availability refresh, the poller with [`TEST_ENVOY_TOKEN`].
    pub fn new(
        managers: Vec<(String, Endpoint)>,
        default_backend: Endpoint,
        control_plane: Endpoint,
    ) -> EnvoyConfig {
        EnvoyConfig {
            listen_address: "127.0.0.1".into(),
            listen_port: 0,
            admin_address: "127.0.0.1".into(),
            admin_port: 0,
            wasm_path: PathBuf::new(),
            managers,
            default_backend,
            control_plane,
            more_control_planes: Vec::new(),
            filter: json!({
                "cookie": { "keys": [TEST_COOKIE_KEY], "secure": false },
                "availability_refresh_ms": 20,
            }),
            poller: json!({
                "cluster": "prealloc_control_plane",
                "authority": "prealloc-control-plane",
                "token": TEST_ENVOY_TOKEN,
                "wait_ms": 30000,
                "min_backoff_ms": 50,
                "max_backoff_ms": 1000,
            }),
            route_header: "x-prealloc-cluster".into(),
            build: Build::Wasm,
        }
    }

    /// The same config for another build.
    pub fn with_build(mut self, build: Build) -> EnvoyConfig {
        self.build = build;
        self
    }

    /// The rendered Envoy YAML.
    pub fn render(&self) -> String {
        render_template(TEMPLATE, self)
    }
}

/// Fills `template` (the format of `envoy/prealloc.yaml.tmpl`) from `cfg`.
/// Panics if a placeholder is left over, so template and renderer stay in step.
pub fn render_template(template: &str, cfg: &EnvoyConfig) -> String {
    let template = select_build(template, cfg.build);
    let (head, rest) = template
        .split_once(MANAGER_BEGIN)
        .expect("template has a '# BEGIN manager cluster' line");
    let (block, tail) = rest
        .split_once(MANAGER_END)
        .expect("template has a '# END manager cluster' line");
    let mut clusters = String::new();
    for (id, ep) in &cfg.managers {
        clusters.push_str(
            &block
                .replace("{{MANAGER_ID}}", id)
                .replace("{{MANAGER_HOST}}", &ep.host)
                .replace("{{MANAGER_PORT}}", &ep.port.to_string()),
        );
    }
    let tail = match tail.split_once(CONTROL_PLANE_BEGIN) {
        Some((before, rest)) => {
            let (endpoint, after) = rest
                .split_once(CONTROL_PLANE_END)
                .expect("template has a '# END control plane endpoint' line");
            let mut endpoints = endpoint.to_owned();
            for ep in &cfg.more_control_planes {
                endpoints.push_str(
                    &endpoint
                        .replace("{{CONTROL_PLANE_HOST}}", &ep.host)
                        .replace("{{CONTROL_PLANE_PORT}}", &ep.port.to_string()),
                );
            }
            format!("{before}{endpoints}{after}")
        }
        None => panic!("template has no '# BEGIN control plane endpoint' line"),
    };
    let filter = json!({ "filter": cfg.filter }).to_string();
    let poller = json!({ "poller": cfg.poller }).to_string();
    let out = format!("{head}{clusters}{tail}")
        .replace("{{ADMIN_ADDRESS}}", &cfg.admin_address)
        .replace("{{ADMIN_PORT}}", &cfg.admin_port.to_string())
        .replace("{{LISTEN_ADDRESS}}", &cfg.listen_address)
        .replace("{{LISTEN_PORT}}", &cfg.listen_port.to_string())
        .replace("{{WASM_PATH}}", &cfg.wasm_path.display().to_string())
        .replace("{{ROUTE_HEADER}}", &cfg.route_header)
        .replace("{{DEFAULT_HOST}}", &cfg.default_backend.host)
        .replace("{{DEFAULT_PORT}}", &cfg.default_backend.port.to_string())
        .replace("{{CONTROL_PLANE_HOST}}", &cfg.control_plane.host)
        .replace(
            "{{CONTROL_PLANE_PORT}}",
            &cfg.control_plane.port.to_string(),
        )
        // Compact JSON is one line, so it sits safely inside the YAML block scalar.
        .replace("{{FILTER_CONFIG}}", &filter)
        .replace("{{POLLER_CONFIG}}", &poller);
    if let Some(at) = out.find("{{") {
        let line = out[at..].lines().next().unwrap_or("");
        panic!("envoy template placeholder left unrendered: {line}");
    }
    out
}

/// The Envoy command for `cfg`'s build (the module search path for native) and
/// the rendered config with this machine's build paths.
fn command_for(cfg: &EnvoyConfig) -> (Command, String) {
    let mut cfg = cfg.clone();
    let mut cmd = Command::new(envoy_binary());
    match cfg.build {
        Build::Wasm if cfg.wasm_path.as_os_str().is_empty() => cfg.wasm_path = wasm_path(),
        Build::Wasm => {}
        Build::Native => {
            if let Some(dir) = native_path().parent() {
                cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir);
            }
        }
    }
    (cmd, cfg.render())
}

/// Runs `envoy --mode validate` on `cfg` (with this machine's build paths):
/// `Err` with Envoy's output when it refuses the config.
pub fn validate(cfg: &EnvoyConfig) -> Result<(), String> {
    let (_, yaml) = command_for(cfg);
    validate_yaml(&yaml, cfg.build)
}

/// `envoy --mode validate` on a whole YAML config of `build` (the native
/// build's module is found in this machine's build directory).
pub fn validate_yaml(yaml: &str, build: Build) -> Result<(), String> {
    let mut cmd = Command::new(envoy_binary());
    if build == Build::Native {
        if let Some(dir) = native_path().parent() {
            cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir);
        }
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let out = cmd
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "info",
            "-c",
        ])
        .arg(&path)
        .output()
        .map_err(|e| format!("cannot run Envoy: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Starts Envoy on `cfg` as a user would and waits for it to refuse the config
/// (exit at start-up): `Ok(log)` when it did within `timeout`, `Err` when it
/// kept running (it is stopped then).
pub fn refused_at_start(cfg: &EnvoyConfig, timeout: Duration) -> Result<String, String> {
    let (mut cmd, yaml) = command_for(cfg);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("envoy.yaml");
    let log = dir.path().join("envoy.log");
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let mut child = cmd
        .args(["--disable-hot-restart", "-l", "info", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&log).map_err(|e| e.to_string())?,
        ))
        .spawn()
        .map_err(|e| format!("cannot run Envoy: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return if status.success() {
                Err(format!("Envoy exited successfully:\n{text}"))
            } else {
                Ok(text)
            };
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "Envoy kept running with the config:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to run Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Worker threads (`--concurrency`); 1 makes the per-worker round-robin observable.
    pub concurrency: u32,
    /// `--log-level`.
    pub log_level: String,
    /// `--component-log-level` (e.g. `wasm:debug,dynamic_modules:debug`), if any.
    pub component_log_level: Option<String>,
    /// How long to wait for `/ready`.
    pub ready_timeout: Duration,
    /// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` (the native build's directory).
    pub dynamic_modules_dir: Option<PathBuf>,
    /// A command Envoy runs under (e.g. `valgrind --tool=callgrind`); empty: none.
    pub wrapper: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            concurrency: 1,
            log_level: std::env::var("PREALLOC_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            component_log_level: None,
            ready_timeout: Duration::from_secs(30),
            dynamic_modules_dir: None,
            wrapper: Vec::new(),
        }
    }
}

/// A running Envoy; killed when dropped (its temp dir with config and log goes too).
pub struct Envoy {
    child: Child,
    listener: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
    keep_files: bool,
}

impl Envoy {
    /// Renders `cfg` (filling in the .wasm path from [`wasm_path`] when empty) and starts Envoy.
    pub fn start(cfg: &EnvoyConfig, opts: &EnvoyOptions) -> Envoy {
        let mut cfg = cfg.clone();
        let mut opts = opts.clone();
        match cfg.build {
            Build::Wasm if cfg.wasm_path.as_os_str().is_empty() => cfg.wasm_path = wasm_path(),
            Build::Wasm => {}
            Build::Native => {
                let so = native_path();
                opts.dynamic_modules_dir = so.parent().map(Path::to_path_buf);
            }
        }
        Self::start_yaml(&cfg.render(), &opts)
    }

    /// Starts Envoy with an arbitrary YAML config. Its admin must listen on
    /// loopback and it must have exactly one listener.
    pub fn start_yaml(yaml: &str, opts: &EnvoyOptions) -> Envoy {
        let bin = envoy_binary();
        let dir = tempfile::Builder::new()
            .prefix("prealloc-envoy-")
            .tempdir()
            .expect("temp dir for Envoy");
        let config = dir.path().join("envoy.yaml");
        let log = dir.path().join("envoy.log");
        let admin_file = dir.path().join("admin-address");
        std::fs::write(&config, yaml).expect("write Envoy config");
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(dir) = &opts.dynamic_modules_dir {
            cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir);
        }
        let child = cmd
            .arg("--config-path")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--log-level", &opts.log_level])
            .args(
                opts.component_log_level
                    .iter()
                    .flat_map(|c| ["--component-log-level", c.as_str()]),
            )
            .args(["--concurrency", &opts.concurrency.to_string()])
            // Several Envoys run in parallel; hot restart would make them share memory.
            .arg("--disable-hot-restart")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Envoy logs to stderr unbuffered (a --log-path file is flushed only every
            // few seconds), so the log is complete when a test reads it.
            .stderr(Stdio::from(
                std::fs::File::create(&log).expect("Envoy log file"),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut envoy = Envoy {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            keep_files: std::env::var_os("PREALLOC_KEEP_LOGS").is_some(),
        };
        envoy.wait_ready(&admin_file, opts.ready_timeout);
        envoy
    }

    fn wait_ready(&mut self, admin_file: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("admin address not written yet");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Envoy exited during start-up ({status}):\n{}",
                    self.log_tail(60)
                );
            }
            if self.admin.port() == 0 {
                if let Some(addr) = std::fs::read_to_string(admin_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok())
                {
                    self.admin = addr;
                }
            }
            if self.admin.port() != 0 {
                match blocking_get(self.admin, "/ready", Duration::from_secs(1)) {
                    Ok((200, _)) => break,
                    Ok((status, body)) => {
                        last = format!("/ready answered {status}: {}", body.trim())
                    }
                    Err(e) => last = format!("/ready: {e}"),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "Envoy not ready after {timeout:?} ({last}); tail of its log:\n{}",
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.listener = self.read_listener_address();
    }

    fn read_listener_address(&self) -> SocketAddr {
        let (status, body) =
            blocking_get(self.admin, "/listeners?format=json", Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("admin /listeners: {e}"));
        assert_eq!(status, 200, "admin /listeners answered {status}: {body}");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("admin /listeners is not JSON ({e}): {body}"));
        let sock = &v["listener_statuses"][0]["local_address"]["socket_address"];
        let ip = sock["address"].as_str().unwrap_or("127.0.0.1");
        let port = sock["port_value"].as_u64().unwrap_or(0) as u16;
        assert!(port != 0, "no bound listener in admin /listeners: {body}");
        format!("{ip}:{port}").parse().expect("listener address")
    }

    /// The process id (for memory sampling).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The listener's address (where clients connect).
    pub fn addr(&self) -> SocketAddr {
        self.listener
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Keeps the temp dir (config and log) when dropped, e.g. for the demo.
    pub fn keep_files_on_drop(&mut self) {
        self.keep_files = true;
    }

    /// The temp dir with `envoy.yaml` and `envoy.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every counter and gauge from admin `/stats` by full name.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let (status, body) = blocking_get(self.admin, "/stats", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("admin /stats: {e}"));
        assert_eq!(status, 200, "admin /stats answered {status}");
        body.lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// A counter once it stopped moving: the wasm build sends its request
    /// counters on each worker's tick (every `availability_refresh_ms`: 20 ms in
    /// tests, 100 ms by default), so a read straight after a request may come
    /// before the flush. Two reads 250 ms apart (longer than a tick) agree.
    pub fn settled_stat(&self, name: &str) -> u64 {
        let mut last = self.stat(name);
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(250));
            let now = self.stat(name);
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    /// A stat by name: the exact name, or the one stat whose name ends with `.<name>`
    /// (Envoy prefixes wasm-defined metrics, e.g. `wasmcustom.`). 0 if absent,
    /// as Envoy only shows a counter once it has been defined.
    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.stats();
        if let Some(v) = stats.get(name) {
            return *v;
        }
        let suffix = format!(".{name}");
        let hits: Vec<_> = stats.iter().filter(|(k, _)| k.ends_with(&suffix)).collect();
        assert!(hits.len() <= 1, "stat name {name} is ambiguous: {hits:?}");
        hits.first().map(|(_, v)| **v).unwrap_or(0)
    }

    /// Every stat whose name contains `part` (e.g. `prealloc`), for reports and diagnostics.
    pub fn stats_matching(&self, part: &str) -> BTreeMap<String, u64> {
        self.stats()
            .into_iter()
            .filter(|(k, _)| k.contains(part))
            .collect()
    }

    /// Polls `stat(name)` until `pred` holds; panics with the prealloc stats and log tail at the deadline.
    pub fn wait_for_stat(&self, name: &str, timeout: Duration, pred: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.stat(name);
            if pred(v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "stat {name} = {v} did not reach the expected value within {timeout:?}; \
                     prealloc stats: {:?}\nlog tail:\n{}",
                    self.stats_matching("prealloc"),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `lines` lines of Envoy's log (and stderr), for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for file in ["envoy.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            if all.is_empty() {
                continue;
            }
            let _ = writeln!(out, "--- {file} ---");
            for l in &all[all.len().saturating_sub(lines)..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }

    /// The whole log, e.g. to look for a filter's log line.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_files {
            let kept = self.dir.path().to_path_buf();
            // Keep the directory for a post-mortem; the path is printed for the test output.
            eprintln!("Envoy files kept in {}", kept.display());
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            let _ = dir.keep();
        }
    }
}
