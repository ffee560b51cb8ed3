//! A wasmtime proxy-wasm host that runs the real `prealloc_filter.wasm` the way Envoy does, for tests.
//!
//! Shaped like the Go SDK's `proxytest`: a [`Host`] is one emulated Envoy
//! process (one shared-data store for the `prealloc` vm_id, one stats store,
//! one clock, the outstanding http calls); it starts [`Vm`]s (a poller
//! singleton and filter workers share its shared data); a [`Vm`] opens
//! [`HttpStream`]s. Tests drive it ("request headers arrive", "tick", "answer
//! the pending call") and assert on state, never on the order of host calls.
//! Every test owns its `Host`, so tests run in parallel.
//!
//! A trap in the VM (a panic in the filter, an unemulated host call) panics
//! the driving call with the trap, the VM's last error logs and its stderr, so
//! it surfaces as a test failure with the message.

mod abi;
mod state;

pub use state::{Action, ForeignCall, HttpCall, LocalReply, LogLine};

use anyhow::{anyhow, Result};
use state::{lock, ContextState, MetricKind, Shared, SharedRef, VmData};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wasmtime::{Engine, Instance, Linker, Module, Store, WasmParams, WasmResults};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

/// Environment variable that overrides where the filter's `.wasm` is read from.
pub const WASM_ENV: &str = "PREALLOC_WASM";

/// Where `cargo build -p prealloc-filter-wasm --target wasm32-wasip1 --release` puts the filter.
pub fn default_wasm_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip1/release/prealloc_filter.wasm")
}

/// The filter's `.wasm` path: `$PREALLOC_WASM`, else [`default_wasm_path`].
pub fn wasm_path() -> PathBuf {
    std::env::var_os(WASM_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(default_wasm_path)
}

/// Where compiled modules are cached between test runs (inside cargo's target dir).
fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm-host-cache")
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        // Compiling the filter dominates a cold test run; the tests need
        // correct wasm code, not fast wasm code.
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        Engine::new(&config).unwrap_or_else(|e| panic!("cannot create the wasmtime engine: {e:?}"))
    })
}

/// Compiles each .wasm once per test process: compiling is the slow part, and
/// a `Module` is shared safely between the hosts of parallel tests.
fn module_for(path: &Path) -> Result<Module> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow!(
            "cannot read the filter's .wasm at {} ({e}). Build it with `cargo xtask test` \
             (or `cargo build -p prealloc-filter-wasm --target wasm32-wasip1 --release`), \
             or point ${WASM_ENV} at a built prealloc_filter.wasm",
            path.display()
        )
    })?;
    let module = cached_compile(&bytes)
        .map_err(|e| anyhow!("{} is not a valid wasm module: {e:?}", path.display()))?;
    modules.insert(path.to_owned(), module.clone());
    Ok(module)
}

/// Compiles `bytes` at most once across concurrent test processes (nextest
/// runs one process per test): the first process takes a lock file and
/// compiles, the others wait for its artifact, later runs load it.
fn cached_compile(bytes: &[u8]) -> wasmtime::Result<Module> {
    use sha2::{Digest, Sha256};
    use std::hash::{Hash, Hasher};
    let engine = engine();
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let digest = Sha256::new()
        .chain_update(bytes)
        .chain_update(compat.finish().to_le_bytes())
        .finalize();
    let key: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let dir = cache_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        return Module::new(engine, bytes);
    }
    let artifact = dir.join(format!("{key}.cwasm"));
    let lock = dir.join(format!("{key}.lock"));
    // A compile takes seconds; a lock older than this belongs to a dead process.
    let stale = Duration::from_secs(120);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if artifact.exists() {
            // SAFETY: the artifact was serialized by this same engine
            // configuration (its key includes the compatibility hash) from the
            // project's own build output; wasmtime also checks its header.
            match unsafe { Module::deserialize_file(engine, &artifact) } {
                Ok(m) => return Ok(m),
                Err(_) => {
                    let _ = std::fs::remove_file(&artifact);
                }
            }
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => {
                let result = Module::new(engine, bytes);
                if let Ok(m) = &result {
                    if let Ok(serialized) = m.serialize() {
                        // Written aside then renamed: a reader never sees half a file.
                        let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
                        if std::fs::write(&tmp, serialized).is_ok() {
                            let _ = std::fs::rename(&tmp, &artifact);
                        }
                    }
                }
                let _ = std::fs::remove_file(&lock);
                return result;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a > stale) {
                    let _ = std::fs::remove_file(&lock);
                }
                if std::time::Instant::now() > deadline {
                    return Module::new(engine, bytes);
                }
                // Polling the artifact with a deadline: the compiling process
                // offers no other readiness signal.
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => return Module::new(engine, bytes),
        }
    }
}

