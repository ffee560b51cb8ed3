//! Registered consumers leave the routing table when their grace period ends.

use crate::command::Expire;
use crate::state::Plane;
use std::time::Duration;

/// Sends the consumers whose grace period ended to the writer, until stopped.
pub async fn run(plane: Plane) {
    let core = &plane.core;
    loop {
        let notified = core.expiry.notify.notified();
        let now = crate::now_ms();
        let (due, next) = core.expiry.take_due(now);
        if !due.is_empty() {
            let _ = plane
                .writer
                .call(Expire {
                    consumers: due,
                    due_ms: now,
                })
                .await;
            continue;
        }
        match next {
            Some(at) => {
                let wait = at.saturating_sub(crate::now_ms());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}
