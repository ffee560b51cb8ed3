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

/// How long a shared database keeps its batch log: an instance that could
/// not read it for longer has fallen behind and must be restarted.
pub const BATCH_LOG_KEPT_MS: u64 = 5 * 60 * 1000;
/// Old batches are dropped by every this-many-th commit.
const PRUNE_EVERY: u64 = 1000;

/// A shared database's batch log no longer holds the batches this control
/// plane has yet to replay: only a restart (a fresh load) catches it up.
#[derive(Debug)]
pub struct FellBehind {
    pub next: u64,
    pub oldest: u64,
}

impl std::fmt::Display for FellBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this control plane fell behind the shared database: it needs batch {} but the log \
             starts at {} (it keeps {} minutes); restart it",
            self.next,
            self.oldest,
            BATCH_LOG_KEPT_MS / 60_000
        )
    }
}

impl std::error::Error for FellBehind {}

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

    /// Shared: ends a round's transaction left open (a failed round).
    async fn end_open_round(&mut self) {
        if self.in_txn {
            self.in_txn = false;
            if let Some(c) = &self.client {
                let _ = c.batch_execute("ROLLBACK").await;
            }
        }
    }

    /// Shared: opens the round's transaction, takes the commit lock, and
    /// reads the batches committed since this store's last.
    async fn begin(&mut self) -> anyhow::Result<Vec<Foreign>> {
        self.end_open_round().await;
        let after = i64::try_from(self.seq.unwrap_or(0)).unwrap_or(i64::MAX);
        let client = self.client().await?;
        client.batch_execute("BEGIN").await?;
        let read = async {
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&COMMIT_LOCK])
                .await?;
            let rows = client
                .query(
                    "SELECT seq, ops FROM batches WHERE seq > $1 ORDER BY seq",
                    &[&after],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            let mut last = None;
            if let Some(first) = rows.first() {
                let first: i64 = first.try_get(0)?;
                if first != after + 1 {
                    return Err(anyhow::Error::new(FellBehind {
                        next: after as u64 + 1,
                        oldest: first as u64,
                    }));
                }
            }
            for r in &rows {
                let seq: i64 = r.try_get(0)?;
                let text: String = r.try_get(1)?;
                let ops: Vec<Op> = serde_json::from_str(&text)
                    .with_context(|| format!("batch {seq} in the database is not readable"))?;
                out.push(Foreign { ops });
                last = Some(seq as u64);
            }
            anyhow::Ok((out, last))
        }
        .await;
        match read {
            Ok((out, last)) => {
                self.in_txn = true;
                if let Some(last) = last {
                    self.seq = Some(last);
                }
                Ok(out)
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Shared: a receiver woken whenever another instance commits (and once
    /// after each (re)connection of the listener, for what it may have missed).
    fn foreign_commits(&mut self) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
        let config = self.connect_config()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(listen(config, self.instance.clone(), self.target(), tx));
        Ok(rx)
    }

    /// Shared: whether this instance holds the duty lease, kept by a
    /// connection of its own that waits for the lock and then holds it.
    fn duties(&mut self) -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
        let config = self.connect_config()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(hold_duties(config, self.target(), tx));
        Ok(rx)
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
        let statements = batched(ops);
        let mut prepared = Vec::with_capacity(statements.len());
        for st in statements {
            prepared.push((self.statement(st.sql).await?, st));
        }
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| anyhow!("no PostgreSQL connection"))?;
        let tx = client.transaction().await?;
        // Sent together: the client pipelines them, one round trip for the batch.
        let results = futures_util::future::join_all(prepared.iter().map(|(st, s)| {
            tx.execute_raw(st, s.params.iter().map(|p| &**p as &(dyn ToSql + Sync)))
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
        tx.commit().await.context("commit failed")?;
        Ok(())
    }
}

impl Session {
    /// Shared: the round's batch, its log row and its notification, in the
    /// transaction `begin` opened (which holds the commit lock).
    async fn commit_shared(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        if !self.in_txn {
            let unseen = self.begin().await?;
            if !unseen.is_empty() {
                self.end_open_round().await;
                bail!("other control planes committed since this one read the database; retry");
            }
        }
        let result = self.commit_in_round(ops).await;
        if result.is_err() {
            self.end_open_round().await;
        }
        result
    }

    async fn commit_in_round(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        let client_closed = || anyhow!("no PostgreSQL connection");
        if ops.is_empty() {
            self.in_txn = false;
            self.client
                .as_ref()
                .ok_or_else(client_closed)?
                .batch_execute("COMMIT")
                .await?;
            return Ok(());
        }
        let seq = self.seq.unwrap_or(0) + 1;
        let mut statements = batched(ops);
        if seq.is_multiple_of(PRUNE_EVERY) {
            // The log is for instances catching up, not history.
            statements.push(Stmt {
                sql: "DELETE FROM batches WHERE at_ms < $1",
                params: vec![p(to_i64(crate::now_ms().saturating_sub(BATCH_LOG_KEPT_MS)))],
                expect: None,
            });
        }
        statements.push(Stmt {
            sql: "INSERT INTO batches (seq, instance, at_ms, ops) VALUES ($1, $2, $3, $4)",
            params: vec![
                p(to_i64(seq)),
                p(self.instance.clone()),
                p(to_i64(crate::now_ms())),
                p(serde_json::to_string(ops)?),
            ],
            expect: None,
        });
        statements.push(Stmt {
            sql: "SELECT pg_notify($1, $2)",
            params: vec![p(CHANNEL), p(self.instance.clone())],
            expect: None,
        });
        let mut prepared = Vec::with_capacity(statements.len());
        for st in statements {
            prepared.push((self.statement(st.sql).await?, st));
        }
        let client = self.client.as_ref().ok_or_else(client_closed)?;
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
        client
            .batch_execute("COMMIT")
            .await
            .context("commit failed")?;
        self.in_txn = false;
        self.seq = Some(seq);
        Ok(())
    }
}

/// Shared: waits for the duty lease on a connection of its own (the lock is
/// granted when the holder's session ends), says so, and holds it until that
/// connection ends; then tries again. Ends when nobody asks any more.
async fn hold_duties(
    config: tokio_postgres::Config,
    target: String,
    holding: tokio::sync::watch::Sender<bool>,
) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                let mut connection = tokio::spawn(connection);
                let locked = tokio::select! {
                    r = client.query_one("SELECT pg_advisory_lock($1)", &[&DUTIES_LOCK]) => r.map(|_| ()),
                    _ = &mut connection => Ok(()),
                };
                match locked {
                    Ok(()) if !connection.is_finished() => {
                        tracing::info!(%target, "this control plane runs the fleet's background duties now");
                        holding.send_replace(true);
                        let _ = connection.await;
                        holding.send_replace(false);
                        tracing::warn!(%target, "the duty lease's connection ended; another control plane may take the duties over");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "waiting for the duty lease failed; retrying")
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot connect to wait for the duty lease; retrying")
            }
        }
        if holding.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Shared: listens for other instances' commits on its own connection and
/// wakes the writer; reconnects (and wakes it, for what it may have missed)
/// when the connection is lost. Ends when the writer is gone.
async fn listen(
    config: tokio_postgres::Config,
    instance: String,
    target: String,
    wake: tokio::sync::mpsc::UnboundedSender<()>,
) {
    use futures_util::StreamExt;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = m {
                            if tx.send(n.payload().to_owned()).is_err() {
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        if wake.send(()).is_err() {
                            return;
                        }
                        while let Some(from) = rx.recv().await {
                            if from != instance && wake.send(()).is_err() {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "cannot LISTEN for other control planes' commits; retrying")
                    }
                }
                driver.abort();
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot connect to listen for other control planes' commits; retrying")
            }
        }
        if wake.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One statement of a commit.
struct Stmt {
    sql: &'static str,
    params: Params,
    /// Rows it must change, and what they are for (its error).
    expect: Option<(u64, &'static str)>,
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
    keys: std::collections::HashSet<Key>,
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
fn batched(ops: &[Op]) -> Vec<Stmt> {
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
