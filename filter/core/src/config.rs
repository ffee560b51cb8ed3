//! Plugin configuration: the JSON the operator writes, parsed and validated into checked types.
//!
//! One `.wasm`, two roles: `{"filter": {...}}` configures the HTTP filter and
//! `{"poller": {...}}` the singleton poller. Parsing refuses unknown fields;
//! validation turns the raw structs into [`FilterConfig`] / [`PollerConfig`],
//! whose fields hold only values the rest of the filter can use without
//! further checks. Every error names the offending field.

use crate::table::is_valid_cluster;
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// Default cookie name.
pub const DEFAULT_COOKIE_NAME: &str = "prealloc";
/// Default route header, read by the route's `cluster_header`.
pub const DEFAULT_ROUTE_HEADER: &str = "x-prealloc-cluster";
/// Smallest accepted cookie key, in bytes (HMAC-SHA256 wants at least 256 bits).
pub const MIN_KEY_LEN: usize = 32;
/// Most cookie keys accepted (every key costs one MAC on a bad cookie).
pub const MAX_KEYS: usize = 8;

/// A configuration problem: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `filter.cookie.keys[1]`; empty for JSON syntax errors.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "prealloc plugin configuration: {}", self.message)
        } else {
            write!(
                f,
                "prealloc plugin configuration: {}: {}",
                self.field, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------
// Raw (serde) shapes.

// Parsed once per configuration: the size difference between roles does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
enum RawPlugin {
    #[serde(rename = "filter")]
    Filter(RawFilter),
    #[serde(rename = "poller")]
    Poller(RawPoller),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    cookie: RawCookie,
    #[serde(default = "default_route_header")]
    route_header: String,
    #[serde(default)]
    when_all_down: WhenAllDown,
    #[serde(default = "default_retry_after_s")]
    retry_after_s: u32,
    #[serde(default = "default_availability_refresh_ms")]
    availability_refresh_ms: u64,
    #[serde(default)]
    signup: Option<RawSignup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCookie {
    #[serde(default = "default_cookie_name")]
    name: String,
    keys: Vec<String>,
    #[serde(default = "default_max_age_s")]
    max_age_s: u64,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_true")]
    secure: bool,
    #[serde(default = "default_true")]
    http_only: bool,
    #[serde(default = "default_same_site")]
    same_site: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignup {
    #[serde(default = "default_signup_method")]
    method: String,
    path: String,
    #[serde(default = "default_cp_cluster")]
    cluster: String,
    #[serde(default = "default_cp_authority")]
    authority: String,
    token: String,
    resource_type: String,
    #[serde(default)]
    location: Option<String>,
    #[serde(default = "default_signup_timeout_ms")]
    timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoller {
    #[serde(default = "default_cp_cluster")]
    cluster: String,
    #[serde(default = "default_cp_authority")]
    authority: String,
    token: String,
    #[serde(default = "default_wait_ms")]
    wait_ms: u64,
    #[serde(default = "default_min_backoff_ms")]
    min_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    max_backoff_ms: u64,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default = "default_writes_per_turn")]
    writes_per_turn: usize,
}

fn default_route_header() -> String {
    DEFAULT_ROUTE_HEADER.to_owned()
}
fn default_retry_after_s() -> u32 {
    5
}
fn default_availability_refresh_ms() -> u64 {
    100
}
fn default_cookie_name() -> String {
    DEFAULT_COOKIE_NAME.to_owned()
}
fn default_max_age_s() -> u64 {
    30 * 24 * 3600
}
fn default_path() -> String {
    "/".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_same_site() -> String {
    "Lax".to_owned()
}
fn default_signup_method() -> String {
    "POST".to_owned()
}
fn default_cp_cluster() -> String {
    "prealloc_control_plane".to_owned()
}
fn default_cp_authority() -> String {
    "prealloc-control-plane".to_owned()
}
fn default_signup_timeout_ms() -> u64 {
    2000
}
fn default_wait_ms() -> u64 {
    30_000
}
fn default_min_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    5000
}
fn default_writes_per_turn() -> usize {
    DEFAULT_WRITES_PER_TURN
}

/// Table writes the poller makes per turn of Envoy's main thread by default:
/// a little more than a page of the control plane's default size (2,000
/// entries, `push.page_entries`), so a page is applied in the turn it
/// arrives. The wasm build's turns are its ticks, which came about 4 ms
/// apart in Envoy 1.40 with a 1 ms period asked: splitting each page over
/// two turns doubled a 1M load (BENCHMARKS.md, section 8).
pub const DEFAULT_WRITES_PER_TURN: usize = 2500;

// ---------------------------------------------------------------------------
// Checked types.

/// The validated plugin configuration: which role this root context plays.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginConfig {
    Filter(FilterConfig),
    Poller(PollerConfig),
}

/// What the filter does when every manager of a consumer's replica set is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllDown {
    /// Answer 503 with Retry-After: never send a request where it cannot be served.
    #[default]
    Reject,
    /// Send it to the first manager anyway (it holds the data; it may recover first).
    FirstManager,
}

/// Cookie `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// Validated cookie settings.
#[derive(Clone, PartialEq, Eq)]
pub struct CookieConfig {
    pub name: String,
    /// MAC keys; the first signs, every one verifies.
    pub keys: Vec<Vec<u8>>,
    pub max_age_s: u64,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
}

impl fmt::Debug for CookieConfig {
    // Keys are secrets: never print them, not even in a debug log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieConfig")
            .field("name", &self.name)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("max_age_s", &self.max_age_s)
            .field("path", &self.path)
            .field("secure", &self.secure)
            .field("http_only", &self.http_only)
            .field("same_site", &self.same_site)
            .finish()
    }
}

