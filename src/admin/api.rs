//! The admin routes: which role each needs, and what each answers.
//!
//! A request is matched to a route first (404 for none), then its method (405
//! with `Allow`), then its credentials (401 / 403), and only then is anything
//! about backends revealed: an unknown backend is a 404 for an authorized
//! caller only.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::AdminContext;
use super::auth::{self, Caller, Denied};
use super::page;
use super::state::MAX_WEIGHT;
use crate::config::{Mode, Role};
use crate::metrics::CODE_CLASSES;
use crate::runtime::Runtime;
use crate::supervisor::ReloadRequest;
use crate::upstream::{AdminState, Backend, Health, Server};

/// Request bodies are a few bytes of JSON.
const MAX_BODY: usize = 64 * 1024;

pub type AdminBody = Full<Bytes>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Page,
    Metrics,
    Healthz,
    Readyz,
    Backends,
    ServerState { backend: String, server: String },
    ServerWeight { backend: String, server: String },
    Reload,
}

const READ: &[Method] = &[Method::GET, Method::HEAD];
const PUT: &[Method] = &[Method::PUT];
const POST: &[Method] = &[Method::POST];

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let route = match path {
            "/" => Route::Page,
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/api/v1/backends" => Route::Backends,
            "/api/v1/reload" => Route::Reload,
            _ => {
                let rest = path.strip_prefix("/api/v1/backends/")?;
                let segments: Vec<&str> = rest.split('/').collect();
                let [backend, "servers", server, field] = segments[..] else {
                    return None;
                };
                let (backend, server) = (percent_decode(backend)?, percent_decode(server)?);
                match field {
                    "state" => Route::ServerState { backend, server },
                    "weight" => Route::ServerWeight { backend, server },
                    _ => return None,
                }
            }
        };
        Some(route)
    }

    /// The role the route needs; `None` for the open ones.
    fn role(&self) -> Option<Role> {
        match self {
            Route::Metrics | Route::Healthz | Route::Readyz => None,
            Route::Page | Route::Backends => Some(Role::Viewer),
            Route::ServerState { .. } | Route::ServerWeight { .. } | Route::Reload => {
                Some(Role::Operator)
            }
        }
    }

    fn methods(&self) -> &'static [Method] {
        match self {
            Route::ServerState { .. } | Route::ServerWeight { .. } => PUT,
            Route::Reload => POST,
            _ => READ,
        }
    }
}

/// Answers one admin request.
pub async fn handle(ctx: &AdminContext, request: Request<Incoming>) -> Response<AdminBody> {
    let Some(route) = Route::parse(request.uri().path()) else {
        return error(StatusCode::NOT_FOUND, "no such route");
    };
    let methods = route.methods();
    if !methods.contains(request.method()) {
        let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method {} not allowed here", request.method()),
        );
        if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
            response.headers_mut().insert(header::ALLOW, value);
        }
        return response;
    }
    let caller = match route.role() {
        None => None,
        Some(role) => match auth::authorize(&ctx.tokens.load(), request.headers(), role) {
            Ok(caller) => Some(caller),
            Err(Denied::Unauthenticated(why)) => return unauthenticated(role, why),
            Err(Denied::Forbidden) => {
                return error(StatusCode::FORBIDDEN, "this route needs an operator token");
            }
        },
    };
    let caller = caller.as_ref();
    match route {
        Route::Healthz => text(StatusCode::OK, "ok\n"),
        Route::Readyz => readiness(ctx),
        Route::Metrics => {
            let body = crate::metrics::render(&ctx.runtime.load(), &ctx.reloads, &ctx.threads);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            no_store(response)
        }
        Route::Backends => {
            let mut response = Response::new(Full::new(Bytes::from(overview(ctx) + "\n")));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            no_store(response)
        }
        Route::Page => {
            let mut response = Response::new(Full::new(Bytes::from(page::render(&overview(ctx)))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            no_store(response)
        }
        Route::ServerState { backend, server } => {
            change_state(ctx, caller, &backend, &server, request).await
        }
        Route::ServerWeight { backend, server } => {
            change_weight(ctx, caller, &backend, &server, request).await
        }
        Route::Reload => reload(ctx, caller).await,
    }
}

fn readiness(ctx: &AdminContext) -> Response<AdminBody> {
    if ctx.stopping.load(Ordering::Acquire) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
    }
    let runtime = ctx.runtime.load();
    let empty: Vec<&str> = runtime
        .backends()
        .iter()
        .filter(|backend| {
            !backend
                .servers
                .iter()
                .any(|server| server.state.status() == crate::upstream::ServerStatus::Up)
        })
        .map(|backend| &*backend.name)
        .collect();
    if empty.is_empty() {
        return text(StatusCode::OK, "ready\n");
    }
    let lines: String = empty
        .iter()
        .map(|name| format!("backend {name}: no server up\n"))
        .collect();
    text(StatusCode::SERVICE_UNAVAILABLE, &lines)
}

