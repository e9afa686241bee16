//! Forwarding one request: route, pick, connect, send, and hand the response back
//! with its body wrapped so the server's in-flight count and pooled connection
//! are released when the body ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use super::body::{Completion, PendingLog, RequestBody, ResponseBody};
use super::conn::ConnActivity;
use super::error::ProxyError;
use super::h1::{self, Attempts};
use super::hash_key::RequestKey;
use super::headers::{
    closes_connection, ensure_request_id, is_upgrade_request, join_cookies, set_forwarded,
    strip_hop_by_hop,
};
use crate::access_log::{AccessLog, HttpEntry};
use crate::balance::PickContext;
use crate::config::Protocol;
use crate::listener::ListenerControl;
use crate::metrics::OpenConnection;
use crate::runtime::SharedRuntime;
use crate::upstream::{Backend, Connection, InFlightGuard, Server, Unavailable};

/// What every request on one client connection shares.
#[derive(Debug)]
pub struct ConnContext {
    pub runtime: SharedRuntime,
    /// The listener the client came through; it names the frontend to serve,
    /// which a reload may change.
    pub listener: Arc<ListenerControl>,
    pub client: SocketAddr,
    /// `client`'s address as X-Forwarded-For lists it.
    pub forwarded_for: HeaderValue,
    /// The client reached flowgate over TLS.
    pub https: bool,
    /// The client's address is refused by the frontend's allow/deny lists.
    pub refused: bool,
    pub activity: Arc<ConnActivity>,
    /// Upgraded tunnels outlive their request; a graceful stop waits for them.
    pub tunnels: TaskTracker,
    /// Counts the connection (and its requests and bytes) for its frontend.
    pub connection: OpenConnection,
    /// Where requests are logged, when the access log is on.
    pub access_log: Option<Arc<AccessLog>>,
}

/// The service hyper calls for each request. It never fails: every error
/// becomes an answer to the client.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub fn handle(
    ctx: Arc<ConnContext>,
    request: Request<Incoming>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> {
    // An async block, not an async fn: an async fn keeps its arguments in its
    // state twice (as passed, and moved into its body), the request head
    // among them; the block keeps them once. Likewise `forward` and `send`.
    async move {
        // The clock is read for the access log only: none per request without one.
        let logging = ctx.access_log.as_ref().map(|log| (log, Instant::now()));
        let active = ctx
            .activity
            .begin_request(closes_connection(request.version(), request.headers()));
        ctx.connection
            .stats()
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let grpc = is_grpc(&request);
        // Kept for the logs; cloning them costs no allocation.
        let method = request.method().clone();
        let uri = request.uri().clone();
        let mut trace = Trace::default();
        let response = if ctx.refused {
            let mut response = error_response(ProxyError::Refused, grpc);
            if request.version() < Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        } else {
            // Awaited through a pinned reference, here and in `forward` and `send`:
            // a future awaited by value is stored twice in its caller's state, and
            // this state is moved (h2: into a task of its own) for every request.
            std::pin::pin!(forward(&ctx, request, &mut trace))
                .await
                .unwrap_or_else(|err| {
                    tracing::warn!(
                        frontend = %ctx.listener.frontend(),
                        client = %ctx.client,
                        %method,
                        path = uri.path(),
                        status = err.status().as_u16(),
                        error = %err,
                        "request failed"
                    );
                    error_response(err, grpc)
                })
        };
        let status = response.status().as_u16();
        Ok(response.map(|body| {
            let body = body.track(active);
            match logging {
                None => body,
                Some((log, started)) => body.log(PendingLog {
                    log: Arc::clone(log),
                    entry: Box::new(HttpEntry {
                        time: SystemTime::now() - started.elapsed(),
                        client: ctx.client,
                        frontend: ctx.listener.frontend(),
                        backend: trace.backend,
                        server: trace.attempts.server,
                        method,
                        uri,
                        status,
                        bytes: 0,
                        ttfb: started.elapsed(),
                        total: Duration::ZERO,
                        request_id: trace.request_id,
                        retries: trace.attempts.retries,
                    }),
                    started,
                }),
            }
        }))
    }
}

/// What a request met on its way, for the access log.
#[derive(Debug, Default)]
struct Trace {
    backend: Option<Arc<str>>,
    attempts: Attempts,
    request_id: Option<HeaderValue>,
}

fn error_response(err: ProxyError, grpc: bool) -> Response<ResponseBody> {
    if grpc {
        err.into_grpc_response()
    } else {
        err.into_response()
    }
}