/// The WASI clocks follow the host clock, so time set by a test is the time
/// the filter sees whichever clock API it uses.
struct HostClock(SharedRef);

impl HostWallClock for HostClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Duration::from_nanos(lock(&self.0).now_nanos)
    }
}

impl HostMonotonicClock for HostClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        lock(&self.0).now_nanos
    }
}

/// One emulated Envoy process.
pub struct Host {
    shared: SharedRef,
    module: Module,
    vms: Mutex<Vec<Arc<Mutex<VmInner>>>>,
}

impl Host {
    /// A host for the real filter ([`wasm_path`]). Panics with what to do when
    /// the `.wasm` is missing: a test never skips silently.
    pub fn new() -> Host {
        Host::try_new(&wasm_path()).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A host for the module at `path`.
    pub fn try_new(path: &Path) -> Result<Host> {
        Ok(Host::with_module(module_for(path)?))
    }

    /// A host for a module given as wasm text or binary (for the host's own tests).
    pub fn from_wat(wat: &str) -> Result<Host> {
        Ok(Host::with_module(Module::new(engine(), wat)?))
    }

    fn with_module(module: Module) -> Host {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Host {
            shared: Arc::new(Mutex::new(Shared::new(now))),
            module,
            vms: Mutex::new(Vec::new()),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Starts a VM (an instance of the module) with an empty VM configuration.
    pub fn new_vm(&self) -> Vm {
        self.new_vm_with_config(b"")
    }

    /// Starts a VM whose `vm_config.configuration` is `vm_config`.
    pub fn new_vm_with_config(&self, vm_config: &[u8]) -> Vm {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        let index = vms.len();
        let inner = VmInner::start(&self.module, self.shared.clone(), index, vm_config)
            .unwrap_or_else(|e| panic!("cannot start VM {index}: {e:#}"));
        let inner = Arc::new(Mutex::new(inner));
        vms.push(inner.clone());
        Vm { index, inner }
    }

    fn vm_inner(&self, index: usize) -> Arc<Mutex<VmInner>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())[index].clone()
    }

    /// Fires the VM's root-context timer once, advancing the clock by its tick
    /// period first (as time passes between Envoy's ticks). Panics if the
    /// plugin never asked for ticks.
    pub fn tick(&self, vm: &Vm) {
        let mut inner = vm.lock();
        let root = inner.root_id();
        let period = inner.store.data().contexts[&root].tick_period_ms;
        assert!(
            period > 0,
            "VM {} never called proxy_set_tick_period_milliseconds, so Envoy would not tick it",
            vm.index
        );
        self.advance_time(Duration::from_millis(u64::from(period)));
        inner.call::<i32, ()>(root, "proxy_on_tick", root as i32);
    }

    /// Moves the clock forward (host time and the WASI clocks).
    pub fn advance_time(&self, by: Duration) {
        self.shared().now_nanos += by.as_nanos() as u64;
    }

    /// Sets the clock.
    pub fn set_time(&self, at: SystemTime) {
        self.shared().now_nanos = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }

    /// The clock.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.shared().now_nanos)
    }

