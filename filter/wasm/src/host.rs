//! Panic-free wrappers around the proxy-wasm host calls the filter uses.
//!
//! The SDK's `hostcalls` functions panic on any status they do not expect (for
//! example reading `:status` of an HTTP call that Envoy reset because its body
//! exceeded the buffer limit), and a panic traps the VM. So every call here
//! goes straight to the ABI import, reads the status as a plain `u32` (an
//! unknown value can never become an invalid enum), and turns every error into
//! a `None`/`false`/`Err` the caller handles: a failing host call degrades one
//! request or one poll, it never traps the VM.
//!
//! The one exception is [`dispatch`]: the SDK must register the call's token to
//! deliver its answer to the right context, so it goes through the SDK, whose
//! `dispatch_http_call` handles every status Envoy returns for it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::ptr::{null, null_mut};
use std::time::Duration;

use prealloc_filter_core::headers;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;
const STREAM_HTTP_REQUEST: u32 = 0;
const STREAM_HTTP_RESPONSE: u32 = 1;

/// The ABI 0.2.1 imports, with statuses and enums as plain integers.
#[allow(clashing_extern_declarations)]
mod ffi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
        pub fn proxy_get_log_level(level: *mut u32) -> u32;
        pub fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_property(
            path: *const u8,
            path_size: usize,
            value: *mut *mut u8,
            value_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer: u32,
            start: usize,
            max: usize,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
        pub fn proxy_get_header_map_value(
            map: u32,
            key: *const u8,
            key_size: usize,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map: u32,
            key: *const u8,
            key_size: usize,
            value: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_add_header_map_value(
            map: u32,
            key: *const u8,
            key_size: usize,
            value: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
        pub fn proxy_get_shared_data(
            key: *const u8,
            key_size: usize,
            data: *mut *mut u8,
            size: *mut usize,
            cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key: *const u8,
            key_size: usize,
            value: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_call_foreign_function(
            name: *const u8,
            name_size: usize,
            args: *const u8,
            args_size: usize,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32;
        pub fn proxy_send_local_response(
            status: u32,
            details: *const u8,
            details_size: usize,
            body: *const u8,
            body_size: usize,
            headers: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_continue_stream(stream: u32) -> u32;
        pub fn proxy_define_metric(
            kind: u32,
            name: *const u8,
            name_size: usize,
            id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(id: u32, value: u64) -> u32;
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's exported
/// allocator (exactly `size` bytes), as the SDK itself does.
///
/// # Safety
/// `data` must be null or a buffer of `size` bytes returned by a host call.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

pub fn log(level: LogLevel, msg: &str) {
    // SAFETY: pointer and length of a live &str.
    unsafe { ffi::proxy_log(level as u32, msg.as_ptr(), msg.len()) };
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
    let mut level = u32::MAX;
    // SAFETY: the host writes one u32.
    let status = unsafe { ffi::proxy_get_log_level(&mut level) };
    status == OK && level <= LogLevel::Debug as u32
}

/// Host clock since the unix epoch (0 if the host cannot tell).
pub fn now() -> Duration {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64.
    let status = unsafe { ffi::proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == OK {
        Duration::from_nanos(nanos)
    } else {
        Duration::ZERO
    }
}

pub fn now_ms() -> u64 {
    u64::try_from(now().as_millis()).unwrap_or(u64::MAX)
}

/// The raw serialized header map (parse with [`prealloc_filter_core::headers::HeaderMap`]).
///
/// The SDK's `get_map` panics on header values that are not UTF-8, which a
/// client controls; this keeps the bytes and lets the pure parser judge them.
pub fn header_map_raw(map_type: MapType) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host hands over a buffer it allocated for us (see `owned`).
    unsafe {
        if ffi::proxy_get_header_map_pairs(map_type as u32, &mut data, &mut size) != OK {
            return None;
        }
        Some(owned(data, size))
    }
}

/// One header's value; `None` when absent or when the host refuses (e.g. the
/// headers of an HTTP call that has no response).
pub fn header_bytes(map_type: MapType, name: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header_map_raw`.
    unsafe {
        let status = ffi::proxy_get_header_map_value(
            map_type as u32,
            name.as_ptr(),
            name.len(),
            &mut data,
            &mut size,
        );
        (status == OK).then(|| owned(data, size))
    }
}

pub fn set_header(map_type: MapType, name: &str, value: &str) -> bool {
    // SAFETY: pointers and lengths of live &strs.
    unsafe {
        ffi::proxy_replace_header_map_value(
            map_type as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        ) == OK
    }
}

pub fn add_header(map_type: MapType, name: &str, value: &str) -> bool {
    // SAFETY: pointers and lengths of live &strs.
    unsafe {
        ffi::proxy_add_header_map_value(
            map_type as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        ) == OK
    }
}

pub fn remove_header(map_type: MapType, name: &str) -> bool {
    // SAFETY: pointer and length of a live &str.
    unsafe { ffi::proxy_remove_header_map_value(map_type as u32, name.as_ptr(), name.len()) == OK }
}

/// A shared-data value and its CAS; `(None, None)` when absent or unreadable.
pub fn get_shared(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: as in `header_map_raw`; the host writes one u32 CAS.
    unsafe {
        let status =
            ffi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas);
        if status != OK {
            return (None, None);
        }
        let value = (!data.is_null()).then(|| owned(data, size));
        (value, (cas != 0).then_some(cas))
    }
}

pub fn set_shared(key: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers and lengths of live slices.
    let status = unsafe {
        ffi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0)
    };
    match status {
        OK => Ok(()),
        CAS_MISMATCH => Err(Status::CasMismatch),
        NOT_FOUND => Err(Status::NotFound),
        _ => Err(Status::InternalFailure),
    }
}

fn buffer(kind: BufferType, max: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header_map_raw`.
    unsafe {
        let status = ffi::proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size);
        (status == OK && !data.is_null()).then(|| owned(data, size))
    }
}

/// A host property, e.g. `["node", "id"]` (`None` if Envoy has none).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: pointer and length of a live String; the host allocates the
    // answer with our allocator (as for header maps) and we take ownership.
    unsafe {
        let status = ffi::proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size);
        (status == OK && !data.is_null()).then(|| owned(data, size))
    }
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    buffer(BufferType::PluginConfiguration, usize::MAX)
}

pub fn call_response_body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    buffer(BufferType::HttpCallResponseBody, size).unwrap_or_default()
}

/// `:status` of the HTTP call response being delivered; `None` when the call
/// got no response (connection failure, timeout, reset by a buffer limit).
pub fn call_response_status() -> Option<u32> {
    let v = header_bytes(MapType::HttpCallResponseHeaders, ":status")?;
    std::str::from_utf8(&v).ok()?.parse().ok()
}

/// Asks Envoy to recompute the route after the filter changed headers
/// (since Envoy 1.33 header changes made by wasm no longer do it by themselves).
/// Envoy's `clear_route_cache` ignores its arguments and returns nothing.
pub fn clear_route_cache() -> bool {
    const NAME: &str = "clear_route_cache";
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header_map_raw`; any result buffer is taken and dropped.
    unsafe {
        let status = ffi::proxy_call_foreign_function(
            NAME.as_ptr(),
            NAME.len(),
            null(),
            0,
            &mut data,
            &mut size,
        );
        drop(owned(data, size));
        status == OK
    }
}

pub fn send_response(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) -> bool {
    let pairs: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    let map = headers::serialize(&pairs);
    // SAFETY: pointers and lengths of live buffers.
    unsafe {
        ffi::proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        ) == OK
    }
}

pub fn resume_request() -> bool {
    // SAFETY: no pointers.
    unsafe { ffi::proxy_continue_stream(STREAM_HTTP_REQUEST) == OK }
}

pub fn resume_response() -> bool {
    // SAFETY: no pointers.
    unsafe { ffi::proxy_continue_stream(STREAM_HTTP_RESPONSE) == OK }
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
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: no pointers.
    unsafe { ffi::proxy_set_tick_period_milliseconds(ms) == OK }
}

pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: pointer and length of a live &str; the host writes one u32.
    let status =
        unsafe { ffi::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, by: i64) {
    // SAFETY: no pointers.
    unsafe { ffi::proxy_increment_metric(id, by) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: no pointers.
    unsafe { ffi::proxy_record_metric(id, value) };
}
