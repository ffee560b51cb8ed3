//! The routing decision: where a request goes, as a pure function of what the filter knows.
//!
//! | cookie | table entry | result |
//! |---|---|---|
//! | none / invalid | – | [`Decision::Anonymous`]: no route header, the route's default cluster |
//! | registering | none | the first manager named in the cookie ([`Via::FirstManager`]) |
//! | registering | present | round-robin over the entry's replicas, skipping `down` ([`Via::Table`]); upgrade the cookie if the entry says registered |
//! | registered | not read | round-robin over the cookie's replicas, skipping `down` ([`Via::Cookie`]) |
//! | any | every candidate down | `reject`: [`Decision::AllDown`] (503 + Retry-After); `first_manager`: the first manager ([`Via::AllDownFirstManager`]) |
//!
//! A replica set only ever grows and always contains the first manager, so
//! every candidate here holds the consumer's data: routing never guesses.

use prealloc_wire::{ConsumerId, ConsumerState};

use crate::config::WhenAllDown;
use crate::cookie::Claims;
use crate::table::{AvailabilityView, Entry};

/// A consumer's routing-table entry, however a build stores it (the wasm
/// build decodes shared data into [`Entry`]; the native build keeps its own).
pub trait EntryView {
    fn state(&self) -> ConsumerState;
    /// Replica clusters, first manager first (never empty for a valid entry).
    fn replicas(&self) -> impl Iterator<Item = &str> + Clone;
    fn first_manager(&self) -> Option<&str> {
        self.replicas().next()
    }
}

impl EntryView for Entry<'_> {
    fn state(&self) -> ConsumerState {
        self.state
    }
    fn replicas(&self) -> impl Iterator<Item = &str> + Clone {
        Entry::replicas(self)
    }
}

/// Where a routed request's cluster was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The cookie's replica list (`Claims::replicas`).
    Cookie,
    /// The table entry's replica list.
    Table,
}

/// How a routed request's cluster was chosen (one counter each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Registering cookie, no table entry: the cookie's first manager.
    FirstManager,
    /// Round-robin over the table entry's replica set.
    Table,
    /// Registered cookie: round-robin over the cookie's replica set.
    Cookie,
    /// Every candidate was down and the policy is `first_manager`.
    AllDownFirstManager,
}

/// The filter's decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// No valid cookie: leave the route alone (default cluster), add no consumer header.
    Anonymous,
    /// Send the request to `cluster` and tell it who the consumer is.
    Route {
        cluster: &'a str,
        /// Where `cluster` is: which list, and its position in it.
        from: (Source, usize),
        consumer: &'a ConsumerId,
        via: Via,
        /// The table says registered while the cookie says registering: the
        /// response should carry an upgraded (registered) cookie.
        upgrade: bool,
    },
    /// Every manager holding the data is down and the policy is `reject`: answer 503.
    AllDown { consumer: &'a ConsumerId },
    /// The claims name no cluster of the managers list (a cookie signed with
    /// the key but naming another Envoy cluster): treated as anonymous.
    UnknownClusters,
}

/// Whether the decision for these claims needs the consumer's table entry
/// (only registering consumers do; registered cookies carry their replica set).
pub fn needs_table(claims: Option<&Claims>) -> bool {
    matches!(claims, Some(c) if c.state == ConsumerState::Registering)
}

