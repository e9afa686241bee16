//! Listening sockets and their accept loops: connection limits (accepting pauses
//! at the limit), allow/deny, and the hand-off to http or tcp mode.

pub mod tcp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::cancel::until_cancelled;
use crate::config::Mode;
use crate::http::conn::{ClientTimeouts, ConnActivity};
use crate::http::headers::forwarded_for_value;
use crate::http::proxy::ConnContext;
use crate::http::server::{self, ServerBuilder};
use crate::metrics::OpenConnection;
use crate::runtime::SharedRuntime;
use crate::tls::ClientStream;
use crate::workers::{Assigned, ServingThreads};

const BACKLOG: i32 = 1024;

/// Binds a listening socket the way a proxy needs it: SO_REUSEADDR (rebinding
/// right after a restart), IPV6_V6ONLY (so `[::]:80` and `0.0.0.0:80` coexist),
/// TCP_NODELAY (Linux gives it to every accepted connection, which saves a
/// system call per connection) and non-blocking for tokio.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// What the accept loops of all listeners share.
#[derive(Debug, Clone)]
pub struct Shared {
    pub runtime: SharedRuntime,
    /// `global.max_connections`.
    pub connections: Arc<Semaphore>,
    /// Every connection and session task; a graceful stop waits on it.
    pub tracker: TaskTracker,
    /// Cancelled when the process stops: connections finish what is in flight.
    pub shutdown: CancellationToken,
    /// The access log new connections write to (swapped when a reload changes it).
    pub access_log: Arc<ArcSwapOption<AccessLog>>,
    /// The threads accepted connections are served on.
    pub threads: Arc<ServingThreads>,
}

/// What a listener serves, swapped whole when a reload changes it.
#[derive(Debug)]
pub struct ListenerSettings {
    pub frontend: Arc<str>,
    /// The frontend's own `max_connections`, when it has one.
    pub limit: Option<Arc<Semaphore>>,
}

/// A listener's controls, shared by its accept loop, its connections and the
/// supervisor.
#[derive(Debug)]
pub struct ListenerControl {
    pub settings: ArcSwap<ListenerSettings>,
    /// Stop accepting: the socket closes at once.
    pub stop: CancellationToken,
    /// Ask this listener's connections to finish what is in flight and close
    /// (a child of the process-wide shutdown).
    pub drain: CancellationToken,
    /// Close this listener's connections now (the drain grace period is over).
    pub kill: CancellationToken,
}

impl ListenerControl {
    pub fn new(settings: ListenerSettings, shutdown: &CancellationToken) -> ListenerControl {
        ListenerControl {
            settings: ArcSwap::from_pointee(settings),
            stop: CancellationToken::new(),
            drain: shutdown.child_token(),
            kill: CancellationToken::new(),
        }
    }

    /// The frontend this listener serves now.
    pub fn frontend(&self) -> Arc<str> {
        Arc::clone(&self.settings.load().frontend)
    }
}

/// One listening socket, as one serving thread accepts on it.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    control: Arc<ListenerControl>,
    /// The serving thread this accept loop runs on (its index in
    /// [`ServingThreads`]).
    thread: usize,
}

