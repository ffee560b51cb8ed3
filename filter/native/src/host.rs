//! Safe wrappers over the ABI calls: Envoy's buffers become slices valid for
//! the hook's duration, the module's strings become buffers, and every hook
//! body runs inside [`guarded`] so no panic ever crosses into Envoy.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::abi::{self, EnvoyBuffer, EnvoyHeader, FilterEnvoy, ModuleBuffer, ModuleHeader};

/// Runs a hook body; a panic is logged at critical level with the hook's name
/// and `fallback` is returned instead of unwinding into Envoy (which would
/// abort the process).
pub fn guarded<T>(hook: &'static str, fallback: T, body: impl FnOnce() -> T) -> T {
    guarded_or(hook, || fallback, body)
}

/// [`guarded`] with a fallback that runs only after a panic (e.g. to fail closed).
pub fn guarded_or<T>(
    hook: &'static str,
    fallback: impl FnOnce() -> T,
    body: impl FnOnce() -> T,
) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            log(
                abi::LOG_CRITICAL,
                &format!("[prealloc] panic in {hook}: {why}; answered safely instead (please report this)"),
            );
            fallback()
        }
    }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: a buffer over a live &str; Envoy copies it during the call.
    unsafe { abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

pub fn log_enabled(level: u32) -> bool {
    // SAFETY: plain value in, plain value out.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level) }
}

/// Bytes of an Envoy buffer, valid while the hook that received it runs.
///
/// # Safety
/// `b` must come from Envoy during the current hook, pointing at `len` bytes.
pub unsafe fn bytes<'a>(b: EnvoyBuffer) -> &'a [u8] {
    if b.ptr.is_null() || b.len == 0 {
        &[]
    } else {
        // SAFETY: Envoy guarantees `len` readable bytes at `ptr` for the hook.
        unsafe { std::slice::from_raw_parts(b.ptr, b.len) }
    }
}

/// A header list Envoy handed over, as (name, value) byte pairs.
///
/// # Safety
/// `headers` must point at `n` headers that Envoy keeps valid for the hook.
pub unsafe fn header_pairs<'a>(headers: *const EnvoyHeader, n: usize) -> &'a [EnvoyHeader] {
    if headers.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: as promised by the caller.
        unsafe { std::slice::from_raw_parts(headers, n) }
    }
}

/// (name, value) of one header Envoy listed.
pub fn pair<'a>(h: &EnvoyHeader) -> (&'a [u8], &'a [u8]) {
    let name = EnvoyBuffer {
        ptr: h.key_ptr,
        len: h.key_len,
    };
    let value = EnvoyBuffer {
        ptr: h.value_ptr,
        len: h.value_len,
    };
    // SAFETY: headers are only ever obtained from Envoy within the current hook
    // (`request_headers`, `header_pairs`), and read before it returns.
    unsafe { (bytes(name), bytes(value)) }
}

/// The request headers, read into `buf` (reused per worker: no allocation per request).
pub fn request_headers(filter: FilterEnvoy, buf: &mut Vec<EnvoyHeader>) -> bool {
    // SAFETY: `filter` is the live stream of the current hook.
    let n = unsafe {
        abi::envoy_dynamic_module_callback_http_get_headers_size(filter, abi::REQUEST_HEADER)
    };
    buf.clear();
    buf.resize(
        n,
        EnvoyHeader {
            key_ptr: std::ptr::null(),
            key_len: 0,
            value_ptr: std::ptr::null(),
            value_len: 0,
        },
    );
    if n == 0 {
        return true;
    }
    // SAFETY: `buf` has room for exactly `n` headers, as Envoy requires.
    unsafe {
        abi::envoy_dynamic_module_callback_http_get_headers(
            filter,
            abi::REQUEST_HEADER,
            buf.as_mut_ptr(),
        )
    }
}

/// The first value of a header (request or response map).
pub fn header<'a>(filter: FilterEnvoy, header_type: u32, name: &str) -> Option<&'a [u8]> {
    let mut out = EnvoyBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };
    // SAFETY: live stream; `out` is written by Envoy; the size pointer may be null.
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_get_header(
            filter,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            &mut out,
            0,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: Envoy's buffer, read within the hook.
    found.then(|| unsafe { bytes(out) })
}

/// Replaces every value of a header (an empty value removes it).
pub fn set_header(filter: FilterEnvoy, header_type: u32, name: &[u8], value: &[u8]) -> bool {
    // SAFETY: live stream; buffers over live slices, copied by Envoy.
    unsafe {
        abi::envoy_dynamic_module_callback_http_set_header(
            filter,
            header_type,
            ModuleBuffer::of(name),
            ModuleBuffer::of(value),
        )
    }
}

pub fn add_header(filter: FilterEnvoy, header_type: u32, name: &str, value: &str) -> bool {
    // SAFETY: as `set_header`.
    unsafe {
        abi::envoy_dynamic_module_callback_http_add_header(
            filter,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        )
    }
}

/// A local reply (JSON body, `Retry-After`).
pub fn send_response(filter: FilterEnvoy, status: u32, retry_after_s: u32, body: &str) {
    let retry = retry_after_s.to_string();
    let headers = [
        ModuleHeader::of("retry-after", &retry),
        ModuleHeader::of("content-type", "application/json"),
    ];
    // SAFETY: live stream; every buffer outlives the call and Envoy copies them.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            filter,
            status,
            headers.as_ptr(),
            headers.len(),
            ModuleBuffer::of(body.as_bytes()),
            ModuleBuffer::of(b"prealloc"),
        )
    }
}

pub fn continue_decoding(filter: FilterEnvoy) {
    // SAFETY: live stream.
    unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(filter) }
}

pub fn continue_encoding(filter: FilterEnvoy) {
    // SAFETY: live stream.
    unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_encoding(filter) }
}

/// Headers of a control-plane call, as the ABI wants them.
pub fn module_headers<'a>(headers: &'a [(&'a str, &'a str)]) -> Vec<ModuleHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHeader::of(k, v))
        .collect()
}

/// `:status` and the body of a callout's answer (None: no HTTP answer).
///
/// # Safety
/// The pointers are the callout-done hook's arguments, read within it.
pub unsafe fn callout_answer(
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) -> (Option<u32>, Option<Vec<u8>>, Vec<u8>) {
    if result != abi::CALLOUT_SUCCESS {
        return (None, None, Vec::new());
    }
    // SAFETY: as promised by the caller.
    let headers = unsafe { header_pairs(headers, headers_len) };
    let mut status = None;
    let mut retry_after = None;
    for h in headers {
        let (name, value) = pair(h);
        if name == b":status" {
            status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
        } else if name.eq_ignore_ascii_case(b"retry-after") {
            retry_after = Some(value.to_vec());
        }
    }
    let chunks: &[EnvoyBuffer] = if chunks.is_null() || chunks_len == 0 {
        &[]
    } else {
        // SAFETY: as promised by the caller.
        unsafe { std::slice::from_raw_parts(chunks, chunks_len) }
    };
    let mut body = Vec::with_capacity(chunks.iter().map(|c| c.len).sum());
    for c in chunks {
        // SAFETY: each chunk is Envoy's, valid during the hook.
        body.extend_from_slice(unsafe { bytes(*c) });
    }
    (status, retry_after, body)
}
