//! The cluster specifier (`envoy.router.cluster_specifier_plugin.dynamic_modules`):
//! hands the router the cluster the filter chose, or the default cluster.
//!
//! Envoy runs it when it resolves the route (before any HTTP filter: nothing is
//! decided yet, so the default cluster), and again, synchronously, when the
//! filter calls `clear_route_cluster_cache` after deciding (its choice). No
//! header carries the cluster, so a client has nothing to forge.

use prealloc_filter_core::config;

use crate::abi::{
    self, EnvoyBuffer, ModuleBuffer, SpecifierConfigEnvoy, SpecifierConfigModule, SpecifierContext,
};
use crate::host::{self, guarded};
use crate::state;

struct Specifier {
    default_cluster: String,
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_cluster_specifier_config_new(
    _config_envoy: SpecifierConfigEnvoy,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> SpecifierConfigModule {
    guarded("on_cluster_specifier_config_new", std::ptr::null(), || {
        // SAFETY: Envoy's buffer, valid during this hook.
        let bytes = unsafe { host::bytes(config) };
        match config::parse_specifier(bytes) {
            Ok(c) => Box::into_raw(Box::new(Specifier {
                default_cluster: c.default_cluster,
            })) as SpecifierConfigModule,
            Err(e) => {
                host::log(
                    abi::LOG_ERROR,
                    &format!("[prealloc] specifier_config: {e}; configuration refused"),
                );
                std::ptr::null()
            }
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_cluster_specifier_config_destroy(
    config: SpecifierConfigModule,
) {
    guarded("on_cluster_specifier_config_destroy", (), || {
        if !config.is_null() {
            // SAFETY: the box from `config_new`, destroyed once.
            drop(unsafe { Box::from_raw(config as *mut Specifier) });
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_cluster_specifier_select(
    config: SpecifierConfigModule,
    context: SpecifierContext,
) -> bool {
    guarded("on_cluster_specifier_select", false, || {
        // SAFETY: the box from `config_new`, alive until its destroy hook.
        let Some(spec) = (unsafe { (config as *const Specifier).as_ref() }) else {
            return false;
        };
        let cluster = state::pending_cluster().unwrap_or(spec.default_cluster.as_bytes());
        // SAFETY: the live selection context; Envoy copies the name.
        unsafe {
            abi::envoy_dynamic_module_callback_cluster_specifier_set_cluster_name(
                context,
                ModuleBuffer::of(cluster),
            )
        };
        true
    })
}
