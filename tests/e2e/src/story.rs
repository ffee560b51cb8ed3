//! The whole prealloc story on real parts: a [`Stack`] (control plane, three managers, Envoys) and the one-consumer story that the suite and the demo share.
//!
//! [`run_story`] walks one consumer through sign-up, pinned requests,
//! replication (active or reported), round-robin, the cookie upgrade, the
//! entry leaving the routing table and balanced requests on the registered
//! cookie. Each step checks what it claims and narrates it through `say`, so
//! the demo prints the transcript and the tests assert the same steps. Every
//! wait polls a readiness signal with a deadline: the control plane's pushed
//! table (`GET /v1/routes`) shows the change, then every Envoy's
//! `prealloc_poller_version` reaches that table's version.

use crate::client::{blocking_get, Client, Response};
use crate::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec, Replication};
use crate::envoy::{Build, Envoy, EnvoyConfig, EnvoyOptions, TEST_COOKIE_KEY};
use crate::manager::{DefaultBackend, RecordedRequest, TestManager};
use prealloc_filter_core::cookie::{verify, Claims};
use prealloc_wire::{ConsumerId, ConsumerState, RouteEntry, RoutesResponse};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The managers of every stack, in order.
pub const MANAGER_IDS: [&str; 3] = ["m1", "m2", "m3"];
/// Path of sign-up requests (method POST).
pub const SIGNUP_PATH: &str = "/signup";
/// Name of the consumer cookie.
pub const COOKIE_NAME: &str = "prealloc";
/// How long a change may take to reach the control plane record or every Envoy.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// How to build a [`Stack`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub replication: Replication,
    /// How long a registered consumer stays in the routing table.
    pub grace_period_ms: u64,
    /// How long a registration waits for its confirmation (`None`: the control plane's default).
    pub registration_lease_ms: Option<u64>,
    /// Envoys sharing the one control plane.
    pub envoys: usize,
    pub envoy: EnvoyOptions,
    /// Listener port of the first Envoy (0: a free one).
    pub listen_port: u16,
    /// Target depth of the `mailbox` pool.
    pub pool_depth: u64,
    /// Control plane port (0: a free one).
    pub control_plane_port: u16,
    /// `(envoy, admin)` bearer tokens of the control plane; the test tokens by default.
    pub tokens: (String, String),
    /// Which build of the data plane every Envoy runs.
    pub build: Build,
    /// The control plane's `RUST_LOG` (`None`: the harness default).
    pub control_plane_log: Option<String>,
    /// `mailbox` capacity of each manager.
    pub manager_capacity: u64,
    /// `poller.node_id` of Envoy #i (missing or `None`: the filter's default).
    pub node_ids: Vec<Option<String>>,
    /// More keys of every Envoy's `poller` configuration (e.g. `writes_per_turn`).
    pub poller: serde_json::Map<String, Value>,
    /// Raw TOML appended to the control plane's configuration (e.g. a `[push]` table).
    pub control_plane_toml: String,
    /// The control plane keeps its state in this PostgreSQL database (`None`: a SQLite file).
    pub postgres_url: Option<String>,
    /// Control planes sharing that database (`store.shared` when more than 1).
    pub control_planes: usize,
    /// With several control planes: the Envoys' cluster lists only the first
    /// (`Stack::cp`), so changes made on the others reach them across instances.
    pub envoys_poll_first_only: bool,
    /// Managers `m1..mN` (3: [`MANAGER_IDS`]).
    pub managers: usize,
}

impl StackOptions {
    pub fn new(replication: Replication) -> StackOptions {
        StackOptions {
            replication,
            grace_period_ms: 3000,
            registration_lease_ms: None,
            envoys: 1,
            envoy: EnvoyOptions::default(),
            listen_port: 0,
            pool_depth: 20,
            control_plane_port: 0,
            tokens: (
                crate::control_plane::TEST_ENVOY_TOKEN.to_owned(),
                crate::control_plane::TEST_ADMIN_TOKEN.to_owned(),
            ),
            build: Build::Wasm,
            control_plane_log: None,
            manager_capacity: 1000,
            node_ids: Vec::new(),
            poller: serde_json::Map::new(),
            control_plane_toml: String::new(),
            postgres_url: None,
            control_planes: 1,
            envoys_poll_first_only: false,
            managers: MANAGER_IDS.len(),
        }
    }

