//! The wire contract shared by the filter (and its poller) and the control plane.
//!
//! Everything that crosses the network between the data plane and the control
//! plane is defined here, once, so that both sides compile against the same
//! types. All bodies are JSON. Every request carries `Authorization: Bearer <token>`.
//!
//! # Routes push (flow 6)
//!
//! `GET /v1/routes?protocol=2&since=<version>&epoch=<epoch>&wait_ms=<ms>[&after=<consumer>]`
//! (see [`RoutesQuery`]) answers a [`RoutesResponse`]. `protocol` is
//! [`ROUTES_PROTOCOL`]; a query without it (a poller of an older release) or
//! with another number gets `400` with error `unsupported_protocol`, and every
//! response says its `protocol`, so neither side ever misreads the other.
//!
//! The answer is:
//! - at once with a [`RoutesKind::Delta`] when there are changes after `since`
//!   within `epoch`. A delta holds at most a page of changes: when more
//!   happened, it stops at an earlier committed version (its `version`), and
//!   the next poll continues from there at once; when the first commit after
//!   `since` alone holds more than a page, the answer is the first page of a
//!   new snapshot instead;
//! - at once with the first page of a [`RoutesKind::Full`] snapshot when
//!   `since` is 0, when `epoch` is not the control plane's epoch, or when
//!   `since` is older than the oldest change the control plane still
//!   remembers (a gap);
//! - with the next page of a snapshot when `after` names the cursor of the
//!   page before (`next` of its response) within `epoch`;
//! - otherwise after holding the request up to `wait_ms` (server-capped), with
//!   [`RoutesKind::Unchanged`] if nothing happened meanwhile.
//!
//! A snapshot is paged: each page holds the entries of the consumers whose id
//! (as its 16 bytes, [`ConsumerId::to_bytes`]) comes after `after` and up to
//! `next`, in that byte order, with at most the control plane's page size of
//! entries (`push.page_entries`: a page stays far below Envoy's default
//! 32 MiB callout buffer). Every page carries the snapshot's `version` (the
//! table's version when its first page was cut); the last page has no
//! `next`. Pages are cut from the live table, so a client that read the last
//! page then polls `since=<version>` and gets, as a delta, every change made
//! while it was paging (the control plane keeps those changes while a
//! snapshot's pages are being asked for, up to ten times `push.change_log`;
//! a continuation whose changes are forgotten gets a new first page).
//!
//! A client applies a response by: replacing its manager list with
//! `managers`; for a snapshot page, writing `upsert` and dropping the entries
//! it holds in the page's id range (`after`, `next`] that the page does not
//! have; for a delta, upserting `upsert` and dropping `remove`; then
//! remembering `epoch` and `version` for its next `since` (for a snapshot,
//! once its last page is applied). Each entry written is a value the control
//! plane committed, and an entry's replicas only grow, so a table half-way
//! through a snapshot or a delta routes nobody to a manager without the data.
//!
//! # Registrations (flow 2)
//!
//! `POST /v1/registrations` with a [`RegistrationRequest`] answers `201` with a
//! [`Registration`]; `503` + `Retry-After` with an [`ErrorBody`] when the pool is
//! empty; `400` with an [`ErrorBody`] for an unknown resource type or location.
//! `DELETE /v1/registrations/{consumer}` gives the resource back (`204`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The version of the routes protocol: query parameter `protocol` and
/// response field `protocol`. Version 1 (unversioned, one-piece snapshots)
/// is refused on both sides.
pub const ROUTES_PROTOCOL: u32 = 2;

/// Path of the routes long-poll endpoint.
pub const ROUTES_PATH: &str = "/v1/routes";
/// Path of the registrations endpoint.
pub const REGISTRATIONS_PATH: &str = "/v1/registrations";

/// Header naming the consumer on a sign-up request forwarded to its first manager.
pub const HEADER_CONSUMER: &str = "x-prealloc-consumer";
/// Header naming the pre-allocated resource (its name) on a forwarded sign-up.
pub const HEADER_RESOURCE: &str = "x-prealloc-resource";
/// Header naming the resource type on a forwarded sign-up.
pub const HEADER_RESOURCE_TYPE: &str = "x-prealloc-resource-type";
/// Every header starting with this prefix is removed from client requests.
pub const RESERVED_HEADER_PREFIX: &str = "x-prealloc-";

