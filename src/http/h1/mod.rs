//! flowgate's own HTTP/1.1 forwarding, for the common request: an HTTP/1.1
//! request without a body, or with one that arrives whole with its head
//! within 8 KiB, to a backend spoken to in plain HTTP/1.1.
//!
//! hyper parses every head into a header map and writes it out again, on both
//! sides of the proxy, and runs each server connection in a task of its own.
//! Here the client's head is parsed in place (httparse), routed, and written
//! for the server into one buffer with the forwarding headers; the server's
//! head is parsed in place and written for the client the same way, and the
//! body is passed through as it comes: by length, chunk by chunk (found by a
//! scanner, not decoded), or until the server closes (then chunked for the
//! client). Server connections are plain sockets pooled per thread
//! (`Pool::checkout_stream`), read and written by the client connection's
//! own task.
//!
//! Anything else (a larger or chunked body, an upgrade, `Expect`, gRPC, an
//! absolute-form target, HTTP/1.0, a head hyper would reject, a backend
//! spoken to over h2 or TLS, a hash key to read) is handed to hyper before a
//! byte of it is sent: the bytes read so far are replayed to hyper's
//! connection, which serves from there (see `http::server`). Retries, the
//! response timeout, passive health, metrics and the access log behave as on
//! hyper's path (`http::proxy`).
//!
//! The server side serves hyper's path too: a request hyper parsed (h2, or
//! HTTP/1.1 handed over) without a body, to a backend spoken to in plain
//! HTTP/1.1, is written from its header map and exchanged here, its response
//! body read by the task that polls it (`to_server`).

mod framing;
mod head;
mod to_server;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use self::framing::ChunkError;
use self::framing::{ChunkedScanner, Framing};
pub use self::head::BadResponse;
use self::head::{MAX_HEADERS, Parsed, Response, ResponseHead, ServerHead};
pub use self::to_server::{ServerBody, send as send_parsed, takes as takes_parsed};
use super::conn::ClientIo;
use super::error::ProxyError;
use super::headers::new_request_id;
use super::proxy::ConnContext;
use crate::access_log::{Entry, HttpEntry};
use crate::balance::PickContext;
use crate::cancel::until_cancelled;
use crate::config::{Balance, Protocol};
use crate::upstream::{Backend, InFlightGuard, Server};

/// The client's read buffer: as hyper's, so a head hyper would take in one
/// read is read whole here too. A head that does not fit goes to hyper.
const CLIENT_BUFFER: usize = 8192;

/// The server's read buffer, grown for a longer response head up to
/// [`MAX_RESPONSE_HEAD`].
const SERVER_BUFFER: usize = 8192;

/// The longest response head taken from a server (502 beyond).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The most read from a server at once while passing a body on.
const MAX_BODY_READ: usize = 64 * 1024;

/// How serving a connection on this path ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The connection is closed (or flowgate is stopping).
    Closed,
    /// Idle: its buffers are freed until the client sends again.
    Parked,
    /// A request this path does not forward: its bytes are replayed for hyper.
    Handover,
}

