//! Hyper resource managers that follow the manager contract and record every request they serve.
//!
//! A [`TestManager`] is what the invariant is checked against: for each request
//! of a consumer it records whether it held that consumer's data at that very
//! moment, so [`TestManager::violations`] lists every request that reached a
//! manager without the consumer's data. Every end-to-end test asserts it empty
//! ([`assert_no_violations`]).
//!
//! How a request is classified (first match wins):
//! 1. `x-prealloc-resource` present → a sign-up forwarded by the filter;
//! 2. path under `/prealloc/v1/` without `x-prealloc-consumer` → the manager API
//!    (replication, provisioning), called by the control plane;
//! 3. `x-prealloc-consumer` present → a routed request of that consumer;
//! 4. otherwise → anonymous.

use crate::server::{json_reply, reply, Reply, ServerHandle};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use prealloc_wire::{HEADER_CONSUMER, HEADER_RESOURCE, HEADER_RESOURCE_TYPE};
use serde_json::json;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Prefix of the manager API (replication and provisioning endpoints).
pub const MANAGER_API_PREFIX: &str = "/prealloc/v1/";
/// Response header naming the manager that answered.
pub const SERVED_BY_HEADER: &str = "x-served-by";

/// What a recorded request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// A sign-up forwarded by the filter (`x-prealloc-resource` present).
    SignUp,
    /// A routed request of a known consumer (`x-prealloc-consumer` present).
    Consumer,
    /// A request without a consumer.
    Anonymous,
    /// `GET`/`PUT /prealloc/v1/consumers/{id}/data`.
    Replication,
    /// `POST /prealloc/v1/resources`.
    Provisioning,
    /// Any other call under `/prealloc/v1/` (answered 404).
    UnknownApi,
}

/// One request as a manager saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Name of the manager (or default backend) that served it.
    pub manager: String,
    pub kind: RequestKind,
    /// `x-prealloc-consumer` (sign-ups and consumer requests) or the id in a replication path.
    pub consumer: Option<String>,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Whether this server held the consumer's data when the request arrived.
    pub held: bool,
    /// The status it answered.
    pub status: u16,
    pub at: Instant,
    /// Every request header, lower-case names, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A request of a consumer that reached a server without the consumer's data.
    pub fn is_violation(&self) -> bool {
        self.kind == RequestKind::Consumer && !self.held
    }
}

impl fmt::Display for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} on {} ({:?}, consumer {}, held {}) -> {}",
            self.method,
            self.path,
            if self.is_violation() { "VIOLATION" } else { "" },
            self.manager,
            self.kind,
            self.consumer.as_deref().unwrap_or("-"),
            self.held,
            self.status
        )
    }
}

/// A sign-up as the manager received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignUp {
    pub consumer: String,
    pub resource: String,
    pub resource_type: String,
    /// Whether the manager accepted it (and now holds the consumer's data).
    pub accepted: bool,
}

/// A provisioning call (`POST /prealloc/v1/resources`) the manager accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub id: u64,
    pub resource_type: String,
    pub name: String,
}

#[derive(Default)]
struct State {
    data: HashMap<String, Vec<u8>>,
    requests: Vec<RecordedRequest>,
    signups: Vec<SignUp>,
    provisioned: Vec<Provisioned>,
    /// Status answered to sign-ups; 2xx accepts.
    signup_status: u16,
    /// How long a sign-up waits before it is answered (a slow manager).
    signup_delay: Duration,
    /// Forced status for every manager-API call (fault injection); `None` serves normally.
    api_status: Option<u16>,
    /// Bearer token the manager API requires, if any.
    token: Option<String>,
    /// Whether this server takes sign-ups and holds data (false for the default backend).
    holds_data: bool,
    /// Whether replication PUTs are stored (false: answered 503, so a test decides when copies land).
    refuse_copies: bool,
}

/// Seeds one manager's data from anywhere (see [`TestManager::holder`]).
#[derive(Clone)]
pub struct Holder {
    name: String,
    state: Arc<Mutex<State>>,
}

