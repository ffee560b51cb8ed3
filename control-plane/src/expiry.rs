//! Deadlines: registered consumers leave the routing table when their grace
//! period ends; provisional registrations are reclaimed when their lease ends.

use crate::command::{Expire, Reclaim, Write};
use crate::state::{Deadlines, Plane};
use prealloc_wire::ConsumerId;
use std::time::Duration;

/// Sends the consumers whose grace period ended to the writer, until stopped.
pub async fn run(plane: Plane) {
    run_queue(plane, expiry_queue, |consumers, due_ms| Expire {
        consumers,
        due_ms,
    })
    .await
}

fn expiry_queue(p: &Plane) -> &Deadlines {
    &p.core.expiry
}

fn lease_queue(p: &Plane) -> &Deadlines {
    &p.core.leases
}

/// Reclaims registrations whose lease ended unconfirmed, until stopped.
pub async fn run_leases(plane: Plane) {
    run_queue(plane, lease_queue, |consumers, due_ms| Reclaim {
        consumers,
        due_ms,
    })
    .await
}

async fn run_queue<W: Write>(
    plane: Plane,
    queue: fn(&Plane) -> &Deadlines,
    write: impl Fn(Vec<ConsumerId>, u64) -> W,
) {
    loop {
        let q = queue(&plane);
        let notified = q.notify.notified();
        let now = crate::now_ms();
        let (due, next) = q.take_due(now);
        if !due.is_empty() {
            let _ = plane.writer.call(write(due, now)).await;
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
