//! A batch of ops as a few statements: one per kind of op, its rows in
//! arrays (`unnest`), instead of one statement per op.

use super::{p, to_i64, Params};
use crate::store::Op;
use std::collections::HashSet;

/// One statement of a commit.
pub(super) struct Stmt {
    pub sql: &'static str,
    pub params: Params,
    /// Rows it must change, and what they are for (its error).
    pub expect: Option<(u64, &'static str)>,
}

/// What an op touches: ops on different keys commute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Resource(u64),
    Replicas(u64),
    Meta(String),
    Availability(String),
}

fn keys(op: &Op) -> Vec<Key> {
    match op {
        Op::SetMeta { key, .. } => vec![Key::Meta(key.clone())],
        Op::SetAvailability { manager, .. } => vec![Key::Availability(manager.clone())],
        Op::PutResource(r) => vec![Key::Resource(r.id)],
        Op::SetResourceState { id, .. } | Op::DeleteResource { id } => vec![Key::Resource(*id)],
        Op::Assign { resource, .. }
        | Op::SetRegistered { resource, .. }
        | Op::Confirm { resource, .. } => vec![Key::Resource(*resource)],
        Op::Unassign { resource } => vec![Key::Resource(*resource), Key::Replicas(*resource)],
        Op::PutReplica(r) => vec![Key::Replicas(r.resource)],
        Op::Published(_) => Vec::new(),
    }
}

/// The ops of one segment, as columns: one statement per kind.
#[derive(Default)]
struct Segment {
    keys: HashSet<Key>,
    assign: (Vec<i64>, Vec<String>, Vec<i64>, Vec<Option<i64>>),
    state: (Vec<i64>, Vec<&'static str>, Vec<Option<String>>),
    replica: (Vec<i64>, Vec<String>, Vec<i64>),
    registered: (Vec<i64>, Vec<i64>),
    confirm: (Vec<i64>, Vec<i64>),
    #[allow(clippy::type_complexity)]
    put: (
        Vec<i64>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<&'static str>,
        Vec<Option<String>>,
        Vec<i64>,
    ),
    /// Ops of the other kinds (rare), a statement each.
    singles: Vec<Stmt>,
}

impl Segment {
    fn push(&mut self, op: &Op) {
        match op {
            Op::Assign {
                resource,
                consumer,
                created_ms,
                registered_ms,
            } => {
                let a = &mut self.assign;
                a.0.push(to_i64(*resource));
                a.1.push(consumer.clone());
                a.2.push(to_i64(*created_ms));
                a.3.push(registered_ms.map(to_i64));
            }
            Op::SetResourceState {
                id,
                state,
                consumer,
            } => {
                let s = &mut self.state;
                s.0.push(to_i64(*id));
                s.1.push(state.as_str());
                s.2.push(consumer.clone());
            }
            Op::PutReplica(r) => {
                let s = &mut self.replica;
                s.0.push(to_i64(r.resource));
                s.1.push(r.manager.clone());
                s.2.push(to_i64(r.at_ms));
            }
            Op::SetRegistered {
                resource,
                registered_ms,
            } => {
                self.registered.0.push(to_i64(*resource));
                self.registered.1.push(to_i64(*registered_ms));
            }
            Op::Confirm { resource, at_ms } => {
                self.confirm.0.push(to_i64(*resource));
                self.confirm.1.push(to_i64(*at_ms));
            }
            Op::PutResource(r) => {
                let p = &mut self.put;
                p.0.push(to_i64(r.id));
                p.1.push(r.resource_type.clone());
                p.2.push(r.name.clone());
                p.3.push(r.location.clone());
                p.4.push(r.manager.clone());
                p.5.push(r.state.as_str());
                p.6.push(r.consumer.clone());
                p.7.push(to_i64(r.created_ms));
            }
            // In the batch log row (`Session::commit`), not a table of its own.
            Op::Published(_) => {}
            Op::SetMeta { key, value } => self.single(
                "INSERT INTO meta (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                vec![p(key.clone()), p(value.clone())],
            ),
            Op::SetAvailability {
                manager,
                availability,
            } => self.single(
                "INSERT INTO manager_availability (manager, availability) VALUES ($1, $2)
                 ON CONFLICT (manager) DO UPDATE SET availability = excluded.availability",
                vec![p(manager.clone()), p(availability.clone())],
            ),
            Op::DeleteResource { id } => {
                self.single("DELETE FROM resources WHERE id = $1", vec![p(to_i64(*id))])
            }
            // Gives the resource back and drops its copies, in one statement.
            Op::Unassign { resource } => self.single(
                "WITH copies AS (DELETE FROM replicas WHERE resource = $1)
                 UPDATE resources SET state = 'ready', consumer = NULL,
                 consumer_created_ms = NULL, registered_ms = NULL, confirmed_ms = NULL
                 WHERE id = $1",
                vec![p(to_i64(*resource))],
            ),
        }
    }

