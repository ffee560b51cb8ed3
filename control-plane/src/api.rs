//! The HTTP API: routing, bearer-token checks, JSON in and out, error bodies.

use crate::command::{Confirm, Refusal, Register, Release, Replica, SetAvailability};
use crate::registry::{ConsumerRecord, RegisterError};
use crate::state::Plane;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use prealloc_wire::{
    AvailabilityUpdate, ConsumerId, ConsumerState, ErrorBody, RegistrationRequest, ReplicaReport,
    RoutesQuery, ROUTES_PATH, ROUTES_PROTOCOL,
};
use serde::Serialize;
use std::time::Duration;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Hold of a long-poll that does not say `wait_ms`.
const DEFAULT_WAIT_MS: u64 = 30_000;

/// The HTTP application; cheap to clone.
#[derive(Clone)]
pub struct App {
    pub(crate) plane: Plane,
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No token: liveness and metrics.
    Open,
    /// The envoy token (or the admin token).
    Envoy,
    /// The admin token.
    Admin,
    /// The status page: no bearer token; the endpoint checks the sign-in
    /// cookie itself (`status.rs`).
    Page,
}

/// The endpoints, each routed by exactly one line of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Healthz,
    Metrics,
    Routes,
    Register,
    Release,
    Confirm,
    Replica,
    Consumer,
    Consumers,
    Managers,
    Manager,
    Availability,
    Pools,
    Pollers,
    StatusPage,
    StatusSignIn,
    StatusSignOut,
    StatusData,
    StatusAvailability,
}

/// The API, declared once: method, path (`*` is one segment, handed to the
/// endpoint), who may call it, and the endpoint. Routing, the `Allow` header of
/// 405 answers and the token check all read this table.
const ROUTES: &[(Method, &str, Access, Endpoint)] = &[
    (Method::GET, "healthz", Access::Open, Endpoint::Healthz),
    (Method::GET, "metrics", Access::Open, Endpoint::Metrics),
    (Method::GET, "v1/routes", Access::Envoy, Endpoint::Routes),
    (
        Method::POST,
        "v1/registrations",
        Access::Envoy,
        Endpoint::Register,
    ),
    (
        Method::DELETE,
        "v1/registrations/*",
        Access::Envoy,
        Endpoint::Release,
    ),
    (
        Method::POST,
        "v1/registrations/*/confirm",
        Access::Envoy,
        Endpoint::Confirm,
    ),
    (
        Method::POST,
        "v1/consumers/*/replicas",
        Access::Admin,
        Endpoint::Replica,
    ),
    (
        Method::GET,
        "v1/consumers/*",
        Access::Admin,
        Endpoint::Consumer,
    ),
    (
        Method::GET,
        "v1/consumers",
        Access::Admin,
        Endpoint::Consumers,
    ),
    (
        Method::GET,
        "v1/managers",
        Access::Admin,
        Endpoint::Managers,
    ),
    (
        Method::GET,
        "v1/managers/*",
        Access::Admin,
        Endpoint::Manager,
    ),
    (
        Method::PUT,
        "v1/managers/*/availability",
        Access::Admin,
        Endpoint::Availability,
    ),
    (Method::GET, "v1/pools", Access::Admin, Endpoint::Pools),
    (Method::GET, "v1/pollers", Access::Admin, Endpoint::Pollers),
    (Method::GET, "status", Access::Page, Endpoint::StatusPage),
    (
        Method::POST,
        "status/sign-in",
        Access::Page,
        Endpoint::StatusSignIn,
    ),
    (
        Method::POST,
        "status/sign-out",
        Access::Page,
        Endpoint::StatusSignOut,
    ),
    (
        Method::GET,
        "status/data",
        Access::Page,
        Endpoint::StatusData,
    ),
    (
        Method::POST,
        "status/availability",
        Access::Page,
        Endpoint::StatusAvailability,
    ),
];

