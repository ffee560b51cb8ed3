//! The state a [`crate::Host`] shares between its VMs (shared data, metrics, clock, calls, logs) and each VM's own state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// Proxy-wasm ABI 0.2.1 status codes the host answers with.
pub(crate) mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const CAS_MISMATCH: i32 = 8;
}

/// What a stream or root context returned to the host from a header callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Continue: the headers go on to the next filter (the request is forwarded).
    Continue,
    /// Pause (StopIteration): the host waits for `proxy_continue_stream` or a local reply.
    Pause,
    /// Any other value (Envoy-specific actions); tests should not see these.
    Other(i32),
}

impl Action {
    pub(crate) fn from_raw(raw: i32) -> Action {
        match raw {
            0 => Action::Continue,
            1 => Action::Pause,
            other => Action::Other(other),
        }
    }
}

/// A local reply sent by the filter with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub details: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub grpc_status: i32,
}

impl LocalReply {
    /// First value of header `name` (case-insensitive), like Envoy's lookup.
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }
}

/// One `proxy_call_foreign_function` the VM made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCall {
    pub context_id: u32,
    pub name: String,
    pub arguments: Vec<u8>,
}

/// One `proxy_http_call` the VM dispatched and the test has not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// The token the VM got back; pass it to `Host::answer_http_call`.
    pub token: u32,
    /// Which VM made the call (index in the host).
    pub vm: usize,
    /// The context that was effective when the call was dispatched.
    pub context_id: u32,
    /// The Envoy cluster the call goes to.
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    pub timeout_ms: u32,
}

impl HttpCall {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }

    /// The `:path` pseudo-header.
    pub fn path(&self) -> &str {
        self.header(":path").unwrap_or("")
    }
}

/// One `proxy_log` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub vm: usize,
    pub context_id: u32,
    /// 0 trace … 5 critical.
    pub level: u32,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
pub(crate) struct Metric {
    pub name: String,
    pub kind: MetricKind,
    pub value: u64,
    pub samples: Vec<u64>,
}

/// Everything the VMs of one host share, like one Envoy process: shared data of
/// one vm_id, the stats store, the clock, outstanding http calls, logs.
#[derive(Debug)]
pub(crate) struct Shared {
    pub shared_data: HashMap<String, (Vec<u8>, u32)>,
    /// Every successful write, in order (the poller's write order is part of its contract).
    pub shared_writes: Vec<(String, Vec<u8>)>,
    pub last_cas: u32,
    /// Metric id - 1 indexes this vector.
    pub metrics: Vec<Metric>,
    pub now_nanos: u64,
    pub pending_calls: BTreeMap<u32, HttpCall>,
    pub last_token: u32,
    pub logs: Vec<LogLine>,
    pub properties: HashMap<Vec<String>, Vec<u8>>,
    pub log_level: u32,
    pub last_context_id: u32,
    /// Clusters this "Envoy" does not have: http calls to them are refused.
    pub unknown_clusters: Vec<String>,
    /// Print every log line to stderr as it happens (the test harness shows it on failure).
    pub echo_logs: bool,
}

impl Shared {
    pub fn new(now_nanos: u64) -> Self {
        Shared {
            shared_data: HashMap::new(),
            shared_writes: Vec::new(),
            last_cas: 0,
            metrics: Vec::new(),
            now_nanos,
            pending_calls: BTreeMap::new(),
            last_token: 0,
            logs: Vec::new(),
            properties: HashMap::new(),
            log_level: 0,
            last_context_id: 0,
            unknown_clusters: Vec::new(),
            echo_logs: true,
        }
    }

    /// Envoy's CAS counter: never 0 (0 means "no CAS" on the ABI).
    pub fn next_cas(&mut self) -> u32 {
        self.last_cas = self.last_cas.wrapping_add(1);
        if self.last_cas == 0 {
            self.last_cas = 1;
        }
        self.last_cas
    }

    /// Envoy's SharedData::set: a missing key is created whatever the CAS; an
    /// existing key is replaced only when `cas` is 0 or matches.
    pub fn set_shared(&mut self, key: &str, value: Vec<u8>, cas: u32) -> i32 {
        if let Some((_, current)) = self.shared_data.get(key) {
            if cas != 0 && cas != *current {
                return status::CAS_MISMATCH;
            }
        }
        let next = self.next_cas();
        self.shared_writes.push((key.to_owned(), value.clone()));
        self.shared_data.insert(key.to_owned(), (value, next));
        status::OK
    }

