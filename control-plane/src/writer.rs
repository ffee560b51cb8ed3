//! The single writer: applies queued writes to the registry, commits each batch
//! in one durable transaction (group commit), then publishes and answers.
//! Nothing a batch did is visible outside (routes, answers, wake-ups) before
//! its commit; a failed commit answers every write of it with a refusal and
//! reloads the registry from the store. Should that reload fail too (the
//! database is unreachable), memory is ahead of the store: every later write
//! is refused until a reload succeeds.

use crate::batch::Batch;
use crate::command::{Msg, Queued, Refusal};
use crate::registry::Registry;
use crate::state::Core;
use crate::store::{Foreign, Op, Published, Store};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

struct WriterLoop {
    core: Arc<Core>,
    store: Box<dyn Store>,
    batch: Batch,
    /// Writes of the round, applied in order.
    queued: VecDeque<Box<dyn Queued>>,
    /// Answers waiting for the commit of the batch.
    replies: Vec<crate::command::Deferred>,
    /// Routes version of the last commit.
    version: u64,
    /// `next_resource_id` as the store has it.
    persisted_next_id: u64,
    /// Why memory may hold writes the store refused: a reload after a failed
    /// commit failed. Cleared by the next reload that succeeds.
    stale: Option<String>,
}

/// Runs the writer until a `Stop` message or until every sender is gone. A
/// panic inside is caught: the failure is published (`/healthz` fails, writes
/// answer `writer_failed`) before any waiting caller learns of it.
pub fn run(core: Arc<Core>, store: Box<dyn Store>, mut rx: mpsc::Receiver<Msg>) {
    let mut w = WriterLoop {
        version: core.routes.version(),
        persisted_next_id: core.registry().next_resource_id,
        core: core.clone(),
        store,
        batch: Batch::new(),
        queued: VecDeque::new(),
        replies: Vec::new(),
        stale: None,
    };
    let max_batch = core.config.max_write_batch;
    let mut failure = None;
    loop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut stop = false;
        for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match msg {
                Msg::Write(q) => w.queued.push_back(q),
                Msg::CatchUp => {}
                Msg::Stop => stop = true,
            }
            if stop || w.queued.len() >= max_batch {
                break;
            }
        }
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| w.round())) {
            let why = panic_message(&*panic);
            tracing::error!(error = %why, "the writer thread panicked; no more writes are taken");
            core.writer_failure
                .send_replace(Some(format!("the writer thread panicked: {why}")));
            failure = core.writer_failure.borrow().clone();
            // Unanswered writes of the failed round learn it now.
            w.replies.clear();
            w.queued.clear();
            break;
        }
        if stop {
            break;
        }
    }
    // Anything still queued is answered, not dropped silently.
    rx.close();
    let why = match failure {
        Some(f) => Refusal::WriterFailed(f),
        None => Refusal::ShuttingDown,
    };
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Write(q) = msg {
            q.refuse(why.clone());
        }
    }
}