/// Validated HTTP filter settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    pub cookie: CookieConfig,
    /// Lower-case header name the route reads with `cluster_header`.
    pub route_header: String,
    pub when_all_down: WhenAllDown,
    pub retry_after_s: u32,
    pub availability_refresh: Duration,
    pub signup: Option<SignupConfig>,
}

/// Validated sign-up settings (issue 4: sign-up through the filter).
#[derive(Clone, PartialEq, Eq)]
pub struct SignupConfig {
    /// Upper-case method that marks a sign-up request.
    pub method: String,
    /// Exact path (query string ignored) that marks a sign-up request.
    pub path: String,
    /// Envoy cluster of the control plane.
    pub cluster: String,
    pub authority: String,
    pub token: String,
    pub resource_type: String,
    pub location: Option<String>,
    pub timeout: Duration,
}

impl fmt::Debug for SignupConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignupConfig")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("token", &"<redacted>")
            .field("resource_type", &self.resource_type)
            .field("location", &self.location)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Validated poller settings.
#[derive(Clone, PartialEq, Eq)]
pub struct PollerConfig {
    pub cluster: String,
    pub authority: String,
    pub token: String,
    pub wait_ms: u64,
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Sent as `node=` on every poll, so the control plane knows this Envoy;
    /// `None` in the config: the host fills in a default (Envoy's node id, or
    /// `envoy-<pid>`).
    pub node_id: Option<String>,
    /// Most table writes per turn of Envoy's main thread: a big answer is
    /// applied over several turns, so nothing else there waits long.
    pub writes_per_turn: usize,
}

impl fmt::Debug for PollerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollerConfig")
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("token", &"<redacted>")
            .field("wait_ms", &self.wait_ms)
            .field("min_backoff_ms", &self.min_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("node_id", &self.node_id)
            .field("writes_per_turn", &self.writes_per_turn)
            .finish()
    }
}

