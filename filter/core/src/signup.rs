//! Sign-up through the filter (flow 2): the registration call, the forwarded request, the replies.
//!
//! A request matching the configured method and path is held while the filter
//! asks the control plane for a registration (`POST /v1/registrations`). On a
//! `201` with a usable [`Registration`] it is sent to the first manager's
//! cluster with headers naming the consumer and the resource; when the
//! manager answers 2xx the response gets a registering cookie. A manager's
//! non-2xx gives the registration back (`DELETE /v1/registrations/{id}`,
//! retried from the worker's root context so it outlives the request). When
//! the control plane cannot be used the client gets a 503 with `Retry-After`
//! and a short JSON body, and no cookie: never a half-made consumer.

use prealloc_wire::{
    ConsumerId, ConsumerState, ErrorBody, Registration, RegistrationRequest, HEADER_CONSUMER,
    HEADER_RESOURCE, HEADER_RESOURCE_TYPE, REGISTRATIONS_PATH,
};
use std::collections::VecDeque;

use crate::config::{CookieConfig, SignupConfig};
use crate::cookie::{self, Claims};
use crate::table::is_valid_cluster;

/// How many times a give-back is tried before it is logged as lost.
pub const GIVEBACK_ATTEMPTS: u32 = 5;
/// Longest Retry-After honoured from the control plane, seconds.
pub const MAX_RETRY_AFTER_S: u32 = 3600;

/// Whether a request is a sign-up: same method, same path (query string ignored).
pub fn is_signup(cfg: &SignupConfig, method: &[u8], path: &[u8]) -> bool {
    let path = match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(i) => path.get(..i).unwrap_or(path),
        None => path,
    };
    method == cfg.method.as_bytes() && path == cfg.path.as_bytes()
}

/// One HTTP call to the control plane (headers include the pseudo-headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
}

impl Call {
    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}

/// `POST /v1/registrations` for the configured resource type and location.
pub fn registration_call(cfg: &SignupConfig) -> Call {
    let req = RegistrationRequest {
        resource_type: cfg.resource_type.clone(),
        location: cfg.location.clone(),
    };
    let body = serde_json::to_vec(&req).unwrap_or_default();
    Call {
        headers: vec![
            (":method", "POST".to_owned()),
            (":path", REGISTRATIONS_PATH.to_owned()),
            (":authority", cfg.authority.clone()),
            ("authorization", format!("Bearer {}", cfg.token)),
            ("content-type", "application/json".to_owned()),
            ("accept", "application/json".to_owned()),
        ],
        body: Some(body),
    }
}

/// `DELETE /v1/registrations/{consumer}`: gives a refused sign-up's resource back.
pub fn giveback_call(cfg: &SignupConfig, consumer: &ConsumerId) -> Call {
    Call {
        headers: vec![
            (":method", "DELETE".to_owned()),
            (":path", format!("{REGISTRATIONS_PATH}/{consumer}")),
            (":authority", cfg.authority.clone()),
            ("authorization", format!("Bearer {}", cfg.token)),
        ],
        body: None,
    }
}

/// `POST /v1/registrations/{consumer}/confirm`: the first manager accepted the
/// sign-up; the registration stops being a lease the control plane reclaims.
pub fn confirm_call(cfg: &SignupConfig, consumer: &ConsumerId) -> Call {
    Call {
        headers: vec![
            (":method", "POST".to_owned()),
            (":path", format!("{REGISTRATIONS_PATH}/{consumer}/confirm")),
            (":authority", cfg.authority.clone()),
            ("authorization", format!("Bearer {}", cfg.token)),
            ("content-length", "0".to_owned()),
        ],
        body: None,
    }
}

/// Judges the confirmation's answer: `Ok` when the registration is confirmed
/// (the cookie may be issued); else the 503 the client gets instead of the
/// manager's answer, without a cookie (the registration was reclaimed, or will
/// be when its lease ends).
pub fn on_confirm_response(status: Option<u32>, retry_after_s: u32) -> Result<(), LocalReply> {
    match status {
        Some(200..=299) => Ok(()),
        Some(404) => Err(LocalReply::unavailable(
            "registration_expired",
            "the sign-up took longer than its registration lease; sign up again",
            retry_after_s,
        )),
        _ => Err(LocalReply::unavailable(
            "control_plane_unreachable",
            "the registration service could not confirm the sign-up; sign up again",
            retry_after_s,
        )),
    }
}

