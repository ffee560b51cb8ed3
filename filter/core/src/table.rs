//! The routing table's writes and value codecs: a consumer's entry, and the
//! managers' availability.
//!
//! Formats (ARCHITECTURE.md):
//! - an entry: `1|<state>|<cluster>,<cluster>,...`, state `g` (registering)
//!   or `r` (registered), first manager first; the wasm build keeps entries
//!   in buckets of shared data ([`crate::buckets`]);
//! - key `prealloc.managers`: one line per manager, `<cluster> <availability>`,
//!   availability `available|draining|down`; a missing key means all available.
//!
//! Decoders are strict (anything unexpected is an error, never a guess) and
//! borrow from the value, so the per-request lookup allocates nothing.

use prealloc_wire::{Availability, ConsumerId, ConsumerState};
use std::fmt;

/// Shared-data key of the managers' availability.
pub const MANAGERS_KEY: &str = "prealloc.managers";
/// Format version of consumer entries.
pub const ENTRY_VERSION: &str = "1";
/// Longest cluster name accepted anywhere in the data plane.
pub const MAX_CLUSTER_LEN: usize = 255;
/// Most replicas an entry may name (guards the reader against absurd values).
pub const MAX_ENTRY_REPLICAS: usize = 64;

/// Whether `s` can be used as a cluster name in the data plane's formats:
/// 1..=255 bytes of visible ASCII, without the separators `,` `|` `;` `"`.
pub fn is_valid_cluster(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLUSTER_LEN
        && s.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b',' | b'|' | b';' | b'"'))
}

/// Why a shared-data value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    NotUtf8,
    Version,
    State,
    Shape,
    Cluster,
    TooManyReplicas,
    Availability(usize),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::NotUtf8 => f.write_str("value is not UTF-8"),
            TableError::Version => f.write_str("entry format version is not 1"),
            TableError::State => f.write_str("entry state is not g or r"),
            TableError::Shape => f.write_str("value does not have the expected fields"),
            TableError::Cluster => f.write_str("value names an invalid or empty cluster"),
            TableError::TooManyReplicas => {
                write!(f, "entry names more than {MAX_ENTRY_REPLICAS} replicas")
            }
            TableError::Availability(line) => {
                write!(
                    f,
                    "managers line {line} is not `<cluster> available|draining|down`"
                )
            }
        }
    }
}

impl std::error::Error for TableError {}

/// A decoded consumer entry, borrowing the shared-data value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub state: ConsumerState,
    /// The validated comma-separated replica clusters, first manager first.
    replicas: &'a str,
}

impl<'a> Entry<'a> {
    /// Replica clusters, first manager first (never empty).
    pub fn replicas(&self) -> impl Iterator<Item = &'a str> + Clone + 'a {
        self.replicas.split(',')
    }

    pub fn first_manager(&self) -> &'a str {
        self.replicas.split(',').next().unwrap_or(self.replicas)
    }
}

/// One write of the routing table, as the poller applies a response: the
/// managers first, then each consumer entry whole. Each build stores them its
/// own way (wasm: [`crate::buckets::BucketWriter`]; native:
/// [`crate::process_table::ProcessTable::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableWrite<'a> {
    /// Every manager's cluster and availability, in the control plane's order.
    Managers(&'a [(&'a str, Availability)]),
    /// A consumer's entry: its state and replica clusters, first manager first.
    Entry {
        consumer: &'a ConsumerId,
        state: ConsumerState,
        replicas: &'a [&'a str],
    },
    /// The consumer left the table.
    Remove(&'a ConsumerId),
}

/// A consumer entry that owns its encoded value (what a shared-data read
/// returns), checked once by [`OwnedEntry::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEntry {
    value: Vec<u8>,
    /// Where the entry lies in `value` (a bucket holds several).
    range: std::ops::Range<usize>,
    state: ConsumerState,
}

impl OwnedEntry {
    /// Checks `value`, one entry; `Ok(None)` for an empty value (no entry).
    pub fn decode(value: Vec<u8>) -> Result<Option<OwnedEntry>, TableError> {
        let range = 0..value.len();
        Self::decode_range(value, range)
    }

    /// Checks the entry at `range` of `value`; `Ok(None)` if it is empty.
    pub fn decode_range(
        value: Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> Result<Option<OwnedEntry>, TableError> {
        let raw = value.get(range.clone()).ok_or(TableError::Shape)?;
        let state = match decode_entry(raw)? {
            Some(e) => e.state,
            None => return Ok(None),
        };
        Ok(Some(OwnedEntry {
            value,
            range,
            state,
        }))
    }

    /// The decoded view (never `None` for a value `decode` accepted).
    pub fn entry(&self) -> Option<Entry<'_>> {
        let raw = self.value.get(self.range.clone())?;
        decode_entry(raw).ok().flatten()
    }
}

