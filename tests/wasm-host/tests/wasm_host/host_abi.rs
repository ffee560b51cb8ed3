//! The host itself: traps and unemulated host calls surface as failures with their message.

use prealloc_wasm_host::Host;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A minimal proxy-wasm module: its on_configure reads the plugin
/// configuration and, on `p`, logs and traps; on `g`, calls an import the host
/// does not emulate.
const MODULE: &str = r#"
(module
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 16) "about to fail")
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "_initialize"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param $ctx i32) (param $size i32) (result i32)
    (drop (call $get_buf (i32.const 7) (i32.const 0) (local.get $size) (i32.const 0) (i32.const 4)))
    (if (i32.eq (i32.load8_u (i32.load (i32.const 0))) (i32.const 112))
      (then (drop (call $log (i32.const 4) (i32.const 16) (i32.const 13))) unreachable))
    (if (i32.eq (i32.load8_u (i32.load (i32.const 0))) (i32.const 103))
      (then (drop (call $grpc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                              (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))))
    (i32.const 1))
)
"#;

fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("the call should have failed");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

#[test]
fn a_module_that_reads_its_configuration_is_configured() {
    let host = Host::from_wat(MODULE).unwrap();
    let vm = host.new_vm();
    assert!(vm.configure_plugin("ok"));
}

#[test]
fn a_trap_in_the_vm_fails_with_the_trap_and_the_vms_last_error_log() {
    let host = Host::from_wat(MODULE).unwrap();
    host.echo_logs(false);
    let vm = host.new_vm();
    let msg = panic_message(|| {
        vm.configure_plugin("p");
    });
    assert!(msg.contains("trapped in proxy_on_configure"), "{msg}");
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(msg.contains("about to fail"), "{msg}");
    // The VM is poisoned like Envoy's: later calls fail too, naming the first trap.
    let again = panic_message(|| {
        vm.configure_plugin("ok");
    });
    assert!(again.contains("trapped earlier"), "{again}");
}

#[test]
fn a_host_call_the_host_does_not_emulate_fails_loudly() {
    let host = Host::from_wat(MODULE).unwrap();
    let vm = host.new_vm();
    let msg = panic_message(|| {
        vm.configure_plugin("g");
    });
    assert!(msg.contains("env::proxy_grpc_call"), "{msg}");
    assert!(msg.contains("does not emulate"), "{msg}");
}

#[test]
fn a_missing_wasm_names_the_command_that_builds_it() {
    let err = Host::try_new(std::path::Path::new("/nonexistent/prealloc_filter.wasm"))
        .err()
        .expect("loading a missing file must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("cargo xtask test"), "{msg}");
    assert!(msg.contains("PREALLOC_WASM"), "{msg}");
}

#[test]
fn the_host_reports_the_imports_it_does_not_emulate() {
    let host = Host::from_wat(MODULE).unwrap();
    assert_eq!(
        host.new_vm().unemulated_imports(),
        vec!["env::proxy_grpc_call".to_owned()]
    );
}

#[test]
fn the_real_filter_imports_nothing_unemulated_beyond_grpc_queues_and_body_writes() {
    // The SDK links these through its trait vtables whether or not a filter
    // uses them; prealloc never does, so they trap loudly if ever called.
    let never_used = [
        "env::proxy_dequeue_shared_queue",
        "env::proxy_enqueue_shared_queue",
        "env::proxy_get_status",
        "env::proxy_grpc_call",
        "env::proxy_grpc_cancel",
        "env::proxy_grpc_close",
        "env::proxy_grpc_send",
        "env::proxy_grpc_stream",
        "env::proxy_register_shared_queue",
        "env::proxy_resolve_shared_queue",
        "env::proxy_set_buffer_bytes",
    ];
    let host = Host::new();
    let surprising: Vec<String> = host
        .new_vm()
        .unemulated_imports()
        .into_iter()
        .filter(|i| !never_used.contains(&i.as_str()))
        .collect();
    assert_eq!(
        surprising,
        Vec::<String>::new(),
        "emulate these in tests/wasm-host/src/abi.rs"
    );
}
