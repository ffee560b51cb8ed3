//! A tiny hyper server runner shared by the test managers, the default backend and the routes stub.
//!
//! Each server owns a current-thread tokio runtime on its own OS thread, so it
//! can be started from sync or async tests alike and never competes with the
//! test's own runtime; dropping the handle stops it and closes its sockets.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// The body every harness server answers with: whole, or (for fault tests)
/// one that fails part-way.
pub type Body = BoxBody<Bytes, std::io::Error>;
/// The response type every harness server answers with.
pub type Reply = Response<Body>;

/// A body that sends `data` and then fails, so the server drops the
/// connection mid-body (whatever length the headers promised).
pub fn cut_short(data: Bytes) -> Body {
    struct CutShort(Option<Bytes>);
    impl hyper::body::Body for CutShort {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Ready(Some(match self.0.take() {
                Some(d) => Ok(hyper::body::Frame::data(d)),
                None => Err(std::io::Error::other("cut short on purpose")),
            }))
        }
    }
    BodyExt::boxed(CutShort(Some(data)))
}

/// A running server; stops when dropped.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Binds 127.0.0.1:0 and serves every connection (HTTP/1.1 and h2c) with `handler`.
    pub fn start<F, Fut>(name: &str, handler: F) -> ServerHandle
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        // Bind before spawning so the port is known (and taken) when start returns.
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("{name}: cannot bind 127.0.0.1:0: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{name}: cannot make listener non-blocking: {e}"));
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handler = Arc::new(handler);
        let thread = std::thread::Builder::new()
            .name(format!("e2e-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for a test server");
                rt.block_on(serve(listener, handler, stop_rx));
                // Dropping the runtime cancels every connection task and closes its socket.
            })
            .unwrap_or_else(|e| panic!("{name}: cannot spawn server thread: {e}"));
        ServerHandle {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve<F, Fut>(listener: TcpListener, handler: Arc<F>, mut stop: oneshot::Receiver<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Transient accept errors (e.g. too many open files) must not end the server.
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A response with a status, a content type and a body.
pub fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid response parts")
}

/// A JSON response.
pub fn json_reply(status: u16, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}
