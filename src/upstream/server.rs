//! A backend server: its identity, the live state that health checks and the admin
//! API write, and the guard that counts in-flight work.
//!
//! The live state ([`ServerState`]) is keyed by (backend name, server name) and
//! outlives config reloads; [`Server`] is the per-snapshot view that pairs it with
//! what the current config says (address, weight, limits) and a connection pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio::sync::Notify;

use crate::metrics::AtomicHistogram;

use super::pool::Pool;
use super::queue::Queue;
use super::response_time::ResponseTime;
use crate::config;

/// What health checks found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Down = 0,
    Up = 1,
}

/// What an operator decided through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes traffic when healthy.
    Ready = 0,
    /// No new requests or sessions; in-flight ones finish.
    Drain = 1,
    /// Like drain, and checks stop.
    Maint = 2,
}

impl AdminState {
    fn from_u8(value: u8) -> AdminState {
        match value {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
}

/// The server's state as the admin API and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStatus {
    Up,
    Down,
    Drain,
    Maint,
}

impl ServerStatus {
    pub const ALL: [ServerStatus; 4] = [
        ServerStatus::Up,
        ServerStatus::Down,
        ServerStatus::Drain,
        ServerStatus::Maint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Up => "up",
            ServerStatus::Down => "down",
            ServerStatus::Drain => "drain",
            ServerStatus::Maint => "maint",
        }
    }
}

/// No admin weight override is set.
const NO_WEIGHT_OVERRIDE: u32 = u32::MAX;

/// Full weight, in thousandths (slow start ramps up to it).
pub const FULL_WEIGHT: u32 = 1000;

/// The last health check's result, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct CheckStatus {
    /// "ok", "failed", "pending" (not checked yet) or "none" (checks off).
    pub status: &'static str,
    /// What the check saw: "HTTP 200", "connection refused", ...
    pub detail: String,
    /// When the server last changed between up and down.
    pub last_change: Instant,
}

/// Live state of one server, shared by every snapshot that contains it.
///
/// Writers (health checks, admin API) change it with single atomic stores and bump
/// the backend's `epoch` so balancers rebuild what they derive from it; the request
/// path only loads.
#[derive(Debug)]
pub struct ServerState {
    health: AtomicU8,
    admin: AtomicU8,
    weight_override: AtomicU32,
    /// Slow start: the share of the weight in effect, in thousandths.
    weight_factor: AtomicU32,
    in_flight: AtomicU32,
    /// In-flight work on every server of the backend (bounded-load hashing
    /// compares a server with the average); shared by all servers of one backend.
    backend_in_flight: Arc<AtomicU32>,
    /// Time from sending a request to its response head (http), or to connect
    /// (tcp), as a peak-EWMA; `p2c` weighs in-flight work with it.
    response_time: ResponseTime,
    /// Taken out by passive checks until its ejection ends.
    ejected: AtomicBool,
    /// Live failures in a row (passive checks).
    consecutive_failures: AtomicU32,
    /// Ejections in a row: each one lasts twice as long as the one before.
    ejections: AtomicU32,
    check_failures: AtomicU64,
    check: ArcSwap<CheckStatus>,
    check_seconds: AtomicHistogram,
    transitions: AtomicU64,
    /// Responses from the server by status class (1xx..5xx).
    responses: [AtomicU64; 5],
    /// Bumped on any change that alters which servers can take traffic or their
    /// weights; shared by all servers of one backend.
    epoch: Arc<AtomicU64>,
    /// Wakes the backend's queued requests on such a change.
    changed: Arc<Notify>,
}

impl ServerState {
    /// A server not checked yet: down, unless the backend runs no checks.
    pub fn new(epoch: Arc<AtomicU64>, changed: Arc<Notify>, checked: bool) -> ServerState {
        let (health, status) = if checked {
            (Health::Down, "pending")
        } else {
            (Health::Up, "none")
        };
        ServerState {
            health: AtomicU8::new(health as u8),
            admin: AtomicU8::new(AdminState::Ready as u8),
            weight_override: AtomicU32::new(NO_WEIGHT_OVERRIDE),
            weight_factor: AtomicU32::new(FULL_WEIGHT),
            in_flight: AtomicU32::new(0),
            backend_in_flight: Arc::default(),
            response_time: ResponseTime::new(),
            ejected: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            check_failures: AtomicU64::new(0),
            check: ArcSwap::from_pointee(CheckStatus {
                status,
                detail: String::new(),
                last_change: Instant::now(),
            }),
            check_seconds: AtomicHistogram::default(),
            transitions: AtomicU64::new(0),
            responses: Default::default(),
            epoch,
            changed,
        }
    }

