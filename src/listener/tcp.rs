//! Tcp mode: one server connection per client session, bytes copied both ways
//! with half-close passed on, and an idle timeout over both directions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Entry, TcpEntry};
use crate::balance::PickContext;
use crate::metrics::{ClientBytes, FrontendStats};
use crate::runtime::Frontend;
use crate::upstream::InFlightGuard;

/// Runs one session to its end: both sides closed, an error, or `idle` without a
/// byte in either direction.
pub async fn session<S>(
    mut client: S,
    peer: SocketAddr,
    frontend: Arc<Frontend>,
    idle: Duration,
    access_log: Option<Arc<AccessLog>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = std::time::Instant::now();
    let connected = connect(peer, &frontend).await;
    let server = connected
        .as_ref()
        .map(|(_, guard)| Arc::clone(&guard.server().name));
    // What the client sent and was sent, counted on the client's side as it
    // moves: however the session ends (an error, the idle timeout), all of
    // it is counted.
    let mut counted = ClientBytes::default();
    if let Some((mut server_stream, guard)) = connected {
        let activity = Arc::new(Activity::new());
        let mut client_side = Tracked::new(
            &mut client,
            &activity,
            Some((&frontend.stats, &mut counted)),
        );
        let mut server_side = Tracked::new(&mut server_stream, &activity, None);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client_side, &mut server_side) => match copied {
                Ok((up, down)) => {
                    tracing::debug!(%peer, server = %guard.server().name, up, down, "session ended");
                }
                Err(err) => tracing::debug!(%peer, server = %guard.server().name, error = %err, "session ended with an error"),
            },
            () = activity.idle_for(idle) => {
                tracing::debug!(%peer, server = %guard.server().name, "session idle, closing");
            }
        }
    }
    counted.flush(&frontend.stats);
    let (bytes_in, bytes_out) = counted.totals();
    // With no server, closing the client at once is the tcp-mode answer.
    if let Some(log) = access_log {
        log.log(Entry::Tcp(Box::new(TcpEntry {
            time: std::time::SystemTime::now() - started.elapsed(),
            client: peer,
            frontend: Arc::clone(&frontend.name),
            backend: Arc::clone(&frontend.router.default_backend().name),
            server,
            bytes_in,
            bytes_out,
            duration: started.elapsed(),
        })));
    }
}

/// Connects to a server of the frontend's backend (queueing for a slot like an
/// http request), trying another server after a connect failure as long as
/// `retries` allows. Nothing was sent to a server that could not be reached, so
/// a retry is always safe.
async fn connect(peer: SocketAddr, frontend: &Frontend) -> Option<(TcpStream, InFlightGuard)> {
    let backend = frontend.router.default_backend();
    let pick = PickContext {
        client: peer.ip(),
        key: None,
    };
    let timeout = backend.config.timeouts.connect;
    let mut retries_left = backend.config.retries;
    let mut failed = None;
    loop {
        let guard = match backend.acquire_retry(&pick, failed.as_ref()).await {
            Ok(guard) => guard,
            Err(why) => {
                tracing::warn!(frontend = %frontend.name, backend = %backend.name, %peer, "{why}, closing session");
                return None;
            }
        };
        let server = Arc::clone(guard.server());
        let started = Instant::now();
        let error = match tokio::time::timeout(timeout, TcpStream::connect(server.addr)).await {
            Ok(Ok(stream)) => {
                // Sessions have no response to time: the connect is what p2c
                // can learn a server's responsiveness from.
                server.state.record_response_time(started.elapsed());
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "cannot set TCP_NODELAY");
                }
                backend.record_success(&server);
                return Some((stream, guard));
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => {
                server.state.record_response_time(timeout);
                format!("connect timed out after {timeout:?}")
            }
        };
        tracing::warn!(backend = %backend.name, server = %server.name, error, "cannot connect to server");
        backend
            .stats
            .connect_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        backend.record_failure(&server, &error);
        if retries_left == 0 {
            return None;
        }
        retries_left -= 1;
        backend
            .stats
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        failed = Some(server);
    }
}

/// When either side of a session last moved a byte.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    /// Completes once no byte moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that records activity on every read and write.
struct Tracked<'a, S> {
    inner: &'a mut S,
    activity: &'a Activity,
    /// On the client's side: the bytes it sent (read here) and was sent
    /// (written here), and the frontend's counters they go to.
    counted: Option<(&'a FrontendStats, &'a mut ClientBytes)>,
}

impl<'a, S> Tracked<'a, S> {
    fn new(
        inner: &'a mut S,
        activity: &'a Activity,
        counted: Option<(&'a FrontendStats, &'a mut ClientBytes)>,
    ) -> Self {
        Tracked {
            inner,
            activity,
            counted,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if read > 0 {
            this.activity.touch();
            if let Some((stats, counted)) = &mut this.counted {
                counted.received(read as u64, stats);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut *this.inner).poll_write(cx, buf))?;
        this.activity.touch();
        if let Some((stats, counted)) = &mut this.counted {
            counted.sent(written as u64, stats);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
