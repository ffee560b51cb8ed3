//! HTTP client for the manager contract: provisioning and active-replication calls.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// A manager's `admin_url`, checked: `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn parse(s: &str) -> Result<BaseUrl, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            format!("{s:?} must start with http:// (TLS to managers is not supported; put a sidecar in front)")
        })?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("{s:?} has no host"));
        }
        let full = s.trim_end_matches('/');
        full.parse::<hyper::Uri>()
            .map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        Ok(BaseUrl(full.to_owned()))
    }

    pub fn join(&self, path: &str) -> String {
        format!("{}{path}", self.0)
    }
}

/// What went wrong with one call to a manager.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("bad URL: {0}")]
    Url(String),
}

/// A pooled HTTP/1 client shared by every task that calls managers.
#[derive(Clone)]
pub struct ManagerClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for ManagerClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        ManagerClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl ManagerClient {
    /// One call; `Ok((status, body))` for any 2xx, `Err` otherwise.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Bytes,
        content_type: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| CallError::Url(format!("{url}: {e}")))?;
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b
            .body(Full::new(body))
            .map_err(|e| CallError::Url(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| CallError::Connect(format!("{e:#}")))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Connect(e.to_string()))?
                .to_bytes();
            Ok::<_, CallError>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| CallError::Timeout(timeout))??;
        if status.is_success() {
            Ok((status, body))
        } else {
            Err(CallError::Status(status))
        }
    }
}

/// Exponential backoff between `min` and `max`.
pub fn backoff(attempt: u32, min_ms: u64, max_ms: u64) -> Duration {
    let ms = min_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
    Duration::from_millis(ms)
}
