//! Process-wide and per-worker state. The module is loaded once per Envoy
//! process, so these statics are shared by the filter on every worker, the
//! cluster specifier and the poller on the main thread.

use std::cell::{Cell, RefCell};
use std::sync::{Arc, LazyLock, Mutex};

use prealloc_filter_core::cookie::VerifiedCookies;
use prealloc_filter_core::process_table::ProcessTable;
use prealloc_filter_core::table::AvailabilityView;

use crate::abi::EnvoyHeader;
use crate::filter::FilterShared;

/// The routing table: written by the poller (main thread), read by every
/// worker; the poller also holds it, to list the ids it has.
pub static TABLE: LazyLock<Arc<ProcessTable>> = LazyLock::new(|| Arc::new(ProcessTable::new()));

/// Live HTTP filter configurations, so the main thread can send their give-backs.
pub static FILTER_CONFIGS: Mutex<Vec<Arc<FilterShared>>> = Mutex::new(Vec::new());

/// What one worker keeps between requests.
pub struct Worker {
    /// The round-robin counter (per worker, as in the wasm build).
    pub rr: u64,
    /// The availability view and the table version it was read at.
    pub availability: (u64, Arc<AvailabilityView>),
    /// Reused buffer for the request header list.
    pub headers: Vec<EnvoyHeader>,
    /// Cookie values this worker already verified, for the filter
    /// configuration of that generation (`FilterShared::generation`, never
    /// reused; 0 = none yet): another configuration starts a new cache.
    pub cookies: (u64, VerifiedCookies),
}

thread_local! {
    pub static WORKER: RefCell<Worker> = RefCell::new(Worker {
        rr: 0,
        availability: (u64::MAX, Arc::new(AvailabilityView::all_available())),
        headers: Vec::with_capacity(32),
        cookies: (0, VerifiedCookies::default()),
    });

    /// The cluster the filter chose for the request being routed, read by the
    /// cluster specifier while the filter's `clear_route_cluster_cache` call
    /// re-runs it (synchronously, on this thread). (pointer, length) of a
    /// `&str` that outlives that call; `None` at every other time.
    static PENDING: Cell<Option<(*const u8, usize)>> = const { Cell::new(None) };
}

impl Worker {
    /// Re-reads the availability view if the table's version moved (one atomic
    /// load per request otherwise).
    pub fn refresh_availability(&mut self) {
        let version = TABLE.availability_version();
        if self.availability.0 != version {
            self.availability = (version, TABLE.availability());
        }
    }
}

/// Runs `f` (which re-selects the cluster) with `cluster` as the filter's choice.
pub fn with_pending_cluster(cluster: &str, f: impl FnOnce()) {
    PENDING.with(|p| p.set(Some((cluster.as_ptr(), cluster.len()))));
    f();
    PENDING.with(|p| p.set(None));
}

/// The cluster the filter chose, inside [`with_pending_cluster`]; else `None`.
pub fn pending_cluster<'a>() -> Option<&'a [u8]> {
    let (ptr, len) = PENDING.with(Cell::get)?;
    // SAFETY: set only by `with_pending_cluster` from a &str that lives until
    // the call it wraps returns, and cleared right after; the cluster specifier
    // reads it synchronously inside that call, on the same thread.
    Some(unsafe { std::slice::from_raw_parts(ptr, len) })
}
