//! The docs tell the truth (rust-analyzer's tidy style): every file they name
//! exists, the README's Envoy snippet completed as the README says is a valid
//! Envoy 1.40 config, and the example control-plane configs pass `check-config`.

use prealloc_e2e::control_plane::control_plane_binary;
use prealloc_e2e::envoy::{validate_yaml, wasm_path, workspace_root, Build};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The docs a user reads: the front door, the architecture, every crate and folder README.
const DOCS: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "BENCHMARKS.md",
    "SECURITY.md",
    "observability/README.md",
    "docs/MANAGER-CONTRACT.md",
    "filter/README.md",
    "control-plane/README.md",
    "envoy/README.md",
    "tests/e2e/README.md",
    "tests/wasm-host/README.md",
];

/// Where a bare source-file name in the docs may live (ARCHITECTURE.md names
/// `store/sqlite.rs`, `routes.rs` within their crate's section).
const SOURCE_DIRS: &[&str] = &[
    "filter/core/src",
    "filter/wasm/src",
    "filter/native/src",
    "control-plane/src",
    "control-plane/tests/it",
    "wire/src",
    "tests/e2e/src",
    "tests/e2e/tests/e2e",
    "tests/wasm-host/src",
    "tests/wasm-host/tests/wasm_host",
    "xtask/src",
    "bench/src",
];

/// Extensions of files the repository holds (a path with one of them must exist).
const EXTENSIONS: &[&str] = &[
    "rs", "md", "toml", "yaml", "tmpl", "sh", "lua", "conf", "json", "png",
];

/// Names that look like paths but are the user's own files or build outputs.
fn is_not_a_repository_path(p: &str) -> bool {
    p.starts_with('/')
        || p.starts_with("target/")
        || p.starts_with(".tools/")
        || p.starts_with("http")
        || p.contains('<')
        || p.contains('{')
        || p.contains('*')
        || p.starts_with("bench/results/")
        || matches!(p, "my.toml" | "envoy.yaml" | "prealloc.db")
}

/// Candidate paths of one doc: markdown link targets, and backticked words
/// that end in a repository file extension or a `/`.
fn named_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("](") {
        let rest = &text[i + 2..];
        if let Some(end) = rest.find(')') {
            let target = rest[..end].split('#').next().unwrap_or("");
            if !target.is_empty() && !target.contains("://") {
                out.push(target.to_owned());
            }
        }
    }
    for (n, part) in text.split('`').enumerate() {
        // Odd parts are inside backticks; code fences (```) give empty parts.
        if n % 2 == 0 || part.is_empty() || part.contains(char::is_whitespace) {
            continue;
        }
        let ext_ok = part
            .rsplit_once('.')
            .is_some_and(|(stem, ext)| !stem.is_empty() && EXTENSIONS.contains(&ext));
        let dir_ok = part.ends_with('/') && part.len() > 1;
        if ext_ok || dir_ok {
            out.push(part.to_owned());
        }
    }
    out.retain(|p| !is_not_a_repository_path(p));
    out
}

fn resolves(root: &Path, doc_dir: &Path, name: &str) -> bool {
    let candidates = [doc_dir.to_path_buf(), root.to_path_buf()]
        .into_iter()
        .chain(SOURCE_DIRS.iter().map(|d| root.join(d)));
    candidates
        .map(|base: PathBuf| base.join(name))
        .any(|p| p.exists())
}

