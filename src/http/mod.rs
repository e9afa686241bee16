//! Http mode: the hyper server side, routing, the forwarding logic and the body
//! wrappers that carry per-request state to the end of each body.

pub mod body;
pub mod conn;
pub mod error;
pub mod h1;
pub mod hash_key;
pub mod headers;
pub mod proxy;
pub mod route;
pub mod server;

pub use error::ProxyError;