    /// The same options with every Envoy running `build`.
    pub fn with_build(mut self, build: Build) -> StackOptions {
        self.build = build;
        self
    }
}

/// Control plane, three managers, the default backend and Envoys; all stop when dropped.
pub struct Stack {
    // Envoys first: dropped before the servers they route to.
    pub envoys: Vec<Envoy>,
    /// What each Envoy was started with (for [`Stack::restart_envoy`]).
    envoy_configs: Vec<EnvoyConfig>,
    envoy_options: EnvoyOptions,
    pub cp: ControlPlane,
    /// More control planes on the same shared PostgreSQL database
    /// (`StackOptions::control_planes`), also endpoints of every Envoy's
    /// `prealloc_control_plane` cluster.
    pub more_cps: Vec<ControlPlane>,
    pub managers: Vec<TestManager>,
    pub default: DefaultBackend,
    pub replication: Replication,
}

/// What the control plane says about a consumer.
#[derive(Debug, Clone)]
pub struct ConsumerView {
    pub state: String,
    /// Manager ids, first manager first.
    pub replicas: Vec<String>,
    pub in_routing_table: bool,
}

/// A consumer that signed up through Envoy.
#[derive(Debug, Clone)]
pub struct SignedUp {
    pub consumer: ConsumerId,
    /// Manager id of the first manager (the one that answered the sign-up).
    pub first: String,
    /// Resource name the manager was given.
    pub resource: String,
    /// `Cookie` header value, `prealloc=...`.
    pub cookie: String,
    pub claims: Claims,
}

impl Stack {
    /// Starts managers `m1..mN` (`opts.managers`), the default backend, the control plane (fresh SQLite file) and the Envoys
    /// (sign-up through the filter on `POST /signup`). Panics with the failing part's log when one does not start.
    pub fn start(opts: &StackOptions) -> Stack {
        let managers: Vec<TestManager> = (1..=opts.managers)
            .map(|i| TestManager::start(&format!("m{i}")))
            .collect();
        let default = DefaultBackend::start();
        let mut cfg = ControlPlaneConfig::new(
            managers
                .iter()
                .map(|m| ManagerSpec {
                    capacity: vec![("mailbox".to_owned(), opts.manager_capacity)],
                    ..ManagerSpec::new(m.name(), &m.url())
                })
                .collect(),
        );
        cfg.replication = opts.replication;
        cfg.grace_period_ms = opts.grace_period_ms;
        cfg.registration_lease_ms = opts.registration_lease_ms;
        cfg.pools = vec![("mailbox".into(), "local".into(), opts.pool_depth)];
        // Active copies refused by a test manager are retried quickly, so a copy lands soon after it is allowed.
        cfg.replication_extra
            .insert("retry_min_ms".into(), toml::Value::Integer(20));
        cfg.replication_extra
            .insert("retry_max_ms".into(), toml::Value::Integer(200));
        cfg.envoy_token = opts.tokens.0.clone();
        cfg.admin_token = opts.tokens.1.clone();
        cfg.log_level = opts.control_plane_log.clone();
        cfg.extra_toml = opts.control_plane_toml.clone();
        cfg.postgres_url = opts.postgres_url.clone();
        if opts.control_planes > 1 {
            assert!(
                cfg.postgres_url.is_some(),
                "several control planes share a PostgreSQL database"
            );
            cfg.postgres_shared = true;
        }
        let more_cps: Vec<ControlPlane> = (1..opts.control_planes.max(1))
            .map(|_| ControlPlane::start(cfg.clone()))
            .collect();
        let cp = ControlPlane::start_on(cfg, ([127, 0, 0, 1], opts.control_plane_port).into());
        let envoy_configs: Vec<EnvoyConfig> = (0..opts.envoys)
            .map(|i| {
                let mut ec = EnvoyConfig::new(
                    managers
                        .iter()
                        .map(|m| (m.name().to_owned(), m.addr().into()))
                        .collect(),
                    default.addr().into(),
                    cp.addr().into(),
                );
                ec.build = opts.build;
                if !opts.envoys_poll_first_only {
                    ec.more_control_planes = more_cps.iter().map(|c| c.addr().into()).collect();
                }
                ec.filter["signup"] = json!({
                    "path": SIGNUP_PATH,
                    "token": cp.config().envoy_token,
                    "resource_type": "mailbox",
                });
                ec.poller["token"] = json!(cp.config().envoy_token);
                for (k, v) in &opts.poller {
                    ec.poller[k] = v.clone();
                }
                if let Some(Some(node)) = opts.node_ids.get(i) {
                    ec.poller["node_id"] = json!(node);
                }
                if i == 0 {
                    ec.listen_port = opts.listen_port;
                }
                ec
            })
            .collect();
        let envoys = envoy_configs
            .iter()
            .map(|ec| Envoy::start(ec, &opts.envoy))
            .collect();
        Stack {
            envoys,
            envoy_configs,
            envoy_options: opts.envoy.clone(),
            cp,
            more_cps,
            managers,
            default,
            replication: opts.replication,
        }
    }

