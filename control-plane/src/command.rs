//! The writes: what the API and the background tasks may ask of the single
//! writer, how each one changes the registry and its batch, and the handle
//! that queues them.

use crate::batch::Batch;
use crate::registry::{
    ManagerView, NewId, RegisterError, Registry, ReleaseError, ReplicaError, Reserved,
};
use crate::store::{StoreRead, StoredConsumer};
use prealloc_wire::{Availability, ConsumerId, ConsumerState, Registration};
use rand::RngCore;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

/// Why a write was not done. Nothing of a refused write was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Register(RegisterError),
    UnknownConsumer,
    UnknownManager(String),
    /// A give-back of a confirmed registration: the managers hold its data.
    Confirmed,
    /// The transaction failed; nothing of the batch was kept.
    Storage(String),
    ShuttingDown,
    /// The writer thread died; the control plane takes no more writes.
    WriterFailed(String),
}

impl From<ReplicaError> for Refusal {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::UnknownConsumer => Refusal::UnknownConsumer,
            ReplicaError::UnknownManager(m) => Refusal::UnknownManager(m),
        }
    }
}

/// One kind of write. `apply` runs on the writer thread with the registry
/// locked; it records in the batch what must be made durable and published.
/// A refusal must leave the registry and the batch as they were. `db` reads
/// what is committed: a consumer that is not in memory is settled, and only
/// the database has it.
pub trait Write: Send + 'static {
    type Answer: Send + 'static;
    fn apply(
        self,
        reg: &mut Registry,
        batch: &mut Batch,
        db: &mut dyn StoreRead,
    ) -> Result<Self::Answer, Refusal>;
}

/// A consumer that is not in memory, read from the database.
fn settled_consumer(
    reg: &Registry,
    db: &mut dyn StoreRead,
    consumer: &ConsumerId,
) -> Result<Option<StoredConsumer>, Refusal> {
    db.consumer(consumer.as_str(), reg.resource_hint(consumer))
        .map_err(|e| {
            Refusal::Storage(format!(
                "the database could not be read ({e:#}); nothing was changed, retry later"
            ))
        })
}

/// A new consumer on a ready resource of the pool (`POST /v1/registrations`).
pub struct Register {
    pub resource_type: String,
    pub location: Option<String>,
}

impl Write for Register {
    type Answer = Registration;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<Registration, Refusal> {
        let registered = reg.register(
            &self.resource_type,
            self.location.as_deref(),
            NewId::Mint(b.rng.next_u64()),
            b.now_ms,
            &mut b.ops,
        );
        let (registration, pool) = match registered {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, RegisterError::PoolEmpty { .. }) {
                    b.counts.pool_empty += 1;
                } else {
                    b.counts.bad_request += 1;
                }
                return Err(Refusal::Register(e));
            }
        };
        let id = registration.consumer.clone();
        b.counts.registrations += 1;
        b.pools.insert(pool);
        b.leases
            .extend(reg.lease_end(&id).map(|end| (end, id.clone())));
        // A new consumer always enters the table; a target of one copy makes it
        // registered at once, and it leaves again after the grace period.
        match reg.route_window_end(&id) {
            Some(end) => {
                b.counts.registered += 1;
                b.leaving.push((end, id.clone()));
            }
            None => b.to_replicate.push(id.clone()),
        }
        let entry = reg.route_entry(&id);
        b.changes.push((id, entry));
        Ok(registration)
    }
}

/// Gives a provisional registration's resource back (`DELETE /v1/registrations/{id}`).
pub struct Release {
    pub consumer: ConsumerId,
}

impl Write for Release {
    type Answer = ();
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        db: &mut dyn StoreRead,
    ) -> Result<(), Refusal> {
        let pool = match reg.release(&self.consumer, &mut b.ops) {
            Ok(pool) => pool,
            Err(ReleaseError::Confirmed) => return Err(Refusal::Confirmed),
            // A settled consumer is confirmed: never given back.
            Err(ReleaseError::UnknownConsumer) => {
                return Err(match settled_consumer(reg, db, &self.consumer)? {
                    Some(_) => Refusal::Confirmed,
                    None => Refusal::UnknownConsumer,
                })
            }
        };
        b.counts.released += 1;
        b.pools.insert(pool);
        b.changes.push((self.consumer, None));
        Ok(())
    }
}

/// The filter confirms a registration once the first manager accepted the
/// sign-up (`POST /v1/registrations/{id}/confirm`): it is no longer a lease.
pub struct Confirm {
    pub consumer: ConsumerId,
}

