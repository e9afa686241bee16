//! The configuration: the checked model every other module reads, and how a TOML
//! file becomes one.
//!
//! `load` reads a file, `parse` turns text into a [`Config`]. Both either return a
//! fully validated `Config` or every problem found, each located as
//! `FILE:LINE:COL: key.path: message`. Nothing downstream re-validates: a `Config`
//! that exists is one flowgate can run.

mod error;
mod reader;
mod sections;
mod units;
mod validate;
pub mod watch;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;

pub use error::{ConfigError, ConfigErrors};
pub use units::{parse_duration, parse_size};

/// Reads and validates the config file at `path`. Relative paths inside the file
/// are resolved against the file's directory; errors name the file as given.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors::single(ConfigError::file(
            path.display().to_string(),
            err.to_string(),
        ))
    })?;
    parse(&text, path)
}

/// Parses and validates config text as if it had been read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    reader::read(text, path)
}

/// A checked configuration, as the file describes it. File order is kept for
/// frontends, backends, routes and servers (`balance = "first"` depends on it).
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, as given on the command line.
    pub path: PathBuf,
    pub global: Global,
    pub admin: Option<Admin>,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
}

impl Config {
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    pub fn frontend(&self, name: &str) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.name == name)
    }

    /// Every certificate, key and CA file the config names: the reload watcher
    /// watches these beside the config file itself.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let admin_tls = self.admin.as_ref().and_then(|admin| admin.tls.as_ref());
        let frontend_tls = self.frontends.iter().filter_map(|f| f.tls.as_ref());
        for tls in frontend_tls.chain(admin_tls) {
            for pair in &tls.certificates {
                files.push(pair.cert.clone());
                files.push(pair.key.clone());
            }
            files.extend(tls.client_ca.clone());
        }
        for backend in &self.backends {
            if let Some(tls) = &backend.tls {
                files.extend(tls.ca.clone());
            }
        }
        files
    }
}

#[derive(Debug, Clone)]
pub struct Global {
    /// Runtime worker threads; 0 means one per core.
    pub threads: usize,
    /// Open client connections over all frontends; past it, accepting pauses.
    pub max_connections: usize,
    /// How long a stop (or a removed listener) waits for in-flight work.
    pub grace_period: Duration,
    pub access_log: AccessLog,
    pub log_format: LogFormat,
    pub state_file: Option<PathBuf>,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            threads: 0,
            max_connections: 50_000,
            grace_period: Duration::from_secs(30),
            access_log: AccessLog::Stderr,
            log_format: LogFormat::Text,
            state_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub bind: SocketAddr,
    pub tokens: Vec<AdminToken>,
    /// `[admin.tls]`: the admin API over HTTPS (HTTP/1.1 only).
    pub tls: Option<FrontendTls>,
}

#[derive(Debug, Clone)]
pub struct AdminToken {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token; the token itself never appears in the file.
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Http,
    Tcp,
}

#[derive(Debug, Clone)]
pub struct Frontend {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub mode: Mode,
    /// Where requests go when no route matches (and every session in tcp mode).
    pub backend: String,
    pub max_connections: Option<usize>,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub timeouts: FrontendTimeouts,
    pub limits: Limits,
    pub tls: Option<FrontendTls>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Copy)]
pub struct FrontendTimeouts {
    /// Idle keep-alive connection (http) or idle session (tcp).
    pub client_idle: Duration,
    /// The whole request head must arrive within this time.
    pub request_header: Duration,
}

impl Default for FrontendTimeouts {
    fn default() -> Self {
        FrontendTimeouts {
            client_idle: Duration::from_secs(60),
            request_header: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger request heads get 431.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FrontendTls {
    /// Chosen by SNI; the first is the default.
    pub certificates: Vec<CertificatePair>,
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    pub client_ca: Option<PathBuf>,
    /// The loaded server side: set in every checked config.
    pub server: Option<std::sync::Arc<rustls::ServerConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// An http-mode route; every condition present must match, first match wins.
#[derive(Debug, Clone)]
pub struct Route {
    /// Exact host, lower-cased, without port.
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// Empty means any method.
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub backend: String,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub hash_key: Option<HashKey>,
    /// Bounded-load factor in percent (> 100), when set.
    pub hash_balance_factor: Option<u32>,
    pub protocol: Protocol,
    pub retries: u32,
    pub redispatch: bool,
    pub max_queue: usize,
    pub timeouts: BackendTimeouts,
    pub health: HealthCheck,
    pub passive: Option<Passive>,
    pub tls: Option<BackendTls>,
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Random,
    P2c,
    Source,
    Hash,
    First,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
            Balance::P2c => "p2c",
            Balance::Source => "source",
            Balance::Hash => "hash",
            Balance::First => "first",
        }
    }
}

/// What `balance = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    Query(String),
    Path,
    Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// h2c with prior knowledge, or h2 over TLS by ALPN.
    H2,
}

#[derive(Debug, Clone, Copy)]
pub struct BackendTimeouts {
    pub connect: Duration,
    /// Until the response head arrives.
    pub response: Duration,
    /// Pooled idle server connections are closed after this.
    pub idle: Duration,
    /// Longest wait in the queue.
    pub queue: Duration,
}

impl Default for BackendTimeouts {
    fn default() -> Self {
        BackendTimeouts {
            connect: Duration::from_secs(3),
            response: Duration::from_secs(60),
            idle: Duration::from_secs(90),
            queue: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    None,
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub check: CheckKind,
    pub path: String,
    pub host: Option<String>,
    /// Inclusive range of accepted status codes.
    pub expect_status: (u16, u16),
    pub interval: Duration,
    pub fast_interval: Duration,
    pub down_interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Checks go to this port of each server's address instead of the port
    /// traffic goes to (an engine's management port).
    pub port: Option<u16>,
    /// The protocol of HTTP checks, when not the backend's.
    pub protocol: Option<Protocol>,
    /// Whether checks speak TLS; `None`: as the backend's traffic does.
    pub tls: Option<bool>,
}

impl HealthCheck {
    /// The protocol HTTP checks speak on a backend speaking `traffic`.
    pub fn protocol_for(&self, traffic: Protocol) -> Protocol {
        self.protocol.unwrap_or(traffic)
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        let interval = Duration::from_secs(2);
        HealthCheck {
            check: CheckKind::Tcp,
            path: "/".to_string(),
            host: None,
            expect_status: (200, 399),
            interval,
            fast_interval: interval,
            down_interval: interval,
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
            protocol: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Passive {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
}

#[derive(Debug, Clone)]
pub struct BackendTls {
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    /// The loaded client side: set in every checked config.
    pub client: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The client side of health checks: `client` itself, or a copy offering
    /// the ALPN of `health.protocol`; `None` with `health.tls = false`.
    pub check_client: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// A digest of the CA file as loaded (0 for the system's roots): a reload
    /// that loads the same keeps the servers' pooled TLS connections.
    pub ca_digest: u64,
}

#[derive(Debug, Clone)]
pub struct Server {
    /// Unique in its backend; defaults to the address as written.
    pub name: String,
    /// The address as written in the file (`ip:port` or `host:port`).
    pub address: String,
    /// The address resolved at load time.
    pub addr: SocketAddr,
    /// 0..=256; 0 takes no new traffic.
    pub weight: u32,
    pub backup: bool,
    /// Concurrent requests or sessions; 0 means no limit.
    pub max_connections: u32,
    pub slow_start: Duration,
}
