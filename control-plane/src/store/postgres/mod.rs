//! The PostgreSQL store (`[store] kind = "postgres"`): the same tables as the
//! SQLite store, versioned migrations, one transaction per group commit: its
//! ops become a few statements over arrays (`batched`: one per kind of op, not
//! one per op), pipelined in one round trip.
//!
//! The seam is synchronous ([`Store`] is called from the writer thread, and
//! [`StoreRead`] from API handlers), the client async (`tokio-postgres`): each
//! handle owns a thread running a current-thread runtime with its connection,
//! and a call is a request to that thread and a blocking wait for its answer.
//! A call never starts a runtime inside the caller's, so it is safe from a
//! tokio worker, as a SQLite call is.
//!
//! A lost connection fails the call it was serving (the writer then refuses
//! the batch, `503 storage_failed` with `Retry-After`) and is opened again
//! by the next call: nothing to do when PostgreSQL restarts.
//!
//! One control plane writes a database at a time, unless `store.shared`: the
//! writer's connection holds a session advisory lock, and a second instance
//! is refused at start with a clear error.
//!
//! Shared (several control planes on one database): each
//! writer round takes the database's commit lock (a transaction advisory
//! lock, so rounds of every instance run one after the other), reads the
//! batches the others committed since its last (`batches`, in `seq` order,
//! each with its ops and the routing changes it published), and commits its
//! own batch with the next `seq` and a `NOTIFY`. Route versions thus come
//! from one ordered sequence, and a listener connection wakes the writer
//! when another instance committed, so idle instances catch up at once.

use super::{
    settled, ConsumerRow, Foreign, LoadWindow, Op, ReplicaRow, ResourceRow, SettledCount, Snapshot,
    Store, StoreRead, StoredConsumer,
};
use crate::config::{PasswordSource, PostgresConfig};
use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

mod batch;
mod shared;

use batch::batched;
pub use shared::BATCH_LOG_KEPT_MS;

/// Schema migrations, applied in order; `prealloc_migrations` records which ran.
/// The tables mirror the SQLite store's (see `sqlite.rs` for why consumers
/// live in their resource's row).
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_initial",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE manager_availability (
         manager TEXT PRIMARY KEY, availability TEXT NOT NULL);
     CREATE TABLE resources (
         id BIGINT PRIMARY KEY,
         resource_type TEXT NOT NULL,
         name TEXT NOT NULL,
         location TEXT NOT NULL,
         manager TEXT NOT NULL,
         state TEXT NOT NULL,
         created_ms BIGINT NOT NULL,
         consumer TEXT,
         consumer_created_ms BIGINT,
         registered_ms BIGINT,
         confirmed_ms BIGINT);
     CREATE TABLE replicas (
         resource BIGINT NOT NULL,
         manager TEXT NOT NULL,
         at_ms BIGINT NOT NULL,
         PRIMARY KEY (resource, manager));",
    ),
    (
        "0002_batch_log",
        // Shared databases: every batch, in commit order (`seq` is taken
        // under the commit lock), with its ops as JSON.
        "CREATE TABLE batches (
             seq BIGINT PRIMARY KEY,
             instance TEXT NOT NULL,
             at_ms BIGINT NOT NULL,
             ops TEXT NOT NULL);",
    ),
];

/// The columns of a resource row, in the order [`read_row`] reads them.
const RESOURCE_COLUMNS: &str = "id, resource_type, name, location, manager, state, consumer,
    created_ms, consumer_created_ms, registered_ms, confirmed_ms";

/// Advisory lock keys ("prealloc", "prealloM" and "prealloC" in ASCII).
const WRITER_LOCK: i64 = 0x7072_6561_6c6c_6f63;
const MIGRATION_LOCK: i64 = 0x7072_6561_6c6c_6f4d;
const COMMIT_LOCK: i64 = 0x7072_6561_6c6c_6f43;
/// The duty lease of a shared database ("prealloD"): a session lock, so it
/// passes to another instance when its holder's connection ends.
const DUTIES_LOCK: i64 = 0x7072_6561_6c6c_6f44;

/// The channel a shared database's commits are announced on (payload: the
/// committing instance).
const CHANNEL: &str = "prealloc_batches";

