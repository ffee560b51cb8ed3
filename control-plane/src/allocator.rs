//! Pre-allocation: one task per pool keeps it at its target depth; reservations that
//! need provisioning are provisioned with timeout and backoff, or given back.

use crate::command::{Abandon, Provisioned, Reserve};
use crate::manager_client::backoff;
use crate::state::Plane;
use bytes::Bytes;
use hyper::Method;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Reservations asked of the writer at once: big enough to fill a pool fast at
/// start, small enough to keep one transaction short.
const RESERVE_CHUNK: u64 = 256;

/// Keeps one pool at its target depth until stopped.
pub async fn run_pool(plane: Plane, pool: usize) {
    let core = plane.core.clone();
    let mut stop = core.stop.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        if !core.on_duty() {
            // Another control plane on the shared database fills the pools.
            let mut duties = core.duties.subscribe();
            tokio::select! {
                _ = duties.wait_for(|on| *on) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let notified = core.pool_notify[pool].notified();
        let deficit = core.registry().deficit(pool);
        if deficit > 0 {
            let count = deficit.min(RESERVE_CHUNK) as usize;
            match plane.writer.call(Reserve { pool, count }).await {
                Ok(got) if !got.is_empty() => {
                    for r in got {
                        if r.needs_provisioning {
                            tokio::spawn(provision(plane.clone(), r.id, r.manager));
                        }
                    }
                    continue;
                }
                Ok(_) => {
                    // No available manager with free capacity: wait for a change
                    // (availability, a resource given back), re-checking now and then.
                }
                Err(e) => tracing::warn!(pool, error = ?e, "reservation failed; retrying"),
            }
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Asks the manager to provision one reserved resource; on success the resource
/// joins its pool, after the last failed attempt the reservation is given back.
pub async fn provision(plane: Plane, id: u64, manager: usize) {
    let core = plane.core.clone();
    let cfg = core.config.provisioning.clone();
    let (url, token, body, manager_id) = {
        let reg = core.registry();
        let Some((_, rtype, name)) = reg.resource_info(id) else {
            return;
        };
        let m = &reg.managers()[manager];
        let Ok(base) = crate::manager_client::BaseUrl::parse(&m.admin_url) else {
            return;
        };
        let body = serde_json::json!({ "id": id, "type": rtype, "name": name });
        (
            base.join("/prealloc/v1/resources"),
            m.token.clone(),
            body.to_string(),
            m.id.clone(),
        )
    };
    let timeout = Duration::from_millis(cfg.timeout_ms);
    for attempt in 0..cfg.attempts {
        if *core.stop.borrow() {
            return; // resumed after the restart: the row is still `provisioning`
        }
        let Ok(permit) = core.provision_permits.acquire().await else {
            return;
        };
        let res = core
            .client
            .call(
                Method::POST,
                &url,
                token.as_deref(),
                Bytes::from(body.clone()),
                "application/json",
                timeout,
            )
            .await;
        drop(permit);
        match res {
            Ok(_) => {
                let _ = plane.writer.call(Provisioned { id }).await;
                tracing::debug!(resource = id, manager = %manager_id, "provisioned");
                return;
            }
            Err(e) => {
                core.metrics
                    .provision_attempt_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(resource = id, manager = %manager_id, attempt = attempt + 1, error = %e, "provisioning failed");
                if attempt + 1 < cfg.attempts {
                    tokio::time::sleep(backoff(attempt, cfg.retry_min_ms, cfg.retry_max_ms)).await;
                }
            }
        }
    }
    core.metrics
        .provision_abandoned
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(resource = id, manager = %manager_id, "giving the reservation back after {} attempts", cfg.attempts);
    let _ = plane.writer.call(Abandon { id }).await;
}
