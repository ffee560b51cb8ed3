//! The domain state in memory: managers, pools, resources, consumers, replica sets.
//! Pure logic (no I/O): every mutation appends the [`Op`]s that make it durable.
//!
//! Memory holds the consumers that can still change: registering, provisional,
//! or in the route window (and the few newest, for the status page). A
//! consumer that is settled ([`crate::store::settled`]) leaves memory and is
//! only counted; the database keeps it, and reads of it go there.

use crate::config::{Config, ReplicationTarget};
use crate::ids::IdKey;
use crate::store::{self, Op, ReplicaRow, ResourceRow, ResourceState, Snapshot, StoredConsumer};
use anyhow::anyhow;
use prealloc_wire::{
    Availability, ConsumerId, ConsumerState, ManagerRoute, Registration, ResourceRef, RouteEntry,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// A manager as the control plane tracks it.
#[derive(Debug, Clone)]
pub struct Manager {
    pub id: String,
    pub cluster: String,
    pub location: String,
    pub admin_url: String,
    pub availability: Availability,
    pub provision: bool,
    pub token: Option<String>,
    /// Maximum resources per type.
    pub capacity: BTreeMap<String, u64>,
    /// Resources per type reserved, ready or assigned on this manager.
    pub used: HashMap<String, u64>,
}

impl Manager {
    pub fn free(&self, resource_type: &str) -> u64 {
        let cap = self.capacity.get(resource_type).copied().unwrap_or(0);
        cap.saturating_sub(self.used.get(resource_type).copied().unwrap_or(0))
    }
}

/// A (resource type, location) pool of ready resources.
#[derive(Debug, Clone)]
pub struct Pool {
    pub resource_type: String,
    pub location: String,
    pub target_depth: u64,
    /// Managers of the location, in config order.
    members: Vec<usize>,
    /// Ready resources per member (same index as `members`), oldest first.
    ready: Vec<VecDeque<u64>>,
    /// Resources reserved and being provisioned.
    pub provisioning: u64,
    alloc_cursor: usize,
    take_cursor: usize,
    /// Resources made ready since start (the pre-allocation rate is its derivative).
    pub preallocated_total: u64,
}

#[derive(Debug, Clone)]
struct Resource {
    id: u64,
    pool: usize,
    member: usize,
    state: ResourceState,
    consumer: Option<ConsumerId>,
    created_ms: u64,
}

#[derive(Debug, Clone)]
struct Consumer {
    resource: u64,
    /// Manager indices with the time each copy was confirmed; the first manager first.
    replicas: Vec<(usize, u64)>,
    created_ms: u64,
    registered_ms: Option<u64>,
    /// When the filter confirmed the sign-up (or a copy proved the data
    /// exists); `None` while the registration is a provisional lease.
    confirmed_ms: Option<u64>,
}

impl Consumer {
    fn state(&self) -> ConsumerState {
        match self.registered_ms {
            Some(_) => ConsumerState::Registered,
            None => ConsumerState::Registering,
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    UnknownResourceType(String),
    UnknownLocation {
        resource_type: String,
        location: String,
    },
    PoolEmpty {
        resource_type: String,
        location: String,
    },
}

/// Why a give-back was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseError {
    UnknownConsumer,
    /// The registration was confirmed: managers hold the consumer's data, so
    /// its resource is never handed to anyone else.
    Confirmed,
}

/// Why a replica report was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaError {
    UnknownConsumer,
    UnknownManager(String),
}

/// What recording a replica changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOutcome {
    pub added: bool,
    pub became_registered: bool,
    /// Time from sign-up to this copy, when it was added.
    pub lag_ms: Option<u64>,
}

/// A freshly reserved resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub id: u64,
    pub manager: usize,
    pub needs_provisioning: bool,
}

/// Everything in memory.
#[derive(Debug, Clone)]
pub struct Registry {
    target: ReplicationTarget,
    /// How long a registered consumer stays in the routing table (`grace_period_ms`).
    grace_ms: u64,
    /// How long a registration may stay unconfirmed (`registration_lease_ms`).
    lease_ms: u64,
    managers: Vec<Manager>,
    manager_idx: HashMap<String, usize>,
    pools: Vec<Pool>,
    pool_idx: HashMap<(String, String), usize>,
    // B-trees, not hash maps: a hash map that doubles rehashes every entry in
    // one go, which stalled the writer for seconds at 0.5M and 0.9M consumers
    // (BENCHMARKS.md, section 6); a B-tree grows a node at a time.
    resources: BTreeMap<u64, Resource>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    /// The latest sign-ups, oldest first, at most [`RECENT`] (the status
    /// page's per-consumer progress; given-back ones are skipped when shown).
    recent: VecDeque<ConsumerId>,
    /// How many consumers are registering (pinned to their first manager).
    registering: usize,
    /// Settled consumers out of memory, per (first manager, resource type):
    /// their resources count in [`Manager::used`] without being held here.
    settled: BTreeMap<(usize, String), u64>,
    /// All settled consumers out of memory.
    settled_total: u64,
    /// Mints consumer ids that name their resource (`ids.rs`).
    ids: IdKey,
    pub next_resource_id: u64,
}

/// The id of a new consumer.
#[derive(Debug, Clone)]
pub enum NewId {
    /// Minted from the resource it gets and this random nonce: the database
    /// finds it by primary key once it is settled (what the control plane does).
    Mint(u64),
    /// Chosen by the caller (tests); found only while in memory.
    Given(ConsumerId),
}

/// The meta key holding the database's consumer-id key.
pub const ID_KEY: &str = "consumer_id_key";

/// How many of the latest sign-ups the status page follows one by one.
pub const RECENT: usize = 20;

/// What a load at `now_ms` reads into memory: everything but the settled consumers.
pub fn load_window(config: &Config, now_ms: u64) -> store::LoadWindow {
    store::LoadWindow {
        now_ms,
        grace_ms: config.grace_period_ms,
        recent: RECENT,
    }
}

impl Registry {
    /// An empty registry with the config's managers and pools.
    pub fn new(config: &Config) -> Registry {
        let managers: Vec<Manager> = config
            .managers
            .iter()
            .map(|m| Manager {
                id: m.id.clone(),
                cluster: m.cluster.clone(),
                location: m.location.clone(),
                admin_url: m.admin_url.clone(),
                availability: m.availability,
                provision: m.provision,
                token: m.token.clone(),
                capacity: m.capacity.clone(),
                used: HashMap::new(),
            })
            .collect();
        let manager_idx = managers
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        let mut reg = Registry {
            target: config.replication.target,
            grace_ms: config.grace_period_ms,
            lease_ms: config.registration_lease_ms,
            managers,
            manager_idx,
            pools: Vec::new(),
            pool_idx: HashMap::new(),
            resources: BTreeMap::new(),
            consumers: BTreeMap::new(),
            recent: VecDeque::new(),
            registering: 0,
            settled: BTreeMap::new(),
            settled_total: 0,
            // The database's own key replaces it in `from_snapshot`.
            ids: IdKey::new(rand::random()),
            next_resource_id: 1,
        };
        for p in &config.pools {
            let i = reg.pool_for(&p.resource_type, &p.location);
            reg.pools[i].target_depth = p.target_depth;
        }
        reg
    }

