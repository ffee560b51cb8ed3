//! Config parsing: the example parses, and bad files are refused naming the key.

use crate::support::{Db, Setup};
use prealloc_control_plane::config::{Config, ReplicationMode, ReplicationTarget};
use std::path::Path;

fn refuse(text: &str) -> String {
    match Config::parse(text, Path::new("/tmp")) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn example_config_parses_with_three_managers_in_one_location() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prealloc.toml");
    let c = Config::load(&path).expect("example config is valid");
    let ids: Vec<&str> = c.managers.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m3"]);
    let clusters: Vec<&str> = c.managers.iter().map(|m| m.cluster.as_str()).collect();
    assert_eq!(clusters, ["manager_m1", "manager_m2", "manager_m3"]);
    assert!(c
        .managers
        .iter()
        .all(|m| m.location == c.managers[0].location));
    assert!(c.listen.ip().is_loopback());
    assert_eq!(
        c.store,
        prealloc_control_plane::config::StoreConfig::Sqlite {
            path: path.parent().unwrap().join("prealloc.db")
        }
    );
}

#[test]
fn defaults_are_reported_mode_target_all_and_loopback() {
    let db = Db::new();
    let text = Setup::default()
        .toml(&db)
        .replace("mode = \"reported\"\ntarget = \"all\"\n", "")
        .replace("listen = \"127.0.0.1:0\"\n", "");
    let c = Config::parse(&text, Path::new("/")).unwrap();
    assert_eq!(
        c.listen.to_string(),
        prealloc_control_plane::config::DEFAULT_LISTEN
    );
    assert!(
        c.listen.ip().is_loopback(),
        "listens on {} unless configured",
        c.listen
    );
    assert_eq!(c.replication.mode, ReplicationMode::Reported);
    assert_eq!(c.replication.target, ReplicationTarget::All);
}

#[test]
fn unknown_key_is_refused_with_its_name() {
    let db = Db::new();
    let text = Setup::default()
        .toml(&db)
        .replace("grace_period_ms", "grace_period");
    let e = refuse(&text);
    assert!(e.contains("grace_period"), "{e}");
    assert!(e.contains("unknown field"), "{e}");
}

#[test]
fn unknown_key_inside_a_manager_is_refused() {
    let db = Db::new();
    let text = Setup::default()
        .toml(&db)
        .replacen("provision = false", "provison = false", 1);
    let e = refuse(&text);
    assert!(e.contains("provison"), "{e}");
}

#[test]
fn bad_values_name_the_key_and_what_is_wrong() {
    let db = Db::new();
    let base = Setup::default().toml(&db);
    let cases = [
        (
            base.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""),
            "listen",
        ),
        (
            base.replace(ENVOY_LINE, "envoy = \"short\""),
            "tokens.envoy",
        ),
        (
            base.replace("target = \"all\"", "target = 0"),
            "replication target",
        ),
        (
            base.replace("target = \"all\"", "target = \"most\""),
            "replication target",
        ),
        (
            base.replacen("id = \"m2\"", "id = \"m1\"", 1),
            "managers[1].id",
        ),
        (
            base.replacen("cluster = \"manager_m2\"", "cluster = \"manager_m1\"", 1),
            "managers[1].cluster",
        ),
        (
            base.replacen(
                "admin_url = \"http://127.0.0.1:9\"",
                "admin_url = \"https://x\"",
                1,
            ),
            "managers[0].admin_url",
        ),
        (
            base.replace(
                "location = \"eu\"\ntarget_depth",
                "location = \"us\"\ntarget_depth",
            ),
            "pools[0].location",
        ),
        (
            base.replace("mode = \"reported\"", "mode = \"passive\""),
            "passive",
        ),
    ];
    for (text, key) in &cases {
        let e = refuse(text);
        assert!(e.contains(key), "error for {key} does not name it: {e}");
    }
}

const ENVOY_LINE: &str = "envoy = \"envoy-test-token-0123456789\"";

#[test]
fn equal_envoy_and_admin_tokens_are_refused() {
    let db = Db::new();
    let text = Setup::default().toml(&db).replace(
        "admin = \"admin-test-token-0123456789\"",
        "admin = \"envoy-test-token-0123456789\"",
    );
    assert!(refuse(&text).contains("must differ"));
}

#[test]
fn missing_file_error_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/prealloc.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/prealloc.toml"), "{e}");
}

#[test]
fn a_parse_error_names_the_line_but_never_quotes_it() {
    // A misspelt key under [tokens], its value a real token: the error must
    // say where and what, and must not print the secret.
    let db = Db::new();
    let secret = "do-not-print-this-token-0123456789";
    let text = Setup::default()
        .toml(&db)
        .replace("[tokens]\n", &format!("[tokens]\nenvoyy = \"{secret}\"\n"));
    let line = text.lines().position(|l| l.starts_with("envoyy")).unwrap() + 1;
    let e = refuse(&text);
    assert!(e.contains("envoyy"), "{e}");
    assert!(e.contains(&format!("line {line}")), "{e}");
    assert!(!e.contains(secret), "the secret was printed: {e}");
    // A syntax error on a token line too.
    let text = Setup::default()
        .toml(&db)
        .replace("[tokens]\n", &format!("[tokens]\nenvoy = \"{secret}\n"));
    let e = refuse(&text);
    assert!(!e.contains(secret), "the secret was printed: {e}");
}