/// The `GET /api/v1/backends` document (the status page renders the same).
/// Fields serialize in declaration order: the contract's fields first, then
/// the ones added for the status page.
#[derive(Debug, Serialize)]
struct Overview<'a> {
    generation: u64,
    backends: Vec<BackendView<'a>>,
    frontends: Vec<FrontendView<'a>>,
    reloads: ReloadsView,
}

#[derive(Debug, Serialize)]
struct FrontendView<'a> {
    name: &'a str,
    mode: &'static str,
    /// The bound addresses (the real port where the config says 0).
    binds: Vec<String>,
    backend: &'a str,
    tls: bool,
    active_connections: i64,
    connections_total: u64,
    requests_total: u64,
    received_bytes_total: u64,
    sent_bytes_total: u64,
}

#[derive(Debug, Serialize)]
struct BackendView<'a> {
    name: &'a str,
    balance: &'static str,
    queued: usize,
    servers: Vec<ServerView<'a>>,
    max_queue: usize,
    retries_total: u64,
    connect_errors_total: u64,
}

#[derive(Debug, Serialize)]
struct ServerView<'a> {
    name: &'a str,
    address: &'a str,
    state: &'static str,
    check: CheckView,
    /// As configured, or as set through the API.
    weight: u32,
    backup: bool,
    in_flight: u32,
    max_connections: u32,
    admin_state: &'static str,
    health: &'static str,
    ejected: bool,
    /// The weight in effect now: lower while slow start ramps it up.
    effective_weight: u32,
    weight_set_by_api: bool,
    check_failures_total: u64,
    /// By status class, "1xx" to "5xx".
    responses_total: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
struct CheckView {
    status: &'static str,
    detail: String,
    last_change_seconds: f64,
}

#[derive(Debug, Serialize)]
struct ReloadsView {
    success: u64,
    failure: u64,
    /// The errors of the last failed reload, until one succeeds.
    last_errors: Vec<String>,
}

fn overview(ctx: &AdminContext) -> String {
    let runtime = ctx.runtime.load();
    let listeners = ctx.listeners.load();
    let frontends = runtime
        .frontends()
        .map(|frontend| {
            let stats = &frontend.stats;
            FrontendView {
                name: &frontend.name,
                mode: match frontend.config.mode {
                    Mode::Http => "http",
                    Mode::Tcp => "tcp",
                },
                binds: listeners
                    .iter()
                    .filter(|(name, _)| **name == *frontend.name)
                    .map(|(_, addr)| addr.to_string())
                    .collect(),
                backend: &frontend.config.backend,
                tls: frontend.config.tls.is_some(),
                active_connections: stats.active_connections.load(Ordering::Relaxed),
                connections_total: stats.connections.load(Ordering::Relaxed),
                requests_total: stats.requests.load(Ordering::Relaxed),
                received_bytes_total: stats.bytes_in.load(Ordering::Relaxed),
                sent_bytes_total: stats.bytes_out.load(Ordering::Relaxed),
            }
        })
        .collect();
    let last_errors = ctx
        .reloads
        .last_errors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_deref()
        .map(|errors| errors.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let document = Overview {
        generation: runtime.generation,
        backends: runtime.backends().iter().map(|b| backend_view(b)).collect(),
        frontends,
        reloads: ReloadsView {
            success: ctx.reloads.successes.load(Ordering::Relaxed),
            failure: ctx.reloads.failures.load(Ordering::Relaxed),
            last_errors,
        },
    };
    to_json(&document)
}

fn backend_view(backend: &Backend) -> BackendView<'_> {
    BackendView {
        name: &backend.name,
        balance: backend.config.balance.as_str(),
        queued: backend.queue.len(),
        servers: backend.servers.iter().map(|s| server_view(s)).collect(),
        max_queue: backend.config.max_queue,
        retries_total: backend.stats.retries.load(Ordering::Relaxed),
        connect_errors_total: backend.stats.connect_errors.load(Ordering::Relaxed),
    }
}