/// The API as `(method, path pattern, who may call it)`, `*` standing for one
/// segment, and who being `"open"`, `"envoy"` (the envoy or the admin token)
/// or `"admin"`: for docs and for tests that walk every endpoint.
pub fn access_table() -> impl Iterator<Item = (Method, &'static str, &'static str)> {
    ROUTES.iter().map(|(m, path, access, _)| {
        let who = match access {
            Access::Open => "open",
            Access::Envoy => "envoy",
            Access::Admin => "admin",
            Access::Page => "page",
        };
        (m.clone(), *path, who)
    })
}

/// Matches path segments against a [`ROUTES`] pattern; `Some(arg)` on a match,
/// `arg` being the segment under `*` (empty without one).
fn match_path<'p>(pattern: &str, segs: &[&'p str]) -> Option<&'p str> {
    let mut arg = "";
    let mut pat = pattern.split('/');
    for &seg in segs {
        match pat.next()? {
            "*" if !seg.is_empty() => arg = seg,
            p if p == seg => {}
            _ => return None,
        }
    }
    pat.next().is_none().then_some(arg)
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub(crate) type Resp = Response<Full<Bytes>>;

pub(crate) fn json<T: Serialize>(status: StatusCode, v: &T) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error answer with a stable code and a message for humans.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Resp {
    json(
        status,
        &ErrorBody {
            error: code.to_owned(),
            message: message.into(),
        },
    )
}

/// Constant-time comparison: the time taken does not depend on where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

impl App {
    pub fn new(plane: Plane) -> App {
        App { plane }
    }

