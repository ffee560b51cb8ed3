//! Active replication: copies each registering consumer's data from a manager that
//! holds it to the managers that still need it, and records every confirmed copy.

use crate::command::{Refusal, Replica};
use crate::manager_client::{backoff, BaseUrl, CallError};
use crate::state::Plane;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use prealloc_wire::ConsumerId;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// Starts one copying task per consumer received, with bounded copies in flight.
pub async fn run(plane: Plane, mut rx: mpsc::UnboundedReceiver<ConsumerId>) {
    let permits = Arc::new(Semaphore::new(plane.core.config.replication.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            c = rx.recv() => match c {
                Some(c) => { tasks.spawn(replicate(plane.clone(), c, permits.clone())); }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Copies until the consumer is registered or gone.
async fn replicate(plane: Plane, consumer: ConsumerId, permits: Arc<Semaphore>) {
    let core = plane.core.clone();
    let cfg = core.config.replication.clone();
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut failures: u32 = 0;
    // The sign-up reaches the first manager after the registration answer: give it a moment.
    tokio::time::sleep(Duration::from_millis(cfg.retry_min_ms)).await;
    loop {
        if *core.stop.borrow() {
            return;
        }
        let Some(plan) = core.registry().copy_plan(&consumer) else {
            return;
        };
        if plan.done {
            return;
        }
        let mut progressed = false;
        let mut failed = plan.targets.is_empty() || plan.sources.is_empty();
        if !failed {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let data = read_from_any(&plane, &consumer, &plan.sources, timeout).await;
            match data {
                Some(data) => {
                    for target in &plan.targets {
                        match write_to(&plane, &consumer, target, data.clone(), timeout).await {
                            Ok(()) => {
                                core.metrics.copies.fetch_add(1, Ordering::Relaxed);
                                let manager = target.clone();
                                let c = consumer.clone();
                                match plane
                                    .writer
                                    .call(Replica {
                                        consumer: c,
                                        manager,
                                    })
                                    .await
                                {
                                    Ok(_) => progressed = true,
                                    Err(Refusal::UnknownConsumer) => return,
                                    Err(e) => {
                                        tracing::warn!(consumer = %consumer, manager = %target, error = ?e, "recording a copy failed");
                                        failed = true;
                                    }
                                }
                            }
                            Err(e) => {
                                core.metrics.copy_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(consumer = %consumer, manager = %target, error = %e, "copy failed; will retry");
                                failed = true;
                            }
                        }
                    }
                }
                None => failed = true,
            }
        }
        if failed && !progressed {
            let wait = backoff(failures, cfg.retry_min_ms, cfg.retry_max_ms);
            failures = failures.saturating_add(1);
            let mut stop = core.stop.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        } else if failed {
            failures = 0;
        }
    }
}

fn endpoint(
    plane: &Plane,
    manager: &str,
    consumer: &ConsumerId,
) -> Option<(String, Option<String>)> {
    let reg = plane.core.registry();
    let i = reg.manager_index(manager)?;
    let m = &reg.managers()[i];
    let base = BaseUrl::parse(&m.admin_url).ok()?;
    Some((
        base.join(&format!("/prealloc/v1/consumers/{consumer}/data")),
        m.token.clone(),
    ))
}

async fn read_from_any(
    plane: &Plane,
    consumer: &ConsumerId,
    sources: &[String],
    timeout: Duration,
) -> Option<Bytes> {
    for s in sources {
        let Some((url, token)) = endpoint(plane, s, consumer) else {
            continue;
        };
        match plane
            .core
            .client
            .call(
                Method::GET,
                &url,
                token.as_deref(),
                Bytes::new(),
                "application/octet-stream",
                timeout,
            )
            .await
        {
            Ok((_, body)) => return Some(body),
            Err(CallError::Status(StatusCode::NOT_FOUND)) => {
                // Not there yet: the sign-up has not reached the manager.
                tracing::debug!(consumer = %consumer, manager = %s, "data not held yet");
            }
            Err(e) => {
                plane
                    .core
                    .metrics
                    .copy_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(consumer = %consumer, manager = %s, error = %e, "reading data failed");
            }
        }
    }
    None
}

async fn write_to(
    plane: &Plane,
    consumer: &ConsumerId,
    target: &str,
    data: Bytes,
    timeout: Duration,
) -> Result<(), CallError> {
    let (url, token) = endpoint(plane, target, consumer)
        .ok_or_else(|| CallError::Url(format!("manager {target} has no usable admin_url")))?;
    plane
        .core
        .client
        .call(
            Method::PUT,
            &url,
            token.as_deref(),
            data,
            "application/octet-stream",
            timeout,
        )
        .await
        .map(|_| ())
}
