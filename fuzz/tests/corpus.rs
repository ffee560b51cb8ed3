//! Replays every committed fuzz input through its target: the seeds, the
//! corpus libFuzzer grew (`fuzz/corpus/<target>/`), and inputs that once
//! broke a property (`fuzz/regressions/<target>/`, kept after the fix). A
//! panic here is a bug found by fuzzing that came back.
//!
//! `PREALLOC_BLESS=1` writes the seeds into `fuzz/corpus/<target>/seed-<n>`
//! (what `cargo xtask fuzz` starts from on a fresh corpus).

use prealloc_fuzz::{seeds, target, TARGETS};
use std::path::{Path, PathBuf};

fn dir(kind: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(kind).join(name)
}

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

#[test]
fn every_target_has_seeds_and_a_committed_corpus() {
    for (name, _) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "target {name} has no seeds");
        let corpus = dir("corpus", name);
        if std::env::var_os("PREALLOC_BLESS").is_some() {
            std::fs::create_dir_all(&corpus).unwrap();
            for (i, (_, s)) in seeds.iter().enumerate() {
                std::fs::write(corpus.join(format!("seed-{i}")), s).unwrap();
            }
        }
        assert!(
            !inputs(&corpus).is_empty(),
            "{} is empty: run `PREALLOC_BLESS=1 cargo test -p prealloc-fuzz` (the seeds), \
             then `cargo xtask fuzz {name}`",
            corpus.display()
        );
    }
}

#[test]
fn every_corpus_directory_belongs_to_a_target() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(kind))
        else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                target(&name).is_some(),
                "fuzz/{kind}/{name} is not a target's directory (targets: {:?})",
                TARGETS.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn every_committed_input_passes_its_target() {
    let mut total = 0;
    for (name, run) in TARGETS {
        for (want, s) in seeds(name) {
            assert_eq!(
                run(&s),
                want,
                "a seed of {name} no longer reaches its path: {}",
                String::from_utf8_lossy(&s)
            );
        }
        for kind in ["corpus", "regressions"] {
            for (path, bytes) in inputs(&dir(kind, name)) {
                // A panic names the input, so it can be run again with
                // `cargo xtask fuzz <target> <file>`.
                eprintln!("{name}: {}", path.display());
                run(&bytes);
                total += 1;
            }
        }
    }
    eprintln!("{total} committed inputs replayed");
    assert!(total > 0, "no committed input at all");
}

/// The libFuzzer drivers and `cargo xtask fuzz` know every target.
#[test]
fn every_target_has_a_libfuzzer_driver_and_an_xtask_entry() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("libfuzzer/Cargo.toml")).unwrap();
    let xtask = std::fs::read_to_string(root.join("../xtask/src/main.rs")).unwrap();
    for (name, _) in TARGETS {
        let driver = root.join(format!("libfuzzer/fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&driver)
            .unwrap_or_else(|e| panic!("{}: {e}", driver.display()));
        assert!(
            text.contains(&format!("prealloc_fuzz::{name}(data)")),
            "{} does not call prealloc_fuzz::{name}",
            driver.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "no [[bin]] {name} in fuzz/libfuzzer/Cargo.toml"
        );
        assert!(
            xtask.contains(&format!("    \"{name}\",\n")),
            "{name} is missing from FUZZ_TARGETS in xtask/src/main.rs"
        );
    }
}
