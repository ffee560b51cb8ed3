//! A minimal blocking HTTP/1.1 keep-alive client: precise timing for propagation probes and routing checks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct Probe {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub set_cookie: Vec<String>,
    pub body: String,
}

impl Probe {
    pub fn new(addr: SocketAddr) -> Probe {
        Probe { addr, conn: None }
    }

    /// GET / with the given extra headers; one reconnect if the kept connection was closed.
    pub fn get(&mut self, headers: &[(&str, &str)]) -> Result<Answer, String> {
        self.get_path("/", headers)
    }

    /// GET `path`, like [`Probe::get`].
    pub fn get_path(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        match self.try_get(path, headers) {
            Ok(a) => Ok(a),
            Err(_) => {
                self.conn = None;
                self.try_get(path, headers)
            }
        }
    }

    fn try_get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        if self.conn.is_none() {
            let s =
                TcpStream::connect(self.addr).map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n");
        for (k, v) in headers {
            req.push_str(k);
            req.push_str(": ");
            req.push_str(v);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        conn.get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        conn.read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut len = 0usize;
        let mut set_cookie = Vec::new();
        loop {
            line.clear();
            conn.read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse().unwrap_or(0);
                } else if k == "set-cookie" {
                    set_cookie.push(v.trim().to_owned());
                }
            }
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        Ok(Answer {
            status,
            set_cookie,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        })
    }
}
