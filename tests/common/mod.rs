//! Shared test harness: real origin servers on 127.0.0.1:0, flowgate started
//! in-process (`start_proxy`) or as the real binary (`FlowgateProcess`), real
//! clients, and bounded waits instead of sleeps.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body from bytes, for origin responses and client requests.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Waits until `check` holds, polling every 5 ms, for at most `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A real HTTP/1.1 + h2c origin server on 127.0.0.1:0 that answers with
/// `handler` and counts the requests it received.
pub struct Origin {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Origin {
    pub async fn start<F, Fut>(handler: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Origin::start_counting_connections(handler).await.0
    }

    /// An origin that answers 200 with its name as the body.
    pub async fn named(name: &'static str) -> Origin {
        Origin::start(move |_| async move { Response::new(full(name)) }).await
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops open connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Renders `[[backends.NAME.servers]]` entries for origins, named s0, s1, ...
pub fn servers_toml(backend: &str, addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            format!("[[backends.{backend}.servers]]\nname = \"s{i}\"\naddress = \"{addr}\"\n\n")
        })
        .collect()
}

/// Parses config text (as if read from `test.toml`) and starts flowgate
/// in-process. Panics with the config errors when it is invalid.
pub async fn start_proxy(toml: &str) -> flowgate::supervisor::Proxy {
    let config = flowgate::config::parse(toml, Path::new("test.toml"))
        .unwrap_or_else(|errors| panic!("config:\n{errors}\n---\n{toml}"));
    flowgate::supervisor::Proxy::start(config)
        .await
        .expect("proxy starts")
}

/// A pooled HTTP/1.1 client (keep-alive), as a user's client would be.
pub fn client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2c_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET `http://addr{path}`; returns the status and the body as text.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = client()
        .get(format!("http://{addr}{path}").parse().expect("uri"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Writes raw bytes on a new connection and reads until the server closes it or
/// `limit` passes; returns what was read.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The real `flowgate` binary, run with a config file in a temporary directory.
/// Its stderr is collected; the listening addresses come from its log.
pub struct FlowgateProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl FlowgateProcess {
    /// Writes `toml` to `flowgate.toml` in a new temp dir and runs
    /// `flowgate run --config` on it.
    pub fn run(toml: &str) -> FlowgateProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("flowgate.toml");
        std::fs::write(&config, toml).expect("write config");
        Self::spawn(dir, config, &["run", "--config"])
    }

    fn spawn(dir: tempfile::TempDir, config: PathBuf, args: &[&str]) -> FlowgateProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flowgate"));
        command.args(args).arg(&config);
        Self::run_command(command, dir, config)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits (bounded) for a log line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.log().into_iter().find(|line| line.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {limit:?}; log:\n{}",
                self.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The address a frontend listens on, from the `listening` log line.
    pub async fn frontend_addr(&self, frontend: &str) -> SocketAddr {
        let line = self
            .wait_for_log(
                &format!("listening frontend={frontend} "),
                Duration::from_secs(10),
            )
            .await;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("addr in listening line");
        addr.parse().expect("socket address")
    }

    /// Sends a signal (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "flowgate did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Resident memory of the process in KiB (VmRSS from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for FlowgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- Raw sockets: client source addresses, bounded reads, a tcp echo origin ----

/// How a bounded read on a raw connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer closed: EOF, or a reset after whatever it had sent.
    Closed,
    /// Still open when the time limit passed.
    Open,
}

/// Reads until the peer closes the connection or `limit` passes; returns what
/// was read and how it ended. A reset counts as closed (a server that closes
/// with unread client bytes resets the connection after its last answer).
pub async fn read_until_close(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> (Vec<u8>, ReadEnd) {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (data, ReadEnd::Open),
            Ok(Ok(0) | Err(_)) => return (data, ReadEnd::Closed),
            Ok(Ok(n)) => data.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one HTTP/1.1 response with a `content-length` body off a connection
/// that stays open (keep-alive), within `limit`. `None` when no complete
/// response arrived in time or the connection closed first.
pub async fn read_response(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut data = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&data[..end + 4 + length]).into_owned());
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => data.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Opens `count` keep-alive connections to `addr` one after another, each
/// answered 200 with `body` to a `GET /` before the next one opens, and
/// returns them still open.
pub async fn held_connections(
    addr: SocketAddr,
    count: usize,
    body: &str,
) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut held = Vec::new();
    for n in 0..count {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = b"GET / HTTP/1.1\r\nhost: flowgate.test\r\n\r\n";
        stream.write_all(request).await.expect("request");
        let response = read_response(&mut stream, Duration::from_secs(5)).await;
        let response = response.unwrap_or_else(|| panic!("no response on connection {n}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "connection {n}: {response}"
        );
        assert!(response.ends_with(body), "connection {n}: {response}");
        held.push(stream);
    }
    held
}

/// Connects to `addr` from the loopback address `source` (e.g. 127.0.0.2), to
/// test allow/deny lists without leaving loopback.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("client socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind client source address");
    socket.connect(addr).await.expect("connect from source")
}

/// A loopback address nothing listens on (bound, then released).
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    listener.local_addr().expect("probe addr")
}

/// A tcp echo origin on 127.0.0.1:0: echoes every byte and, once the client has
/// finished sending (EOF), closes its side too. Counts sessions.
pub struct EchoOrigin {
    pub addr: SocketAddr,
    pub sessions: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl EchoOrigin {
    pub async fn start() -> EchoOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        Self::serve(listener)
    }

    /// Restarts an echo server on the address a stopped one had.
    pub async fn start_on(addr: SocketAddr) -> EchoOrigin {
        Self::serve(bind_again(addr).await)
    }

    fn serve(listener: TcpListener) -> EchoOrigin {
        use tokio::io::AsyncWriteExt;
        let addr = listener.local_addr().expect("echo addr");
        let sessions = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (count, token) = (Arc::clone(&sessions), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                let (count, token) = (Arc::clone(&count), token.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let echo = async {
                        let mut buf = [0u8; 16 * 1024];
                        let mut counted = false;
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    // A session counts from its first byte; a
                                    // connection without data (a tcp check) is none.
                                    if !counted {
                                        counted = true;
                                        count.fetch_add(1, Ordering::SeqCst);
                                    }
                                    if stream.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        let _ = stream.shutdown().await;
                    };
                    tokio::select! {
                        () = echo => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        EchoOrigin {
            addr,
            sessions,
            stop,
        }
    }

    pub fn count(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops open sessions.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for EchoOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Origin {
    /// Like [`Origin::start`], and also counts the TCP connections the origin
    /// accepted (to see how a proxy reuses its server connections).
    pub async fn start_counting_connections<F, Fut>(handler: F) -> (Origin, Arc<AtomicUsize>)
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        serve_origin(
            listener,
            handler,
            Arc::clone(&requests),
            Arc::clone(&connections),
            stop.clone(),
        );
        (
            Origin {
                addr,
                requests,
                stop,
            },
            connections,
        )
    }
}

/// An address on 127.0.0.1 where nothing listens: a port that was bound, then
/// released, so connecting to it is refused.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    listener.local_addr().expect("probe addr")
}

/// Serves `handler` on `listener` like [`Origin::start`] does, until `stop`.
fn serve_origin<F, Fut>(
    listener: TcpListener,
    handler: F,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    stop: CancellationToken,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                () = stop.cancelled() => return,
            };
            connections.fetch_add(1, Ordering::SeqCst);
            let (handler, count, token) =
                (Arc::clone(&handler), Arc::clone(&requests), stop.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new());
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = token.cancelled() => {}
                }
            });
        }
    });
}

