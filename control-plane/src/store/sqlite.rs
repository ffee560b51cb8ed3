//! The SQLite store: WAL, `synchronous=FULL`, versioned migrations, prepared statements.

use super::{
    settled, ConsumerRow, LoadWindow, Op, ReplicaRow, ResourceRow, SettledCount, Snapshot, Store,
    StoreRead, StoredConsumer,
};
use anyhow::{anyhow, Context};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use std::path::{Path, PathBuf};

/// Schema migrations, applied in order; the `migrations` table records which ran.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_initial",
        // Consumers live in their resource's row and replicas are keyed by resource id:
        // resource ids grow, so a registration touches pages at the end of the trees
        // instead of random pages, which keeps each group commit small.
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
         created_ms INTEGER NOT NULL,
         consumer TEXT,
         consumer_created_ms INTEGER,
         registered_ms INTEGER);
     CREATE TABLE replicas (
         resource INTEGER NOT NULL,
         manager TEXT NOT NULL,
         at_ms INTEGER NOT NULL,
         PRIMARY KEY (resource, manager)) WITHOUT ROWID;",
    ),
    (
        "0002_registration_lease",
        // A registration is provisional until confirmed (the first manager
        // accepted the sign-up); consumers from before count as confirmed.
        "ALTER TABLE resources ADD COLUMN confirmed_ms INTEGER;
         UPDATE resources SET confirmed_ms = consumer_created_ms WHERE consumer IS NOT NULL;",
    ),
    (
        "0003_legacy_consumer_ids",
        // Settled consumers live in the database only and are found by the
        // resource their id names (`ids.rs`). Ids minted before that name
        // nothing: they are kept here, once; new ones never are.
        "CREATE TABLE legacy_consumer_ids (
             consumer TEXT PRIMARY KEY, resource INTEGER NOT NULL) WITHOUT ROWID;
         INSERT INTO legacy_consumer_ids (consumer, resource)
             SELECT consumer, id FROM resources WHERE consumer IS NOT NULL;",
    ),
];

/// The columns of a resource row, in the order [`read_row`] reads them.
const RESOURCE_COLUMNS: &str = "id, resource_type, name, location, manager, state, consumer,
    created_ms, consumer_created_ms, registered_ms, confirmed_ms";

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    checkpointer: Option<Checkpointer>,
    /// The writer's exclusive lock on the file (`flock`, beside SQLite's own
    /// locks): one control plane writes a database at a time.
    _writer_lock: Option<std::fs::File>,
}

/// Checkpoints the WAL from its own connection, so the writer's commits only ever
/// pay for appending to the WAL and one fsync, never for copying pages back.
struct Checkpointer {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> anyhow::Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA synchronous=FULL;")?;
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("prealloc-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let (g, _) = cv
                        .wait_timeout(stopped, std::time::Duration::from_millis(250))
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = g;
                    if *stopped {
                        break;
                    }
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                    }
                }
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        let writer_lock = std::fs::File::open(path)
            .with_context(|| format!("cannot open database {}", path.display()))?;
        match writer_lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(anyhow!(
                    "database {} is open for writing by another control plane; \
                     one control plane writes a database at a time",
                    path.display()
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow!("cannot lock database {}: {e}", path.display()))
            }
        }
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
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA wal_autocheckpoint=0;
             PRAGMA cache_size=-65536; PRAGMA temp_store=MEMORY;",
        )?;
        let mut store = SqliteStore {
            conn,
            path: path.to_owned(),
            checkpointer: None,
            _writer_lock: Some(writer_lock),
        };
        store.migrate()?;
        store.checkpointer = Some(Checkpointer::start(path)?);
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
            checkpointer: None,
            _writer_lock: None,
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

/// A resource row and, when it is assigned, its consumer.
fn read_row(r: &Row<'_>) -> anyhow::Result<(ResourceRow, Option<ConsumerRow>)> {
    super::StoredRow {
        id: r.get(0)?,
        resource_type: r.get(1)?,
        name: r.get(2)?,
        location: r.get(3)?,
        manager: r.get(4)?,
        state: r.get(5)?,
        consumer: r.get(6)?,
        created_ms: r.get(7)?,
        consumer_created_ms: r.get(8)?,
        registered_ms: r.get(9)?,
        confirmed_ms: r.get(10)?,
    }
    .split()
}