    /// Rebuilds the registry from what the store holds.
    pub fn from_snapshot(config: &Config, snap: &Snapshot) -> anyhow::Result<Registry> {
        let mut reg = Registry::new(config);
        if let Some(hex) = snap.meta(ID_KEY) {
            reg.ids = IdKey::from_hex(hex)
                .ok_or_else(|| anyhow!("meta {ID_KEY} in the database is not 32 hex digits"))?;
        }
        for (manager, availability) in &snap.availability {
            if let Some(&i) = reg.manager_idx.get(manager) {
                reg.managers[i].availability = availability
                    .parse()
                    .map_err(|e: String| anyhow!("manager {manager}: {e}"))?;
            }
        }
        for r in &snap.resources {
            let m = reg.stored_manager(&r.manager, &r.location)?;
            let pool = reg.pool_for(&r.resource_type, &r.location);
            let member = reg.pools[pool]
                .members
                .iter()
                .position(|&x| x == m)
                .unwrap_or(0);
            *reg.managers[m]
                .used
                .entry(r.resource_type.clone())
                .or_insert(0) += 1;
            let consumer = match &r.consumer {
                Some(c) => {
                    Some(ConsumerId::parse(c).map_err(|e| anyhow!("resource {}: {e}", r.id))?)
                }
                None => None,
            };
            match r.state {
                ResourceState::Ready => reg.pools[pool].ready[member].push_back(r.id),
                ResourceState::Provisioning => reg.pools[pool].provisioning += 1,
                ResourceState::Assigned => {}
            }
            reg.resources.insert(
                r.id,
                Resource {
                    id: r.id,
                    pool,
                    member,
                    state: r.state,
                    consumer,
                    created_ms: r.created_ms,
                },
            );
            reg.next_resource_id = reg.next_resource_id.max(r.id + 1);
        }
        for s in &snap.settled {
            let m = reg.stored_manager(&s.manager, &s.location)?;
            reg.pool_for(&s.resource_type, &s.location);
            *reg.managers[m]
                .used
                .entry(s.resource_type.clone())
                .or_insert(0) += s.count;
            *reg.settled.entry((m, s.resource_type.clone())).or_insert(0) += s.count;
            reg.settled_total += s.count;
        }
        if let Some(n) = snap.meta("next_resource_id") {
            let n: u64 = n
                .parse()
                .map_err(|_| anyhow!("meta next_resource_id is not a number"))?;
            reg.next_resource_id = reg.next_resource_id.max(n);
        }
        for c in &snap.consumers {
            let id = ConsumerId::parse(&c.id).map_err(|e| anyhow!("consumer {:?}: {e}", c.id))?;
            if !reg.resources.contains_key(&c.resource) {
                return Err(anyhow!(
                    "consumer {} names resource {} which is missing",
                    c.id,
                    c.resource
                ));
            }
            reg.consumers.insert(
                id,
                Consumer {
                    resource: c.resource,
                    replicas: Vec::new(),
                    created_ms: c.created_ms,
                    registered_ms: if c.registered {
                        c.registered_ms.or(Some(c.created_ms))
                    } else {
                        None
                    },
                    confirmed_ms: c.confirmed_ms,
                },
            );
        }
        for r in &snap.replicas {
            // Rows of a resource without a consumer are leftovers of nothing: skip them.
            let Some(id) = reg
                .resources
                .get(&r.resource)
                .and_then(|x| x.consumer.clone())
            else {
                continue;
            };
            let &m = reg.manager_idx.get(&r.manager).ok_or_else(|| {
                anyhow!(
                    "manager {:?} holds consumer data in the database but is missing from the config; add it back",
                    r.manager
                )
            })?;
            if let Some(c) = reg.consumers.get_mut(&id) {
                c.replicas.push((m, r.at_ms));
            }
        }
        reg.registering = reg
            .consumers
            .values()
            .filter(|c| c.registered_ms.is_none())
            .count();
        reg.recent = newest(
            reg.consumers.iter().map(|(id, c)| (c.created_ms, id)),
            RECENT,
        );
        // The first manager first, whatever order the rows came in.
        let firsts: Vec<(ConsumerId, usize)> = reg
            .consumers
            .iter()
            .map(|(id, c)| (id.clone(), reg.manager_of_resource(c.resource)))
            .collect();
        for (id, first) in firsts {
            if let Some(c) = reg.consumers.get_mut(&id) {
                if let Some(pos) = c.replicas.iter().position(|&(m, _)| m == first) {
                    let f = c.replicas.remove(pos);
                    c.replicas.insert(0, f);
                }
            }
        }
        Ok(reg)
    }

    /// The configured manager that the database says holds resources in
    /// `location`: refused when the config lost it or moved it.
    fn stored_manager(&self, manager: &str, location: &str) -> anyhow::Result<usize> {
        let &m = self.manager_idx.get(manager).ok_or_else(|| {
            anyhow!(
                "manager {manager:?} holds resources in the database but is missing from the config; \
                 add it back (availability = \"down\" retires it)"
            )
        })?;
        if self.managers[m].location != location {
            return Err(anyhow!(
                "manager {manager:?} is in location {:?} in the config but holds resources in {location:?} in the database",
                self.managers[m].location
            ));
        }
        Ok(m)
    }

    fn pool_for(&mut self, resource_type: &str, location: &str) -> usize {
        if let Some(&i) = self
            .pool_idx
            .get(&(resource_type.to_owned(), location.to_owned()))
        {
            return i;
        }
        let members: Vec<usize> = self
            .managers
            .iter()
            .enumerate()
            .filter(|(_, m)| m.location == location)
            .map(|(i, _)| i)
            .collect();
        let n = members.len();
        self.pools.push(Pool {
            resource_type: resource_type.to_owned(),
            location: location.to_owned(),
            target_depth: 0,
            members,
            ready: vec![VecDeque::new(); n],
            provisioning: 0,
            alloc_cursor: 0,
            take_cursor: 0,
            preallocated_total: 0,
        });
        let i = self.pools.len() - 1;
        self.pool_idx
            .insert((resource_type.to_owned(), location.to_owned()), i);
        i
    }

    fn manager_of_resource(&self, id: u64) -> usize {
        let r = &self.resources[&id];
        self.pools[r.pool].members[r.member]
    }

    pub fn managers(&self) -> &[Manager] {
        &self.managers
    }