/// A gRPC call (`content-type: application/grpc` or `application/grpc+proto`...).
fn is_grpc(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn forward(
    ctx: &ConnContext,
    mut request: Request<Incoming>,
    trace: &mut Trace,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> {
    async move {
        let runtime = ctx.runtime.load_full();
        let frontend = runtime
            .frontend(&ctx.listener.settings.load().frontend)
            .ok_or(ProxyError::Unavailable(Unavailable::NoServer))?;
        // hyper's own limit is its read buffer, which cannot be set below 8 KiB;
        // smaller limits are enforced here, on the head as the client wrote it.
        let head = head_size(&request);
        if head > frontend.config.limits.max_header_bytes {
            return Err(ProxyError::HeadTooLarge(head));
        }
        let tunnel = request.version() == Version::HTTP_11 && is_upgrade_request(request.headers());
        let client_upgrade = tunnel.then(|| hyper::upgrade::on(&mut request));

        let backend;
        let key;
        // The head is rewritten in a block of its own: what it takes apart is
        // then not kept in this future's state beside what it puts together.
        let request = {
            let (mut parts, body) = request.into_parts();
            backend = Arc::clone(frontend.router.route(&parts));
            trace.backend = Some(Arc::clone(&backend.name));
            // Taken before the head is rewritten for the server.
            key = RequestKey::of(&backend.config, &parts);
            let host = parts.headers.get(header::HOST).cloned().or_else(|| {
                parts
                    .uri
                    .authority()
                    .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
            });
            strip_hop_by_hop(&mut parts.headers, tunnel);
            if parts.version == Version::HTTP_2 && backend.config.protocol == Protocol::Http1 {
                join_cookies(&mut parts.headers);
            }
            // Room for what is added below (X-Forwarded-For, -Proto, -Host,
            // X-Request-Id, Host): the map grows at most once.
            parts.headers.reserve(5);
            // flowgate itself answers "Expect: 100-continue" (hyper sends the 100
            // when the body is first read, i.e. once a server connection is ready).
            parts.headers.remove(header::EXPECT);
            set_forwarded(
                &mut parts.headers,
                &ctx.forwarded_for,
                ctx.https,
                host.clone(),
            );
            let id = ensure_request_id(&mut parts.headers);
            // Only the access log names it; a copy made here would be its own
            // allocation on every request.
            trace.request_id = ctx.access_log.is_some().then(|| id.clone());
            set_target(&mut parts, &backend, host)?;
            let body = if body.is_end_stream() {
                RequestBody::Empty
            } else {
                RequestBody::Streaming(body)
            };
            Request::from_parts(parts, body)
        };
        let key = key.as_ref().map(RequestKey::as_bytes);
        if h1::takes_parsed(&backend, &request, tunnel) {
            let pick = PickContext {
                client: ctx.client.ip(),
                key,
            };
            let (parts, _) = request.into_parts();
            let send = h1::send_parsed(&backend, pick, &parts, &mut trace.attempts);
            return std::pin::pin!(send).await;
        }
        let (mut response, guard, connection) =
            std::pin::pin!(send(ctx, &backend, key, request, trace)).await?;

        if tunnel && response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let server_upgrade = hyper::upgrade::on(&mut response);
            if let Some(client_upgrade) = client_upgrade {
                ctx.tunnels.spawn(async move {
                    let (client, server) = match tokio::try_join!(client_upgrade, server_upgrade) {
                        Ok(pair) => pair,
                        Err(err) => {
                            tracing::debug!(error = %err, "upgrade failed");
                            return;
                        }
                    };
                    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut server).await
                    {
                        tracing::debug!(error = %err, "tunnel ended");
                    }
                    // The server counts the tunnel as in flight until it closes.
                    drop(guard);
                    drop(connection);
                });
            }
            let (mut parts, _) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, ResponseBody::empty()));
        }

        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        parts.version = Version::HTTP_11;
        let completion = Completion {
            guard,
            connection: Some(connection),
        };
        Ok(Response::from_parts(
            parts,
            ResponseBody::upstream(body, completion),
        ))
    }
}

/// The size of a request head in HTTP/1.1 form: request line, `name: value`
/// lines and the blank line that ends it.
fn head_size<B>(request: &Request<B>) -> usize {
    let target = request
        .uri()
        .path_and_query()
        .map_or(1, |path| path.as_str().len());
    let request_line = request.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    request_line + fields + "\r\n".len()
}

/// Rewrites the request target for the server's protocol: origin-form with a Host
/// header for HTTP/1.1, an absolute URI (the `:authority`) for HTTP/2.
fn set_target(
    parts: &mut http::request::Parts,
    backend: &Backend,
    host: Option<HeaderValue>,
) -> Result<(), ProxyError> {
    match backend.config.protocol {
        Protocol::Http1 => {
            parts.version = Version::HTTP_11;
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                let path = parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                parts.uri = Uri::from(path);
            }
            if let Some(host) = host
                && !parts.headers.contains_key(header::HOST)
            {
                parts.headers.insert(header::HOST, host);
            }
        }
        Protocol::H2 => {
            parts.version = Version::HTTP_2;
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            if let Some(host) = host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse().ok())
            {
                uri.authority = Some(host);
            }
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            // Without a host of its own, the server's address is the authority
            // (filled in once a server is picked).
            if uri.authority.is_none() {
                uri.authority = backend
                    .servers
                    .first()
                    .map(|server| server.authority.clone());
            }
            parts.uri = Uri::from_parts(uri)
                .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(())
}