    /// The clock, in unix seconds.
    pub fn now_unix_s(&self) -> u64 {
        self.shared().now_nanos / 1_000_000_000
    }

    /// The http calls dispatched and not answered yet, oldest first.
    pub fn pending_http_calls(&self) -> Vec<HttpCall> {
        self.shared().pending_calls.values().cloned().collect()
    }

    /// Answers a pending http call: the VM's `proxy_on_http_call_response` runs
    /// with `:status` and `headers` as response headers and `body`.
    pub fn answer_http_call(&self, token: u32, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut all = vec![(":status".to_owned(), status.to_string().into_bytes())];
        all.extend(own(&as_bytes(headers)));
        self.deliver_call(token, all, body.to_vec());
    }

    /// Fails a pending http call (reset, timeout, no healthy upstream): Envoy
    /// then calls back with no headers and no body.
    pub fn fail_http_call(&self, token: u32) {
        self.deliver_call_response(token, Vec::new(), Vec::new(), true);
    }

    fn deliver_call(&self, token: u32, headers: Vec<state::Header>, body: Vec<u8>) {
        self.deliver_call_response(token, headers, body, false);
    }

    fn deliver_call_response(
        &self,
        token: u32,
        headers: Vec<state::Header>,
        body: Vec<u8>,
        no_response: bool,
    ) {
        let call = {
            let mut shared = self.shared();
            let pending: Vec<u32> = shared.pending_calls.keys().copied().collect();
            shared.pending_calls.remove(&token).unwrap_or_else(|| {
                panic!("no pending http call has token {token}; pending tokens: {pending:?}")
            })
        };
        let inner = self.vm_inner(call.vm);
        let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        let (n_headers, n_body) = (headers.len() as i32, body.len() as i32);
        let mut response = abi::call_response(headers, body);
        response.no_response = no_response;
        inner.store.data_mut().call_response = Some(response);
        inner.call::<(i32, i32, i32, i32, i32), ()>(
            call.context_id,
            "proxy_on_http_call_response",
            (call.context_id as i32, token as i32, n_headers, n_body, 0),
        );
        inner.store.data_mut().call_response = None;
    }

    /// Makes `cluster` unknown to this "Envoy": `proxy_http_call` to it
    /// answers BadArgument, as Envoy does for a cluster it does not have.
    pub fn remove_cluster(&self, cluster: &str) {
        self.shared().unknown_clusters.push(cluster.to_owned());
    }

