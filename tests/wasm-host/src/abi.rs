//! The proxy-wasm ABI 0.2.1 host functions (module `env`), emulating Envoy's behaviour.

use crate::state::{
    deserialize_map, first_value_bytes, lock, lossy, status, CallResponse, ContextState,
    ForeignCall, Header, HttpCall, LogLine, Metric, MetricKind, VmData,
};
use wasmtime::error::Context as _;
use wasmtime::{bail, format_err as anyhow, Result};
use wasmtime::{Caller, Extern, Linker, Memory, Module, Store};

type C<'a> = Caller<'a, VmData>;

const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_RESPONSE_HEADERS: i32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
const MAP_HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;

const BUFFER_HTTP_REQUEST_BODY: i32 = 0;
const BUFFER_HTTP_CALL_RESPONSE_BODY: i32 = 4;
const BUFFER_VM_CONFIGURATION: i32 = 6;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

const STREAM_HTTP_REQUEST: i32 = 0;
const STREAM_HTTP_RESPONSE: i32 = 1;

fn memory(c: &mut C<'_>) -> Result<Memory> {
    c.get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| anyhow!("the module exports no `memory`; proxy-wasm needs it"))
}

fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(c)?;
    let data = mem.data(&*c);
    data.get(ptr..ptr.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("guest pointer {ptr}+{len} is outside its memory"))
}

