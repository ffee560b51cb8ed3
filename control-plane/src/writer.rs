//! The single writer: applies queued commands to the registry, commits each batch in
//! one durable transaction (group commit), then publishes route changes and answers.

use crate::plane::Core;
use crate::registry::{ManagerView, RegisterError, Registry, ReplicaError, Reserved};
use crate::routes::Change;
use crate::store::{Op, Store};
use prealloc_wire::{Availability, ConsumerId, ConsumerState, Registration};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Why a write was not done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Register(RegisterError),
    UnknownConsumer,
    UnknownManager(String),
    /// The transaction failed; nothing of the batch was kept.
    Storage(String),
    ShuttingDown,
}

impl From<ReplicaError> for Refusal {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::UnknownConsumer => Refusal::UnknownConsumer,
            ReplicaError::UnknownManager(m) => Refusal::UnknownManager(m),
        }
    }
}

/// Answer of a replica report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaAck {
    pub consumer: ConsumerId,
    pub state: ConsumerState,
    /// Manager ids holding the data, the first manager first.
    pub replicas: Vec<String>,
    /// False when this copy was already recorded.
    pub added: bool,
}

type Reply<T> = oneshot::Sender<Result<T, Refusal>>;

/// A write, queued for the writer.
pub enum Command {
    Register {
        resource_type: String,
        location: Option<String>,
        reply: Reply<Registration>,
    },
    Release {
        consumer: ConsumerId,
        reply: Reply<()>,
    },
    Replica {
        consumer: ConsumerId,
        manager: String,
        reply: Reply<ReplicaAck>,
    },
    Availability {
        manager: String,
        availability: Availability,
        reply: Reply<ManagerView>,
    },
    Reserve {
        pool: usize,
        count: usize,
        reply: Reply<Vec<Reserved>>,
    },
    Provisioned {
        id: u64,
        reply: Reply<bool>,
    },
    Abandon {
        id: u64,
        reply: Reply<bool>,
    },
    /// Registered consumers whose grace period is over leave the routing table.
    Expire {
        consumers: Vec<ConsumerId>,
        reply: Reply<()>,
    },
    Stop,
}

/// A reply held until the batch's commit is known.
type Deferred = Box<dyn FnOnce(Option<&str>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, value: Result<T, Refusal>) -> Deferred {
    Box::new(move |failure: Option<&str>| {
        let v = match failure {
            None => value,
            Some(msg) => Err(Refusal::Storage(msg.to_owned())),
        };
        let _ = reply.send(v);
    })
}