impl Holder {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`TestManager::hold`].
    pub fn hold(&self, consumer: &str) {
        let data = format!("seeded:{consumer}@{}", self.name).into_bytes();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.data.insert(consumer.to_owned(), data);
    }
}

/// A hyper server on 127.0.0.1 implementing the manager contract; stops when dropped.
pub struct TestManager {
    name: String,
    state: Arc<Mutex<State>>,
    server: ServerHandle,
}

impl TestManager {
    /// Starts a manager named `name` (the name it reports in every answer) on a free port.
    pub fn start(name: &str) -> TestManager {
        Self::start_with(name, true)
    }

    fn start_with(name: &str, holds_data: bool) -> TestManager {
        let state = Arc::new(Mutex::new(State {
            signup_status: 201,
            holds_data,
            ..State::default()
        }));
        let server = {
            let state = state.clone();
            let name = name.to_owned();
            ServerHandle::start(&name.clone(), move |req| {
                handle(name.clone(), state.clone(), req)
            })
        };
        TestManager {
            name: name.to_owned(),
            state,
            server,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (the manager's admin URL for the control plane).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Seeds the consumer's data directly, as if it had signed up or been replicated here.
    pub fn hold(&self, consumer: &str) {
        self.holder().hold(consumer);
    }

    /// A handle that can seed data from another task while the manager is
    /// shared elsewhere (e.g. concurrent sign-up tasks reporting copies).
    pub fn holder(&self) -> Holder {
        Holder {
            name: self.name.clone(),
            state: self.state.clone(),
        }
    }

    /// Whether the manager holds the consumer's data now.
    pub fn holds(&self, consumer: &str) -> bool {
        self.lock().data.contains_key(consumer)
    }

    /// The consumer's data, as stored by a sign-up, a seed or a replication PUT.
    pub fn data(&self, consumer: &str) -> Option<Vec<u8>> {
        self.lock().data.get(consumer).cloned()
    }

    /// Every consumer whose data this manager holds, sorted.
    pub fn consumers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().data.keys().cloned().collect();
        v.sort();
        v
    }

    /// Answers sign-ups with `status` from now on (2xx accepts; anything else refuses).
    pub fn set_signup_status(&self, status: u16) {
        self.lock().signup_status = status;
    }

    /// Answers every sign-up `delay` late from now on, as a slow manager would
    /// (`Duration::ZERO`: at once again).
    pub fn delay_signups(&self, delay: Duration) {
        self.lock().signup_delay = delay;
    }

    /// Refuses every sign-up from now on with 409.
    pub fn refuse_signups(&self) {
        self.set_signup_status(409);
    }

    /// Answers every manager-API call (replication, provisioning) with `status`
    /// instead of serving it, or serves normally again with `None`.
    pub fn set_api_failure(&self, status: Option<u16>) {
        self.lock().api_status = status;
    }

    /// Stores replication PUTs (`true`, the default) or answers them 503 (`false`),
    /// so an active-mode test decides when a copy can land here.
    pub fn set_accept_copies(&self, accept: bool) {
        self.lock().refuse_copies = !accept;
    }

    /// Requires `Authorization: Bearer <token>` on the manager API (401 otherwise).
    pub fn require_token(&self, token: &str) {
        self.lock().token = Some(token.to_owned());
    }

    /// Every request served so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Requests of a consumer that arrived while this manager did not hold its data.
    pub fn violations(&self) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.is_violation())
            .cloned()
            .collect()
    }

    /// Routed requests of `consumer` (kind [`RequestKind::Consumer`]).
    pub fn requests_of(&self, consumer: &str) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.kind == RequestKind::Consumer && r.consumer.as_deref() == Some(consumer))
            .cloned()
            .collect()
    }

    /// Number of recorded requests of a kind.
    pub fn count(&self, kind: RequestKind) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    }

    /// Sign-ups received, accepted or not.
    pub fn signups(&self) -> Vec<SignUp> {
        self.lock().signups.clone()
    }

    /// Resources provisioned through `POST /prealloc/v1/resources`, one per id.
    pub fn provisioned(&self) -> Vec<Provisioned> {
        self.lock().provisioned.clone()
    }

    /// Forgets the recorded requests (not the data), e.g. between phases of a test.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the record from the assertions that follow.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The cluster every anonymous request goes to: records requests, holds no consumer data.
