//! The running proxy: owns the snapshot, the listener set and the order of start
//! and stop.
//!
//! Start binds every listener before any accepts, so a config that cannot bind
//! fails whole. Stop closes the listening sockets at once, asks every connection
//! to finish what it has in flight, and returns as soon as nothing is left, or
//! when the grace period ends.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener::{self, Listener, Shared};
use crate::runtime::{Runtime, SharedRuntime};

/// How often idle pooled server connections are checked for expiry.
const POOL_SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("frontends.{frontend}: cannot listen on {addr}: {source}")]
    Bind {
        frontend: String,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// A listening socket as the supervisor tracks it.
#[derive(Debug, Clone)]
pub struct BoundListener {
    pub frontend: Arc<str>,
    /// The bound address (the real port where the config said 0).
    pub addr: SocketAddr,
    stop: CancellationToken,
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    runtime: SharedRuntime,
    shared: Shared,
    listeners: Vec<BoundListener>,
    accept_loops: TaskTracker,
    background: CancellationToken,
}

impl Proxy {
    /// Binds every listener of `config` and starts serving.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        let config = Arc::new(config);
        let runtime: SharedRuntime = Arc::new(ArcSwap::from_pointee(Runtime::build(
            Arc::clone(&config),
            None,
        )));

        let mut sockets = Vec::new();
        for frontend in &config.frontends {
            for &addr in &frontend.bind {
                let socket = listener::bind(addr)
                    .and_then(TcpListener::from_std)
                    .map_err(|source| StartError::Bind {
                        frontend: frontend.name.clone(),
                        addr,
                        source,
                    })?;
                sockets.push((frontend, socket));
            }
        }

        let shared = Shared {
            runtime: Arc::clone(&runtime),
            connections: Arc::new(Semaphore::new(config.global.max_connections)),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        };
        let mut limits: HashMap<&str, Arc<Semaphore>> = HashMap::new();
        let accept_loops = TaskTracker::new();
        let mut listeners = Vec::new();
        for (frontend, socket) in sockets {
            let limit = frontend.max_connections.map(|max| {
                Arc::clone(
                    limits
                        .entry(frontend.name.as_str())
                        .or_insert_with(|| Arc::new(Semaphore::new(max))),
                )
            });
            let name: Arc<str> = Arc::from(frontend.name.as_str());
            let stop = CancellationToken::new();
            let listener = Listener {
                frontend: Arc::clone(&name),
                listener: socket,
                limit,
                stop: stop.clone(),
            };
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                frontend: frontend.name.clone(),
                addr: frontend.bind[0],
                source,
            })?;
            tracing::info!(frontend = %name, %addr, "listening");
            accept_loops.spawn(listener.run(shared.clone()));
            listeners.push(BoundListener {
                frontend: name,
                addr,
                stop,
            });
        }

        let background = CancellationToken::new();
        tokio::spawn(sweep_pools(Arc::clone(&runtime), background.clone()));
        Ok(Proxy {
            runtime,
            shared,
            listeners,
            accept_loops,
            background,
        })
    }

    pub fn runtime(&self) -> &SharedRuntime {
        &self.runtime
    }

    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// The first bound address of a frontend.
    pub fn local_addr(&self, frontend: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|listener| &*listener.frontend == frontend)
            .map(|listener| listener.addr)
    }

    /// Graceful stop. Returns `true` when everything in flight finished within
    /// `grace`, `false` when the rest had to be cut.
    pub async fn shutdown(self, grace: Duration) -> bool {
        for listener in &self.listeners {
            listener.stop.cancel();
        }
        self.accept_loops.close();
        self.accept_loops.wait().await;
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        let drained = tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok();
        self.background.cancel();
        if drained {
            tracing::info!("stopped: everything in flight finished");
        } else {
            tracing::warn!(grace = ?grace, "stopped: grace period over, closing what is left");
        }
        drained
    }
}

/// Closes pooled server connections that stayed idle past their backend's
/// `timeouts.idle`.
async fn sweep_pools(runtime: SharedRuntime, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POOL_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let snapshot = runtime.load();
        for backend in snapshot.backends() {
            for server in &backend.servers {
                server.pool.evict_expired();
            }
        }
    }
}

/// Runs `config` until SIGTERM or SIGINT, then stops gracefully. Returns the
/// process exit code.
pub async fn run(config: Config) -> i32 {
    let grace = config.global.grace_period;
    let proxy = match Proxy::start(config).await {
        Ok(proxy) => proxy,
        Err(err) => {
            tracing::error!("{err}");
            return 1;
        }
    };
    if let Err(err) = wait_for_stop().await {
        tracing::error!(error = %err, "cannot install signal handlers");
        return 1;
    }
    proxy.shutdown(grace).await;
    0
}

async fn wait_for_stop() -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                tracing::warn!("SIGHUP received: configuration reload is not available yet; restart to apply changes");
            }
        }
    }
    tracing::info!("stop requested: closing listeners, finishing in-flight work");
    Ok(())
}
