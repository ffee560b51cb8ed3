//! Plugin configuration: a bad one is refused by on_configure (Envoy then rejects it), good ones of both roles are accepted.

use crate::support::*;
use prealloc_wasm_host::Host;
use serde_json::json;

fn configures(config: &str) -> bool {
    let host = Host::new();
    host.echo_logs(false);
    host.new_vm().configure_plugin(config)
}

#[test]
fn the_default_filter_and_poller_configurations_are_accepted() {
    assert!(configures(&filter_json().to_string()));
    assert!(configures(&poller_json().to_string()));
}

#[test]
fn bad_configurations_are_refused() {
    let short_key = json!({"filter": {"cookie": {"keys": ["too-short"]}}});
    let no_keys = json!({"filter": {"cookie": {"keys": []}}});
    let nine_keys = json!({"filter": {"cookie": {"keys": vec!["k".repeat(40); 9]}}});
    let mut unknown_field = filter_json();
    unknown_field["filter"]["route_headr"] = json!("x");
    let mut unknown_cookie_field = filter_json();
    unknown_cookie_field["filter"]["cookie"]["maxage"] = json!(1);
    let mut bad_policy = filter_json();
    bad_policy["filter"]["when_all_down"] = json!("random");
    let mut poller_unknown = poller_json();
    poller_unknown["poller"]["tokn"] = json!("x");
    let poller_no_token = json!({"poller": {}});
    let both_roles = json!({"filter": filter_json()["filter"], "poller": poller_json()["poller"]});
    let cases = [
        "".to_owned(),
        "not json".to_owned(),
        "{}".to_owned(),
        "[]".to_owned(),
        json!({"router": {}}).to_string(),
        short_key.to_string(),
        no_keys.to_string(),
        nine_keys.to_string(),
        unknown_field.to_string(),
        unknown_cookie_field.to_string(),
        bad_policy.to_string(),
        poller_unknown.to_string(),
        poller_no_token.to_string(),
        both_roles.to_string(),
    ];
    for case in &cases {
        assert!(
            !configures(case),
            "the filter accepted a bad configuration: {case}"
        );
    }
}

#[test]
fn a_refused_configuration_is_logged_with_what_is_wrong() {
    let host = Host::new();
    host.echo_logs(false);
    let mut config = filter_json();
    config["filter"]["route_headr"] = json!("x");
    assert!(!host.new_vm().configure_plugin(&config.to_string()));
    let logs = host.logs();
    assert!(
        logs.iter()
            .any(|l| l.level >= 3 && l.message.contains("route_headr")),
        "no warning naming the bad field: {logs:#?}"
    );
}

#[test]
fn a_custom_route_header_is_set_and_stripped_from_clients() {
    let mut config = filter_json();
    config["filter"]["route_header"] = json!("x-upstream-pick");
    let (host, vm) = filter_with(config);
    let c = cookie(
        &host,
        &consumer(1),
        prealloc_wire::ConsumerState::Registering,
        &["manager_a"],
    );
    let s = send(&vm, &[("x-upstream-pick", "manager_evil"), ("cookie", &c)]);
    assert_eq!(
        s.forwarded_request_header_values("x-upstream-pick"),
        vec!["manager_a".to_owned()]
    );
    let anon = send(&vm, &[("x-upstream-pick", "manager_evil")]);
    assert_eq!(anon.forwarded_request_header("x-upstream-pick"), None);
}