/// Serves requests on `io` until the connection closes, parks, or sends a
/// request for hyper.
pub async fn serve<S>(
    io: &mut ClientIo<S>,
    ctx: &ConnContext,
    shutdown: &CancellationToken,
) -> Served
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffers = Buffers::default();
    loop {
        let mut plan = loop {
            match prepare(ctx, &buffers.client, &mut buffers.request) {
                Prepared::Forward(plan) => break plan,
                Prepared::Partial if buffers.client.len() < CLIENT_BUFFER => {}
                Prepared::Partial | Prepared::Other => {
                    io.replay(BytesMut::from(&buffers.client[..]));
                    return Served::Handover;
                }
            }
            let read = {
                let read = std::pin::pin!(io.read_buf(&mut buffers.client));
                until_cancelled(read, shutdown).await
            };
            match read {
                Some(Ok(0)) if buffers.client.is_empty() && io.unpark(&[]) => {
                    return Served::Parked;
                }
                Some(Ok(0) | Err(_)) => return Served::Closed,
                Some(Ok(_)) => {}
                None => {
                    let _ = io.shutdown().await;
                    return Served::Closed;
                }
            }
        };
        let active = ctx.activity.begin_request(plan.close);
        ctx.connection
            .stats()
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let closing = plan.close || shutdown.is_cancelled();
        let mut trace = Attempts::default();
        let exchanged = {
            let Buffers {
                request,
                server,
                reply,
                ..
            } = &mut buffers;
            let outgoing = Outgoing {
                backend: &plan.backend,
                pick: PickContext {
                    client: ctx.client.ip(),
                    key: None,
                },
                replayable: plan.replayable,
                head_request: plan.head_request,
                request,
            };
            let write_head = |head: &ServerHead<'_, '_>| head.write_for_client(reply, closing);
            std::pin::pin!(exchange(&outgoing, server, &mut trace, write_head)).await
        };
        let ttfb = plan.log.as_ref().map(|log| log.started.elapsed());
        let (status, relayed) = match exchanged {
            Ok(exchanged) => (
                exchanged.head.status,
                relay(io, exchanged, &mut buffers).await,
            ),
            Err(err) => {
                let status = err.status().as_u16();
                tracing::warn!(
                    frontend = %ctx.listener.frontend(),
                    client = %ctx.client,
                    method = buffers.text(&plan.method),
                    path = buffers.text(&plan.target).split('?').next().unwrap_or(""),
                    status,
                    error = %err,
                    "request failed"
                );
                (status, answer(io, &err, closing, &mut buffers.reply).await)
            }
        };
        drop(active);
        if let Some(log) = plan.log.take() {
            write_log(ctx, &plan, &buffers, log, trace, status, ttfb, relayed);
        }
        buffers.consume(plan.len);
        if relayed.is_none() || closing {
            let _ = io.shutdown().await;
            return Served::Closed;
        }
    }
}

/// A connection's buffers while it is served here; freed when it parks.
/// Read into their spare capacity, never zeroed.
struct Buffers {
    /// What the client sent: the current request head, and anything after it.
    client: Vec<u8>,
    /// The request for the server: its head, and its body if any.
    request: Vec<u8>,
    /// What the server sent.
    server: BytesMut,
    /// What goes to the client next.
    reply: Vec<u8>,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            client: Vec::with_capacity(CLIENT_BUFFER),
            request: Vec::with_capacity(1024),
            server: BytesMut::with_capacity(SERVER_BUFFER),
            reply: Vec::with_capacity(1024),
        }
    }
}

impl Buffers {
    /// Drops the served request's head; a pipelined request's bytes move up.
    fn consume(&mut self, len: usize) {
        self.client.drain(..len);
    }

    /// Text of the current head (method, target: ASCII, httparse checked).
    fn text(&self, range: &Range<usize>) -> &str {
        std::str::from_utf8(&self.client[range.clone()]).unwrap_or("")
    }
}

/// A request to forward, written for the server.
struct Plan {
    /// Bytes of the request (head and body) in the client buffer.
    len: usize,
    method: Range<usize>,
    target: Range<usize>,
    backend: Arc<Backend>,
    close: bool,
    /// Idempotent: may be sent again (it is whole in `Buffers::request`)
    /// after the server failed on it.
    replayable: bool,
    head_request: bool,
    log: Option<LogStart>,
}

struct LogStart {
    started: Instant,
    request_id: Option<HeaderValue>,
}

enum Prepared {
    Partial,
    Other,
    Forward(Plan),
}