/// Binds `addr`, retrying for a bounded time while the port is still held (a
/// stopped server on that port releases it asynchronously).
async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("cannot bind {addr} again: {err}"),
        }
    }
}

/// A server that reads one whole HTTP/1.1 request per connection (head and a
/// `Content-Length` body), counts it as delivered, then resets the connection
/// without answering: a server that crashed while handling the request.
pub struct ResettingOrigin {
    pub addr: SocketAddr,
    pub deliveries: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl ResettingOrigin {
    pub async fn start() -> ResettingOrigin {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind resetting origin");
        let addr = listener.local_addr().expect("addr");
        let deliveries = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (count, token) = (Arc::clone(&deliveries), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    let complete = loop {
                        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                            let length: usize = head
                                .lines()
                                .find_map(|line| line.strip_prefix("content-length:"))
                                .and_then(|value| value.trim().parse().ok())
                                .unwrap_or(0);
                            if seen.len() >= end + 4 + length {
                                break true;
                            }
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break false,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    };
                    if complete {
                        count.fetch_add(1, Ordering::SeqCst);
                        // SO_LINGER 0: the close sends a RST.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                    drop(stream);
                });
            }
        });
        ResettingOrigin {
            addr,
            deliveries,
            stop,
        }
    }

    pub fn count(&self) -> usize {
        self.deliveries.load(Ordering::SeqCst)
    }
}