    pub fn next_context_id(&mut self) -> u32 {
        self.last_context_id += 1;
        self.last_context_id
    }
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

/// Locks the shared state; a poisoned lock only means another test thread
/// panicked while holding it, and the data is still usable for reporting.
pub(crate) fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-context state of one VM: header maps and what the filter did to the stream.
#[derive(Debug, Default)]
pub(crate) struct ContextState {
    pub root_id: u32,
    pub request_headers: Option<Vec<Header>>,
    pub response_headers: Option<Vec<Header>>,
    /// The request body received so far (buffered, as Envoy does while a filter pauses it).
    pub request_body: Option<Vec<u8>>,
    pub local_reply: Option<LocalReply>,
    pub resumed_request: bool,
    pub resumed_response: bool,
    pub closed_request: bool,
    pub closed_response: bool,
    pub foreign_calls: Vec<ForeignCall>,
    /// Set by `proxy_set_tick_period_milliseconds` on a root context.
    pub tick_period_ms: u32,
    pub done_called: bool,
}

/// The response of an http call while its callback runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallResponse {
    /// The call failed (connection failure, timeout, reset): Envoy then has no
    /// response header map at all.
    pub no_response: bool,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
    pub trailers: Vec<Header>,
}

/// The wasmtime store data of one VM.
pub(crate) struct VmData {
    pub wasi: wasmtime_wasi::p1::WasiP1Ctx,
    pub shared: SharedRef,
    pub vm: usize,
    pub effective: u32,
    pub contexts: HashMap<u32, ContextState>,
    pub vm_config: Vec<u8>,
    /// Only readable while on_vm_start runs, as in Envoy.
    pub vm_config_visible: bool,
    /// Only readable while on_configure runs, as in Envoy.
    pub plugin_config: Option<Vec<u8>>,
    pub call_response: Option<CallResponse>,
    /// Host functions the VM called (proxy-wasm and WASI imports alike).
    pub host_calls: u64,
}

/// A header as Envoy holds it: a lower-case name and a value of arbitrary bytes.
pub(crate) type Header = (String, Vec<u8>);

pub(crate) fn first_value<'a>(map: &'a [(String, String)], name: &str) -> Option<&'a str> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(crate) fn first_value_bytes<'a>(map: &'a [Header], name: &str) -> Option<&'a [u8]> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Header values as text, for assertions (non-UTF-8 bytes replaced).
pub(crate) fn lossy(map: &[Header]) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// Proxy-wasm map encoding: u32 count, then (u32 key len, u32 value len) per
/// pair, then each key and value followed by a NUL byte.
pub(crate) fn serialize_map(map: &[Header]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Decodes the proxy-wasm map encoding; `None` when the bytes are not a valid map.
pub(crate) fn deserialize_map(bytes: &[u8]) -> Option<Vec<Header>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut map = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let klen = word(4 + i * 8)?;
        let vlen = word(8 + i * 8)?;
        let key = bytes.get(data..data + klen)?;
        data += klen + 1;
        let value = bytes.get(data..data + vlen)?;
        data += vlen + 1;
        map.push((String::from_utf8(key.to_vec()).ok()?, value.to_vec()));
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip() {
        let map = vec![
            (":path".to_owned(), b"/".to_vec()),
            ("cookie".to_owned(), vec![0xff, 0]),
        ];
        assert_eq!(deserialize_map(&serialize_map(&map)), Some(map));
        assert_eq!(deserialize_map(&[1, 0, 0, 0, 9]), None);
    }

    #[test]
    fn shared_data_cas_follows_envoy() {
        let mut s = Shared::new(0);
        assert_eq!(s.set_shared("k", b"a".to_vec(), 77), status::OK);
        let cas = s.shared_data["k"].1;
        assert_eq!(
            s.set_shared("k", b"b".to_vec(), cas + 1),
            status::CAS_MISMATCH
        );
        assert_eq!(s.set_shared("k", b"c".to_vec(), cas), status::OK);
        assert_ne!(s.shared_data["k"].1, cas);
        assert_eq!(s.set_shared("k", b"d".to_vec(), 0), status::OK);
        assert_eq!(s.shared_data["k"].0, b"d");
    }
}
