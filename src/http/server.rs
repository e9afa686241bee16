//! Serving one client connection: HTTP/1.1 with keep-alive and h2c (prior
//! knowledge), told apart by the connection preface; h2 when TLS negotiated it.
//!
//! HTTP/1.1 requests go to flowgate's own codec ([`h1`]) while they suit it,
//! and from the first one that does not, to a hyper connection (with the bytes
//! read so far replayed); h2 and h2c always to hyper.
//!
//! An HTTP/1.1 connection idle for [`PARK_AFTER`](super::conn::PARK_AFTER)
//! parks: [`ClientIo`] ends the codec's loop, or hyper's connection, as if the
//! client had closed, without closing the socket, so their buffers (hyper
//! keeps an 8 KiB read and an 8 KiB write buffer for as long as its
//! connection lives) are freed; the task then waits for the socket to become
//! readable, with no buffer, and the next request starts afresh. Idle
//! keep-alive connections cost a few KiB each.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::conn::{ClientIo, ClientTimeouts};
use super::h1::{self, Served};
use super::proxy::{ConnContext, handle};
use crate::cancel::until_cancelled;
use crate::config;
use crate::tls::ClientStream;

/// hyper refuses a read buffer smaller than this; heads up to it are accepted.
const MIN_HEAD_BUFFER: usize = 8192;

/// The most read at once from a connection before hyper's connection starts,
/// to tell h2c's preface: as much as hyper's first read.
const FIRST_READ: usize = MIN_HEAD_BUFFER;

/// What an h2c client with prior knowledge sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The hyper server settings for one frontend, built once and shared by its
/// connections.
#[derive(Debug)]
pub struct ServerBuilder {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

pub fn builder(frontend: &config::Frontend) -> ServerBuilder {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // flowgate's own head timer answers 408; hyper's would also cut idle
        // keep-alive connections and answer nothing.
        .header_read_timeout(None)
        .keep_alive(true)
        // One buffer per write: a response head and a small body go out in
        // one plain write instead of a writev of the two, 4-5 % less CPU per
        // request on small responses, no more on 16 KiB ones (measured with
        // benches/ab.sh, docs/performance.md).
        .writev(false)
        .max_buf_size(frontend.limits.max_header_bytes.max(MIN_HEAD_BUFFER));
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(frontend.limits.max_header_bytes).unwrap_or(u32::MAX));
    ServerBuilder { http1, http2 }
}

/// Serves one client connection until it closes, or until `shutdown` asks it to
/// finish: then in-flight requests complete and the connection closes. `http2`
/// when TLS negotiated h2 by ALPN.
pub async fn serve(
    stream: ClientStream,
    ctx: Arc<ConnContext>,
    builder: Arc<ServerBuilder>,
    timeouts: ClientTimeouts,
    shutdown: CancellationToken,
    http2: bool,
) {
    let mut io = ClientIo::new(
        stream,
        Arc::clone(&ctx.activity),
        timeouts,
        http2,
        Arc::clone(ctx.connection.stats()),
    );
    // handle's future itself, not one wrapping it: that would hold it twice,
    // and hyper moves the service's future for every request.
    let service = {
        let ctx = Arc::clone(&ctx);
        service_fn(move |request| handle(Arc::clone(&ctx), request))
    };
    let http2 = http2 || {
        // Without TLS, the first bytes tell HTTP/1.1 from h2c's preface.
        let Some(first) = first_bytes(&mut io, &shutdown).await else {
            return;
        };
        first.starts_with(H2_PREFACE)
    };
    if http2 {
        io.set_http2();
        // Boxed, like HTTP/1.1's below: the task's own state stays small.
        let mut connection = Box::new(builder.http2.serve_connection(TokioIo::new(io), service));
        let result = match until_cancelled(Pin::new(&mut *connection), &shutdown).await {
            Some(result) => result,
            None => {
                Pin::new(&mut *connection).graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = result {
            tracing::debug!(error = %err, "client connection ended with an error");
        }
        return;
    }
    // HTTP/1.1: flowgate's own codec while requests suit it, a hyper
    // connection from the first one that does not; parked (no buffers, no
    // hyper state) whenever idle.
    loop {
        // Boxed, like hyper's connection below: allocated while the codec
        // serves, not part of a parked connection's task.
        match Box::pin(h1::serve(&mut io, &ctx, &shutdown)).await {
            Served::Closed => return,
            Served::Parked => {
                if !wait_parked(&io, &shutdown).await {
                    let _ = io.shutdown().await;
                    return;
                }
                continue;
            }
            Served::Handover => {}
        }
        // Boxed, so that a parked connection's task holds none of it.
        let mut connection = Box::new(
            builder
                .http1
                .serve_connection(TokioIo::new(io), service.clone())
                .with_upgrades(),
        );
        let result = match until_cancelled(Pin::new(&mut *connection), &shutdown).await {
            Some(result) => result,
            None => {
                Pin::new(&mut *connection).graceful_shutdown();
                (&mut connection).await
            }
        };
        if let Err(err) = result {
            tracing::debug!(error = %err, "client connection ended with an error");
            return;
        }
        let parked = {
            // Everything of hyper's connection is freed at the end of this
            // block, before the wait.
            let connection = connection;
            // None: upgraded, the tunnel owns the socket now.
            let Some(parts) = (*connection).into_parts() else {
                return;
            };
            io = parts.io.into_inner();
            io.unpark(&parts.read_buf)
        };
        if !parked {
            // Closed, not parked.
            return;
        }
        if !io.has_replay() && !wait_parked(&io, &shutdown).await {
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// Waits, parked, for the client's next request: true when it sends
/// something (or closes, which hyper then sees), false when the idle timeout
/// expires or flowgate is stopping.
async fn wait_parked(io: &ClientIo<ClientStream>, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        ready = std::future::poll_fn(|cx| io.get_ref().poll_read_ready(cx)) => ready.is_ok(),
        () = tokio::time::sleep_until(io.idle_deadline()) => false,
        () = shutdown.cancelled() => false,
    }
}

/// Reads a connection's first bytes (within its head timer) while they could
/// still be h2c's preface, and keeps them for hyper to read again; returns
/// them. `None` when the connection ended: the client closed it, the timer
/// expired, or flowgate is stopping.
///
/// The first read is as large as hyper's own would be, so that a whole
/// request head usually arrives in it: hyper then reads no more before it
/// answers.
async fn first_bytes<'a, S>(
    io: &'a mut ClientIo<S>,
    shutdown: &CancellationToken,
) -> Option<&'a [u8]>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if shutdown.is_cancelled() {
        let _ = io.shutdown().await;
        return None;
    }
    let mut first = BytesMut::new();
    loop {
        let read = tokio::select! {
            read = std::future::poll_fn(|cx| poll_read_chunk(&mut *io, cx)) => read,
            () = shutdown.cancelled() => Ok(BytesMut::new()),
        };
        match read {
            Ok(chunk) if !chunk.is_empty() => {
                if first.is_empty() {
                    first = chunk;
                } else {
                    first.extend_from_slice(&chunk);
                }
                let more = first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first);
                if !more {
                    return Some(io.replay(first));
                }
            }
            Ok(_) => {
                let _ = io.shutdown().await;
                return None;
            }
            Err(err) => {
                tracing::debug!(error = %err, "client connection ended with an error");
                return None;
            }
        }
    }
}

