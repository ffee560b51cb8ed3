//! The control plane's modules form layers: no import circle, and the wiring
//! (`plane.rs`) sits on top where nothing below imports it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name -> the crate modules it names (`crate::x`, `crate::{x, y}`).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    let mut files = vec![];
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // Every file below a directory belongs to its module (`store/…`).
            let module = path.file_name().unwrap().to_str().unwrap().to_owned();
            let mut dirs = vec![path];
            while let Some(dir) = dirs.pop() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        dirs.push(p);
                    } else {
                        files.push((module.clone(), p));
                    }
                }
            }
        } else {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
            files.push((stem, path));
        }
    }
    for (module, path) in files {
        if module == "lib" || module == "main" {
            continue; // the crate root declares modules; the binary is the top
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let deps: &mut BTreeSet<String> = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or("").trim())
                    .collect(),
                None => vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")],
            };
            for n in names {
                if !n.is_empty()
                    && n != module
                    && n.chars().next().is_some_and(|c| c.is_lowercase())
                {
                    deps.insert(n.to_owned());
                }
            }
        }
    }
    // `now_ms` and friends live in lib.rs: not a module.
    for deps in graph.values_mut() {
        deps.retain(|d| d != "now_ms");
    }
    graph
}

/// A cycle through `from`, if there is one, as a path of module names.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|s| s == m) {
            let mut c = stack[pos..].to_vec();
            c.push(m.to_owned());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_owned());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = visit(graph, m, &mut vec![], &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_control_planes_modules_have_no_import_circle() {
    let graph = imports();
    assert!(
        graph.contains_key("writer") && graph.contains_key("api"),
        "{graph:?}"
    );
    assert!(
        graph["api"].contains("command"),
        "the scan sees imports: {graph:?}"
    );
    if let Some(c) = cycle(&graph) {
        panic!("import circle: {}", c.join(" -> "));
    }
}

#[test]
fn nothing_below_the_wiring_imports_it() {
    for (module, deps) in imports() {
        if deps.contains("plane") {
            assert_eq!(module, "server", "{module} imports the wiring (plane.rs)");
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_circle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}