fn server_view(server: &Server) -> ServerView<'_> {
    let state = &server.state;
    let check = state.check_status();
    let since = check.last_change.elapsed().as_secs_f64();
    ServerView {
        name: &server.name,
        address: &server.address,
        state: state.status().as_str(),
        check: CheckView {
            status: check.status,
            detail: check.detail.clone(),
            last_change_seconds: (since * 10.0).round() / 10.0,
        },
        weight: server.base_weight(),
        backup: server.backup,
        in_flight: state.in_flight(),
        max_connections: server.max_connections,
        admin_state: admin_state_name(state.admin_state()),
        health: if state.health() == Health::Up {
            "up"
        } else {
            "down"
        },
        ejected: state.is_ejected(),
        effective_weight: server.weight(),
        weight_set_by_api: state.weight_override().is_some(),
        check_failures_total: state.check_failures(),
        responses_total: CODE_CLASSES
            .iter()
            .enumerate()
            .map(|(class, code)| (*code, state.responses(class)))
            .collect(),
    }
}

/// Plain structs of strings and numbers always serialize.
fn to_json(view: &impl Serialize) -> String {
    serde_json::to_string(view).unwrap_or_default()
}

fn admin_state_name(state: AdminState) -> &'static str {
    match state {
        AdminState::Ready => "ready",
        AdminState::Drain => "drain",
        AdminState::Maint => "maint",
    }
}

/// The server named by the path in the running snapshot, or the 404 to send.
fn find_server<'a>(
    runtime: &'a Runtime,
    backend: &str,
    server: &str,
) -> Result<&'a std::sync::Arc<Server>, Refusal> {
    let found = runtime
        .backend(backend)
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, format!("no backend {backend:?}")))?;
    found.server(server).ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no server {server:?} in backend {backend:?}"),
        )
    })
}

async fn change_state(
    ctx: &AdminContext,
    caller: Option<&Caller>,
    backend: &str,
    server: &str,
    request: Request<Incoming>,
) -> Response<AdminBody> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        state: String,
    }
    let runtime = ctx.runtime.load_full();
    let target = match find_server(&runtime, backend, server) {
        Ok(target) => target,
        Err(refusal) => return refusal.response(),
    };
    let body: Body = match read_json(request).await {
        Ok(body) => body,
        Err(refusal) => return refusal.response(),
    };
    let state = match body.state.as_str() {
        "ready" => AdminState::Ready,
        "drain" => AdminState::Drain,
        "maint" => AdminState::Maint,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("unknown state {other:?} (expected \"ready\", \"drain\" or \"maint\")"),
            );
        }
    };
    target.state.set_admin_state(state);
    tracing::info!(
        token = caller.map_or("", |c| c.name.as_str()),
        "admin: {backend}/{server} set to {}",
        admin_state_name(state)
    );
    persist(ctx).await;
    json_response(StatusCode::OK, &server_view(target))
}

async fn change_weight(
    ctx: &AdminContext,
    caller: Option<&Caller>,
    backend: &str,
    server: &str,
    request: Request<Incoming>,
) -> Response<AdminBody> {
    let runtime = ctx.runtime.load_full();
    let target = match find_server(&runtime, backend, server) {
        Ok(target) => target,
        Err(refusal) => return refusal.response(),
    };
    let body: serde_json::Map<String, Value> = match read_json(request).await {
        Ok(body) => body,
        Err(refusal) => return refusal.response(),
    };
    // `{"weight": N}`, or `{"weight": null}` for the configured weight again.
    let weight = match body.get("weight") {
        Some(_) if body.len() > 1 => {
            return error(StatusCode::BAD_REQUEST, "only \"weight\" may be set here");
        }
        Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|w| w <= u64::from(MAX_WEIGHT)) => {
            n.as_u64().and_then(|w| u32::try_from(w).ok())
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "weight must be an integer from 0 to {MAX_WEIGHT} (or null for the configured weight)"
                ),
            );
        }
        None => return error(StatusCode::BAD_REQUEST, "expected {\"weight\": N}"),
    };
    target.state.set_weight_override(weight);
    tracing::info!(
        token = caller.map_or("", |c| c.name.as_str()),
        "admin: {backend}/{server} weight set to {}",
        target.base_weight()
    );
    persist(ctx).await;
    json_response(StatusCode::OK, &server_view(target))
}

