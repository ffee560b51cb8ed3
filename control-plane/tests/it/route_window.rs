//! The route window, a pure rule of the registry: a consumer is in the pushed
//! table while registering and for `grace_period_ms` after it registered.

use prealloc_control_plane::config::Config;
use prealloc_control_plane::registry::{NewId, Registry};
use prealloc_wire::ConsumerId;
use std::path::Path;

fn registry(grace_ms: u64) -> Registry {
    let mut s = format!(
        "database = \"x.db\"\ngrace_period_ms = {grace_ms}\n[tokens]\nenvoy = \"envoy-token-0123456789\"\n\
         admin = \"admin-token-0123456789\"\n[replication]\ntarget = \"all\"\n"
    );
    for i in 0..2 {
        s.push_str(&format!(
            "[[managers]]\nid = \"m{i}\"\ncluster = \"c{i}\"\nlocation = \"l\"\n\
             admin_url = \"http://127.0.0.1:1\"\ncapacity = {{ mailbox = 10 }}\n"
        ));
    }
    s.push_str("[[pools]]\nresource_type = \"mailbox\"\nlocation = \"l\"\ntarget_depth = 1\n");
    let cfg = Config::parse(&s, Path::new("/")).unwrap();
    let mut reg = Registry::new(&cfg);
    let mut ops = vec![];
    let r = reg.reserve(0, 0, &mut ops).unwrap();
    reg.provisioned(r.id, &mut ops);
    reg
}

#[test]
fn the_window_covers_registering_and_the_grace_period_after_registration() {
    let mut reg = registry(1000);
    let c = ConsumerId::from_bytes([7; 16]);
    let mut ops = vec![];
    assert!(!reg.in_route_window(&c, 0), "unknown consumers are outside");
    let (registration, _) = reg
        .register("mailbox", None, NewId::Given(c.clone()), 100, &mut ops)
        .unwrap();
    let other = if registration.manager == "m0" {
        "m1"
    } else {
        "m0"
    };
    // (now, in window, window over) while registering: always in, never over.
    for now in [100, 5_000, u64::MAX] {
        assert!(reg.in_route_window(&c, now), "registering at {now}");
        assert!(!reg.route_window_over(&c, now));
    }
    assert_eq!(reg.route_window_end(&c), None);
    reg.add_replica(&c, other, 2_000, &mut ops).unwrap();
    assert_eq!(reg.route_window_end(&c), Some(3_000));
    for (now, inside) in [(2_000, true), (2_999, true), (3_000, false), (9_000, false)] {
        assert_eq!(reg.in_route_window(&c, now), inside, "registered, at {now}");
        assert_eq!(reg.route_window_over(&c, now), !inside, "at {now}");
    }
    let (entries, leaving) = reg.route_window(2_500);
    assert_eq!(entries.len(), 1);
    assert_eq!(leaving, [(3_000, c.clone())]);
    let (entries, leaving) = reg.route_window(3_000);
    assert!(entries.is_empty() && leaving.is_empty());
}

#[test]
fn a_zero_grace_period_closes_the_window_at_registration() {
    let mut reg = registry(0);
    let c = ConsumerId::from_bytes([9; 16]);
    let mut ops = vec![];
    let (registration, _) = reg
        .register("mailbox", None, NewId::Given(c.clone()), 10, &mut ops)
        .unwrap();
    let other = if registration.manager == "m0" {
        "m1"
    } else {
        "m0"
    };
    reg.add_replica(&c, other, 20, &mut ops).unwrap();
    assert!(!reg.in_route_window(&c, 20));
    assert!(reg.route_window_over(&c, 20));
}