/// Parses and validates a plugin configuration (the bytes of Envoy's `configuration`).
pub fn parse(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            "",
            "configuration is empty; expected {\"filter\": {...}} or {\"poller\": {...}}",
        ));
    }
    let raw: RawPlugin = from_json(bytes).map_err(|(field, e)| {
        ConfigError::new(
            field,
            format!(
                "{e}; expected {{\"filter\": {{...}}}} or {{\"poller\": {{...}}}} (see filter/README.md)"
            ),
        )
    })?;
    match raw {
        RawPlugin::Filter(f) => validate_filter(f).map(PluginConfig::Filter),
        RawPlugin::Poller(p) => validate_poller(p).map(PluginConfig::Poller),
    }
}

/// Deserializes JSON, naming the dotted path of the field that failed
/// (`filter.cookie.max_age_s`); an empty path for syntax errors.
fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, (String, String)> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        let message = e.into_inner().to_string();
        let message = if is_secret_field(&field) {
            redact_quoted(&message)
        } else {
            message
        };
        (field, message)
    })
}

/// Fields whose values are secrets: cookie keys and bearer tokens.
fn is_secret_field(field: &str) -> bool {
    field.contains("keys") || field.ends_with("token")
}

/// serde quotes the offending value (`invalid type: string "…", expected a
/// sequence`); for a secret field everything from the first quote to the
/// last is replaced (a secret may itself hold an escaped quote), so a
/// misplaced key never reaches Envoy's log.
fn redact_quoted(message: &str) -> String {
    let head = message.find('"').and_then(|a| message.get(..a));
    let tail = message.rfind('"').and_then(|b| message.get(b + 1..));
    match (head, tail) {
        (Some(head), Some(tail)) => format!("{head}\"<redacted>\"{tail}"),
        _ => message.to_owned(),
    }
}

/// The native build's cluster specifier: where requests without a verified
/// consumer go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecifierConfig {
    pub default_cluster: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpecifier {
    default_cluster: String,
}

/// Parses the cluster specifier's `specifier_config`: `{"default_cluster": "..."}`.
pub fn parse_specifier(bytes: &[u8]) -> Result<SpecifierConfig, ConfigError> {
    let raw: RawSpecifier = from_json(bytes).map_err(|(field, e)| {
        ConfigError::new(
            field,
            format!("{e}; expected {{\"default_cluster\": \"<cluster of anonymous requests>\"}}"),
        )
    })?;
    if !is_valid_cluster(&raw.default_cluster) {
        return Err(ConfigError::new(
            "default_cluster",
            format!(
                "{:?} is not a valid cluster name (1..=255 visible ASCII characters)",
                raw.default_cluster
            ),
        ));
    }
    Ok(SpecifierConfig {
        default_cluster: raw.default_cluster,
    })
}

fn validate_filter(raw: RawFilter) -> Result<FilterConfig, ConfigError> {
    let cookie = validate_cookie(raw.cookie)?;
    let route_header = raw.route_header.to_ascii_lowercase();
    if !is_token(&route_header) || route_header.starts_with(':') {
        return Err(ConfigError::new(
            "filter.route_header",
            format!("{:?} is not a valid HTTP header name", raw.route_header),
        ));
    }
    if raw.retry_after_s == 0 {
        return Err(ConfigError::new(
            "filter.retry_after_s",
            "must be at least 1",
        ));
    }
    if !(10..=60_000).contains(&raw.availability_refresh_ms) {
        return Err(ConfigError::new(
            "filter.availability_refresh_ms",
            format!(
                "must be between 10 and 60000, got {}",
                raw.availability_refresh_ms
            ),
        ));
    }
    let signup = raw.signup.map(validate_signup).transpose()?;
    Ok(FilterConfig {
        cookie,
        route_header,
        when_all_down: raw.when_all_down,
        retry_after_s: raw.retry_after_s,
        availability_refresh: Duration::from_millis(raw.availability_refresh_ms),
        signup,
    })
}