///
/// A consumer request reaching it is a violation like on any manager.
pub struct DefaultBackend {
    inner: TestManager,
}

impl DefaultBackend {
    pub fn start() -> DefaultBackend {
        DefaultBackend {
            inner: TestManager::start_with("default", false),
        }
    }

    pub fn name(&self) -> &str {
        self.inner.name()
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr()
    }

    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    pub fn url(&self) -> String {
        self.inner.url()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.requests()
    }

    pub fn violations(&self) -> Vec<RecordedRequest> {
        self.inner.violations()
    }

    pub fn count(&self, kind: RequestKind) -> usize {
        self.inner.count(kind)
    }

    pub fn clear_requests(&self) {
        self.inner.clear_requests()
    }

    /// The recording server behind it, for [`assert_no_violations`].
    pub fn as_manager(&self) -> &TestManager {
        &self.inner
    }
}

/// Panics listing every violation recorded by any of `servers`.
pub fn assert_no_violations<'a>(servers: impl IntoIterator<Item = &'a TestManager>) {
    let mut all = Vec::new();
    let mut total = 0usize;
    for s in servers {
        total += s.requests().len();
        all.extend(s.violations());
    }
    if !all.is_empty() {
        let list: Vec<String> = all.iter().map(|r| format!("  {r}")).collect();
        panic!(
            "invariant broken: {} of {} requests reached a manager without the consumer's data:\n{}",
            all.len(),
            total,
            list.join("\n")
        );
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn handle(name: String, state: Arc<Mutex<State>>, req: Request<Incoming>) -> Reply {
    let at = Instant::now();
    let method = req.method().as_str().to_owned();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let consumer = header(&req, HEADER_CONSUMER);
    let resource = header(&req, HEADER_RESOURCE);
    let resource_type = header(&req, HEADER_RESOURCE_TYPE);
    let auth = header(&req, "authorization");
    let is_api = path.starts_with(MANAGER_API_PREFIX) && consumer.is_none();
    // Bodies matter only for the manager API; read them before taking the lock.
    let body = if is_api {
        match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => bytes::Bytes::new(),
        }
    } else {
        bytes::Bytes::new()
    };

    if resource.is_some() {
        let delay = state.lock().unwrap_or_else(|p| p.into_inner()).signup_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let record = |st: &mut State, kind, consumer: Option<String>, held, status| {
        st.requests.push(RecordedRequest {
            manager: name.clone(),
            kind,
            consumer,
            method: method.clone(),
            path: path.clone(),
            held,
            status,
            at,
            headers: headers.clone(),
        });
    };

    if let Some(resource) = resource {
        let Some(consumer) = consumer else {
            record(&mut st, RequestKind::SignUp, None, false, 400);
            return json_reply(
                400,
                &json!({"manager": name, "error": "sign-up without x-prealloc-consumer"}),
            );
        };
        let resource_type = resource_type.unwrap_or_default();
        let status = if st.holds_data { st.signup_status } else { 404 };
        let accepted = (200..300).contains(&status);
        if accepted {
            let data = format!("signup:{consumer}:{resource_type}:{resource}@{name}").into_bytes();
            st.data.entry(consumer.clone()).or_insert(data);
        }
        st.signups.push(SignUp {
            consumer: consumer.clone(),
            resource: resource.clone(),
            resource_type,
            accepted,
        });
        let held = st.data.contains_key(&consumer);
        record(
            &mut st,
            RequestKind::SignUp,
            Some(consumer.clone()),
            held,
            status,
        );
        let mut r = json_reply(
            status,
            &json!({"manager": name, "consumer": consumer, "resource": resource, "signed_up": accepted}),
        );
        r.headers_mut().insert(SERVED_BY_HEADER, served_by(&name));
        return r;
    }

    if is_api {
        return api(
            &name,
            &mut st,
            &method,
            &path,
            auth.as_deref(),
            body,
            at,
            headers,
        );
    }

    let (kind, held) = match &consumer {
        Some(c) => (RequestKind::Consumer, st.data.contains_key(c)),
        None => (RequestKind::Anonymous, false),
    };
    // A manager without the data answers like a real one would: "user not found".
    let status = if kind == RequestKind::Consumer && !held {
        404
    } else {
        200
    };
    record(&mut st, kind, consumer.clone(), held, status);
    let mut r = json_reply(
        status,
        &json!({"manager": name, "consumer": consumer, "held": held, "path": path}),
    );
    r.headers_mut().insert(SERVED_BY_HEADER, served_by(&name));
    r
}

fn served_by(name: &str) -> hyper::header::HeaderValue {
    hyper::header::HeaderValue::from_str(name)
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("invalid-name"))
}

#[allow(clippy::too_many_arguments)]
fn api(
    name: &str,
    st: &mut State,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: bytes::Bytes,
    at: Instant,
    headers: Vec<(String, String)>,
) -> Reply {
    let rest = path[MANAGER_API_PREFIX.len()..]
        .split('?')
        .next()
        .unwrap_or("");
    let segments: Vec<&str> = rest.split('/').collect();
    let (kind, consumer) = match segments.as_slice() {
        ["consumers", id, "data"] => (RequestKind::Replication, Some((*id).to_owned())),
        ["resources"] => (RequestKind::Provisioning, None),
        _ => (RequestKind::UnknownApi, None),
    };
    let held = consumer.as_ref().is_some_and(|c| st.data.contains_key(c));

    let (status, reply_body): (u16, Reply) = (|| {
        if let Some(expected) = &st.token {
            if auth != Some(format!("Bearer {expected}").as_str()) {
                return (
                    401,
                    json_reply(
                        401,
                        &json!({"manager": name, "error": "missing or wrong bearer token"}),
                    ),
                );
            }
        }
        if let Some(forced) = st.api_status {
            return (
                forced,
                json_reply(
                    forced,
                    &json!({"manager": name, "error": "injected failure"}),
                ),
            );
        }
        match (kind, method) {
            (RequestKind::Replication, "GET") => {
                let c = consumer.as_deref().unwrap_or_default();
                match st.data.get(c) {
                    Some(d) => (200, reply(200, "application/octet-stream", d.clone())),
                    None => (
                        404,
                        json_reply(404, &json!({"manager": name, "error": "consumer not held"})),
                    ),
                }
            }
            (RequestKind::Replication, "PUT") if st.refuse_copies => (
                503,
                json_reply(
                    503,
                    &json!({"manager": name, "error": "copies paused by the test"}),
                ),
            ),
            (RequestKind::Replication, "PUT") => {
                let c = consumer.clone().unwrap_or_default();
                st.data.insert(c, body.to_vec());
                (204, reply(204, "text/plain", ""))
            }
            (RequestKind::Provisioning, "POST") => {
                let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&body);
                let Some((id, ty, rname)) = parsed.ok().and_then(|v| {
                    Some((
                        v.get("id")?.as_u64()?,
                        v.get("type")?.as_str()?.to_owned(),
                        v.get("name")?.as_str()?.to_owned(),
                    ))
                }) else {
                    return (
                        400,
                        json_reply(
                            400,
                            &json!({"manager": name, "error": "expected {\"id\":u64,\"type\":str,\"name\":str}"}),
                        ),
                    );
                };
                if !st.provisioned.iter().any(|p| p.id == id) {
                    st.provisioned.push(Provisioned {
                        id,
                        resource_type: ty,
                        name: rname,
                    });
                }
                (201, json_reply(201, &json!({"manager": name, "id": id})))
            }
            _ => (
                404,
                json_reply(
                    404,
                    &json!({"manager": name, "error": "no such manager API endpoint"}),
                ),
            ),
        }
    })();
    st.requests.push(RecordedRequest {
        manager: name.to_owned(),
        kind,
        consumer,
        method: method.to_owned(),
        path: path.to_owned(),
        held,
        status,
        at,
        headers,
    });
    reply_body
}
