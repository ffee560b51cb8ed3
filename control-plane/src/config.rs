//! The TOML configuration file: parsed strictly, then validated into a checked [`Config`].

use prealloc_wire::Availability;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default listen address: loopback only, so nothing is exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// The whole configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// SQLite database file; a relative path is relative to the config file.
    /// Shorthand for `[store] kind = "sqlite"`, `path = …`.
    #[serde(default)]
    pub database: Option<PathBuf>,
    /// Where the state is kept, when not in `database`.
    #[serde(default)]
    pub store: Option<RawStore>,
    pub tokens: Tokens,
    #[serde(default)]
    pub managers: Vec<ManagerConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub provisioning: ProvisioningConfig,
    #[serde(default)]
    pub push: PushConfig,
    /// How long a registered consumer stays in the routing table.
    #[serde(default = "default_grace_ms")]
    pub grace_period_ms: u64,
    /// How long a new registration stays provisional: not confirmed by the
    /// filter (after the first manager accepted the sign-up) within this time,
    /// it is reclaimed and its resource goes back to the pool.
    #[serde(default = "default_lease_ms")]
    pub registration_lease_ms: u64,
    /// Upper bound of writes committed in one transaction.
    #[serde(default = "default_max_batch")]
    pub max_write_batch: usize,
}

fn default_lease_ms() -> u64 {
    60_000
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}
fn default_grace_ms() -> u64 {
    60_000
}
fn default_max_batch() -> usize {
    1024
}

/// The `[store]` table, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: StoreKind,
    /// `sqlite`: the database file, relative to the config file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `postgres`: a libpq-style URL without the password,
    /// e.g. `postgres://prealloc@db.internal:5432/prealloc`.
    #[serde(default)]
    pub url: Option<String>,
    /// `postgres`: the environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `postgres`: a file holding the password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `postgres`: several control planes share this database: each one's
    /// writer takes the database's commit lock per batch and replays the
    /// others' batches (control-plane/README.md, "Several control planes").
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// Where the state is kept: one SQLite file (the default), or a PostgreSQL
/// database. Holds no secret: a `{:?}` of it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Sqlite { path: PathBuf },
    Postgres(PostgresConfig),
}

/// A PostgreSQL database: where, and where its password comes from (read
/// at each connection, so a rotated password is picked up on reconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The URL as configured; it never holds a password (refused at load).
    pub url: String,
    pub password: PasswordSource,
    /// Several control planes write this database (`store.shared`).
    pub shared: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// None needed (trust, peer or certificate authentication).
    None,
    Env(String),
    File(PathBuf),
}

impl std::fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Sqlite { path } => write!(f, "sqlite {}", path.display()),
            StoreConfig::Postgres(pg) => write!(f, "postgres {}", pg.url),
        }
    }
}