    /// The value under `key` in shared data, `None` if never set.
    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        self.shared().shared_data.get(key).map(|(v, _)| v.clone())
    }

    /// The value under `key` as text (lossy), `None` if never set.
    pub fn shared_data_str(&self, key: &str) -> Option<String> {
        self.shared_data(key)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Writes shared data as another VM of the same vm_id would.
    pub fn set_shared_data(&self, key: &str, value: &[u8]) {
        self.shared().set_shared(key, value.to_vec(), 0);
    }

    /// Every successful shared-data write so far (by VMs and tests), oldest first.
    pub fn shared_data_writes(&self) -> Vec<(String, Vec<u8>)> {
        self.shared().shared_writes.clone()
    }

    /// Every shared-data key that starts with `prefix`, sorted.
    pub fn shared_data_keys(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .shared()
            .shared_data
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// A counter's value. Panics naming the defined metrics if no VM defined
    /// `name`, so a misspelt name cannot pass as "0".
    pub fn counter(&self, name: &str) -> u64 {
        self.metric(name, MetricKind::Counter)
    }

    /// A gauge's value; panics like [`Host::counter`].
    pub fn gauge(&self, name: &str) -> u64 {
        self.metric(name, MetricKind::Gauge)
    }

    fn metric(&self, name: &str, kind: MetricKind) -> u64 {
        let shared = self.shared();
        match shared.metrics.iter().find(|m| m.name == name) {
            Some(m) if m.kind == kind => m.value,
            Some(m) => panic!("metric {name:?} is a {:?}, not a {kind:?}", m.kind),
            None => panic!(
                "no VM defined metric {name:?}; defined: {:?}",
                shared.metrics.iter().map(|m| &m.name).collect::<Vec<_>>()
            ),
        }
    }

    /// Every counter and gauge by name.
    pub fn metrics(&self) -> BTreeMap<String, u64> {
        self.shared()
            .metrics
            .iter()
            .filter(|m| m.kind != MetricKind::Histogram)
            .map(|m| (m.name.clone(), m.value))
            .collect()
    }

    /// Every log line every VM wrote so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.shared().logs.clone()
    }

    /// Makes `proxy_get_property(path)` answer `value` (otherwise NotFound).
    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        let path = path.iter().map(|p| (*p).to_owned()).collect();
        self.shared().properties.insert(path, value.to_vec());
    }

    /// The level `proxy_get_log_level` answers (0 trace … 5 critical; default trace).
    pub fn set_log_level(&self, level: u32) {
        self.shared().log_level = level;
    }

    /// Whether log lines are also printed to stderr (default on; the test
    /// harness shows them only for failing tests).
    pub fn echo_logs(&self, on: bool) {
        self.shared().echo_logs = on;
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

struct VmInner {
    index: usize,
    store: Store<VmData>,
    instance: Instance,
    root: Option<u32>,
    trapped: Option<String>,
    stderr: MemoryOutputPipe,
    stdout: MemoryOutputPipe,
    /// Imports this host does not emulate (they trap when called).
    unemulated: Vec<String>,
}

impl VmInner {
    fn start(
        module: &Module,
        shared: SharedRef,
        index: usize,
        vm_config: &[u8],
    ) -> Result<VmInner> {
        let stderr = MemoryOutputPipe::new(1 << 20);
        let stdout = MemoryOutputPipe::new(1 << 20);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(HostClock(shared.clone()))
            .monotonic_clock(HostClock(shared.clone()))
            .build_p1();
        let data = VmData {
            wasi,
            shared,
            vm: index,
            effective: 0,
            contexts: HashMap::new(),
            vm_config: vm_config.to_vec(),
            vm_config_visible: false,
            plugin_config: None,
            call_response: None,
            host_calls: 0,
        };
        let mut store = Store::new(module.engine(), data);
        store.call_hook(|mut data, hook| {
            if matches!(hook, wasmtime::CallHook::CallingHost) {
                data.data_mut().host_calls += 1;
            }
            Ok(())
        });
        let mut linker: Linker<VmData> = Linker::new(module.engine());
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |d: &mut VmData| &mut d.wasi)?;
        abi::add_to_linker(&mut linker)?;
        let unemulated = abi::trap_unknown_imports(&mut linker, &mut store, module)?;
        let instance = linker.instantiate(&mut store, module)?;
        let mut vm = VmInner {
            index,
            store,
            instance,
            root: None,
            trapped: None,
            stderr,
            stdout,
            unemulated,
        };
        // The SDK's `main!` runs the filter's setup in the reactor's `_initialize`.
        for init in ["_initialize", "_start"] {
            if vm.instance.get_func(&mut vm.store, init).is_some() {
                vm.call::<(), ()>(0, init, ());
                break;
            }
        }
        Ok(vm)
    }

    fn root_id(&self) -> u32 {
        self.root.unwrap_or_else(|| {
            panic!(
                "VM {} has no plugin yet: call vm.configure_plugin(...) first",
                self.index
            )
        })
    }

    /// Calls an export with `context` effective; a trap panics with everything
    /// known about it, and poisons the VM (Envoy would not use it again either).
    fn call<P: WasmParams, R: WasmResults>(&mut self, context: u32, name: &str, params: P) -> R {
        if let Some(earlier) = &self.trapped {
            panic!(
                "VM {} cannot run {name}: it trapped earlier:\n{earlier}",
                self.index
            );
        }
        self.store.data_mut().effective = context;
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .unwrap_or_else(|e| {
                panic!("the module has no export {name} with the proxy-wasm 0.2.1 signature: {e:#}")
            });
        match func.call(&mut self.store, params) {
            Ok(r) => r,
            Err(e) => {
                let msg = self.trap_report(name, context, &e);
                self.trapped = Some(msg.clone());
                panic!("{msg}");
            }
        }
    }

    /// Like [`VmInner::call`], but a trap is returned instead of panicking.
    fn try_call<P: WasmParams, R: WasmResults>(
        &mut self,
        context: u32,
        name: &str,
        params: P,
    ) -> Result<R, String> {
        if let Some(earlier) = &self.trapped {
            return Err(format!("the VM trapped earlier:\n{earlier}"));
        }
        self.store.data_mut().effective = context;
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(|e| format!("no export {name} with that signature: {e:#}"))?;
        func.call(&mut self.store, params).map_err(|e| {
            let msg = self.trap_report(name, context, &e);
            self.trapped = Some(msg.clone());
            msg
        })
    }

    fn trap_report(&self, name: &str, context: u32, e: &wasmtime::Error) -> String {
        let logs: Vec<String> = lock(&self.store.data().shared)
            .logs
            .iter()
            .filter(|l| l.vm == self.index && l.level >= 3)
            .map(|l| format!("  [level {}] {}", l.level, l.message))
            .collect();
        let logs = &logs[logs.len().saturating_sub(10)..];
        format!(
            "VM {} trapped in {name} (context {context}): {e:?}\n\
             last warning/error logs of the VM:\n{}\nVM stderr:\n{}\nVM stdout:\n{}",
            self.index,
            logs.join("\n"),
            String::from_utf8_lossy(&self.stderr.contents()),
            String::from_utf8_lossy(&self.stdout.contents()),
        )
    }

    fn new_context(&mut self, root_id: u32) -> u32 {
        let id = lock(&self.store.data().shared).next_context_id();
        self.store.data_mut().contexts.insert(
            id,
            ContextState {
                root_id,
                ..ContextState::default()
            },
        );
        self.call::<(i32, i32), ()>(id, "proxy_on_context_create", (id as i32, root_id as i32));
        id
    }
}

