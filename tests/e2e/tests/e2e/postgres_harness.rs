//! Self-test of the throwaway PostgreSQL cluster the store tests run on
//! (`prealloc_e2e::postgres`): it starts as an unprivileged user on a free
//! loopback port, keeps committed rows across a crash, and leaves nothing
//! behind.

use prealloc_e2e::postgres::Postgres;
use std::net::TcpStream;

#[test]
fn a_throwaway_cluster_keeps_committed_rows_across_a_crash_and_leaves_nothing_behind() {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    assert!(pg.url().ends_with(&format!(":{}/prealloc", pg.port())));
    assert_eq!(
        pg.psql("SELECT current_setting('listen_addresses')")
            .unwrap(),
        "127.0.0.1"
    );
    // PostgreSQL refuses root: the server runs as an unprivileged user.
    let pid_file = std::fs::read_to_string(pg.dir().join("data/postmaster.pid")).unwrap();
    let pid = pid_file.lines().next().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert_ne!(uid, "0", "the server runs as root");
    assert_eq!(pg.psql("SELECT current_user").unwrap(), "prealloc");
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
        .unwrap();
    pg.psql("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        .unwrap();

    pg.stop_immediately().unwrap();
    let err = pg.psql("SELECT 1").unwrap_err();
    assert!(err.contains("psql failed"), "{err}");
    pg.restart().unwrap();
    assert_eq!(
        pg.psql("SELECT string_agg(v, ',' ORDER BY id) FROM t")
            .unwrap(),
        "one,two",
        "committed rows survive an immediate stop"
    );

    let (dir, port) = (pg.dir().to_path_buf(), pg.port());
    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server still listens on {port}"
    );
}