impl WriterLoop {
    /// One group commit: apply every queued write, commit, then publish or roll back.
    fn round(&mut self) {
        if self.stale.is_some() {
            self.reload();
        }
        if let Some(why) = &self.stale {
            let why = Refusal::Storage(format!(
                "the database cannot be read ({why}); nothing was changed, retry later"
            ));
            self.refuse_queued(why);
            return;
        }
        // A shared database: the commit lock for this round, and what the
        // other control planes committed since the last one, applied first.
        let foreign = match self.store.begin() {
            Ok(f) => f,
            Err(e) if e.downcast_ref::<crate::store::FellBehind>().is_some() => {
                // Nothing here can catch up: fail like a dead writer, so
                // `/healthz` says so and the instance is restarted.
                let why = format!("{e:#}");
                tracing::error!(error = %why, "no more writes are taken");
                self.core.writer_failure.send_replace(Some(why.clone()));
                self.refuse_queued(Refusal::WriterFailed(why));
                return;
            }
            Err(e) => {
                self.refuse_queued(Refusal::Storage(format!(
                    "the database cannot be read ({e:#}); nothing was changed, retry later"
                )));
                return;
            }
        };
        if !foreign.is_empty() {
            if let Err(why) = self.apply_foreign(foreign) {
                tracing::error!(error = %why, "another control plane's batch does not apply here; reloading state from the store");
                self.stale = Some(why);
                let _ = self.store.commit(&[]);
                self.refuse_queued(Refusal::Storage(
                    "this control plane is reloading its state; nothing was changed, retry".into(),
                ));
                return;
            }
        }
        self.batch.begin(crate::now_ms());
        self.batch.counts.commands = self.queued.len() as u64;
        {
            let mut reg = self.core.registry();
            // Popped one by one (not drained): should a write panic, the ones
            // after it stay queued until the failure is published.
            while let Some(q) = self.queued.pop_front() {
                let reply = q.apply(&mut reg, &mut self.batch, &mut *self.store);
                self.replies.push(reply);
            }
            if reg.next_resource_id != self.persisted_next_id {
                self.batch.ops.push(Op::SetMeta {
                    key: "next_resource_id".into(),
                    value: reg.next_resource_id.to_string(),
                });
            }
        }
        let version = self.version + 1;
        if self.batch.routes_changed() {
            self.batch.ops.push(Op::SetMeta {
                key: "version".into(),
                value: version.to_string(),
            });
            if self.store.shared() {
                // For the other control planes on the database.
                let managers = self
                    .batch
                    .managers_changed
                    .then(|| self.core.registry().manager_routes());
                self.batch.ops.push(Op::Published(Published {
                    version,
                    changes: self.batch.changes.clone(),
                    managers,
                }));
            }
        }
        let started = std::time::Instant::now();
        match self.store.commit(&self.batch.ops) {
            Ok(()) => {
                self.record_metrics(started.elapsed());
                if self.batch.routes_changed() {
                    self.version = version;
                }
                self.publish();
                self.answer(None);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(error = %msg, ops = self.batch.ops.len(), "store commit failed; reloading state from the store");
                self.core
                    .metrics
                    .commit_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.reload();
                self.answer(Some(&Refusal::Storage(format!(
                    "the database refused the write ({msg}); nothing was changed, retry later"
                ))));
            }
        }
    }

    /// Answers every queued write of the round with `why`, applying none.
    fn refuse_queued(&mut self, why: Refusal) {
        for q in self.queued.drain(..) {
            q.refuse(why.clone());
        }
    }

    /// Another control plane's batches: their routing changes are published
    /// here at their versions, their ops replayed on the registry.
    fn apply_foreign(&mut self, foreign: Vec<Foreign>) -> Result<(), String> {
        for f in &foreign {
            if let Some(p) = f.published() {
                // A reload keeps its place in the log: what it already
                // published is skipped.
                if p.version > self.version {
                    self.core
                        .routes
                        .publish(p.version, p.changes.clone(), p.managers.clone());
                    self.version = p.version;
                }
            }
        }
        let now = crate::now_ms();
        let mut reg = self.core.registry();
        for f in &foreign {
            reg.apply(&f.ops, now).map_err(|e| format!("{e:#}"))?;
        }
        self.persisted_next_id = reg.next_resource_id;
        // The duty holder keeps the deadlines and copies of every consumer,
        // whoever signed it up.
        if self.core.on_duty() {
            let (mut leases, mut leaving, mut copies) = (Vec::new(), Vec::new(), Vec::new());
            for op in foreign.iter().flat_map(|f| &f.ops) {
                let resource = match op {
                    Op::Assign { resource, .. } | Op::SetRegistered { resource, .. } => *resource,
                    _ => continue,
                };
                let Some(c) = reg.consumer_of(resource) else {
                    continue;
                };
                if let Op::Assign { .. } = op {
                    leases.extend(reg.lease_end(&c).map(|end| (end, c.clone())));
                }
                match reg.route_window_end(&c) {
                    Some(end) => leaving.push((end, c)),
                    None => copies.push(c),
                }
            }
            drop(reg);
            self.core.leases.push(leases);
            self.core.expiry.push(leaving);
            if let Some(tx) = &self.core.replicate_tx {
                for c in copies {
                    let _ = tx.send(c);
                }
            }
        } else {
            drop(reg);
        }
        // Their sign-ups took from the pools.
        self.core.pool_notify.iter().for_each(|n| n.notify_one());
        Ok(())
    }

