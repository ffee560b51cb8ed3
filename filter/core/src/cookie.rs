//! The consumer cookie: finding it in Cookie headers, and its signed value codec.
//!
//! Value layout (ARCHITECTURE.md): `<payload>.<mac>`, both unpadded base64url.
//! The payload is binary:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, [`FORMAT_VERSION`] |
//! | 1 | state: 0 registering, 1 registered |
//! | 8 | expiry, unix seconds, big-endian |
//! | 16 | consumer id (the 128 bits behind its base64url text) |
//! | 1 | number of replica clusters, 1..=[`MAX_REPLICAS`] |
//! | per replica: 1 + n | length n (1..=255), then the Envoy cluster name; first manager first |
//!
//! The MAC is HMAC-SHA256 over the payload bytes, truncated to its first 16
//! bytes. The first configured key signs; every configured key verifies, so
//! keys rotate by prepending the new one and removing the old one after
//! `max_age_s`. The MAC is checked (in constant time) before anything in the
//! payload is believed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use prealloc_wire::{ConsumerId, ConsumerState};
use sha2::Sha256;
use std::fmt;
use std::rc::Rc;

use crate::config::CookieConfig;
use crate::table::is_valid_cluster;

/// Current payload format version.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes of the truncated MAC.
pub const MAC_LEN: usize = 16;
/// Most replica clusters a cookie carries (keeps it far below browsers' 4 KiB).
pub const MAX_REPLICAS: usize = 16;
/// Longest cookie value accepted; longer ones are refused before any decoding.
pub const MAX_VALUE_LEN: usize = 3000;
/// At most this many same-named cookies are tried (each costs one MAC per key).
pub const MAX_CANDIDATES: usize = 4;

const HEADER_LEN: usize = 1 + 1 + 8 + 16 + 1;
const MAX_PAYLOAD_LEN: usize = MAX_VALUE_LEN * 3 / 4;

type HmacSha256 = Hmac<Sha256>;

/// What a verified cookie says about its consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub consumer: ConsumerId,
    pub state: ConsumerState,
    /// Unix seconds after which the cookie is refused.
    pub expires_at: u64,
    /// Envoy clusters of the replica set, first manager first (registering cookies: just it).
    pub replicas: Vec<String>,
}

impl Claims {
    /// The first manager: the one that received the sign-up and always holds the data.
    pub fn first_manager(&self) -> Option<&str> {
        self.replicas.first().map(String::as_str)
    }
}

/// Why a request's cookie was not accepted. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CookieError {
    /// No cookie of the configured name.
    Missing,
    /// Not `<base64url>.<base64url>`, too long, or a payload that does not decode.
    Malformed,
    /// No configured key produced this MAC: forged, tampered with, or signed by a removed key.
    BadMac,
    /// Authentic but past its expiry.
    Expired,
    /// Authentic but written in a format version this filter does not know.
    UnsupportedVersion,
}

impl CookieError {
    /// Every reason, for defining one counter each.
    pub const ALL: [CookieError; 5] = [
        CookieError::Missing,
        CookieError::Malformed,
        CookieError::BadMac,
        CookieError::Expired,
        CookieError::UnsupportedVersion,
    ];

    /// Stable snake_case name used in metric names.
    pub fn as_str(self) -> &'static str {
        match self {
            CookieError::Missing => "missing",
            CookieError::Malformed => "malformed",
            CookieError::BadMac => "bad_mac",
            CookieError::Expired => "expired",
            CookieError::UnsupportedVersion => "unsupported_version",
        }
    }

    /// Index into [`CookieError::ALL`].
    pub fn index(self) -> usize {
        match self {
            CookieError::Missing => 0,
            CookieError::Malformed => 1,
            CookieError::BadMac => 2,
            CookieError::Expired => 3,
            CookieError::UnsupportedVersion => 4,
        }
    }
}

impl fmt::Display for CookieError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CookieError::Missing => "no consumer cookie",
            CookieError::Malformed => "consumer cookie is malformed",
            CookieError::BadMac => "consumer cookie signature does not match any configured key",
            CookieError::Expired => "consumer cookie has expired",
            CookieError::UnsupportedVersion => "consumer cookie has an unknown format version",
        })
    }
}

