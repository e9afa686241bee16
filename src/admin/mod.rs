//! The admin listener (`[admin]`): the JSON API with roles, the status page,
//! `/metrics`, `/healthz`, `/readyz`, and the state file that keeps admin
//! states across restarts.
//!
//! Like health checks, the admin API only writes server atomics and asks the
//! supervisor for reloads; it never blocks the request path. It runs beside the
//! proxy: bound before the frontends at start (a bind failure fails the start),
//! rebound when a reload changes `admin.bind`, given new tokens at once when a
//! reload changes them, and kept serving through a graceful stop (with
//! `/readyz` answering 503) until the proxy's work is done. With `[admin.tls]`
//! it speaks HTTPS only; a reload's certificates apply to new connections.

mod api;
pub mod auth;
mod page;
pub mod state;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, AdminToken};
use crate::runtime::SharedRuntime;
use crate::supervisor::{Proxy, ReloadHandle, ReloadStats};
use crate::workers::ServingThreads;

/// Admin connections served at once; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 256;
/// The request head must arrive in this time; also ends idle keep-alive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped admin listener lets its requests finish.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// A TLS handshake must complete in this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every admin request can see and change.
#[derive(Debug)]
pub struct AdminContext {
    runtime: SharedRuntime,
    reloads: Arc<ReloadStats>,
    /// The serving threads, for their connection counts.
    threads: Arc<ServingThreads>,
    reload: ReloadHandle,
    /// Swapped when a reload changes `admin.tokens`.
    tokens: ArcSwap<Vec<AdminToken>>,
    /// `[admin.tls]`, swapped by every reload (new certificates).
    tls: ArcSwapOption<rustls::ServerConfig>,
    /// Bound frontend addresses (the real port where the config says 0).
    listeners: ArcSwap<Vec<(Arc<str>, SocketAddr)>>,
    /// Set when a graceful stop began: `/readyz` answers 503.
    stopping: AtomicBool,
    /// One state file write at a time, each with every change before it.
    state_writes: tokio::sync::Mutex<()>,
}

impl AdminContext {
    /// Writes the state file, when the config names one, with the admin
    /// states of the running snapshot.
    async fn save_state(&self) -> io::Result<()> {
        let _one_at_a_time = self.state_writes.lock().await;
        let runtime = self.runtime.load_full();
        let Some(path) = runtime.config.global.state_file.clone() else {
            return Ok(());
        };
        let contents = state::StateFile::capture(&runtime).to_json();
        tokio::task::spawn_blocking(move || state::write_atomically(&path, contents.as_bytes()))
            .await
            .map_err(io::Error::other)?
    }
}

/// The admin socket, bound before the proxy starts.
#[derive(Debug)]
pub struct AdminSocket {
    /// As configured.
    bind: SocketAddr,
    socket: TcpListener,
}

impl AdminSocket {
    pub fn bind(bind: SocketAddr) -> io::Result<AdminSocket> {
        let socket = crate::listener::bind(bind).and_then(TcpListener::from_std)?;
        Ok(AdminSocket { bind, socket })
    }
}

/// The admin side of a running proxy.
#[derive(Debug)]
pub struct Admin {
    ctx: Arc<AdminContext>,
    listener: Option<AdminListener>,
}