fn read_str(c: &mut C<'_>, ptr: i32, len: i32, what: &str) -> Result<String> {
    String::from_utf8(read(c, ptr, len)?)
        .map_err(|_| anyhow!("{what} passed by the guest is not UTF-8"))
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = memory(c)?;
    mem.write(&mut *c, ptr as u32 as usize, bytes)
        .map_err(|_| anyhow!("guest return pointer {} is outside its memory", ptr as u32))
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates guest memory through the SDK's allocator export, like Envoy does.
fn alloc(c: &mut C<'_>, size: usize) -> Result<u32> {
    let f = c
        .get_export("proxy_on_memory_allocate")
        .or_else(|| c.get_export("malloc"))
        .and_then(Extern::into_func)
        .ok_or_else(|| anyhow!("the module exports neither proxy_on_memory_allocate nor malloc"))?;
    let f = f
        .typed::<i32, i32>(&*c)
        .context("proxy_on_memory_allocate has the wrong signature")?;
    let p = f.call(&mut *c, size as i32)?;
    if p == 0 {
        bail!("the guest allocator returned null for {size} bytes");
    }
    Ok(p as u32)
}

/// Envoy's copyToPointerSize: empty data is returned as a null pointer and size 0.
fn copy_out(c: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<()> {
    let mut p = 0u32;
    if !bytes.is_empty() {
        p = alloc(c, bytes.len())?;
        write(c, p as i32, bytes)?;
    }
    write_u32(c, ptr_ptr, p)?;
    write_u32(c, size_ptr, bytes.len() as u32)
}

fn context(data: &mut VmData) -> Option<&mut ContextState> {
    let id = data.effective;
    data.contexts.get_mut(&id)
}

/// The header map a map type names for the effective context; `None` when it
/// does not exist (yet) there.
fn map_mut(data: &mut VmData, map_type: i32) -> Option<&mut Vec<Header>> {
    match map_type {
        MAP_REQUEST_HEADERS => context(data)?.request_headers.as_mut(),
        MAP_RESPONSE_HEADERS => context(data)?.response_headers.as_mut(),
        MAP_HTTP_CALL_RESPONSE_HEADERS => data
            .call_response
            .as_mut()
            .filter(|r| !r.no_response)
            .map(|r| &mut r.headers),
        MAP_HTTP_CALL_RESPONSE_TRAILERS => data.call_response.as_mut().map(|r| &mut r.trailers),
        _ => None,
    }
}

fn log_line(data: &VmData, level: u32, message: String) {
    let mut shared = lock(&data.shared);
    if shared.echo_logs {
        eprintln!(
            "[vm {} ctx {} level {}] {}",
            data.vm, data.effective, level, message
        );
    }
    shared.logs.push(LogLine {
        vm: data.vm,
        context_id: data.effective,
        level,
        message,
    });
}

/// Adds every emulated `env` function to the linker.
pub(crate) fn add_to_linker(linker: &mut Linker<VmData>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> Result<i32> {
            let message = String::from_utf8_lossy(&read(&mut c, ptr, len)?).into_owned();
            log_line(c.data(), level as u32, message);
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> Result<i32> {
            let level = lock(&c.data().shared).log_level;
            write_u32(&mut c, ret, level)?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> Result<i32> {
            let now = lock(&c.data().shared).now_nanos;
            write(&mut c, ret, &now.to_le_bytes())?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, period: i32| -> Result<i32> {
            let data = c.data_mut();
            let Some(ctx) = context(data) else {
                return Ok(status::BAD_ARGUMENT);
            };
            ctx.tick_period_ms = period as u32;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, buffer_type: i32, start: i32, max: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
            let data = c.data();
            let buffer: Option<Vec<u8>> = match buffer_type {
                BUFFER_HTTP_REQUEST_BODY => data
                    .contexts
                    .get(&data.effective)
                    .and_then(|ctx| ctx.request_body.clone()),
                BUFFER_VM_CONFIGURATION if data.vm_config_visible => Some(data.vm_config.clone()),
                BUFFER_PLUGIN_CONFIGURATION => data.plugin_config.clone(),
                BUFFER_HTTP_CALL_RESPONSE_BODY => data.call_response.as_ref().map(|r| r.body.clone()),
                BUFFER_VM_CONFIGURATION => None,
                other => bail!(
                    "proxy_get_buffer_bytes for buffer type {other} is not emulated by prealloc-wasm-host"
                ),
            };
            let Some(buffer) = buffer else {
                return Ok(status::NOT_FOUND);
            };
            let start = (start as u32 as usize).min(buffer.len());
            let end = start.saturating_add(max as u32 as usize).min(buffer.len());
            copy_out(&mut c, &buffer[start..end], ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map_type: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
            let map = map_mut(c.data_mut(), map_type).cloned().unwrap_or_default();
            let bytes = crate::state::serialize_map(&map);
            copy_out(&mut c, &bytes, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map_type: i32, ptr: i32, size: i32| -> Result<i32> {
            let bytes = read(&mut c, ptr, size)?;
            let pairs = deserialize_map(&bytes)
                .ok_or_else(|| anyhow!("malformed header map from the guest"))?;
            let Some(map) = map_mut(c.data_mut(), map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            *map = pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>,
         map_type: i32,
         kptr: i32,
         klen: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> Result<i32> {
            let key = read_str(&mut c, kptr, klen, "header name")?;
            // Envoy answers the first value only when a header is repeated.
            // A map that does not exist (e.g. the headers of an HTTP call that got
            // no response) is BadArgument in Envoy, not NotFound.
            let Some(map) = map_mut(c.data_mut(), map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            match first_value_bytes(map, &key).map(<[u8]>::to_vec) {
                Some(v) => {
                    copy_out(&mut c, &v, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map_type: i32, kptr: i32, klen: i32| -> Result<i32> {
            let key = read_str(&mut c, kptr, klen, "header name")?;
            let Some(map) = map_mut(c.data_mut(), map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            map.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, map_type: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            let key = read_str(&mut c, kptr, klen, "header name")?.to_ascii_lowercase();
            let value = read(&mut c, vptr, vlen)?;
            let Some(map) = map_mut(c.data_mut(), map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // Envoy's setCopy: afterwards exactly one value.
            map.retain(|(k, _)| *k != key);
            map.push((key, value));
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, map_type: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            let key = read_str(&mut c, kptr, klen, "header name")?.to_ascii_lowercase();
            let value = read(&mut c, vptr, vlen)?;
            let Some(map) = map_mut(c.data_mut(), map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            map.push((key, value));
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pptr: i32, plen: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
            let path = read(&mut c, pptr, plen)?;
            let path: Vec<String> = path
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let value = lock(&c.data().shared).properties.get(&path).cloned();
            match value {
                Some(v) => {
                    copy_out(&mut c, &v, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pptr: i32, plen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            let path = read(&mut c, pptr, plen)?;
            let path: Vec<String> = path
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let value = read(&mut c, vptr, vlen)?;
            lock(&c.data().shared).properties.insert(path, value);
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>,
         kptr: i32,
         klen: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> Result<i32> {
            let key = read_str(&mut c, kptr, klen, "shared data key")?;
            // Copied under the lock, as Envoy copies every read.
            let entry = lock(&c.data().shared).shared_data.get(&key).cloned();
            let Some((value, cas)) = entry else {
                return Ok(status::NOT_FOUND);
            };
            copy_out(&mut c, &value, ptr_ptr, size_ptr)?;
            write_u32(&mut c, cas_ptr, cas)?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| -> Result<i32> {
            let key = read_str(&mut c, kptr, klen, "shared data key")?;
            let value = read(&mut c, vptr, vlen)?;
            Ok(lock(&c.data().shared).set_shared(&key, value, cas as u32))
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, stream: i32| -> Result<i32> {
            let Some(ctx) = context(c.data_mut()) else {
                return Ok(status::BAD_ARGUMENT);
            };
            match stream {
                STREAM_HTTP_REQUEST => ctx.resumed_request = true,
                STREAM_HTTP_RESPONSE => ctx.resumed_response = true,
                _ => return Ok(status::BAD_ARGUMENT),
            }
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, stream: i32| -> Result<i32> {
            let Some(ctx) = context(c.data_mut()) else {
                return Ok(status::BAD_ARGUMENT);
            };
            match stream {
                STREAM_HTTP_REQUEST => ctx.closed_request = true,
                STREAM_HTTP_RESPONSE => ctx.closed_response = true,
                _ => return Ok(status::BAD_ARGUMENT),
            }
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc_status: i32|
         -> Result<i32> {
            let details = read_str(&mut c, dptr, dlen, "local reply details")?;
            let body = read(&mut c, bptr, blen)?;
            let headers = deserialize_map(&read(&mut c, hptr, hlen)?)
                .ok_or_else(|| anyhow!("malformed header map in proxy_send_local_response"))?;
            let data = c.data_mut();
            let Some(ctx) = context(data) else {
                return Ok(status::BAD_ARGUMENT);
            };
            if ctx.root_id == 0 {
                bail!("proxy_send_local_response called on root context {}; only an HTTP stream can reply", data.effective);
            }
            ctx.local_reply = Some(crate::state::LocalReply {
                status: code as u32,
                details,
                headers: lossy(&headers).into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect(),
                body,
                grpc_status,
            });
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         timeout: i32,
         token_ptr: i32|
         -> Result<i32> {
            let upstream = read_str(&mut c, uptr, ulen, "http call upstream")?;
            let headers = deserialize_map(&read(&mut c, hptr, hlen)?)
                .ok_or_else(|| anyhow!("malformed header map in proxy_http_call"))?;
            let body = read(&mut c, bptr, blen)?;
            let trailers = deserialize_map(&read(&mut c, tptr, tlen)?)
                .ok_or_else(|| anyhow!("malformed trailer map in proxy_http_call"))?;
            // Envoy refuses a call without these pseudo-headers.
            for required in [":method", ":path", ":authority"] {
                if first_value_bytes(&headers, required).is_none() {
                    log_line(
                        c.data(),
                        4,
                        format!("prealloc-wasm-host: proxy_http_call without {required} refused with BadArgument, as Envoy does"),
                    );
                    return Ok(status::BAD_ARGUMENT);
                }
            }
            // Envoy refuses a call to a cluster it does not have.
            if lock(&c.data().shared).unknown_clusters.contains(&upstream) {
                return Ok(status::BAD_ARGUMENT);
            }
            let (vm, context_id) = (c.data().vm, c.data().effective);
            let token = {
                let mut shared = lock(&c.data().shared);
                shared.last_token += 1;
                let token = shared.last_token;
                shared.pending_calls.insert(
                    token,
                    HttpCall {
                        token,
                        vm,
                        context_id,
                        upstream,
                        headers: lossy(&headers),
                        body,
                        trailers: lossy(&trailers),
                        timeout_ms: timeout as u32,
                    },
                );
                token
            };
            write_u32(&mut c, token_ptr, token)?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> Result<i32> {
            let data = c.data_mut();
            if !data.contexts.contains_key(&(id as u32)) {
                return Ok(status::BAD_ARGUMENT);
            }
            data.effective = id as u32;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>,
         nptr: i32,
         nlen: i32,
         aptr: i32,
         alen: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> Result<i32> {
            let name = read_str(&mut c, nptr, nlen, "foreign function name")?;
            let arguments = read(&mut c, aptr, alen)?;
            let data = c.data_mut();
            let context_id = data.effective;
            if let Some(ctx) = context(data) {
                ctx.foreign_calls.push(ForeignCall {
                    context_id,
                    name: name.clone(),
                    arguments,
                });
            }
            match name.as_str() {
                "clear_route_cache" => {
                    write_u32(&mut c, ptr_ptr, 0)?;
                    write_u32(&mut c, size_ptr, 0)?;
                    Ok(status::OK)
                }
                // Envoy answers NotFound for a function it does not register.
                _ => Ok(status::NOT_FOUND),
            }
        },
    )?;

    linker.func_wrap("env", "proxy_done", |mut c: C<'_>| -> Result<i32> {
        let Some(ctx) = context(c.data_mut()) else {
            return Ok(status::BAD_ARGUMENT);
        };
        ctx.done_called = true;
        Ok(status::OK)
    })?;

    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, nptr: i32, nlen: i32, id_ptr: i32| -> Result<i32> {
            let name = read_str(&mut c, nptr, nlen, "metric name")?;
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let id = {
                // One stats store per host: the same name in two VMs is one stat, as in Envoy.
                let mut shared = lock(&c.data().shared);
                match shared.metrics.iter().position(|m| m.name == name) {
                    Some(i) => {
                        if shared.metrics[i].kind != kind {
                            bail!("metric {name:?} defined twice with different types");
                        }
                        i + 1
                    }
                    None => {
                        shared.metrics.push(Metric {
                            name,
                            kind,
                            value: 0,
                            samples: Vec::new(),
                        });
                        shared.metrics.len()
                    }
                }
            };
            write_u32(&mut c, id_ptr, id as u32)?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> Result<i32> {
            let value = {
                let shared = lock(&c.data().shared);
                match shared.metrics.get((id as u32 as usize).wrapping_sub(1)) {
                    None => return Ok(status::NOT_FOUND),
                    Some(m) if m.kind == MetricKind::Histogram => return Ok(status::BAD_ARGUMENT),
                    Some(m) => m.value,
                }
            };
            write(&mut c, ret, &value.to_le_bytes())?;
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, value: i64| -> Result<i32> {
            let mut shared = lock(&c.data().shared);
            let Some(m) = shared.metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else {
                return Ok(status::NOT_FOUND);
            };
            match m.kind {
                // Envoy only lets a counter grow.
                MetricKind::Counter => m.value = m.value.max(value as u64),
                MetricKind::Gauge => m.value = value as u64,
                MetricKind::Histogram => m.samples.push(value as u64),
            }
            Ok(status::OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, offset: i64| -> Result<i32> {
            let mut shared = lock(&c.data().shared);
            let Some(m) = shared.metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else {
                return Ok(status::NOT_FOUND);
            };
            match m.kind {
                MetricKind::Counter if offset < 0 => return Ok(status::BAD_ARGUMENT),
                MetricKind::Counter | MetricKind::Gauge => {
                    m.value = (m.value as i64).wrapping_add(offset) as u64;
                }
                MetricKind::Histogram => return Ok(status::BAD_ARGUMENT),
            }
            Ok(status::OK)
        },
    )?;

    Ok(())
}

/// Every import the module needs but the linker lacks becomes a function that
/// traps with a message naming it: an unemulated host call fails loudly.
pub(crate) fn trap_unknown_imports(
    linker: &mut Linker<VmData>,
    store: &mut Store<VmData>,
    module: &Module,
) -> Result<Vec<String>> {
    let mut stubbed = Vec::new();
    for import in module.imports() {
        if linker.get_by_import(&mut *store, &import).is_some() {
            continue;
        }
        let (m, n) = (import.module().to_owned(), import.name().to_owned());
        let wasmtime::ExternType::Func(ty) = import.ty() else {
            bail!("the module imports {m}::{n}, which is not a function; prealloc-wasm-host cannot provide it");
        };
        stubbed.push(format!("{m}::{n}"));
        let (m2, n2) = (m.clone(), n.clone());
        linker.func_new(&m, &n, ty, move |_c, _params, _results| {
            Err(anyhow!(
                "the VM called {m2}::{n2}, which prealloc-wasm-host does not emulate; \
                 emulate it in tests/wasm-host/src/abi.rs"
            ))
        })?;
    }
    Ok(stubbed)
}

/// Sets the response an http call callback can read.
pub(crate) fn call_response(headers: Vec<Header>, body: Vec<u8>) -> CallResponse {
    CallResponse {
        no_response: false,
        headers,
        body,
        trailers: Vec::new(),
    }
}