/// A consumer id: 128 random bits, encoded as 22 characters of unpadded
/// base64url (`A-Z a-z 0-9 - _`). Parsing checks the shape, never the origin.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConsumerId(String);

/// Length of an encoded [`ConsumerId`].
pub const CONSUMER_ID_LEN: usize = 22;

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

impl ConsumerId {
    /// Encodes 16 random bytes as a consumer id.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut out = String::with_capacity(CONSUMER_ID_LEN);
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        for b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 6 {
                bits -= 6;
                out.push(B64URL[((acc >> bits) & 63) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(B64URL[((acc << (6 - bits)) & 63) as usize] as char);
        }
        ConsumerId(out)
    }

    /// Parses an encoded id; see [`ConsumerIdError`] for what is refused.
    pub fn parse(s: &str) -> Result<Self, ConsumerIdError> {
        check(s)?;
        Ok(ConsumerId(s.to_owned()))
    }

    /// The 16 bytes of an encoded id, checked as [`ConsumerId::parse`] does,
    /// without allocating (the poller reads a page of ids this way).
    pub fn parse_bytes(s: &str) -> Result<[u8; 16], ConsumerIdError> {
        check(s)?;
        Ok(decode(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 16 bytes behind the id (the inverse of [`ConsumerId::from_bytes`]).
    pub fn to_bytes(&self) -> [u8; 16] {
        decode(&self.0)
    }
}

/// Checks the shape of an encoded id.
fn check(s: &str) -> Result<(), ConsumerIdError> {
    if s.len() != CONSUMER_ID_LEN {
        return Err(ConsumerIdError::Length(s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConsumerIdError::Alphabet);
    }
    // 22 chars carry 132 bits; the last char's low 4 bits must be zero for a
    // canonical 128-bit encoding.
    let last = s.as_bytes()[CONSUMER_ID_LEN - 1];
    let pos = B64URL.iter().position(|&c| c == last).unwrap_or(0);
    if pos & 0b1111 != 0 {
        return Err(ConsumerIdError::NotCanonical);
    }
    Ok(())
}

/// The bytes of a checked encoding (any other input decodes to something, never panics).
fn decode(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut n = 0usize;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            _ => 63,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if let Some(slot) = out.get_mut(n) {
                *slot = (acc >> bits) as u8;
            }
            n += 1;
        }
    }
    out
}

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConsumerId({})", self.0)
    }
}

impl TryFrom<String> for ConsumerId {
    type Error = ConsumerIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ConsumerId::parse(&s)
    }
}

impl From<ConsumerId> for String {
    fn from(id: ConsumerId) -> String {
        id.0
    }
}

/// Why a string is not a [`ConsumerId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerIdError {
    Length(usize),
    Alphabet,
    NotCanonical,
}

impl fmt::Display for ConsumerIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsumerIdError::Length(n) => write!(
                f,
                "consumer id must be {CONSUMER_ID_LEN} characters of base64url, got {n}"
            ),
            ConsumerIdError::Alphabet => {
                f.write_str("consumer id may only contain A-Z a-z 0-9 - _")
            }
            ConsumerIdError::NotCanonical => {
                f.write_str("consumer id is not the canonical encoding of 128 bits")
            }
        }
    }
}

impl std::error::Error for ConsumerIdError {}

/// Whether a manager takes traffic and new resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes requests and new resources.
    Available,
    /// Takes requests of consumers it holds, but no new resources.
    Draining,
    /// Takes nothing; routing skips it where another replica exists.
    Down,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::Draining => "draining",
            Availability::Down => "down",
        }
    }
}

impl std::str::FromStr for Availability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "available" => Ok(Availability::Available),
            "draining" => Ok(Availability::Draining),
            "down" => Ok(Availability::Down),
            other => Err(format!(
                "unknown availability {other:?}: expected available, draining or down"
            )),
        }
    }
}

/// Where a consumer is in its replication window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerState {
    /// Signed up; data not yet on every target manager.
    Registering,
    /// Data on every target manager.
    Registered,
}