/// Parses what the client sent so far and, for a request this path forwards,
/// writes its head for the server into `out`.
fn prepare(ctx: &ConnContext, buf: &[u8], out: &mut Vec<u8>) -> Prepared {
    if buf.is_empty() {
        return Prepared::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let head = match head::parse_request(buf, &mut headers) {
        Parsed::Partial => return Prepared::Partial,
        Parsed::Other => return Prepared::Other,
        // hyper's path answers a refused client.
        Parsed::Head(_) if ctx.refused => return Prepared::Other,
        Parsed::Head(head) => head,
    };
    // A body is forwarded when it arrives whole with its head, within the
    // client buffer (so the head timer also covers it); a larger one goes to
    // hyper, which streams it.
    let len = head.len + head.body;
    if len > CLIENT_BUFFER {
        return Prepared::Other;
    }
    if buf.len() < len {
        return Prepared::Partial;
    }
    let runtime = ctx.runtime.load();
    let Some(frontend) = runtime.frontend(&ctx.listener.settings.load().frontend) else {
        return Prepared::Other;
    };
    if head.normalized_size() > frontend.config.limits.max_header_bytes {
        return Prepared::Other;
    }
    let backend = frontend.router.route(&head);
    let config = &backend.config;
    if config.protocol != Protocol::Http1 || config.tls.is_some() || config.balance == Balance::Hash
    {
        return Prepared::Other;
    }
    let new_id = head.request_id().is_none().then(new_request_id);
    head.write_for_server(
        out,
        ctx.forwarded_for.as_bytes(),
        ctx.https,
        new_id.as_ref().map(|id| &id[..]),
    );
    out.extend_from_slice(&buf[head.len..len]);
    let log = ctx.access_log.is_some().then(|| LogStart {
        started: Instant::now(),
        request_id: head
            .request_id()
            .or(new_id.as_ref().map(|id| &id[..]))
            .and_then(|id| HeaderValue::from_bytes(id).ok()),
    });
    Prepared::Forward(Plan {
        len,
        method: within(buf, head.method.as_bytes()),
        target: within(buf, head.target.as_bytes()),
        backend: Arc::clone(backend),
        close: head.close,
        replayable: head.idempotent(),
        head_request: head.method == "HEAD",
        log,
    })
}

/// Where `part`, a slice of `buf`, lies in it.
fn within(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

/// The servers a request was sent to, for the access log.
#[derive(Debug, Default)]
pub struct Attempts {
    /// The server of the last attempt.
    pub server: Option<Arc<str>>,
    pub retries: u32,
}

/// A request written for the server, and how to send it.
struct Outgoing<'a> {
    backend: &'a Backend,
    pick: PickContext<'a>,
    /// Idempotent and whole in `request`: may be sent again after the server
    /// failed on it.
    replayable: bool,
    head_request: bool,
    request: &'a [u8],
}

/// A response head received, and what the response holds until its end.
struct Exchanged {
    stream: TcpStream,
    guard: InFlightGuard,
    head: ResponseHead,
    server: Arc<Server>,
}

/// Picks a server and sends the request until a response head arrives; with
/// the same retries as hyper's path (`proxy::send`): after a connect failure,
/// whatever the request; after a failed exchange or a 502/503, when the request
/// is idempotent. A pooled connection found closed when the request could
/// not be written is replaced by a new one, uncounted. `write_head` gets the
/// final response head, read into `server`; what follows it stays there.
async fn exchange<F>(
    outgoing: &Outgoing<'_>,
    server: &mut BytesMut,
    trace: &mut Attempts,
    mut write_head: F,
) -> Result<Exchanged, ProxyError>
where
    F: FnMut(&ServerHead<'_, '_>),
{
    let Outgoing {
        backend,
        ref pick,
        replayable,
        head_request,
        request,
    } = *outgoing;
    let mut retries_left = backend.config.retries;
    let mut failed: Option<Arc<Server>> = None;
    let mut fresh = false;
    let retry = |retries_left: &mut u32| {
        if *retries_left == 0 {
            return false;
        }
        *retries_left -= 1;
        backend.stats.retries.fetch_add(1, Ordering::Relaxed);
        true
    };
    loop {
        let guard = std::pin::pin!(backend.acquire_retry(pick, failed.as_ref())).await?;
        let picked = Arc::clone(guard.server());
        trace.server = Some(Arc::clone(&picked.name));
        trace.retries = backend.config.retries - retries_left;
        let (mut stream, reused) = match picked
            .pool
            .checkout_stream(std::mem::take(&mut fresh))
            .await
        {
            Ok(checked_out) => checked_out,
            Err(err) => {
                tracing::warn!(backend = %backend.name, server = %picked.name, error = %err, "cannot connect to server");
                backend.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                backend.record_failure(&picked, &err.to_string());
                if !retry(&mut retries_left) {
                    return Err(err.into());
                }
                failed = Some(picked);
                continue;
            }
        };
        let timeout = backend.config.timeouts.response;
        let sent = tokio::time::Instant::now();
        let result = {
            let round_trip =
                round_trip(&mut stream, request, server, head_request, &mut write_head);
            tokio::time::timeout_at(sent + timeout, round_trip).await
        };
        match result {
            Err(_) => {
                // At least this slow: p2c should know.
                picked.state.record_response_time(timeout);
                backend.record_failure(&picked, "response timeout");
                return Err(ProxyError::ResponseTimeout(timeout));
            }
            Ok(Ok(head)) => {
                let waited = sent.elapsed();
                picked.state.record_response_time(waited);
                picked.state.count_response(head.status);
                backend.stats.response_seconds.observe(waited);
                if matches!(head.status, 502..=504) {
                    backend.record_failure(&picked, itoa::Buffer::new().format(head.status));
                } else {
                    backend.record_success(&picked);
                }
                if matches!(head.status, 502 | 503) && replayable && retry(&mut retries_left) {
                    tracing::debug!(backend = %backend.name, server = %picked.name, status = head.status, "retrying on another server");
                    failed = Some(picked);
                    continue;
                }
                return Ok(Exchanged {
                    stream,
                    guard,
                    head,
                    server: picked,
                });
            }
            Ok(Err(Failure::Unsent(_))) if reused => fresh = true,
            Ok(Err(Failure::Closed)) if reused && replayable => fresh = true,
            Ok(Err(failure)) => {
                let err = failure.into_error();
                backend.record_failure(&picked, &err.to_string());
                if !(replayable && retry(&mut retries_left)) {
                    return Err(err);
                }
                failed = Some(picked);
            }
        }
    }
}

/// How a round trip to the server failed.
enum Failure {
    /// The request could not be written.
    Unsent(std::io::Error),
    /// The server closed the connection before any byte of a response.
    Closed,
    Io(std::io::Error),
    Bad(BadResponse),
}

impl Failure {
    fn into_error(self) -> ProxyError {
        match self {
            Failure::Unsent(err) | Failure::Io(err) => ProxyError::ServerIo(err),
            Failure::Closed => ProxyError::BadResponse(BadResponse::Closed),
            Failure::Bad(bad) => ProxyError::BadResponse(bad),
        }
    }
}

/// Writes the request and reads the final response head into `server`,
/// handing it to `write_head`; what followed the head stays in `server`.
async fn round_trip<F>(
    stream: &mut TcpStream,
    request: &[u8],
    server: &mut BytesMut,
    head_request: bool,
    write_head: &mut F,
) -> Result<ResponseHead, Failure>
where
    F: FnMut(&ServerHead<'_, '_>),
{
    stream.write_all(request).await.map_err(Failure::Unsent)?;
    server.clear();
    let mut received = false;
    loop {
        if server.len() == server.capacity() {
            if server.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Bad(BadResponse::TooLarge(MAX_RESPONSE_HEAD)));
            }
            server.reserve(server.len().max(SERVER_BUFFER));
        }
        let count = stream.read_buf(server).await.map_err(|err| {
            if received {
                Failure::Io(err)
            } else {
                Failure::Closed
            }
        })?;
        if count == 0 {
            return Err(if received {
                Failure::Bad(BadResponse::Closed)
            } else {
                Failure::Closed
            });
        }
        received = true;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match head::parse_response(server, &mut headers, head_request).map_err(Failure::Bad)? {
                None => break,
                Some(Response::Final(head)) => {
                    write_head(&head);
                    return Ok(head.head);
                }
                Some(Response::Interim { len }) => server.advance(len),
            }
        }
    }
}