    fn single(&mut self, sql: &'static str, params: Params) {
        self.singles.push(Stmt {
            sql,
            params,
            expect: None,
        });
    }

    fn statements(self, out: &mut Vec<Stmt>) {
        let n = |v: &Vec<i64>| v.len() as u64;
        out.extend(self.singles);
        let put = self.put;
        if !put.0.is_empty() {
            // The whole row is replaced, as SQLite's INSERT OR REPLACE does.
            out.push(Stmt {
                sql: "INSERT INTO resources
                      (id, resource_type, name, location, manager, state, consumer, created_ms)
                      SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],
                          $5::text[], $6::text[], $7::text[], $8::bigint[])
                      ON CONFLICT (id) DO UPDATE SET resource_type = excluded.resource_type,
                          name = excluded.name, location = excluded.location,
                          manager = excluded.manager, state = excluded.state,
                          consumer = excluded.consumer, created_ms = excluded.created_ms,
                          consumer_created_ms = NULL, registered_ms = NULL, confirmed_ms = NULL",
                params: vec![
                    p(put.0),
                    p(put.1),
                    p(put.2),
                    p(put.3),
                    p(put.4),
                    p(put.5),
                    p(put.6),
                    p(put.7),
                ],
                expect: None,
            });
        }
        let s = self.state;
        if !s.0.is_empty() {
            out.push(Stmt {
                sql: "UPDATE resources SET state = v.state, consumer = v.consumer
                      FROM unnest($1::bigint[], $2::text[], $3::text[]) AS v(id, state, consumer)
                      WHERE resources.id = v.id",
                expect: Some((
                    n(&s.0),
                    "state changes name a resource missing from the database",
                )),
                params: vec![p(s.0), p(s.1), p(s.2)],
            });
        }
        let a = self.assign;
        if !a.0.is_empty() {
            out.push(Stmt {
                sql: "UPDATE resources SET state = 'assigned', consumer = v.consumer,
                          consumer_created_ms = v.created_ms, registered_ms = v.registered_ms,
                          confirmed_ms = NULL
                      FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])
                          AS v(id, consumer, created_ms, registered_ms)
                      WHERE resources.id = v.id AND resources.state = 'ready'",
                // A resource is handed out only if it is ready in the
                // database, whatever this process believes.
                expect: Some((
                    n(&a.0),
                    "registrations take a resource that is not ready in the database (missing, or handed out already)",
                )),
                params: vec![p(a.0), p(a.1), p(a.2), p(a.3)],
            });
        }
        let r = self.registered;
        if !r.0.is_empty() {
            out.push(Stmt {
                sql: "UPDATE resources SET registered_ms = v.at_ms
                      FROM unnest($1::bigint[], $2::bigint[]) AS v(id, at_ms)
                      WHERE resources.id = v.id",
                params: vec![p(r.0), p(r.1)],
                expect: None,
            });
        }
        let c = self.confirm;
        if !c.0.is_empty() {
            out.push(Stmt {
                sql: "UPDATE resources SET confirmed_ms = v.at_ms
                      FROM unnest($1::bigint[], $2::bigint[]) AS v(id, at_ms)
                      WHERE resources.id = v.id",
                params: vec![p(c.0), p(c.1)],
                expect: None,
            });
        }
        let r = self.replica;
        if !r.0.is_empty() {
            out.push(Stmt {
                sql: "INSERT INTO replicas (resource, manager, at_ms)
                      SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[])
                      ON CONFLICT DO NOTHING",
                params: vec![p(r.0), p(r.1), p(r.2)],
                expect: None,
            });
        }
    }
}

/// The statements of a batch: a few per batch instead of one per op. Ops are
/// cut into segments in which no two touch the same key (so their order within
/// a segment does not matter); each segment is one statement per kind of op,
/// its rows in arrays (`unnest`); segments run in order.
pub(super) fn batched(ops: &[Op]) -> Vec<Stmt> {
    let mut out = Vec::new();
    let mut segment = Segment::default();
    for op in ops {
        let keys = keys(op);
        if keys.iter().any(|k| segment.keys.contains(k)) {
            std::mem::take(&mut segment).statements(&mut out);
        }
        segment.keys.extend(keys);
        segment.push(op);
    }
    segment.statements(&mut out);
    out
}
