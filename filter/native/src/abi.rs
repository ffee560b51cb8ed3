//! The part of Envoy's dynamic-module ABI this module uses, declared by hand
//! (the Rust SDK is not on crates.io). Written from Envoy's
//! `source/extensions/dynamic_modules/abi.h` for Envoy 1.40 (ABI `v0.2.0`);
//! the test `the_abi_version_is_the_one_envoy_1_40_accepts` (tests/e2e)
//! checks the version against the pinned Envoy.
//!
//! Every C enum crosses the boundary as a plain `u32`: a value Envoy sends is
//! never turned into a Rust enum it might not fit. Hooks (the functions Envoy
//! calls) are defined in `filter.rs`, `specifier.rs` and `bootstrap.rs`.

use std::ffi::c_void;

macro_rules! abi_version {
    () => {
        "v0.2.0"
    };
}

/// The ABI version this module is built for: Envoy 1.40's.
pub const ABI_VERSION: &str = abi_version!();
/// [`ABI_VERSION`], NUL-terminated, as `on_program_init` answers it.
pub const ABI_VERSION_C: &str = concat!(abi_version!(), "\0");

/// Envoy-owned bytes (valid for the duration of the hook that received them).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub len: usize,
}

/// Module-owned bytes handed to Envoy (Envoy copies them during the call).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub len: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }
}

/// One header as Envoy lists it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHeader {
    pub key_ptr: *const u8,
    pub key_len: usize,
    pub value_ptr: *const u8,
    pub value_len: usize,
}

/// One header the module hands to Envoy.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHeader {
    pub key_ptr: *const u8,
    pub key_len: usize,
    pub value_ptr: *const u8,
    pub value_len: usize,
}

impl ModuleHeader {
    pub fn of(key: &str, value: &str) -> ModuleHeader {
        ModuleHeader {
            key_ptr: key.as_ptr(),
            key_len: key.len(),
            value_ptr: value.as_ptr(),
            value_len: value.len(),
        }
    }
}

// Opaque pointers. `*Envoy` ones belong to Envoy and are handed back to it;
// `*Module` ones are this module's boxes, handed back to its hooks.
pub type FilterConfigEnvoy = *mut c_void;
pub type FilterConfigModule = *const c_void;
pub type FilterEnvoy = *mut c_void;
pub type FilterModule = *const c_void;
pub type SpecifierConfigEnvoy = *mut c_void;
pub type SpecifierConfigModule = *const c_void;
pub type SpecifierContext = *mut c_void;
pub type BootstrapConfigEnvoy = *mut c_void;
pub type BootstrapConfigModule = *const c_void;
pub type BootstrapEnvoy = *mut c_void;
pub type BootstrapModule = *const c_void;
pub type Timer = *mut c_void;

// envoy_dynamic_module_type_http_header_type
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;

// envoy_dynamic_module_type_on_http_filter_request_headers_status (and response)
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
// ..._request_body_status
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_ITERATION_AND_BUFFER: u32 = 1;
// ..._request_trailers_status
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP_ITERATION: u32 = 1;
// ..._on_http_filter_local_reply_status
pub const LOCAL_REPLY_CONTINUE: u32 = 0;

// envoy_dynamic_module_type_http_callout_init_result
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
// envoy_dynamic_module_type_http_callout_result
pub const CALLOUT_SUCCESS: u32 = 0;

// envoy_dynamic_module_type_metrics_result
pub const METRICS_SUCCESS: u32 = 0;

// envoy_dynamic_module_type_log_level
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
pub const LOG_CRITICAL: u32 = 5;

/// `envoy_dynamic_module_type_event_cb`: the bootstrap shutdown's completion.
pub type EventCallback = Option<unsafe extern "C" fn(*mut c_void)>;