impl Listener {
    /// Accepts on `socket` from serving thread `thread`; call it on that
    /// thread's runtime.
    pub fn new(
        socket: std::net::TcpListener,
        control: Arc<ListenerControl>,
        thread: usize,
    ) -> io::Result<Listener> {
        let listener = TcpListener::from_std(socket)?;
        Ok(Listener {
            listener,
            control,
            thread,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Chooses the serving thread for a connection this thread accepted (see
    /// [`ServingThreads`]); a connection handed to another thread moves to
    /// that thread's I/O driver.
    fn assign(
        &self,
        threads: &Arc<ServingThreads>,
        stream: TcpStream,
    ) -> io::Result<(Assigned, TcpStream)> {
        let assigned = threads.assign(self.thread);
        let stream = if assigned.index() == self.thread {
            stream
        } else {
            let _driver = threads.enter(assigned.index());
            TcpStream::from_std(stream.into_std()?)?
        };
        Ok((assigned, stream))
    }

    /// Accepts until `stop` is cancelled, then closes the socket at once: new
    /// connections are refused while the accepted ones go on.
    pub async fn run(self, shared: Shared) {
        let control = Arc::clone(&self.control);
        let mut builder: Option<(u64, Arc<ServerBuilder>)> = None;
        loop {
            let settings = control.settings.load_full();
            let Some(permits) =
                acquire(&shared.connections, settings.limit.as_ref(), &control.stop).await
            else {
                break;
            };
            let (stream, client) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        backoff(&err).await;
                        continue;
                    }
                },
                () = control.stop.cancelled() => break,
            };
            let runtime = shared.runtime.load_full();
            let frontend_name = control.frontend();
            let Some(frontend) = runtime.frontend(&frontend_name) else {
                continue;
            };
            let refused = !frontend.access.permits(client.ip());
            let timeouts = ClientTimeouts {
                request_header: frontend.config.timeouts.request_header,
                client_idle: frontend.config.timeouts.client_idle,
            };
            let control = Arc::clone(&control);
            let tls = frontend
                .config
                .tls
                .as_ref()
                .and_then(|tls| tls.server.clone());
            let open = frontend.stats.open_connection();
            let access_log = shared.access_log.load_full();
            if refused && frontend.config.mode == Mode::Tcp {
                tracing::debug!(frontend = %frontend_name, %client, "session refused by allow/deny");
                continue;
            }
            let (assigned, stream) = match self.assign(&shared.threads, stream) {
                Ok(assigned) => assigned,
                Err(err) => {
                    tracing::warn!(%client, error = %err, "cannot hand a connection over");
                    continue;
                }
            };
            let on = assigned.index();
            match frontend.config.mode {
                Mode::Http => {
                    let builder = match &builder {
                        Some((generation, builder)) if *generation == runtime.generation => {
                            Arc::clone(builder)
                        }
                        _ => {
                            let fresh = Arc::new(server::builder(&frontend.config));
                            builder = Some((runtime.generation, Arc::clone(&fresh)));
                            fresh
                        }
                    };
                    let connection = HttpConnection {
                        runtime: Arc::clone(&shared.runtime),
                        control: Arc::clone(&control),
                        client,
                        refused,
                        timeouts,
                        builder,
                        tunnels: shared.tracker.clone(),
                        open,
                        access_log,
                    };
                    shared.threads.spawn(on, &shared.tracker, async move {
                        prepare(&stream);
                        let serve = std::pin::pin!(connection.serve(stream, tls));
                        until_cancelled(serve, &control.kill).await;
                        drop((permits, assigned));
                    });
                }
                Mode::Tcp => {
                    let frontend = Arc::clone(frontend);
                    shared.threads.spawn(on, &shared.tracker, async move {
                        prepare(&stream);
                        let session = async {
                            let _open = open;
                            let stream = match tls {
                                None => ClientStream::Plain(stream),
                                Some(tls) => {
                                    let limit = timeouts.request_header;
                                    // Boxed and pinned as in HttpConnection::serve.
                                    match Box::pin(handshake(stream, tls, client, limit)).await {
                                        Some(stream) => ClientStream::Tls(stream),
                                        None => {
                                            let failures = &frontend.stats.tls_handshake_failures;
                                            failures.fetch_add(1, Ordering::Relaxed);
                                            return;
                                        }
                                    }
                                }
                            };
                            let idle = timeouts.client_idle;
                            std::pin::pin!(tcp::session(
                                stream, client, frontend, idle, access_log
                            ))
                            .await;
                        };
                        until_cancelled(std::pin::pin!(session), &control.kill).await;
                        drop((permits, assigned));
                    });
                }
            }
        }
        tracing::info!(frontend = %control.frontend(), addr = ?self.local_addr().ok(), "stopped listening");
    }
}

/// An accepted http-mode connection, before its TLS handshake (if any).
struct HttpConnection {
    runtime: SharedRuntime,
    control: Arc<ListenerControl>,
    client: SocketAddr,
    refused: bool,
    timeouts: ClientTimeouts,
    builder: Arc<ServerBuilder>,
    tunnels: TaskTracker,
    open: OpenConnection,
    access_log: Option<Arc<AccessLog>>,
}

impl HttpConnection {
    async fn serve(self, stream: TcpStream, tls: Option<Arc<rustls::ServerConfig>>) {
        let drain = self.control.drain.clone();
        let (stream, https, http2) = match tls {
            None => (ClientStream::Plain(stream), false, false),
            Some(tls) => {
                let limit = self.timeouts.request_header;
                // Boxed: the handshake's state (rustls' connection mid-way) is
                // large and needed only until the handshake ends; unboxed it
                // would size every connection's task, plain ones too.
                let handshake = Box::pin(handshake(stream, tls, self.client, limit));
                let Some(stream) = handshake.await else {
                    let failures = &self.open.stats().tls_handshake_failures;
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                (ClientStream::Tls(stream), true, http2)
            }
        };
        let (builder, timeouts) = (Arc::clone(&self.builder), self.timeouts);
        let ctx = Arc::new(ConnContext {
            runtime: self.runtime,
            listener: self.control,
            client: self.client,
            forwarded_for: forwarded_for_value(self.client.ip()),
            https,
            refused: self.refused,
            activity: Arc::new(ConnActivity::default()),
            tunnels: self.tunnels,
            connection: self.open,
            access_log: self.access_log,
        });
        // Pinned in place: a future awaited by value would be stored twice in
        // this one's state, and that state is held per connection.
        let serving = std::pin::pin!(server::serve(stream, ctx, builder, timeouts, drain, http2));
        serving.await;
    }
}

/// The TLS handshake, bounded by `request_header` (a client that connects and
/// never sends a ClientHello is closed then). Failures close the connection.
///
/// The ClientHello is read first; the costly step, the key exchange and the
/// signature that answer it, then waits until the tasks already ready on this
/// thread have run and the I/O events that came meanwhile are taken
/// (`yield_now` defers to after the runtime's next look for events). A burst
/// of new TLS clients thus queues behind the requests of open connections
/// instead of in front of them, as HAProxy runs handshakes in its "heavy"
/// task class: at one new handshake per request (`benches/load.sh`'s
/// tls-close), p99 went from 9.5–12.6 ms to 9.1–10.4 ms with the same CPU.
async fn handshake(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    client: SocketAddr,
    limit: Duration,
) -> Option<Box<tokio_rustls::server::TlsStream<TcpStream>>> {
    let accept = async move {
        let hello = rustls::server::Acceptor::default();
        let start = tokio_rustls::LazyConfigAcceptor::new(hello, stream).await?;
        tokio::task::yield_now().await;
        start.into_stream(tls).await
    };
    match tokio::time::timeout(limit, accept).await {
        Ok(Ok(stream)) => Some(Box::new(stream)),
        Ok(Err(err)) => {
            tracing::debug!(%client, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%client, "TLS handshake timed out");
            None
        }
    }
}

/// Makes an accepted connection send without delay. On Linux it already does:
/// an accepted socket inherits TCP_NODELAY from the listening one (see [`bind`]).
fn prepare(stream: &TcpStream) {
    if cfg!(target_os = "linux") {
        return;
    }
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "cannot set TCP_NODELAY");
    }
}

