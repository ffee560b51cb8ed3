//! The demo binary, as a user runs it with `--once`: exits 0 and prints the story's transcript.

use std::process::Command;

#[test]
fn demo_once_tells_the_whole_story_and_exits_zero() {
    // Both modes and both builds at once: each demo takes free ports.
    let runs: Vec<_> = [
        ("active", "wasm"),
        ("reported", "wasm"),
        ("active", "native"),
        ("reported", "native"),
    ]
    .into_iter()
    .map(|(mode, build)| {
        let child = Command::new(env!("CARGO_BIN_EXE_prealloc-demo"))
            // Port 0: parallel tests (and a demo someone is running) may hold 10000.
            .args(["--once", "--port", "0", "--mode", mode, "--build", build])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start prealloc-demo");
        (format!("{mode} {build}"), child)
    })
    .collect();
    for (mode, child) in runs {
        let out = child.wait_with_output().expect("run prealloc-demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "prealloc-demo --once (mode, build: {mode}) failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        for line in [
            "sign-up: POST /signup via Envoy",
            "(pinned to the first manager)",
            "(round-robin over 2 replicas:",
            "cookie upgrade: the response set prealloc=",
            "grace period over: the entry left the routing table",
            "(balanced without the table: m1=2 m2=2 m3=2)",
            "invariant: 0 of",
            "the story held",
        ] {
            assert!(
                stdout.contains(line),
                "--mode {mode}: transcript lacks {line:?}:\n{stdout}"
            );
        }
        // --once never prints the interactive part.
        assert!(!stdout.contains("Stop with Ctrl-C"), "{stdout}");
    }
}
