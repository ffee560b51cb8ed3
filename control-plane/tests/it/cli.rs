//! The binary's command line: help, config checks and the admin listings.

use crate::support::{Db, Setup};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prealloc-control-plane"))
}

#[test]
fn help_explains_every_command() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "serve",
        "check-config",
        "managers",
        "pools",
        "consumers",
        "routing table",
    ] {
        assert!(
            text.contains(word),
            "--help does not mention {word}:\n{text}"
        );
    }
}

#[test]
fn check_config_names_the_bad_key_and_fails() {
    let db = Db::new();
    let path = db.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        Setup::default().toml(&db).replace("target_depth", "depth"),
    )
    .unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("depth") && err.contains("bad.toml"), "{err}");
    let good = db.dir.path().join("good.toml");
    std::fs::write(&good, Setup::default().toml(&db)).unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 managers"));
}

#[tokio::test]
async fn admin_commands_read_the_database() {
    let setup = Setup::default();
    let p = crate::support::Plane::start(&setup).await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    let config = p.db.dir.path().join("prealloc.toml");
    std::fs::write(&config, setup.toml(&p.db)).unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let managers = run(&["managers"]);
    assert!(managers.contains("manager_m2"), "{managers}");
    let pools = run(&["pools"]);
    assert!(
        pools
            .lines()
            .any(|l| l.starts_with("mailbox") && l.contains("eu")),
        "{pools}"
    );
    let consumers = run(&["consumers", "--state", "registering"]);
    assert!(consumers.contains(&c), "{consumers}");
    let none = run(&["consumers", "--state", "registered"]);
    assert!(!none.contains(&c));
}

#[test]
fn admin_commands_without_a_database_say_so() {
    let db = Db::new();
    let config = db.dir.path().join("prealloc.toml");
    std::fs::write(&config, Setup::default().toml(&db)).unwrap();
    let out = bin()
        .arg("pools")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has `serve` run with this config?"),
        "{stderr}"
    );
}