impl ConsumerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerState::Registering => "registering",
            ConsumerState::Registered => "registered",
        }
    }
}

/// Query of `GET /v1/routes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesQuery {
    /// The last version the client applied; 0 asks for a full snapshot.
    pub since: u64,
    /// The epoch of that version; absent or different forces a full snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// How long the server may hold the request when nothing changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Who polls: the Envoy's node id (see [`is_valid_node`]), so the control
    /// plane can show which Envoys are connected and what table each holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Asks for the snapshot page after this cursor (the `next` of the page
    /// before); `since` and `epoch` are then the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<ConsumerId>,
}

/// Longest node id a poller may send.
pub const MAX_NODE_LEN: usize = 128;

/// A node id: 1..=[`MAX_NODE_LEN`] characters of `A-Z a-z 0-9 . _ ~ -` (safe
/// in a query string and in a log line as they are).
pub fn is_valid_node(node: &str) -> bool {
    (1..=MAX_NODE_LEN).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
}

impl RoutesQuery {
    /// The path and query string of this request, e.g.
    /// `/v1/routes?protocol=2&since=4&epoch=x&wait_ms=30000`.
    pub fn to_path(&self) -> String {
        let mut p = format!(
            "{ROUTES_PATH}?protocol={ROUTES_PROTOCOL}&since={}",
            self.since
        );
        if let Some(e) = &self.epoch {
            p.push_str("&epoch=");
            p.push_str(e);
        }
        if let Some(w) = self.wait_ms {
            p.push_str(&format!("&wait_ms={w}"));
        }
        if let Some(n) = &self.node {
            p.push_str("&node=");
            p.push_str(n);
        }
        if let Some(a) = &self.after {
            p.push_str("&after=");
            p.push_str(a.as_str());
        }
        p
    }
}

/// What kind of answer a [`RoutesResponse`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutesKind {
    /// A page of the whole table: every entry in the page's id range that is
    /// not in `upsert` must be dropped.
    Full,
    /// Changes after `since`: apply `upsert` and `remove`.
    Delta,
    /// Nothing changed during the wait; `version` equals `since`.
    Unchanged,
}

/// Answer of `GET /v1/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesResponse {
    /// [`ROUTES_PROTOCOL`]; absent (0) from a control plane of an older release.
    #[serde(default)]
    pub protocol: u32,
    /// Identifies one control-plane database; stable across restarts.
    pub epoch: String,
    /// Version of the table after this response is applied.
    pub version: u64,
    pub kind: RoutesKind,
    /// Every manager, always complete (it is small).
    pub managers: Vec<ManagerRoute>,
    /// Entries to insert or replace.
    #[serde(default)]
    pub upsert: Vec<RouteEntry>,
    /// Consumers whose entries leave the table (delta only).
    #[serde(default)]
    pub remove: Vec<ConsumerId>,
    /// Snapshot page: the cursor this page starts after; absent on the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<ConsumerId>,
    /// Snapshot page: the cursor of the next page (the last id this page
    /// covers); absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<ConsumerId>,
}

/// A manager as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerRoute {
    pub id: String,
    /// The Envoy cluster that reaches this manager.
    pub cluster: String,
    pub location: String,
    pub availability: Availability,
}

/// One consumer's routing entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub consumer: ConsumerId,
    pub state: ConsumerState,
    /// Manager ids known to hold the consumer's data; the first manager first.
    pub replicas: Vec<String>,
}

/// Body of `POST /v1/registrations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationRequest {
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// Answer of `POST /v1/registrations`: a new consumer and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub consumer: ConsumerId,
    /// The first manager's id.
    pub manager: String,
    /// The first manager's Envoy cluster.
    pub cluster: String,
    pub resource: ResourceRef,
}

/// A resource handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRef {
    pub id: u64,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub location: String,
}

/// Body of `POST /v1/consumers/{id}/replicas`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaReport {
    pub manager: String,
}

/// Body of `PUT /v1/managers/{id}/availability`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityUpdate {
    pub availability: Availability,
}

