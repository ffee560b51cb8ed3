//! The status page (`GET /status`): a sign-in form, then one HTML page (from
//! the binary, no build step) that polls `GET /status/data` every second and,
//! signed in with the admin token, can mark a manager available, draining or
//! down. The session is a random id in an HttpOnly, SameSite=Strict cookie.

use crate::api::{ct_eq, error, json, read_body, read_json, App, Resp};
use crate::sessions::{Role, SESSION_MS};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Body;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use hyper::{Request, Response, StatusCode};
use prealloc_wire::Availability;
use serde::Deserialize;

const PAGE: &str = include_str!("../assets/status.html");
const SIGN_IN: &str = include_str!("../assets/sign-in.html");
const COOKIE_NAME: &str = "prealloc_status";

fn html(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn sign_in_form(status: StatusCode, message: &str) -> Resp {
    html(status, SIGN_IN.replace("{{MESSAGE}}", message))
}

/// The session id in the request's cookies, if any.
fn session_id<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.to_owned())
}

/// `application/x-www-form-urlencoded` value decoding (`+` and `%XX`).
fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)?
        .1;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AvailabilityChange {
    manager: String,
    availability: Availability,
}

impl App {
    fn session_role<B>(&self, req: &Request<B>) -> Option<Role> {
        let id = session_id(req)?;
        self.plane.core.sessions.role(&id, crate::now_ms())
    }

    /// The page when signed in, else the sign-in form.
    pub(crate) fn status_page<B>(&self, req: &Request<B>) -> Resp {
        match self.session_role(req) {
            Some(_) => html(StatusCode::OK, PAGE.to_owned()),
            None => sign_in_form(StatusCode::OK, ""),
        }
    }

    pub(crate) async fn status_sign_in<B>(&self, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let token = form_value(&body, "token").unwrap_or_default();
        let tokens = &self.plane.core.config.tokens;
        let admin = ct_eq(token.as_bytes(), tokens.admin.as_bytes());
        let status = tokens
            .status
            .as_deref()
            .is_some_and(|s| ct_eq(token.as_bytes(), s.as_bytes()));
        let role = match (admin, status) {
            (true, _) => Role::Admin,
            (false, true) => Role::ReadOnly,
            _ => return sign_in_form(
                StatusCode::UNAUTHORIZED,
                "That token is not valid: use the admin token or the status token (tokens.status).",
            ),
        };
        let id = self.plane.core.sessions.create(role, crate::now_ms());
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        let h = r.headers_mut();
        h.insert(LOCATION, HeaderValue::from_static("/status"));
        let cookie = format!(
            "{COOKIE_NAME}={id}; Path=/status; Max-Age={}; HttpOnly; SameSite=Strict",
            SESSION_MS / 1000
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(SET_COOKIE, v);
        }
        r
    }

    pub(crate) fn status_sign_out<B>(&self, req: &Request<B>) -> Resp {
        if let Some(id) = session_id(req) {
            self.plane.core.sessions.remove(&id);
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        let h = r.headers_mut();
        h.insert(LOCATION, HeaderValue::from_static("/status"));
        h.insert(
            SET_COOKIE,
            HeaderValue::from_static(
                "prealloc_status=; Path=/status; Max-Age=0; HttpOnly; SameSite=Strict",
            ),
        );
        r
    }

    /// Everything the page shows: aggregates, and the latest sign-ups one by
    /// one (a bounded list): its size does not grow with the consumers.
    pub(crate) fn status_data<B>(&self, req: &Request<B>) -> Resp {
        let Some(role) = self.session_role(req) else {
            return error(
                StatusCode::UNAUTHORIZED,
                "not_signed_in",
                "sign in at /status first",
            );
        };
        let core = &self.plane.core;
        let now = crate::now_ms();
        let (managers, pools, consumers, recent) = {
            let reg = core.registry();
            let managers: Vec<_> = (0..reg.managers().len())
                .map(|i| reg.manager_view(i))
                .collect();
            let pools: Vec<_> = (0..reg.pools().len()).map(|i| reg.pool_view(i)).collect();
            let consumers = (reg.consumer_count(), reg.registering_count());
            (managers, pools, consumers, reg.recent(now))
        };
        let version = core.routes.version();
        let pollers = self.pollers_view();
        let m = &core.metrics;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        json(
            StatusCode::OK,
            &serde_json::json!({
                "now_ms": now,
                "role": match role { Role::Admin => "admin", Role::ReadOnly => "read-only" },
                "epoch": core.routes.epoch(),
                "version": version,
                "managers": managers,
                "pools": pools,
                "consumers": consumers.0,
                "registering": consumers.1,
                "in_routing_table": core.routes.len(),
                "registrations_total": load(&m.registrations),
                "consumers_registered_total": load(&m.consumers_registered),
                "replication_lag": m.replication_lag.buckets(),
                "pollers": pollers,
                "recent": recent,
            }),
        )
    }

    pub(crate) async fn status_availability<B>(&self, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.session_role(&req) {
            None => return error(StatusCode::UNAUTHORIZED, "not_signed_in", "sign in at /status first"),
            Some(Role::ReadOnly) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "read_only",
                    "signed in with the status token: sign in with the admin token to change availability",
                )
            }
            Some(Role::Admin) => {}
        }
        let change: AvailabilityChange = match read_json(req).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        self.set_availability(change.manager, change.availability)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_value(b"token=a%2Bb+c&x=1", "token").as_deref(),
            Some("a+b c")
        );
        assert_eq!(form_value(b"x=1", "token"), None);
        assert_eq!(form_value(b"token=%zz", "token"), None);
    }
}
