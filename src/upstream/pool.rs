//! Connections to one server: keep-alive HTTP/1.1 connections reused LIFO, or one
//! shared multiplexed HTTP/2 connection.
//!
//! Each serving thread (see `crate::workers`) keeps its own: a connection's
//! task runs on the thread that opened it, and a request on another thread
//! using it would wake that thread twice per request. So with `threads = N`
//! there are up to N HTTP/2 connections per server, and HTTP/1.1 connections
//! idle on one thread wait for that thread's requests.
//!
//! Checkout connects before anything of the request is handed over, so a connect
//! failure can always be retried elsewhere with the request intact; and
//! `try_send_request` hands a request back when a pooled connection turned out to
//! be closed before it was written.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::Protocol;
use crate::http::body::RequestBody;
pub use crate::tls::ServerStream;
use crate::workers;

/// Idle HTTP/1.1 connections kept per server and thread at most; more are closed.
const MAX_IDLE_PER_SERVER: usize = 1024;

/// Why no connection to the server could be had. Nothing of the request was sent,
/// so every one of these is safe to retry on another server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// TLS to the server, when the backend has a `tls` table.
    pub tls: Option<UpstreamTls>,
}

/// How to speak TLS to one server.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// Sent as SNI and verified against the server's certificate.
    pub server_name: ServerName<'static>,
    /// Of the CA certificates `config` verifies with (0: the system's roots).
    pub ca_digest: u64,
}

/// The same settings: the same CA certificates, server name and ALPN. A reload
/// builds a new `config` from the same files; pools and checkers that compare
/// equal are kept, with their connections and TLS sessions.
impl PartialEq for UpstreamTls {
    fn eq(&self, other: &UpstreamTls) -> bool {
        self.ca_digest == other.ca_digest
            && self.server_name == other.server_name
            && self.config.alpn_protocols == other.config.alpn_protocols
    }
}

impl UpstreamTls {
    /// Connects and completes the TLS handshake.
    pub async fn connect(
        &self,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(self.server_name.clone(), stream)
            .await
    }
}

/// The connection pool of one server.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    settings: PoolSettings,
    /// One per serving thread, indexed by `workers::slot()`. Each lock is
    /// taken by its own thread, and by the eviction sweep now and then.
    threads: Box<[Mutex<ThreadConnections>]>,
}

/// The connections one thread opened to the server and may use.
#[derive(Debug, Default)]
struct ThreadConnections {
    idle: Vec<IdleConnection>,
    shared_h2: Option<http2::SendRequest<RequestBody>>,
    /// Plain HTTP/1.1 connections of flowgate's own codec (`http::h1`).
    streams: Vec<IdleStream>,
}

#[derive(Debug)]
struct IdleStream {
    stream: TcpStream,
    since: Instant,
}

#[derive(Debug)]
struct IdleConnection {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

impl Pool {
    pub fn new(addr: SocketAddr, settings: PoolSettings) -> Pool {
        Pool {
            addr,
            settings,
            threads: (0..workers::slots()).map(|_| Mutex::default()).collect(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// A ready connection: a pooled one if any is still good, else a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<Connection, ConnectError> {
        match self.settings.protocol {
            Protocol::Http1 => self.checkout_http1().await,
            Protocol::H2 => self.checkout_h2().await,
        }
    }

    async fn checkout_http1(self: &Arc<Self>) -> Result<Connection, ConnectError> {
        while let Some(mut idle) = self.pop_idle() {
            // A connection whose last response just ended may need a moment to
            // become ready; one the server closed fails here and is dropped.
            if idle.sender.ready().await.is_ok() {
                return Ok(Connection::new(Sender::Http1(idle.sender), self, true));
            }
        }
        // Boxed: connecting (and a TLS handshake) is the rare path, and its
        // state would otherwise size every request's future.
        Box::pin(self.open_http1()).await
    }

    async fn open_http1(self: &Arc<Self>) -> Result<Connection, ConnectError> {
        let stream = self.connect().await?;
        let (sender, connection) = http1::Builder::new()
            // As for client connections (src/http/server.rs): a request head
            // and a small body in one buffer, one plain write.
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(error = %err, "server connection ended");
            }
        });
        Ok(Connection::new(Sender::Http1(sender), self, false))
    }

