//! The built-in demo engine: a small HTTP/1.1 and h2c server that imitates one
//! instance of a workflow engine, so `flowgate demo`, the benchmark and the tests
//! have real origins to balance across without anything installed.
//!
//! Each instance answers with its own name (in the JSON and in the
//! `x-engine-instance` header), which makes the balancer's choices visible:
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /api/v1/workflows/{id}` | 200 `{"workflow_id","status","instance","addr"}` |
//! | `POST /api/v1/workflows` | 201 `{"instance","received_bytes"}`, the body counted as it streams |
//! | `GET /api/v1/tasks/poll?wait=2s` | 200 `{"instance","task":null,"waited_ms"}` after `wait` (default 30s, at most 5m), as a worker's long-poll |
//! | `GET /health` | 200 `ok` |
//! | a known path with another method | 405 with `Allow` |
//! | anything else | 404 `{"error":"not found"}` |
//!
//! [`DemoEngine::bind`] binds, [`DemoEngine::spawn`] runs the accept loop and
//! returns a [`DemoHandle`]; [`DemoHandle::shutdown`] (or dropping the handle)
//! stops accepting and ends the open connections.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// The response header naming the instance that answered.
pub const INSTANCE_HEADER: &str = "x-engine-instance";

/// How long a request head may take, and so also how long an idle HTTP/1
/// keep-alive connection stays open (hyper restarts the timer while it waits
/// for the next head). Above the proxy's default pooled idle time (90s), so a
/// pooled connection is closed by the proxy before the engine closes it under it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Long-poll wait when the request names none.
const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(30);

/// Longest long-poll wait; longer requests are cut to this.
const MAX_POLL_WAIT: Duration = Duration::from_secs(5 * 60);

/// After shutdown, how long an open connection may take to finish its
/// in-flight request (h2 gets a GOAWAY, idle HTTP/1 closes at once) before it
/// is dropped. Short, so a long-poll never holds a shutdown up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A bound, not yet running, demo engine instance.
#[derive(Debug)]
pub struct DemoEngine {
    listener: TcpListener,
    instance: Arc<Instance>,
}

/// A running demo engine. Dropping it stops the engine, like
/// [`shutdown`](DemoHandle::shutdown) without waiting.
#[derive(Debug)]
pub struct DemoHandle {
    instance: Arc<Instance>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What every response of one instance reports about it.
#[derive(Debug)]
struct Instance {
    name: String,
    addr: SocketAddr,
    header: HeaderValue,
    /// Long-polls parked right now (lets tests know a poll has arrived).
    waiting_polls: AtomicUsize,
}

impl DemoEngine {
    /// Binds `addr` (port 0 picks a free port) for an instance called `name`.
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] when `name` cannot be sent as
    /// a header value.
    pub async fn bind(name: &str, addr: SocketAddr) -> io::Result<DemoEngine> {
        let header = HeaderValue::from_str(name).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("demo engine name {name:?} is not a valid header value"),
            )
        })?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(DemoEngine {
            listener,
            instance: Arc::new(Instance {
                name: name.to_owned(),
                addr,
                header,
                waiting_polls: AtomicUsize::new(0),
            }),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.instance.addr
    }

    /// The instance name given to [`bind`](DemoEngine::bind).
    pub fn name(&self) -> &str {
        &self.instance.name
    }

    /// Runs the accept loop on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn spawn(self) -> DemoHandle {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            self.listener,
            Arc::clone(&self.instance),
            stop.clone(),
            tasks.clone(),
        ));
        // The accept loop is tracked and spawns every connection task while it
        // lives, so the tracker only empties once everything has ended.
        tasks.close();
        DemoHandle {
            instance: self.instance,
            stop,
            tasks,
        }
    }
}

impl DemoHandle {
    /// The address the engine listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.instance.addr
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.instance.name
    }

    /// Stops accepting (the listening socket is closed, new connections are
    /// refused) and ends the open connections; returns once all are gone.
    /// In-flight requests get at most one second to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for DemoHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    instance: Arc<Instance>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);

    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(instance = %instance.name, %error, "demo engine accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(instance = %instance.name, %peer, %error, "demo engine could not set TCP_NODELAY");
        }
        tasks.spawn(serve_connection(
            stream,
            peer,
            Arc::clone(&builder),
            Arc::clone(&instance),
            stop.clone(),
        ));
    }
    debug!(instance = %instance.name, "demo engine stopped accepting");
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    instance: Arc<Instance>,
    stop: CancellationToken,
) {
    let service_instance = Arc::clone(&instance);
    let service = service_fn(move |request| {
        let instance = Arc::clone(&service_instance);
        async move { Ok::<_, Infallible>(respond(request, &instance).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    debug!(instance = %instance.name, %peer, "demo engine closed a connection still busy at shutdown");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        debug!(instance = %instance.name, %peer, %error, "demo engine connection ended with an error");
    }
}

/// The endpoints, by path alone.
#[derive(Debug, PartialEq)]
enum Endpoint<'a> {
    Health,
    Workflows,
    Workflow(&'a str),
    TaskPoll,
}

impl<'a> Endpoint<'a> {
    fn from_path(path: &'a str) -> Option<Endpoint<'a>> {
        match path {
            "/health" => Some(Endpoint::Health),
            "/api/v1/workflows" => Some(Endpoint::Workflows),
            "/api/v1/tasks/poll" => Some(Endpoint::TaskPoll),
            _ => path
                .strip_prefix("/api/v1/workflows/")
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(Endpoint::Workflow),
        }
    }

    fn allow(&self) -> &'static str {
        match self {
            Endpoint::Workflows => "POST",
            Endpoint::TaskPoll => "GET",
            Endpoint::Health | Endpoint::Workflow(_) => "GET, HEAD",
        }
    }
}

async fn respond(request: Request<Incoming>, instance: &Instance) -> Response<Full<Bytes>> {
    let mut response = route(request, instance).await;
    response
        .headers_mut()
        .insert(INSTANCE_HEADER, instance.header.clone());
    response
}

async fn route(request: Request<Incoming>, instance: &Instance) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let Some(endpoint) = Endpoint::from_path(parts.uri.path()) else {
        return json_response(StatusCode::NOT_FOUND, json!({"error": "not found"}));
    };
    match (&endpoint, &parts.method) {
        (Endpoint::Health, &Method::GET | &Method::HEAD) => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        }
        (Endpoint::Workflow(id), &Method::GET | &Method::HEAD) => json_response(
            StatusCode::OK,
            json!({
                "workflow_id": id,
                "status": "RUNNING",
                "instance": instance.name,
                "addr": instance.addr.to_string(),
            }),
        ),
        (Endpoint::Workflows, &Method::POST) => start_workflow(body, instance).await,
        (Endpoint::TaskPoll, &Method::GET) => poll_task(parts.uri.query(), instance).await,
        _ => {
            let mut response = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method not allowed"}),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(endpoint.allow()));
            response
        }
    }
}

/// Counts the request body frame by frame; it is never held whole.
async fn start_workflow(mut body: Incoming, instance: &Instance) -> Response<Full<Bytes>> {
    let mut received_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received_bytes += data.len() as u64;
                }
            }
            Err(error) => {
                debug!(instance = %instance.name, %error, "demo engine could not read a request body");
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("reading the request body: {error}")}),
                );
            }
        }
    }
    json_response(
        StatusCode::CREATED,
        json!({"instance": instance.name, "received_bytes": received_bytes}),
    )
}

/// A worker's long-poll that never finds a task: it waits, then answers empty.
async fn poll_task(query: Option<&str>, instance: &Instance) -> Response<Full<Bytes>> {
    let wait = match poll_wait(query) {
        Ok(wait) => wait,
        Err(error) => return json_response(StatusCode::BAD_REQUEST, json!({"error": error})),
    };
    let started = Instant::now();
    // Counted down even when the connection ends and this future is dropped.
    let _waiting = WaitingPoll::start(&instance.waiting_polls);
    tokio::time::sleep(wait).await;
    let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    json_response(
        StatusCode::OK,
        json!({"instance": instance.name, "task": null, "waited_ms": waited_ms}),
    )
}

struct WaitingPoll<'a>(&'a AtomicUsize);

impl<'a> WaitingPoll<'a> {
    fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        WaitingPoll(count)
    }
}

impl Drop for WaitingPoll<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `wait` query parameter as a duration: [`DEFAULT_POLL_WAIT`] when absent,
/// capped at [`MAX_POLL_WAIT`], an error message when it does not parse.
fn poll_wait(query: Option<&str>) -> Result<Duration, String> {
    let Some(raw) = query_param(query.unwrap_or(""), "wait") else {
        return Ok(DEFAULT_POLL_WAIT);
    };
    let text =
        percent_decode(raw).ok_or_else(|| format!("invalid wait {raw:?}: bad percent-encoding"))?;
    let wait = humantime::parse_duration(&text)
        .map_err(|error| format!("invalid wait {text:?}: {error}"))?;
    Ok(wait.min(MAX_POLL_WAIT))
}

/// The raw (still encoded) value of the first `name=value` pair in `query`.
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Decodes `%XX` escapes and `+` (a space in a query); `None` when an escape
/// is malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                decoded.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let high = char::from(hex[0]).to_digit(16)?;
                let low = char::from(hex[1]).to_digit(16)?;
                decoded.push(u8::try_from(high * 16 + low).ok()?);
                i += 3;
            }
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body::Frame;
    use http_body_util::combinators::BoxBody;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;

    type Body = BoxBody<Bytes, Infallible>;

    /// Generous bound for anything that should happen "at once".
    const DEADLINE: Duration = Duration::from_secs(5);

    /// How often a test re-checks a condition it waits for.
    const POLL_INTERVAL: Duration = Duration::from_millis(5);

    async fn start(name: &str) -> DemoHandle {
        DemoEngine::bind(name, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind on loopback")
            .spawn()
    }

    fn client() -> Client<HttpConnector, Body> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn empty() -> Body {
        Full::new(Bytes::new()).boxed()
    }

    fn url(engine: &DemoHandle, path_and_query: &str) -> String {
        format!("http://{}{}", engine.local_addr(), path_and_query)
    }

    /// A request body of `left` chunks, produced one frame at a time and with
    /// no length known up front, so it goes out chunked.
    struct Chunks {
        chunk: Bytes,
        left: usize,
    }

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
        }
    }

    struct Answer {
        status: StatusCode,
        headers: http::HeaderMap,
        version: http::Version,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }
    }

    async fn send(client: &Client<HttpConnector, Body>, request: Request<Body>) -> Answer {
        let response = tokio::time::timeout(DEADLINE, client.request(request))
            .await
            .expect("answered in time")
            .expect("a response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            version: parts.version,
            body,
        }
    }

    async fn get(engine: &DemoHandle, path_and_query: &str) -> Answer {
        let request = Request::get(url(engine, path_and_query))
            .body(empty())
            .expect("a valid request");
        send(&client(), request).await
    }

    /// Waits, within [`DEADLINE`], until connecting to `addr` is refused.
    async fn assert_refuses_connections(addr: SocketAddr) {
        let refused = async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        };
        tokio::time::timeout(DEADLINE, refused)
            .await
            .expect("connections refused after shutdown");
    }

    #[tokio::test]
    async fn workflow_names_the_instance() {
        let engine = start("engine-7").await;
        let answer = get(&engine, "/api/v1/workflows/order-42").await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(answer.headers[INSTANCE_HEADER], "engine-7");
        assert_eq!(
            answer.json(),
            json!({
                "workflow_id": "order-42",
                "status": "RUNNING",
                "instance": "engine-7",
                "addr": engine.local_addr().to_string(),
            })
        );
    }

    #[tokio::test]
    async fn health_answers_ok() {
        let engine = start("engine-1").await;
        let answer = get(&engine, "/health").await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "ok");
        assert_eq!(answer.headers[INSTANCE_HEADER], "engine-1");
    }

    #[tokio::test]
    async fn start_workflow_counts_a_streamed_body() {
        const CHUNK: usize = 64 * 1024;
        const CHUNKS: usize = 16;

        let engine = start("engine-2").await;
        let body = Chunks {
            chunk: Bytes::from(vec![b'x'; CHUNK]),
            left: CHUNKS,
        };
        let request = Request::post(url(&engine, "/api/v1/workflows"))
            .body(body.boxed())
            .expect("a valid request");
        let answer = send(&client(), request).await;

        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(answer.headers[INSTANCE_HEADER], "engine-2");
        assert_eq!(
            answer.json(),
            json!({"instance": "engine-2", "received_bytes": CHUNK * CHUNKS})
        );
    }

    #[tokio::test]
    async fn task_poll_waits_then_answers_empty() {
        let engine = start("engine-3").await;
        let started = std::time::Instant::now();
        let answer = get(&engine, "/api/v1/tasks/poll?wait=200ms").await;
        let elapsed = started.elapsed();

        assert_eq!(answer.status, StatusCode::OK);
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        let json = answer.json();
        assert_eq!(json["instance"], "engine-3");
        assert_eq!(json["task"], serde_json::Value::Null);
        assert!(json["waited_ms"].as_u64().expect("waited_ms") >= 200);
    }

    #[tokio::test]
    async fn task_poll_rejects_a_bad_wait() {
        let engine = start("engine-4").await;
        for query in ["wait=soon", "wait=", "wait=%zz"] {
            let answer = get(&engine, &format!("/api/v1/tasks/poll?{query}")).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(answer.headers[INSTANCE_HEADER], "engine-4");
            assert!(answer.json()["error"].is_string(), "{query}");
        }
    }

    #[tokio::test]
    async fn unknown_path_is_not_found() {
        let engine = start("engine-5").await;
        for path in ["/", "/api/v1/workflows/", "/api/v1/workflows/a/b", "/nope"] {
            let answer = get(&engine, path).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(answer.headers[INSTANCE_HEADER], "engine-5");
            assert_eq!(answer.json(), json!({"error": "not found"}));
        }
    }

    #[tokio::test]
    async fn wrong_method_is_not_allowed() {
        let engine = start("engine-6").await;
        let request = Request::delete(url(&engine, "/api/v1/workflows"))
            .body(empty())
            .expect("a valid request");
        let answer = send(&client(), request).await;

        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.headers[header::ALLOW], "POST");
        assert_eq!(answer.headers[INSTANCE_HEADER], "engine-6");
    }

    #[tokio::test]
    async fn serves_h2c_with_prior_knowledge() {
        let engine = start("engine-h2").await;
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let request = Request::get(url(&engine, "/api/v1/workflows/w1"))
            .body(empty())
            .expect("a valid request");
        let answer = send(&client, request).await;

        assert_eq!(answer.version, http::Version::HTTP_2);
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["instance"], "engine-h2");
    }

    #[tokio::test]
    async fn shutdown_refuses_new_and_closes_open_connections() {
        let engine = start("engine-8").await;
        let addr = engine.local_addr();

        // A keep-alive connection that has served one request and sits idle.
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let connection = tokio::spawn(connection);
        let request = Request::get("/health")
            .header(header::HOST, addr.to_string())
            .body(empty())
            .expect("a valid request");
        let response = sender.send_request(request).await.expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.expect("a whole body");

        tokio::time::timeout(DEADLINE, engine.shutdown())
            .await
            .expect("shutdown finished in time");

        tokio::time::timeout(DEADLINE, connection)
            .await
            .expect("the open connection was closed")
            .expect("the connection task did not panic")
            .ok();
        assert_refuses_connections(addr).await;
    }

    /// Shuts an engine down while a long-poll sent over HTTP/1.1 or h2c waits
    /// in it: the poll is cut after the short grace, not answered a minute later.
    async fn shutdown_ends_a_long_poll_in_flight(http2: bool) {
        let engine = start("engine-9").await;
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http();
        let request = Request::get(url(&engine, "/api/v1/tasks/poll?wait=1m"))
            .body(empty())
            .expect("a valid request");
        let poll = tokio::spawn(async move { client.request(request).await });
        let instance = Arc::clone(&engine.instance);
        let waiting_polls = || instance.waiting_polls.load(Ordering::Relaxed);
        let in_flight = async {
            while waiting_polls() == 0 {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        };
        tokio::time::timeout(DEADLINE, in_flight)
            .await
            .expect("the poll reached the engine");

        tokio::time::timeout(DEADLINE, engine.shutdown())
            .await
            .expect("shutdown finished in time, not after the poll's minute");
        let result = tokio::time::timeout(DEADLINE, poll)
            .await
            .expect("the poll ended")
            .expect("the poll task did not panic");
        assert!(result.is_err(), "the poll was cut, not answered");
        // Under h2 the handler runs in a task of its own; it must end too.
        let abandoned = async {
            while waiting_polls() != 0 {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        };
        tokio::time::timeout(DEADLINE, abandoned)
            .await
            .expect("the handler stopped waiting");
    }

    #[tokio::test]
    async fn shutdown_ends_an_http1_long_poll_in_flight() {
        shutdown_ends_a_long_poll_in_flight(false).await;
    }

    #[tokio::test]
    async fn shutdown_ends_an_h2c_long_poll_in_flight() {
        shutdown_ends_a_long_poll_in_flight(true).await;
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_engine() {
        let engine = start("engine-10").await;
        let addr = engine.local_addr();
        assert_eq!(get(&engine, "/health").await.status, StatusCode::OK);

        drop(engine);
        assert_refuses_connections(addr).await;
    }

    #[tokio::test]
    async fn bind_rejects_a_name_that_is_not_a_header_value() {
        let error = DemoEngine::bind("bad\nname", SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect_err("a newline cannot go in a header");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn endpoints_by_path() {
        assert_eq!(Endpoint::from_path("/health"), Some(Endpoint::Health));
        assert_eq!(
            Endpoint::from_path("/api/v1/workflows"),
            Some(Endpoint::Workflows)
        );
        assert_eq!(
            Endpoint::from_path("/api/v1/workflows/abc"),
            Some(Endpoint::Workflow("abc"))
        );
        assert_eq!(
            Endpoint::from_path("/api/v1/tasks/poll"),
            Some(Endpoint::TaskPoll)
        );
        assert_eq!(Endpoint::from_path("/api/v1/workflows/"), None);
        assert_eq!(Endpoint::from_path("/api/v1/workflows/a/b"), None);
        assert_eq!(Endpoint::from_path("/health/"), None);
    }

    #[test]
    fn poll_wait_defaults_caps_and_decodes() {
        assert_eq!(poll_wait(None), Ok(DEFAULT_POLL_WAIT));
        assert_eq!(poll_wait(Some("other=1")), Ok(DEFAULT_POLL_WAIT));
        assert_eq!(poll_wait(Some("wait=2s")), Ok(Duration::from_secs(2)));
        assert_eq!(
            poll_wait(Some("x=1&wait=1m%2030s")),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(poll_wait(Some("wait=1m+30s")), Ok(Duration::from_secs(90)));
        assert_eq!(poll_wait(Some("wait=1h")), Ok(MAX_POLL_WAIT));
        assert!(poll_wait(Some("wait")).is_err());
        assert!(poll_wait(Some("wait=-1s")).is_err());
        assert!(poll_wait(Some("wait=%4")).is_err());
        assert!(poll_wait(Some("wait=%+1s")).is_err());
    }
}
