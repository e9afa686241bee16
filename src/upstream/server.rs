//! A backend server: its identity, the live state that health checks and the admin
//! API write, and the guard that counts in-flight work.
//!
//! The live state ([`ServerState`]) is keyed by (backend name, server name) and
//! outlives config reloads; [`Server`] is the per-snapshot view that pairs it with
//! what the current config says (address, weight, limits) and a connection pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use http::uri::Authority;

use super::pool::Pool;
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
    in_flight: AtomicU32,
    /// Bumped on any change that alters which servers can take traffic or their
    /// weights; shared by all servers of one backend.
    epoch: Arc<AtomicU64>,
}

impl ServerState {
    pub fn new(epoch: Arc<AtomicU64>) -> ServerState {
        ServerState {
            health: AtomicU8::new(Health::Up as u8),
            admin: AtomicU8::new(AdminState::Ready as u8),
            weight_override: AtomicU32::new(NO_WEIGHT_OVERRIDE),
            in_flight: AtomicU32::new(0),
            epoch,
        }
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
            self.bump_epoch();
        }
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

    fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
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
    /// Concurrent requests or sessions; 0 means no limit.
    pub max_connections: u32,
    pub state: Arc<ServerState>,
    pub pool: Arc<Pool>,
}

impl Server {
    pub fn new(config: &config::Server, state: Arc<ServerState>, pool: Arc<Pool>) -> Server {
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
            max_connections: config.max_connections,
            state,
            pool,
        }
    }

    /// The weight balancers use now: the admin override, else the config's.
    pub fn weight(&self) -> u32 {
        self.state.weight_override().unwrap_or(self.config_weight)
    }

    /// Healthy, not drained or in maintenance, and with a weight above zero:
    /// may be picked for new work.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.state.health() == Health::Up
            && self.state.admin_state() == AdminState::Ready
            && self.weight() > 0
    }

    /// Usable and under its `max_connections`.
    #[inline]
    pub fn has_capacity(&self) -> bool {
        self.max_connections == 0 || self.state.in_flight() < self.max_connections
    }

    /// Counts one request or session on this server until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlightGuard {
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            server: Arc::clone(self),
        }
    }
}

/// One request or session in flight on a server; dropped when its response body
/// ends or is abandoned, so load-aware balancers see long-polls too.
#[derive(Debug)]
pub struct InFlightGuard {
    server: Arc<Server>,
}

impl InFlightGuard {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.server.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