/// Decides where a request goes. `entry` is only looked at when
/// [`needs_table`] said so; `rr` is the worker's round-robin counter.
pub fn decide<'a, E: EntryView>(
    claims: Option<&'a Claims>,
    entry: Option<&'a E>,
    availability: &AvailabilityView,
    rr: u64,
    when_all_down: WhenAllDown,
) -> Decision<'a> {
    let Some(claims) = claims else {
        return Decision::Anonymous;
    };
    let consumer = &claims.consumer;
    let Some(cookie_first) = claims.first_manager() else {
        // A verified cookie always names its first manager; treat the impossible as anonymous.
        return Decision::Anonymous;
    };
    let cookie_list = || claims.replicas.iter().map(String::as_str);
    // Only a manager's cluster is ever a destination.
    if !cookie_list().any(|c| availability.is_known(c)) {
        return Decision::UnknownClusters;
    }
    let (picked, first, via, upgrade) = match (claims.state, entry) {
        (ConsumerState::Registered, _) => (
            pick(cookie_list(), availability, rr).map(|(i, c)| ((Source::Cookie, i), c)),
            ((Source::Cookie, 0), cookie_first),
            Via::Cookie,
            false,
        ),
        (ConsumerState::Registering, None) => (
            pick(cookie_list().take(1), availability, rr).map(|(i, c)| ((Source::Cookie, i), c)),
            ((Source::Cookie, 0), cookie_first),
            Via::FirstManager,
            false,
        ),
        (ConsumerState::Registering, Some(e)) => match e.first_manager() {
            Some(entry_first) => (
                pick(e.replicas(), availability, rr).map(|(i, c)| ((Source::Table, i), c)),
                ((Source::Table, 0), entry_first),
                Via::Table,
                e.state() == ConsumerState::Registered,
            ),
            // An entry without replicas is no entry: the cookie's first manager.
            None => (
                pick(cookie_list().take(1), availability, rr)
                    .map(|(i, c)| ((Source::Cookie, i), c)),
                ((Source::Cookie, 0), cookie_first),
                Via::FirstManager,
                false,
            ),
        },
    };
    match (picked, when_all_down) {
        (Some((from, cluster)), _) => Decision::Route {
            cluster,
            from,
            consumer,
            via,
            upgrade,
        },
        (None, WhenAllDown::FirstManager) if availability.is_known(first.1) => Decision::Route {
            cluster: first.1,
            from: first.0,
            consumer,
            via: Via::AllDownFirstManager,
            upgrade,
        },
        (None, _) => Decision::AllDown { consumer },
    }
}