impl StoreConfig {
    /// The SQLite file, if that is the store.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            StoreConfig::Sqlite { path } => Some(path),
            StoreConfig::Postgres(_) => None,
        }
    }

    fn validate(
        database: Option<&Path>,
        store: Option<&RawStore>,
        base: &Path,
    ) -> Result<StoreConfig, String> {
        let relative = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let store = match (database, store) {
            (Some(_), Some(_)) => {
                return Err("keys `database` and `[store]`: use one (`database = \"prealloc.db\"` is short for `[store]` with kind = \"sqlite\")".into())
            }
            (None, None) => {
                return Err("key `database`: missing; name the SQLite file, e.g. database = \"prealloc.db\", or add a `[store]` table (kind = \"postgres\", url = …)".into())
            }
            (Some(path), None) => {
                if path.as_os_str().is_empty() {
                    return Err("key `database`: must name a file, e.g. \"prealloc.db\"".into());
                }
                return Ok(StoreConfig::Sqlite { path: relative(path) });
            }
            (None, Some(store)) => store,
        };
        let only = |key: &str, set: bool, kind: &str| {
            if set {
                Err(format!(
                    "key `store.{key}`: not used with kind = \"{kind}\""
                ))
            } else {
                Ok(())
            }
        };
        match store.kind {
            StoreKind::Sqlite => {
                only("url", store.url.is_some(), "sqlite")?;
                only("password_env", store.password_env.is_some(), "sqlite")?;
                only("password_file", store.password_file.is_some(), "sqlite")?;
                only("shared", store.shared, "sqlite")?;
                match &store.path {
                    Some(p) if !p.as_os_str().is_empty() => {
                        Ok(StoreConfig::Sqlite { path: relative(p) })
                    }
                    _ => Err("key `store.path`: must name a file, e.g. \"prealloc.db\"".into()),
                }
            }
            StoreKind::Postgres => {
                only("path", store.path.is_some(), "postgres")?;
                let url = store.url.clone().ok_or(
                    "key `store.url`: missing; e.g. url = \"postgres://prealloc@db.internal:5432/prealloc\"",
                )?;
                // The parser's message never echoes the URL (it may hold a secret).
                let parsed: tokio_postgres::Config = url.parse().map_err(|e| {
                    format!("key `store.url`: not a PostgreSQL URL or key=value string ({e})")
                })?;
                if parsed.get_password().is_some() {
                    return Err("key `store.url`: holds a password; the URL is logged, so put the password in an environment variable (`password_env`) or a file (`password_file`)".into());
                }
                if parsed.get_user().is_none() {
                    return Err(
                        "key `store.url`: names no user, e.g. postgres://prealloc@host/prealloc"
                            .into(),
                    );
                }
                let password = match (&store.password_env, &store.password_file) {
                    (Some(_), Some(_)) => {
                        return Err(
                            "keys `store.password_env` and `store.password_file`: use one".into(),
                        )
                    }
                    (Some(var), None) if var.is_empty() => {
                        return Err(
                            "key `store.password_env`: must name an environment variable".into(),
                        )
                    }
                    (Some(var), None) => PasswordSource::Env(var.clone()),
                    (None, Some(file)) => PasswordSource::File(relative(file)),
                    (None, None) => PasswordSource::None,
                };
                Ok(StoreConfig::Postgres(PostgresConfig {
                    url,
                    password,
                    shared: store.shared,
                }))
            }
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Bearer token of Envoys: routes and registrations.
    pub envoy: String,
    /// Bearer token of managers and admins: replicas, availability, admin reads (and everything else).
    pub admin: String,
    /// Optional read-only token for the status page (`GET /status`); the admin token signs in too.
    #[serde(default)]
    pub status: Option<String>,
}

/// Never prints the tokens (a `{:?}` of the config must be safe to log).
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("envoy", &"<redacted>")
            .field("admin", &"<redacted>")
            .field("status", &self.status.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    pub id: String,
    /// Envoy cluster that reaches this manager.
    pub cluster: String,
    pub location: String,
    /// Base URL of the manager contract endpoints (`http://host:port`).
    pub admin_url: String,
    /// Maximum number of resources per resource type.
    #[serde(default)]
    pub capacity: BTreeMap<String, u64>,
    /// Initial availability; a `PUT /v1/managers/{id}/availability` stored in the database wins.
    #[serde(default = "default_availability")]
    pub availability: Availability,
    /// Ask the manager to provision each resource (`POST /prealloc/v1/resources`).
    #[serde(default)]
    pub provision: bool,
    /// Bearer token sent on calls to this manager.
    #[serde(default)]
    pub token: Option<String>,
}

/// Everything but the token's value.
impl std::fmt::Debug for ManagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerConfig")
            .field("id", &self.id)
            .field("cluster", &self.cluster)
            .field("location", &self.location)
            .field("admin_url", &self.admin_url)
            .field("capacity", &self.capacity)
            .field("availability", &self.availability)
            .field("provision", &self.provision)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn default_availability() -> Availability {
    Availability::Available
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub resource_type: String,
    pub location: String,
    pub target_depth: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Managers replicate by themselves and report each copy.
    Reported,
    /// The control plane copies data through the manager contract.
    Active,
}

/// How many managers must hold a consumer's data for it to be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationTarget {
    /// Every manager of the consumer's location.
    All,
    /// This many managers (at most the managers of the location).
    Count(usize),
}

