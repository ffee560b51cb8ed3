//! Allocator properties: capacity never exceeded, round-robin spread within ±1
//! among eligible managers, no resource handed out twice; and a registry that
//! replays another's committed ops (`Registry::apply`) holds what it holds.

use prealloc_control_plane::config::Config;
use prealloc_control_plane::registry::{NewId, Registry};
use prealloc_wire::{Availability, ConsumerId};
use proptest::prelude::*;
use std::collections::HashSet;
use std::path::Path;

fn config(caps: &[(u64, bool)], target: &str) -> Config {
    let mut s = format!(
        "database = \"x.db\"\n[tokens]\nenvoy = \"envoy-token-0123456789\"\nadmin = \"admin-token-0123456789\"\n\
         [replication]\ntarget = {target}\n"
    );
    for (i, (cap, provision)) in caps.iter().enumerate() {
        s.push_str(&format!(
            "[[managers]]\nid = \"m{i}\"\ncluster = \"c{i}\"\nlocation = \"l\"\nadmin_url = \"http://127.0.0.1:1\"\n\
             capacity = {{ mailbox = {cap} }}\nprovision = {provision}\n"
        ));
    }
    s.push_str("[[pools]]\nresource_type = \"mailbox\"\nlocation = \"l\"\ntarget_depth = 10\n");
    Config::parse(&s, Path::new("/")).expect("generated config is valid")
}

fn used(reg: &Registry, m: usize) -> u64 {
    reg.manager_view(m).capacity["mailbox"].used
}

#[derive(Debug, Clone)]
enum Step {
    Reserve,
    Provisioned(usize),
    Abandon(usize),
    Register,
    Release(usize),
    Availability(usize, u8),
    Replica(usize, usize),
    /// Time passes for one consumer: once settled it leaves memory.
    Settle(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Reserve),
        2 => any::<usize>().prop_map(Step::Provisioned),
        1 => any::<usize>().prop_map(Step::Abandon),
        4 => Just(Step::Register),
        1 => any::<usize>().prop_map(Step::Release),
        1 => (any::<usize>(), 0u8..3).prop_map(|(m, a)| Step::Availability(m, a)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(c, m)| Step::Replica(c, m)),
        2 => any::<usize>().prop_map(Step::Settle),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_sequence_keeps_capacity_and_never_hands_a_resource_out_twice(
        caps in prop::collection::vec((0u64..8, any::<bool>()), 1..6),
        steps in prop::collection::vec(step(), 1..200),
    ) {
        let cfg = config(&caps, "\"all\"");
        let mut reg = Registry::new(&cfg);
        let mut ops = Vec::new();
        let mut provisioning: Vec<u64> = Vec::new();
        let mut consumers: Vec<ConsumerId> = Vec::new();
        let mut handed: HashSet<u64> = HashSet::new();
        let mut next = 0u8;
        let n = caps.len();
        for s in steps {
            match s {
                Step::Reserve => {
                    if let Some(r) = reg.reserve(0, 1, &mut ops) {
                        let m = &reg.managers()[r.manager];
                        prop_assert_eq!(m.availability, Availability::Available, "reserved on an unavailable manager");
                        if r.needs_provisioning { provisioning.push(r.id); }
                    }
                }
                Step::Provisioned(i) if !provisioning.is_empty() => {
                    let id = provisioning.swap_remove(i % provisioning.len());
                    prop_assert!(reg.provisioned(id, &mut ops));
                }
                Step::Abandon(i) if !provisioning.is_empty() => {
                    let id = provisioning.swap_remove(i % provisioning.len());
                    prop_assert!(reg.abandon(id, &mut ops));
                }
                Step::Register => {
                    next = next.wrapping_add(1);
                    let id = ConsumerId::from_bytes([next; 16]);
                    if reg.contains(&id) { continue; }
                    if let Ok((r, _)) = reg.register("mailbox", None, NewId::Given(id.clone()), 1, &mut ops) {
                        let m = reg.manager_index(&r.manager).unwrap();
                        prop_assert_eq!(reg.managers()[m].availability, Availability::Available);
                        prop_assert!(handed.insert(r.resource.id), "resource {} handed out twice", r.resource.id);
                        consumers.push(id);
                    }
                }
                Step::Release(i) if !consumers.is_empty() => {
                    let k = i % consumers.len();
                    let rec = reg.consumer_record(&consumers[k]).unwrap();
                    if rec.confirmed_ms.is_some() {
                        // A copy exists: the sign-up succeeded, the resource stays bound.
                        prop_assert_eq!(
                            reg.release(&consumers[k], &mut ops),
                            Err(prealloc_control_plane::registry::ReleaseError::Confirmed)
                        );
                    } else {
                        let c = consumers.swap_remove(k);
                        prop_assert!(reg.release(&c, &mut ops).is_ok());
                        handed.remove(&rec.resource.id);
                    }
                }
                Step::Availability(m, a) => {
                    let a = [Availability::Available, Availability::Draining, Availability::Down][a as usize];
                    reg.set_availability(&format!("m{}", m % n), a, &mut ops);
                }
                Step::Replica(c, m) if !consumers.is_empty() => {
                    let c = &consumers[c % consumers.len()];
                    let before = reg.route_entry(c).unwrap().replicas.len();
                    let out = reg.add_replica(c, &format!("m{}", m % n), 2, &mut ops).unwrap();
                    let after = reg.route_entry(c).unwrap();
                    prop_assert_eq!(after.replicas.len(), before + usize::from(out.added), "replica sets only grow");
                }
                Step::Settle(i) if !consumers.is_empty() => {
                    let k = i % consumers.len();
                    let rec = reg.consumer_record(&consumers[k]).unwrap();
                    let settles = rec.confirmed_ms.is_some() && rec.registered_ms.is_some();
                    let before = reg.consumer_count();
                    if reg.evict_if_settled(&consumers[k], u64::MAX) {
                        prop_assert!(settles, "evicted a consumer that can still change: {rec:?}");
                        let c = consumers.swap_remove(k);
                        prop_assert!(!reg.contains(&c));
                        prop_assert_eq!(reg.consumer_count(), before, "a settled consumer still counts");
                    }
                }
                _ => {}
            }
            if let Err(e) = reg.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
            for (i, (cap, _)) in caps.iter().enumerate() {
                prop_assert!(used(&reg, i) <= *cap, "m{} used {} of {}", i, used(&reg, i), cap);
            }
        }
    }

