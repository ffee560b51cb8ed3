//! Child processes of the benchmark (nginx, wrk) and readers of a process's CPU time and memory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; nginx binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
}

/// Fills `{{NAME}}` placeholders; panics naming any left over, so templates and code stay in step.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(at) = out.find("{{") {
        let line = out[at..].lines().next().unwrap_or("");
        panic!("template placeholder left unrendered: {line}");
    }
    out
}

/// The upstream: nginx on loopback ports (default, m1..mN), stopped on drop.
pub struct Nginx {
    child: Child,
    pub default_port: u16,
    /// Manager `m{i+1}`'s port at `i`.
    pub m_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Answers as the default backend and as `managers` managers `m1..mN`.
    pub fn start(template: &str, managers: usize, cpu: Option<usize>) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("prealloc-bench-nginx-")
            .tempdir()
            .expect("temp dir for nginx");
        let default_port = free_port();
        let mut m_ports: Vec<u16> = Vec::new();
        while m_ports.len() < managers {
            let p = free_port();
            if p != default_port && !m_ports.contains(&p) {
                m_ports.push(p);
            }
        }
        let servers: String = m_ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "    server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"m{}\\n\"; }} }}\n",
                    i + 1
                )
            })
            .collect();
        let conf = render(
            template,
            &[
                ("DEFAULT_PORT", default_port.to_string()),
                ("MANAGER_SERVERS", servers),
            ],
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut cmd = pinned("nginx", cpu);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx ({e}): install it with `apt-get install -y nginx` (bench/run.sh does)"));
        let nginx = Nginx {
            child,
            default_port,
            m_ports,
            _dir: dir,
        };
        nginx.wait_ready(Duration::from_secs(10));
        nginx
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for port in std::iter::once(self.default_port).chain(self.m_ports.iter().copied()) {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on 127.0.0.1:{port} within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its worker too (SIGKILL would orphan the worker).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program` under `taskset -c <cpu>` when a CPU is given.
pub fn pinned(program: &str, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The pid of the process whose command line has the argument `arg` (Envoy's config path).
pub fn pid_with_arg(arg: &Path) -> Option<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if cmd.split(|b| *b == 0).any(|a| a == want) {
                return Some(pid);
            }
        }
    }
    None
}

/// CPU time of every thread of `pid`, in nanoseconds (schedstat: exact, not tick-rounded).
pub fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Resident memory of `pid` in KiB (VmRSS), 0 if unknown.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// What wrk's `done()` in bench/wrk/cycle.lua printed.
#[derive(Debug, Clone)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_s: f64,
    pub errors: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub mean_us: f64,
    pub max_us: u64,
    pub raw: serde_json::Value,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.duration_s
    }
}

/// How wrk is run (one thread, closed loop).
#[derive(Debug, Clone)]
pub struct WrkOptions {
    pub script: PathBuf,
    pub connections: u32,
    pub cpu: Option<usize>,
    /// `(method, path, body)` instead of `GET /` (cycle.lua's optional arguments).
    pub request: Option<(String, String, String)>,
}

pub fn run_wrk(
    opts: &WrkOptions,
    url: &str,
    requests_file: &Path,
    duration: Duration,
) -> Result<WrkResult, String> {
    let mut cmd = pinned("wrk", opts.cpu);
    cmd.args(["-t1", &format!("-c{}", opts.connections)])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--timeout", "5s", "--latency", "-s"])
        .arg(&opts.script)
        .arg(url)
        .arg("--")
        .arg(requests_file)
        .stdin(Stdio::null());
    if let Some((method, path, body)) = &opts.request {
        cmd.args([method, path, body]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run wrk ({e}): install it with `apt-get install -y wrk`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_JSON "))
        .ok_or_else(|| format!("wrk printed no BENCH_JSON line: {stdout}"))?;
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("wrk summary is not JSON ({e}): {line}"))?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(WrkResult {
        requests: n("requests"),
        duration_s: n("duration_us") as f64 / 1e6,
        errors: n("errors_connect")
            + n("errors_read")
            + n("errors_write")
            + n("errors_status")
            + n("errors_timeout"),
        p50_us: n("p50_us"),
        p90_us: n("p90_us"),
        p99_us: n("p99_us"),
        mean_us: v["mean_us"].as_f64().unwrap_or(0.0),
        max_us: n("max_us"),
        raw: v,
    })
}