impl std::error::Error for CookieError {}

/// Why [`try_sign`] cannot encode some claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    NoReplicas,
    TooManyReplicas(usize),
    BadCluster(String),
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignError::NoReplicas => f.write_str("a cookie needs at least the first manager"),
            SignError::TooManyReplicas(n) => {
                write!(f, "a cookie carries at most {MAX_REPLICAS} replicas, got {n}")
            }
            SignError::BadCluster(c) => write!(
                f,
                "cluster name {c:?} cannot go in a cookie (1..=255 bytes of visible ASCII, no , | ; \")"
            ),
        }
    }
}

impl std::error::Error for SignError {}

/// Signs claims into a cookie value; see [`try_sign`] for claims that cannot be encoded.
///
/// Returns an empty string (which never verifies) for claims [`try_sign`]
/// refuses, so that this contract-level API never panics.
pub fn sign(claims: &Claims, key: &[u8]) -> String {
    try_sign(claims, key).unwrap_or_default()
}

/// Signs claims into a cookie value, refusing claims that do not fit the format.
pub fn try_sign(claims: &Claims, key: &[u8]) -> Result<String, SignError> {
    if claims.replicas.is_empty() {
        return Err(SignError::NoReplicas);
    }
    if claims.replicas.len() > MAX_REPLICAS {
        return Err(SignError::TooManyReplicas(claims.replicas.len()));
    }
    if let Some(bad) = claims.replicas.iter().find(|c| !is_valid_cluster(c)) {
        return Err(SignError::BadCluster(bad.clone()));
    }
    let id = consumer_bytes(&claims.consumer);
    let mut payload =
        Vec::with_capacity(HEADER_LEN + claims.replicas.iter().map(|c| c.len() + 1).sum::<usize>());
    payload.push(FORMAT_VERSION);
    payload.push(match claims.state {
        ConsumerState::Registering => 0,
        ConsumerState::Registered => 1,
    });
    payload.extend_from_slice(&claims.expires_at.to_be_bytes());
    payload.extend_from_slice(&id);
    payload.push(claims.replicas.len() as u8);
    for c in &claims.replicas {
        payload.push(c.len() as u8);
        payload.extend_from_slice(c.as_bytes());
    }
    let mut out = URL_SAFE_NO_PAD.encode(&payload);
    out.push('.');
    let tag = mac(key, &payload);
    URL_SAFE_NO_PAD.encode_string(tag.get(..MAC_LEN).unwrap_or(&tag), &mut out);
    Ok(out)
}

fn mac(key: &[u8], payload: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(mut m) => {
            m.update(payload);
            m.finalize().into_bytes().into()
        }
        Err(_) => [0; 32],
    }
}

/// The 16 bytes behind a consumer id (a parsed [`ConsumerId`] always decodes).
fn consumer_bytes(id: &ConsumerId) -> [u8; 16] {
    let mut out = [0u8; 16];
    let _ = URL_SAFE_NO_PAD.decode_slice(id.as_str(), &mut out);
    out
}

/// Verifies a cookie value with any of `keys` and decodes its claims.
///
/// The filter itself uses a [`Verifier`] built once from its configuration,
/// which saves the per-key HMAC setup on every request.
pub fn verify(value: &str, keys: &[&[u8]], now_unix_s: u64) -> Result<Claims, CookieError> {
    verify_impl(value, now_unix_s, |payload, tag| {
        keys.iter()
            .any(|key| match HmacSha256::new_from_slice(key) {
                Ok(mut m) => {
                    m.update(payload);
                    m.verify_truncated_left(tag).is_ok()
                }
                Err(_) => false,
            })
    })
}

/// Pre-keyed MACs of the configured keys: the HMAC key schedule (two SHA-256
/// blocks per key) is computed once, and each request clones the state.
#[derive(Clone)]
pub struct Verifier {
    macs: Vec<HmacSha256>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier({} keys)", self.macs.len())
    }
}