/// Every error answer of the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `pool_empty`, `unknown_resource_type`.
    pub error: String,
    /// What was wrong and what to do, for a human.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_id_round_trips_and_is_url_safe() {
        for seed in [0u8, 1, 0x7f, 0xfe, 0xff] {
            let id = ConsumerId::from_bytes([seed; 16]);
            assert_eq!(id.as_str().len(), CONSUMER_ID_LEN);
            assert_eq!(ConsumerId::parse(id.as_str()), Ok(id.clone()));
        }
        assert_eq!(
            ConsumerId::from_bytes([0xff; 16]).as_str(),
            "_____________________w"
        );
    }

    #[test]
    fn consumer_id_refuses_bad_shapes() {
        assert_eq!(ConsumerId::parse("abc"), Err(ConsumerIdError::Length(3)));
        assert_eq!(
            ConsumerId::parse("AAAAAAAAAAAAAAAAAAAAA="),
            Err(ConsumerIdError::Alphabet)
        );
        assert_eq!(
            ConsumerId::parse("AAAAAAAAAAAAAAAAAAAAAB"),
            Err(ConsumerIdError::NotCanonical)
        );
    }

    #[test]
    fn routes_response_json_shape() {
        let json = r#"{"epoch":"e1","version":7,"kind":"delta",
            "managers":[{"id":"m1","cluster":"manager_m1","location":"eu","availability":"down"}],
            "upsert":[{"consumer":"AAAAAAAAAAAAAAAAAAAAAA","state":"registering","replicas":["m1"]}],
            "remove":[]}"#;
        let r: RoutesResponse = serde_json::from_str(json).unwrap();
        assert_eq!(r.kind, RoutesKind::Delta);
        assert_eq!(r.managers[0].availability, Availability::Down);
        assert_eq!(r.upsert[0].state, ConsumerState::Registering);
        let bad = json.replace("AAAAAAAAAAAAAAAAAAAAAA", "short");
        assert!(serde_json::from_str::<RoutesResponse>(&bad).is_err());
    }

    #[test]
    fn routes_query_path() {
        let mut q = RoutesQuery {
            since: 4,
            epoch: Some("e".into()),
            wait_ms: Some(100),
            node: None,
            after: None,
        };
        assert_eq!(
            q.to_path(),
            "/v1/routes?protocol=2&since=4&epoch=e&wait_ms=100"
        );
        q.node = Some("edge-1.eu".into());
        q.after = Some(ConsumerId::from_bytes([0; 16]));
        assert_eq!(
            q.to_path(),
            "/v1/routes?protocol=2&since=4&epoch=e&wait_ms=100&node=edge-1.eu&after=AAAAAAAAAAAAAAAAAAAAAA"
        );
    }

    #[test]
    fn node_ids_are_short_and_url_safe() {
        for ok in ["a", "edge-1.eu_west~2", &"n".repeat(MAX_NODE_LEN)] {
            assert!(is_valid_node(ok), "{ok}");
        }
        for bad in ["", "a b", "a&b", "a=b", "é", &"n".repeat(MAX_NODE_LEN + 1)] {
            assert!(!is_valid_node(bad), "{bad}");
        }
    }

    #[test]
    fn consumer_id_bytes_parse_like_ids() {
        let id = ConsumerId::from_bytes([9; 16]);
        assert_eq!(ConsumerId::parse_bytes(id.as_str()), Ok([9; 16]));
        for bad in ["abc", "AAAAAAAAAAAAAAAAAAAAA=", "AAAAAAAAAAAAAAAAAAAAAB"] {
            assert_eq!(
                ConsumerId::parse_bytes(bad),
                ConsumerId::parse(bad).map(|c| c.to_bytes())
            );
            assert!(ConsumerId::parse_bytes(bad).is_err());
        }
    }

    #[test]
    fn consumer_id_bytes_round_trip() {
        for seed in 0u8..=255 {
            let bytes: [u8; 16] =
                std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8 * 17));
            let id = ConsumerId::from_bytes(bytes);
            assert_eq!(id.to_bytes(), bytes);
            assert_eq!(ConsumerId::parse(id.as_str()).unwrap().to_bytes(), bytes);
        }
    }
}