/// A local reply the filter sends instead of forwarding the sign-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub retry_after_s: u32,
    /// `{"error": "...", "message": "..."}`.
    pub body: String,
}

impl LocalReply {
    pub fn unavailable(error: &str, message: &str, retry_after_s: u32) -> Self {
        let body = serde_json::to_string(&ErrorBody {
            error: error.to_owned(),
            message: message.to_owned(),
        })
        .unwrap_or_else(|_| {
            r#"{"error":"unavailable","message":"sign-up is unavailable; retry later"}"#.to_owned()
        });
        LocalReply {
            status: 503,
            retry_after_s,
            body,
        }
    }
}

/// What to do with the control plane's answer to the registration call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationOutcome {
    /// Forward the sign-up to `registration.cluster`.
    Forward(Registration),
    /// Answer the client with this reply.
    Reply(LocalReply),
    /// The registration exists but cannot be used: give it back and answer with this reply.
    GiveBackAndReply(ConsumerId, LocalReply),
}

/// Judges the control plane's answer. `status` is None when the call got no
/// HTTP answer (unreachable, reset, timeout); `retry_after` is its
/// `Retry-After` header, honoured when it is a sane number of seconds.
pub fn on_registration_response(
    status: Option<u32>,
    retry_after: Option<&[u8]>,
    body: &[u8],
    default_retry_after_s: u32,
    timeout_ms: u64,
) -> RegistrationOutcome {
    let retry = retry_after
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|s| (1..=MAX_RETRY_AFTER_S).contains(s))
        .unwrap_or(default_retry_after_s);
    let reply = |error: &str, message: &str| {
        RegistrationOutcome::Reply(LocalReply::unavailable(error, message, retry))
    };
    match status {
        None => reply(
            "control_plane_unreachable",
            &format!("the registration service did not answer within {timeout_ms} ms; retry later"),
        ),
        Some(201) => match serde_json::from_slice::<Registration>(body) {
            Ok(reg) if is_valid_cluster(&reg.cluster) && header_safe(&reg.resource.name) && header_safe(&reg.resource.resource_type) => {
                RegistrationOutcome::Forward(reg)
            }
            Ok(reg) => RegistrationOutcome::GiveBackAndReply(
                reg.consumer,
                LocalReply::unavailable(
                    "registration_invalid",
                    "the registration service answered a registration this filter cannot route; retry later",
                    retry,
                ),
            ),
            Err(_) => reply(
                "registration_invalid",
                "the registration service answered something that is not a registration; retry later",
            ),
        },
        Some(s) => match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) if header_safe(&e.error) && e.error.len() <= 64 && e.message.len() <= 512 => {
                RegistrationOutcome::Reply(LocalReply::unavailable(&e.error, &e.message, retry))
            }
            // Without the control plane's error body, a 502/503/504 is Envoy's own
            // reply: connection refused, no healthy host, or timeout.
            _ if (502..=504).contains(&s) => reply(
                "control_plane_unreachable",
                &format!("the registration service cannot be reached (HTTP {s}); retry later"),
            ),
            _ => reply("registration_failed", &format!("the registration service answered HTTP {s}; retry later")),
        },
    }
}