    /// Counts this server's in-flight work also in `backend_in_flight`, the
    /// counter its backend's other servers share.
    pub fn sharing_backend_in_flight(mut self, backend_in_flight: Arc<AtomicU32>) -> Self {
        self.backend_in_flight = backend_in_flight;
        self
    }

    /// The last check's result.
    pub fn check_status(&self) -> Arc<CheckStatus> {
        self.check.load_full()
    }

    /// Records a check's result; `changed` when it moved the server up or down.
    pub fn record_check(&self, ok: bool, detail: String, changed: bool) {
        if !ok {
            self.check_failures.fetch_add(1, Ordering::Relaxed);
        }
        let last_change = if changed {
            Instant::now()
        } else {
            self.check.load().last_change
        };
        self.check.store(Arc::new(CheckStatus {
            status: if ok { "ok" } else { "failed" },
            detail,
            last_change,
        }));
    }

    /// Checks are switched off for this server (`check = "none"`).
    pub fn clear_check(&self) {
        self.check.store(Arc::new(CheckStatus {
            status: "none",
            detail: String::new(),
            last_change: self.check.load().last_change,
        }));
    }

    pub fn check_failures(&self) -> u64 {
        self.check_failures.load(Ordering::Relaxed)
    }

    /// The share of the weight in effect (slow start), in thousandths.
    pub fn weight_factor(&self) -> u32 {
        self.weight_factor.load(Ordering::Acquire)
    }