/// One read of up to [`FIRST_READ`] bytes, copied out of a buffer on the stack
/// (held across no await, it adds nothing to the connection's task); empty at
/// the end of the stream.
fn poll_read_chunk<S>(io: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<BytesMut>>
where
    S: AsyncRead + Unpin,
{
    let mut buf = [MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut read = ReadBuf::uninit(&mut buf);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    Poll::Ready(Ok(BytesMut::from(read.filled())))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, DuplexStream, duplex};

    use super::*;

    fn client_io(stream: DuplexStream) -> ClientIo<DuplexStream> {
        let timeouts = ClientTimeouts {
            request_header: Duration::from_secs(30),
            client_idle: Duration::from_secs(30),
        };
        ClientIo::new(stream, Arc::default(), timeouts, false, Arc::default())
    }

    /// Polls `future` once: whether it is still waiting.
    async fn pending<F: Future + Unpin>(future: &mut F) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn a_request_head_is_read_whole_and_replayed() {
        let (mut client, server) = duplex(64 * 1024);
        let head = b"GET /path HTTP/1.1\r\nhost: example\r\nx-long: ".to_vec();
        let head = [head, vec![b'a'; 5000], b"\r\n\r\n".to_vec()].concat();
        client.write_all(&head).await.unwrap();
        let mut io = client_io(server);
        let first = first_bytes(&mut io, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(first, &head[..], "the whole head in one read");
        let mut again = vec![0; head.len()];
        io.read_exact(&mut again).await.unwrap();
        assert_eq!(again, head, "hyper reads the same bytes again");
    }

    #[tokio::test]
    async fn a_preface_in_pieces_is_read_until_it_is_whole() {
        let (mut client, server) = duplex(64 * 1024);
        let mut io = client_io(server);
        let shutdown = CancellationToken::new();
        {
            let mut first = Box::pin(first_bytes(&mut io, &shutdown));
            client.write_all(&H2_PREFACE[..3]).await.unwrap();
            assert!(
                pending(&mut first).await,
                "3 bytes of the preface: waits for more"
            );
            client.write_all(&H2_PREFACE[3..20]).await.unwrap();
            assert!(
                pending(&mut first).await,
                "20 bytes of the preface: waits for more"
            );
            client.write_all(&H2_PREFACE[20..]).await.unwrap();
            client.write_all(b"frames").await.unwrap();
            let first = first.await.unwrap();
            assert!(first.starts_with(H2_PREFACE), "{first:?}");
        }
        let mut again = vec![0; H2_PREFACE.len()];
        io.read_exact(&mut again).await.unwrap();
        assert_eq!(again, H2_PREFACE);
    }

    #[tokio::test]
    async fn a_head_that_starts_like_the_preface_is_not_held_back() {
        let (mut client, server) = duplex(64 * 1024);
        let mut io = client_io(server);
        let shutdown = CancellationToken::new();
        let mut first = Box::pin(first_bytes(&mut io, &shutdown));
        client.write_all(b"PRI").await.unwrap();
        assert!(pending(&mut first).await, "could still be the preface");
        client.write_all(b"NT / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(first.await.unwrap(), b"PRINT / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_closed_connection_has_no_first_bytes() {
        let (client, server) = duplex(1024);
        drop(client);
        let mut io = client_io(server);
        assert!(
            first_bytes(&mut io, &CancellationToken::new())
                .await
                .is_none()
        );
    }
}