/// Values that go into request headers must be visible ASCII (or spaces).
fn header_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Headers added to the sign-up forwarded to the first manager.
pub fn forward_headers(reg: &Registration) -> [(&'static str, &str); 3] {
    [
        (HEADER_CONSUMER, reg.consumer.as_str()),
        (HEADER_RESOURCE, reg.resource.name.as_str()),
        (HEADER_RESOURCE_TYPE, reg.resource.resource_type.as_str()),
    ]
}

/// Whether the manager accepted the sign-up (manager contract: 2xx).
pub fn accepted(status: Option<u32>) -> bool {
    matches!(status, Some(200..=299))
}

/// Claims of the registering cookie issued after an accepted sign-up.
pub fn signup_claims(reg: &Registration, now_unix_s: u64, max_age_s: u64) -> Claims {
    Claims {
        consumer: reg.consumer.clone(),
        state: ConsumerState::Registering,
        expires_at: now_unix_s.saturating_add(max_age_s),
        replicas: vec![reg.cluster.clone()],
    }
}

/// What to do with the first manager's answer to a forwarded sign-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignupAnswer {
    /// 2xx: confirm the registration ([`confirm_call`]), then add this
    /// `Set-Cookie` (the registering cookie) to the response; never before.
    Accepted { set_cookie: String },
    /// Anything else: pass the answer through without a cookie, give the registration back.
    Refused,
    /// Accepted, but no cookie could be signed (a configuration problem: log it).
    Unsigned(String),
}

/// Judges the first manager's answer to a forwarded sign-up (`status` is its
/// `:status`; None when there is none to read).
pub fn on_signup_response(
    cfg: &CookieConfig,
    reg: &Registration,
    status: Option<u32>,
    now_unix_s: u64,
) -> SignupAnswer {
    if !accepted(status) {
        return SignupAnswer::Refused;
    }
    let claims = signup_claims(reg, now_unix_s, cfg.max_age_s);
    match cookie::sign_with_config(cfg, &claims) {
        Ok(value) => SignupAnswer::Accepted {
            set_cookie: cookie::set_cookie_header(cfg, &value),
        },
        Err(e) => SignupAnswer::Unsigned(format!("cannot sign the new cookie: {e}")),
    }
}

/// Give-backs waiting to be sent (or re-sent) by the worker's root context.
#[derive(Debug, Default)]
pub struct GiveBacks {
    queue: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    consumer: ConsumerId,
    attempt: u32,
    due_ms: u64,
}

/// What became of a give-back call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveBackResult {
    Done,
    /// Re-queued; tried again after a delay that doubles per attempt (1 s, 2 s, 4 s, ...).
    Retry,
    /// Out of attempts: the resource stays reserved until an operator frees it.
    Lost,
}

impl GiveBacks {
    /// Queues a give-back, due at once.
    pub fn push(&mut self, consumer: ConsumerId, now_ms: u64) {
        self.queue.push_back(Pending {
            consumer,
            attempt: 0,
            due_ms: now_ms,
        });
    }