fn validate_cookie(raw: RawCookie) -> Result<CookieConfig, ConfigError> {
    if !is_token(&raw.name) {
        return Err(ConfigError::new(
            "filter.cookie.name",
            format!("{:?} is not a valid cookie name (RFC 6265 token)", raw.name),
        ));
    }
    if raw.keys.is_empty() || raw.keys.len() > MAX_KEYS {
        return Err(ConfigError::new(
            "filter.cookie.keys",
            format!("needs 1 to {MAX_KEYS} keys, got {}", raw.keys.len()),
        ));
    }
    let mut keys = Vec::with_capacity(raw.keys.len());
    for (i, k) in raw.keys.iter().enumerate() {
        if k.len() < MIN_KEY_LEN {
            return Err(ConfigError::new(
                format!("filter.cookie.keys[{i}]"),
                format!(
                    "must be at least {MIN_KEY_LEN} bytes, got {}; generate one with `openssl rand -base64 48`",
                    k.len()
                ),
            ));
        }
        keys.push(k.as_bytes().to_vec());
    }
    if raw.max_age_s == 0 || raw.max_age_s > 400 * 24 * 3600 {
        return Err(ConfigError::new(
            "filter.cookie.max_age_s",
            format!(
                "must be between 1 and 34560000 (400 days), got {}",
                raw.max_age_s
            ),
        ));
    }
    if !raw.path.starts_with('/')
        || !raw
            .path
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b';')
    {
        return Err(ConfigError::new(
            "filter.cookie.path",
            format!(
                "{:?} must start with '/' and contain no spaces, ';' or control characters",
                raw.path
            ),
        ));
    }
    let same_site = match raw.same_site.to_ascii_lowercase().as_str() {
        "strict" => SameSite::Strict,
        "lax" => SameSite::Lax,
        "none" => SameSite::None,
        _ => {
            return Err(ConfigError::new(
                "filter.cookie.same_site",
                format!("{:?} must be Strict, Lax or None", raw.same_site),
            ))
        }
    };
    if same_site == SameSite::None && !raw.secure {
        return Err(ConfigError::new(
            "filter.cookie.same_site",
            "SameSite=None requires secure: true (browsers drop the cookie otherwise)",
        ));
    }
    Ok(CookieConfig {
        name: raw.name,
        keys,
        max_age_s: raw.max_age_s,
        path: raw.path,
        secure: raw.secure,
        http_only: raw.http_only,
        same_site,
    })
}

fn validate_signup(raw: RawSignup) -> Result<SignupConfig, ConfigError> {
    let method = raw.method.to_ascii_uppercase();
    if !is_token(&method) {
        return Err(ConfigError::new(
            "filter.signup.method",
            format!("{:?} is not an HTTP method", raw.method),
        ));
    }
    if !raw.path.starts_with('/') || raw.path.contains('?') || raw.path.contains('#') {
        return Err(ConfigError::new(
            "filter.signup.path",
            format!(
                "{:?} must be an absolute path without query string",
                raw.path
            ),
        ));
    }
    non_empty("filter.signup.cluster", &raw.cluster)?;
    non_empty("filter.signup.authority", &raw.authority)?;
    header_value("filter.signup.token", &raw.token)?;
    non_empty("filter.signup.resource_type", &raw.resource_type)?;
    if let Some(loc) = &raw.location {
        non_empty("filter.signup.location", loc)?;
    }
    if !(1..=60_000).contains(&raw.timeout_ms) {
        return Err(ConfigError::new(
            "filter.signup.timeout_ms",
            format!("must be between 1 and 60000, got {}", raw.timeout_ms),
        ));
    }
    Ok(SignupConfig {
        method,
        path: raw.path,
        cluster: raw.cluster,
        authority: raw.authority,
        token: raw.token,
        resource_type: raw.resource_type,
        location: raw.location,
        timeout: Duration::from_millis(raw.timeout_ms),
    })
}