/// One VM: an instance of the module with, once configured, one plugin (root context).
pub struct Vm {
    index: usize,
    inner: Arc<Mutex<VmInner>>,
}

impl Vm {
    fn lock(&self) -> MutexGuard<'_, VmInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This VM's index in its host (see [`HttpCall::vm`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Creates the plugin's root context on first use (with `proxy_on_vm_start`),
    /// then runs `proxy_on_configure` with `config` as plugin configuration.
    /// Returns what the plugin answered: false means Envoy refuses the config.
    pub fn configure_plugin(&self, config: &str) -> bool {
        let mut inner = self.lock();
        let root = match inner.root {
            Some(root) => root,
            None => {
                let root = inner.new_context(0);
                inner.root = Some(root);
                let size = inner.store.data().vm_config.len() as i32;
                inner.store.data_mut().vm_config_visible = true;
                let started =
                    inner.call::<(i32, i32), i32>(root, "proxy_on_vm_start", (root as i32, size));
                inner.store.data_mut().vm_config_visible = false;
                if started == 0 {
                    return false;
                }
                root
            }
        };
        inner.store.data_mut().plugin_config = Some(config.as_bytes().to_vec());
        let ok = inner.call::<(i32, i32), i32>(
            root,
            "proxy_on_configure",
            (root as i32, config.len() as i32),
        );
        inner.store.data_mut().plugin_config = None;
        ok != 0
    }

    /// The module's imports this host does not emulate, as `module::name`;
    /// calling one traps the VM with a message naming it.
    /// Host functions this VM has called so far (every proxy-wasm and WASI
    /// import counts; the difference around a request is its host-call cost).
    pub fn host_calls(&self) -> u64 {
        self.lock().store.data().host_calls
    }

    /// Calls a three-argument export (`proxy_on_request_headers` and its kin) as
    /// a host breaking the ABI would, e.g. for a context that was never created.
    /// A trap is returned, not panicked (and poisons the VM, as in Envoy).
    pub fn try_call_export(&self, name: &str, params: (i32, i32, i32)) -> Result<i32, String> {
        let mut inner = self.lock();
        let context = params.0 as u32;
        inner.try_call::<(i32, i32, i32), i32>(context, name, params)
    }

    pub fn unemulated_imports(&self) -> Vec<String> {
        self.lock().unemulated.clone()
    }

    /// The tick period the plugin asked for, in ms (0: no ticks).
    pub fn tick_period_ms(&self) -> u32 {
        let inner = self.lock();
        let root = inner.root_id();
        inner.store.data().contexts[&root].tick_period_ms
    }

    /// Foreign functions the root context called.
    pub fn root_foreign_calls(&self) -> Vec<ForeignCall> {
        let inner = self.lock();
        let root = inner.root_id();
        inner.store.data().contexts[&root].foreign_calls.clone()
    }

    /// Opens an HTTP stream (a request) on the configured plugin.
    pub fn new_http_stream(&self) -> HttpStream<'_> {
        let mut inner = self.lock();
        let root = inner.root_id();
        let id = inner.new_context(root);
        HttpStream {
            vm: self,
            id,
            request_action: None,
            finished: false,
        }
    }
}

/// One request/response through the filter.
pub struct HttpStream<'a> {
    vm: &'a Vm,
    id: u32,
    request_action: Option<Action>,
    finished: bool,
}