    /// Removes and returns the give-backs due at `now_ms`, with the attempts already made.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<(ConsumerId, u32)> {
        let mut due = Vec::new();
        self.queue.retain(|p| {
            if p.due_ms <= now_ms {
                due.push((p.consumer.clone(), p.attempt));
                false
            } else {
                true
            }
        });
        due
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Records the answer to attempt number `attempt` (0-based): 2xx and 404
    /// (already gone) are done; anything else is retried later, up to
    /// [`GIVEBACK_ATTEMPTS`] attempts in all.
    pub fn settle(
        &mut self,
        consumer: ConsumerId,
        attempt: u32,
        status: Option<u32>,
        now_ms: u64,
    ) -> GiveBackResult {
        match status {
            // 409: the registration was confirmed after all; it is not ours to give back.
            Some(200..=299 | 404 | 409) => GiveBackResult::Done,
            _ if attempt.saturating_add(1) >= GIVEBACK_ATTEMPTS => GiveBackResult::Lost,
            _ => {
                let delay = 1000u64 << attempt.min(16);
                self.queue.push_back(Pending {
                    consumer,
                    attempt: attempt + 1,
                    due_ms: now_ms.saturating_add(delay),
                });
                GiveBackResult::Retry
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prealloc_wire::ResourceRef;
    use proptest::prelude::*;
    use std::time::Duration;

    fn cfg() -> SignupConfig {
        SignupConfig {
            method: "POST".into(),
            path: "/signup".into(),
            cluster: "prealloc_control_plane".into(),
            authority: "cp".into(),
            token: "tok".into(),
            resource_type: "mailbox".into(),
            location: None,
            timeout: Duration::from_millis(2000),
        }
    }

    fn reg() -> Registration {
        Registration {
            consumer: ConsumerId::from_bytes([3; 16]),
            manager: "m1".into(),
            cluster: "manager_m1".into(),
            resource: ResourceRef {
                id: 42,
                resource_type: "mailbox".into(),
                name: "mailbox-42".into(),
                location: "eu".into(),
            },
        }
    }

    #[test]
    fn matches_method_and_path_only() {
        let c = cfg();
        for (m, p, want) in [
            ("POST", "/signup", true),
            ("POST", "/signup?x=1", true),
            ("POST", "/signup#f", true),
            ("GET", "/signup", false),
            ("post", "/signup", false),
            ("POST", "/signup/", false),
            ("POST", "/signupx", false),
            ("POST", "/", false),
        ] {
            assert_eq!(is_signup(&c, m.as_bytes(), p.as_bytes()), want, "{m} {p}");
        }
    }

    #[test]
    fn registration_call_shape() {
        let mut c = cfg();
        let call = registration_call(&c);
        let h: std::collections::HashMap<_, _> = call.headers.iter().cloned().collect();
        assert_eq!(h[":method"], "POST");
        assert_eq!(h[":path"], "/v1/registrations");
        assert_eq!(h[":authority"], "cp");
        assert_eq!(h["authorization"], "Bearer tok");
        assert_eq!(
            call.body.as_deref(),
            Some(&br#"{"resource_type":"mailbox"}"#[..])
        );
        c.location = Some("eu".into());
        assert_eq!(
            registration_call(&c).body.as_deref(),
            Some(&br#"{"resource_type":"mailbox","location":"eu"}"#[..])
        );
        let g = giveback_call(&c, &reg().consumer);
        assert!(g.headers.contains(&(":method", "DELETE".into())));
        assert!(g
            .headers
            .contains(&(":path", format!("/v1/registrations/{}", reg().consumer))));
        assert_eq!(g.body, None);
    }

    fn reply_of(o: RegistrationOutcome) -> (String, u32) {
        match o {
            RegistrationOutcome::Reply(r) | RegistrationOutcome::GiveBackAndReply(_, r) => {
                assert_eq!(r.status, 503);
                let e: ErrorBody = serde_json::from_str(&r.body).unwrap();
                assert!(!e.message.is_empty());
                (e.error, r.retry_after_s)
            }
            RegistrationOutcome::Forward(r) => panic!("forwarded {r:?}"),
        }
    }

    #[test]
    fn registration_answers() {
        let good = serde_json::to_vec(&reg()).unwrap();
        assert_eq!(
            on_registration_response(Some(201), None, &good, 5, 2000),
            RegistrationOutcome::Forward(reg())
        );
        let check = |status, retry: Option<&[u8]>, body: &[u8], want: (&str, u32)| {
            let got = reply_of(on_registration_response(status, retry, body, 5, 2000));
            assert_eq!(
                (got.0.as_str(), got.1),
                want,
                "{status:?} {:?}",
                String::from_utf8_lossy(body)
            );
        };
        check(None, None, b"", ("control_plane_unreachable", 5));
        check(Some(201), None, b"garbage", ("registration_invalid", 5));
        check(Some(200), None, &good, ("registration_failed", 5));
        check(
            Some(503),
            Some(b"7"),
            br#"{"error":"pool_empty","message":"no mailbox ready"}"#,
            ("pool_empty", 7),
        );
        check(
            Some(503),
            Some(b"0"),
            br#"{"error":"pool_empty","message":"m"}"#,
            ("pool_empty", 5),
        );
        check(
            Some(503),
            Some(b"99999"),
            b"",
            ("control_plane_unreachable", 5),
        );
        check(
            Some(502),
            None,
            b"upstream connect error or disconnect/reset before headers",
            ("control_plane_unreachable", 5),
        );
        check(
            Some(504),
            None,
            b"upstream request timeout",
            ("control_plane_unreachable", 5),
        );
        check(Some(429), None, b"", ("registration_failed", 5));
        check(
            Some(400),
            Some(b"x"),
            br#"{"error":"unknown_resource_type","message":"m"}"#,
            ("unknown_resource_type", 5),
        );
        check(
            Some(500),
            None,
            br#"{"error":"bad\nheader","message":"m"}"#,
            ("registration_failed", 5),
        );
        // A registration naming an unusable cluster is given back.
        let mut bad = reg();
        bad.cluster = "has space".into();
        let o =
            on_registration_response(Some(201), None, &serde_json::to_vec(&bad).unwrap(), 5, 2000);
        assert!(
            matches!(&o, RegistrationOutcome::GiveBackAndReply(c, _) if *c == reg().consumer),
            "{o:?}"
        );
        assert_eq!(reply_of(o).0, "registration_invalid");
    }

    #[test]
    fn forwarded_headers_and_cookie_claims() {
        let r = reg();
        assert_eq!(
            forward_headers(&r),
            [
                ("x-prealloc-consumer", r.consumer.as_str()),
                ("x-prealloc-resource", "mailbox-42"),
                ("x-prealloc-resource-type", "mailbox")
            ]
        );
        let c = signup_claims(&r, 100, 60);
        assert_eq!(c.state, ConsumerState::Registering);
        assert_eq!(c.replicas, vec!["manager_m1"]);
        assert_eq!(c.expires_at, 160);
        assert!(accepted(Some(200)) && accepted(Some(201)) && accepted(Some(299)));
        assert!(
            !accepted(Some(409)) && !accepted(Some(503)) && !accepted(None) && !accepted(Some(302))
        );
    }

    #[test]
    fn givebacks_retry_with_growing_delays_then_give_up() {
        let mut g = GiveBacks::default();
        let id = reg().consumer;
        g.push(id.clone(), 0);
        let mut now = 0;
        let mut attempts = vec![];
        loop {
            let due = g.take_due(now);
            if due.is_empty() {
                now += 100;
                continue;
            }
            assert_eq!(due.len(), 1);
            let (c, a) = due.into_iter().next().unwrap();
            attempts.push((a, now));
            match g.settle(c, a, Some(503), now) {
                GiveBackResult::Retry => {}
                GiveBackResult::Lost => break,
                GiveBackResult::Done => panic!("503 is not done"),
            }
        }
        assert_eq!(
            attempts,
            vec![(0, 0), (1, 1000), (2, 3000), (3, 7000), (4, 15000)]
        );
        assert!(g.is_empty());
        g.push(id.clone(), now);
        let (c, a) = g.take_due(now).pop().unwrap();
        assert_eq!(g.settle(c.clone(), a, Some(204), now), GiveBackResult::Done);
        assert_eq!(g.settle(c.clone(), a, Some(404), now), GiveBackResult::Done);
        assert_eq!(g.settle(c.clone(), a, Some(409), now), GiveBackResult::Done);
        assert_eq!(
            g.settle(c, a, None, now),
            GiveBackResult::Retry,
            "no answer is retried"
        );
        assert_eq!(g.len(), 1);
        assert!(g.take_due(now).is_empty(), "not due before its delay");
    }

    proptest! {
        #[test]
        fn registration_answers_never_panic(
            status in proptest::option::of(0u32..700),
            retry in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            match on_registration_response(status, retry.as_deref(), &body, 5, 10) {
                RegistrationOutcome::Forward(r) => {
                    prop_assert_eq!(status, Some(201));
                    prop_assert!(is_valid_cluster(&r.cluster));
                }
                RegistrationOutcome::Reply(r) | RegistrationOutcome::GiveBackAndReply(_, r) => {
                    prop_assert_eq!(r.status, 503);
                    prop_assert!((1..=MAX_RETRY_AFTER_S).contains(&r.retry_after_s));
                    prop_assert!(serde_json::from_str::<ErrorBody>(&r.body).is_ok());
                }
            }
        }
    }
}