/// The `rr`-th replica (modulo their number) among the routable ones (known
/// managers, not down), counted in
/// name order, with its position in `replicas`; `None` when all are down.
///
/// Name order, not list order: the worker's counter is shared by every
/// consumer, and consumers with the same replica set list it in different
/// orders (first manager first). Ranking by name maps each counter value to
/// the same manager for all of them, so the worker's requests are spread
/// evenly over a set however consumers interleave, and one consumer's
/// consecutive requests cycle through its whole set. Allocation-free; O(n²)
/// over a handful of replicas.
pub fn pick<'a, I>(
    replicas: I,
    availability: &AvailabilityView,
    rr: u64,
) -> Option<(usize, &'a str)>
where
    I: Iterator<Item = &'a str> + Clone,
{
    let up = replicas
        .enumerate()
        .filter(|(_, c)| availability.is_routable(c));
    let n = up.clone().count() as u64;
    if n == 0 {
        return None;
    }
    let k = usize::try_from(rr % n).ok()?;
    // Rank of each candidate by (name, position); exactly one has rank k.
    up.clone().find(|&(i, c)| {
        let rank = up
            .clone()
            .filter(|&(j, d)| d < c || (d == c && j < i))
            .count();
        rank == k
    })
}

/// The claims of the upgraded (registered) cookie: same consumer, the entry's
/// replica set, a fresh expiry.
/// The upgraded cookie names at most [`crate::cookie::MAX_REPLICAS`] of the
/// entry's replicas, the first manager first: every one of them holds the
/// data, so a subset still routes only to managers with it (a consumer copied
/// to 30 managers is spread over 16 of them rather than never upgraded).
pub fn upgraded_claims<E: EntryView>(claims: &Claims, entry: &E, expires_at: u64) -> Claims {
    Claims {
        consumer: claims.consumer.clone(),
        state: ConsumerState::Registered,
        expires_at,
        replicas: entry
            .replicas()
            .take(crate::cookie::MAX_REPLICAS)
            .map(str::to_owned)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::decode_entry;

    fn claims(state: ConsumerState, replicas: &[&str]) -> Claims {
        Claims {
            consumer: ConsumerId::from_bytes([1; 16]),
            state,
            expires_at: 10,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// What a decision looks like in a table row: (cluster or outcome, via, upgrade).
    fn summary(d: &Decision<'_>) -> String {
        match d {
            Decision::Anonymous => "anonymous".into(),
            Decision::AllDown { .. } => "503".into(),
            Decision::UnknownClusters => "unknown".into(),
            Decision::Route {
                cluster,
                via,
                upgrade,
                ..
            } => {
                format!(
                    "{cluster} {via:?}{}",
                    if *upgrade { " upgrade" } else { "" }
                )
            }
        }
    }

    fn check(
        cookie: Option<(ConsumerState, &[&str])>,
        entry: &str,
        down: &[&str],
        policy: WhenAllDown,
        rr: u64,
        want: &str,
    ) {
        let c = cookie.map(|(s, r)| claims(s, r));
        let e = decode_entry(entry.as_bytes()).unwrap();
        let avail = AvailabilityView::with_down(down.iter().copied());
        let d = decide(c.as_ref(), e.as_ref(), &avail, rr, policy);
        assert_eq!(
            summary(&d),
            want,
            "cookie {cookie:?} entry {entry:?} down {down:?} rr {rr}"
        );
        if let Decision::Route { consumer, .. } | Decision::AllDown { consumer } = d {
            assert_eq!(consumer, &ConsumerId::from_bytes([1; 16]));
        }
    }

    use ConsumerState::{Registered as R, Registering as G};
    use WhenAllDown::{FirstManager as FM, Reject as RJ};

    #[test]
    fn only_clusters_of_the_managers_list_are_destinations() {
        let listed = AvailabilityView::of_managers([
            ("a", prealloc_wire::Availability::Available),
            ("b", prealloc_wire::Availability::Down),
        ]);
        let d = |cookie: &[&str], state, policy| {
            let c = claims(state, cookie);
            summary(&decide::<Entry>(Some(&c), None, &listed, 0, policy))
        };
        // A cookie naming only clusters outside the list: anonymous, whatever the policy.
        assert_eq!(d(&["prealloc_control_plane"], R, RJ), "unknown");
        assert_eq!(d(&["x"], G, FM), "unknown");
        // Unknown clusters are skipped; known ones still route.
        assert_eq!(d(&["x", "a"], R, RJ), "a Cookie");
        // The first-manager fallback never goes outside the list.
        assert_eq!(d(&["x", "b"], R, FM), "503");
        assert_eq!(d(&["b"], G, FM), "b AllDownFirstManager");
        // Before any list, the signed cookie is trusted.
        let c = claims(R, &["x"]);
        let none = AvailabilityView::all_available();
        assert_eq!(
            summary(&decide::<Entry>(Some(&c), None, &none, 0, RJ)),
            "x Cookie"
        );
    }

    #[test]
    fn decision_table() {
        // No cookie.
        check(None, "", &[], RJ, 0, "anonymous");
        check(None, "1|r|a,b", &[], RJ, 0, "anonymous");
        // Registering, no entry: the cookie's first manager, whatever the counter.
        check(Some((G, &["a"])), "", &[], RJ, 0, "a FirstManager");
        check(Some((G, &["a"])), "", &[], RJ, 7, "a FirstManager");
        check(Some((G, &["a"])), "", &["a"], RJ, 0, "503");
        check(
            Some((G, &["a"])),
            "",
            &["a"],
            FM,
            0,
            "a AllDownFirstManager",
        );
        // Registering, entry: round-robin over the entry, skipping down.
        check(Some((G, &["a"])), "1|g|a", &[], RJ, 3, "a Table");
        check(Some((G, &["a"])), "1|g|a,b", &[], RJ, 0, "a Table");
        check(Some((G, &["a"])), "1|g|a,b", &[], RJ, 1, "b Table");
        check(Some((G, &["a"])), "1|g|a,b,c", &["b"], RJ, 1, "c Table");
        check(
            Some((G, &["a"])),
            "1|g|a,b,c",
            &["a", "c"],
            RJ,
            5,
            "b Table",
        );
        check(Some((G, &["a"])), "1|g|a,b", &["a", "b"], RJ, 0, "503");
        check(
            Some((G, &["a"])),
            "1|g|a,b",
            &["a", "b"],
            FM,
            1,
            "a AllDownFirstManager",
        );
        // Entry says registered: same routing, and upgrade the cookie.
        check(Some((G, &["a"])), "1|r|a,b", &[], RJ, 1, "b Table upgrade");
        check(
            Some((G, &["a"])),
            "1|r|a,b",
            &["a", "b"],
            FM,
            0,
            "a AllDownFirstManager upgrade",
        );
        check(Some((G, &["a"])), "1|r|a,b", &["a", "b"], RJ, 0, "503");
        // Registered cookie: its own replica set; the entry is not consulted.
        check(Some((R, &["a", "b", "c"])), "", &[], RJ, 2, "c Cookie");
        check(Some((R, &["c", "a", "b"])), "", &[], RJ, 0, "a Cookie");
        check(Some((G, &["b"])), "1|g|b,a", &[], RJ, 0, "a Table");
        check(Some((R, &["a", "b", "c"])), "1|g|z", &[], RJ, 0, "a Cookie");
        check(Some((R, &["a", "b", "c"])), "", &["a"], RJ, 0, "b Cookie");
        check(Some((R, &["a", "b"])), "", &["a", "b"], RJ, 0, "503");
        check(
            Some((R, &["a", "b"])),
            "",
            &["a", "b"],
            FM,
            0,
            "a AllDownFirstManager",
        );
    }

    #[test]
    fn needs_table_only_for_registering() {
        assert!(!needs_table(None));
        assert!(needs_table(Some(&claims(G, &["a"]))));
        assert!(!needs_table(Some(&claims(R, &["a"]))));
    }

    #[test]
    fn round_robin_is_even_over_up_replicas() {
        let avail = AvailabilityView::with_down(["b"]);
        let set = ["a", "b", "c", "d"];
        let mut counts = [0usize; 4];
        for rr in 0..300 {
            let (i, c) = pick(set.iter().copied(), &avail, rr).unwrap();
            assert_eq!(set[i], c, "the position names the pick");
            counts[i] += 1;
        }
        assert_eq!(counts, [100, 0, 100, 100]);
        // List order does not matter: ranks follow names.
        let shuffled = ["c", "a", "d", "b"];
        let got: Vec<&str> = (0..4)
            .map(|rr| {
                pick(
                    shuffled.iter().copied(),
                    &AvailabilityView::all_available(),
                    rr,
                )
                .unwrap()
                .1
            })
            .collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
        // Duplicates are ranked by position and never lose a candidate.
        let dup = ["b", "a", "b"];
        let got: Vec<&str> = (0..3)
            .map(|rr| pick(dup.iter().copied(), &AvailabilityView::all_available(), rr).unwrap())
            .collect::<Vec<(usize, &str)>>()
            .into_iter()
            .map(|(i, c)| {
                assert_eq!(dup[i], c);
                c
            })
            .collect();
        assert_eq!(got, ["a", "b", "b"]);
        assert_eq!(pick(std::iter::empty(), &avail, 0), None);
        assert_eq!(pick(["a"].into_iter(), &avail, u64::MAX), Some((0, "a")));
    }

    #[test]
    fn interleaved_consumers_with_differently_ordered_sets_spread_evenly() {
        // Three registered consumers, first managers a, b and c, same set.
        let consumers = [
            claims(R, &["manager_a", "manager_b", "manager_c"]),
            claims(R, &["manager_b", "manager_c", "manager_a"]),
            claims(R, &["manager_c", "manager_a", "manager_b"]),
        ];
        let avail = AvailabilityView::all_available();
        let mut total = std::collections::BTreeMap::new();
        // One worker's counter, requests of the consumers in turn.
        for rr in 0..90u64 {
            let who = (rr % 3) as usize;
            let d = decide::<Entry>(Some(&consumers[who]), None, &avail, rr, RJ);
            let Decision::Route { cluster, .. } = d else {
                panic!("{d:?}")
            };
            *total.entry(cluster).or_insert(0) += 1;
        }
        assert_eq!(
            total.values().copied().collect::<Vec<_>>(),
            vec![30, 30, 30]
        );
        // (Strict alternation is the worst case for one consumer: with 3 consumers
        // and 3 replicas each keeps landing on the same rank; the shared counter
        // evens out the worker, not each consumer.) Consecutive requests of one
        // consumer cycle through its set.
        let mut seen = vec![];
        for rr in 0..3 {
            if let Decision::Route { cluster, .. } =
                decide::<Entry>(Some(&consumers[1]), None, &avail, rr, RJ)
            {
                seen.push(cluster);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, ["manager_a", "manager_b", "manager_c"]);
    }

    #[test]
    fn impossible_empty_cookie_replicas_are_anonymous() {
        let c = claims(R, &[]);
        let d = decide::<Entry>(Some(&c), None, &AvailabilityView::all_available(), 0, RJ);
        assert_eq!(d, Decision::Anonymous);
    }

    #[test]
    fn upgraded_claims_carry_the_entry_replicas() {
        let c = claims(G, &["a"]);
        let e = decode_entry(b"1|r|a,b,c").unwrap().unwrap();
        let u = upgraded_claims(&c, &e, 99);
        assert_eq!(u.state, R);
        assert_eq!(u.replicas, vec!["a", "b", "c"]);
        assert_eq!(u.expires_at, 99);
        assert_eq!(u.consumer, c.consumer);
    }

    #[test]
    fn a_consumer_on_more_managers_than_a_cookie_holds_is_upgraded_to_the_first_sixteen() {
        let c = claims(G, &["m0"]);
        let many: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
        let raw = format!("1|r|{}", many.join(","));
        let e = decode_entry(raw.as_bytes()).unwrap().unwrap();
        let u = upgraded_claims(&c, &e, 99);
        assert_eq!(u.replicas, many[..crate::cookie::MAX_REPLICAS].to_vec());
        // And it signs: a cookie that never signed would leave it pinned for good.
        assert!(crate::cookie::try_sign(&u, b"0123456789abcdef0123456789abcdef").is_ok());
    }
}
