//! Panic-free wrappers around the proxy-wasm host calls the filter uses.
//!
//! Every host error is turned into a `None`/`false` plus a log line: a failing
//! host call degrades one request (anonymous routing, no cookie), it never
//! traps the VM.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::ptr::null_mut;
use std::time::{Duration, UNIX_EPOCH};

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

pub fn info(msg: &str) {
    log(LogLevel::Info, msg);
}

pub fn warn(msg: &str) {
    log(LogLevel::Warn, msg);
}

pub fn debug(msg: &str) {
    // Formatting is the caller's cost; keep debug lines off the hot path unless enabled.
    log(LogLevel::Debug, msg);
}

pub fn debug_enabled() -> bool {
    matches!(
        hostcalls::get_log_level(),
        Ok(LogLevel::Trace | LogLevel::Debug)
    )
}

/// Host clock since the unix epoch (0 if the host cannot tell).
pub fn now() -> Duration {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default()
}

pub fn now_ms() -> u64 {
    u64::try_from(now().as_millis()).unwrap_or(u64::MAX)
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// The raw serialized header map (parse with [`crate::headers::HeaderMap`]).
///
/// The SDK's `get_map` panics on header values that are not UTF-8, which a
/// client controls; this keeps the bytes and lets the pure parser judge them.
pub fn header_map_raw(map_type: MapType) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to a buffer it allocated through the
    // SDK's exported allocator (a Vec of exactly `size` bytes) and its size;
    // ownership passes to us, exactly as in the SDK's own get_map.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    if status != Status::Ok {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: see above.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

pub fn header_bytes(map_type: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map_type, name)
        .ok()
        .flatten()
}

pub fn set_header(map_type: MapType, name: &str, value: &str) -> bool {
    hostcalls::set_map_value(map_type, name, Some(value)).is_ok()
}

pub fn add_header(map_type: MapType, name: &str, value: &str) -> bool {
    hostcalls::add_map_value(map_type, name, value).is_ok()
}

pub fn remove_header(map_type: MapType, name: &str) -> bool {
    hostcalls::remove_map_value(map_type, name).is_ok()
}

pub fn get_shared(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

pub fn set_shared(key: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_shared_data(key, Some(value), None)
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
}

pub fn call_response_body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `:status` of the HTTP call response being delivered, if it has one.
pub fn call_response_status() -> Option<u32> {
    let v = header_bytes(MapType::HttpCallResponseHeaders, ":status")?;
    std::str::from_utf8(&v).ok()?.parse().ok()
}

/// Asks Envoy to recompute the route after the filter changed headers
/// (since Envoy 1.33 header changes made by wasm no longer do it by themselves).
/// Envoy's `clear_route_cache` ignores its arguments and returns nothing.
pub fn clear_route_cache() -> bool {
    hostcalls::call_foreign_function("clear_route_cache", None).is_ok()
}

pub fn send_response(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) -> bool {
    hostcalls::send_http_response(status, headers, Some(body)).is_ok()
}

pub fn resume_request() -> bool {
    hostcalls::resume_http_request().is_ok()
}

pub fn dispatch(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout)
}

pub fn set_tick_period(period: Duration) -> bool {
    hostcalls::set_tick_period(period).is_ok()
}

pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

pub fn increment_metric(id: u32, by: i64) {
    let _ = hostcalls::increment_metric(id, by);
}

pub fn record_metric(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}
