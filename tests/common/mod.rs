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
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let handler = Arc::new(handler);
        let (count, token) = (Arc::clone(&requests), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                let (handler, count, token) =
                    (Arc::clone(&handler), Arc::clone(&count), token.clone());
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
        Origin {
            addr,
            requests,
            stop,
        }
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(args)
            .arg(&config)
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
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
                count.fetch_add(1, Ordering::SeqCst);
                let token = token.clone();
                tokio::spawn(async move {
                    let echo = async {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
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
        let handler = Arc::new(handler);
        let (count, accepted, token) = (
            Arc::clone(&requests),
            Arc::clone(&connections),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (handler, count, token) =
                    (Arc::clone(&handler), Arc::clone(&count), token.clone());
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