#[test]
fn tokens_never_show_in_the_configs_debug_output_and_a_manager_token_is_its_own() {
    let db = Db::new();
    let setup = Setup {
        manager_token: Some("manager-token-0123456789abcdef".into()),
        ..Setup::default()
    };
    let c = Config::parse(&setup.toml(&db), Path::new("/")).unwrap();
    let dbg = format!("{c:?}");
    for secret in [
        crate::support::ENVOY,
        crate::support::ADMIN,
        "manager-token-0123456789abcdef",
    ] {
        assert!(!dbg.contains(secret), "{dbg}");
    }
    for reused in [crate::support::ADMIN, crate::support::ENVOY] {
        let setup = Setup {
            manager_token: Some(reused.into()),
            ..Setup::default()
        };
        let e = refuse(&setup.toml(&db));
        assert!(
            e.contains("managers[0].token") && e.contains("must differ"),
            "{e}"
        );
        assert!(!e.contains(reused), "{e}");
    }
}

/// The config without its store (`database` or `[store]`), to add one.
fn without_store() -> String {
    let db = Db::sqlite();
    let text = Setup::default().toml(&db);
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("database = "), "{first}");
    text.lines().skip(1).collect::<Vec<_>>().join("\n") + "\n"
}

#[test]
fn a_postgres_store_is_chosen_in_a_store_table_with_its_password_from_the_environment_or_a_file() {
    use prealloc_control_plane::config::{PasswordSource, PostgresConfig, StoreConfig};
    let url = "postgres://prealloc@db.internal:5432/prealloc";
    let c = Config::parse(
        &format!(
            "{}[store]\nkind = \"postgres\"\nurl = \"{url}\"\npassword_env = \"PREALLOC_PG_PASSWORD\"\n",
            without_store()
        ),
        Path::new("/etc/prealloc"),
    )
    .unwrap();
    assert_eq!(
        c.store,
        StoreConfig::Postgres(PostgresConfig {
            url: url.into(),
            password: PasswordSource::Env("PREALLOC_PG_PASSWORD".into()),
            shared: false,
        })
    );
    assert_eq!(c.store.to_string(), format!("postgres {url}"));
    let c = Config::parse(
        &format!(
            "{}[store]\nkind = \"postgres\"\nurl = \"{url}\"\npassword_file = \"secrets/pg\"\n",
            without_store()
        ),
        Path::new("/etc/prealloc"),
    )
    .unwrap();
    assert_eq!(
        c.store,
        StoreConfig::Postgres(PostgresConfig {
            url: url.into(),
            password: PasswordSource::File("/etc/prealloc/secrets/pg".into()),
            shared: false,
        })
    );
    // `[store]` with kind = "sqlite" is the long form of `database`.
    let c = Config::parse(
        &format!(
            "{}[store]\nkind = \"sqlite\"\npath = \"state.db\"\n",
            without_store()
        ),
        Path::new("/var/lib/prealloc"),
    )
    .unwrap();
    assert_eq!(
        c.store,
        StoreConfig::Sqlite {
            path: "/var/lib/prealloc/state.db".into()
        }
    );
}

#[test]
fn a_password_in_the_store_url_is_refused_without_being_repeated() {
    let e = refuse(&format!(
        "{}[store]\nkind = \"postgres\"\nurl = \"postgres://prealloc:hunter2-secret@db/prealloc\"\n",
        without_store()
    ));
    assert!(e.contains("store.url") && e.contains("password_env"), "{e}");
    assert!(
        !e.contains("hunter2"),
        "the error repeats the password: {e}"
    );
    // Nor is an unparsable URL repeated (it may hold one too).
    let e = refuse(&format!(
        "{}[store]\nkind = \"postgres\"\nurl = \"postgres://prealloc:hunter2@db:notaport/x\"\n",
        without_store()
    ));
    assert!(e.contains("store.url"), "{e}");
    assert!(!e.contains("hunter2"), "the error repeats the URL: {e}");
}

#[test]
fn store_tables_that_cannot_work_are_refused_naming_the_key() {
    let base = without_store();
    for (store, key) in [
        ("", "`database`: missing"),
        (
            "[store]\nkind = \"postgres\"\n",
            "`store.url`: missing",
        ),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://db/prealloc\"\n",
            "names no user",
        ),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://p@db/p\"\npassword_env = \"A\"\npassword_file = \"b\"\n",
            "use one",
        ),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://p@db/p\"\npath = \"x.db\"\n",
            "`store.path`: not used",
        ),
        (
            "[store]\nkind = \"sqlite\"\nurl = \"postgres://p@db/p\"\n",
            "`store.url`: not used",
        ),
        ("[store]\nkind = \"sqlite\"\n", "`store.path`"),
        ("[store]\nkind = \"mysql\"\n", "unknown variant"),
    ] {
        let e = refuse(&format!("{base}{store}"));
        assert!(e.contains(key), "{store:?}: {e}");
    }
    let e = refuse(&format!(
        "database = \"x.db\"\n{base}[store]\nkind = \"sqlite\"\npath = \"y.db\"\n"
    ));
    assert!(e.contains("use one"), "{e}");
}