    // The error is the finished response; boxing it would only add an allocation.
    #[allow(clippy::result_large_err)]
    fn authorize<B>(&self, req: &Request<B>, access: Access) -> Result<(), Resp> {
        let need = match access {
            Access::Open | Access::Page => return Ok(()),
            Access::Envoy => "the envoy token (tokens.envoy) or the admin token",
            Access::Admin => "the admin token (tokens.admin)",
        };
        let unauthorized = |code: &str, msg: String| {
            let mut r = error(StatusCode::UNAUTHORIZED, code, msg);
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"prealloc\""),
            );
            r
        };
        let Some(h) = req.headers().get(AUTHORIZATION) else {
            return Err(unauthorized(
                "missing_token",
                format!(
                    "no Authorization header: send `Authorization: Bearer <token>` with {need}"
                ),
            ));
        };
        let Some(token) = h.to_str().ok().and_then(bearer_token) else {
            return Err(unauthorized(
                "malformed_token",
                format!("the Authorization header is not `Bearer <token>`; send {need}"),
            ));
        };
        let tokens = &self.plane.core.config.tokens;
        let is_admin = ct_eq(token.as_bytes(), tokens.admin.as_bytes());
        let is_envoy = ct_eq(token.as_bytes(), tokens.envoy.as_bytes());
        match (access, is_admin, is_envoy) {
            (_, true, _) | (Access::Envoy, _, true) => Ok(()),
            (Access::Admin, false, true) => Err(error(
                StatusCode::FORBIDDEN,
                "wrong_token",
                "the envoy token cannot use this endpoint; it needs the admin token (tokens.admin)",
            )),
            _ => Err(error(
                StatusCode::FORBIDDEN,
                "invalid_token",
                format!("the bearer token is not valid here; this endpoint needs {need}"),
            )),
        }
    }

    /// Answers one request (any body type: hyper's `Incoming` or a test's `Full`).
    pub async fn handle<B>(&self, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let route = ROUTES.iter().find_map(|(m, pattern, access, endpoint)| {
            let arg = (*m == method)
                .then(|| match_path(pattern, &segs))
                .flatten()?;
            Some((*access, *endpoint, arg.to_owned()))
        });
        let resp = match route {
            Some((access, endpoint, arg)) => match self.authorize(&req, access) {
                Ok(()) => self.dispatch(endpoint, &arg, req).await,
                Err(r) => r,
            },
            None => not_routed(&method, &path, &segs),
        };
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
        resp
    }

    async fn dispatch<B>(&self, endpoint: Endpoint, arg: &str, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match endpoint {
            Endpoint::Healthz => self.healthz(),
            Endpoint::Metrics => self.metrics(),
            Endpoint::Routes => self.routes(&req).await,
            Endpoint::Register => self.register(req).await,
            Endpoint::Release => self.release(arg).await,
            Endpoint::Confirm => self.confirm(arg).await,
            Endpoint::Replica => self.replica(arg, req).await,
            Endpoint::Consumer => self.consumer(arg),
            Endpoint::Consumers => self.consumers(&req),
            Endpoint::Managers => self.managers(None),
            Endpoint::Manager => self.managers(Some(arg)),
            Endpoint::Availability => self.availability(arg, req).await,
            Endpoint::Pools => self.pools(),
            Endpoint::Pollers => self.pollers(),
            Endpoint::StatusPage => self.status_page(&req),
            Endpoint::StatusSignIn => self.status_sign_in(req).await,
            Endpoint::StatusSignOut => self.status_sign_out(&req),
            Endpoint::StatusData => self.status_data(&req),
            Endpoint::StatusAvailability => self.status_availability(req).await,
        }
    }

    /// Liveness: fails once the writer thread died (no write can succeed then).
    fn healthz(&self) -> Resp {
        let core = &self.plane.core;
        match self.plane.writer.failure() {
            None => json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "epoch": core.routes.epoch(), "version": core.routes.version(), "duties": core.on_duty()}),
            ),
            Some(why) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "failed", "error": "writer_failed", "message": format!("{why}; restart the control plane")}),
            ),
        }
    }

    fn metrics(&self) -> Resp {
        let core = &self.plane.core;
        let text = {
            let reg = core.registry();
            core.metrics.render(
                &reg,
                &core.routes,
                &core.pollers,
                core.config.push.max_wait_ms.saturating_mul(2),
            )
        };
        let mut r = Response::new(Full::new(Bytes::from(text)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    async fn routes<B>(&self, req: &Request<B>) -> Resp {
        let q = match parse_routes_query(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(RoutesQueryError::Protocol(m)) => {
                self.plane
                    .core
                    .metrics
                    .routes_protocol_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(query = %req.uri().query().unwrap_or(""), "{m}");
                return error(StatusCode::BAD_REQUEST, "unsupported_protocol", m);
            }
            Err(RoutesQueryError::Bad(m)) => return error(StatusCode::BAD_REQUEST, "bad_query", m),
        };
        let core = &self.plane.core;
        let wait = q
            .wait_ms
            .unwrap_or(DEFAULT_WAIT_MS)
            .min(core.config.push.max_wait_ms);
        // Seen (and counted as waiting) until this poll is answered.
        let _seen = q.node.as_deref().map(|node| {
            let current_epoch = q.epoch.as_deref() == Some(core.routes.epoch());
            core.pollers
                .arrived(node, q.since, current_epoch, crate::now_ms())
        });
        let answer = core
            .routes
            .poll(&q, Duration::from_millis(wait), core.stop.subscribe())
            .await;
        // A big snapshot is tens of megabytes: build it off the async workers.
        let body = match &answer {
            crate::routes::Answer::Full { entries, .. } if entries.len() > 10_000 => {
                match tokio::task::spawn_blocking(move || answer.to_json()).await {
                    Ok(b) => b,
                    Err(e) => {
                        return error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            format!("building the snapshot failed: {e}"),
                        )
                    }
                }
            }
            _ => answer.to_json(),
        };
        let mut r = Response::new(Full::new(body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    async fn register<B>(&self, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body: RegistrationRequest = match read_json(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let r = self
            .plane
            .writer
            .call(Register {
                resource_type: body.resource_type,
                location: body.location,
            })
            .await;
        match r {
            Ok(reg) => json(StatusCode::CREATED, &reg),
            Err(e) => refusal(e),
        }
    }

    async fn release(&self, id: &str) -> Resp {
        let consumer = match ConsumerId::parse(id) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_consumer_id", e.to_string()),
        };
        match self.plane.writer.call(Release { consumer }).await {
            Ok(()) => {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Err(e) => refusal(e),
        }
    }

    async fn confirm(&self, id: &str) -> Resp {
        let consumer = match ConsumerId::parse(id) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_consumer_id", e.to_string()),
        };
        match self.plane.writer.call(Confirm { consumer: consumer.clone() }).await {
            Ok(newly) => json(
                StatusCode::OK,
                &serde_json::json!({"consumer": consumer, "confirmed": true, "newly": newly}),
            ),
            Err(Refusal::UnknownConsumer) => error(
                StatusCode::NOT_FOUND,
                "unknown_consumer",
                "no such registration: it was never made, was given back, or its lease ran out and it was reclaimed; do not issue a cookie for it",
            ),
            Err(e) => refusal(e),
        }
    }

    async fn replica<B>(&self, id: &str, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let consumer = match ConsumerId::parse(id) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_consumer_id", e.to_string()),
        };
        let body: ReplicaReport = match read_json(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let manager = body.manager;
        match self.plane.writer.call(Replica { consumer, manager }).await {
            Ok(ack) => json(StatusCode::OK, &ack),
            Err(e) => refusal(e),
        }
    }

    /// A consumer's record: from memory, or, settled, from the database.
    fn record(&self, consumer: &ConsumerId) -> anyhow::Result<Option<ConsumerRecord>> {
        let core = &self.plane.core;
        let in_memory = core.registry().consumer_record(consumer);
        let mut rec = match in_memory {
            Some(rec) => rec,
            None => {
                let stored = core.stored_consumer(consumer)?;
                match stored.and_then(|s| core.registry().stored_record(&s)) {
                    Some(rec) => rec,
                    None => return Ok(None),
                }
            }
        };
        rec.in_routing_table = core.routes.contains(consumer);
        Ok(Some(rec))
    }

    fn consumer(&self, id: &str) -> Resp {
        let consumer = match ConsumerId::parse(id) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_consumer_id", e.to_string()),
        };
        match self.record(&consumer) {
            Ok(Some(rec)) => json(StatusCode::OK, &rec),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                "unknown_consumer",
                format!("no consumer {consumer}"),
            ),
            Err(e) => unreadable(e),
        }
    }

    fn consumers<B>(&self, req: &Request<B>) -> Resp {
        let mut state = None;
        let mut limit = 1000usize;
        for (k, v) in query_pairs(req.uri().query().unwrap_or("")) {
            match k {
                "state" => match v {
                    "registering" => state = Some(ConsumerState::Registering),
                    "registered" => state = Some(ConsumerState::Registered),
                    other => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            format!("state={other:?}: expected registering or registered"),
                        )
                    }
                },
                "limit" => match v.parse() {
                    Ok(n) => limit = n,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            format!("limit={v:?} is not a number"),
                        )
                    }
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        format!("unknown query parameter {other:?}; use state and limit"),
                    )
                }
            }
        }
        // Every registering consumer is in memory; registered ones may be
        // settled, so those lists come from the database, in resource order.
        let ids: Vec<ConsumerId> = match state {
            Some(ConsumerState::Registering) => {
                self.plane.core.registry().list_consumers(state, limit)
            }
            _ => {
                let registered_only = state == Some(ConsumerState::Registered);
                match self.plane.core.stored_consumer_ids(registered_only, limit) {
                    Ok(ids) => ids
                        .iter()
                        .filter_map(|id| ConsumerId::parse(id).ok())
                        .collect(),
                    Err(e) => return unreadable(e),
                }
            }
        };
        let mut records = Vec::with_capacity(ids.len());
        for c in &ids {
            match self.record(c) {
                Ok(rec) => records.extend(rec),
                Err(e) => return unreadable(e),
            }
        }
        json(StatusCode::OK, &records)
    }

    fn managers(&self, id: Option<&str>) -> Resp {
        let reg = self.plane.core.registry();
        match id {
            None => {
                let v: Vec<_> = (0..reg.managers().len())
                    .map(|i| reg.manager_view(i))
                    .collect();
                json(StatusCode::OK, &v)
            }
            Some(id) => match reg.manager_index(id) {
                Some(i) => json(StatusCode::OK, &reg.manager_view(i)),
                None => error(
                    StatusCode::NOT_FOUND,
                    "unknown_manager",
                    format!("no manager {id:?} in the config"),
                ),
            },
        }
    }

    fn pools(&self) -> Resp {
        let reg = self.plane.core.registry();
        let v: Vec<_> = (0..reg.pools().len()).map(|i| reg.pool_view(i)).collect();
        json(StatusCode::OK, &v)
    }

    /// Every Envoy seen polling, with how far its table is behind (null when
    /// it holds another epoch's: its next answer is a full snapshot).
    fn pollers(&self) -> Resp {
        json(StatusCode::OK, &self.pollers_view())
    }

    /// The pollers as `GET /v1/pollers` and the status page show them.
    pub(crate) fn pollers_view(&self) -> Vec<serde_json::Value> {
        let core = &self.plane.core;
        let current = core.routes.version();
        core.pollers
            .list()
            .into_iter()
            .map(|p| {
                let behind = p.current_epoch.then(|| current.saturating_sub(p.version));
                serde_json::json!({
                    "node": p.node,
                    "version": p.version,
                    "behind": behind,
                    "last_poll_ms": p.last_poll_ms,
                    "waiting": p.waiting,
                    "polls": p.polls,
                })
            })
            .collect()
    }

    async fn availability<B>(&self, id: &str, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body: AvailabilityUpdate = match read_json(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        self.set_availability(id.to_owned(), body.availability)
            .await
    }

    /// Writes a manager's availability; answers the manager as it is now.
    pub(crate) async fn set_availability(
        &self,
        manager: String,
        availability: prealloc_wire::Availability,
    ) -> Resp {
        let write = SetAvailability {
            manager,
            availability,
        };
        match self.plane.writer.call(write).await {
            Ok(view) => json(StatusCode::OK, &view),
            Err(Refusal::UnknownManager(m)) => error(
                StatusCode::NOT_FOUND,
                "unknown_manager",
                format!("no manager {m:?} in the config"),
            ),
            Err(e) => refusal(e),
        }
    }
}

