//! The running proxy: owns the snapshot, the listener set, the health checkers
//! and the order of start, reload and stop.
//!
//! - Start binds every listener before any accepts (a config that cannot bind
//!   fails whole), runs the first check of every server, then accepts.
//! - Reload validates the new file completely, binds the listeners it adds,
//!   builds the new snapshot from the old one (server state carried over by
//!   identity), checks servers it adds, then publishes it in one swap. Listeners
//!   whose address stays keep their socket; removed ones stop accepting at once
//!   and their connections drain up to `grace_period`. Any failure leaves the
//!   running config untouched.
//! - Stop closes the listening sockets at once, asks every connection to finish
//!   what it has in flight, and returns as soon as nothing is left, or when the
//!   grace period ends.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::admin::{Admin, AdminSocket};
use crate::config::watch::{ConfigWatcher, fingerprint};
use crate::config::{self, Config, ConfigErrors};
use crate::health::{self, HealthChecks};
use crate::listener::{self, Listener, ListenerControl, ListenerSettings, Shared};
use crate::runtime::{Runtime, SharedRuntime};
use crate::workers::ServingThreads;

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
    #[error("global.access_log: cannot open the access log: {0}")]
    AccessLog(io::Error),
    #[error("admin.bind: cannot listen on {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("{0}")]
    Bind(#[from] StartError),
}

/// Reload counters, for metrics and the admin API.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    /// Unix time in seconds of the last successful load (the start counts).
    pub last_success_unix: AtomicU64,
    /// The errors of the last failed reload, until a reload succeeds.
    pub last_errors: Mutex<Option<String>>,
    /// Time to validate and apply a reload.
    pub duration: crate::metrics::AtomicHistogram,
}

impl ReloadStats {
    fn succeeded(&self, first: bool) {
        if !first {
            self.successes.fetch_add(1, Ordering::Relaxed);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success_unix.store(now, Ordering::Relaxed);
        *self
            .last_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn failed(&self, errors: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(errors);
    }
}

/// A listening socket's identity across reloads: its configured address, or for
/// an ephemeral port (`:0`) its place in the config, since several may share
/// an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ListenerKey {
    addr: SocketAddr,
    ephemeral: Option<(String, usize)>,
}

fn listener_keys(config: &Config) -> Vec<(ListenerKey, &config::Frontend)> {
    config
        .frontends
        .iter()
        .flat_map(|frontend| {
            frontend.bind.iter().enumerate().map(move |(index, &addr)| {
                let ephemeral = (addr.port() == 0).then(|| (frontend.name.clone(), index));
                (ListenerKey { addr, ephemeral }, frontend)
            })
        })
        .collect()
}

/// A listening socket as the supervisor tracks it.
#[derive(Debug, Clone)]
pub struct BoundListener {
    key_addr: SocketAddr,
    key_ephemeral: Option<(String, usize)>,
    /// The bound address (the real port where the config said 0).
    pub addr: SocketAddr,
    pub control: Arc<ListenerControl>,
}

impl BoundListener {
    fn key(&self) -> ListenerKey {
        ListenerKey {
            addr: self.key_addr,
            ephemeral: self.key_ephemeral.clone(),
        }
    }

    pub fn frontend(&self) -> Arc<str> {
        self.control.frontend()
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    runtime: SharedRuntime,
    shared: Shared,
    listeners: Vec<BoundListener>,
    /// Per-frontend connection limits: (max, semaphore).
    frontend_limits: HashMap<String, (usize, Arc<Semaphore>)>,
    connection_limit: usize,
    accept_loops: TaskTracker,
    checks: HealthChecks,
    reloads: Arc<ReloadStats>,
    background: CancellationToken,
}

impl Proxy {
    /// Binds every listener of `config`, runs the first health checks and starts
    /// serving, on the current runtime only.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        Proxy::start_with_workers(config, Vec::new()).await
    }

