//! Http-mode routing: the first route whose conditions all match picks the
//! backend; without a match the frontend's default backend serves.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, HeaderValue, Method};

use crate::config;
use crate::upstream::Backend;

#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    default: Arc<Backend>,
}

#[derive(Debug)]
struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    backend: Arc<Backend>,
}

impl Router {
    /// `backend` resolves a backend name; the config was validated, so every name
    /// a frontend uses exists.
    pub fn new(
        frontend: &config::Frontend,
        backend: impl Fn(&str) -> Option<Arc<Backend>>,
    ) -> Option<Router> {
        let routes = frontend
            .routes
            .iter()
            .map(|route| {
                Some(Route {
                    host: route.host.clone(),
                    path_prefix: route.path_prefix.clone(),
                    methods: route.methods.clone(),
                    headers: route.headers.clone(),
                    backend: backend(&route.backend)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Router {
            routes,
            default: backend(&frontend.backend)?,
        })
    }

    /// The backend for a request: the first matching route's, else the default.
    pub fn route(&self, request: &impl Routable) -> &Arc<Backend> {
        if self.routes.is_empty() {
            return &self.default;
        }
        let host = request.host();
        self.routes
            .iter()
            .find(|route| route.matches(request, host))
            .map(|route| &route.backend)
            .unwrap_or(&self.default)
    }

    pub fn default_backend(&self) -> &Arc<Backend> {
        &self.default
    }
}

impl Route {
    fn matches(&self, request: &impl Routable, host: Option<&str>) -> bool {
        if let Some(want) = &self.host
            && !host.is_some_and(|host| host.eq_ignore_ascii_case(want))
        {
            return false;
        }
        if let Some(prefix) = &self.path_prefix
            && !request.path().starts_with(prefix.as_str())
        {
            return false;
        }
        if !self.methods.is_empty()
            && !self
                .methods
                .iter()
                .any(|method| method.as_str() == request.method())
        {
            return false;
        }
        self.headers
            .iter()
            .all(|(name, value)| request.header(name) == Some(value.as_bytes()))
    }
}

/// What routing looks at in a request, whichever codec parsed it: hyper's
/// (`Parts`) or flowgate's own HTTP/1.1 head (`h1`).
pub trait Routable {
    fn method(&self) -> &str;
    /// The path of the request target (no query).
    fn path(&self) -> &str;
    /// The host the client asked for, without port (see [`request_host`]).
    fn host(&self) -> Option<&str>;
    /// The first value of header `name`.
    fn header(&self, name: &HeaderName) -> Option<&[u8]>;
}

impl Routable for Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn host(&self) -> Option<&str> {
        request_host(self)
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.headers.get(name).map(HeaderValue::as_bytes)
    }
}

/// The request's host without port: the URI authority (HTTP/2, absolute-form)
/// or the Host header.
pub fn request_host(request: &Parts) -> Option<&str> {
    let host = match request.uri.host() {
        Some(host) => host,
        None => {
            return Some(host_header_name(
                request.headers.get(http::header::HOST)?.to_str().ok()?,
            ));
        }
    };
    Some(host.trim_end_matches('.'))
}

/// The host a Host header names: without port and trailing dot.
pub fn host_header_name(header: &str) -> &str {
    strip_port(header).trim_end_matches('.')
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_ignored() {
        assert_eq!(strip_port("engine.example.com:8080"), "engine.example.com");
        assert_eq!(strip_port("engine.example.com"), "engine.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }

    #[test]
    fn host_from_header_or_authority() {
        let (parts, ()) = http::Request::builder()
            .uri("/x")
            .header("host", "Engine.Example.com:80")
            .body(())
            .map(|r| r.into_parts())
            .expect("request");
        assert_eq!(request_host(&parts), Some("Engine.Example.com"));
        let (parts, ()) = http::Request::builder()
            .uri("https://grpc.example.com/svc/Method")
            .body(())
            .map(|r| r.into_parts())
            .expect("request");
        assert_eq!(request_host(&parts), Some("grpc.example.com"));
    }
}
