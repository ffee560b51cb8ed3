//! prealloc's proxy-wasm build: entry point, root context (filter or poller
//! role). A thin glue: it reads host state, hands it to
//! [`prealloc_filter_core`] and applies the plans it gets back. wasm32 only: a
//! native build of this crate is empty.
#![cfg(target_arch = "wasm32")]

mod host;
mod http;
mod metrics;
mod panic;
mod poller;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::rc::Rc;

use http::{FilterState, Http};
use metrics::Metrics;
use poller::PollerRoot;
use prealloc_filter_core::config::{self, PluginConfig};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    // After set_log_level, which installs the SDK's own hook (message only).
    panic::install();
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { id: context_id, role: Role::Unconfigured })
    });
}}

/// One root context per plugin: the plugin configuration's top-level key picks its role.
struct Root {
    id: u32,
    role: Role,
}

enum Role {
    Unconfigured,
    Filter(Rc<FilterState>),
    Poller(Box<PollerRoot>),
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        panic::enter("root on_http_call_response", self.id);
        match &mut self.role {
            Role::Poller(p) => p.on_response(token, body_size),
            Role::Filter(s) => s.on_giveback_response(token),
            Role::Unconfigured => {}
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        panic::enter("on_configure", self.id);
        let Some(bytes) = host::plugin_configuration() else {
            host::log(
                LogLevel::Error,
                &format!(
                    "[prealloc root {}] no plugin configuration: set the plugin's `configuration` to {{\"filter\": {{...}}}} or {{\"poller\": {{...}}}}",
                    self.id
                ),
            );
            return false;
        };
        match config::parse(&bytes) {
            Err(e) => {
                host::log(
                    LogLevel::Error,
                    &format!("[prealloc root {}] {e}; configuration refused", self.id),
                );
                false
            }
            Ok(PluginConfig::Filter(cfg)) => {
                let period = cfg.availability_refresh;
                let state = Rc::new(FilterState::new(cfg, Metrics::define_buffered()));
                state.on_tick();
                host::set_tick_period(period);
                host::info(&format!("[prealloc root {}] filter configured", self.id));
                self.role = Role::Filter(state);
                true
            }
            Ok(PluginConfig::Poller(mut cfg)) => {
                // Without a configured node id: Envoy's own, else one unique to this start.
                if cfg.node_id.is_none() {
                    let envoy_node = host::property(&["node", "id"])
                        .and_then(|b| String::from_utf8(b).ok())
                        .filter(|n| prealloc_wire::is_valid_node(n));
                    cfg.node_id =
                        Some(envoy_node.unwrap_or_else(|| {
                            format!("envoy-{:08x}", host::now().as_nanos() as u32)
                        }));
                }
                let mut p = Box::new(PollerRoot::new(self.id, cfg, Metrics::define()));
                host::set_tick_period(p.tick());
                host::info(&format!(
                    "[prealloc root {}] poller configured (node {})",
                    self.id,
                    p.node().unwrap_or("-")
                ));
                p.poll_if_due();
                self.role = Role::Poller(p);
                true
            }
        }
    }

    fn on_tick(&mut self) {
        panic::enter("on_tick", self.id);
        match &mut self.role {
            Role::Filter(s) => {
                s.on_tick();
            }
            Role::Poller(p) => p.on_tick(),
            Role::Unconfigured => {}
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Role::Filter(s) => Some(Box::new(Http::new(context_id, Rc::clone(s)))),
            // Never used as a filter: let requests through untouched rather than trap.
            _ => Some(Box::new(PassThrough)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct PassThrough;
impl Context for PassThrough {}
impl HttpContext for PassThrough {}