fn validate_poller(raw: RawPoller) -> Result<PollerConfig, ConfigError> {
    non_empty("poller.cluster", &raw.cluster)?;
    non_empty("poller.authority", &raw.authority)?;
    header_value("poller.token", &raw.token)?;
    if !(1..=300_000).contains(&raw.wait_ms) {
        return Err(ConfigError::new(
            "poller.wait_ms",
            format!("must be between 1 and 300000, got {}", raw.wait_ms),
        ));
    }
    if !(1..=60_000).contains(&raw.min_backoff_ms) {
        return Err(ConfigError::new(
            "poller.min_backoff_ms",
            format!("must be between 1 and 60000, got {}", raw.min_backoff_ms),
        ));
    }
    if raw.max_backoff_ms < raw.min_backoff_ms || raw.max_backoff_ms > 600_000 {
        return Err(ConfigError::new(
            "poller.max_backoff_ms",
            format!(
                "must be between min_backoff_ms ({}) and 600000, got {}",
                raw.min_backoff_ms, raw.max_backoff_ms
            ),
        ));
    }
    if let Some(node) = &raw.node_id {
        if !prealloc_wire::is_valid_node(node) {
            return Err(ConfigError::new(
                "poller.node_id",
                format!(
                    "{node:?} must be 1..={} characters of A-Z a-z 0-9 . _ ~ -",
                    prealloc_wire::MAX_NODE_LEN
                ),
            ));
        }
    }
    if !(1..=1_000_000).contains(&raw.writes_per_turn) {
        return Err(ConfigError::new(
            "poller.writes_per_turn",
            format!("must be between 1 and 1000000, got {}", raw.writes_per_turn),
        ));
    }
    Ok(PollerConfig {
        writes_per_turn: raw.writes_per_turn,
        node_id: raw.node_id,
        cluster: raw.cluster,
        authority: raw.authority,
        token: raw.token,
        wait_ms: raw.wait_ms,
        min_backoff_ms: raw.min_backoff_ms,
        max_backoff_ms: raw.max_backoff_ms,
    })
}

fn non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    header_value(field, value)
}

/// The value ends up in a header (authority, bearer token): refuse what would break it.
fn header_value(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    if !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(ConfigError::new(
            field,
            "must be printable ASCII (it is sent in an HTTP header)",
        ));
    }
    Ok(())
}