/// Runs the writer until a `Stop` command or until every sender is gone.
pub fn run(core: Arc<Core>, mut store: Box<dyn Store>, mut rx: mpsc::Receiver<Command>) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut version = core.routes.version();
    let mut persisted_next_id = core.registry().next_resource_id;
    let max_batch = core.config.max_write_batch;
    loop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let now = crate::now_ms();
        let mut ops: Vec<Op> = Vec::with_capacity(batch.len() * 3);
        let mut changes: Vec<Change> = Vec::new();
        let mut managers_changed = false;
        let mut replies: Vec<Deferred> = Vec::with_capacity(batch.len());
        let mut notify: BTreeSet<usize> = BTreeSet::new();
        let mut notify_all = false;
        let mut new_registering: Vec<ConsumerId> = Vec::new();
        let mut newly_registered: Vec<(ConsumerId, u64)> = Vec::new();
        let mut lags: Vec<u64> = Vec::new();
        let (mut n_reg, mut n_empty, mut n_bad, mut n_rel, mut n_rep) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut stop = false;
        let commands = batch.len() as u64;
        let managers_after;
        {
            let mut reg = core.registry();
            for cmd in batch {
                match cmd {
                    Command::Register {
                        resource_type,
                        location,
                        reply,
                    } => {
                        let id = fresh_id(&reg, &mut rng);
                        let r = reg.register(
                            &resource_type,
                            location.as_deref(),
                            id.clone(),
                            now,
                            &mut ops,
                        );
                        match r {
                            Ok((registration, pool)) => {
                                n_reg += 1;
                                notify.insert(pool);
                                let entry = reg.route_entry(&id).expect("just registered");
                                if entry.state == ConsumerState::Registered {
                                    newly_registered.push((id.clone(), now));
                                } else {
                                    new_registering.push(id.clone());
                                }
                                changes.push((id, Some(entry)));
                                replies.push(defer(reply, Ok(registration)));
                            }
                            Err(e) => {
                                if matches!(e, RegisterError::PoolEmpty { .. }) {
                                    n_empty += 1;
                                } else {
                                    n_bad += 1;
                                }
                                replies.push(defer(reply, Err(Refusal::Register(e))));
                            }
                        }
                    }
                    Command::Release { consumer, reply } => {
                        match reg.release(&consumer, &mut ops) {
                            Some(pool) => {
                                n_rel += 1;
                                notify.insert(pool);
                                changes.push((consumer, None));
                                replies.push(defer(reply, Ok(())));
                            }
                            None => replies.push(defer(reply, Err(Refusal::UnknownConsumer))),
                        }
                    }
                    Command::Replica {
                        consumer,
                        manager,
                        reply,
                    } => {
                        let before = reg.route_entry(&consumer).map(|e| e.state);
                        match reg.add_replica(&consumer, &manager, now, &mut ops) {
                            Ok(outcome) => {
                                let entry = reg.route_entry(&consumer).expect("known consumer");
                                if outcome.added {
                                    n_rep += 1;
                                    if let Some(l) = outcome.lag_ms {
                                        lags.push(l);
                                    }
                                    // A registered consumer past its grace stays out of the table.
                                    let in_window = before == Some(ConsumerState::Registering)
                                        || core.routes.contains(&consumer)
                                        || changes.iter().any(|(c, _)| c == &consumer);
                                    if in_window {
                                        changes.push((consumer.clone(), Some(entry.clone())));
                                    }
                                }
                                if outcome.became_registered {
                                    newly_registered.push((consumer.clone(), now));
                                }
                                let ack = ReplicaAck {
                                    consumer,
                                    state: entry.state,
                                    replicas: entry.replicas,
                                    added: outcome.added,
                                };
                                replies.push(defer(reply, Ok(ack)));
                            }
                            Err(e) => replies.push(defer(reply, Err(e.into()))),
                        }
                    }
                    Command::Availability {
                        manager,
                        availability,
                        reply,
                    } => match reg.set_availability(&manager, availability, &mut ops) {
                        Some(changed) => {
                            if changed {
                                managers_changed = true;
                                notify_all = true;
                                tracing::info!(manager = %manager, availability = availability.as_str(), "availability changed");
                            }
                            let idx = reg.manager_index(&manager).expect("known manager");
                            replies.push(defer(reply, Ok(reg.manager_view(idx))));
                        }
                        None => replies.push(defer(reply, Err(Refusal::UnknownManager(manager)))),
                    },
                    Command::Reserve { pool, count, reply } => {
                        let mut got = Vec::new();
                        for _ in 0..count {
                            match reg.reserve(pool, now, &mut ops) {
                                Some(r) => got.push(r),
                                None => break,
                            }
                        }
                        replies.push(defer(reply, Ok(got)));
                    }
                    Command::Provisioned { id, reply } => {
                        let ok = reg.provisioned(id, &mut ops);
                        replies.push(defer(reply, Ok(ok)));
                    }
                    Command::Abandon { id, reply } => {
                        if let Some((pool, _, _)) = reg.resource_info(id) {
                            notify.insert(pool);
                        }
                        let ok = reg.abandon(id, &mut ops);
                        replies.push(defer(reply, Ok(ok)));
                    }
                    Command::Expire { consumers, reply } => {
                        for c in consumers {
                            let registered = reg
                                .route_entry(&c)
                                .map(|e| e.state == ConsumerState::Registered)
                                .unwrap_or(true);
                            if registered && core.routes.contains(&c) {
                                changes.push((c, None));
                            }
                        }
                        replies.push(defer(reply, Ok(())));
                    }
                    Command::Stop => stop = true,
                }
            }
            if reg.next_resource_id != persisted_next_id {
                ops.push(Op::SetMeta {
                    key: "next_resource_id".into(),
                    value: reg.next_resource_id.to_string(),
                });
            }
            managers_after = managers_changed.then(|| reg.manager_routes());
        }
        let route_changed = !changes.is_empty() || managers_changed;
        if route_changed {
            version += 1;
            ops.push(Op::SetMeta {
                key: "version".into(),
                value: version.to_string(),
            });
        }
        let started = std::time::Instant::now();
        match store.commit(&ops) {
            Ok(()) => {
                let m = &core.metrics;
                if !ops.is_empty() {
                    m.commits.fetch_add(1, Ordering::Relaxed);
                    m.commit_seconds
                        .observe_secs(started.elapsed().as_secs_f64());
                }
                m.committed_commands.fetch_add(commands, Ordering::Relaxed);
                m.registrations.fetch_add(n_reg, Ordering::Relaxed);
                m.registrations_pool_empty
                    .fetch_add(n_empty, Ordering::Relaxed);
                m.registrations_bad_request
                    .fetch_add(n_bad, Ordering::Relaxed);
                m.registrations_released.fetch_add(n_rel, Ordering::Relaxed);
                m.replicas_recorded.fetch_add(n_rep, Ordering::Relaxed);
                m.consumers_registered
                    .fetch_add(newly_registered.len() as u64, Ordering::Relaxed);
                for l in lags {
                    m.replication_lag.observe_secs(l as f64 / 1000.0);
                }
                persisted_next_id = core.registry().next_resource_id;
                if route_changed {
                    core.routes.publish(version, changes, managers_after);
                }
                for r in replies {
                    r(None);
                }
                if notify_all {
                    core.pool_notify.iter().for_each(|n| n.notify_one());
                } else {
                    for p in notify {
                        if let Some(n) = core.pool_notify.get(p) {
                            n.notify_one();
                        }
                    }
                }
                if !newly_registered.is_empty() {
                    core.expiry
                        .push(newly_registered, core.config.grace_period_ms);
                }
                if let Some(tx) = &core.replicate_tx {
                    for c in new_registering {
                        let _ = tx.send(c);
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(error = %msg, ops = ops.len(), "store commit failed; reloading state from the store");
                core.metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                if route_changed {
                    version -= 1;
                }
                match store
                    .load()
                    .and_then(|s| Registry::from_snapshot(&core.config, &s))
                {
                    Ok(fresh) => {
                        persisted_next_id = fresh.next_resource_id;
                        *core.registry() = fresh;
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "reloading state failed"),
                }
                let text = format!(
                    "the database refused the write ({msg}); nothing was changed, retry later"
                );
                for r in replies {
                    r(Some(&text));
                }
            }
        }
        if stop {
            break;
        }
    }
    // Anything still queued is answered, not dropped silently.
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        refuse(cmd);
    }
}

fn refuse(cmd: Command) {
    match cmd {
        Command::Register { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Release { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Replica { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Availability { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Reserve { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Provisioned { reply, .. } | Command::Abandon { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Expire { reply, .. } => {
            let _ = reply.send(Err(Refusal::ShuttingDown));
        }
        Command::Stop => {}
    }
}

fn fresh_id(reg: &Registry, rng: &mut rand::rngs::StdRng) -> ConsumerId {
    loop {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        let id = ConsumerId::from_bytes(b);
        if !reg.contains(&id) {
            return id;
        }
    }
}

/// Sends a command and waits for its answer.
pub async fn call<T>(
    tx: &mpsc::Sender<Command>,
    make: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, Refusal> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| Refusal::ShuttingDown)?;
    rx.await.map_err(|_| Refusal::ShuttingDown)?
}
