//! Headless Chromium (Debian's `chromium` package, installed by `cargo xtask
//! setup`; never a browser a tool downloads) driven over the Chrome DevTools
//! Protocol: navigate, type, click, read the DOM, take a screenshot. Each
//! [`Browser`] has a fresh profile directory and is killed when dropped.

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one DevTools call or page load may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The browser: `PREALLOC_CHROMIUM`, else `chromium` (or `chromium-browser`) on `PATH`.
pub fn chromium_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PREALLOC_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    for name in ["chromium", "chromium-browser"] {
        let ok = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(PathBuf::from(name));
        }
    }
    Err(
        "no Chromium found: `cargo xtask setup` installs Debian's chromium package \
         (as root), or set PREALLOC_CHROMIUM to a chromium binary"
            .to_owned(),
    )
}

/// A headless Chromium process with its own profile; killed on drop.
pub struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    /// Starts Chromium headless with the flags the project uses everywhere and
    /// waits (at most 30 s) for its DevTools endpoint.
    pub fn start() -> Result<Browser, String> {
        let bin = chromium_binary()?;
        let profile = tempfile::tempdir().map_err(|e| format!("profile dir: {e}"))?;
        let log = std::fs::File::create(profile.path().join("chromium.log"))
            .map_err(|e| format!("chromium log: {e}"))?;
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
        let mut browser = Browser {
            child,
            profile,
            port: 0,
        };
        // Chromium writes the port it picked to DevToolsActivePort.
        let active = browser.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(port) = std::fs::read_to_string(&active)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse().ok())
            {
                browser.port = port;
                return Ok(browser);
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                return Err(format!(
                    "chromium exited with {status} before DevTools was up:\n{}",
                    browser.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "chromium gave no DevTools port within 30 s:\n{}",
                    browser.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines Chromium logged.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The tab Chromium opened at start, connected.
    pub async fn page(&self) -> Result<Page, String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let r = crate::client::Client::new(addr)
            // DevTools answers only a Host that is an IP address or localhost.
            .send("GET", "/json/list", &[("host", &addr.to_string())], b"")
            .await
            .map_err(|e| format!("DevTools /json/list: {e}"))?;
        let targets: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("DevTools /json/list: {e}: {} {}", r.status, r.text()))?;
        let url = targets
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .ok_or_else(|| format!("no page target in {targets}"))?
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| format!("DevTools websocket {url}: {e}"))?;
        let mut page = Page {
            ws,
            next_id: 0,
            events: VecDeque::new(),
        };
        page.call("Page.enable", json!({})).await?;
        page.call("Runtime.enable", json!({})).await?;
        Ok(page)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab, over its DevTools websocket.
pub struct Page {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Events that arrived while waiting for a call's answer.
    events: VecDeque<Value>,
}

impl Page {
    /// Sends a DevTools command and returns its result (its error as `Err`).
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let m = self.next_message(deadline, method).await?;
            if m["id"] == id {
                return match m.get("error") {
                    Some(e) => Err(format!("{method}: {e}")),
                    None => Ok(m["result"].clone()),
                };
            }
            if m.get("method").is_some() {
                self.events.push_back(m);
            }
        }
    }

    async fn next_message(&mut self, deadline: Instant, what: &str) -> Result<Value, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .map_err(|_| format!("{what}: no answer within {CALL_TIMEOUT:?}"))?;
            match frame {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t).map_err(|e| format!("{what}: {e}: {t}"))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("{what}: {e}")),
                None => return Err(format!("{what}: DevTools closed the connection")),
            }
        }
    }

    /// Waits for the next event named `method` (after those already seen).
    pub async fn wait_event(&mut self, method: &str) -> Result<Value, String> {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            let e = self.events.remove(i).unwrap_or_default();
            return Ok(e["params"].clone());
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let m = self.next_message(deadline, method).await?;
            if m["method"] == method {
                return Ok(m["params"].clone());
            }
        }
    }

    /// Drops the events seen so far (before an action whose event a test waits for).
    pub fn forget_events(&mut self) {
        self.events.clear();
    }

    /// Opens `url` and waits for its load event.
    pub async fn navigate(&mut self, url: &str) -> Result<(), String> {
        self.forget_events();
        let r = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(e) = r.get("errorText") {
            return Err(format!("navigating to {url}: {e}"));
        }
        self.wait_event("Page.loadEventFired").await.map(|_| ())
    }

    /// Evaluates a JavaScript expression (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expression}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expression` every 50 ms until it is truthy; returns its value,
    /// or, after `within`, an error with its last value.
    pub async fn wait_for(&mut self, expression: &str, within: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expression).await?;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!("{expression} still {v} after {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types `text` into the element `selector` picks, as a user would.
    pub async fn type_into(&mut self, selector: &str, text: &str) -> Result<(), String> {
        let sel = serde_json::to_string(selector).map_err(|e| e.to_string())?;
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.focus(); return true; }})()"
            ))
            .await?;
        if found != json!(true) {
            return Err(format!("nothing matches {selector}"));
        }
        self.call("Input.insertText", json!({ "text": text }))
            .await
            .map(|_| ())
    }

    /// Clicks the element `selector` picks with the mouse, at its centre.
    pub async fn click(&mut self, selector: &str) -> Result<(), String> {
        let sel = serde_json::to_string(selector).map_err(|e| e.to_string())?;
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await?;
        let (Some(x), Some(y)) = (at[0].as_f64(), at[1].as_f64()) else {
            return Err(format!("nothing matches {selector}"));
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await?;
        }
        Ok(())
    }

    /// A PNG of the whole page at `width` CSS pixels.
    pub async fn screenshot(&mut self, width: u32) -> Result<Vec<u8>, String> {
        let height = self
            .eval("Math.ceil(document.documentElement.scrollHeight)")
            .await?
            .as_u64()
            .unwrap_or(900);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = r["data"].as_str().ok_or("no screenshot data")?;
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| format!("screenshot: {e}"))
    }
}

/// Writes `bytes` to `path`, creating its directory.
pub fn save(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}