    pub fn manager_index(&self, id: &str) -> Option<usize> {
        self.manager_idx.get(id).copied()
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Every consumer registered and not given back, in memory or settled.
    pub fn consumer_count(&self) -> u64 {
        self.consumers.len() as u64 + self.settled_total
    }

    /// Consumers held in memory (the rest are settled, in the database only).
    pub fn consumers_in_memory(&self) -> usize {
        self.consumers.len()
    }

    /// Drops a settled consumer from memory (unless the status page still
    /// follows it); its resource stays counted as used. True if dropped.
    pub fn evict_if_settled(&mut self, consumer: &ConsumerId, now_ms: u64) -> bool {
        let Some(c) = self.consumers.get(consumer) else {
            return false;
        };
        if !store::settled(c.registered_ms, c.confirmed_ms, now_ms, self.grace_ms)
            || self.recent.contains(consumer)
        {
            return false;
        }
        let resource = c.resource;
        let Some(r) = self.resources.remove(&resource) else {
            return false;
        };
        self.consumers.remove(consumer);
        let p = &self.pools[r.pool];
        *self
            .settled
            .entry((p.members[r.member], p.resource_type.clone()))
            .or_insert(0) += 1;
        self.settled_total += 1;
        true
    }

    /// Consumers still registering: pinned to their first manager.
    pub fn registering_count(&self) -> usize {
        self.registering
    }

    /// Ready resources on available managers: what a registration can take now.
    pub fn depth(&self, pool: usize) -> u64 {
        let p = &self.pools[pool];
        p.members
            .iter()
            .zip(&p.ready)
            .filter(|(&m, _)| self.managers[m].availability == Availability::Available)
            .map(|(_, q)| q.len() as u64)
            .sum()
    }

    /// Ready resources on every manager, whatever its availability.
    pub fn ready_total(&self, pool: usize) -> u64 {
        self.pools[pool].ready.iter().map(|q| q.len() as u64).sum()
    }

    /// Ready resources per member manager id.
    pub fn ready_by_manager(&self, pool: usize) -> Vec<(String, u64)> {
        let p = &self.pools[pool];
        p.members
            .iter()
            .zip(&p.ready)
            .map(|(&m, q)| (self.managers[m].id.clone(), q.len() as u64))
            .collect()
    }

    /// How many more resources the pool wants (ready on available managers + in provisioning).
    pub fn deficit(&self, pool: usize) -> u64 {
        let p = &self.pools[pool];
        p.target_depth
            .saturating_sub(self.depth(pool) + p.provisioning)
    }

    /// Reserves capacity for one new resource on the next eligible manager of the
    /// pool (round-robin), or `None` when no manager is available with free capacity.
    pub fn reserve(&mut self, pool: usize, now_ms: u64, ops: &mut Vec<Op>) -> Option<Reserved> {
        let n = self.pools[pool].members.len();
        let rt = self.pools[pool].resource_type.clone();
        for k in 0..n {
            let pos = (self.pools[pool].alloc_cursor + k) % n;
            let m = self.pools[pool].members[pos];
            let mgr = &self.managers[m];
            if mgr.availability != Availability::Available || mgr.free(&rt) == 0 {
                continue;
            }
            self.pools[pool].alloc_cursor = (pos + 1) % n;
            let id = self.next_resource_id;
            self.next_resource_id += 1;
            let needs_provisioning = mgr.provision;
            let state = if needs_provisioning {
                ResourceState::Provisioning
            } else {
                ResourceState::Ready
            };
            *self.managers[m].used.entry(rt.clone()).or_insert(0) += 1;
            let p = &mut self.pools[pool];
            if needs_provisioning {
                p.provisioning += 1;
            } else {
                p.ready[pos].push_back(id);
                p.preallocated_total += 1;
            }
            self.resources.insert(
                id,
                Resource {
                    id,
                    pool,
                    member: pos,
                    state,
                    consumer: None,
                    created_ms: now_ms,
                },
            );
            ops.push(Op::PutResource(self.resource_row(id)));
            return Some(Reserved {
                id,
                manager: m,
                needs_provisioning,
            });
        }
        None
    }

    /// Provisioning succeeded: the resource joins its pool. False if it is not provisioning.
    pub fn provisioned(&mut self, id: u64, ops: &mut Vec<Op>) -> bool {
        let Some(r) = self.resources.get_mut(&id) else {
            return false;
        };
        if r.state != ResourceState::Provisioning {
            return false;
        }
        r.state = ResourceState::Ready;
        let (pool, member) = (r.pool, r.member);
        let p = &mut self.pools[pool];
        p.provisioning -= 1;
        p.ready[member].push_back(id);
        p.preallocated_total += 1;
        ops.push(Op::SetResourceState {
            id,
            state: ResourceState::Ready,
            consumer: None,
        });
        true
    }

    /// Provisioning failed for good: the reservation is dropped and its capacity freed.
    pub fn abandon(&mut self, id: u64, ops: &mut Vec<Op>) -> bool {
        match self.resources.get(&id) {
            Some(r) if r.state == ResourceState::Provisioning => {}
            _ => return false,
        }
        let r = self.resources.remove(&id).expect("checked above");
        let m = self.pools[r.pool].members[r.member];
        let rt = self.pools[r.pool].resource_type.clone();
        self.pools[r.pool].provisioning -= 1;
        if let Some(u) = self.managers[m].used.get_mut(&rt) {
            *u = u.saturating_sub(1);
        }
        ops.push(Op::DeleteResource { id });
        true
    }

    /// Resolves the pool a registration draws from.
    pub fn pool_of(
        &self,
        resource_type: &str,
        location: Option<&str>,
    ) -> Result<usize, RegisterError> {
        if !self.pools.iter().any(|p| p.resource_type == resource_type) {
            return Err(RegisterError::UnknownResourceType(resource_type.to_owned()));
        }
        match location {
            Some(loc) => self
                .pool_idx
                .get(&(resource_type.to_owned(), loc.to_owned()))
                .copied()
                .ok_or_else(|| RegisterError::UnknownLocation {
                    resource_type: resource_type.to_owned(),
                    location: loc.to_owned(),
                }),
            // Without a location, the deepest pool of the type: the one most able to take it.
            None => Ok((0..self.pools.len())
                .filter(|&i| self.pools[i].resource_type == resource_type)
                .max_by_key(|&i| (self.depth(i), std::cmp::Reverse(i)))
                .expect("checked above")),
        }
    }

    /// Takes a ready resource (round-robin over available managers) and creates the consumer.
    pub fn register(
        &mut self,
        resource_type: &str,
        location: Option<&str>,
        consumer: NewId,
        now_ms: u64,
        ops: &mut Vec<Op>,
    ) -> Result<(Registration, usize), RegisterError> {
        let pool = self.pool_of(resource_type, location)?;
        let n = self.pools[pool].members.len();
        let mut taken = None;
        for k in 0..n {
            let pos = (self.pools[pool].take_cursor + k) % n;
            let m = self.pools[pool].members[pos];
            if self.managers[m].availability != Availability::Available {
                continue;
            }
            if let Some(id) = self.pools[pool].ready[pos].pop_front() {
                self.pools[pool].take_cursor = (pos + 1) % n;
                taken = Some((id, m));
                break;
            }
        }
        let Some((rid, m)) = taken else {
            return Err(RegisterError::PoolEmpty {
                resource_type: self.pools[pool].resource_type.clone(),
                location: self.pools[pool].location.clone(),
            });
        };
        let consumer = match consumer {
            NewId::Given(id) => id,
            NewId::Mint(mut nonce) => loop {
                // Distinct from every id in memory; a resource taken again
                // (after a give-back) gets another nonce.
                let id = self.ids.mint(rid, nonce);
                if !self.consumers.contains_key(&id) {
                    break id;
                }
                nonce = nonce.wrapping_add(1);
            },
        };
        let r = self
            .resources
            .get_mut(&rid)
            .expect("pool holds only known resources");
        r.state = ResourceState::Assigned;
        r.consumer = Some(consumer.clone());
        let mut c = Consumer {
            resource: rid,
            replicas: vec![(m, now_ms)],
            created_ms: now_ms,
            registered_ms: None,
            confirmed_ms: None,
        };
        if self.target_reached(pool, &c.replicas) {
            c.registered_ms = Some(now_ms);
        } else {
            self.registering += 1;
        }
        ops.push(Op::Assign {
            resource: rid,
            consumer: consumer.to_string(),
            created_ms: now_ms,
            registered_ms: c.registered_ms,
        });
        ops.push(Op::PutReplica(ReplicaRow {
            resource: rid,
            manager: self.managers[m].id.clone(),
            at_ms: now_ms,
        }));
        self.consumers.insert(consumer.clone(), c);
        if self.recent.len() == RECENT {
            // No longer followed by the status page: it may be settled already.
            if let Some(old) = self.recent.pop_front() {
                self.evict_if_settled(&old, now_ms);
            }
        }
        self.recent.push_back(consumer.clone());
        let p = &self.pools[pool];
        let reg = Registration {
            consumer,
            manager: self.managers[m].id.clone(),
            cluster: self.managers[m].cluster.clone(),
            resource: ResourceRef {
                id: rid,
                resource_type: p.resource_type.clone(),
                name: resource_name(&p.resource_type, rid),
                location: p.location.clone(),
            },
        };
        Ok((reg, pool))
    }

    pub fn contains(&self, consumer: &ConsumerId) -> bool {
        self.consumers.contains_key(consumer)
    }

    /// The resource whose row holds this consumer, if the id was minted here
    /// (for another id, a number whose row does not match it).
    pub fn resource_hint(&self, consumer: &ConsumerId) -> u64 {
        self.ids.resource_of(consumer)
    }

    /// Gives a provisional registration's resource back to its pool and forgets
    /// the consumer (a refused sign-up, or a lease that ran out). A confirmed
    /// registration is never given back. Returns the pool.
    pub fn release(
        &mut self,
        consumer: &ConsumerId,
        ops: &mut Vec<Op>,
    ) -> Result<usize, ReleaseError> {
        match self.consumers.get(consumer) {
            None => return Err(ReleaseError::UnknownConsumer),
            Some(c) if c.confirmed_ms.is_some() => return Err(ReleaseError::Confirmed),
            Some(_) => {}
        }
        let c = self
            .consumers
            .remove(consumer)
            .ok_or(ReleaseError::UnknownConsumer)?;
        if c.registered_ms.is_none() {
            self.registering -= 1;
        }
        let r = self
            .resources
            .get_mut(&c.resource)
            .expect("consumer's resource is known");
        r.state = ResourceState::Ready;
        r.consumer = None;
        let (pool, member) = (r.pool, r.member);
        self.pools[pool].ready[member].push_back(c.resource);
        ops.push(Op::Unassign {
            resource: c.resource,
        });
        Ok(pool)
    }

    /// Confirms a registration (the first manager accepted the sign-up): it is
    /// no longer a lease. `Ok(false)` when it already was confirmed.
    pub fn confirm(
        &mut self,
        consumer: &ConsumerId,
        now_ms: u64,
        ops: &mut Vec<Op>,
    ) -> Result<bool, ReplicaError> {
        let c = self
            .consumers
            .get_mut(consumer)
            .ok_or(ReplicaError::UnknownConsumer)?;
        if c.confirmed_ms.is_some() {
            return Ok(false);
        }
        c.confirmed_ms = Some(now_ms);
        ops.push(Op::Confirm {
            resource: c.resource,
            at_ms: now_ms,
        });
        Ok(true)
    }

    /// When a provisional registration's lease runs out; `None` once confirmed.
    pub fn lease_end(&self, consumer: &ConsumerId) -> Option<u64> {
        let c = self.consumers.get(consumer)?;
        match c.confirmed_ms {
            Some(_) => None,
            None => Some(c.created_ms.saturating_add(self.lease_ms)),
        }
    }

    /// Every provisional registration with the end of its lease, earliest first.
    pub fn leases(&self) -> Vec<(u64, ConsumerId)> {
        let mut v: Vec<(u64, ConsumerId)> = self
            .consumers
            .keys()
            .filter_map(|id| self.lease_end(id).map(|end| (end, id.clone())))
            .collect();
        v.sort();
        v
    }

    /// Managers of the pool's location that count towards the target: the
    /// target never waits for a manager that is down.
    fn target_members(&self, pool: usize) -> impl Iterator<Item = usize> + '_ {
        self.pools[pool]
            .members
            .iter()
            .copied()
            .filter(|&m| self.managers[m].availability != Availability::Down)
    }