    pub fn set_weight_factor(&self, factor: u32) {
        let factor = factor.min(FULL_WEIGHT);
        if self.weight_factor.swap(factor, Ordering::AcqRel) != factor {
            self.bump_epoch();
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    pub fn set_ejected(&self, ejected: bool) {
        if self.ejected.swap(ejected, Ordering::AcqRel) != ejected {
            self.bump_epoch();
        }
    }

    /// Counts an ejection; returns how many came in a row (1 for the first).
    pub fn count_ejection(&self) -> u32 {
        self.ejections.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The server behaved long enough after its last ejection: the next one
    /// starts from the base time again.
    pub fn forgive_ejections(&self) {
        self.ejections.store(0, Ordering::Release);
    }

    /// Counts a live failure; returns how many in a row there are now.
    pub fn record_live_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn record_live_success(&self) {
        // Avoid dirtying the cache line on every success.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Release);
        }
    }

    pub fn reset_live_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
    }

    pub fn health(&self) -> Health {
        if self.health.load(Ordering::Acquire) == Health::Up as u8 {
            Health::Up
        } else {
            Health::Down
        }
    }

    pub fn set_health(&self, health: Health) {
        if self.health.swap(health as u8, Ordering::AcqRel) != health as u8 {
            self.transitions.fetch_add(1, Ordering::Relaxed);
            self.bump_epoch();
        }
    }

    /// Times the server went up or down.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// Counts a response the server sent.
    #[inline]
    pub fn count_response(&self, status: u16) {
        self.responses[crate::metrics::code_class(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Responses of one status class (index into `metrics::CODE_CLASSES`).
    pub fn responses(&self, class: usize) -> u64 {
        self.responses[class].load(Ordering::Relaxed)
    }

    pub fn check_seconds(&self) -> &AtomicHistogram {
        &self.check_seconds
    }

    pub fn admin_state(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Acquire))
    }

    pub fn set_admin_state(&self, state: AdminState) {
        if self.admin.swap(state as u8, Ordering::AcqRel) != state as u8 {
            self.bump_epoch();
        }
    }

    /// The weight set through the admin API, if any; it overrides the config's.
    pub fn weight_override(&self) -> Option<u32> {
        match self.weight_override.load(Ordering::Acquire) {
            NO_WEIGHT_OVERRIDE => None,
            weight => Some(weight),
        }
    }

    pub fn set_weight_override(&self, weight: Option<u32>) {
        let value = weight.unwrap_or(NO_WEIGHT_OVERRIDE);
        if self.weight_override.swap(value, Ordering::AcqRel) != value {
            self.bump_epoch();
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// In-flight work on all servers of this server's backend, including
    /// servers that drain or left the config and still finish requests.
    pub fn backend_in_flight(&self) -> u32 {
        self.backend_in_flight.load(Ordering::Relaxed)
    }

    /// The peak-EWMA of this server's response time.
    pub fn response_time(&self) -> &ResponseTime {
        &self.response_time
    }

    /// Records how long one response took to start (or one connect, in tcp mode).
    pub fn record_response_time(&self, elapsed: Duration) {
        self.response_time.record(elapsed);
    }

    pub fn status(&self) -> ServerStatus {
        match self.admin_state() {
            AdminState::Maint => ServerStatus::Maint,
            AdminState::Drain => ServerStatus::Drain,
            AdminState::Ready => match self.health() {
                Health::Up => ServerStatus::Up,
                Health::Down => ServerStatus::Down,
            },
        }
    }

    /// Notified on every change of health, admin state, weight or ejection of
    /// any server of the backend.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// One server as the current snapshot sees it.
#[derive(Debug)]
pub struct Server {
    pub name: Arc<str>,
    /// The address as written in the config.
    pub address: String,
    pub addr: SocketAddr,
    /// `addr` as an authority, rendered once.
    pub authority: Authority,
    config_weight: u32,
    pub backup: bool,
    pub slow_start: std::time::Duration,
    /// Concurrent requests or sessions; 0 means no limit.
    pub max_connections: u32,
    pub state: Arc<ServerState>,
    pub pool: Arc<Pool>,
    /// The backend's queue, which a freed slot is offered to first.
    pub queue: Arc<Queue>,
}

impl Server {
    pub fn new(
        config: &config::Server,
        state: Arc<ServerState>,
        pool: Arc<Pool>,
        queue: Arc<Queue>,
    ) -> Server {
        // A SocketAddr always renders as a valid authority.
        let authority = Authority::try_from(config.addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("invalid"));
        Server {
            name: Arc::from(config.name.as_str()),
            address: config.address.clone(),
            addr: config.addr,
            authority,
            config_weight: config.weight,
            backup: config.backup,
            slow_start: config.slow_start,
            max_connections: config.max_connections,
            state,
            pool,
            queue,
        }
    }

    /// The weight set by the config or, when set, through the admin API.
    pub fn base_weight(&self) -> u32 {
        self.state.weight_override().unwrap_or(self.config_weight)
    }

    /// The weight balancers use now: the base weight, scaled down while slow
    /// start ramps it up (never below 1 while the base weight is above 0).
    pub fn weight(&self) -> u32 {
        let base = self.base_weight();
        let factor = self.state.weight_factor();
        if factor >= FULL_WEIGHT || base == 0 {
            return base;
        }
        (base * factor / FULL_WEIGHT).max(1)
    }

    /// Healthy, not ejected, not drained or in maintenance, and with a weight
    /// above zero: may be picked for new work.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.state.health() == Health::Up
            && self.state.admin_state() == AdminState::Ready
            && !self.state.is_ejected()
            && self.base_weight() > 0
    }

    /// Usable and under its `max_connections`.
    #[inline]
    pub fn has_capacity(&self) -> bool {
        self.max_connections == 0 || self.state.in_flight() < self.max_connections
    }

    /// Counts one request or session on this server until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlightGuard {
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        self.state.backend_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            server: Arc::clone(self),
            counted: true,
        }
    }
}

/// One request or session in flight on a server; dropped when its response body
/// ends or is abandoned, so load-aware balancers see long-polls too. When the
/// server has a connection limit and requests are queued, the slot passes
/// straight to the oldest of them.
#[derive(Debug)]
pub struct InFlightGuard {
    server: Arc<Server>,
    /// False only for a handed-over slot that no waiter claimed.
    counted: bool,
}

impl InFlightGuard {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let server = &self.server;
        if server.max_connections > 0 && !server.queue.is_empty() && server.is_usable() {
            // Hand the slot over: the in-flight count stays as it is.
            let slot = InFlightGuard {
                server: Arc::clone(server),
                counted: true,
            };
            match server.queue.hand_over(slot) {
                None => return,
                Some(mut unclaimed) => unclaimed.counted = false,
            }
        }
        server.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        server
            .state
            .backend_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}
