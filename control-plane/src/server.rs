//! The socket side: accepts HTTP/1 and HTTP/2 (prior knowledge) connections and
//! shuts down gracefully (stop accepting, release long-polls, drain, close the store).

use crate::config::Config;
use crate::plane::ControlPlane;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long open connections get to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);

/// A control plane serving on a socket.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts on `config.listen` (port 0 picks a free port; see [`Server::addr`]).
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e}; change `listen` in the config",
                config.listen
            )
        })?;
        let addr = listener.local_addr()?;
        let cp = ControlPlane::start(config).await?;
        let (stop, stop_rx) = oneshot::channel();
        let done = tokio::spawn(async move {
            let served = serve(cp, listener, async {
                let _ = stop_rx.await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %format!("{e:#}"), "the control plane stopped");
            }
        });
        tracing::info!(%addr, "listening");
        Ok(Server {
            addr,
            stop: Some(stop),
            done,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shuts down gracefully and waits until the store is closed.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.done).await;
    }
}

/// Serves until `shutdown` resolves, then drains and stops the control plane.
/// Should the writer thread die, it stops the same way and returns the error,
/// so a supervisor restarts the process instead of it answering 503 for ever.
pub async fn serve(
    cp: ControlPlane,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let app = cp.app();
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut writer_failure = cp.plane().core.writer_failure.subscribe();
    let mut failed = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, std::convert::Infallible>(app.handle(req).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
            _ = writer_died(&mut writer_failure) => {
                failed = writer_failure.borrow().clone();
                break;
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: releasing long-polls and draining connections");
    // Long-polls answer at once when the stop flag flips.
    cp.plane().core.stop.send_replace(true);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN:?}; closing anyway");
    }
    cp.shutdown().await;
    match failed {
        Some(why) => Err(anyhow::anyhow!("{why}")),
        None => Ok(()),
    }
}

/// Resolves once the writer thread reported its failure.
async fn writer_died(failure: &mut tokio::sync::watch::Receiver<Option<String>>) {
    if failure.wait_for(Option::is_some).await.is_err() {
        // The control plane is gone without a failure: never resolve.
        std::future::pending::<()>().await;
    }
}