impl Drop for ResettingOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One health check an [`Engine`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSeen {
    /// The status the engine answered.
    pub answered: u16,
    /// The HTTP version the check came in.
    pub version: hyper::Version,
    /// The answer came from [`Engine::script`].
    pub scripted: bool,
    /// The server's health in the proxy when the check arrived (once
    /// [`Engine::observe`] was called). Checks of one server run one after the
    /// other, so this is the outcome of every earlier check: transitions can be
    /// placed on exact checks without timing anything.
    pub state: Option<flowgate::upstream::Health>,
}

/// An engine instance: answers its check path with a status the test controls
/// (a fixed one, or a script of answers for the next checks), answers any other
/// path 200 with its name, and keeps checks and traffic apart.
pub struct Engine {
    pub origin: Origin,
    status: Arc<std::sync::atomic::AtomicU16>,
    script: Arc<Mutex<std::collections::VecDeque<u16>>>,
    checks: Arc<Mutex<Vec<CheckSeen>>>,
    traffic: Arc<AtomicUsize>,
    check_delay: Arc<Mutex<Duration>>,
    observed: Arc<std::sync::OnceLock<Arc<flowgate::upstream::ServerState>>>,
}

impl Engine {
    pub async fn start(name: &'static str, check_path: &'static str, status: u16) -> Engine {
        Self::launch(None, name, check_path, status).await
    }

    /// Restarts an engine on the address a stopped one had.
    pub async fn start_on(
        addr: SocketAddr,
        name: &'static str,
        check_path: &'static str,
        status: u16,
    ) -> Engine {
        Self::launch(Some(addr), name, check_path, status).await
    }

    async fn launch(
        addr: Option<SocketAddr>,
        name: &'static str,
        check_path: &'static str,
        status: u16,
    ) -> Engine {
        let status = Arc::new(std::sync::atomic::AtomicU16::new(status));
        let script = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let checks = Arc::new(Mutex::new(Vec::new()));
        let traffic = Arc::new(AtomicUsize::new(0));
        let check_delay = Arc::new(Mutex::new(Duration::ZERO));
        let observed = Arc::new(std::sync::OnceLock::<Arc<flowgate::upstream::ServerState>>::new());
        let handler = {
            let (status, script, checks, traffic, check_delay, observed) = (
                Arc::clone(&status),
                Arc::clone(&script),
                Arc::clone(&checks),
                Arc::clone(&traffic),
                Arc::clone(&check_delay),
                Arc::clone(&observed),
            );
            move |request: Request<Incoming>| {
                let answer = if request.uri().path() == check_path {
                    let scripted = script.lock().expect("script").pop_front();
                    let answered = scripted.unwrap_or_else(|| status.load(Ordering::SeqCst));
                    checks.lock().expect("checks").push(CheckSeen {
                        answered,
                        version: request.version(),
                        scripted: scripted.is_some(),
                        state: observed.get().map(|state| state.health()),
                    });
                    let mut response = Response::new(empty());
                    *response.status_mut() =
                        hyper::StatusCode::from_u16(answered).expect("status code");
                    (response, *check_delay.lock().expect("delay"))
                } else {
                    traffic.fetch_add(1, Ordering::SeqCst);
                    (Response::new(full(name)), Duration::ZERO)
                };
                async move {
                    let (response, delay) = answer;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    response
                }
            }
        };
        let origin = match addr {
            Some(addr) => Origin::start_on(addr, handler).await,
            None => Origin::start(handler).await,
        };
        Engine {
            origin,
            status,
            script,
            checks,
            traffic,
            check_delay,
            observed,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.origin.addr
    }

    /// The answer to checks from now on (after any scripted ones).
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Answers for the next checks, in order; then the status again.
    pub fn script(&self, answers: &[u16]) {
        self.script
            .lock()
            .expect("script")
            .extend(answers.iter().copied());
    }

    /// Holds each check answer this long (a slow health endpoint).
    pub fn delay_checks(&self, delay: Duration) {
        *self.check_delay.lock().expect("delay") = delay;
    }

    /// Every check received so far, in order.
    pub fn checks(&self) -> Vec<CheckSeen> {
        self.checks.lock().expect("checks").clone()
    }

    /// Requests other than checks.
    pub fn traffic(&self) -> usize {
        self.traffic.load(Ordering::SeqCst)
    }

    /// Records, with each later check, the health `state` had when it arrived.
    pub fn observe(&self, state: Arc<flowgate::upstream::ServerState>) {
        assert!(self.observed.set(state).is_ok(), "observed twice");
    }

    /// Stops accepting and drops open connections: the engine died.
    pub fn stop(&self) {
        self.origin.stop();
    }
}

/// The live state of server `index` (file order) of `backend`.
pub fn server_state(
    proxy: &flowgate::supervisor::Proxy,
    backend: &str,
    index: usize,
) -> Arc<flowgate::upstream::ServerState> {
    Arc::clone(&server(proxy, backend, index).state)
}

/// Server `index` (file order) of `backend` in the current snapshot.
pub fn server(
    proxy: &flowgate::supervisor::Proxy,
    backend: &str,
    index: usize,
) -> Arc<flowgate::upstream::Server> {
    let runtime = proxy.runtime().load();
    let backend = runtime.backend(backend).expect("backend");
    Arc::clone(&backend.servers[index])
}

/// Waits (bounded) until nothing accepts connections on `addr` any more.
pub async fn wait_refused(addr: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// GET `http://addr{path}` on a shared (keep-alive) client; the status and the
/// body as text. Panics when the request fails without an answer.
pub async fn fetch(client: &HttpClient, addr: SocketAddr, path: &str) -> (u16, String) {
    let response = client
        .get(format!("http://{addr}{path}").parse().expect("uri"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

impl Origin {
    /// Like [`Origin::start`], on a given address: restarts a stopped origin on
    /// the port it had, as a restarted engine comes back on its address.
    pub async fn start_on<F, Fut>(addr: SocketAddr, handler: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = bind_again(addr).await;
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        serve_origin(
            listener,
            handler,
            Arc::clone(&requests),
            Arc::default(),
            stop.clone(),
        );
        Origin {
            addr,
            requests,
            stop,
        }
    }
}

// ---- The binary with a config laid out by the test, extra environment ----

impl FlowgateProcess {
    /// Runs `flowgate run --config CONFIG` on a config the test laid out in `dir`
    /// itself (symlinks, ...), with extra environment variables.
    pub fn run_in(
        dir: tempfile::TempDir,
        config: PathBuf,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> FlowgateProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flowgate"));
        command
            .args(["run", "--config"])
            .arg(&config)
            .envs(env.iter().copied());
        Self::run_command(command, dir, config)
    }

    /// Runs a prepared command whose process becomes flowgate (for example
    /// `sh -c 'exec flowgate ...'`), collecting its stderr like
    /// [`FlowgateProcess::run`].
    pub fn run_command(
        mut command: Command,
        dir: tempfile::TempDir,
        config: PathBuf,
    ) -> FlowgateProcess {
        let mut child = command
            .env("FLOWGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flowgate");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        FlowgateProcess {
            child,
            dir,
            config,
            log,
        }
    }
}

pub mod tls;