/// Picks a server and sends the request. A request is tried again, on another
/// server when `redispatch` allows, while `retries` last:
/// - after a connect failure, whatever the request: nothing was sent;
/// - after a reset or a 502/503 from the server, only when repeating it can have
///   no further effect: an idempotent method without a body.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn send(
    ctx: &ConnContext,
    backend: &Backend,
    key: Option<&[u8]>,
    mut request: Request<RequestBody>,
    trace: &mut Trace,
) -> impl Future<Output = Result<(Response<Incoming>, InFlightGuard, Connection), ProxyError>> {
    async move {
        let pick = PickContext {
            client: ctx.client.ip(),
            key,
        };
        let replayable =
            is_idempotent(request.method()) && matches!(request.body(), RequestBody::Empty);
        let mut retries_left = backend.config.retries;
        let mut failed: Option<Arc<Server>> = None;
        loop {
            let guard = std::pin::pin!(backend.acquire_retry(&pick, failed.as_ref())).await?;
            let server = Arc::clone(guard.server());
            trace.attempts.server = Some(Arc::clone(&server.name));
            trace.attempts.retries = backend.config.retries - retries_left;
            let retry = |retries_left: &mut u32| {
                if *retries_left == 0 {
                    return false;
                }
                *retries_left -= 1;
                backend.stats.retries.fetch_add(1, Ordering::Relaxed);
                true
            };
            let checkout = {
                let checkout = std::pin::pin!(server.pool.checkout());
                checkout.await
            };
            let mut connection = match checkout {
                Ok(connection) => connection,
                Err(err) => {
                    tracing::warn!(backend = %backend.name, server = %server.name, error = %err, "cannot connect to server");
                    backend.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    backend.record_failure(&server, &err.to_string());
                    if !retry(&mut retries_left) {
                        return Err(err.into());
                    }
                    failed = Some(server);
                    continue;
                }
            };
            // A copy to send again if the server fails after receiving it.
            let spare = (replayable && retries_left > 0).then(|| copy_head(&request));
            let timeout = backend.config.timeouts.response;
            let sent = tokio::time::Instant::now();
            let sent_result = {
                let send = connection.send(request);
                let send = std::pin::pin!(tokio::time::timeout_at(sent + timeout, send));
                send.await
            };
            match sent_result {
                Err(_) => {
                    // At least this slow: p2c should know.
                    server.state.record_response_time(timeout);
                    backend.record_failure(&server, "response timeout");
                    return Err(ProxyError::ResponseTimeout(timeout));
                }
                Ok(Ok(response)) => {
                    let waited = sent.elapsed();
                    server.state.record_response_time(waited);
                    let status = response.status();
                    server.state.count_response(status.as_u16());
                    backend.stats.response_seconds.observe(waited);
                    if matches!(status.as_u16(), 502..=504) {
                        backend.record_failure(&server, status.as_str());
                    } else {
                        backend.record_success(&server);
                    }
                    if matches!(status.as_u16(), 502 | 503)
                        && let Some(spare) = spare
                        && retry(&mut retries_left)
                    {
                        tracing::debug!(backend = %backend.name, server = %server.name, %status, "retrying on another server");
                        request = spare;
                        failed = Some(server);
                        continue;
                    }
                    return Ok((response, guard, connection));
                }
                Ok(Err(mut err)) => match err.take_message() {
                    // A pooled connection the server had closed: the request was not
                    // written; it goes out again on a fresh connection.
                    Some(unsent) if connection.is_reused() => request = unsent,
                    Some(unsent) if retry(&mut retries_left) => {
                        request = unsent;
                        failed = Some(server);
                    }
                    _ => {
                        let err = err.into_error();
                        backend.record_failure(&server, &err.to_string());
                        match spare {
                            Some(spare) if retry(&mut retries_left) => {
                                request = spare;
                                failed = Some(server);
                            }
                            _ => return Err(ProxyError::Upstream(err)),
                        }
                    }
                },
            }
        }
    }
}

/// A bodiless copy of a request head, to send it again.
fn copy_head(request: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::Empty);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Methods whose repetition has no further effect (RFC 9110 9.2.2).
pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_counts_the_head_as_written_on_the_wire() {
        let request = Request::get("/orders?id=7")
            .header("host", "x")
            .header("x-tenant", "acme")
            .body(())
            .expect("request");
        let wire = "GET /orders?id=7 HTTP/1.1\r\nhost: x\r\nx-tenant: acme\r\n\r\n";
        assert_eq!(head_size(&request), wire.len());
    }
}