/// Passes the response on to the client: the head, then the body as it
/// comes. `Some(body bytes)` when the response went out whole; `None` when
/// either side failed (the client connection must close then). The server
/// connection goes back to its pool when the server keeps it open and sent
/// nothing past the response.
async fn relay<S>(io: &mut ClientIo<S>, exchanged: Exchanged, buffers: &mut Buffers) -> Option<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Exchanged {
        mut stream,
        guard,
        head,
        server,
    } = exchanged;
    let Buffers {
        server: buf, reply, ..
    } = buffers;
    let mut reusable = head.keep_alive;
    let mut body = Body::new(head.framing);
    // The head and the body's first bytes go out in one write.
    let first = &buf[head.len..];
    let (taken, mut done) = body.take(first)?;
    reusable &= taken == first.len();
    let mut bytes = taken as u64;
    body.copy(&first[..taken], reply);
    write(io, reply).await?;
    while !done {
        // A read that fills the buffer doubles it, up to MAX_BODY_READ: a
        // large body then takes fewer reads (and the server fewer window
        // updates).
        let full = buf.len() == buf.capacity();
        buf.clear();
        if full && buf.capacity() < MAX_BODY_READ {
            buf.reserve(buf.capacity() * 2);
        }
        let count = stream.read_buf(buf).await.ok()?;
        if count == 0 {
            // Only a body delimited by the close ends here whole.
            if body.framing != Framing::Close {
                return None;
            }
            write(io, b"0\r\n\r\n").await?;
            break;
        }
        let piece = &buf[..count];
        let (taken, end) = body.take(piece)?;
        reusable &= taken == piece.len();
        bytes += taken as u64;
        done = end;
        if body.framing == Framing::Close {
            reply.clear();
            body.copy(piece, reply);
            write(io, reply).await?;
        } else {
            write(io, &piece[..taken]).await?;
        }
    }
    if reusable && done {
        server.pool.checkin_stream(stream);
    }
    drop(guard);
    Some(bytes)
}