impl Verifier {
    pub fn new(keys: &[&[u8]]) -> Self {
        Verifier {
            macs: keys
                .iter()
                .filter_map(|k| HmacSha256::new_from_slice(k).ok())
                .collect(),
        }
    }

    pub fn from_config(cfg: &CookieConfig) -> Self {
        Verifier {
            macs: cfg
                .keys
                .iter()
                .filter_map(|k| HmacSha256::new_from_slice(k).ok())
                .collect(),
        }
    }

    /// Same as [`verify`] with this verifier's keys.
    pub fn verify(&self, value: &str, now_unix_s: u64) -> Result<Claims, CookieError> {
        verify_impl(value, now_unix_s, |payload, tag| {
            self.macs.iter().any(|m| {
                let mut m = m.clone();
                m.update(payload);
                m.verify_truncated_left(tag).is_ok()
            })
        })
    }
}

fn verify_impl(
    value: &str,
    now_unix_s: u64,
    authentic: impl Fn(&[u8], &[u8]) -> bool,
) -> Result<Claims, CookieError> {
    if value.is_empty() {
        return Err(CookieError::Missing);
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(CookieError::Malformed);
    }
    let (payload_b64, mac_b64) = value.split_once('.').ok_or(CookieError::Malformed)?;
    // 16 bytes are 22 base64url characters; anything else (including a second '.') is malformed.
    if mac_b64.len() != 22 {
        return Err(CookieError::Malformed);
    }
    // Typical payloads are well under 256 bytes: a small stack buffer (zeroing
    // the largest possible one cost more than the MAC); the heap beyond that.
    let mut small = [0u8; 256];
    let mut large = Vec::new();
    let buf: &mut [u8] = if payload_b64.len() / 4 * 3 + 3 <= small.len() {
        &mut small
    } else {
        large.resize(MAX_PAYLOAD_LEN, 0);
        &mut large
    };
    let n = URL_SAFE_NO_PAD
        .decode_slice(payload_b64, buf)
        .map_err(|_| CookieError::Malformed)?;
    let payload = buf.get(..n).ok_or(CookieError::Malformed)?;
    let mut tag = [0u8; MAC_LEN + 2];
    let tn = URL_SAFE_NO_PAD
        .decode_slice(mac_b64, &mut tag)
        .map_err(|_| CookieError::Malformed)?;
    let tag = tag.get(..tn).ok_or(CookieError::Malformed)?;
    if tag.len() != MAC_LEN {
        return Err(CookieError::Malformed);
    }
    if !authentic(payload, tag) {
        return Err(CookieError::BadMac);
    }
    let claims = decode_payload(payload)?;
    if claims.expires_at <= now_unix_s {
        return Err(CookieError::Expired);
    }
    Ok(claims)
}

fn decode_payload(p: &[u8]) -> Result<Claims, CookieError> {
    let mut r = Reader(p);
    let version = r.byte()?;
    if version != FORMAT_VERSION {
        return Err(CookieError::UnsupportedVersion);
    }
    let state = match r.byte()? {
        0 => ConsumerState::Registering,
        1 => ConsumerState::Registered,
        _ => return Err(CookieError::Malformed),
    };
    let expires_at = u64::from_be_bytes(r.array::<8>()?);
    let consumer = ConsumerId::from_bytes(r.array::<16>()?);
    let count = usize::from(r.byte()?);
    if count == 0 || count > MAX_REPLICAS {
        return Err(CookieError::Malformed);
    }
    let mut replicas = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(r.byte()?);
        let name = std::str::from_utf8(r.take(len)?).map_err(|_| CookieError::Malformed)?;
        if !is_valid_cluster(name) {
            return Err(CookieError::Malformed);
        }
        replicas.push(name.to_owned());
    }
    if !r.0.is_empty() {
        return Err(CookieError::Malformed);
    }
    Ok(Claims {
        consumer,
        state,
        expires_at,
        replicas,
    })
}