impl<'de> Deserialize<'de> for ReplicationTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum T {
            S(String),
            N(i64),
        }
        match T::deserialize(d)? {
            T::S(s) if s == "all" => Ok(ReplicationTarget::All),
            T::S(s) => Err(serde::de::Error::custom(format!(
                "replication target must be \"all\" or a positive number, got {s:?}"
            ))),
            T::N(n) if n >= 1 => Ok(ReplicationTarget::Count(n as usize)),
            T::N(n) => Err(serde::de::Error::custom(format!(
                "replication target must be \"all\" or a number >= 1, got {n}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    #[serde(default = "default_mode")]
    pub mode: ReplicationMode,
    #[serde(default = "default_target")]
    pub target: ReplicationTarget,
    /// Active mode: first retry delay; doubles up to `retry_max_ms`.
    #[serde(default = "default_retry_min")]
    pub retry_min_ms: u64,
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// Active mode: timeout of one GET or PUT to a manager.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Active mode: copies in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            mode: default_mode(),
            target: default_target(),
            retry_min_ms: default_retry_min(),
            retry_max_ms: default_retry_max(),
            timeout_ms: default_timeout(),
            concurrency: default_concurrency(),
        }
    }
}

fn default_mode() -> ReplicationMode {
    ReplicationMode::Reported
}
fn default_target() -> ReplicationTarget {
    ReplicationTarget::All
}
fn default_retry_min() -> u64 {
    100
}
fn default_retry_max() -> u64 {
    5_000
}
fn default_timeout() -> u64 {
    2_000
}
fn default_concurrency() -> usize {
    64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    /// Timeout of one provisioning call.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Attempts before the reservation is given back.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(default = "default_retry_min")]
    pub retry_min_ms: u64,
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// Provisioning calls in flight at once (all pools together).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        ProvisioningConfig {
            timeout_ms: default_timeout(),
            attempts: default_attempts(),
            retry_min_ms: default_retry_min(),
            retry_max_ms: default_retry_max(),
            concurrency: default_concurrency(),
        }
    }
}

fn default_attempts() -> u32 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Longest hold of a `GET /v1/routes` long-poll, whatever the client asks.
    #[serde(default = "default_max_wait")]
    pub max_wait_ms: u64,
    /// Consumer changes remembered for deltas; older `since` gets a full snapshot.
    #[serde(default = "default_change_log")]
    pub change_log: usize,
    /// Most entries in one snapshot page, most changes in one delta: bounds
    /// every answer's size (about 85 bytes of JSON per entry) and the time
    /// an Envoy's main thread spends on it.
    #[serde(default = "default_page_entries")]
    pub page_entries: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            max_wait_ms: default_max_wait(),
            change_log: default_change_log(),
            page_entries: default_page_entries(),
        }
    }
}

