//! Self-tests of the Envoy launcher: template rendering, readiness, admin stats, clean shutdown.

use prealloc_e2e::client::Client;
use prealloc_e2e::envoy::{Endpoint, Envoy, EnvoyConfig, EnvoyOptions};
use prealloc_e2e::manager::{DefaultBackend, RequestKind};

fn three_managers() -> Vec<(String, Endpoint)> {
    (1..=3)
        .map(|i| (format!("m{i}"), Endpoint::new("127.0.0.1", 9000 + i)))
        .collect()
}

#[test]
fn template_renders_every_placeholder() {
    let cfg = EnvoyConfig::new(
        three_managers(),
        Endpoint::new("127.0.0.1", 8080),
        Endpoint::new("127.0.0.1", 8081),
    );
    let yaml = cfg.render();
    for id in [
        "manager_m1",
        "manager_m2",
        "manager_m3",
        "default_backend",
        "prealloc_control_plane",
    ] {
        assert!(
            yaml.contains(&format!("- name: {id}\n")),
            "cluster {id} missing in:\n{yaml}"
        );
    }
    assert!(yaml.contains(r#"{"filter":{"#), "filter config embedded");
    assert!(yaml.contains(r#"{"poller":{"#), "poller config embedded");
    assert!(!yaml.contains("{{"));
}

/// Envoy with a plain config (no wasm): proves the launcher, not the filter.
#[tokio::test]
async fn envoy_starts_on_free_ports_and_reports_stats() {
    let backend = DefaultBackend::start();
    let yaml = format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: plain
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config:
            virtual_hosts:
            - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: default_backend }} }}] }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: default_backend
    connect_timeout: 1s
    load_assignment:
      cluster_name: default_backend
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}]
"#,
        backend.port()
    );
    let envoy = Envoy::start_yaml(&yaml, &EnvoyOptions::default());
    let mut c = Client::new(envoy.addr());
    for _ in 0..3 {
        let r = c.get("/hello", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["manager"], "default");
    }
    assert_eq!(backend.count(RequestKind::Anonymous), 3);
    let sent = envoy.wait_for_stat(
        "cluster.default_backend.upstream_rq_200",
        std::time::Duration::from_secs(5),
        |v| v >= 3,
    );
    assert_eq!(sent, 3);
    assert_eq!(
        envoy.stat("default_backend.upstream_rq_200"),
        3,
        "suffix lookup finds the same counter"
    );
    let pid_dir = envoy.dir().to_path_buf();
    drop(envoy);
    assert!(!pid_dir.exists(), "Envoy's temp dir is removed on drop");
}