    /// [`Proxy::start`], with every listener also accepting on each of
    /// `workers` (the runtimes of [`crate::workers::Workers`]).
    pub async fn start_with_workers(
        config: Config,
        workers: Vec<Handle>,
    ) -> Result<Proxy, StartError> {
        let config = Arc::new(config);
        let sockets = bind_all(listener_keys(&config))?;
        let runtime: SharedRuntime = Arc::new(ArcSwap::from_pointee(Runtime::build(
            Arc::clone(&config),
            None,
        )));
        // Admin states saved by an earlier run apply before any check runs
        // or client is accepted.
        if let Some(path) = &config.global.state_file {
            crate::admin::state::restore(path, &runtime.load());
        }

        // Every server gets its first check before the first client is accepted,
        // so flowgate never starts with an empty pool (each check is bounded by
        // its timeout).
        let mut checks = HealthChecks::new();
        health::first_checks_done(checks.sync(&runtime.load())).await;

        let access_log = AccessLog::start(&config.global.access_log, config.global.log_format)
            .map_err(StartError::AccessLog)?;
        let shared = Shared {
            runtime: Arc::clone(&runtime),
            connections: Arc::new(Semaphore::new(config.global.max_connections)),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            access_log: Arc::new(ArcSwapOption::new(access_log)),
            threads: ServingThreads::new(
                std::iter::once(Handle::current()).chain(workers.iter().cloned()),
            ),
        };
        let background = CancellationToken::new();
        tokio::spawn(sweep_pools(Arc::clone(&runtime), background.clone()));
        let reloads = Arc::new(ReloadStats::default());
        reloads.succeeded(true);
        let mut proxy = Proxy {
            runtime,
            shared,
            listeners: Vec::new(),
            frontend_limits: HashMap::new(),
            connection_limit: config.global.max_connections,
            accept_loops: TaskTracker::new(),
            checks,
            reloads,
            background,
        };
        proxy.update_frontend_limits(&config);
        for (key, frontend, socket) in sockets {
            proxy.serve(key, frontend, socket)?;
        }
        Ok(proxy)
    }

    pub fn runtime(&self) -> &SharedRuntime {
        &self.runtime
    }

    pub fn reload_stats(&self) -> &Arc<ReloadStats> {
        &self.reloads
    }

    /// The threads connections are served on, and how many each serves now.
    pub fn serving_threads(&self) -> &Arc<ServingThreads> {
        &self.shared.threads
    }

    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// The first bound address of a frontend.
    pub fn local_addr(&self, frontend: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|listener| &*listener.frontend() == frontend)
            .map(|listener| listener.addr)
    }

