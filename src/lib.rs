//! flowgate: a layer-4/7 load-balancing reverse proxy for pools of
//! workflow-engine instances.
//!
//! The data path, in the order a request meets it:
//!
//! - [`listener`]: accept loops, connection limits, allow/deny, client I/O timers,
//!   tcp-mode sessions.
//! - [`http`]: the hyper server side, routing, forwarding and body wrappers.
//! - [`runtime`]: the immutable snapshot a request reads (frontends, routes,
//!   backends), swapped whole on reload.
//! - [`upstream`]: backends and servers (identity + live state), per-server clients.
//! - [`balance`]: the algorithms that pick a server.
//!
//! Around it: [`config`] (TOML -> checked [`config::Config`]), [`health`]
//! (active checks feeding server state), [`supervisor`] (listener set,
//! lifecycle), [`admin`] (admin API, status page, metrics endpoint, state
//! file), [`metrics`] (counters and their Prometheus rendering), [`demo`]
//! (built-in demo engines).

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod cancel;
pub mod config;
pub mod demo;
pub mod health;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod runtime;
pub mod supervisor;
pub mod tls;
pub mod upstream;
pub mod workers;