/// A bounds-checked cursor: every read that runs past the end is `Malformed`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CookieError> {
        if n > self.0.len() {
            return Err(CookieError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, CookieError> {
        self.take(1)?.first().copied().ok_or(CookieError::Malformed)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CookieError> {
        self.take(N)?.try_into().map_err(|_| CookieError::Malformed)
    }
}

/// Cookie values one worker already verified, so a client's repeat cookie
/// (every request of a keep-alive client carries the same one) costs a keyed
/// hash and a constant-time comparison instead of base64, the MAC and the
/// payload decoding.
///
/// Direct-mapped: a slot holds an exact value and the claims it verified to;
/// only values that verified are kept, so a forged cookie pays the MAC every
/// time, as without the cache. A hit is re-checked for expiry. The hash is
/// keyed per process (`RandomState`), so which values share a slot cannot be
/// steered, and the comparison time does not depend on where values differ.
/// One cache belongs to one configuration's keys: a new configuration starts
/// a new cache.
#[derive(Debug)]
pub struct VerifiedCookies {
    slots: Vec<Option<Verified>>,
    keys: std::collections::hash_map::RandomState,
}

impl Default for VerifiedCookies {
    fn default() -> Self {
        VerifiedCookies::new(VerifiedCookies::SLOTS)
    }
}

impl VerifiedCookies {
    /// Slots per worker (each holds one cookie value and its claims).
    pub const SLOTS: usize = 256;

    pub fn new(slots: usize) -> Self {
        VerifiedCookies {
            slots: (0..slots.max(1)).map(|_| None).collect(),
            keys: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Same as `verifier.verify(value)`, answered from the cache when this
    /// exact value verified before and has not expired since (shared, not copied).
    pub fn verify(
        &mut self,
        verifier: &Verifier,
        value: &[u8],
        now_unix_s: u64,
    ) -> Result<Rc<Claims>, CookieError> {
        use std::hash::BuildHasher;
        let n = self.slots.len().max(1);
        let i = usize::try_from(self.keys.hash_one(value) % n as u64).unwrap_or(0);
        if let Some(Some((cached, claims))) = self.slots.get(i) {
            if claims.expires_at > now_unix_s && ct_eq(cached, value) {
                return Ok(Rc::clone(claims));
            }
        }
        let result = match std::str::from_utf8(value) {
            Ok(v) => verifier.verify(v, now_unix_s).map(Rc::new),
            Err(_) => Err(CookieError::Malformed),
        };
        if let (Ok(claims), Some(slot)) = (&result, self.slots.get_mut(i)) {
            *slot = Some((value.into(), Rc::clone(claims)));
        }
        result
    }
}

/// One cached cookie: the exact value, and the claims it verified to.
type Verified = (Box<[u8]>, Rc<Claims>);

/// Equal-length byte strings compared in time independent of their contents.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Values of every cookie named `name`, in the order the client sent them,
/// across several `Cookie` header values (raw bytes, as the host hands them over).
///
/// Parsing follows what browsers send (RFC 6265 §5.4 and real-world leniency):
/// pairs are separated by `;`, optional spaces/tabs around names and values are
/// ignored, a pair without `=` is skipped, names compare case-sensitively, and a
/// value wrapped in double quotes is unwrapped. Bytes outside ASCII are
/// tolerated anywhere (they only make that one value fail to verify). Browsers
/// list cookies with longer paths first, so when the same name appears more
/// than once the first is the most specific; the filter tries candidates in
/// this order and the first one that verifies wins (see [`verify_first`]).
pub fn cookie_values<'a, I>(headers: I, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: 'a,
{
    headers
        .into_iter()
        .flat_map(|h| h.split(|&b| b == b';'))
        .filter_map(move |pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = pair.split_at(eq);
            if trim_ows(n) != name.as_bytes() {
                return None;
            }
            let v = trim_ows(v.get(1..).unwrap_or_default());
            Some(match v {
                [b'"', inner @ .., b'"'] => inner,
                _ => v,
            })
        })
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Finds and verifies the consumer cookie in a request's `Cookie` header values.
///
/// Tries at most [`MAX_CANDIDATES`] cookies of the configured name in order;
/// the first that verifies wins. When none does, the error is the first
/// candidate's (or [`CookieError::Missing`] when there is none).
pub fn verify_first<'a, I>(
    cookie_headers: I,
    name: &'a str,
    verifier: &Verifier,
    now_unix_s: u64,
) -> Result<Claims, CookieError>
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: 'a,
{
    verify_first_cached(cookie_headers, name, verifier, None, now_unix_s)
        .map(|c| Rc::try_unwrap(c).unwrap_or_else(|shared| (*shared).clone()))
}

/// [`verify_first`], answering repeat values from a worker's [`VerifiedCookies`].
pub fn verify_first_cached<'a, I>(
    cookie_headers: I,
    name: &'a str,
    verifier: &Verifier,
    mut cache: Option<&mut VerifiedCookies>,
    now_unix_s: u64,
) -> Result<Rc<Claims>, CookieError>
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: 'a,
{
    let mut first_err = None;
    for value in cookie_values(cookie_headers, name).take(MAX_CANDIDATES) {
        let result = match (&mut cache, std::str::from_utf8(value)) {
            (Some(c), _) => c.verify(verifier, value, now_unix_s),
            (None, Ok(v)) => verifier.verify(v, now_unix_s).map(Rc::new),
            (None, Err(_)) => Err(CookieError::Malformed),
        };
        match result {
            Ok(c) => return Ok(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or(CookieError::Missing))
}

/// The `Set-Cookie` header value for a signed cookie value, with the configured attributes.
pub fn set_cookie_header(cfg: &CookieConfig, value: &str) -> String {
    let mut s = String::with_capacity(cfg.name.len() + value.len() + 80);
    s.push_str(&cfg.name);
    s.push('=');
    s.push_str(value);
    s.push_str("; Path=");
    s.push_str(&cfg.path);
    s.push_str("; Max-Age=");
    s.push_str(&cfg.max_age_s.to_string());
    if cfg.http_only {
        s.push_str("; HttpOnly");
    }
    if cfg.secure {
        s.push_str("; Secure");
    }
    s.push_str("; SameSite=");
    s.push_str(cfg.same_site.as_str());
    s
}

/// Signs a fresh cookie for `claims` with the configured signing key (the first).
pub fn sign_with_config(cfg: &CookieConfig, claims: &Claims) -> Result<String, SignError> {
    let key = cfg.keys.first().map(Vec::as_slice).unwrap_or(&[]);
    try_sign(claims, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SameSite;
    use proptest::prelude::*;

    const K1: &[u8] = b"0123456789abcdef0123456789abcdef";
    const K2: &[u8] = b"fedcba9876543210fedcba9876543210";
    const NOW: u64 = 1_700_000_000;

    fn claims(state: ConsumerState, replicas: &[&str]) -> Claims {
        Claims {
            consumer: ConsumerId::from_bytes([7; 16]),
            state,
            expires_at: NOW + 3600,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn registering() -> Claims {
        claims(ConsumerState::Registering, &["manager_m1"])
    }

    #[test]
    fn sign_then_verify_round_trips() {
        for c in [
            registering(),
            claims(
                ConsumerState::Registered,
                &["manager_m1", "manager_m2", "manager_m3"],
            ),
        ] {
            let v = sign(&c, K1);
            assert_eq!(verify(&v, &[K1], NOW), Ok(c));
            assert!(
                v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "{v}"
            );
        }
    }

    #[test]
    fn registering_cookie_is_compact() {
        let v = sign(&registering(), K1);
        // 27 header bytes + 11 for "manager_m1" = 38 bytes -> 51 chars, '.', 22 chars.
        assert_eq!(v.len(), 51 + 1 + 22, "{v}");
    }

    #[test]
    fn key_rotation_every_key_verifies_first_signs() {
        let old = sign(&registering(), K2);
        assert_eq!(verify(&old, &[K1, K2], NOW), Ok(registering()));
        assert_eq!(verify(&old, &[K1], NOW), Err(CookieError::BadMac));
        let cfg = cookie_cfg(vec![K1.to_vec(), K2.to_vec()]);
        let new = sign_with_config(&cfg, &registering()).unwrap();
        assert_eq!(verify(&new, &[K1], NOW), Ok(registering()));
    }

    #[test]
    fn rejection_reasons() {
        let good = sign(&registering(), K1);
        let (p, m) = good.split_once('.').unwrap();
        let expired = sign(
            &Claims {
                expires_at: NOW,
                ..registering()
            },
            K1,
        );
        let long = "a".repeat(MAX_VALUE_LEN + 1);
        let mut v2 = URL_SAFE_NO_PAD.decode(p).unwrap();
        v2[0] = 2;
        let v2 = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&v2),
            URL_SAFE_NO_PAD.encode(&mac(K1, &v2)[..16])
        );
        let cases: Vec<(String, CookieError)> = vec![
            (String::new(), CookieError::Missing),
            ("garbage".into(), CookieError::Malformed),
            (p.to_string(), CookieError::Malformed),
            (format!("{p}.{m}.x"), CookieError::Malformed),
            (format!("{p}={m}"), CookieError::Malformed),
            (format!("{p}.{}", &m[..21]), CookieError::Malformed),
            (format!("{p}.AAAAAAAAAAAAAAAAAAAAAA"), CookieError::BadMac),
            (format!("A{p}.{m}"), CookieError::BadMac),
            (format!("{p}AA.{m}"), CookieError::Malformed),
            (format!("{p}!.{m}"), CookieError::Malformed),
            (long, CookieError::Malformed),
            (expired, CookieError::Expired),
            (v2, CookieError::UnsupportedVersion),
        ];
        for (value, want) in cases {
            assert_eq!(verify(&value, &[K1], NOW), Err(want), "{value:?}");
        }
    }

    #[test]
    fn authentic_but_nonsensical_payloads_are_malformed() {
        // A holder of the key could still write nonsense; decoding must refuse it, not panic.
        let base = |tail: &[u8]| {
            let mut p = vec![1u8, 0];
            p.extend_from_slice(&(NOW + 10).to_be_bytes());
            p.extend_from_slice(&[0; 16]);
            p.extend_from_slice(tail);
            format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(&p),
                URL_SAFE_NO_PAD.encode(&mac(K1, &p)[..16])
            )
        };
        for tail in [
            &[][..],
            &[0],
            &[1, 0],
            &[1, 5, b'a'],
            &[1, 1, b'a', b'x'],
            &[1, 1, b','],
            &[1, 2, 0xff, 0xfe],
            &[17],
        ] {
            assert_eq!(
                verify(&base(tail), &[K1], NOW),
                Err(CookieError::Malformed),
                "{tail:?}"
            );
        }
        assert!(verify(&base(&[1, 1, b'a']), &[K1], NOW).is_ok());
    }

    #[test]
    fn sign_refuses_unencodable_claims() {
        let too_many: Vec<String> = (0..17).map(|i| format!("m{i}")).collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        for (c, want) in [
            (
                claims(ConsumerState::Registered, &[]),
                SignError::NoReplicas,
            ),
            (
                claims(ConsumerState::Registered, &too_many),
                SignError::TooManyReplicas(17),
            ),
            (
                claims(ConsumerState::Registered, &["a,b"]),
                SignError::BadCluster("a,b".into()),
            ),
        ] {
            assert_eq!(try_sign(&c, K1), Err(want));
            assert_eq!(sign(&c, K1), "");
        }
    }

    #[test]
    fn finds_cookies_as_browsers_send_them() {
        let check = |headers: &[&str], want: &[&str]| {
            let got: Vec<&[u8]> =
                cookie_values(headers.iter().map(|h| h.as_bytes()), "prealloc").collect();
            let want: Vec<&[u8]> = want.iter().map(|w| w.as_bytes()).collect();
            assert_eq!(got, want, "{headers:?}");
        };
        check(&["prealloc=abc"], &["abc"]);
        check(&["a=1; prealloc=abc; b=2"], &["abc"]);
        check(&["a=1;prealloc=abc;b=2"], &["abc"]);
        check(&["a=1", "b=2; prealloc=x"], &["x"]);
        check(&[" prealloc = \"q.v\" "], &["q.v"]);
        check(&["prealloc=\""], &["\""]);
        check(&["prealloc=a=b"], &["a=b"]);
        check(
            &["prealloc=first; prealloc=second", "prealloc=third"],
            &["first", "second", "third"],
        );
        check(&["Prealloc=x; prealloc2=y; xprealloc=z"], &[]);
        check(&["prealloc; =prealloc; ;;"], &[]);
        check(&["prealloc="], &[""]);
        check(&["\tprealloc\t=\tv\t"], &["v"]);
        check(&[], &[]);
        // Bytes outside ASCII elsewhere in the header do not hide the cookie.
        let raw: &[u8] = b"x=\xff\xfe; prealloc=v";
        assert_eq!(
            cookie_values([raw], "prealloc").collect::<Vec<_>>(),
            vec![&b"v"[..]]
        );
        let raw: &[u8] = b"prealloc=\xff";
        assert_eq!(
            verify_first([raw], "prealloc", &Verifier::new(&[K1]), NOW),
            Err(CookieError::Malformed)
        );
    }

    #[test]
    fn first_verifying_candidate_wins() {
        let good = sign(&registering(), K1);
        let h = format!("prealloc=forged.AAAAAAAAAAAAAAAAAAAAAA; prealloc={good}");
        assert_eq!(
            verify_first([h.as_bytes()], "prealloc", &Verifier::new(&[K1]), NOW),
            Ok(registering())
        );
        let bad = "prealloc=x; prealloc=y";
        assert_eq!(
            verify_first([bad.as_bytes()], "prealloc", &Verifier::new(&[K1]), NOW),
            Err(CookieError::Malformed)
        );
        assert_eq!(
            verify_first([&b"other=1"[..]], "prealloc", &Verifier::new(&[K1]), NOW),
            Err(CookieError::Missing)
        );
        // An empty value counts as a missing cookie.
        assert_eq!(
            verify_first([&b"prealloc="[..]], "prealloc", &Verifier::new(&[K1]), NOW),
            Err(CookieError::Missing)
        );
        // Only the first MAX_CANDIDATES are tried.
        let many = format!("prealloc=a; prealloc=b; prealloc=c; prealloc=d; prealloc={good}");
        assert_eq!(
            verify_first([many.as_bytes()], "prealloc", &Verifier::new(&[K1]), NOW),
            Err(CookieError::Malformed)
        );
    }

    fn cookie_cfg(keys: Vec<Vec<u8>>) -> CookieConfig {
        CookieConfig {
            name: "prealloc".into(),
            keys,
            max_age_s: 60,
            path: "/".into(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
        }
    }

    #[test]
    fn set_cookie_attributes() {
        let mut cfg = cookie_cfg(vec![K1.to_vec()]);
        assert_eq!(
            set_cookie_header(&cfg, "v.m"),
            "prealloc=v.m; Path=/; Max-Age=60; HttpOnly; Secure; SameSite=Lax"
        );
        cfg.secure = false;
        cfg.http_only = false;
        cfg.same_site = SameSite::Strict;
        cfg.path = "/app".into();
        assert_eq!(
            set_cookie_header(&cfg, "v"),
            "prealloc=v; Path=/app; Max-Age=60; SameSite=Strict"
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(
            headers in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..4),
            name in ".*",
        ) {
            let n = cookie_values(headers.iter().map(Vec::as_slice), &name).count();
            prop_assert!(n <= headers.iter().flatten().filter(|&&b| b == b'=').count());
            let _ = verify_first(headers.iter().map(Vec::as_slice), &name, &Verifier::new(&[K1]), NOW);
        }

        #[test]
        fn parser_never_panics_on_cookie_shaped_text(h in "[a-z=;\" \t]{0,40}") {
            let _ = verify_first([h.as_bytes()], "a", &Verifier::new(&[K1]), NOW);
        }

        #[test]
        fn verify_never_panics_on_strings(value in ".{0,200}") {
            let _ = verify(&value, &[K1], NOW);
        }

        #[test]
        fn verify_never_panics_on_base64_shaped_input(
            p in proptest::collection::vec(any::<u8>(), 0..300),
            m in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let v = format!("{}.{}", URL_SAFE_NO_PAD.encode(&p), URL_SAFE_NO_PAD.encode(&m));
            prop_assert!(verify(&v, &[K1], NOW).is_err() || m.len() == MAC_LEN);
            // With a correct MAC the payload parser sees arbitrary bytes too.
            let v = format!("{}.{}", URL_SAFE_NO_PAD.encode(&p), URL_SAFE_NO_PAD.encode(&mac(K1, &p)[..16]));
            let _ = verify(&v, &[K1], NOW);
        }

        #[test]
        fn sign_verify_round_trip(
            id in any::<[u8; 16]>(),
            registered in any::<bool>(),
            expires in (NOW + 1)..u64::MAX,
            replicas in proptest::collection::vec("[a-zA-Z0-9_.:-]{1,40}", 1..=MAX_REPLICAS),
        ) {
            let c = Claims {
                consumer: ConsumerId::from_bytes(id),
                state: if registered { ConsumerState::Registered } else { ConsumerState::Registering },
                expires_at: expires,
                replicas,
            };
            let v = sign(&c, K1);
            prop_assert_eq!(verify(&v, &[K2, K1], NOW), Ok(c.clone()));
            prop_assert_eq!(Verifier::new(&[K2, K1]).verify(&v, NOW), Ok(c));
        }

        #[test]
        fn tampering_any_byte_is_rejected(pos in any::<prop::sample::Index>(), replacement in any::<u8>()) {
            let c = claims(ConsumerState::Registered, &["manager_a", "manager_b"]);
            let v = sign(&c, K1);
            let mut bytes = v.clone().into_bytes();
            let i = pos.index(bytes.len());
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            let tampered = String::from_utf8_lossy(&bytes).into_owned();
            // The base64 decoder refuses non-canonical trailing bits, so even a
            // change in a last character's slack bits is caught.
            prop_assert!(verify(&tampered, &[K1], NOW).is_err(), "{} accepted", tampered);
            prop_assert!(Verifier::new(&[K1]).verify(&tampered, NOW).is_err(), "{} accepted", tampered);
        }
    }

    #[test]
    fn the_verified_cookie_cache_answers_exactly_what_verification_answers() {
        let v = Verifier::new(&[K1]);
        let mut cache = VerifiedCookies::new(4);
        let c = registering();
        let good = sign(&c, K1);
        // A miss verifies, a hit answers the same claims.
        assert_eq!(
            cache.verify(&v, good.as_bytes(), NOW),
            Ok(Rc::new(c.clone()))
        );
        assert_eq!(
            cache.verify(&v, good.as_bytes(), NOW),
            Ok(Rc::new(c.clone()))
        );
        // Past its expiry a cached value is expired, as without the cache.
        assert_eq!(
            cache.verify(&v, good.as_bytes(), c.expires_at),
            Err(CookieError::Expired)
        );
        // A value differing in one byte is not the cached one.
        let mut forged = good.clone().into_bytes();
        let at = good.find('.').unwrap() + 1;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        assert_eq!(cache.verify(&v, &forged, NOW), Err(CookieError::BadMac));
        // Failures are not cached: the good value still verifies afterwards.
        assert_eq!(cache.verify(&v, good.as_bytes(), NOW), Ok(Rc::new(c)));
        assert_eq!(
            cache.verify(&v, b"\xff\xfe", NOW),
            Err(CookieError::Malformed)
        );
    }

    proptest! {
        /// Through any sequence of values (some repeated, some forged, some
        /// expired), the cache answers what plain verification answers.
        #[test]
        fn the_cache_never_changes_an_answer(
            picks in prop::collection::vec((0usize..6, 0u64..3), 1..60),
        ) {
            let v = Verifier::new(&[K1]);
            let mut cache = VerifiedCookies::new(3);
            let values: Vec<String> = (0u8..6)
                .map(|n| {
                    let mut c = registering();
                    c.consumer = ConsumerId::from_bytes([n; 16]);
                    c.expires_at = NOW + u64::from(n % 3);
                    if n == 5 { sign(&c, K2) } else { sign(&c, K1) }
                })
                .collect();
            for (i, dt) in picks {
                let now = NOW - 1 + dt;
                let value = &values[i];
                prop_assert_eq!(cache.verify(&v, value.as_bytes(), now), v.verify(value, now).map(Rc::new));
            }
        }
    }
}