impl crate::decision::EntryView for OwnedEntry {
    fn state(&self) -> ConsumerState {
        self.state
    }
    fn replicas(&self) -> impl Iterator<Item = &str> + Clone {
        self.entry().into_iter().flat_map(|e| e.replicas())
    }
}

/// Decodes a consumer entry; `Ok(None)` for an empty value (no entry).
pub fn decode_entry(value: &[u8]) -> Result<Option<Entry<'_>>, TableError> {
    if value.is_empty() {
        return Ok(None);
    }
    let s = std::str::from_utf8(value).map_err(|_| TableError::NotUtf8)?;
    let mut parts = s.splitn(3, '|');
    if parts.next() != Some(ENTRY_VERSION) {
        return Err(TableError::Version);
    }
    let state = match parts.next() {
        Some("g") => ConsumerState::Registering,
        Some("r") => ConsumerState::Registered,
        Some(_) => return Err(TableError::State),
        None => return Err(TableError::Shape),
    };
    let replicas = parts.next().ok_or(TableError::Shape)?;
    let mut n = 0usize;
    for c in replicas.split(',') {
        if !is_valid_cluster(c) {
            return Err(TableError::Cluster);
        }
        n += 1;
        if n > MAX_ENTRY_REPLICAS {
            return Err(TableError::TooManyReplicas);
        }
    }
    Ok(Some(Entry { state, replicas }))
}

/// Encodes a consumer entry. Callers pass valid cluster names (the poller checks them).
pub fn encode_entry<'c>(
    state: ConsumerState,
    replicas: impl IntoIterator<Item = &'c str>,
) -> String {
    let mut s = String::with_capacity(64);
    s.push_str(ENTRY_VERSION);
    s.push('|');
    s.push(match state {
        ConsumerState::Registering => 'g',
        ConsumerState::Registered => 'r',
    });
    s.push('|');
    for (i, c) in replicas.into_iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(c);
    }
    s
}

/// The managers as a filter worker sees them: which clusters exist and which are down.
///
/// Only `down` changes routing among managers (draining managers still serve
/// consumers they hold), and only a cluster in the managers list is ever a
/// destination: a cookie (signed with the key, but naming any Envoy cluster,
/// the control plane's for one) cannot steer a request elsewhere. Before the
/// poller wrote the list (`known` is `None`), the signed cookie's clusters are
/// trusted, so a starting Envoy routes consumers by their cookies. Lookups are
/// linear scans over a handful of names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AvailabilityView {
    down: Vec<String>,
    known: Option<Vec<String>>,
}

impl AvailabilityView {
    /// Every manager available, none listed yet (also what a missing key means).
    pub fn all_available() -> Self {
        AvailabilityView::default()
    }

    pub fn is_down(&self, cluster: &str) -> bool {
        self.down.iter().any(|d| d == cluster)
    }

    /// Whether `cluster` is a manager's (always, before any list was written).
    pub fn is_known(&self, cluster: &str) -> bool {
        self.known
            .as_ref()
            .is_none_or(|k| k.iter().any(|c| c == cluster))
    }

    /// Whether a managers list was written (before, every cluster counts as known).
    pub fn has_list(&self) -> bool {
        self.known.is_some()
    }

    /// A destination a request may be sent to: a known manager that is not down.
    pub fn is_routable(&self, cluster: &str) -> bool {
        self.is_known(cluster) && !self.is_down(cluster)
    }

    /// A view with the given clusters down and no managers list (tests, and the decoder).
    pub fn with_down<'c>(clusters: impl IntoIterator<Item = &'c str>) -> Self {
        AvailabilityView {
            down: clusters.into_iter().map(str::to_owned).collect(),
            known: None,
        }
    }

    /// A view of a managers list: every (cluster, availability).
    pub fn of_managers<'c>(managers: impl IntoIterator<Item = (&'c str, Availability)>) -> Self {
        let mut view = AvailabilityView {
            down: Vec::new(),
            known: Some(Vec::new()),
        };
        for (cluster, a) in managers {
            if a == Availability::Down {
                view.down.push(cluster.to_owned());
            }
            if let Some(k) = &mut view.known {
                k.push(cluster.to_owned());
            }
        }
        view
    }
}

/// Decodes the `prealloc.managers` value.
pub fn decode_managers(value: &[u8]) -> Result<AvailabilityView, TableError> {
    let s = std::str::from_utf8(value).map_err(|_| TableError::NotUtf8)?;
    let s = s.strip_suffix('\n').unwrap_or(s);
    let mut managers = Vec::new();
    if !s.is_empty() {
        for (i, line) in s.split('\n').enumerate() {
            let (cluster, avail) = line
                .split_once(' ')
                .ok_or(TableError::Availability(i + 1))?;
            if !is_valid_cluster(cluster) {
                return Err(TableError::Availability(i + 1));
            }
            let a = avail
                .parse::<Availability>()
                .map_err(|_| TableError::Availability(i + 1))?;
            managers.push((cluster, a));
        }
    }
    Ok(AvailabilityView::of_managers(managers))
}