/// Waits for a connection slot under the global and the frontend limit; at a
/// limit, accepting pauses (the kernel's backlog holds new clients meanwhile).
async fn acquire(
    global: &Arc<Semaphore>,
    frontend: Option<&Arc<Semaphore>>,
    stop: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)> {
    let global = tokio::select! {
        permit = Arc::clone(global).acquire_owned() => permit.ok()?,
        () = stop.cancelled() => return None,
    };
    let frontend = match frontend {
        Some(limit) => tokio::select! {
            permit = Arc::clone(limit).acquire_owned() => Some(permit.ok()?),
            () = stop.cancelled() => return None,
        },
        None => None,
    };
    Some((global, frontend))
}

/// Accept errors are mostly the process or the system running out of file
/// descriptors; pausing briefly lets connections close instead of spinning.
async fn backoff(err: &io::Error) {
    match err.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => {}
        _ => {
            tracing::warn!(error = %err, "accept failed; pausing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prepare` leaves TCP_NODELAY to the listening socket on Linux: every
    /// accepted connection must have it.
    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener =
            TcpListener::from_std(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        for _ in 0..3 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            prepare(&accepted);
            assert!(
                accepted.nodelay().unwrap(),
                "accepted connection without TCP_NODELAY"
            );
        }
    }
}