/// Writes the state file; a failure is logged (the change has taken effect).
async fn persist(ctx: &AdminContext) {
    if let Err(err) = ctx.save_state().await {
        tracing::error!(error = %err, "cannot write the state file; the change applies until the next restart");
    }
}

async fn reload(ctx: &AdminContext, caller: Option<&Caller>) -> Response<AdminBody> {
    tracing::info!(
        token = caller.map_or("", |c| c.name.as_str()),
        "admin: reload requested"
    );
    let (reply, answer) = oneshot::channel();
    if ctx.reload.send(ReloadRequest { reply }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "flowgate is stopping");
    }
    match answer.await {
        Ok(Ok(generation)) => json_response(StatusCode::OK, &json!({ "generation": generation })),
        Ok(Err(errors)) => {
            let lines: Vec<&str> = errors.lines().collect();
            json_response(StatusCode::BAD_REQUEST, &json!({ "errors": lines }))
        }
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "flowgate is stopping"),
    }
}

/// Reads a small JSON body, or the 400 / 413 to send.
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Refusal> {
    let bytes = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large".into(),
            ));
        }
        Err(err) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {err}"),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|err| Refusal::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {err}")))
}

/// A request refused with a status and a JSON error.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Refusal {
        Refusal { status, message }
    }

    fn response(&self) -> Response<AdminBody> {
        error(self.status, &self.message)
    }
}

fn unauthenticated(role: Role, why: &str) -> Response<AdminBody> {
    let mut response = error(StatusCode::UNAUTHORIZED, why);
    // Viewer routes invite a browser to ask for Basic credentials; operator
    // routes take bearer tokens only.
    let challenge = if role == Role::Viewer {
        "Basic realm=\"flowgate\""
    } else {
        "Bearer realm=\"flowgate\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<AdminBody> {
    let mut body = to_json(value);
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    no_store(response)
}

fn error(status: StatusCode, message: &str) -> Response<AdminBody> {
    json_response(status, &json!({ "error": message }))
}

fn text(status: StatusCode, body: &str) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    no_store(response)
}

/// Live state: never from a cache.
fn no_store(mut response: Response<AdminBody>) -> Response<AdminBody> {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Decodes `%XX` escapes in a path segment; `None` when malformed or not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/"), Some(Route::Page));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::parse("/api/v1/backends"), Some(Route::Backends));
        assert_eq!(
            Route::parse("/api/v1/backends/engines/servers/engine-1/state"),
            Some(Route::ServerState {
                backend: "engines".into(),
                server: "engine-1".into()
            })
        );
        assert_eq!(
            Route::parse("/api/v1/backends/e/servers/%5B%3A%3A1%5D%3A80/weight"),
            Some(Route::ServerWeight {
                backend: "e".into(),
                server: "[::1]:80".into()
            })
        );
        assert_eq!(Route::parse("/api/v1/backends/e/servers/s/health"), None);
        assert_eq!(Route::parse("/api/v1/backends/e/servers/s/state/x"), None);
        assert_eq!(Route::parse("/api/v1/backends/e/servers//state"), None);
        assert_eq!(Route::parse("/api/v1/backends/e/servers/%zz/state"), None);
        assert_eq!(Route::parse("/api/v1/backends/"), None);
        assert_eq!(Route::parse("/index.html"), None);
    }

    #[test]
    fn roles_and_methods() {
        assert_eq!(Route::Metrics.role(), None);
        assert_eq!(Route::Page.role(), Some(Role::Viewer));
        assert_eq!(Route::Reload.role(), Some(Role::Operator));
        assert_eq!(Route::Reload.methods(), POST);
        assert_eq!(Route::Backends.methods(), READ);
    }
}
