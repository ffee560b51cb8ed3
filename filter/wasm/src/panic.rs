//! The panic hook: no input should ever make the filter panic, but should a
//! trap happen anyway, Envoy's log says where (critical level, with the last
//! context and callback the VM entered) before `failure_policy` takes over.

use proxy_wasm::types::LogLevel;
use std::cell::Cell;

use super::host;

thread_local! {
    static WHERE: Cell<(&'static str, u32)> = const { Cell::new(("start", 0)) };
}

/// Notes the callback being entered and its context (one store, no allocation).
pub fn enter(callback: &'static str, context: u32) {
    WHERE.with(|w| w.set((callback, context)));
}

pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let (callback, context) = WHERE.with(Cell::get);
        host::log(
            LogLevel::Critical,
            &format!(
                "[prealloc] panic in or after {callback} of context {context}: {info}; \
                 the VM traps and failure_policy applies (please report this)"
            ),
        );
    }));
}