/// 405 with `Allow` when the path exists with other methods, else 404.
fn not_routed(method: &Method, path: &str, segs: &[&str]) -> Resp {
    let allow: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, pattern, _, _)| match_path(pattern, segs).is_some())
        .map(|(m, _, _, _)| m.as_str())
        .collect();
    if allow.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint {path}; see the API reference in control-plane/README.md"),
        );
    }
    let allow = allow.join(", ");
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}; use {allow}"),
    );
    if let Ok(v) = HeaderValue::from_str(&allow) {
        r.headers_mut().insert(ALLOW, v);
    }
    r
}

/// A read of the database failed: 503, retry.
fn unreadable(e: anyhow::Error) -> Resp {
    refusal(Refusal::Storage(format!(
        "the database could not be read ({e:#}); retry later"
    )))
}

fn refusal(e: Refusal) -> Resp {
    match e {
        Refusal::Register(RegisterError::UnknownResourceType(t)) => error(
            StatusCode::BAD_REQUEST,
            "unknown_resource_type",
            format!("no pool has resource type {t:?}; configure one under [[pools]]"),
        ),
        Refusal::Register(RegisterError::UnknownLocation { resource_type, location }) => error(
            StatusCode::BAD_REQUEST,
            "unknown_location",
            format!("no pool of {resource_type:?} in location {location:?}; omit location or configure the pool"),
        ),
        Refusal::Register(RegisterError::PoolEmpty { resource_type, location }) => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "pool_empty",
                format!(
                    "no ready {resource_type} in {location}: the pool is empty or its managers are not available; retry shortly"
                ),
            );
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Refusal::UnknownConsumer => {
            error(StatusCode::NOT_FOUND, "unknown_consumer", "no such consumer; it was never registered or was given back")
        }
        Refusal::UnknownManager(m) => error(
            StatusCode::BAD_REQUEST,
            "unknown_manager",
            format!("no manager {m:?} in the config; use a manager id from GET /v1/managers"),
        ),
        Refusal::Storage(m) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "storage_failed", m);
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Refusal::Confirmed => error(
            StatusCode::CONFLICT,
            "registration_confirmed",
            "this registration was confirmed (its sign-up succeeded, managers hold the consumer's data): its resource is never given back",
        ),
        Refusal::WriterFailed(m) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "writer_failed", format!("{m}; this control plane takes no more writes until it is restarted"));
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Refusal::ShuttingDown => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the control plane is stopping; retry against it after its restart");
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