    /// Makes a committed batch visible: routes, pool wake-ups, expiry, copies.
    fn publish(&mut self) {
        let core = &self.core;
        let b = &mut self.batch;
        let persisted = core.registry().next_resource_id;
        self.persisted_next_id = persisted;
        if b.routes_changed() {
            let managers = b.managers_changed.then(|| core.registry().manager_routes());
            core.routes
                .publish(self.version, std::mem::take(&mut b.changes), managers);
        }
        if b.all_pools {
            core.pool_notify.iter().for_each(|n| n.notify_one());
        } else {
            for &p in &b.pools {
                if let Some(n) = core.pool_notify.get(p) {
                    n.notify_one();
                }
            }
        }
        // Deadlines and copies are the duty holder's (always this control
        // plane, unless several share the database).
        if !core.on_duty() {
            return;
        }
        if !b.leaving.is_empty() {
            core.expiry.push(b.leaving.drain(..));
        }
        if !b.leases.is_empty() {
            core.leases.push(b.leases.drain(..));
        }
        if let Some(tx) = &core.replicate_tx {
            for c in b.to_replicate.drain(..) {
                let _ = tx.send(c);
            }
        }
    }

    /// After a failed commit the in-memory state is ahead of the store: read it back.
    fn reload(&mut self) {
        let fresh = self
            .store
            .load(crate::registry::load_window(
                &self.core.config,
                crate::now_ms(),
            ))
            .and_then(|s| Registry::from_snapshot(&self.core.config, &s));
        match fresh {
            Ok(fresh) => {
                self.persisted_next_id = fresh.next_resource_id;
                self.core.replace_registry(fresh);
                if self.stale.take().is_some() {
                    tracing::info!("state reloaded from the store; writes are taken again");
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                if self.stale.is_none() {
                    tracing::error!(error = %why, "reloading state failed; writes are refused until a reload succeeds");
                }
                self.stale = Some(why);
            }
        }
    }

    fn answer(&mut self, failed: Option<&Refusal>) {
        for reply in self.replies.drain(..) {
            reply(failed);
        }
    }

    fn record_metrics(&self, commit_time: std::time::Duration) {
        let m = &self.core.metrics;
        let b = &self.batch;
        let c = &b.counts;
        if !b.ops.is_empty() {
            m.commits.fetch_add(1, Ordering::Relaxed);
            m.commit_seconds.observe_secs(commit_time.as_secs_f64());
        }
        m.committed_commands
            .fetch_add(c.commands, Ordering::Relaxed);
        m.registrations
            .fetch_add(c.registrations, Ordering::Relaxed);
        m.registrations_pool_empty
            .fetch_add(c.pool_empty, Ordering::Relaxed);
        m.registrations_bad_request
            .fetch_add(c.bad_request, Ordering::Relaxed);
        m.registrations_released
            .fetch_add(c.released, Ordering::Relaxed);
        m.registrations_reclaimed
            .fetch_add(c.reclaimed, Ordering::Relaxed);
        m.replicas_recorded.fetch_add(c.replicas, Ordering::Relaxed);
        m.consumers_registered
            .fetch_add(c.registered, Ordering::Relaxed);
        for &l in &b.lags_ms {
            m.replication_lag.observe_secs(l as f64 / 1000.0);
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