    /// Every bound address of a frontend.
    pub fn local_addrs(&self, frontend: &str) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|listener| &*listener.frontend() == frontend)
            .map(|listener| listener.addr)
            .collect()
    }

    /// Reads, validates and applies the config file the running config came
    /// from. On any error the running config stays as it is.
    pub async fn reload_file(&mut self) -> Result<u64, ReloadError> {
        let path = self.runtime.load().config.path.clone();
        // Loading resolves server host names: blocking work.
        let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
        let config = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(errors)) => {
                self.reloads.failed(errors.to_string());
                return Err(ReloadError::Invalid(errors));
            }
            Err(join) => {
                let errors =
                    ConfigErrors::single(config::ConfigError::file("config", join.to_string()));
                self.reloads.failed(errors.to_string());
                return Err(ReloadError::Invalid(errors));
            }
        };
        self.reload(config).await
    }

    /// Applies a validated config; returns the new generation. Fails whole, with
    /// the running config untouched, when a new listener cannot bind.
    pub async fn reload(&mut self, config: Config) -> Result<u64, ReloadError> {
        let config = Arc::new(config);
        let keys = listener_keys(&config);
        let current: HashMap<ListenerKey, usize> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (l.key(), i))
            .collect();
        let added: Vec<_> = keys
            .iter()
            .filter(|(key, _)| !current.contains_key(key))
            .cloned()
            .collect();
        let fresh = match bind_all(added) {
            Ok(fresh) => fresh,
            Err(err) => {
                self.reloads.failed(err.to_string());
                return Err(err.into());
            }
        };

        // A changed access log target is opened before anything changes.
        let global = &config.global;
        let current_log = self.shared.access_log.load_full();
        let log_changed = match &current_log {
            Some(log) => log.target != global.access_log || log.format != global.log_format,
            None => global.access_log != config::AccessLog::Off,
        };
        let new_log = if log_changed {
            match AccessLog::start(&global.access_log, global.log_format) {
                Ok(log) => Some(log),
                Err(err) => {
                    let err = StartError::AccessLog(err);
                    self.reloads.failed(err.to_string());
                    return Err(err.into());
                }
            }
        } else {
            None
        };

        let previous = self.runtime.load_full();
        let next = Runtime::build(Arc::clone(&config), Some(&previous));
        // Servers the reload adds are checked before they take traffic.
        health::first_checks_done(self.checks.sync(&next)).await;
        let generation = next.generation;
        self.runtime.store(Arc::new(next));

        if let Some(log) = new_log {
            self.shared.access_log.store(log);
        }
        self.update_connection_limit(config.global.max_connections);
        self.update_frontend_limits(&config);
        let wanted: HashMap<&ListenerKey, &config::Frontend> =
            keys.iter().map(|(k, f)| (k, *f)).collect();
        let grace = config.global.grace_period;
        let mut kept = Vec::new();
        for listener in std::mem::take(&mut self.listeners) {
            match wanted.get(&listener.key()) {
                Some(frontend) => {
                    listener
                        .control
                        .settings
                        .store(Arc::new(self.settings_for(frontend)));
                    kept.push(listener);
                }
                None => retire(&listener, grace),
            }
        }
        self.listeners = kept;
        for (key, frontend, socket) in fresh {
            self.serve(key, frontend, socket)?;
        }
        close_removed_pools(&previous, &self.runtime.load());
        self.reloads.succeeded(false);
        tracing::info!(generation, "configuration reloaded");
        Ok(generation)
    }

    /// Starts accepting on a bound socket.
    fn serve(
        &mut self,
        key: ListenerKey,
        frontend: &config::Frontend,
        socket: std::net::TcpListener,
    ) -> Result<(), StartError> {
        let bind_error = |source| StartError::Bind {
            frontend: frontend.name.clone(),
            addr: key.addr,
            source,
        };
        let addr = socket.local_addr().map_err(bind_error)?;
        let control = Arc::new(ListenerControl::new(
            self.settings_for(frontend),
            &self.shared.shutdown,
        ));
        tracing::info!(frontend = %frontend.name, %addr, "listening");
        // The same socket on every worker: the kernel hands each new connection
        // to one of the accept loops, which chooses the thread to serve it.
        for thread in 1..self.shared.threads.count() {
            let socket = match socket.as_fd().try_clone_to_owned() {
                Ok(fd) => std::net::TcpListener::from(fd),
                Err(err) => {
                    tracing::warn!(frontend = %frontend.name, %addr, error = %err, "a worker cannot share the listening socket");
                    continue;
                }
            };
            let (control, shared) = (Arc::clone(&control), self.shared.clone());
            self.shared.threads.spawn(thread, &self.accept_loops, async move {
                // Registered with the worker's own I/O driver, on the worker.
                match Listener::new(socket, Arc::clone(&control), thread) {
                    Ok(listener) => listener.run(shared).await,
                    Err(err) => {
                        let frontend = control.frontend();
                        tracing::warn!(%frontend, %addr, error = %err, "a worker cannot accept");
                    }
                }
            });
        }
        let listener = Listener::new(socket, Arc::clone(&control), 0).map_err(bind_error)?;
        self.accept_loops.spawn(listener.run(self.shared.clone()));
        self.listeners.push(BoundListener {
            key_addr: key.addr,
            key_ephemeral: key.ephemeral,
            addr,
            control,
        });
        Ok(())
    }

    /// Reopens the access log file (SIGUSR1, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        match self.shared.access_log.load_full() {
            Some(log) => {
                log.reopen();
                tracing::info!("SIGUSR1: access log reopened");
            }
            None => tracing::info!("SIGUSR1: the access log is off, nothing to reopen"),
        }
    }

    fn settings_for(&self, frontend: &config::Frontend) -> ListenerSettings {
        ListenerSettings {
            frontend: Arc::from(frontend.name.as_str()),
            limit: self
                .frontend_limits
                .get(&frontend.name)
                .map(|(_, semaphore)| Arc::clone(semaphore)),
        }
    }

    /// A frontend whose limit changed gets a new semaphore; connections already
    /// open keep the permit of the old one until they close.
    fn update_frontend_limits(&mut self, config: &Config) {
        let mut limits = HashMap::new();
        for frontend in &config.frontends {
            if let Some(max) = frontend.max_connections {
                let limit = match self.frontend_limits.remove(&frontend.name) {
                    Some((old_max, semaphore)) if old_max == max => (old_max, semaphore),
                    _ => (max, Arc::new(Semaphore::new(max))),
                };
                limits.insert(frontend.name.clone(), limit);
            }
        }
        self.frontend_limits = limits;
    }

    fn update_connection_limit(&mut self, max: usize) {
        let semaphore = &self.shared.connections;
        if max > self.connection_limit {
            semaphore.add_permits(max - self.connection_limit);
        } else {
            // Only free permits can go at once; the limit is reached as
            // connections close.
            let forgotten = semaphore.forget_permits(self.connection_limit - max);
            if forgotten < self.connection_limit - max {
                tracing::info!(max, "lower max_connections applies as connections close");
            }
        }
        self.connection_limit = max;
    }

    /// Graceful stop. Returns `true` when everything in flight finished within
    /// `grace`, `false` when the rest had to be cut.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        for listener in &self.listeners {
            listener.control.stop.cancel();
        }
        self.accept_loops.close();
        self.accept_loops.wait().await;
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        let drained = tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok();
        self.checks.stop_all();
        self.background.cancel();
        if drained {
            tracing::info!("stopped: everything in flight finished");
        } else {
            tracing::warn!(grace = ?grace, "stopped: grace period over, closing what is left");
        }
        drained
    }
}