impl SqliteStore {
    fn resource_row(&self, id: u64) -> anyhow::Result<Option<(ResourceRow, Option<ConsumerRow>)>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources WHERE id = ?1"
        ))?;
        let mut rows = st.query([to_i64(id)])?;
        match rows.next()? {
            Some(r) => Ok(Some(read_row(r)?)),
            None => Ok(None),
        }
    }

    fn replicas_of(&self, resource: u64) -> anyhow::Result<Vec<ReplicaRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT resource, manager, at_ms FROM replicas WHERE resource = ?1 ORDER BY at_ms",
        )?;
        let rows = st.query_map([to_i64(resource)], |r| {
            Ok(ReplicaRow {
                resource: r.get::<_, i64>(0)? as u64,
                manager: r.get(1)?,
                at_ms: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl StoreRead for SqliteStore {
    fn consumer(&mut self, id: &str, resource: u64) -> anyhow::Result<Option<StoredConsumer>> {
        // The row must hold this consumer (not given back, not another's).
        let holds = |row: &Option<(ResourceRow, Option<ConsumerRow>)>| matches!(row, Some((_, Some(c))) if c.id == id);
        let mut found = self.resource_row(resource)?;
        if !holds(&found) {
            let legacy: Option<i64> = self
                .conn
                .prepare_cached("SELECT resource FROM legacy_consumer_ids WHERE consumer = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            found = match legacy {
                Some(r) => self.resource_row(r as u64)?,
                None => None,
            };
        }
        if !holds(&found) {
            return Ok(None);
        }
        let Some((resource, Some(consumer))) = found else {
            return Ok(None);
        };
        let replicas = self.replicas_of(resource.id)?;
        Ok(Some(StoredConsumer {
            consumer,
            resource,
            replicas,
        }))
    }

    fn consumer_ids(&mut self, registered_only: bool, limit: usize) -> anyhow::Result<Vec<String>> {
        // In primary-key order, so the scan stops at the limit.
        let sql = if registered_only {
            "SELECT consumer FROM resources WHERE consumer IS NOT NULL AND registered_ms IS NOT NULL
             ORDER BY id LIMIT ?1"
        } else {
            "SELECT consumer FROM resources WHERE consumer IS NOT NULL ORDER BY id LIMIT ?1"
        };
        let mut st = self.conn.prepare_cached(sql)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map([limit], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Store for SqliteStore {
    fn load(&mut self, window: LoadWindow) -> anyhow::Result<Snapshot> {
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
        // One pass over the resources: a settled consumer's row is only
        // counted (its columns are read in place, nothing is allocated).
        // The newest sign-ups, settled or not: the status page follows them.
        let mut newest = std::collections::BinaryHeap::new();
        let mut st = c.prepare(&format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources ORDER BY id"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let is_settled = r.get_ref(6)?.as_str_or_null()?.is_some()
                && settled(
                    r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
                    r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
                    window.now_ms,
                    window.grace_ms,
                );
            if window.recent > 0 && r.get_ref(6)?.as_str_or_null()?.is_some() {
                let created = r.get::<_, Option<i64>>(8)?.unwrap_or(0);
                let id = r.get::<_, i64>(0)?;
                newest.push(std::cmp::Reverse((created, id, is_settled)));
                if newest.len() > window.recent {
                    newest.pop();
                }
            }
            if !is_settled {
                let (resource, consumer) = read_row(r)?;
                snap.consumers.extend(consumer);
                snap.resources.push(resource);
                continue;
            }
            let (manager, resource_type) = (r.get_ref(4)?.as_str()?, r.get_ref(1)?.as_str()?);
            match snap
                .settled
                .iter_mut()
                .find(|s| s.manager == manager && s.resource_type == resource_type)
            {
                Some(s) => s.count += 1,
                None => snap.settled.push(SettledCount {
                    manager: manager.to_owned(),
                    resource_type: resource_type.to_owned(),
                    location: r.get(3)?,
                    count: 1,
                }),
            }
        }
        drop(rows);
        drop(st);
        // The newest sign-ups are loaded even when settled (the others are loaded already).
        let newest_settled = newest.into_iter().filter(|n| n.0 .2).map(|n| n.0 .1);
        for id in newest_settled {
            if let Some((resource, consumer)) = self.resource_row(id as u64)? {
                if let Some(s) = snap.settled.iter_mut().find(|s| {
                    s.manager == resource.manager && s.resource_type == resource.resource_type
                }) {
                    s.count -= 1;
                }
                snap.consumers.extend(consumer);
                snap.resources.push(resource);
            }
        }
        snap.resources.sort_by_key(|r| r.id);
        snap.consumers.sort_by_key(|c| c.resource);
        for consumer in &snap.consumers {
            let replicas = self.replicas_of(consumer.resource)?;
            snap.replicas.extend(replicas);
        }
        Ok(snap)
    }

    fn reader(&self) -> anyhow::Result<Box<dyn StoreRead>> {
        Ok(Box::new(SqliteStore::open_read_only(&self.path)?))
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
                Op::Assign {
                    resource,
                    consumer,
                    created_ms,
                    registered_ms,
                } => {
                    let n = tx
                        .prepare_cached(
                            "UPDATE resources SET state = 'assigned', consumer = ?2,
                             consumer_created_ms = ?3, registered_ms = ?4, confirmed_ms = NULL
                             WHERE id = ?1 AND state = 'ready'",
                        )?
                        .execute(params![
                            to_i64(*resource),
                            consumer,
                            to_i64(*created_ms),
                            registered_ms.map(to_i64)
                        ])?;
                    if n != 1 {
                        return Err(anyhow!(
                            "resource {resource} is not ready in the database (missing, or handed out already)"
                        ));
                    }
                }
                Op::Unassign { resource } => {
                    tx.prepare_cached(
                        "UPDATE resources SET state = 'ready', consumer = NULL,
                         consumer_created_ms = NULL, registered_ms = NULL, confirmed_ms = NULL
                         WHERE id = ?1",
                    )?
                    .execute(params![to_i64(*resource)])?;
                    tx.prepare_cached("DELETE FROM replicas WHERE resource = ?1")?
                        .execute(params![to_i64(*resource)])?;
                }
                Op::SetRegistered {
                    resource,
                    registered_ms,
                } => {
                    tx.prepare_cached("UPDATE resources SET registered_ms = ?2 WHERE id = ?1")?
                        .execute(params![to_i64(*resource), to_i64(*registered_ms)])?;
                }
                Op::Confirm { resource, at_ms } => {
                    tx.prepare_cached("UPDATE resources SET confirmed_ms = ?2 WHERE id = ?1")?
                        .execute(params![to_i64(*resource), to_i64(*at_ms)])?;
                }
                // One control plane writes a SQLite file: nobody reads a log.
                Op::Published(_) => {}
                Op::PutReplica(r) => {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO replicas (resource, manager, at_ms) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![to_i64(r.resource), r.manager, to_i64(r.at_ms)])?;
                }
            }
        }
        tx.commit().context("commit failed")?;
        Ok(())
    }
}