    /// What the calling thread keeps.
    fn here(&self) -> MutexGuard<'_, ThreadConnections> {
        lock(&self.threads[workers::slot() % self.threads.len()])
    }

    async fn checkout_h2(self: &Arc<Self>) -> Result<Connection, ConnectError> {
        if let Some(sender) = self.here().shared_h2.as_ref()
            && sender.is_ready()
        {
            return Ok(Connection::new(Sender::H2(sender.clone()), self, true));
        }
        // Boxed, as for HTTP/1.1.
        Box::pin(self.open_h2()).await
    }

    async fn open_h2(self: &Arc<Self>) -> Result<Connection, ConnectError> {
        let stream = self.connect().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(self.settings.idle_timeout / 2))
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "server h2 connection ended");
            }
        });
        self.here().shared_h2 = Some(sender.clone());
        Ok(Connection::new(Sender::H2(sender), self, false))
    }

    /// Connects (and completes the TLS handshake), all within the connect
    /// timeout.
    async fn connect(&self) -> Result<ServerStream, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let connect = async {
            let stream = self.open_tcp().await?;
            Ok::<_, io::Error>(match &self.settings.tls {
                None => ServerStream::Plain(stream),
                Some(tls) => ServerStream::Tls(Box::new(tls.connect(stream).await?)),
            })
        };
        Ok(tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??)
    }

    async fn open_tcp(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// A plain TCP connection for flowgate's own HTTP/1.1 codec, and whether it
    /// was pooled: the latest one idle on this thread that is still open, or,
    /// without one (or with `fresh`), a new one. Only for servers spoken to
    /// without TLS.
    pub async fn checkout_stream(&self, fresh: bool) -> Result<(TcpStream, bool), ConnectError> {
        if !fresh && let Some(stream) = self.pop_stream() {
            return Ok((stream, true));
        }
        let timeout = self.settings.connect_timeout;
        let stream = tokio::time::timeout(timeout, self.open_tcp())
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        Ok((stream, false))
    }

    fn pop_stream(&self) -> Option<TcpStream> {
        let mut here = self.here();
        while let Some(idle) = here.streams.pop() {
            if idle.since.elapsed() < self.settings.idle_timeout && still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps a connection whose last response was read to its end for the next
    /// request on this thread.
    pub fn checkin_stream(&self, stream: TcpStream) {
        let mut here = self.here();
        if here.streams.len() < MAX_IDLE_PER_SERVER {
            here.streams.push(IdleStream {
                stream,
                since: Instant::now(),
            });
        }
    }

    fn pop_idle(&self) -> Option<IdleConnection> {
        let mut here = self.here();
        while let Some(connection) = here.idle.pop() {
            if connection.since.elapsed() < self.settings.idle_timeout
                && !connection.sender.is_closed()
            {
                return Some(connection);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut here = self.here();
        if here.idle.len() < MAX_IDLE_PER_SERVER {
            here.idle.push(IdleConnection {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes pooled connections idle for longer than the idle timeout (or closed
    /// by the server). Called periodically, off the request path.
    pub fn evict_expired(&self) {
        let timeout = self.settings.idle_timeout;
        for thread in &self.threads {
            let mut thread = lock(thread);
            thread.idle.retain(|connection| {
                connection.since.elapsed() < timeout && !connection.sender.is_closed()
            });
            thread
                .streams
                .retain(|idle| idle.since.elapsed() < timeout && still_open(&idle.stream));
            if thread
                .shared_h2
                .as_ref()
                .is_some_and(|sender| sender.is_closed())
            {
                thread.shared_h2 = None;
            }
        }
    }

    /// Closes every idle connection (the server left the config).
    pub fn close_idle(&self) {
        for thread in &self.threads {
            let mut thread = lock(thread);
            thread.idle.clear();
            thread.shared_h2 = None;
            thread.streams.clear();
        }
    }

    /// Idle HTTP/1.1 connections held now, on all threads.
    pub fn idle_count(&self) -> usize {
        self.threads
            .iter()
            .map(|thread| {
                let thread = lock(thread);
                thread.idle.len() + thread.streams.len()
            })
            .sum()
    }
}

/// Whether an idle connection is still open and has nothing unread: the
/// server neither closed it nor sent anything unasked. A system call only when
/// the I/O driver saw the socket become readable since its last read.
fn still_open(stream: &TcpStream) -> bool {
    matches!(stream.try_read(&mut [0; 1]), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
}

/// The pool's lists stay consistent under any panic (each critical section is a
/// single push, pop or retain), so a poisoned lock is safe to keep using.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

/// What sending a request on a server connection gives.
pub type SendResult = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>;

pin_project_lite::pin_project! {
    /// A request on its way over an HTTP/1.1 or an HTTP/2 connection.
    #[project = SendingProjection]
    pub enum Sending<A, B> {
        Http1 { #[pin] inner: A },
        H2 { #[pin] inner: B },
    }
}

impl<A, B> Future for Sending<A, B>
where
    A: Future<Output = SendResult>,
    B: Future<Output = SendResult>,
{
    type Output = SendResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendResult> {
        match self.project() {
            SendingProjection::Http1 { inner } => inner.poll(cx),
            SendingProjection::H2 { inner } => inner.poll(cx),
        }
    }
}

/// A connection checked out of a pool for one request. Hand it back with
/// [`Connection::release`] once the response has been read to its end; dropping
/// it instead closes an HTTP/1.1 connection.
#[derive(Debug)]
pub struct Connection {
    sender: Sender,
    pool: Arc<Pool>,
    reused: bool,
}

impl Connection {
    fn new(sender: Sender, pool: &Arc<Pool>, reused: bool) -> Connection {
        Connection {
            sender,
            pool: Arc::clone(pool),
            reused,
        }
    }

    /// Whether this connection came out of the pool (and may have been closed by
    /// the server meanwhile).
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    pub fn is_http2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// Sends the request. When the request was not written at all (the pooled
    /// connection was closed), the error gives it back for another attempt.
    ///
    /// Not an async fn: that would hold the request a second time beside
    /// hyper's future, and this future is part of every request's state.
    pub fn send(
        &mut self,
        request: Request<RequestBody>,
    ) -> Sending<impl Future<Output = SendResult>, impl Future<Output = SendResult>> {
        match &mut self.sender {
            Sender::Http1(sender) => Sending::Http1 {
                inner: sender.try_send_request(request),
            },
            Sender::H2(sender) => Sending::H2 {
                inner: sender.try_send_request(request),
            },
        }
    }

    /// Returns the connection to its pool for the next request.
    pub fn release(self) {
        match self.sender {
            Sender::Http1(sender) => self.pool.checkin(sender),
            Sender::H2(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;

    use super::*;
    use crate::workers::Workers;

    /// An HTTP/1.1 origin on loopback that counts the connections it accepted.
    async fn counting_origin() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(|_| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    }),
                ));
            }
        });
        (addr, accepted)
    }

    /// One request through the pool, run on `worker`'s thread: whether its
    /// connection was a reused one.
    async fn request_on(worker: &tokio::runtime::Handle, pool: &Arc<Pool>) -> bool {
        let pool = Arc::clone(pool);
        worker
            .spawn(async move {
                let mut connection = pool.checkout().await.expect("checkout");
                let reused = connection.is_reused();
                let response = connection
                    .send(Request::new(RequestBody::Empty))
                    .await
                    .expect("response");
                let body = response.into_body().collect().await.expect("body");
                assert_eq!(body.to_bytes(), "ok");
                connection.release();
                reused
            })
            .await
            .expect("the request task ran")
    }

    #[tokio::test]
    async fn each_thread_reuses_only_the_connections_it_opened() {
        let workers = Workers::start(2).expect("start workers");
        let (addr, accepted) = counting_origin().await;
        let pool = Arc::new(Pool::new(
            addr,
            PoolSettings {
                protocol: Protocol::Http1,
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(60),
                tls: None,
            },
        ));
        let [first, second] = workers.handles() else {
            panic!("two workers");
        };
        assert!(!request_on(first, &pool).await, "a new connection");
        // The first thread's idle connection is not used by the second.
        assert!(!request_on(second, &pool).await, "a new connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 2);
        // Each thread gets its own back.
        assert!(request_on(first, &pool).await, "reused");
        assert!(request_on(second, &pool).await, "reused");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        pool.close_idle();
        assert_eq!(pool.idle_count(), 0);
    }
}