    /// Kills Envoy #`i` (SIGKILL) and starts a fresh one with the same config on
    /// the same listener port; returns once the new one is ready, which is before
    /// its poller has fetched the table.
    pub fn restart_envoy(&mut self, i: usize) {
        let port = self.envoys[i].addr().port();
        let mut ec = self.envoy_configs[i].clone();
        ec.listen_port = port;
        drop(self.envoys.remove(i));
        self.envoys
            .insert(i, Envoy::start(&ec, &self.envoy_options));
    }

    pub fn manager(&self, id: &str) -> &TestManager {
        self.managers
            .iter()
            .find(|m| m.name() == id)
            .unwrap_or_else(|| panic!("no manager {id}"))
    }

    /// Every recording server: the managers and the default backend.
    pub fn servers(&self) -> impl Iterator<Item = &TestManager> {
        self.managers.iter().chain([self.default.as_manager()])
    }

    /// Requests that reached a server without the consumer's data, over every server.
    pub fn violations(&self) -> Vec<RecordedRequest> {
        self.servers().flat_map(|s| s.violations()).collect()
    }

    /// Panics listing every violation.
    pub fn assert_no_violations(&self) {
        crate::manager::assert_no_violations(self.servers());
    }

    /// The control plane's routes version (`/healthz`).
    pub fn routes_version(&self) -> Result<u64, String> {
        let (status, body) = blocking_get(self.cp.addr(), "/healthz", Duration::from_secs(2))
            .map_err(|e| format!("control plane /healthz: {e}"))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("control plane /healthz answered {status} {body}: {e}"))?;
        v["version"]
            .as_u64()
            .ok_or_else(|| format!("control plane /healthz has no version: {body}"))
    }

    /// Waits until every Envoy's poller applied the control plane's current routes version,
    /// i.e. every route change published so far is routed by every Envoy. A change seen in a
    /// consumer record may not be published yet: wait for it with [`Stack::wait_routed`].
    pub fn wait_envoys_caught_up(&self) -> Result<(), String> {
        let want = self.routes_version()?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        for (i, e) in self.envoys.iter().enumerate() {
            loop {
                let have = e.stat("prealloc_poller_version");
                if have >= want {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "Envoy #{i} applied routes version {have}, not the control plane's {want}, \
                         within {STEP_TIMEOUT:?}; its log: {}",
                        e.dir().join("envoy.log").display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// The control plane's pushed routing table now: a full `GET /v1/routes`
    /// snapshot, every page of it in one response (`next` is then `None`).
    pub async fn routes(&self) -> Result<RoutesResponse, String> {
        let auth = format!("Bearer {}", self.cp.config().envoy_token);
        let mut client = Client::new(self.cp.addr());
        let mut query = prealloc_wire::RoutesQuery::default();
        let mut table: Option<RoutesResponse> = None;
        loop {
            let r = client
                .send("GET", &query.to_path(), &[("authorization", &auth)], b"")
                .await
                .map_err(|e| format!("GET /v1/routes: {e}"))?;
            if r.status != 200 {
                return Err(format!(
                    "GET /v1/routes answered {}: {}",
                    r.status,
                    r.text()
                ));
            }
            let page: RoutesResponse = serde_json::from_slice(&r.body).map_err(|e| {
                format!(
                    "GET /v1/routes is not a routes response ({e}): {}",
                    r.text()
                )
            })?;
            query.since = page.version;
            query.epoch = Some(page.epoch.clone());
            query.after = page.next.clone();
            match &mut table {
                None => table = Some(page),
                Some(t) => {
                    t.upsert.extend(page.upsert);
                    t.next = page.next;
                }
            }
            if query.after.is_none() {
                return table.ok_or_else(|| "no snapshot".to_owned());
            }
        }
    }

    /// Waits until the pushed table satisfies `pred`, then until every Envoy applied that table's version.
    ///
    /// The table, not the consumer record, is the signal: the control plane's records
    /// can show a change before its route change is published (see the e2e README).
    pub async fn wait_table(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&RoutesResponse) -> bool,
    ) -> Result<RoutesResponse, String> {
        let deadline = Instant::now() + timeout;
        let table = loop {
            let t = self.routes().await?;
            if pred(&t) {
                break t;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the pushed routing table did not show {what} within {timeout:?} (version {}, {} entries); \
                     control plane log: {}",
                    t.version,
                    t.upsert.len(),
                    self.cp.log_path().display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let deadline = Instant::now() + STEP_TIMEOUT;
        for (i, e) in self.envoys.iter().enumerate() {
            loop {
                let have = e.stat("prealloc_poller_version");
                if have >= table.version {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "Envoy #{i} applied routes version {have}, not {} ({what}), within {STEP_TIMEOUT:?}; \
                         its log: {}",
                        table.version,
                        e.dir().join("envoy.log").display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(table)
    }

    /// [`Stack::wait_table`] on one consumer's entry (`None`: no entry).
    pub async fn wait_routed(
        &self,
        c: &ConsumerId,
        what: &str,
        pred: impl Fn(Option<&RouteEntry>) -> bool,
    ) -> Result<(), String> {
        let grace = Duration::from_millis(self.cp.config().grace_period_ms);
        self.wait_table(what, grace + STEP_TIMEOUT, |t| {
            pred(t.upsert.iter().find(|e| e.consumer == *c))
        })
        .await
        .map(|_| ())
    }

    /// The control plane's record of a consumer.
    pub async fn consumer(&self, c: &ConsumerId) -> Result<ConsumerView, String> {
        let r = self
            .cp
            .admin("GET", &format!("/v1/consumers/{c}"), None)
            .await;
        if r.status != 200 {
            return Err(format!(
                "GET /v1/consumers/{c} answered {}: {}",
                r.status,
                r.text()
            ));
        }
        let v = r.json();
        Ok(ConsumerView {
            state: v["state"].as_str().unwrap_or("?").to_owned(),
            replicas: v["replicas"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r["manager"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            in_routing_table: v["in_routing_table"].as_bool().unwrap_or(true),
        })
    }

    /// Polls the consumer's record until `pred` holds.
    pub async fn wait_consumer(
        &self,
        c: &ConsumerId,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ConsumerView) -> bool,
    ) -> Result<ConsumerView, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.consumer(c).await?;
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "consumer {c}: {what} did not happen within {timeout:?} (control plane says {v:?}); \
                     control plane log: {}",
                    self.cp.log_path().display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Signs up through Envoy on `client`, retrying while the pool is still filling (503), for up to `within`.
    pub async fn sign_up(&self, client: &mut Client, within: Duration) -> Result<SignedUp, String> {
        let deadline = Instant::now() + within;
        let r = loop {
            let r = client
                .send(
                    "POST",
                    SIGNUP_PATH,
                    &[("content-type", "application/json")],
                    b"{\"name\":\"pat\"}",
                )
                .await
                .map_err(|e| format!("sign-up request: {e}"))?;
            if r.status != 503 {
                break r;
            }
            if r.header("retry-after").is_none() {
                return Err(format!("sign-up 503 without Retry-After: {}", r.text()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "sign-up kept answering 503 for {within:?}: {}",
                    r.text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !(200..300).contains(&r.status) {
            return Err(format!("sign-up answered {}: {}", r.status, r.text()));
        }
        let first = r
            .served_by()
            .ok_or_else(|| format!("sign-up answer names no manager: {:?}", r.headers))?;
        let (value, claims) = consumer_cookie(&r)?.ok_or_else(|| {
            format!(
                "sign-up answer has no {COOKIE_NAME} cookie: {:?}",
                r.headers
            )
        })?;
        if claims.state != ConsumerState::Registering || claims.replicas != [cluster(&first)] {
            return Err(format!(
                "sign-up cookie should say registering on {}, says {:?} {:?}",
                cluster(&first),
                claims.state,
                claims.replicas
            ));
        }
        let body = r.json();
        Ok(SignedUp {
            consumer: claims.consumer.clone(),
            first,
            resource: body["resource"].as_str().unwrap_or("?").to_owned(),
            cookie: format!("{COOKIE_NAME}={value}"),
            claims,
        })
    }
}

/// `POST /signup` with an empty JSON body: a sign-up as a client sends it.
pub async fn post_signup(client: &mut Client) -> std::io::Result<Response> {
    client
        .send(
            "POST",
            SIGNUP_PATH,
            &[("content-type", "application/json")],
            b"{}",
        )
        .await
}

/// A sign-up once the pool has filled (503 until then, for at most
/// [`STEP_TIMEOUT`]), whatever it is answered then.
pub async fn first_signup(client: &mut Client) -> Response {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let r = post_signup(client).await.expect("sign-up request");
        if r.status != 503 || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Envoy cluster of a manager id.
pub fn cluster(manager: &str) -> String {
    format!("manager_{manager}")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The consumer cookie a response sets, verified with the test key: `(value, claims)`.
pub fn consumer_cookie(r: &Response) -> Result<Option<(String, Claims)>, String> {
    let prefix = format!("{COOKIE_NAME}=");
    let Some(set) = r
        .header_all("set-cookie")
        .into_iter()
        .find(|v| v.starts_with(&prefix))
    else {
        return Ok(None);
    };
    let value = set[prefix.len()..]
        .split(';')
        .next()
        .unwrap_or("")
        .to_owned();
    let claims = verify(&value, &[TEST_COOKIE_KEY.as_bytes()], now_unix())
        .map_err(|e| format!("cookie {set:?} does not verify: {e:?}"))?;
    Ok(Some((value, claims)))
}

/// Where a batch of requests went.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The serving manager of each request, in order.
    pub served: Vec<String>,
    /// A registered cookie set by one of the responses (`prealloc=...`, claims).
    pub upgraded: Option<(String, Claims)>,
}

impl Batch {
    pub fn tally(&self) -> BTreeMap<String, usize> {
        tally(&self.served)
    }
}

/// Sends `n` GETs with `cookie`; every answer must be a 200 from a harness server.
pub async fn send_requests(client: &mut Client, cookie: &str, n: usize) -> Result<Batch, String> {
    let mut b = Batch::default();
    for i in 0..n {
        let path = format!("/inbox/{i}");
        let r = client
            .send("GET", &path, &[("cookie", cookie)], b"")
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let by = r.served_by().ok_or_else(|| {
            format!(
                "GET {path} answered {} by no manager: {}",
                r.status,
                r.text()
            )
        })?;
        if r.status != 200 {
            return Err(format!(
                "GET {path} answered {} by {by}: {}",
                r.status,
                r.text()
            ));
        }
        if let Some((v, c)) = consumer_cookie(&r)? {
            b.upgraded = Some((format!("{COOKIE_NAME}={v}"), c));
        }
        b.served.push(by);
    }
    Ok(b)
}

/// How many times each name occurs.
pub fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

/// Largest minus smallest count over `over` (a name missing counts 0).
pub fn spread(t: &BTreeMap<String, usize>, over: &[String]) -> usize {
    let counts: Vec<usize> = over
        .iter()
        .map(|m| t.get(m).copied().unwrap_or(0))
        .collect();
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

/// `m1 m1 m2` for a transcript line.
pub fn compact(served: &[String]) -> String {
    served.join(" ")
}

fn fmt_tally(t: &BTreeMap<String, usize>) -> String {
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How the story runs.
#[derive(Debug, Clone)]
pub struct StoryOptions {
    /// Envoy (index into [`Stack::envoys`]) taking the sign-up.
    pub signup_via: usize,
    /// Envoy taking every later request.
    pub continue_via: usize,
    /// Requests per phase; a multiple of 6 makes every phase exactly even.
    pub requests: usize,
}

impl Default for StoryOptions {
    fn default() -> Self {
        StoryOptions {
            signup_via: 0,
            continue_via: 0,
            requests: 6,
        }
    }
}

/// What the story saw.
#[derive(Debug, Clone)]
pub struct StoryReport {
    pub signed_up: SignedUp,
    /// Replication order: first manager, then each copy.
    pub order: Vec<String>,
    /// `(phase, tally)` for every batch of requests.
    pub phases: Vec<(String, BTreeMap<String, usize>)>,
    /// The registered cookie the filter set.
    pub registered_cookie: String,
}

/// One consumer, end to end (see the module docs). Fails on the first step that does not hold.
pub async fn run_story(
    stack: &Stack,
    opts: &StoryOptions,
    say: &mut dyn FnMut(String),
) -> Result<StoryReport, String> {
    let active = stack.replication == Replication::Active;
    let n = opts.requests;
    let via = opts.continue_via;
    let envoy_name = |i: usize| {
        if stack.envoys.len() > 1 {
            format!("Envoy #{} ({})", i + 1, stack.envoys[i].addr())
        } else {
            format!("Envoy ({})", stack.envoys[i].addr())
        }
    };
    if active {
        // Copies are held back so every step of the story is observable, then let in one manager at a time.
        for m in &stack.managers {
            m.set_accept_copies(false);
        }
        say("replication mode: active (the control plane copies data with GET/PUT /prealloc/v1/consumers/{id}/data); \
             managers refuse copies until the story lets them in".into());
    } else {
        say("replication mode: reported (each manager reports its copy: POST /v1/consumers/{id}/replicas)".into());
    }

    let mut signup_client = Client::new(stack.envoys[opts.signup_via].addr());
    let su = stack.sign_up(&mut signup_client, STEP_TIMEOUT).await?;
    say(format!(
        "sign-up: POST {SIGNUP_PATH} via {} -> consumer {} on first manager {} (resource {})",
        envoy_name(opts.signup_via),
        su.consumer,
        su.first,
        su.resource
    ));
    say(format!(
        "  cookie: {COOKIE_NAME}=<{} chars>, state registering, replicas [{}]",
        su.cookie.len() - COOKIE_NAME.len() - 1,
        su.claims.replicas.join(", ")
    ));
    let others: Vec<String> = MANAGER_IDS
        .iter()
        .filter(|m| **m != su.first)
        .map(|m| m.to_string())
        .collect();
    let (second, third) = (others[0].clone(), others[1].clone());
    let mut phases = Vec::new();
    let mut client = Client::new(stack.envoys[via].addr());
    stack
        .wait_routed(&su.consumer, "the new consumer's entry", |e| e.is_some())
        .await?;

    // Pinned. In reported mode the second manager already holds a copy nobody reported:
    // it must still get nothing.
    if !active {
        stack.manager(&second).hold(su.consumer.as_str());
        say(format!("  {second} now holds a copy, not reported yet"));
    }
    let b = send_requests(&mut client, &su.cookie, n).await?;
    say(format!(
        "{n} requests via {}: {}  (pinned to the first manager)",
        envoy_name(via),
        compact(&b.served)
    ));
    if b.served.iter().any(|s| *s != su.first) {
        return Err(format!(
            "registering consumer not pinned to {}: {:?}",
            su.first, b.served
        ));
    }
    phases.push(("pinned".to_owned(), b.tally()));

    // Copy to the second manager.
    replicate(stack, &su, &second, active).await?;
    let v = stack
        .wait_consumer(
            &su.consumer,
            &format!("copy on {second}"),
            STEP_TIMEOUT,
            |v| v.replicas.len() >= 2,
        )
        .await?;
    say(format!(
        "replication: {second} holds a copy -> replicas [{}], 1 of 2 copies, {}",
        v.replicas.join(", "),
        v.state
    ));
    if v.replicas != [su.first.clone(), second.clone()] {
        return Err(format!(
            "replicas should be [{}, {second}]: {:?}",
            su.first, v.replicas
        ));
    }
    stack
        .wait_routed(&su.consumer, "two replicas", |e| {
            e.is_some_and(|e| e.replicas.len() == 2)
        })
        .await?;
    if !active {
        stack.manager(&third).hold(su.consumer.as_str());
        say(format!("  {third} now holds a copy, not reported yet"));
    }
    let b = send_requests(&mut client, &su.cookie, n).await?;
    let t = b.tally();
    say(format!(
        "{n} requests: {}  (round-robin over 2 replicas: {})",
        compact(&b.served),
        fmt_tally(&t)
    ));
    let two = [su.first.clone(), second.clone()];
    if t.keys().any(|k| !two.contains(k)) || spread(&t, &two) > 1 {
        return Err(format!("expected an even split over {two:?}: {t:?}"));
    }
    phases.push(("two replicas".to_owned(), t));

    // Copy to the third: the replication target ("all") is reached.
    replicate(stack, &su, &third, active).await?;
    if active {
        // The story is done holding copies back: later consumers replicate freely.
        for m in &stack.managers {
            m.set_accept_copies(true);
        }
    }
    let v = stack
        .wait_consumer(&su.consumer, "registration", STEP_TIMEOUT, |v| {
            v.state == "registered"
        })
        .await?;
    say(format!(
        "replication: {third} holds a copy -> replicas [{}], 2 of 2 copies: registered",
        v.replicas.join(", ")
    ));
    stack
        .wait_routed(&su.consumer, "the registered entry", |e| {
            e.is_some_and(|e| e.state == ConsumerState::Registered && e.replicas.len() == 3)
        })
        .await?;
    let b = send_requests(&mut client, &su.cookie, n).await?;
    let t = b.tally();
    say(format!(
        "{n} requests: {}  (round-robin over 3 replicas: {})",
        compact(&b.served),
        fmt_tally(&t)
    ));
    let all: Vec<String> = MANAGER_IDS.iter().map(|s| s.to_string()).collect();
    if spread(&t, &all) > 1 {
        return Err(format!("expected an even split over {all:?}: {t:?}"));
    }
    phases.push(("three replicas (table)".to_owned(), t));
    let (registered_cookie, claims) = b.upgraded.ok_or_else(|| {
        "no response upgraded the registering cookie after the consumer was registered".to_owned()
    })?;
    let want: Vec<String> = v.replicas.iter().map(|m| cluster(m)).collect();
    if claims.state != ConsumerState::Registered || claims.replicas != want {
        return Err(format!(
            "upgraded cookie should say registered on {want:?}: {:?} {:?}",
            claims.state, claims.replicas
        ));
    }
    say(format!(
        "cookie upgrade: the response set {COOKIE_NAME}=<{} chars>, state registered, replicas [{}]",
        registered_cookie.len() - COOKIE_NAME.len() - 1,
        claims.replicas.join(", ")
    ));

    // Grace period: the entry leaves the control plane's table and every Envoy's shared data.
    let grace = Duration::from_millis(stack.cp.config().grace_period_ms);
    say(format!("waiting for the grace period ({grace:?}) ..."));
    stack
        .wait_consumer(
            &su.consumer,
            "leaving the routing table",
            grace + STEP_TIMEOUT,
            |v| !v.in_routing_table,
        )
        .await?;
    stack
        .wait_routed(&su.consumer, "the entry leaving", |e| e.is_none())
        .await?;
    let entries: Vec<u64> = stack
        .envoys
        .iter()
        .map(|e| e.stat("prealloc_poller_entries"))
        .collect();
    if entries.iter().any(|e| *e != 0) {
        return Err(format!(
            "the control plane dropped the entry but Envoys still hold entries: {entries:?}"
        ));
    }
    say(format!(
        "grace period over: the entry left the routing table (control plane: not in table; Envoy entries: {entries:?})"
    ));

    let cookie_routed_before = stack.envoys[via].settled_stat("prealloc_requests_cookie");
    let b = send_requests(&mut client, &registered_cookie, n).await?;
    let t = b.tally();
    say(format!(
        "{n} requests with the registered cookie: {}  (balanced without the table: {})",
        compact(&b.served),
        fmt_tally(&t)
    ));
    if spread(&t, &all) > 1 {
        return Err(format!(
            "registered cookie: expected an even split over {all:?}: {t:?}"
        ));
    }
    let cookie_routed =
        stack.envoys[via].settled_stat("prealloc_requests_cookie") - cookie_routed_before;
    if cookie_routed < n as u64 {
        return Err(format!(
            "Envoy counted {cookie_routed} cookie-routed requests, expected {n}"
        ));
    }
    phases.push(("registered cookie".to_owned(), t));

    // An old registering cookie, entry gone: the first manager, which always holds the data.
    let b = send_requests(&mut client, &su.cookie, 3).await?;
    say(format!(
        "3 requests with the old registering cookie: {}  (no entry: first manager, still safe)",
        compact(&b.served)
    ));
    if b.served.iter().any(|s| *s != su.first) {
        return Err(format!(
            "old cookie without entry should go to {}: {:?}",
            su.first, b.served
        ));
    }

    let violations = stack.violations();
    let total: usize = stack.servers().map(|s| s.requests().len()).sum();
    if !violations.is_empty() {
        let list: Vec<String> = violations.iter().map(|r| format!("  {r}")).collect();
        return Err(format!(
            "{} of {total} requests reached a manager without the consumer's data:\n{}",
            violations.len(),
            list.join("\n")
        ));
    }
    say(format!(
        "invariant: 0 of {total} requests reached a manager without the consumer's data"
    ));
    Ok(StoryReport {
        order: vec![su.first.clone(), second, third],
        signed_up: su,
        phases,
        registered_cookie,
    })
}

/// Makes `to` hold a copy: active mode lets the control plane's copy in; reported mode reports the copy
/// the manager was seeded with.
async fn replicate(stack: &Stack, su: &SignedUp, to: &str, active: bool) -> Result<(), String> {
    if active {
        stack.manager(to).set_accept_copies(true);
        return Ok(());
    }
    if !stack.manager(to).holds(su.consumer.as_str()) {
        return Err(format!(
            "{to} was to be seeded with the data before the report"
        ));
    }
    let r = stack.cp.report_replica(&su.consumer, to).await;
    if r.status != 200 {
        return Err(format!(
            "reporting the copy on {to} answered {}: {}",
            r.status,
            r.text()
        ));
    }
    Ok(())
}