pub(crate) async fn read_json<B, T>(req: Request<B>) -> Result<T, Resp>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T: serde::de::DeserializeOwned,
{
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the JSON body is not valid here: {e}"),
        )
    })
}

/// The whole body, at most [`MAX_BODY`] bytes.
pub(crate) async fn read_body<B>(req: Request<B>) -> Result<Bytes, Resp>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = Limited::new(req.into_body(), MAX_BODY);
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {MAX_BODY} bytes; nothing was written"),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body (at most {MAX_BODY} bytes): {e}"),
            ))
        }
    };
    Ok(bytes)
}

pub(crate) fn query_pairs(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// Why a `GET /v1/routes` query was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutesQueryError {
    /// No `protocol=2`: a poller of another release, which must not misread answers.
    Protocol(String),
    Bad(String),
}

impl From<String> for RoutesQueryError {
    fn from(m: String) -> Self {
        RoutesQueryError::Bad(m)
    }
}

/// Parses `protocol`, `since`, `epoch`, `wait_ms`, `node`, `after` of `GET /v1/routes`.
pub fn parse_routes_query(q: &str) -> Result<RoutesQuery, RoutesQueryError> {
    let mut out = RoutesQuery::default();
    let mut protocol = None;
    for (k, v) in query_pairs(q) {
        match k {
            "protocol" => protocol = Some(v),
            "after" => {
                out.after = Some(ConsumerId::parse(v).map_err(|e| {
                    RoutesQueryError::Bad(format!("after={v:?} is not a consumer id: {e}"))
                })?)
            }
            "since" => {
                out.since = v
                    .parse()
                    .map_err(|_| format!("since={v:?} is not a version number"))?
            }
            "epoch" => out.epoch = Some(v.to_owned()).filter(|e| !e.is_empty()),
            "wait_ms" => {
                out.wait_ms = Some(
                    v.parse()
                        .map_err(|_| format!("wait_ms={v:?} is not a number of milliseconds"))?,
                )
            }
            "node" => {
                if !prealloc_wire::is_valid_node(v) {
                    return Err(format!(
                        "node={v:?} must be 1..={} characters of A-Z a-z 0-9 . _ ~ -",
                        prealloc_wire::MAX_NODE_LEN
                    )
                    .into());
                }
                out.node = Some(v.to_owned());
            }
            other => {
                return Err(RoutesQueryError::Bad(format!(
                    "unknown query parameter {other:?} on {ROUTES_PATH}; use protocol, since, epoch, wait_ms, node, after"
                )))
            }
        }
    }
    let want = ROUTES_PROTOCOL.to_string();
    match protocol {
        Some(p) if p == want => Ok(out),
        Some(p) => Err(RoutesQueryError::Protocol(format!(
            "routes protocol {p:?} is not spoken here: this control plane speaks protocol={want} (paged snapshots); run a prealloc filter of the same release"
        ))),
        None => Err(RoutesQueryError::Protocol(format!(
            "the routes poll has no protocol= (a prealloc filter older than routes protocol {want}, which reads snapshots whole); upgrade the filter to the control plane's release"
        ))),
    }
}