/// Writes `bytes` to the client and flushes them (TLS sends its records then).
async fn write<S>(io: &mut ClientIo<S>, bytes: &[u8]) -> Option<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(bytes).await.ok()?;
    io.flush().await.ok()
}

/// A response body on its way, as its framing delimits it.
#[derive(Debug)]
struct Body {
    framing: Framing,
    /// Bytes left of a `Fixed` body.
    left: u64,
    chunks: ChunkedScanner,
}

impl Body {
    fn new(framing: Framing) -> Body {
        Body {
            framing,
            left: match framing {
                Framing::Fixed(length) => length,
                _ => 0,
            },
            chunks: ChunkedScanner::default(),
        }
    }

    /// How many bytes of `piece`, the next bytes from the server, are the
    /// body's, and whether the body ended with them; `None` for a malformed
    /// chunked body.
    fn take(&mut self, piece: &[u8]) -> Option<(usize, bool)> {
        Some(match self.framing {
            Framing::Empty => (0, true),
            Framing::Fixed(_) => {
                let taken = piece
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= taken as u64;
                (taken, self.left == 0)
            }
            Framing::Chunked => match self.chunks.scan(piece).ok()? {
                Some(end) => (end, true),
                None => (piece.len(), false),
            },
            Framing::Close => (piece.len(), false),
        })
    }

    /// Appends body bytes to `out` as the client gets them: as they came, or,
    /// for a body delimited by the close, as a chunk.
    fn copy(&self, data: &[u8], out: &mut Vec<u8>) {
        if self.framing != Framing::Close {
            out.extend_from_slice(data);
        } else if !data.is_empty() {
            chunk(out, data);
        }
    }
}

/// Appends `data` as one chunk of a chunked body.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Answers the client with flowgate's error response for `err`. `Some(0)` when
/// the answer went out.
async fn answer<S>(
    io: &mut ClientIo<S>,
    err: &ProxyError,
    closing: bool,
    out: &mut Vec<u8>,
) -> Option<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let status: StatusCode = err.status();
    let text = err.client_message();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(text.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
    write(io, out).await?;
    Some(text.len() as u64)
}

/// Writes the access log's line for a request served here.
#[allow(
    clippy::too_many_arguments,
    reason = "everything a log line holds, gathered from one request"
)]
fn write_log(
    ctx: &ConnContext,
    plan: &Plan,
    buffers: &Buffers,
    log: LogStart,
    trace: Attempts,
    status: u16,
    ttfb: Option<Duration>,
    bytes: Option<u64>,
) {
    let Some(access_log) = &ctx.access_log else {
        return;
    };
    let total = log.started.elapsed();
    access_log.log(Entry::Http(Box::new(HttpEntry {
        time: SystemTime::now() - total,
        client: ctx.client,
        frontend: ctx.listener.frontend(),
        backend: Some(Arc::clone(&plan.backend.name)),
        server: trace.server,
        method: Method::from_bytes(buffers.text(&plan.method).as_bytes()).unwrap_or_default(),
        uri: buffers.text(&plan.target).parse().unwrap_or_default(),
        status,
        bytes: bytes.unwrap_or(0),
        ttfb: ttfb.unwrap_or(total),
        total,
        request_id: log.request_id,
        retries: trace.retries,
    })));
}