fn own(headers: &[(&str, &[u8])]) -> Vec<state::Header> {
    // Envoy's codecs hand filters lower-case header names.
    headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_vec()))
        .collect()
}

fn as_bytes<'h>(headers: &[(&'h str, &'h str)]) -> Vec<(&'h str, &'h [u8])> {
    headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect()
}

impl HttpStream<'_> {
    /// The stream's context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn with_context<T>(&self, f: impl FnOnce(&ContextState) -> T) -> T {
        let inner = self.vm.lock();
        f(&inner.store.data().contexts[&self.id])
    }

    /// The request headers arrive; returns the filter's action.
    pub fn request_headers(&mut self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        self.request_headers_bytes(&as_bytes(headers), end_of_stream)
    }

    /// Request headers whose values are arbitrary bytes (Envoy passes obs-text
    /// through), to check the filter never assumes UTF-8.
    pub fn request_headers_bytes(
        &mut self,
        headers: &[(&str, &[u8])],
        end_of_stream: bool,
    ) -> Action {
        let mut inner = self.vm.lock();
        let n = headers.len() as i32;
        inner
            .store
            .data_mut()
            .contexts
            .get_mut(&self.id)
            .expect("stream context exists")
            .request_headers = Some(own(headers));
        let raw = inner.call::<(i32, i32, i32), i32>(
            self.id,
            "proxy_on_request_headers",
            (self.id as i32, n, end_of_stream as i32),
        );
        let action = Action::from_raw(raw);
        self.request_action = Some(action);
        action
    }

    /// A chunk of the request body arrives (appended to what came before, as
    /// Envoy buffers a paused body); returns the filter's action.
    pub fn request_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Action {
        let mut inner = self.vm.lock();
        let ctx = inner
            .store
            .data_mut()
            .contexts
            .get_mut(&self.id)
            .expect("stream context exists");
        let body = ctx.request_body.get_or_insert_with(Vec::new);
        body.extend_from_slice(chunk);
        let size = body.len() as i32;
        let raw = inner.call::<(i32, i32, i32), i32>(
            self.id,
            "proxy_on_request_body",
            (self.id as i32, size, end_of_stream as i32),
        );
        Action::from_raw(raw)
    }

    /// The request body as it goes upstream.
    pub fn forwarded_request_body(&self) -> Vec<u8> {
        self.with_context(|c| c.request_body.clone().unwrap_or_default())
    }

    /// Whether the request went on upstream: it continued (or was resumed) and
    /// the filter neither replied locally nor reset it.
    pub fn is_forwarded(&self) -> bool {
        let action = self.request_action;
        self.with_context(|c| {
            c.local_reply.is_none()
                && !c.closed_request
                && (action == Some(Action::Continue) || c.resumed_request)
        })
    }

    /// The request headers as they go upstream. Panics if the request was not
    /// forwarded (local reply, paused, reset), saying which.
    pub fn forwarded_request_headers(&self) -> Vec<(String, String)> {
        let action = self.request_action;
        self.with_context(|c| {
            assert!(
                action.is_some(),
                "request headers never arrived on stream {}",
                self.id
            );
            if let Some(reply) = &c.local_reply {
                panic!("the request was not forwarded: the filter replied locally {reply:?}");
            }
            assert!(!c.closed_request, "the request was not forwarded: the filter reset it");
            assert!(
                action == Some(Action::Continue) || c.resumed_request,
                "the request was not forwarded: the filter paused it ({action:?}) and never resumed it"
            );
            state::lossy(c.request_headers.as_deref().unwrap_or_default())
        })
    }

    /// First value of a forwarded request header (see [`Self::forwarded_request_headers`]).
    pub fn forwarded_request_header(&self, name: &str) -> Option<String> {
        state::first_value(&self.forwarded_request_headers(), name).map(str::to_owned)
    }

    /// Every value of a forwarded request header, in order.
    pub fn forwarded_request_header_values(&self, name: &str) -> Vec<String> {
        self.forwarded_request_headers()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The response headers arrive from upstream; returns the filter's action.
    pub fn response_headers(&mut self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        let mut inner = self.vm.lock();
        let n = headers.len() as i32;
        inner
            .store
            .data_mut()
            .contexts
            .get_mut(&self.id)
            .expect("stream context exists")
            .response_headers = Some(own(&as_bytes(headers)));
        let raw = inner.call::<(i32, i32, i32), i32>(
            self.id,
            "proxy_on_response_headers",
            (self.id as i32, n, end_of_stream as i32),
        );
        Action::from_raw(raw)
    }

    /// The response headers as they go to the client (after the filter).
    pub fn forwarded_response_headers(&self) -> Vec<(String, String)> {
        self.with_context(|c| state::lossy(c.response_headers.as_deref().unwrap_or_default()))
    }

    /// Every value of a response header going to the client, in order.
    pub fn forwarded_response_header_values(&self, name: &str) -> Vec<String> {
        self.forwarded_response_headers()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The local reply the filter sent, if any.
    pub fn local_reply(&self) -> Option<LocalReply> {
        self.with_context(|c| c.local_reply.clone())
    }

    /// Whether the filter resumed the paused response (`proxy_continue_stream`).
    pub fn response_resumed(&self) -> bool {
        self.with_context(|c| c.resumed_response)
    }

    /// Whether the filter resumed the paused request (`proxy_continue_stream`).
    pub fn request_resumed(&self) -> bool {
        self.with_context(|c| c.resumed_request)
    }

    /// Foreign functions this stream called.
    pub fn foreign_calls(&self) -> Vec<ForeignCall> {
        self.with_context(|c| c.foreign_calls.clone())
    }

    /// Ends the stream as Envoy does: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish(mut self) {
        self.finish_inner();
    }

    fn finish_inner(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut inner = self.vm.lock();
        if inner.trapped.is_some() {
            return;
        }
        let id = self.id as i32;
        inner.call::<i32, i32>(self.id, "proxy_on_done", id);
        inner.call::<i32, ()>(self.id, "proxy_on_log", id);
        inner.call::<i32, ()>(self.id, "proxy_on_delete", id);
        inner.store.data_mut().contexts.remove(&self.id);
    }
}

impl Drop for HttpStream<'_> {
    fn drop(&mut self) {
        // Ending the stream can trap too; never panic while already unwinding.
        if !std::thread::panicking() {
            self.finish_inner();
        }
    }
}
