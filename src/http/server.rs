//! Serving one client connection with hyper: HTTP/1.1 with keep-alive and h2c
//! (prior knowledge), told apart by the connection preface.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{ClientIo, ClientTimeouts};
use super::proxy::{ConnContext, handle};
use crate::config;

/// hyper refuses a read buffer smaller than this; heads up to it are accepted.
const MIN_HEAD_BUFFER: usize = 8192;

pub type ServerBuilder = auto::Builder<TokioExecutor>;

/// The hyper server settings for one frontend, built once and shared by its
/// connections.
pub fn builder(frontend: &config::Frontend) -> ServerBuilder {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // flowgate's own head timer answers 408; hyper's would also cut idle
        // keep-alive connections and answer nothing.
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(frontend.limits.max_header_bytes.max(MIN_HEAD_BUFFER));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(frontend.limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves one client connection until it closes, or until `shutdown` asks it to
/// finish: then in-flight requests complete and the connection closes. `http2`
/// when TLS negotiated h2 by ALPN.
pub async fn serve<S>(
    stream: S,
    ctx: Arc<ConnContext>,
    builder: Arc<ServerBuilder>,
    timeouts: ClientTimeouts,
    shutdown: CancellationToken,
    http2: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = ClientIo::new(
        stream,
        Arc::clone(&ctx.activity),
        timeouts,
        http2,
        Arc::clone(ctx.connection.stats()),
    );
    let service = service_fn(move |request| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(handle(ctx, request).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "client connection ended with an error");
    }
}