/// How long opening a connection may take before the call fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a handle may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Migrates the schema and holds the writer lock.
    Writer,
    /// Reads beside the writer (the API's lookups).
    Reader,
    /// Admin commands: reads only, in read-only transactions.
    ReadOnly,
}

/// A store in one PostgreSQL database.
pub struct PostgresStore {
    config: PostgresConfig,
    role: Role,
    requests: Option<tokio::sync::mpsc::UnboundedSender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Reply<T> = std::sync::mpsc::SyncSender<anyhow::Result<T>>;

enum Request {
    Load(LoadWindow, Reply<Snapshot>),
    Commit(Vec<Op>, Reply<()>),
    Consumer(String, u64, Reply<Option<StoredConsumer>>),
    ConsumerIds(bool, usize, Reply<Vec<String>>),
    Migrations(Reply<Vec<String>>),
    Begin(Reply<Vec<Foreign>>),
    ForeignCommits(Reply<tokio::sync::mpsc::UnboundedReceiver<()>>),
    Duties(Reply<tokio::sync::watch::Receiver<bool>>),
}

impl PostgresStore {
    /// Connects, migrates the schema and takes the writer lock.
    pub fn open(config: &PostgresConfig) -> anyhow::Result<PostgresStore> {
        PostgresStore::start(config, Role::Writer)
    }

    /// Connects for reads only (admin commands beside a running server).
    pub fn open_read_only(config: &PostgresConfig) -> anyhow::Result<PostgresStore> {
        PostgresStore::start(config, Role::ReadOnly)
    }

    fn start(config: &PostgresConfig, role: Role) -> anyhow::Result<PostgresStore> {
        let target: tokio_postgres::Config = config
            .url
            .parse()
            .context("`store.url` is not a PostgreSQL URL")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut session = Session {
            target,
            password: config.password.clone(),
            role,
            shared: config.shared,
            instance: format!("{:016x}", rand::random::<u64>()),
            seq: None,
            in_txn: false,
            client: None,
            statements: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("prealloc-postgres".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the PostgreSQL client's runtime");
                        return;
                    }
                };
                rt.block_on(session.serve(rx));
            })
            .context("cannot start the PostgreSQL client's thread")?;
        let store = PostgresStore {
            config: config.clone(),
            role,
            requests: Some(tx),
            thread: Some(thread),
        };
        // Connect (and migrate) now, so a bad URL or password fails the start.
        store.migrations()?;
        Ok(store)
    }

    /// Names of the migrations applied, in order.
    pub fn migrations(&self) -> anyhow::Result<Vec<String>> {
        self.call(Request::Migrations)
    }

    fn call<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> anyhow::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let sent = self.requests.as_ref().map(|r| r.send(request(tx)));
        if !matches!(sent, Some(Ok(()))) {
            bail!("the PostgreSQL client's thread has stopped");
        }
        rx.recv()
            .map_err(|_| anyhow!("the PostgreSQL client's thread has stopped"))?
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The thread ends when its queue closes; its connection (and the
        // writer lock with it) goes.
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl StoreRead for PostgresStore {
    fn consumer(&mut self, id: &str, resource: u64) -> anyhow::Result<Option<StoredConsumer>> {
        let id = id.to_owned();
        self.call(|r| Request::Consumer(id, resource, r))
    }

    fn consumer_ids(&mut self, registered_only: bool, limit: usize) -> anyhow::Result<Vec<String>> {
        self.call(|r| Request::ConsumerIds(registered_only, limit, r))
    }
}

impl Store for PostgresStore {
    fn load(&mut self, window: LoadWindow) -> anyhow::Result<Snapshot> {
        self.call(|r| Request::Load(window, r))
    }

    fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        // Shared: an empty round still ends its transaction (the commit lock).
        if ops.is_empty() && !self.config.shared {
            return Ok(());
        }
        if self.role != Role::Writer {
            bail!("this PostgreSQL handle is read-only");
        }
        let ops = ops.to_vec();
        self.call(|r| Request::Commit(ops, r))
    }

    fn reader(&self) -> anyhow::Result<Box<dyn StoreRead>> {
        let role = match self.role {
            Role::ReadOnly => Role::ReadOnly,
            Role::Writer | Role::Reader => Role::Reader,
        };
        Ok(Box::new(PostgresStore::start(&self.config, role)?))
    }

    fn shared(&self) -> bool {
        self.config.shared
    }

    fn begin(&mut self) -> anyhow::Result<Vec<Foreign>> {
        if !self.config.shared {
            return Ok(Vec::new());
        }
        self.call(Request::Begin)
    }

    fn foreign_commits(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        if !self.config.shared || self.role != Role::Writer {
            return None;
        }
        match self.call(Request::ForeignCommits) {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot listen for other control planes' commits");
                None
            }
        }
    }

    fn duties(&mut self) -> Option<tokio::sync::watch::Receiver<bool>> {
        if !self.config.shared || self.role != Role::Writer {
            return None;
        }
        match self.call(Request::Duties) {
            Ok(rx) => Some(rx),
            Err(e) => {
                // Never holding them is safe: another instance does.
                tracing::error!(error = %format!("{e:#}"), "cannot ask for the duty lease");
                Some(tokio::sync::watch::channel(false).1)
            }
        }
    }
}