#[derive(Debug)]
struct AdminListener {
    bind: SocketAddr,
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Admin {
    /// The admin side for `proxy`; it serves nothing until [`Admin::serve`].
    pub fn new(proxy: &Proxy, reload: ReloadHandle) -> Admin {
        let runtime = Arc::clone(proxy.runtime());
        let tokens = admin_tokens(&runtime.load().config);
        let tls = admin_tls(&runtime.load().config);
        let ctx = AdminContext {
            runtime,
            reloads: Arc::clone(proxy.reload_stats()),
            threads: Arc::clone(proxy.serving_threads()),
            reload,
            tokens: ArcSwap::from_pointee(tokens),
            tls: ArcSwapOption::new(tls),
            listeners: ArcSwap::from_pointee(bound_listeners(proxy)),
            stopping: AtomicBool::new(false),
            state_writes: tokio::sync::Mutex::new(()),
        };
        Admin {
            ctx: Arc::new(ctx),
            listener: None,
        }
    }

    /// Starts serving on a bound admin socket.
    pub fn serve(&mut self, socket: AdminSocket) -> io::Result<()> {
        let addr = socket.socket.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tracing::info!(%addr, "admin listening");
        tokio::spawn(accept_loop(
            socket.socket,
            Arc::clone(&self.ctx),
            stop.clone(),
            tasks.clone(),
        ));
        if let Some(old) = self.listener.replace(AdminListener {
            bind: socket.bind,
            addr,
            stop,
            tasks,
        }) {
            old.stop.cancel();
        }
        Ok(())
    }

    /// The bound admin address, while serving.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|listener| listener.addr)
    }

    /// Follows a reload: new tokens apply at once; a changed `admin.bind` is
    /// bound anew (the old address keeps serving when that fails); a removed
    /// `[admin]` stops the listener, an added one starts it.
    pub fn update(&mut self, proxy: &Proxy) {
        let config = Arc::clone(&proxy.runtime().load().config);
        self.ctx.tokens.store(Arc::new(admin_tokens(&config)));
        self.ctx.tls.store(admin_tls(&config));
        self.ctx.listeners.store(Arc::new(bound_listeners(proxy)));
        let Some(admin) = &config.admin else {
            if let Some(old) = self.listener.take() {
                tracing::info!(addr = %old.addr, "admin listener removed");
                old.stop.cancel();
            }
            return;
        };
        if self
            .listener
            .as_ref()
            .is_some_and(|listener| listener.bind == admin.bind)
        {
            return;
        }
        let bound = AdminSocket::bind(admin.bind).and_then(|socket| self.serve(socket));
        if let Err(err) = bound {
            tracing::error!(
                "admin.bind: cannot listen on {}: {err}; the admin listener stays on {}",
                admin.bind,
                self.local_addr()
                    .map_or_else(|| "nothing".to_string(), |addr| addr.to_string())
            );
        }
    }

    /// A graceful stop began: `/readyz` answers 503 from now on.
    pub fn stopping(&self) {
        self.ctx.stopping.store(true, Ordering::Release);
    }

    /// Closes the admin listener and lets its requests finish (briefly).
    pub async fn stop(mut self) {
        if let Some(listener) = self.listener.take() {
            listener.stop.cancel();
            listener.tasks.close();
            let _ = tokio::time::timeout(STOP_GRACE, listener.tasks.wait()).await;
        }
    }
}

fn admin_tokens(config: &config::Config) -> Vec<AdminToken> {
    config
        .admin
        .as_ref()
        .map(|admin| admin.tokens.clone())
        .unwrap_or_default()
}

fn admin_tls(config: &config::Config) -> Option<Arc<rustls::ServerConfig>> {
    config.admin.as_ref()?.tls.as_ref()?.server.clone()
}

fn bound_listeners(proxy: &Proxy) -> Vec<(Arc<str>, SocketAddr)> {
    proxy
        .listeners()
        .iter()
        .map(|listener| (listener.frontend(), listener.addr))
        .collect()
}

async fn accept_loop(
    socket: TcpListener,
    ctx: Arc<AdminContext>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let stream = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(error = %err, "admin listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (ctx, stop) = (Arc::clone(&ctx), stop.clone());
        tasks.spawn(async move {
            match ctx.tls.load_full() {
                None => serve_connection(stream, ctx, stop).await,
                Some(tls) => {
                    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(stream)) => serve_connection(stream, ctx, stop).await,
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "admin TLS handshake failed");
                        }
                        Err(_) => tracing::debug!("admin TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
        });
    }
}

async fn serve_connection<S>(stream: S, ctx: Arc<AdminContext>, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(api::handle(&ctx, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "admin connection ended with an error");
    }
}