fn default_max_wait() -> u64 {
    60_000
}
fn default_change_log() -> usize {
    100_000
}
fn default_page_entries() -> usize {
    2_000
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreConfig,
    pub tokens: Tokens,
    pub managers: Vec<ManagerConfig>,
    pub pools: Vec<PoolConfig>,
    pub replication: ReplicationConfig,
    pub provisioning: ProvisioningConfig,
    pub push: PushConfig,
    pub grace_period_ms: u64,
    pub registration_lease_ms: u64,
    pub max_write_batch: usize,
}

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text; a relative `database` is joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: parse_error_message(text, &e),
        })?;
        Config::validate(raw, base).map_err(|message| ConfigError::Invalid {
            path: PathBuf::from("<text>"),
            message,
        })
    }

    /// Checks everything serde cannot: references, uniqueness, ranges.
    pub fn validate(raw: RawConfig, base: &Path) -> Result<Config, String> {
        let listen: SocketAddr = raw.listen.parse().map_err(|e| {
            format!(
                "key `listen`: {:?} is not an address like 127.0.0.1:7070 ({e})",
                raw.listen
            )
        })?;
        let store = StoreConfig::validate(raw.database.as_deref(), raw.store.as_ref(), base)?;
        let status = raw.tokens.status.clone().unwrap_or_else(|| "x".repeat(16));
        for (key, tok) in [
            ("tokens.envoy", &raw.tokens.envoy),
            ("tokens.admin", &raw.tokens.admin),
            ("tokens.status", &status),
        ] {
            if tok.len() < 16 {
                return Err(format!("key `{key}`: token must be at least 16 characters"));
            }
            if !tok.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "key `{key}`: token may only contain printable ASCII without spaces"
                ));
            }
        }
        if raw.tokens.envoy == raw.tokens.admin {
            return Err("keys `tokens.envoy` and `tokens.admin`: must differ, or Envoys could change availability".into());
        }
        if let Some(st) = &raw.tokens.status {
            if *st == raw.tokens.admin || *st == raw.tokens.envoy {
                return Err(
                    "key `tokens.status`: must differ from `tokens.admin` and `tokens.envoy`"
                        .into(),
                );
            }
        }
        let mut ids = HashSet::new();
        let mut clusters = HashSet::new();
        for (i, m) in raw.managers.iter().enumerate() {
            let at = format!("managers[{i}]");
            if !valid_name(&m.id) {
                return Err(format!(
                    "key `{at}.id`: {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                    m.id
                ));
            }
            if !ids.insert(m.id.clone()) {
                return Err(format!(
                    "key `{at}.id`: manager id {:?} appears twice",
                    m.id
                ));
            }
            if m.cluster.is_empty() || m.cluster.contains([',', '|', ' ', '\n']) {
                return Err(format!("key `{at}.cluster`: {:?} must be a non-empty Envoy cluster name without , | or spaces", m.cluster));
            }
            if !clusters.insert(m.cluster.clone()) {
                return Err(format!(
                    "key `{at}.cluster`: cluster {:?} is used by two managers",
                    m.cluster
                ));
            }
            if !valid_name(&m.location) {
                return Err(format!(
                    "key `{at}.location`: {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                    m.location
                ));
            }
            if let Some(t) = &m.token {
                if *t == raw.tokens.admin || *t == raw.tokens.envoy {
                    return Err(format!(
                        "key `{at}.token`: must differ from `tokens.admin` and `tokens.envoy`: \
                         it is sent to the manager, which would then hold that token's powers"
                    ));
                }
            }
            crate::manager_client::BaseUrl::parse(&m.admin_url)
                .map_err(|e| format!("key `{at}.admin_url`: {e}"))?;
            for t in m.capacity.keys() {
                if !valid_name(t) {
                    return Err(format!("key `{at}.capacity.{t}`: resource type must be 1-64 characters of A-Z a-z 0-9 . _ -"));
                }
            }
        }
        let mut pools = HashSet::new();
        for (i, p) in raw.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            if !valid_name(&p.resource_type) {
                return Err(format!(
                    "key `{at}.resource_type`: {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                    p.resource_type
                ));
            }
            if !pools.insert((p.resource_type.clone(), p.location.clone())) {
                return Err(format!(
                    "key `{at}`: pool ({}, {}) appears twice",
                    p.resource_type, p.location
                ));
            }
            if !raw.managers.iter().any(|m| m.location == p.location) {
                return Err(format!(
                    "key `{at}.location`: no manager is in location {:?}; add one under [[managers]]",
                    p.location
                ));
            }
            if !raw
                .managers
                .iter()
                .any(|m| m.location == p.location && m.capacity.contains_key(&p.resource_type))
            {
                return Err(format!(
                    "key `{at}.resource_type`: no manager in {:?} has capacity for {:?}; set managers.capacity.{} on one",
                    p.location, p.resource_type, p.resource_type
                ));
            }
        }
        let r = &raw.replication;
        if r.retry_min_ms == 0 || r.retry_min_ms > r.retry_max_ms {
            return Err("keys `replication.retry_min_ms`/`retry_max_ms`: need 0 < retry_min_ms <= retry_max_ms".into());
        }
        if r.concurrency == 0 {
            return Err("key `replication.concurrency`: must be at least 1".into());
        }
        let p = &raw.provisioning;
        if p.retry_min_ms == 0 || p.retry_min_ms > p.retry_max_ms {
            return Err("keys `provisioning.retry_min_ms`/`retry_max_ms`: need 0 < retry_min_ms <= retry_max_ms".into());
        }
        if p.attempts == 0 {
            return Err("key `provisioning.attempts`: must be at least 1".into());
        }
        if p.concurrency == 0 {
            return Err("key `provisioning.concurrency`: must be at least 1".into());
        }
        if raw.push.change_log == 0 {
            return Err("key `push.change_log`: must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&raw.push.page_entries) {
            return Err("key `push.page_entries`: must be between 1 and 1000000".into());
        }
        if raw.max_write_batch == 0 {
            return Err("key `max_write_batch`: must be at least 1".into());
        }
        if raw.registration_lease_ms < 100 {
            return Err("key `registration_lease_ms`: must be at least 100 (ms); it must outlast a sign-up's trip to the first manager".into());
        }
        Ok(Config {
            listen,
            store,
            tokens: raw.tokens,
            managers: raw.managers,
            pools: raw.pools,
            replication: raw.replication,
            provisioning: raw.provisioning,
            push: raw.push,
            grace_period_ms: raw.grace_period_ms,
            registration_lease_ms: raw.registration_lease_ms,
            max_write_batch: raw.max_write_batch,
        })
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where and what, without the source line: TOML's own rendering quotes the
/// offending line, which may hold a token (e.g. a misspelt key under `[tokens]`).
fn parse_error_message(text: &str, e: &toml::de::Error) -> String {
    // Values are quoted in type errors (`invalid type: string "…"`): any of
    // them may be a token, so everything from the first quote to the last goes.
    let message = e.message().trim_end();
    let what = match (message.find('"'), message.rfind('"')) {
        (Some(a), Some(b)) if a < b => {
            format!("{}\"…\"{}", &message[..a], &message[b + 1..])
        }
        _ => message.to_owned(),
    };
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}