/// The connection side, on the handle's own thread.
struct Session {
    target: tokio_postgres::Config,
    password: PasswordSource,
    role: Role,
    /// Several control planes write this database.
    shared: bool,
    /// This process, in the batch log and its notifications.
    instance: String,
    /// Shared: the last batch this store's state includes (`None` before the first load).
    seq: Option<u64>,
    /// Shared: a round's transaction (and the commit lock) is open.
    in_txn: bool,
    client: Option<Client>,
    /// Prepared statements of the current connection, by SQL text.
    statements: HashMap<&'static str, Statement>,
}

impl Session {
    async fn serve(&mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Request>) {
        // Waiting here lets the connection task run between requests too, so
        // a connection the server closed is known closed before the next call.
        while let Some(request) = rx.recv().await {
            match request {
                Request::Load(window, reply) => {
                    let r = self.load(window).await;
                    self.answer(reply, r);
                }
                Request::Commit(ops, reply) => {
                    let r = self.commit(&ops).await;
                    self.answer(reply, r);
                }
                Request::Consumer(id, resource, reply) => {
                    let r = self.consumer(&id, resource).await;
                    self.answer(reply, r);
                }
                Request::ConsumerIds(registered_only, limit, reply) => {
                    let r = self.consumer_ids(registered_only, limit).await;
                    self.answer(reply, r);
                }
                Request::Migrations(reply) => {
                    let r = self.migrations().await;
                    self.answer(reply, r);
                }
                Request::Begin(reply) => {
                    let r = self.begin().await;
                    self.answer(reply, r);
                }
                Request::ForeignCommits(reply) => {
                    let r = self.foreign_commits();
                    self.answer(reply, r);
                }
                Request::Duties(reply) => {
                    let r = self.duties();
                    self.answer(reply, r);
                }
            }
        }
    }

