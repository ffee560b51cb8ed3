//! The SQLite store: WAL, `synchronous=FULL`, versioned migrations, prepared statements.

use super::{ConsumerRow, Op, ReplicaRow, ResourceRow, ResourceState, Snapshot, Store};
use anyhow::{anyhow, Context};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};

/// Schema migrations, applied in order; the `migrations` table records which ran.
const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_initial",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
     CREATE TABLE manager_availability (
         manager TEXT PRIMARY KEY, availability TEXT NOT NULL) WITHOUT ROWID;
     CREATE TABLE resources (
         id INTEGER PRIMARY KEY,
         resource_type TEXT NOT NULL,
         name TEXT NOT NULL,
         location TEXT NOT NULL,
         manager TEXT NOT NULL,
         state TEXT NOT NULL,
         consumer TEXT,
         created_ms INTEGER NOT NULL);
     CREATE TABLE consumers (
         id TEXT PRIMARY KEY,
         resource INTEGER NOT NULL UNIQUE,
         manager TEXT NOT NULL,
         registered INTEGER NOT NULL,
         created_ms INTEGER NOT NULL,
         registered_ms INTEGER) WITHOUT ROWID;
     CREATE TABLE replicas (
         consumer TEXT NOT NULL,
         manager TEXT NOT NULL,
         at_ms INTEGER NOT NULL,
         PRIMARY KEY (consumer, manager)) WITHOUT ROWID;",
)];

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database for writing and migrates it.
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                return Err(anyhow!(
                    "database directory {} does not exist; create it or change `database` in the config",
                    dir.display()
                ));
            }
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL keeps readers (admin CLI) off the writer's back; FULL syncs the WAL on
        // every commit so an acknowledged write survives power loss and kill -9.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(anyhow!(
                "database {} refused WAL mode (got {mode})",
                path.display()
            ));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")?;
        let mut store = SqliteStore {
            conn,
            path: path.to_owned(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database read-only (admin commands beside a running server).
    pub fn open_read_only(path: &Path) -> anyhow::Result<SqliteStore> {
        if !path.exists() {
            return Err(anyhow!(
                "database {} does not exist; has `serve` run with this config?",
                path.display()
            ));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(SqliteStore {
            conn,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&mut self) -> anyhow::Result<()> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)",
        )?;
        for (name, sql) in MIGRATIONS {
            let done: Option<String> = self
                .conn
                .query_row("SELECT name FROM migrations WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            if done.is_some() {
                continue;
            }
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)
                .with_context(|| format!("migration {name} failed"))?;
            tx.execute(
                "INSERT INTO migrations (name, applied_ms) VALUES (?1, ?2)",
                params![name, crate::now_ms() as i64],
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Names of the migrations applied, in order.
    pub fn migrations(&self) -> anyhow::Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT name FROM migrations ORDER BY name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn to_i64(v: u64) -> i64 {
    v as i64
}

impl Store for SqliteStore {
    fn load(&mut self) -> anyhow::Result<Snapshot> {
        let c = &self.conn;
        let mut snap = Snapshot::default();
        let mut st = c.prepare("SELECT key, value FROM meta")?;
        snap.meta = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = c.prepare("SELECT manager, availability FROM manager_availability")?;
        snap.availability = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = c.prepare(
            "SELECT id, resource_type, name, location, manager, state, consumer, created_ms
             FROM resources ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (id, resource_type, name, location, manager, state, consumer, created) = row?;
            let state = ResourceState::parse(&state)
                .ok_or_else(|| anyhow!("resource {id} has unknown state {state:?}"))?;
            snap.resources.push(ResourceRow {
                id: id as u64,
                resource_type,
                name,
                location,
                manager,
                state,
                consumer,
                created_ms: created as u64,
            });
        }
        let mut st = c.prepare(
            "SELECT id, resource, manager, registered, created_ms, registered_ms FROM consumers",
        )?;
        snap.consumers = st
            .query_map([], |r| {
                Ok(ConsumerRow {
                    id: r.get(0)?,
                    resource: r.get::<_, i64>(1)? as u64,
                    manager: r.get(2)?,
                    registered: r.get::<_, i64>(3)? != 0,
                    created_ms: r.get::<_, i64>(4)? as u64,
                    registered_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut st =
            c.prepare("SELECT consumer, manager, at_ms FROM replicas ORDER BY consumer, at_ms")?;
        snap.replicas = st
            .query_map([], |r| {
                Ok(ReplicaRow {
                    consumer: r.get(0)?,
                    manager: r.get(1)?,
                    at_ms: r.get::<_, i64>(2)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(snap)
    }

    fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for op in ops {
            match op {
                Op::SetMeta { key, value } => {
                    tx.prepare_cached(
                        "INSERT INTO meta (key, value) VALUES (?1, ?2)
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    )?
                    .execute(params![key, value])?;
                }
                Op::SetAvailability {
                    manager,
                    availability,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO manager_availability (manager, availability) VALUES (?1, ?2)
                         ON CONFLICT(manager) DO UPDATE SET availability = excluded.availability",
                    )?
                    .execute(params![manager, availability])?;
                }
                Op::PutResource(r) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO resources
                         (id, resource_type, name, location, manager, state, consumer, created_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?
                    .execute(params![
                        to_i64(r.id),
                        r.resource_type,
                        r.name,
                        r.location,
                        r.manager,
                        r.state.as_str(),
                        r.consumer,
                        to_i64(r.created_ms)
                    ])?;
                }
                Op::SetResourceState {
                    id,
                    state,
                    consumer,
                } => {
                    let n = tx
                        .prepare_cached(
                            "UPDATE resources SET state = ?2, consumer = ?3 WHERE id = ?1",
                        )?
                        .execute(params![to_i64(*id), state.as_str(), consumer])?;
                    if n != 1 {
                        return Err(anyhow!("resource {id} is missing from the database"));
                    }
                }
                Op::DeleteResource { id } => {
                    tx.prepare_cached("DELETE FROM resources WHERE id = ?1")?
                        .execute(params![to_i64(*id)])?;
                }
                Op::PutConsumer(c) => {
                    tx.prepare_cached(
                        "INSERT INTO consumers
                         (id, resource, manager, registered, created_ms, registered_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        c.id,
                        to_i64(c.resource),
                        c.manager,
                        c.registered as i64,
                        to_i64(c.created_ms),
                        c.registered_ms.map(to_i64)
                    ])?;
                }
                Op::SetRegistered { id, registered_ms } => {
                    tx.prepare_cached(
                        "UPDATE consumers SET registered = 1, registered_ms = ?2 WHERE id = ?1",
                    )?
                    .execute(params![id, to_i64(*registered_ms)])?;
                }
                Op::DeleteConsumer { id } => {
                    tx.prepare_cached("DELETE FROM replicas WHERE consumer = ?1")?
                        .execute([id])?;
                    tx.prepare_cached("DELETE FROM consumers WHERE id = ?1")?
                        .execute([id])?;
                }
                Op::PutReplica(r) => {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO replicas (consumer, manager, at_ms) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![r.consumer, r.manager, to_i64(r.at_ms)])?;
                }
            }
        }
        tx.commit().context("commit failed")?;
        Ok(())
    }
}