impl Write for Confirm {
    /// Whether this call confirmed it (false: it already was).
    type Answer = bool;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        db: &mut dyn StoreRead,
    ) -> Result<bool, Refusal> {
        match reg.confirm(&self.consumer, b.now_ms, &mut b.ops) {
            Ok(confirmed) => {
                // Its grace period may be over already (a lease longer than it).
                reg.evict_if_settled(&self.consumer, b.now_ms);
                Ok(confirmed)
            }
            // A settled consumer was confirmed long ago.
            Err(ReplicaError::UnknownConsumer) => {
                match settled_consumer(reg, db, &self.consumer)? {
                    Some(_) => Ok(false),
                    None => Err(Refusal::UnknownConsumer),
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Provisional registrations whose lease ended (as of `due_ms`) are reclaimed:
/// resource back in the pool, consumer forgotten, table entry removed.
pub struct Reclaim {
    pub consumers: Vec<ConsumerId>,
    pub due_ms: u64,
}

impl Write for Reclaim {
    /// How many were reclaimed (the others were confirmed meanwhile, or gone).
    type Answer = usize;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<usize, Refusal> {
        let now = b.now_ms.max(self.due_ms);
        let mut n = 0;
        for c in self.consumers {
            // Confirmed meanwhile (no lease left), gone, or not due yet.
            if reg.lease_end(&c).is_none_or(|end| end > now) {
                continue;
            }
            if let Ok(pool) = reg.release(&c, &mut b.ops) {
                tracing::warn!(consumer = %c, "registration never confirmed: reclaimed, its resource is back in the pool");
                b.pools.insert(pool);
                b.changes.push((c, None));
                n += 1;
            }
        }
        b.counts.reclaimed += n as u64;
        Ok(n)
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

/// One confirmed copy of a consumer's data (reported, or made by the replicator).
pub struct Replica {
    pub consumer: ConsumerId,
    pub manager: String,
}

impl Write for Replica {
    type Answer = ReplicaAck;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        db: &mut dyn StoreRead,
    ) -> Result<ReplicaAck, Refusal> {
        let Replica { consumer, manager } = self;
        if !reg.contains(&consumer) {
            // Settled (or unknown): a late copy only adds its row.
            let stored = settled_consumer(reg, db, &consumer)?.ok_or(Refusal::UnknownConsumer)?;
            let (outcome, entry) = reg.settled_replica(&stored, &manager, b.now_ms, &mut b.ops)?;
            if outcome.added {
                b.counts.replicas += 1;
                b.lags_ms.extend(outcome.lag_ms);
            }
            return Ok(ReplicaAck {
                consumer,
                state: entry.state,
                replicas: entry.replicas,
                added: outcome.added,
            });
        }
        // Judged before the copy: the copy that completes the target still
        // reaches the table, so Envoys see the consumer registered.
        let in_window = reg.in_route_window(&consumer, b.now_ms);
        let outcome = reg.add_replica(&consumer, &manager, b.now_ms, &mut b.ops)?;
        let entry = reg.route_entry(&consumer).ok_or(Refusal::UnknownConsumer)?;
        if outcome.added {
            b.counts.replicas += 1;
            b.lags_ms.extend(outcome.lag_ms);
            // A registered consumer past its grace period stays out of the table.
            if in_window {
                b.changes.push((consumer.clone(), Some(entry.clone())));
            }
        }
        if outcome.became_registered {
            b.counts.registered += 1;
            b.leaving.extend(
                reg.route_window_end(&consumer)
                    .map(|end| (end, consumer.clone())),
            );
        }
        Ok(ReplicaAck {
            consumer,
            state: entry.state,
            replicas: entry.replicas,
            added: outcome.added,
        })
    }
}

/// Marks a manager available, draining or down.
pub struct SetAvailability {
    pub manager: String,
    pub availability: Availability,
}

impl Write for SetAvailability {
    type Answer = ManagerView;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<ManagerView, Refusal> {
        let changed = reg
            .set_availability(&self.manager, self.availability, &mut b.ops)
            .ok_or_else(|| Refusal::UnknownManager(self.manager.clone()))?;
        if changed {
            b.managers_changed = true;
            b.all_pools = true;
            tracing::info!(manager = %self.manager, availability = self.availability.as_str(), "availability changed");
        }
        if self.availability == Availability::Down {
            // The replication target stops waiting for a down manager: whoever
            // has every other copy is registered now. (Also when it was down
            // already: the control plane settles this way at start-up, for
            // managers the config or the database says are down.)
            let settled = reg.settle_targets(b.now_ms, &mut b.ops);
            if !settled.is_empty() {
                tracing::info!(manager = %self.manager, consumers = settled.len(), "registered without waiting for a down manager");
            }
            for consumer in settled {
                b.counts.registered += 1;
                if let Some(entry) = reg.route_entry(&consumer) {
                    b.changes.push((consumer.clone(), Some(entry)));
                }
                b.leaving.extend(
                    reg.route_window_end(&consumer)
                        .map(|end| (end, consumer.clone())),
                );
            }
        }
        let idx = reg
            .manager_index(&self.manager)
            .ok_or(Refusal::UnknownManager(self.manager))?;
        Ok(reg.manager_view(idx))
    }
}

/// Reserves up to `count` resources for a pool (pre-allocation).
pub struct Reserve {
    pub pool: usize,
    pub count: usize,
}

impl Write for Reserve {
    type Answer = Vec<Reserved>;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<Vec<Reserved>, Refusal> {
        // The deficit as of this batch: with other control planes on a shared
        // database, they may have filled the pool since the allocator looked.
        let count = self
            .count
            .min(usize::try_from(reg.deficit(self.pool)).unwrap_or(usize::MAX));
        Ok((0..count)
            .map_while(|_| reg.reserve(self.pool, b.now_ms, &mut b.ops))
            .collect())
    }
}

/// A manager provisioned a reserved resource: it joins its pool.
pub struct Provisioned {
    pub id: u64,
}

impl Write for Provisioned {
    type Answer = bool;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<bool, Refusal> {
        Ok(reg.provisioned(self.id, &mut b.ops))
    }
}

/// Provisioning failed for good: the reservation is given back.
pub struct Abandon {
    pub id: u64,
}

impl Write for Abandon {
    type Answer = bool;
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<bool, Refusal> {
        if let Some((pool, _, _)) = reg.resource_info(self.id) {
            b.pools.insert(pool);
        }
        Ok(reg.abandon(self.id, &mut b.ops))
    }
}

/// Registered consumers whose grace period ended (as of `due_ms`) leave the table.
pub struct Expire {
    pub consumers: Vec<ConsumerId>,
    pub due_ms: u64,
}

impl Write for Expire {
    type Answer = ();
    fn apply(
        self,
        reg: &mut Registry,
        b: &mut Batch,
        _db: &mut dyn StoreRead,
    ) -> Result<(), Refusal> {
        // The later of the two clocks: a clock stepping back must not keep them.
        let now = b.now_ms.max(self.due_ms);
        for c in self.consumers {
            if reg.route_window_over(&c, now) {
                // Out of the table; once confirmed, out of memory too.
                reg.evict_if_settled(&c, now);
                b.changes.push((c, None));
            }
        }
        Ok(())
    }
}

/// Sends a write's answer once its batch's fate is known: `None` when it
/// committed, the refusal every write of the batch gets when it did not.
pub type Deferred = Box<dyn FnOnce(Option<&Refusal>) + Send>;

/// A queued write with its reply channel, whatever its answer type.
pub trait Queued: Send {
    /// Applies the write; its answer waits for the commit.
    fn apply(
        self: Box<Self>,
        reg: &mut Registry,
        batch: &mut Batch,
        db: &mut dyn StoreRead,
    ) -> Deferred;
    /// Answers without applying.
    fn refuse(self: Box<Self>, why: Refusal);
}

struct Pending<W: Write> {
    write: W,
    reply: oneshot::Sender<Result<W::Answer, Refusal>>,
}

impl<W: Write> Queued for Pending<W> {
    fn apply(
        self: Box<Self>,
        reg: &mut Registry,
        batch: &mut Batch,
        db: &mut dyn StoreRead,
    ) -> Deferred {
        let Pending { write, reply } = *self;
        let answer = write.apply(reg, batch, db);
        Box::new(move |failed: Option<&Refusal>| {
            let _ = reply.send(match failed {
                None => answer,
                Some(why) => Err(why.clone()),
            });
        })
    }

    fn refuse(self: Box<Self>, why: Refusal) {
        let _ = self.reply.send(Err(why));
    }
}

/// What the writer's queue carries.
pub enum Msg {
    Write(Box<dyn Queued>),
    /// Another control plane committed to the shared database: a round, to
    /// read its batches (and publish their routing changes) now.
    CatchUp,
    /// Finish what is queued before this, then stop.
    Stop,
}

/// The handle that queues writes for the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    /// Set (with the reason) when the writer thread died.
    failure: watch::Receiver<Option<String>>,
}

impl Writer {
    pub fn new(tx: mpsc::Sender<Msg>, failure: watch::Receiver<Option<String>>) -> Writer {
        Writer { tx, failure }
    }

    /// Queues a write and waits until its batch committed (or failed).
    pub async fn call<W: Write>(&self, write: W) -> Result<W::Answer, Refusal> {
        let (reply, answer) = oneshot::channel();
        let msg = Msg::Write(Box::new(Pending { write, reply }));
        if self.tx.send(msg).await.is_err() {
            return Err(self.gone());
        }
        answer.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// Asks the writer to stop after what is already queued.
    pub async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
    }

    /// Wakes the writer for a round (a shared database changed). A full
    /// queue means a round is coming anyway.
    pub fn catch_up(&self) {
        let _ = self.tx.try_send(Msg::CatchUp);
    }

    /// [`Writer::stop`] without waiting for room in the queue.
    pub fn try_stop(&self) {
        let _ = self.tx.try_send(Msg::Stop);
    }

    /// Why the writer thread died, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    fn gone(&self) -> Refusal {
        match self.failure() {
            Some(why) => Refusal::WriterFailed(why),
            None => Refusal::ShuttingDown,
        }
    }
}
