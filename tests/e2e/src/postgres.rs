//! A throwaway PostgreSQL cluster for tests: Debian's PostgreSQL binaries
//! (`initdb`, `pg_ctl`; installed by `cargo xtask setup` where missing),
//! a fresh data directory, loopback only, a free port, trust authentication
//! for the one test role. PostgreSQL refuses to run as root, so under root
//! the cluster runs as `nobody` (`runuser`). Stopped (immediately) and
//! removed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The role and database the tests connect as.
pub const ROLE: &str = "prealloc";
/// The unprivileged user the cluster runs as when the tests run as root.
const UNPRIVILEGED: &str = "nobody";

/// The directory of PostgreSQL's server binaries: `PREALLOC_PG_BIN`, else
/// the newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PREALLOC_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| e.to_string())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server binaries found in /usr/lib/postgresql/*/bin: \
         `cargo xtask setup` installs Debian's postgresql package (as root), \
         or set PREALLOC_PG_BIN to a directory holding initdb and pg_ctl"
            .to_owned()
    })
}

/// A running cluster; stopped and removed on drop.
pub struct Postgres {
    bin: PathBuf,
    /// Holds the data directory and the socket directory.
    dir: tempfile::TempDir,
    port: u16,
    /// `Some(user)` when commands run as that user (the tests run as root).
    run_as: Option<&'static str>,
}

impl Postgres {
    /// Creates a cluster in a new temporary directory and starts it; waits
    /// (at most 60 s) until it accepts connections.
    pub fn start() -> Result<Postgres, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("prealloc-pg-")
            .tempdir()
            .map_err(|e| format!("cannot create the cluster's directory: {e}"))?;
        let run_as = is_root().then_some(UNPRIVILEGED);
        if let Some(user) = run_as {
            // The cluster's user owns its directory; the temporary directory is
            // private to root otherwise.
            let out = Command::new("chown")
                .args(["-R", &format!("{user}:")])
                .arg(dir.path())
                .output()
                .map_err(|e| format!("chown: {e}"))?;
            check("chown", &out)?;
        }
        let port = free_port()?;
        let pg = Postgres {
            bin,
            dir,
            port,
            run_as,
        };
        let data = pg.data_dir();
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", ROLE, "--auth=trust", "--encoding=UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        check("initdb", &out)?;
        pg.start_server()?;
        let out = pg
            .command("createdb")
            .args(pg.conn_args())
            .arg(ROLE)
            .output()
            .map_err(|e| format!("createdb: {e}"))?;
        check("createdb", &out)?;
        Ok(pg)
    }

    /// A connection URL for the test role's database.
    pub fn url(&self) -> String {
        format!("postgresql://{ROLE}@127.0.0.1:{}/{ROLE}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data, socket, server log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`:
    /// no checkpoint; the next start recovers from the WAL).
    pub fn stop_immediately(&self) -> Result<(), String> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .map_err(|e| format!("pg_ctl stop: {e}"))?;
        check("pg_ctl stop", &out)
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&self) -> Result<(), String> {
        self.start_server()
    }

    /// Runs one SQL statement with `psql` as the test role; its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let out = self
            .command("psql")
            .args(self.conn_args())
            .args([
                "-d",
                ROLE,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        check("psql", &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Adds a role that must give `password` (SCRAM) from 127.0.0.1, owning
    /// a database of its name; the test role keeps trust authentication.
    pub fn add_password_role(&self, role: &str, password: &str) -> Result<(), String> {
        self.psql(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))?;
        self.psql(&format!("CREATE DATABASE {role} OWNER {role}"))?;
        let hba = self.data_dir().join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).map_err(|e| format!("pg_hba.conf: {e}"))?;
        // The first matching line wins: this one before the trust lines.
        std::fs::write(
            &hba,
            format!("host all {role} 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .map_err(|e| format!("pg_hba.conf: {e}"))?;
        self.psql("SELECT pg_reload_conf()")?;
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn conn_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            ROLE.into(),
        ]
    }

    fn start_server(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        check("pg_ctl start", &out).map_err(|e| format!("{e}\nserver log:\n{}", self.log()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args(self.conn_args())
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "PostgreSQL did not accept connections within 60 s; server log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// One of the cluster's binaries, run as the cluster's user.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_immediately();
    }
}

fn check(what: &str, out: &Output) -> Result<(), String> {
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}
