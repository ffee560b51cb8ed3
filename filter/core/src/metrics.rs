//! Names of the filter's Envoy stats (Envoy shows them as `wasmcustom.<name>`).
//!
//! Defined here, without proxy-wasm, so a test keeps filter/README.md's list
//! honest and the wasm host tests can refer to the same names.

use crate::cookie::CookieError;
use crate::decision::Via;

macro_rules! metrics {
    ($ty:ident { $($variant:ident => $name:literal,)* }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $ty { $($variant,)* }
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant,)*];
            pub fn name(self) -> &'static str {
                match self { $($ty::$variant => $name,)* }
            }
            /// Position in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

metrics!(Counter {
    RequestsAnonymous => "prealloc_requests_anonymous",
    RequestsFirstManager => "prealloc_requests_first_manager",
    RequestsTable => "prealloc_requests_table",
    RequestsCookie => "prealloc_requests_cookie",
    RequestsAllDownFirstManager => "prealloc_requests_all_down_first_manager",
    AllDownReplies => "prealloc_all_down_replies",
    CookiesRejectedMissing => "prealloc_cookies_rejected_missing",
    CookiesRejectedMalformed => "prealloc_cookies_rejected_malformed",
    CookiesRejectedBadMac => "prealloc_cookies_rejected_bad_mac",
    CookiesRejectedExpired => "prealloc_cookies_rejected_expired",
    CookiesRejectedUnsupportedVersion => "prealloc_cookies_rejected_unsupported_version",
    CookiesRejectedUnknownCluster => "prealloc_cookies_rejected_unknown_cluster",
    TableHits => "prealloc_table_hits",
    TableMisses => "prealloc_table_misses",
    TableErrors => "prealloc_table_errors",
    ReservedHeadersRemoved => "prealloc_reserved_headers_removed",
    CookiesUpgraded => "prealloc_cookies_upgraded",
    SignupsOk => "prealloc_signups_ok",
    SignupsRefused => "prealloc_signups_refused",
    SignupsUnavailable => "prealloc_signups_unavailable",
    SignupGivebacksLost => "prealloc_signup_givebacks_lost",
    PollerUpdates => "prealloc_poller_updates",
    PollerFullSnapshots => "prealloc_poller_full_snapshots",
    PollerErrors => "prealloc_poller_errors",
    PollerSkipped => "prealloc_poller_skipped",
});

metrics!(Gauge {
    PollerEntries => "prealloc_poller_entries",
    PollerVersion => "prealloc_poller_version",
});

impl Counter {
    /// The counter of a cookie rejection reason.
    pub fn cookie_rejected(e: CookieError) -> Counter {
        match e {
            CookieError::Missing => Counter::CookiesRejectedMissing,
            CookieError::Malformed => Counter::CookiesRejectedMalformed,
            CookieError::BadMac => Counter::CookiesRejectedBadMac,
            CookieError::Expired => Counter::CookiesRejectedExpired,
            CookieError::UnsupportedVersion => Counter::CookiesRejectedUnsupportedVersion,
        }
    }

    /// The counter of a routed request's decision.
    pub fn routed(via: Via) -> Counter {
        match via {
            Via::FirstManager => Counter::RequestsFirstManager,
            Via::Table => Counter::RequestsTable,
            Via::Cookie => Counter::RequestsCookie,
            Via::AllDownFirstManager => Counter::RequestsAllDownFirstManager,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_match_positions_and_names_are_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        for (i, g) in Gauge::ALL.iter().enumerate() {
            assert_eq!(g.index(), i);
        }
        let mut names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.extend(Gauge::ALL.iter().map(|g| g.name()));
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        for e in CookieError::ALL {
            assert!(Counter::cookie_rejected(e).name().ends_with(e.as_str()));
        }
    }

    #[test]
    fn readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        for name in Counter::ALL
            .iter()
            .map(|c| c.name())
            .chain(Gauge::ALL.iter().map(|g| g.name()))
        {
            assert!(
                readme.contains(&format!("`{name}`")),
                "filter/README.md does not list `{name}`"
            );
        }
    }
}
