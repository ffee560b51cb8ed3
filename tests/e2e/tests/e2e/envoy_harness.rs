//! Self-tests of the Envoy launcher: template rendering, readiness, admin stats, clean shutdown.

use prealloc_e2e::client::Client;
use prealloc_e2e::envoy::{Build, Endpoint, Envoy, EnvoyConfig, EnvoyOptions};
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
    if std::env::var_os("PREALLOC_KEEP_LOGS").is_none() {
        assert!(!pid_dir.exists(), "Envoy's temp dir is removed on drop");
    }
}

/// The container config of a build, and where it is committed.
fn docker_config(build: Build) -> (String, std::path::PathBuf) {
    let host = "host.docker.internal";
    let mut cfg = EnvoyConfig::new(
        (1..=3)
            // The managers' ports of control-plane/examples/prealloc.toml (admin_url 9101..9103).
            .map(|i| (format!("m{i}"), Endpoint::new(host, 9100 + i)))
            .collect(),
        Endpoint::new(host, 9100),
        Endpoint::new(host, 7070),
    )
    .with_build(build);
    cfg.listen_address = "0.0.0.0".into();
    cfg.listen_port = 10000;
    cfg.admin_address = "0.0.0.0".into();
    cfg.admin_port = 9901;
    cfg.wasm_path = "/etc/envoy/prealloc_filter.wasm".into();
    cfg.filter = serde_json::json!({
        "cookie": { "keys": ["CHANGE-ME-to-a-random-secret-of-at-least-32-bytes"] },
        "when_all_down": "reject",
        "retry_after_s": 5,
        "availability_refresh_ms": 100,
        // Sign-up through the filter, with tokens.envoy of control-plane/examples/prealloc.toml.
        "signup": {
            "path": "/signup",
            "token": "envoy-demo-token-change-me",
            "resource_type": "mailbox",
        },
    });
    cfg.poller = serde_json::json!({
        "cluster": "prealloc_control_plane",
        "authority": "prealloc-control-plane",
        // tokens.envoy of control-plane/examples/prealloc.toml.
        "token": "envoy-demo-token-change-me",
        "wait_ms": 30000,
        "min_backoff_ms": 100,
        "max_backoff_ms": 5000,
    });
    let file = match build {
        Build::Wasm => "envoy/docker/envoy.yaml",
        Build::Native => "envoy/docker/envoy-native.yaml",
    };
    let rendered = format!(
        "# GENERATED from envoy/prealloc.yaml.tmpl ({} build) by the e2e test\n\
         # docker_compose_config_is_the_rendered_template; do not edit by hand.\n{}",
        build.name(),
        cfg.render()
    );
    (rendered, prealloc_e2e::envoy::workspace_root().join(file))
}

/// `envoy/docker/envoy.yaml` and `envoy/docker/envoy-native.yaml` (mounted by
/// `envoy/docker-compose.yaml` and `envoy/docker-compose.native.yaml`) are the
/// template rendered for the container; this keeps them in step with it.
/// Regenerate with `PREALLOC_BLESS=1 cargo test -p prealloc-e2e docker_compose`.
#[test]
fn docker_compose_config_is_the_rendered_template() {
    for build in Build::ALL {
        let (rendered, path) = docker_config(build);
        if std::env::var_os("PREALLOC_BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{} is out of date with envoy/prealloc.yaml.tmpl; run PREALLOC_BLESS=1 cargo test -p prealloc-e2e docker_compose",
            path.display()
        );
    }
}

/// The container configs are valid for Envoy 1.40 (`--mode validate`, with the
/// container's module paths pointed at the local builds).
#[test]
fn docker_compose_config_validates() {
    for build in Build::ALL {
        let (_, committed) = docker_config(build);
        let yaml = std::fs::read_to_string(&committed).unwrap().replace(
            "/etc/envoy/prealloc_filter.wasm",
            &prealloc_e2e::envoy::wasm_path().display().to_string(),
        );
        if let Err(out) = prealloc_e2e::envoy::validate_yaml(&yaml, build) {
            panic!(
                "envoy --mode validate refused {} ({} build):\n{out}",
                committed.display(),
                build.name()
            );
        }
    }
}