/// RFC 7230 `token` (header names, methods, cookie names).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn filter_json(extra: &str) -> String {
        format!(r#"{{"filter":{{"cookie":{{"keys":["{KEY}"]}}{extra}}}}}"#)
    }

    fn parse_err(json: &str) -> ConfigError {
        match parse(json.as_bytes()) {
            Ok(c) => panic!("expected an error for {json}, got {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_filter_gets_documented_defaults() {
        let PluginConfig::Filter(f) = parse(filter_json("").as_bytes()).unwrap() else {
            panic!("not a filter config")
        };
        assert_eq!(f.cookie.name, "prealloc");
        assert_eq!(f.cookie.keys, vec![KEY.as_bytes().to_vec()]);
        assert_eq!(f.cookie.max_age_s, 2_592_000);
        assert_eq!(f.cookie.path, "/");
        assert!(f.cookie.secure && f.cookie.http_only);
        assert_eq!(f.cookie.same_site, SameSite::Lax);
        assert_eq!(f.route_header, "x-prealloc-cluster");
        assert_eq!(f.when_all_down, WhenAllDown::Reject);
        assert_eq!(f.retry_after_s, 5);
        assert_eq!(f.availability_refresh, Duration::from_millis(100));
        assert_eq!(f.signup, None);
    }

    #[test]
    fn full_filter_config_is_read() {
        let json = format!(
            r#"{{"filter":{{"cookie":{{"name":"pa","keys":["{KEY}","{KEY}x"],"max_age_s":60,"path":"/app",
            "secure":false,"http_only":false,"same_site":"strict"}},"route_header":"X-Route",
            "when_all_down":"first_manager","retry_after_s":9,"availability_refresh_ms":250,
            "signup":{{"method":"post","path":"/signup","cluster":"cp","authority":"cp.local","token":"t",
            "resource_type":"mailbox","location":"eu","timeout_ms":1500}}}}}}"#
        );
        let PluginConfig::Filter(f) = parse(json.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(f.cookie.name, "pa");
        assert_eq!(f.cookie.keys.len(), 2);
        assert_eq!(f.cookie.same_site, SameSite::Strict);
        assert!(!f.cookie.secure);
        assert_eq!(f.route_header, "x-route");
        assert_eq!(f.when_all_down, WhenAllDown::FirstManager);
        let s = f.signup.unwrap();
        assert_eq!(s.method, "POST");
        assert_eq!(s.location.as_deref(), Some("eu"));
        assert_eq!(s.timeout, Duration::from_millis(1500));
    }

    #[test]
    fn poller_defaults() {
        let PluginConfig::Poller(p) = parse(br#"{"poller":{"token":"tok"}}"#).unwrap() else {
            panic!()
        };
        assert_eq!(p.cluster, "prealloc_control_plane");
        assert_eq!(p.authority, "prealloc-control-plane");
        assert_eq!(
            (p.wait_ms, p.min_backoff_ms, p.max_backoff_ms),
            (30_000, 100, 5000)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let short = r#"{"filter":{"cookie":{"keys":["short"]}}}"#;
        let cases: Vec<(String, &str, &str)> = vec![
            (
                short.to_owned(),
                "filter.cookie.keys[0]",
                "at least 32 bytes",
            ),
            (
                r#"{"filter":{"cookie":{"keys":[]}}}"#.to_owned(),
                "filter.cookie.keys",
                "1 to 8",
            ),
            (
                filter_json(r#","retry_after_s":0"#),
                "filter.retry_after_s",
                "at least 1",
            ),
            (
                filter_json(r#","route_header":"bad header""#),
                "filter.route_header",
                "header name",
            ),
            (
                filter_json(r#","availability_refresh_ms":1"#),
                "filter.availability_refresh_ms",
                "between",
            ),
            (
                format!(
                    r#"{{"filter":{{"cookie":{{"keys":["{KEY}"],"same_site":"None","secure":false}}}}}}"#
                ),
                "filter.cookie.same_site",
                "requires secure",
            ),
            (
                format!(r#"{{"filter":{{"cookie":{{"keys":["{KEY}"],"name":"a b"}}}}}}"#),
                "filter.cookie.name",
                "cookie name",
            ),
            (
                format!(r#"{{"filter":{{"cookie":{{"keys":["{KEY}"],"path":"x"}}}}}}"#),
                "filter.cookie.path",
                "start with",
            ),
            (
                filter_json(r#","signup":{"path":"/s?x","token":"t","resource_type":"m"}"#),
                "filter.signup.path",
                "absolute path",
            ),
            (
                filter_json(
                    r#","signup":{"path":"/s","token":"t","resource_type":"m","timeout_ms":0}"#,
                ),
                "filter.signup.timeout_ms",
                "between",
            ),
            (
                r#"{"poller":{"token":""}}"#.to_owned(),
                "poller.token",
                "must not be empty",
            ),
            (
                r#"{"poller":{"token":"t","min_backoff_ms":500,"max_backoff_ms":100}}"#.to_owned(),
                "poller.max_backoff_ms",
                "min_backoff_ms",
            ),
            (
                r#"{"poller":{"token":"t","wait_ms":0}}"#.to_owned(),
                "poller.wait_ms",
                "between",
            ),
            (
                r#"{"poller":{"token":"t","node_id":"edge 1"}}"#.to_owned(),
                "poller.node_id",
                "characters of",
            ),
        ];
        for (json, field, needle) in cases {
            let e = parse_err(&json);
            assert_eq!(e.field, field, "for {json}: {e}");
            assert!(e.to_string().contains(needle), "for {json}: {e}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_shapes_are_refused() {
        for (json, needle) in [
            (filter_json(r#","colour":"red""#), "unknown field `colour`"),
            (
                r#"{"poller":{"token":"t","cluser":"x"}}"#.to_owned(),
                "unknown field `cluser`",
            ),
            (r#"{"router":{}}"#.to_owned(), "unknown variant `router`"),
            (r#"{"filter":{}}"#.to_owned(), "missing field `cookie`"),
            (
                filter_json(r#","when_all_down":"pray""#),
                "unknown variant `pray`",
            ),
            ("".to_owned(), "configuration is empty"),
            ("not json".to_owned(), "expected {\"filter\""),
        ] {
            let e = parse_err(&json);
            assert!(e.to_string().contains(needle), "for {json:?}: {e}");
        }
    }

    #[test]
    fn a_misplaced_secret_is_not_quoted_in_the_error() {
        let secret = "a-cookie-key-that-is-long-enough-0123456789";
        for json in [
            format!(r#"{{"filter":{{"cookie":{{"keys":"{secret}"}}}}}}"#),
            format!(r#"{{"filter":{{"cookie":{{"keys":[["{secret}"]]}}}}}}"#),
            format!(r#"{{"poller":{{"token":{{"{secret}":1}}}}}}"#),
            format!(
                r#"{{"filter":{{"signup":{{"path":"/s","token":["{secret}"],"resource_type":"m"}}}}}}"#
            ),
        ] {
            let e = parse(json.as_bytes()).unwrap_err();
            let shown = e.to_string();
            assert!(!shown.contains(secret), "{shown}");
            assert!(!e.field.is_empty(), "names the field: {shown}");
        }
        // Other fields keep their quoted values (they help).
        let e = parse(br#"{"filter":{"when_all_down":7,"cookie":{"keys":[]}}}"#).unwrap_err();
        assert_eq!(e.field, "filter.when_all_down", "{e}");
        assert_eq!(
            redact_quoted(r#"invalid type: string "k", expected x"#),
            r#"invalid type: string "<redacted>", expected x"#
        );
        // A secret holding an escaped quote is redacted whole.
        assert_eq!(
            redact_quoted(r#"invalid type: string "ab\"cd\"ef", expected x"#),
            r#"invalid type: string "<redacted>", expected x"#
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let json = format!(
            r#"{{"filter":{{"cookie":{{"keys":["{KEY}"]}},"signup":{{"path":"/s","token":"sekrit","resource_type":"m"}}}}}}"#
        );
        let c = parse(json.as_bytes()).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(KEY) && !dbg.contains("sekrit"), "{dbg}");
        let p = parse(br#"{"poller":{"token":"sekrit"}}"#).unwrap();
        assert!(!format!("{p:?}").contains("sekrit"));
    }

    #[test]
    fn the_specifier_config_names_a_valid_default_cluster() {
        let c = parse_specifier(br#"{"default_cluster":"default_backend"}"#).unwrap();
        assert_eq!(c.default_cluster, "default_backend");
        let e = parse_specifier(br#"{"default_cluster":"a,b"}"#).unwrap_err();
        assert_eq!(e.field, "default_cluster");
        let e = parse_specifier(br#"{"default_cluster":"x","other":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(parse_specifier(b"").is_err());
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        let e = parse(br#"{"poller":{"token":"t","min_backoff_ms":"soon"}}"#).unwrap_err();
        assert_eq!(e.field, "poller.min_backoff_ms", "{e}");
        let e = parse(filter_json(r#","when_all_down":"sometimes""#).as_bytes()).unwrap_err();
        assert_eq!(e.field, "filter.when_all_down", "{e}");
        assert!(
            e.to_string()
                .contains("filter.when_all_down: unknown variant"),
            "{e}"
        );
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e.field, "", "{e}");
    }
}