extern "C" {
    // Common.
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    // HTTP filter: headers.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoy,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: FilterEnvoy,
        header_type: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoy,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    /// An empty value removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoy,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoy,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    // HTTP filter: replies, flow, routing.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoy,
        status: u32,
        headers: *const ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoy);
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: FilterEnvoy);
    /// Re-runs cluster selection (the cluster specifier), not the route match.
    pub fn envoy_dynamic_module_callback_http_clear_route_cluster_cache(filter: FilterEnvoy);

    // HTTP filter: callouts and metrics.
    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: FilterEnvoy,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: FilterConfigEnvoy,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoy,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    // Cluster specifier.
    pub fn envoy_dynamic_module_callback_cluster_specifier_set_cluster_name(
        context: SpecifierContext,
        cluster: ModuleBuffer,
    );

    // Bootstrap extension (main thread).
    pub fn envoy_dynamic_module_callback_bootstrap_extension_config_signal_init_complete(
        config: BootstrapConfigEnvoy,
    );
    pub fn envoy_dynamic_module_callback_bootstrap_extension_timer_new(
        config: BootstrapConfigEnvoy,
    ) -> Timer;
    pub fn envoy_dynamic_module_callback_bootstrap_extension_timer_enable(
        timer: Timer,
        delay_ms: u64,
    );
    pub fn envoy_dynamic_module_callback_bootstrap_extension_timer_delete(timer: Timer);
    pub fn envoy_dynamic_module_callback_bootstrap_extension_http_callout(
        config: BootstrapConfigEnvoy,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_bootstrap_extension_config_define_counter(
        config: BootstrapConfigEnvoy,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_bootstrap_extension_config_define_gauge(
        config: BootstrapConfigEnvoy,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_bootstrap_extension_config_increment_counter(
        config: BootstrapConfigEnvoy,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_bootstrap_extension_config_set_gauge(
        config: BootstrapConfigEnvoy,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;
}

/// Every Envoy callback declared above: `on_program_init` checks that the
/// loading Envoy exports each one, so an Envoy with another ABI fails at load
/// with a message naming what it lacks, instead of later at a call.
pub const IMPORTS: &[&str] = &[
    "envoy_dynamic_module_callback_log",
    "envoy_dynamic_module_callback_log_enabled",
    "envoy_dynamic_module_callback_http_get_header",
    "envoy_dynamic_module_callback_http_get_headers_size",
    "envoy_dynamic_module_callback_http_get_headers",
    "envoy_dynamic_module_callback_http_set_header",
    "envoy_dynamic_module_callback_http_add_header",
    "envoy_dynamic_module_callback_http_send_response",
    "envoy_dynamic_module_callback_http_filter_continue_decoding",
    "envoy_dynamic_module_callback_http_filter_continue_encoding",
    "envoy_dynamic_module_callback_http_clear_route_cluster_cache",
    "envoy_dynamic_module_callback_http_filter_http_callout",
    "envoy_dynamic_module_callback_http_filter_config_define_counter",
    "envoy_dynamic_module_callback_http_filter_increment_counter",
    "envoy_dynamic_module_callback_cluster_specifier_set_cluster_name",
    "envoy_dynamic_module_callback_bootstrap_extension_config_signal_init_complete",
    "envoy_dynamic_module_callback_bootstrap_extension_timer_new",
    "envoy_dynamic_module_callback_bootstrap_extension_timer_enable",
    "envoy_dynamic_module_callback_bootstrap_extension_timer_delete",
    "envoy_dynamic_module_callback_bootstrap_extension_http_callout",
    "envoy_dynamic_module_callback_bootstrap_extension_config_define_counter",
    "envoy_dynamic_module_callback_bootstrap_extension_config_define_gauge",
    "envoy_dynamic_module_callback_bootstrap_extension_config_increment_counter",
    "envoy_dynamic_module_callback_bootstrap_extension_config_set_gauge",
];

extern "C" {
    /// glibc's symbol lookup; `RTLD_DEFAULT` (null) searches the global scope,
    /// where the Envoy executable's exported callbacks are.
    fn dlsym(handle: *mut c_void, symbol: *const std::ffi::c_char) -> *mut c_void;
}

/// The callbacks of [`IMPORTS`] the running process does not export.
pub fn missing_imports() -> Vec<&'static str> {
    IMPORTS
        .iter()
        .copied()
        .filter(|name| {
            let Ok(c) = std::ffi::CString::new(*name) else {
                return true;
            };
            // SAFETY: a NUL-terminated name and the RTLD_DEFAULT handle; dlsym
            // only reads them.
            unsafe { dlsym(std::ptr::null_mut(), c.as_ptr()) }.is_null()
        })
        .collect()
}