/// Encodes the `prealloc.managers` value from (cluster, availability) pairs.
pub fn encode_managers<'c>(managers: impl IntoIterator<Item = (&'c str, Availability)>) -> String {
    let mut s = String::new();
    for (i, (cluster, a)) in managers.into_iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(cluster);
        s.push(' ');
        s.push_str(a.as_str());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_decode() {
        let check = |v: &str, want: Result<Option<(ConsumerState, Vec<&str>)>, TableError>| {
            let got = decode_entry(v.as_bytes())
                .map(|o| o.map(|e| (e.state, e.replicas().collect::<Vec<_>>())));
            assert_eq!(got, want, "{v:?}");
        };
        check("", Ok(None));
        check(
            "1|g|manager_a",
            Ok(Some((ConsumerState::Registering, vec!["manager_a"]))),
        );
        check(
            "1|r|a,b,c",
            Ok(Some((ConsumerState::Registered, vec!["a", "b", "c"]))),
        );
        check("2|g|a", Err(TableError::Version));
        check("1|x|a", Err(TableError::State));
        check("1|g", Err(TableError::Shape));
        check("1", Err(TableError::Shape));
        check("1|g|", Err(TableError::Cluster));
        check("1|g|a,,b", Err(TableError::Cluster));
        check("1|g|a,", Err(TableError::Cluster));
        check("1|g|a b", Err(TableError::Cluster));
        check("1|g|a|b", Err(TableError::Cluster));
        check("1|g|a\n", Err(TableError::Cluster));
        let many = vec!["m"; MAX_ENTRY_REPLICAS + 1].join(",");
        check(&format!("1|r|{many}"), Err(TableError::TooManyReplicas));
        assert_eq!(decode_entry(&[0xff]), Err(TableError::NotUtf8));
    }

    #[test]
    fn entry_round_trip_and_first_manager() {
        let v = encode_entry(ConsumerState::Registered, ["manager_a", "manager_b"]);
        assert_eq!(v, "1|r|manager_a,manager_b");
        let e = decode_entry(v.as_bytes()).unwrap().unwrap();
        assert_eq!(e.first_manager(), "manager_a");
        assert_eq!(encode_entry(ConsumerState::Registering, ["x"]), "1|g|x");
    }

    #[test]
    fn managers_decode() {
        let v =
            decode_managers(b"manager_a available\nmanager_b down\nmanager_c draining\n").unwrap();
        assert!(v.is_down("manager_b"));
        assert!(!v.is_down("manager_a") && !v.is_down("manager_c") && !v.is_down("unknown"));
        assert!(v.is_known("manager_c") && !v.is_known("unknown"));
        assert!(v.is_routable("manager_a") && !v.is_routable("manager_b"));
        // An empty list is a list: no cluster is a destination.
        let empty = decode_managers(b"").unwrap();
        assert!(!empty.is_known("manager_a"));
        assert!(AvailabilityView::all_available().is_known("manager_a"));
        for (bad, line) in [
            (&b"a up"[..], 1),
            (b"a available\nb", 2),
            (b"a  down", 1),
            (b"a,b down", 1),
            (b"a available\n\nb down", 2),
            (b" down", 1),
        ] {
            assert_eq!(
                decode_managers(bad),
                Err(TableError::Availability(line)),
                "{bad:?}"
            );
        }
        assert_eq!(decode_managers(&[0xc3]), Err(TableError::NotUtf8));
    }

    #[test]
    fn managers_round_trip() {
        let v = encode_managers([("a", Availability::Available), ("b", Availability::Down)]);
        assert_eq!(v, "a available\nb down");
        assert_eq!(
            decode_managers(v.as_bytes()).unwrap(),
            AvailabilityView::of_managers([
                ("a", Availability::Available),
                ("b", Availability::Down)
            ])
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_entry(&bytes);
            let _ = decode_managers(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_near_valid_text(s in "[1gr|,a-c \n]{0,40}") {
            if let Ok(Some(e)) = decode_entry(s.as_bytes()) {
                prop_assert!(e.replicas().all(is_valid_cluster));
            }
            let _ = decode_managers(s.as_bytes());
        }

        #[test]
        fn entry_round_trips(reg in any::<bool>(), cl in proptest::collection::vec("[a-z_0-9.:-]{1,20}", 1..8)) {
            let state = if reg { ConsumerState::Registered } else { ConsumerState::Registering };
            let v = encode_entry(state, cl.iter().map(String::as_str));
            let e = decode_entry(v.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(e.state, state);
            prop_assert_eq!(e.replicas().collect::<Vec<_>>(), cl.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
