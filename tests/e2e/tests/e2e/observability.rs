//! The shipped observability files (`observability/`) name only metrics that a
//! real control plane and a real Envoy of each build export, the Envoy scrape
//! filter keeps them, the dashboard is a valid Grafana dashboard with a query
//! on every panel, and `promtool` accepts the rules and the config where it is
//! installed (`cargo xtask setup` fetches it).

use prealloc_e2e::client::{blocking_get, Client};
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::envoy::workspace_root;
use prealloc_e2e::story::{send_requests, Stack, StackOptions, STEP_TIMEOUT};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn file(name: &str) -> String {
    let path = workspace_root().join("observability").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `prealloc_*` identifier in a PromQL expression.
fn prealloc_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("prealloc_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not part of a longer identifier (e.g. a label value like job="prealloc-…").
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"' || c == '-') {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// The PromQL of every alert rule (`expr:` lines of alerts.yml).
fn rule_exprs() -> Vec<String> {
    file("alerts.yml")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .map(|e| e.trim().to_owned())
        .collect()
}

/// The PromQL of every dashboard panel; panics unless the dashboard is well formed.
fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&file("grafana-dashboard.json")).expect("the dashboard is JSON");
    assert!(
        d["title"].is_string() && d["uid"].is_string(),
        "title and uid"
    );
    let panels = d["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id: {p}"
        );
        assert!(p["title"].is_string() && p["gridPos"]["w"].is_u64(), "{p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "a panel without a query: {}",
            p["title"]
        );
        for t in targets {
            let e = t["expr"].as_str().expect("expr");
            assert!(!e.trim().is_empty());
            exprs.push(e.to_owned());
        }
    }
    exprs
}

/// Metric names in Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The `filter` regex of the Envoy scrape job in prometheus.yml.
fn envoy_scrape_filter() -> String {
    let text = file("prometheus.yml");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("filter:"))
        .expect("the Envoy job has a filter param");
    line.split('"').nth(1).expect("a quoted regex").to_owned()
}

fn promtool() -> Option<PathBuf> {
    let candidate = std::env::var_os("PREALLOC_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"));
    Command::new(&candidate)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| candidate)
}

#[test]
fn promtool_accepts_the_rules_and_the_config() {
    // The rules and the dashboard parse (whether or not promtool is here).
    assert!(rule_exprs().len() >= 8, "{:?}", rule_exprs());
    dashboard_exprs();
    let Some(promtool) = promtool() else {
        println!("promtool not installed: checked by parsing only (cargo xtask setup fetches it)");
        return;
    };
    let dir = workspace_root().join("observability");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

each_build! {
    #[tokio::test]
    async fn every_metric_the_rules_and_the_dashboard_name_is_exported(build) {
        let stack = Stack::start(&StackOptions::new(Replication::Active).with_build(build));
        // Some traffic, so every counter has been touched at least once.
        let mut c = Client::new(stack.envoys[0].addr());
        let s = stack.sign_up(&mut c, STEP_TIMEOUT).await.expect("sign-up");
        send_requests(&mut c, &s.cookie, 3).await.expect("requests");
        stack.envoys[0].wait_for_stat("prealloc_requests_table", Duration::from_secs(5), |v| v > 0);

        let (_, cp) = blocking_get(stack.cp.addr(), "/metrics", Duration::from_secs(5)).expect("/metrics");
        let filter = envoy_scrape_filter();
        let path = format!("/stats/prometheus?filter={}", filter.replace('|', "%7C"));
        let (status, envoy) =
            blocking_get(stack.envoys[0].admin_addr(), &path, Duration::from_secs(5)).expect("Envoy stats");
        assert_eq!(status, 200, "{envoy}");
        let cp = exported(&cp);
        // What prometheus.yml's metric_relabel_configs does to the native build's names.
        let relabel = "envoy_dynamicmodulescustom_";
        assert!(
            file("prometheus.yml").contains(&format!("regex: {relabel}(prealloc_.*)")),
            "the scrape config renames {relabel}prealloc_*"
        );
        let envoy: BTreeSet<String> = exported(&envoy)
            .into_iter()
            .map(|n| n.strip_prefix(relabel).map(str::to_owned).unwrap_or(n))
            .collect();
        assert!(envoy.contains("prealloc_poller_version"), "the filter's stats in /stats/prometheus: {envoy:?}");

        let mut missing = Vec::new();
        let mut named = BTreeSet::new();
        for expr in rule_exprs().iter().chain(&dashboard_exprs()) {
            for name in prealloc_names(expr) {
                if !cp.contains(&name) && !envoy.contains(&name) {
                    missing.push(format!("{name} (in {expr})"));
                }
                named.insert(name);
            }
        }
        println!("{} metrics named by the rules and the dashboard, all exported ({})", named.len(), build.name());
        assert!(missing.is_empty(), "named but not exported: {missing:#?}\ncontrol plane: {cp:?}\nEnvoy: {envoy:?}");
        stack.assert_no_violations();
    }
}