    #[test]
    fn reservations_spread_within_one_among_eligible_managers(
        managers in prop::collection::vec((any::<bool>(), 0u8..3), 1..7),
        k in 0usize..60,
    ) {
        // (has capacity, availability) per manager; those with capacity have plenty.
        let caps: Vec<(u64, bool)> = managers.iter().map(|(c, _)| (if *c { 1000 } else { 0 }, false)).collect();
        let cfg = config(&caps, "\"all\"");
        let mut reg = Registry::new(&cfg);
        let mut ops = Vec::new();
        for (i, (_, a)) in managers.iter().enumerate() {
            let a = [Availability::Available, Availability::Draining, Availability::Down][*a as usize];
            reg.set_availability(&format!("m{i}"), a, &mut ops);
        }
        let eligible: Vec<usize> = managers.iter().enumerate().filter(|(_, (c, a))| *c && *a == 0).map(|(i, _)| i).collect();
        let mut got = 0;
        for _ in 0..k {
            if reg.reserve(0, 1, &mut ops).is_some() { got += 1; }
        }
        prop_assert_eq!(got, if eligible.is_empty() { 0 } else { k });
        let counts: Vec<u64> = (0..managers.len()).map(|i| used(&reg, i)).collect();
        for (i, c) in counts.iter().enumerate() {
            if !eligible.contains(&i) { prop_assert_eq!(*c, 0, "ineligible m{} got resources", i); }
        }
        if let (Some(max), Some(min)) = (eligible.iter().map(|&i| counts[i]).max(), eligible.iter().map(|&i| counts[i]).min()) {
            prop_assert!(max - min <= 1, "spread {:?} among eligible {:?}", counts, eligible);
        }
    }