    /// Whether the copies meet the target: only copies on managers that are
    /// not down count, and at least one such copy is needed (a consumer whose
    /// only copies sit on down managers, or a location with every manager
    /// down, waits).
    fn target_reached(&self, pool: usize, replicas: &[(usize, u64)]) -> bool {
        let up = self.target_members(pool).count();
        let held_up = self.counted_copies(pool, replicas);
        if held_up == 0 {
            return false;
        }
        match self.target {
            ReplicationTarget::All => held_up == up,
            ReplicationTarget::Count(n) => held_up >= n.min(up),
        }
    }

    /// Copies that count towards the target: those on managers that are not down.
    fn counted_copies(&self, pool: usize, replicas: &[(usize, u64)]) -> usize {
        self.target_members(pool)
            .filter(|m| replicas.iter().any(|&(r, _)| r == *m))
            .count()
    }

    /// How many copies make this consumer registered (as things stand: a
    /// manager that is down does not count).
    pub fn target_size(&self, consumer: &ConsumerId) -> Option<usize> {
        let c = self.consumers.get(consumer)?;
        Some(self.pool_target(self.resources[&c.resource].pool))
    }

    /// How many copies make a consumer of the pool registered, as things stand.
    fn pool_target(&self, pool: usize) -> usize {
        let up = self.target_members(pool).count();
        match self.target {
            ReplicationTarget::All => up,
            ReplicationTarget::Count(k) => k.min(up),
        }
    }