/// Binds the listed sockets; fails whole (closing what it bound) on the first
/// address that cannot be bound.
fn bind_all(
    keys: Vec<(ListenerKey, &config::Frontend)>,
) -> Result<Vec<(ListenerKey, &config::Frontend, std::net::TcpListener)>, StartError> {
    keys.into_iter()
        .map(|(key, frontend)| {
            let socket = listener::bind(key.addr).map_err(|source| StartError::Bind {
                frontend: frontend.name.clone(),
                addr: key.addr,
                source,
            })?;
            Ok((key, frontend, socket))
        })
        .collect()
}

/// A listener the new config no longer has: stop accepting now, let its
/// connections finish, and close what is left after `grace`.
fn retire(listener: &BoundListener, grace: Duration) {
    tracing::info!(frontend = %listener.frontend(), addr = %listener.addr, "listener removed, draining its connections");
    listener.control.stop.cancel();
    listener.control.drain.cancel();
    let kill = listener.control.kill.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        kill.cancel();
    });
}

/// Servers that left the config finish their in-flight work (their guards hold
/// them); their idle pooled connections close now.
fn close_removed_pools(previous: &Runtime, next: &Runtime) {
    for backend in previous.backends() {
        for server in &backend.servers {
            let still_used = next.backend(&backend.name).is_some_and(|kept| {
                kept.servers
                    .iter()
                    .any(|other| Arc::ptr_eq(&other.pool, &server.pool))
            });
            if !still_used {
                server.pool.close_idle();
            }
        }
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

/// A reload asked for from outside the supervisor (the admin API); the answer
/// is the new generation or the errors.
#[derive(Debug)]
pub struct ReloadRequest {
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// Where to send reload requests to the running supervisor.
pub type ReloadHandle = mpsc::Sender<ReloadRequest>;

/// Runs `config` until SIGTERM or SIGINT, reloading on SIGHUP, on changes to the
/// config file or the files it names, and on `POST /api/v1/reload`, then stops
/// gracefully. Serves the admin listener when the config has one. Returns the
/// process exit code.
pub async fn run(config: Config, workers: Vec<Handle>) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};

    // Handlers first: a signal during start must not kill the process.
    let (mut terminate, mut interrupt, mut hangup, mut user1) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) {
        (Ok(t), Ok(i), Ok(h), Ok(u)) => (t, i, h, u),
        _ => {
            tracing::error!("cannot install signal handlers");
            return 1;
        }
    };
    // The admin socket is bound first: an address that cannot be bound fails
    // the start before any frontend accepts.
    let admin_socket = match config.admin.as_ref().map(|admin| {
        AdminSocket::bind(admin.bind).map_err(|source| StartError::AdminBind {
            addr: admin.bind,
            source,
        })
    }) {
        None => None,
        Some(Ok(socket)) => Some(socket),
        Some(Err(err)) => {
            tracing::error!("{err}");
            return 1;
        }
    };
    // Watch before starting: a save while the listeners bind and the first
    // checks run is a change like any later one.
    let mut watcher = match ConfigWatcher::new() {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    let mut watched = watched_files(&config);
    let mut last_fingerprint = fingerprint(&watched);
    if let Some(watcher) = watcher.as_mut() {
        watcher.watch(&watched);
    }
    let mut proxy = match Proxy::start_with_workers(config, workers).await {
        Ok(proxy) => proxy,
        Err(err) => {
            tracing::error!("{err}");
            return 1;
        }
    };
    let (reload_sender, mut requests) = mpsc::channel(8);
    let mut admin = Admin::new(&proxy, reload_sender);
    if let Some(socket) = admin_socket
        && let Err(err) = admin.serve(socket)
    {
        tracing::error!("admin.bind: {err}");
        proxy.shutdown(Duration::ZERO).await;
        return 1;
    }
    let watchdog = systemd::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    systemd::ready();

    loop {
        let trigger = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => Trigger::Signal,
            _ = user1.recv() => {
                proxy.reopen_access_log();
                continue;
            }
            () = changed(&mut watcher) => {
                let now = fingerprint(&watched);
                if now == last_fingerprint {
                    continue;
                }
                Trigger::FileChange
            }
            Some(request) = requests.recv() => Trigger::Api(request.reply),
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                systemd::watchdog();
                continue;
            }
        };
        let started = Instant::now();
        // The files as they are before the reload reads them: a save that
        // lands while it runs (and it may wait for first checks) then differs
        // from this, and is reloaded in turn.
        let before = fingerprint(&watched);
        systemd::reloading();
        let result = proxy.reload_file().await;
        systemd::ready();
        proxy.reload_stats().duration.observe(started.elapsed());
        let reply = match &result {
            Ok(generation) => {
                admin.update(&proxy);
                tracing::info!(
                    generation,
                    trigger = trigger.name(),
                    took = ?started.elapsed(),
                    "reload applied"
                );
                Ok(*generation)
            }
            Err(err) => {
                for line in err.to_string().lines() {
                    tracing::error!("reload failed, running config kept: {line}");
                }
                Err(err.to_string())
            }
        };
        // Watch what the running config names. When that list changed, the
        // next event in a watched directory reloads once more.
        watched = watched_files(&proxy.runtime().load().config);
        last_fingerprint = before;
        if let Some(watcher) = watcher.as_mut() {
            watcher.watch(&watched);
        }
        if let Trigger::Api(sender) = trigger {
            let _ = sender.send(reply);
        }
    }
    // Reloads asked for from now on are answered at once: flowgate is stopping.
    drop(requests);
    tracing::info!("stop requested: closing listeners, finishing in-flight work");
    systemd::stopping();
    let grace = proxy.runtime().load().config.global.grace_period;
    // The admin listener serves through the stop (readiness says 503), so the
    // drain can be watched; it closes once the proxy's work is done.
    admin.stopping();
    proxy.shutdown(grace).await;
    admin.stop().await;
    0
}