#[test]
fn every_file_the_docs_name_exists() {
    let root = workspace_root();
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in DOCS {
        let path = root.join(doc);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{doc} is listed in DOCS but cannot be read: {e}"));
        let dir = path.parent().unwrap();
        for name in named_paths(&text) {
            checked += 1;
            if !resolves(&root, dir, &name) {
                missing.push(format!("{doc}: `{name}`"));
            }
        }
    }
    assert!(checked > 100, "the scan finds the docs' paths ({checked})");
    assert!(
        missing.is_empty(),
        "the docs name files that do not exist:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_path_scan_sees_links_and_backticked_paths_but_not_user_files() {
    let text = "see [x](../a/b.md#part) and `control-plane/src/api.rs`, `routes.rs`, \
                `envoy/`, `/etc/envoy/x.wasm`, `my.toml`, `GET /v1/routes`, `target/debug/x`";
    assert_eq!(
        named_paths(text),
        [
            "../a/b.md",
            "control-plane/src/api.rs",
            "routes.rs",
            "envoy/"
        ]
    );
    let root = workspace_root();
    assert!(resolves(&root, &root, "store/sqlite.rs"));
    assert!(!resolves(&root, &root, "store/nothing.rs"));
}

/// The first YAML block after `marker` in README.md, split at its top-level keys.
fn readme_snippet(marker: &str) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let step = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README.md has no {marker:?} before its snippet"));
    let after = &readme[step..];
    let start = after.find("```yaml\n").expect("a yaml block follows") + "```yaml\n".len();
    let block = &after[start..];
    let block = &block[..block.find("```").expect("the yaml block ends")];
    let lines: Vec<&str> = block.lines().collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut pieces: Vec<(String, String)> = Vec::new();
    for line in lines {
        let line = line.get(indent..).unwrap_or("");
        let code = line.split(" #").next().unwrap_or("").trim_end();
        let top_level = !line.starts_with([' ', '#']) && !code.is_empty();
        if top_level && code.ends_with(':') {
            pieces.push((code.trim_end_matches(':').to_owned(), String::new()));
        } else if let (true, Some((key, value))) = (top_level, code.split_once(": ")) {
            // `key: value` on one line: the value is the piece.
            pieces.push((key.to_owned(), format!("{value}\n")));
        } else if let Some((_, body)) = pieces.last_mut() {
            if !line.starts_with('#') {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    pieces
}

/// Indents a YAML list so it sits under a key at `spaces`.
fn indent(body: &str, spaces: usize) -> String {
    body.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(spaces)))
        .collect()
}

/// The README's pieces placed as it says: `bootstrap_extensions` at the top
/// level, `http_filters` into the listener's `http_connection_manager`,
/// `routes` into a virtual host of its `route_config`, `clusters` under
/// `static_resources`; the `<...>` values and the `.wasm` path replaced.
fn completed(pieces: &[(String, String)]) -> String {
    let piece = |k: &str| {
        &pieces
            .iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("no {k} piece"))
            .1
    };
    format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}\n\
         bootstrap_extensions:\n{}\
         static_resources:\n\
         \x20 listeners:\n\
         \x20   - name: ingress\n\
         \x20     address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}\n\
         \x20     filter_chains:\n\
         \x20       - filters:\n\
         \x20           - name: envoy.filters.network.http_connection_manager\n\
         \x20             typed_config:\n\
         \x20               \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
         \x20               stat_prefix: ingress\n\
         \x20               common_http_protocol_options: {}\
         \x20               normalize_path: {}\
         \x20               merge_slashes: {}\
         \x20               route_config:\n\
         \x20                 virtual_hosts:\n\
         \x20                   - name: all\n\
         \x20                     domains: [\"*\"]\n\
         \x20                     routes:\n{}\
         \x20               http_filters:\n{}\
         \x20 clusters:\n{}",
        indent(piece("bootstrap_extensions"), 0),
        piece("common_http_protocol_options"),
        piece("normalize_path"),
        piece("merge_slashes"),
        indent(piece("routes"), 22),
        indent(piece("http_filters"), 16),
        indent(piece("clusters"), 2),
    )
    .replace("/etc/envoy/prealloc_filter.wasm", &wasm_path().display().to_string())
    .replace("<envoy token>", "envoy-docs-test-token-0123")
    .replace(
        "<random secret, 32+ bytes>",
        "docs-test-cookie-secret-of-32-bytes-or-more",
    )
}

fn envoy_validates(yaml: &str, build: Build) {
    assert!(!yaml.contains('<'), "every placeholder replaced:\n{yaml}");
    if let Err(out) = validate_yaml(yaml, build) {
        panic!("envoy --mode validate refused the README snippet completed as:\n{yaml}\n{out}");
    }
}

#[test]
fn the_readme_envoy_snippet_completed_as_the_readme_says_is_valid() {
    let pieces = readme_snippet("pieces to your Envoy config");
    let names: Vec<&str> = pieces.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "bootstrap_extensions",
            "common_http_protocol_options",
            "normalize_path",
            "merge_slashes",
            "http_filters",
            "routes",
            "clusters"
        ],
        "the README's pieces"
    );
    envoy_validates(&completed(&pieces), Build::Wasm);
}

#[test]
fn the_readme_native_snippet_completed_as_the_readme_says_is_valid() {
    let mut pieces = readme_snippet("**The native build**");
    let names: Vec<&str> = pieces.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["bootstrap_extensions", "http_filters", "routes"],
        "the README's native pieces"
    );
    // "the clusters and the http_connection_manager options stay as above"
    pieces.extend(
        readme_snippet("pieces to your Envoy config")
            .into_iter()
            .filter(|(k, _)| {
                [
                    "clusters",
                    "common_http_protocol_options",
                    "normalize_path",
                    "merge_slashes",
                ]
                .contains(&k.as_str())
            }),
    );
    envoy_validates(&completed(&pieces), Build::Native);
}

#[test]
fn the_example_control_plane_configs_pass_check_config() {
    let dir = workspace_root().join("control-plane/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(control_plane_binary())
                .args(["check-config", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "check-config refused {}:\n{}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "no example config in {}", dir.display());
}

#[test]
fn no_shipped_envoy_config_lets_a_request_past_a_failed_filter() {
    // FAIL_OPEN would skip the wasm filter, and a client's route header would
    // then pick the cluster: every config a user copies says FAIL_RELOAD for the
    // filter (and FAIL_CLOSED for the poller), nothing says FAIL_OPEN.
    let root = workspace_root();
    for file in [
        "envoy/prealloc.yaml.tmpl",
        "envoy/docker/envoy.yaml",
        "README.md",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        let policies: Vec<&str> = text
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("failure_policy:"))
            .collect();
        assert!(
            policies.iter().any(|l| l.contains("FAIL_RELOAD")),
            "{file}: the filter's failure_policy is not FAIL_RELOAD: {policies:?}"
        );
        assert!(
            policies
                .iter()
                .all(|l| l.contains("FAIL_RELOAD") || l.contains("FAIL_CLOSED")),
            "{file}: {policies:?}"
        );
    }
}