    /// Registering consumers that reach their target as things stand (after a
    /// manager went down, the target stops waiting for it): marked registered,
    /// and returned.
    pub fn settle_targets(&mut self, now_ms: u64, ops: &mut Vec<Op>) -> Vec<ConsumerId> {
        let reached: Vec<ConsumerId> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.registered_ms.is_none())
            .filter(|(_, c)| self.target_reached(self.resources[&c.resource].pool, &c.replicas))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &reached {
            if let Some(c) = self.consumers.get_mut(id) {
                c.registered_ms = Some(now_ms);
                self.registering -= 1;
                ops.push(Op::SetRegistered {
                    resource: c.resource,
                    registered_ms: now_ms,
                });
            }
        }
        reached
    }

    /// Records one confirmed copy (idempotent).
    pub fn add_replica(
        &mut self,
        consumer: &ConsumerId,
        manager: &str,
        now_ms: u64,
        ops: &mut Vec<Op>,
    ) -> Result<ReplicaOutcome, ReplicaError> {
        let &m = self
            .manager_idx
            .get(manager)
            .ok_or_else(|| ReplicaError::UnknownManager(manager.to_owned()))?;
        let (pool, replicas) = {
            let c = self
                .consumers
                .get(consumer)
                .ok_or(ReplicaError::UnknownConsumer)?;
            if c.replicas.iter().any(|&(r, _)| r == m) {
                return Ok(ReplicaOutcome {
                    added: false,
                    became_registered: false,
                    lag_ms: None,
                });
            }
            let mut r = c.replicas.clone();
            r.push((m, now_ms));
            (self.resources[&c.resource].pool, r)
        };
        let reached = self.target_reached(pool, &replicas);
        let c = self.consumers.get_mut(consumer).expect("checked above");
        c.replicas = replicas;
        let lag_ms = now_ms.saturating_sub(c.created_ms);
        ops.push(Op::PutReplica(ReplicaRow {
            resource: c.resource,
            manager: manager.to_owned(),
            at_ms: now_ms,
        }));
        // A confirmed copy proves the sign-up reached the first manager.
        if c.confirmed_ms.is_none() {
            c.confirmed_ms = Some(now_ms);
            ops.push(Op::Confirm {
                resource: c.resource,
                at_ms: now_ms,
            });
        }
        let became_registered = reached && c.registered_ms.is_none();
        if became_registered {
            c.registered_ms = Some(now_ms);
            self.registering -= 1;
            ops.push(Op::SetRegistered {
                resource: c.resource,
                registered_ms: now_ms,
            });
        }
        Ok(ReplicaOutcome {
            added: true,
            became_registered,
            lag_ms: Some(lag_ms),
        })
    }

    /// Changes a manager's availability; `Ok(true)` if it changed.
    pub fn set_availability(
        &mut self,
        manager: &str,
        availability: Availability,
        ops: &mut Vec<Op>,
    ) -> Option<bool> {
        let &m = self.manager_idx.get(manager)?;
        if self.managers[m].availability == availability {
            return Some(false);
        }
        self.managers[m].availability = availability;
        ops.push(Op::SetAvailability {
            manager: manager.to_owned(),
            availability: availability.as_str().to_owned(),
        });
        Some(true)
    }

    /// The consumer's routing entry.
    pub fn route_entry(&self, consumer: &ConsumerId) -> Option<RouteEntry> {
        let c = self.consumers.get(consumer)?;
        Some(self.entry_of(consumer.clone(), c))
    }

    fn entry_of(&self, consumer: ConsumerId, c: &Consumer) -> RouteEntry {
        RouteEntry {
            consumer,
            state: c.state(),
            replicas: c
                .replicas
                .iter()
                .map(|&(m, _)| self.managers[m].id.clone())
                .collect(),
        }
    }

    pub fn manager_routes(&self) -> Vec<ManagerRoute> {
        self.managers
            .iter()
            .map(|m| ManagerRoute {
                id: m.id.clone(),
                cluster: m.cluster.clone(),
                location: m.location.clone(),
                availability: m.availability,
            })
            .collect()
    }

    /// The route window: a consumer belongs in the pushed routing table while it
    /// is registering, and for `grace_period_ms` after it became registered
    /// (Envoys then upgrade its cookie; afterwards the cookie alone routes it).
    pub fn in_route_window(&self, consumer: &ConsumerId, now_ms: u64) -> bool {
        match self.consumers.get(consumer) {
            None => false,
            Some(c) => match c.registered_ms {
                None => true,
                Some(at) => at.saturating_add(self.grace_ms) > now_ms,
            },
        }
    }

    /// When a registered consumer leaves the route window; `None` while it is
    /// registering (or unknown).
    pub fn route_window_end(&self, consumer: &ConsumerId) -> Option<u64> {
        let at = self.consumers.get(consumer)?.registered_ms?;
        Some(at.saturating_add(self.grace_ms))
    }

    /// Whether a consumer must leave the routing table at `now_ms`: registered,
    /// and its grace period is over. Unknown consumers were removed when given back.
    pub fn route_window_over(&self, consumer: &ConsumerId, now_ms: u64) -> bool {
        self.route_window_end(consumer)
            .is_some_and(|end| end <= now_ms)
    }

    /// The routing table at `now_ms` (every consumer in its route window), and
    /// when each registered one among them leaves it, earliest first.
    pub fn route_window(&self, now_ms: u64) -> (Vec<RouteEntry>, Vec<(u64, ConsumerId)>) {
        let mut entries = Vec::new();
        let mut leaving = Vec::new();
        for id in self.consumers.keys() {
            if !self.in_route_window(id, now_ms) {
                continue;
            }
            if let Some(end) = self.route_window_end(id) {
                leaving.push((end, id.clone()));
            }
            entries.extend(self.route_entry(id));
        }
        leaving.sort();
        (entries, leaving)
    }

    /// Consumers still registering (active replication resumes them at start).
    pub fn registering(&self) -> Vec<ConsumerId> {
        self.consumers
            .iter()
            .filter(|(_, c)| c.registered_ms.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Resources waiting for their manager to provision them: (id, manager index).
    pub fn provisioning(&self) -> Vec<(u64, usize)> {
        let mut v: Vec<(u64, usize)> = self
            .resources
            .values()
            .filter(|r| r.state == ResourceState::Provisioning)
            .map(|r| (r.id, self.pools[r.pool].members[r.member]))
            .collect();
        v.sort();
        v
    }

    /// Pool index and resource name of a resource.
    pub fn resource_info(&self, id: u64) -> Option<(usize, String, String)> {
        let r = self.resources.get(&id)?;
        let p = &self.pools[r.pool];
        Some((
            r.pool,
            p.resource_type.clone(),
            resource_name(&p.resource_type, id),
        ))
    }

    fn resource_row(&self, id: u64) -> ResourceRow {
        let r = &self.resources[&id];
        let p = &self.pools[r.pool];
        ResourceRow {
            id,
            resource_type: p.resource_type.clone(),
            name: resource_name(&p.resource_type, id),
            location: p.location.clone(),
            manager: self.managers[p.members[r.member]].id.clone(),
            state: r.state,
            consumer: r.consumer.as_ref().map(|c| c.to_string()),
            created_ms: r.created_ms,
        }
    }

    /// Plan of an active copy: the first manager and replicas to read from (available
    /// first) and the managers that still need a copy to reach the target.
    pub fn copy_plan(&self, consumer: &ConsumerId) -> Option<CopyPlan> {
        let c = self.consumers.get(consumer)?;
        if c.registered_ms.is_some() {
            return Some(CopyPlan {
                sources: vec![],
                targets: vec![],
                done: true,
            });
        }
        let pool = self.resources[&c.resource].pool;
        let members = &self.pools[pool].members;
        let held: Vec<usize> = c.replicas.iter().map(|&(m, _)| m).collect();
        let mut sources: Vec<usize> = held
            .iter()
            .copied()
            .filter(|&m| self.managers[m].availability != Availability::Down)
            .collect();
        sources.sort_by_key(|&m| self.managers[m].availability != Availability::Available);
        // Spread copies: start the candidate list at a consumer-dependent offset.
        let offset = consumer
            .as_str()
            .bytes()
            .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
        let n = members.len().max(1);
        let mut candidates: Vec<usize> = (0..members.len())
            .map(|k| members[(offset + k) % n])
            .filter(|m| !held.contains(m) && self.managers[*m].availability != Availability::Down)
            .collect();
        candidates.sort_by_key(|&m| self.managers[m].availability != Availability::Available);
        let needed = match self.target {
            ReplicationTarget::All => candidates.len(),
            ReplicationTarget::Count(k) => {
                let have = held.iter().filter(|m| members.contains(m)).count();
                k.min(members.len()).saturating_sub(have)
            }
        };
        candidates.truncate(needed);
        Some(CopyPlan {
            sources: sources
                .into_iter()
                .map(|m| self.managers[m].id.clone())
                .collect(),
            targets: candidates
                .into_iter()
                .map(|m| self.managers[m].id.clone())
                .collect(),
            done: false,
        })
    }

    /// The full record of a consumer.
    pub fn consumer_record(&self, consumer: &ConsumerId) -> Option<ConsumerRecord> {
        let c = self.consumers.get(consumer)?;
        Some(self.record(consumer, c, &self.resources[&c.resource]))
    }

    /// The record of a consumer read from the database (a settled one).
    /// `None` if its resource's pool or manager is no longer known.
    pub fn stored_record(&self, s: &StoredConsumer) -> Option<ConsumerRecord> {
        let (id, c, r) = self.unpack(s)?;
        Some(self.record(&id, &c, &r))
    }

    /// A stored consumer in the in-memory shape (replicas on managers no
    /// longer configured are left out; the first manager first).
    fn unpack(&self, s: &StoredConsumer) -> Option<(ConsumerId, Consumer, Resource)> {
        let id = ConsumerId::parse(&s.consumer.id).ok()?;
        let rr = &s.resource;
        let pool = *self
            .pool_idx
            .get(&(rr.resource_type.clone(), rr.location.clone()))?;
        let first = *self.manager_idx.get(&rr.manager)?;
        let member = self.pools[pool].members.iter().position(|&m| m == first)?;
        let mut replicas: Vec<(usize, u64)> = s
            .replicas
            .iter()
            .filter_map(|x| Some((*self.manager_idx.get(&x.manager)?, x.at_ms)))
            .collect();
        if let Some(pos) = replicas.iter().position(|&(m, _)| m == first) {
            let f = replicas.remove(pos);
            replicas.insert(0, f);
        }
        let c = Consumer {
            resource: rr.id,
            replicas,
            created_ms: s.consumer.created_ms,
            registered_ms: s.consumer.registered_ms,
            confirmed_ms: s.consumer.confirmed_ms,
        };
        let r = Resource {
            id: rr.id,
            pool,
            member,
            state: rr.state,
            consumer: Some(id.clone()),
            created_ms: rr.created_ms,
        };
        Some((id, c, r))
    }

    /// Records one more copy of a settled consumer read from the database:
    /// only the replica row changes (it is out of the table and registered).
    /// Returns the outcome and its replicas after, the first manager first.
    pub fn settled_replica(
        &self,
        s: &StoredConsumer,
        manager: &str,
        now_ms: u64,
        ops: &mut Vec<Op>,
    ) -> Result<(ReplicaOutcome, RouteEntry), ReplicaError> {
        let &m = self
            .manager_idx
            .get(manager)
            .ok_or_else(|| ReplicaError::UnknownManager(manager.to_owned()))?;
        let (id, mut c, _) = self.unpack(s).ok_or(ReplicaError::UnknownConsumer)?;
        let added = !c.replicas.iter().any(|&(r, _)| r == m);
        if added {
            c.replicas.push((m, now_ms));
            ops.push(Op::PutReplica(ReplicaRow {
                resource: c.resource,
                manager: manager.to_owned(),
                at_ms: now_ms,
            }));
        }
        let entry = self.entry_of(id, &c);
        let outcome = ReplicaOutcome {
            added,
            became_registered: false,
            lag_ms: added.then(|| now_ms.saturating_sub(c.created_ms)),
        };
        Ok((outcome, entry))
    }

    fn record(&self, consumer: &ConsumerId, c: &Consumer, r: &Resource) -> ConsumerRecord {
        let p = &self.pools[r.pool];
        let m = &self.managers[p.members[r.member]];
        let cap = m.capacity.get(&p.resource_type).copied().unwrap_or(0);
        let used = m.used.get(&p.resource_type).copied().unwrap_or(0);
        ConsumerRecord {
            consumer: consumer.clone(),
            state: c.state(),
            location: p.location.clone(),
            created_ms: c.created_ms,
            registered_ms: c.registered_ms,
            confirmed_ms: c.confirmed_ms,
            resource: ResourceRecord {
                id: r.id,
                resource_type: p.resource_type.clone(),
                name: resource_name(&p.resource_type, r.id),
                location: p.location.clone(),
                capacity: 1,
                availability: m.availability,
                state: r.state.as_str(),
                manager: m.id.clone(),
                created_ms: r.created_ms,
            },
            first_manager: ManagerRef {
                id: m.id.clone(),
                cluster: m.cluster.clone(),
                location: m.location.clone(),
                availability: m.availability,
                capacity: cap,
                used,
                free: cap.saturating_sub(used),
            },
            replicas: c
                .replicas
                .iter()
                .map(|&(rm, at)| {
                    let rm = &self.managers[rm];
                    ReplicaRecord {
                        manager: rm.id.clone(),
                        cluster: rm.cluster.clone(),
                        availability: rm.availability,
                        at_ms: at,
                    }
                })
                .collect(),
            replication_target: self.pool_target(r.pool),
            in_routing_table: false,
        }
    }

    /// The latest sign-ups still known, newest first, with their progress.
    pub fn recent(&self, now_ms: u64) -> Vec<RecentConsumer> {
        self.recent
            .iter()
            .rev()
            .filter_map(|id| {
                let c = self.consumers.get(id)?;
                let pool = self.resources[&c.resource].pool;
                Some(RecentConsumer {
                    consumer: id.clone(),
                    state: c.state(),
                    first_manager: self.managers[self.manager_of_resource(c.resource)]
                        .id
                        .clone(),
                    copies: self.counted_copies(pool, &c.replicas),
                    target: self.target_size(id).unwrap_or(0),
                    created_ms: c.created_ms,
                    waited_ms: c
                        .registered_ms
                        .unwrap_or(now_ms)
                        .saturating_sub(c.created_ms),
                })
            })
            .collect()
    }

    /// Consumer ids in memory, optionally of one state, in resource order (as
    /// the database lists them), at most `limit`. Every registering consumer
    /// is in memory; settled ones are not.
    pub fn list_consumers(&self, state: Option<ConsumerState>, limit: usize) -> Vec<ConsumerId> {
        let mut v: Vec<(u64, &ConsumerId)> = self
            .consumers
            .iter()
            .filter(|(_, c)| match state {
                None => true,
                Some(ConsumerState::Registered) => c.registered_ms.is_some(),
                Some(ConsumerState::Registering) => c.registered_ms.is_none(),
            })
            .map(|(id, c)| (c.resource, id))
            .collect();
        v.sort();
        v.into_iter()
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }

    pub fn manager_view(&self, m: usize) -> ManagerView {
        let m = &self.managers[m];
        ManagerView {
            id: m.id.clone(),
            cluster: m.cluster.clone(),
            location: m.location.clone(),
            admin_url: m.admin_url.clone(),
            availability: m.availability,
            provision: m.provision,
            capacity: m
                .capacity
                .iter()
                .map(|(t, &cap)| {
                    let used = m.used.get(t).copied().unwrap_or(0);
                    (
                        t.clone(),
                        CapacityView {
                            capacity: cap,
                            used,
                            free: cap.saturating_sub(used),
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn pool_view(&self, pool: usize) -> PoolView {
        let p = &self.pools[pool];
        PoolView {
            resource_type: p.resource_type.clone(),
            location: p.location.clone(),
            target_depth: p.target_depth,
            depth: self.depth(pool),
            ready_total: self.ready_total(pool),
            provisioning: p.provisioning,
            preallocated_total: p.preallocated_total,
            ready_by_manager: self.ready_by_manager(pool).into_iter().collect(),
        }
    }
    /// Replays ops another writer committed (another control plane on the
    /// same database): afterwards this registry holds what a load of the
    /// database would give for the rows they touched (`from_snapshot`), so
    /// the next write here starts from the fleet's state. Ops on rows that
    /// are not in memory (settled consumers) only count where they must.
    /// An op that cannot apply (a resource or manager unknown here) is an
    /// error: the caller reloads from the store.
    pub fn apply(&mut self, ops: &[Op], now_ms: u64) -> anyhow::Result<()> {
        for op in ops {
            self.apply_one(op, now_ms)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &Op, now_ms: u64) -> anyhow::Result<()> {
        match op {
            Op::SetMeta { key, value } => {
                if key == "next_resource_id" {
                    let n: u64 = value
                        .parse()
                        .map_err(|_| anyhow!("meta next_resource_id {value:?} is not a number"))?;
                    self.next_resource_id = self.next_resource_id.max(n);
                }
            }
            Op::SetAvailability {
                manager,
                availability,
            } => {
                let &m = self
                    .manager_idx
                    .get(manager)
                    .ok_or_else(|| anyhow!("manager {manager:?} is not in the config"))?;
                self.managers[m].availability = availability
                    .parse()
                    .map_err(|e: String| anyhow!("manager {manager}: {e}"))?;
            }
            Op::PutResource(row) => {
                if let Some(old) = self.detach(row.id) {
                    if old.consumer.is_some() {
                        return Err(anyhow!("resource {} replaced while assigned", row.id));
                    }
                }
                let m = self.stored_manager(&row.manager, &row.location)?;
                let pool = self.pool_for(&row.resource_type, &row.location);
                let member = self.pools[pool]
                    .members
                    .iter()
                    .position(|&x| x == m)
                    .unwrap_or(0);
                let consumer = match &row.consumer {
                    Some(c) => Some(
                        ConsumerId::parse(c).map_err(|e| anyhow!("resource {}: {e}", row.id))?,
                    ),
                    None => None,
                };
                if row.state == ResourceState::Ready {
                    self.pools[pool].preallocated_total += 1;
                }
                self.attach(Resource {
                    id: row.id,
                    pool,
                    member,
                    state: row.state,
                    consumer,
                    created_ms: row.created_ms,
                });
                self.next_resource_id = self.next_resource_id.max(row.id + 1);
            }
            Op::SetResourceState {
                id,
                state,
                consumer,
            } => {
                let mut r = self
                    .detach(*id)
                    .ok_or_else(|| anyhow!("resource {id} is not in memory"))?;
                if r.state == ResourceState::Provisioning && *state == ResourceState::Ready {
                    self.pools[r.pool].preallocated_total += 1;
                }
                r.state = *state;
                r.consumer = match consumer {
                    Some(c) => {
                        Some(ConsumerId::parse(c).map_err(|e| anyhow!("resource {id}: {e}"))?)
                    }
                    None => None,
                };
                self.attach(r);
            }
            Op::DeleteResource { id } => {
                self.detach(*id);
            }
            Op::Assign {
                resource,
                consumer,
                created_ms,
                registered_ms,
            } => {
                let id =
                    ConsumerId::parse(consumer).map_err(|e| anyhow!("resource {resource}: {e}"))?;
                let mut r = self
                    .detach(*resource)
                    .ok_or_else(|| anyhow!("resource {resource} is not in memory"))?;
                if let Some(old) = r.consumer.take() {
                    self.forget_consumer(&old);
                }
                r.state = ResourceState::Assigned;
                r.consumer = Some(id.clone());
                self.attach(r);
                if registered_ms.is_none() {
                    self.registering += 1;
                }
                self.consumers.insert(
                    id.clone(),
                    Consumer {
                        resource: *resource,
                        replicas: Vec::new(),
                        created_ms: *created_ms,
                        registered_ms: *registered_ms,
                        confirmed_ms: None,
                    },
                );
                if self.recent.len() == RECENT {
                    if let Some(old) = self.recent.pop_front() {
                        self.evict_if_settled(&old, now_ms);
                    }
                }
                self.recent.push_back(id);
            }
            Op::Unassign { resource } => {
                let mut r = self
                    .detach(*resource)
                    .ok_or_else(|| anyhow!("resource {resource} is not in memory"))?;
                if let Some(old) = r.consumer.take() {
                    self.forget_consumer(&old);
                }
                r.state = ResourceState::Ready;
                self.attach(r);
            }
            Op::SetRegistered {
                resource,
                registered_ms,
            } => {
                if let Some(c) = self.consumer_of_mut(*resource) {
                    let was = c.registered_ms.replace(*registered_ms);
                    if was.is_none() {
                        self.registering -= 1;
                    }
                }
            }
            Op::Confirm { resource, at_ms } => {
                if let Some(c) = self.consumer_of_mut(*resource) {
                    c.confirmed_ms = Some(*at_ms);
                }
            }
            // The writer publishes these (`writer.rs`); nothing in here.
            Op::Published(_) => {}
            Op::PutReplica(row) => {
                let &m = self
                    .manager_idx
                    .get(&row.manager)
                    .ok_or_else(|| anyhow!("manager {:?} is not in the config", row.manager))?;
                let first = self
                    .resources
                    .contains_key(&row.resource)
                    .then(|| self.manager_of_resource(row.resource));
                if let Some(c) = self.consumer_of_mut(row.resource) {
                    if !c.replicas.iter().any(|&(r, _)| r == m) {
                        // The first manager first, as a load puts it.
                        if Some(m) == first {
                            c.replicas.insert(0, (m, row.at_ms));
                        } else {
                            c.replicas.push((m, row.at_ms));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The consumer holding this resource, if in memory.
    pub fn consumer_of(&self, resource: u64) -> Option<ConsumerId> {
        self.resources.get(&resource)?.consumer.clone()
    }

    /// The consumer held in this resource's row, if in memory.
    fn consumer_of_mut(&mut self, resource: u64) -> Option<&mut Consumer> {
        let id = self.resources.get(&resource)?.consumer.clone()?;
        self.consumers.get_mut(&id)
    }

    /// Forgets a consumer (its resource went back or to another).
    fn forget_consumer(&mut self, id: &ConsumerId) {
        if let Some(c) = self.consumers.remove(id) {
            if c.registered_ms.is_none() {
                self.registering -= 1;
            }
        }
        self.recent.retain(|r| r != id);
    }

    /// Takes a resource out of memory with everything counted for it (its
    /// capacity, its place in the pool); [`Registry::attach`] puts one back.
    fn detach(&mut self, id: u64) -> Option<Resource> {
        let r = self.resources.remove(&id)?;
        let m = self.pools[r.pool].members[r.member];
        let rt = self.pools[r.pool].resource_type.clone();
        if let Some(u) = self.managers[m].used.get_mut(&rt) {
            *u = u.saturating_sub(1);
        }
        let p = &mut self.pools[r.pool];
        match r.state {
            ResourceState::Provisioning => p.provisioning = p.provisioning.saturating_sub(1),
            ResourceState::Ready => {
                // Another writer takes from the front of its queue, as this one does.
                let q = &mut p.ready[r.member];
                if let Some(pos) = q.iter().position(|&x| x == id) {
                    q.remove(pos);
                }
            }
            ResourceState::Assigned => {}
        }
        Some(r)
    }

    fn attach(&mut self, r: Resource) {
        let m = self.pools[r.pool].members[r.member];
        let rt = self.pools[r.pool].resource_type.clone();
        *self.managers[m].used.entry(rt).or_insert(0) += 1;
        let p = &mut self.pools[r.pool];
        match r.state {
            ResourceState::Provisioning => p.provisioning += 1,
            ResourceState::Ready => p.ready[r.member].push_back(r.id),
            ResourceState::Assigned => {}
        }
        self.resources.insert(r.id, r);
    }

    /// A canonical description of the state (orders that do not matter
    /// removed), to compare two registries in tests.
    #[doc(hidden)]
    pub fn digest(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for m in &self.managers {
            let mut used: Vec<_> = m.used.iter().filter(|(_, &n)| n > 0).collect();
            used.sort();
            let _ = writeln!(out, "manager {} {:?} used {used:?}", m.id, m.availability);
        }
        for p in &self.pools {
            let ready: Vec<Vec<u64>> = p
                .ready
                .iter()
                .map(|q| {
                    let mut v: Vec<u64> = q.iter().copied().collect();
                    v.sort_unstable();
                    v
                })
                .collect();
            let _ = writeln!(
                out,
                "pool {}/{} ready {ready:?} provisioning {}",
                p.resource_type, p.location, p.provisioning
            );
        }
        for r in self.resources.values() {
            let _ = writeln!(
                out,
                "resource {} pool {} member {} {:?} {:?} at {}",
                r.id,
                r.pool,
                r.member,
                r.state,
                r.consumer.as_ref().map(|c| c.to_string()),
                r.created_ms
            );
        }
        for (id, c) in &self.consumers {
            let mut replicas = c.replicas.clone();
            replicas.sort_unstable();
            let _ = writeln!(
                out,
                "consumer {id} resource {} replicas {replicas:?} created {} registered {:?} confirmed {:?}",
                c.resource, c.created_ms, c.registered_ms, c.confirmed_ms
            );
        }
        let _ = writeln!(
            out,
            "registering {} settled {} next_resource_id {}",
            self.registering, self.settled_total, self.next_resource_id
        );
        out
    }

    /// Checks the invariants the allocator promises (used by property tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        let registering = self
            .consumers
            .values()
            .filter(|c| c.registered_ms.is_none())
            .count();
        if registering != self.registering {
            return Err(format!(
                "{registering} consumers registering but the count says {}",
                self.registering
            ));
        }
        let mut used: HashMap<(usize, String), u64> =
            self.settled.iter().map(|(k, &n)| (k.clone(), n)).collect();
        for r in self.resources.values() {
            let p = &self.pools[r.pool];
            *used
                .entry((p.members[r.member], p.resource_type.clone()))
                .or_insert(0) += 1;
        }
        for (i, m) in self.managers.iter().enumerate() {
            for (t, &u) in &m.used {
                let counted = used.get(&(i, t.clone())).copied().unwrap_or(0);
                if counted != u {
                    return Err(format!(
                        "manager {} type {t}: used {u} but {counted} resources",
                        m.id
                    ));
                }
                if u > m.capacity.get(t).copied().unwrap_or(0) {
                    return Err(format!("manager {} type {t}: used {u} over capacity", m.id));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (pi, p) in self.pools.iter().enumerate() {
            for q in &p.ready {
                for id in q {
                    if !seen.insert(*id) {
                        return Err(format!("resource {id} is in a pool twice"));
                    }
                    let r = &self.resources[id];
                    if r.state != ResourceState::Ready || r.pool != pi || r.consumer.is_some() {
                        return Err(format!("resource {id} in pool but state {:?}", r.state));
                    }
                }
            }
        }
        let mut owners = HashMap::new();
        for (cid, c) in &self.consumers {
            if let Some(other) = owners.insert(c.resource, cid.clone()) {
                return Err(format!(
                    "resource {} handed to {cid} and {other}",
                    c.resource
                ));
            }
            let r = &self.resources[&c.resource];
            if r.state != ResourceState::Assigned || r.consumer.as_ref() != Some(cid) {
                return Err(format!("consumer {cid}'s resource is {:?}", r.state));
            }
        }
        Ok(())
    }
}

/// The `n` newest of `(created_ms, id)`, oldest first, in one pass with a bounded heap.
fn newest<'a>(
    items: impl Iterator<Item = (u64, &'a ConsumerId)>,
    n: usize,
) -> VecDeque<ConsumerId> {
    let mut heap = std::collections::BinaryHeap::with_capacity(n + 1);
    for (at, id) in items {
        heap.push(std::cmp::Reverse((at, id)));
        if heap.len() > n {
            heap.pop();
        }
    }
    let mut v: Vec<(u64, &ConsumerId)> = heap.into_iter().map(|r| r.0).collect();
    v.sort();
    v.into_iter().map(|(_, id)| id.clone()).collect()
}

/// A latest sign-up on the status page: "k of n" copies and how long it has
/// waited (or, registered, how long it took).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentConsumer {
    pub consumer: ConsumerId,
    pub state: ConsumerState,
    pub first_manager: String,
    /// Copies that count towards the target (on managers that are not down).
    pub copies: usize,
    /// Copies that make it registered, as things stand.
    pub target: usize,
    pub created_ms: u64,
    /// Registering: how long it has waited so far; registered: how long it took.
    pub waited_ms: u64,
}

/// Resource names are derived from type and id, so they are unique and stable.
pub fn resource_name(resource_type: &str, id: u64) -> String {
    format!("{resource_type}-{id}")
}

/// What an active copy must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    pub sources: Vec<String>,
    pub targets: Vec<String>,
    pub done: bool,
}

/// `GET /v1/consumers/{id}`: everything known about one consumer.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerRecord {
    pub consumer: ConsumerId,
    pub state: ConsumerState,
    pub location: String,
    pub created_ms: u64,
    pub registered_ms: Option<u64>,
    /// When the sign-up was confirmed; `None` while the registration is a lease.
    pub confirmed_ms: Option<u64>,
    pub resource: ResourceRecord,
    /// The manager that holds the resource and received the sign-up.
    pub first_manager: ManagerRef,
    /// Managers known to hold the data, the first manager first.
    pub replicas: Vec<ReplicaRecord>,
    pub replication_target: usize,
    pub in_routing_table: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceRecord {
    pub id: u64,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub location: String,
    /// Units of its manager's capacity the resource occupies.
    pub capacity: u64,
    /// Its manager's availability.
    pub availability: Availability,
    pub state: &'static str,
    pub manager: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManagerRef {
    pub id: String,
    pub cluster: String,
    pub location: String,
    pub availability: Availability,
    /// The manager's capacity, use and free room for this resource type.
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRecord {
    pub manager: String,
    pub cluster: String,
    pub availability: Availability,
    pub at_ms: u64,
}

/// `GET /v1/managers`: one manager.
#[derive(Debug, Clone, Serialize)]
pub struct ManagerView {
    pub id: String,
    pub cluster: String,
    pub location: String,
    pub admin_url: String,
    pub availability: Availability,
    pub provision: bool,
    pub capacity: BTreeMap<String, CapacityView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CapacityView {
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
}

/// `GET /v1/pools`: one pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub resource_type: String,
    pub location: String,
    pub target_depth: u64,
    /// Ready resources on available managers.
    pub depth: u64,
    /// Ready resources on any manager.
    pub ready_total: u64,
    pub provisioning: u64,
    pub preallocated_total: u64,
    pub ready_by_manager: BTreeMap<String, u64>,
}