    /// Sends the answer; after a failure, drops a connection that is gone so
    /// the next call opens a new one.
    fn answer<T>(&mut self, reply: Reply<T>, result: anyhow::Result<T>) {
        if result.is_err() && self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.statements.clear();
            self.in_txn = false;
        }
        let _ = reply.send(result);
    }

    /// Where this session connects, for messages (never with a password).
    fn target(&self) -> String {
        let host = match self.target.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.target.get_ports().first().copied().unwrap_or(5432);
        let db = self
            .target
            .get_dbname()
            .or(self.target.get_user())
            .unwrap_or("");
        format!("{host}:{port}/{db}")
    }

    /// The connection, opened (and set up for its role) if there is none.
    async fn client(&mut self) -> anyhow::Result<&Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.statements.clear();
            self.in_txn = false;
        }
        if self.client.is_none() {
            let client = self.connect().await?;
            self.client = Some(client);
        }
        self.client
            .as_ref()
            .ok_or_else(|| anyhow!("no PostgreSQL connection"))
    }

    /// The connection settings with the password, read now.
    fn connect_config(&self) -> anyhow::Result<tokio_postgres::Config> {
        let mut config = self.target.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("prealloc-control-plane");
        }
        match &self.password {
            PasswordSource::None => {}
            PasswordSource::Env(var) => {
                let p = std::env::var(var).map_err(|_| {
                    anyhow!("`store.password_env`: the environment variable {var} is not set")
                })?;
                config.password(p);
            }
            PasswordSource::File(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("`store.password_file`: cannot read {}", path.display())
                })?;
                config.password(text.lines().next().unwrap_or(""));
            }
        }
        Ok(config)
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.connect_config()?;
        let target = self.target();
        let (client, connection) = config
            .connect(NoTls)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {target}"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(%target, error = %e, "PostgreSQL connection lost; the next call reconnects");
            }
        });
        match self.role {
            Role::Writer if self.shared => {
                migrate(&client).await?;
                // Shared instances hold the writer lock together; one
                // without `shared` holds it alone: the two never mix.
                let locked: bool = client
                    .query_one("SELECT pg_try_advisory_lock_shared($1)", &[&WRITER_LOCK])
                    .await?
                    .get(0);
                if !locked {
                    bail!(
                        "a control plane without `store.shared` writes PostgreSQL database {}; \
                         set `shared = true` on every control plane of that database",
                        self.target()
                    );
                }
            }
            Role::Writer => {
                migrate(&client).await?;
                let locked: bool = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])
                    .await?
                    .get(0);
                if !locked {
                    bail!(
                        "another session holds the writer lock of PostgreSQL database {}: \
                         another control plane writes to it (several need `shared = true` \
                         on every one), or this one's previous connection, which PostgreSQL \
                         has not yet noticed is gone",
                        self.target()
                    );
                }
            }
            Role::Reader => {}
            Role::ReadOnly => {
                client
                    .batch_execute("SET default_transaction_read_only = on")
                    .await?;
                let exists: bool = client
                    .query_one("SELECT to_regclass('prealloc_migrations') IS NOT NULL", &[])
                    .await?
                    .get(0);
                if !exists {
                    bail!(
                        "PostgreSQL database {} holds no prealloc tables; has `serve` run with this config?",
                        self.target()
                    );
                }
            }
        }
        Ok(client)
    }

    /// The statement for this SQL on the current connection, prepared once.
    async fn statement(&mut self, sql: &'static str) -> anyhow::Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client().await?.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    async fn migrations(&mut self) -> anyhow::Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query("SELECT name FROM prealloc_migrations ORDER BY name", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn resource_row(
        &mut self,
        id: u64,
    ) -> anyhow::Result<Option<(ResourceRow, Option<ConsumerRow>)>> {
        const SQL: &str = "SELECT id, resource_type, name, location, manager, state, consumer,
            created_ms, consumer_created_ms, registered_ms, confirmed_ms FROM resources WHERE id = $1";
        let st = self.statement(SQL).await?;
        let row = self.client().await?.query_opt(&st, &[&to_i64(id)]).await?;
        row.as_ref().map(read_row).transpose()
    }

    async fn replicas_of(&mut self, resources: &[u64]) -> anyhow::Result<Vec<ReplicaRow>> {
        const SQL: &str = "SELECT resource, manager, at_ms FROM replicas WHERE resource = ANY($1)
            ORDER BY resource, at_ms, manager";
        let ids: Vec<i64> = resources.iter().map(|&r| to_i64(r)).collect();
        let st = self.statement(SQL).await?;
        let rows = self.client().await?.query(&st, &[&ids]).await?;
        Ok(rows
            .iter()
            .map(|r| ReplicaRow {
                resource: r.get::<_, i64>(0) as u64,
                manager: r.get(1),
                at_ms: r.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    async fn consumer(
        &mut self,
        id: &str,
        resource: u64,
    ) -> anyhow::Result<Option<StoredConsumer>> {
        // The row must hold this consumer (not given back, not another's). A
        // PostgreSQL database never held ids from before they named their
        // resource, so there is no table of older ids to look in.
        let Some((resource, Some(consumer))) = self.resource_row(resource).await? else {
            return Ok(None);
        };
        if consumer.id != id {
            return Ok(None);
        }
        let replicas = self.replicas_of(&[resource.id]).await?;
        Ok(Some(StoredConsumer {
            consumer,
            resource,
            replicas,
        }))
    }

    async fn consumer_ids(
        &mut self,
        registered_only: bool,
        limit: usize,
    ) -> anyhow::Result<Vec<String>> {
        let sql = if registered_only {
            "SELECT consumer FROM resources WHERE consumer IS NOT NULL AND registered_ms IS NOT NULL
             ORDER BY id LIMIT $1"
        } else {
            "SELECT consumer FROM resources WHERE consumer IS NOT NULL ORDER BY id LIMIT $1"
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let st = self.statement(sql).await?;
        let rows = self.client().await?.query(&st, &[&limit]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn load(&mut self, window: LoadWindow) -> anyhow::Result<Snapshot> {
        self.end_open_round().await;
        // One snapshot of the database, the batch log's end included.
        self.client()
            .await?
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let loaded = self.load_in_transaction(window).await;
        let end = match &self.client {
            Some(c) => c.batch_execute("COMMIT").await,
            None => Ok(()),
        };
        let (snap, last) = loaded?;
        end?;
        // The first load starts the catch-up at the log's end; a reload keeps
        // its place, so the batches since are replayed (`Registry::apply` is
        // idempotent) and their routing changes published.
        if self.seq.is_none() {
            self.seq = Some(last);
        }
        Ok(snap)
    }

    async fn load_in_transaction(&mut self, window: LoadWindow) -> anyhow::Result<(Snapshot, u64)> {
        let client = self.client().await?;
        let last: i64 = client
            .query_one("SELECT coalesce(max(seq), 0) FROM batches", &[])
            .await?
            .try_get(0)?;
        let pairs = |rows: Vec<Row>| -> Vec<(String, String)> {
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        let mut snap = Snapshot {
            meta: pairs(client.query("SELECT key, value FROM meta", &[]).await?),
            availability: pairs(
                client
                    .query(
                        "SELECT manager, availability FROM manager_availability",
                        &[],
                    )
                    .await?,
            ),
            ..Snapshot::default()
        };
        // Settled: registered at or before this, and confirmed (`store::settled`).
        let registered_by: i64 = match window.now_ms.checked_sub(window.grace_ms) {
            Some(t) => i64::try_from(t).unwrap_or(i64::MAX),
            None => -1,
        };
        const SETTLED: &str = "coalesce(consumer IS NOT NULL AND confirmed_ms IS NOT NULL
            AND registered_ms <= $1, false)";
        for row in client
            .query(
                &format!(
                    "SELECT {RESOURCE_COLUMNS} FROM resources WHERE NOT {SETTLED} ORDER BY id"
                ),
                &[&registered_by],
            )
            .await?
        {
            let (resource, consumer) = read_row(&row)?;
            snap.consumers.extend(consumer);
            snap.resources.push(resource);
        }
        for row in client
            .query(
                &format!(
                    "SELECT manager, resource_type, min(location), count(*) FROM resources
                     WHERE {SETTLED} GROUP BY manager, resource_type ORDER BY manager, resource_type"
                ),
                &[&registered_by],
            )
            .await?
        {
            snap.settled.push(SettledCount {
                manager: row.get(0),
                resource_type: row.get(1),
                location: row.get(2),
                count: row.get::<_, i64>(3) as u64,
            });
        }
        // The newest sign-ups are loaded even when settled (the status page
        // follows them); the others among them are loaded already.
        if window.recent > 0 {
            let recent = i64::try_from(window.recent).unwrap_or(i64::MAX);
            let newest = client
                .query(
                    &format!(
                        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE consumer IS NOT NULL
                         ORDER BY coalesce(consumer_created_ms, 0) DESC, id DESC LIMIT $1"
                    ),
                    &[&recent],
                )
                .await?;
            for row in &newest {
                let (resource, consumer) = read_row(row)?;
                let Some(c) = consumer else { continue };
                if !settled(
                    c.registered_ms,
                    c.confirmed_ms,
                    window.now_ms,
                    window.grace_ms,
                ) {
                    continue;
                }
                if let Some(s) = snap.settled.iter_mut().find(|s| {
                    s.manager == resource.manager && s.resource_type == resource.resource_type
                }) {
                    s.count = s.count.saturating_sub(1);
                }
                snap.consumers.push(c);
                snap.resources.push(resource);
            }
        }
        snap.resources.sort_by_key(|r| r.id);
        snap.consumers.sort_by_key(|c| c.resource);
        let loaded: Vec<u64> = snap.consumers.iter().map(|c| c.resource).collect();
        snap.replicas = self.replicas_of(&loaded).await?;
        Ok((snap, last as u64))
    }

    async fn commit(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        if self.shared {
            return self.commit_shared(ops).await;
        }
        self.client().await?.batch_execute("BEGIN").await?;
        let done = self.execute_in_transaction(batched(ops)).await;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| anyhow!("no PostgreSQL connection"))?;
        match done {
            Ok(()) => client
                .batch_execute("COMMIT")
                .await
                .context("commit failed"),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Runs a commit's statements in the transaction open on the current
    /// connection, sent together (the client pipelines them: one round trip),
    /// and checks the rows each had to change. Never reconnects: a statement
    /// on a new connection would run outside the transaction.
    async fn execute_in_transaction(&mut self, statements: Vec<batch::Stmt>) -> anyhow::Result<()> {
        let gone = || anyhow!("the PostgreSQL connection was lost during the transaction");
        let mut prepared = Vec::with_capacity(statements.len());
        for st in statements {
            let statement = match self.statements.get(st.sql) {
                Some(s) => s.clone(),
                None => {
                    let s = self
                        .client
                        .as_ref()
                        .ok_or_else(gone)?
                        .prepare(st.sql)
                        .await?;
                    self.statements.insert(st.sql, s.clone());
                    s
                }
            };
            prepared.push((statement, st));
        }
        let client = self.client.as_ref().ok_or_else(gone)?;
        let results = futures_util::future::join_all(prepared.iter().map(|(st, s)| {
            client.execute_raw(st, s.params.iter().map(|p| &**p as &(dyn ToSql + Sync)))
        }))
        .await;
        for (result, (_, s)) in results.into_iter().zip(&prepared) {
            let n = result?;
            if let Some((rows, what)) = &s.expect {
                if n != *rows {
                    bail!("{} of the batch's {rows} {what}", rows - n.min(*rows));
                }
            }
        }
        Ok(())
    }
}

/// Applies the migrations not yet applied, one transaction each, under a lock
/// (instances starting together migrate once).
async fn migrate(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS prealloc_migrations (
                 name TEXT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .await
        .context("cannot create the migrations table")?;
    for (name, sql) in MIGRATIONS {
        client.batch_execute("BEGIN").await?;
        let applied = async {
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            let done = client
                .query_opt("SELECT 1 FROM prealloc_migrations WHERE name = $1", &[name])
                .await?
                .is_some();
            if !done {
                client
                    .batch_execute(sql)
                    .await
                    .with_context(|| format!("migration {name} failed"))?;
                client
                    .execute(
                        "INSERT INTO prealloc_migrations (name, applied_ms) VALUES ($1, $2)",
                        &[name, &to_i64(crate::now_ms())],
                    )
                    .await?;
            }
            anyhow::Ok(())
        }
        .await;
        match applied {
            Ok(()) => client.batch_execute("COMMIT").await?,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
    }
    Ok(())
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

fn to_i64(v: u64) -> i64 {
    v as i64
}

/// A resource row and, when it is assigned, its consumer.
fn read_row(r: &Row) -> anyhow::Result<(ResourceRow, Option<ConsumerRow>)> {
    super::StoredRow {
        id: r.try_get(0)?,
        resource_type: r.try_get(1)?,
        name: r.try_get(2)?,
        location: r.try_get(3)?,
        manager: r.try_get(4)?,
        state: r.try_get(5)?,
        consumer: r.try_get(6)?,
        created_ms: r.try_get(7)?,
        consumer_created_ms: r.try_get(8)?,
        registered_ms: r.try_get(9)?,
        confirmed_ms: r.try_get(10)?,
    }
    .split()
}