enum Trigger {
    Signal,
    FileChange,
    Api(oneshot::Sender<Result<u64, String>>),
}

impl Trigger {
    fn name(&self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
            Trigger::Api(_) => "admin API",
        }
    }
}

fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.path.clone()];
    files.extend(config.referenced_files());
    files
}

async fn changed(watcher: &mut Option<ConfigWatcher>) {
    match watcher {
        Some(watcher) => watcher.changed().await,
        None => std::future::pending().await,
    }
}

/// systemd's notify protocol (`Type=notify`); every call is a no-op without
/// `NOTIFY_SOCKET`.
mod systemd {
    use std::time::Duration;

    use sd_notify::NotifyState;

    fn send(states: &[NotifyState<'_>]) {
        if let Err(err) = sd_notify::notify(false, states) {
            tracing::debug!(error = %err, "sd_notify failed");
        }
    }

    pub fn ready() {
        send(&[NotifyState::Ready]);
    }

    /// RELOADING=1 and MONOTONIC_USEC in one message, as systemd requires.
    pub fn reloading() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping() {
        send(&[NotifyState::Stopping]);
    }

    pub fn watchdog() {
        send(&[NotifyState::Watchdog]);
    }

    /// Half of `WATCHDOG_USEC`, when systemd wants watchdog pings.
    pub fn watchdog_interval() -> Option<Duration> {
        let mut usec = 0;
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
    }
}