    #[test]
    fn registrations_spread_within_one_over_a_full_pool(
        n in 1usize..6,
        per in 1u64..10,
    ) {
        let caps: Vec<(u64, bool)> = (0..n).map(|_| (per, false)).collect();
        let cfg = config(&caps, "\"all\"");
        let mut reg = Registry::new(&cfg);
        let mut ops = Vec::new();
        while reg.reserve(0, 1, &mut ops).is_some() {}
        let total = n as u64 * per;
        let mut counts = vec![0u64; n];
        for i in 0..total {
            let id = ConsumerId::from_bytes([(i % 251) as u8, (i / 251) as u8, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
            let (r, _) = reg.register("mailbox", Some("l"), NewId::Given(id), 1, &mut ops).expect("pool has room");
            counts[reg.manager_index(&r.manager).unwrap()] += 1;
            let max = counts.iter().max().unwrap();
            let min = counts.iter().min().unwrap();
            prop_assert!(max - min <= 1, "registrations spread {:?}", counts);
        }
        prop_assert!(reg.register("mailbox", Some("l"), NewId::Given(ConsumerId::from_bytes([9; 16])), 1, &mut ops).is_err());
    }

    /// Another control plane's writes, replayed from its ops, leave this one
    /// with its state, step by step; and both equal a load of the database
    /// those ops were committed to.
    #[test]
    fn a_registry_replaying_anothers_ops_holds_its_state_and_the_databases(
        caps in prop::collection::vec((0u64..8, any::<bool>()), 1..5),
        steps in prop::collection::vec(step(), 1..120),
    ) {
        use prealloc_control_plane::store::{LoadWindow, SqliteStore, Store};
        let cfg = config(&caps, "\"all\"");
        let mut a = Registry::new(&cfg);
        let mut b = Registry::new(&cfg);
        let mut all_ops = Vec::new();
        let mut next_id = a.next_resource_id;
        let mut provisioning: Vec<u64> = Vec::new();
        let mut consumers: Vec<ConsumerId> = Vec::new();
        let mut next = 0u8;
        let n = caps.len();
        for s in steps {
            let mut ops = Vec::new();
            match s {
                Step::Reserve => {
                    if let Some(r) = a.reserve(0, 1, &mut ops) {
                        if r.needs_provisioning { provisioning.push(r.id); }
                    }
                }
                Step::Provisioned(i) if !provisioning.is_empty() => {
                    let id = provisioning.swap_remove(i % provisioning.len());
                    a.provisioned(id, &mut ops);
                }
                Step::Abandon(i) if !provisioning.is_empty() => {
                    let id = provisioning.swap_remove(i % provisioning.len());
                    a.abandon(id, &mut ops);
                }
                Step::Register => {
                    next = next.wrapping_add(1);
                    let id = ConsumerId::from_bytes([next; 16]);
                    if a.contains(&id) { continue; }
                    if a.register("mailbox", None, NewId::Given(id.clone()), 1, &mut ops).is_ok() {
                        consumers.push(id);
                    }
                }
                Step::Release(i) if !consumers.is_empty() => {
                    let k = i % consumers.len();
                    if a.release(&consumers[k], &mut ops).is_ok() {
                        consumers.swap_remove(k);
                    }
                }
                Step::Availability(m, av) => {
                    let av = [Availability::Available, Availability::Draining, Availability::Down][av as usize];
                    a.set_availability(&format!("m{}", m % n), av, &mut ops);
                }
                Step::Replica(c, m) if !consumers.is_empty() => {
                    let c = &consumers[c % consumers.len()];
                    a.add_replica(c, &format!("m{}", m % n), 2, &mut ops).unwrap();
                }
                // Eviction is this process's memory, not a write: not replayed.
                _ => {}
            }
            // As the writer does for every batch (`writer.rs`).
            if a.next_resource_id != next_id {
                next_id = a.next_resource_id;
                ops.push(prealloc_control_plane::store::Op::SetMeta {
                    key: "next_resource_id".into(),
                    value: next_id.to_string(),
                });
            }
            b.apply(&ops, 3).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            if let Err(e) = b.check_invariants() {
                return Err(TestCaseError::fail(format!("after replaying {ops:?}: {e}")));
            }
            prop_assert_eq!(a.digest(), b.digest(), "after replaying {:?}", ops);
            all_ops.extend(ops);
        }
        let db = crate::support::Db::sqlite();
        let mut store = SqliteStore::open(&db.sqlite_path()).unwrap();
        store.commit(&all_ops).unwrap();
        let c = Registry::from_snapshot(&cfg, &store.load(LoadWindow::ALL).unwrap()).unwrap();
        prop_assert_eq!(a.digest(), c.digest());
    }
}
