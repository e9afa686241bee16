//! gRPC through the real proxy with a real client and server: tonic and its
//! `grpc.health.v1.Health` service (unary `Check`, server-streaming `Watch`).
//! Calls over h2c and over TLS with ALPN h2, statuses, trailers, metadata and
//! deadlines passed on, a cancelled stream reaching the server, and the gRPC
//! statuses flowgate answers itself when it cannot forward a call.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls::{KeyFormat, TestCa};
use common::{Origin, full, h2c_client, refused_addr, start_proxy, wait_until};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// Bound on every single wait in this file.
const LIMIT: Duration = Duration::from_secs(5);

/// The service an engine's workers watch.
const ENGINE: &str = "flowgate.test.Engine";

/// What one call brought to the server besides its message.
#[derive(Debug, Clone)]
struct CallSeen {
    method: &'static str,
    tenant: Option<String>,
    grpc_timeout: Option<String>,
}

/// tonic's health service, recording the metadata of each call and counting
/// the `Watch` streams still open at the server.
struct Recorder {
    inner: HealthService,
    calls: Arc<Mutex<Vec<CallSeen>>>,
    open_watches: Arc<AtomicUsize>,
}

impl Recorder {
    fn record<T>(&self, method: &'static str, request: &Request<T>) {
        let metadata = request.metadata();
        let text = |name: &str| {
            metadata
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        self.calls.lock().expect("calls").push(CallSeen {
            method,
            tenant: text("x-tenant"),
            grpc_timeout: text("grpc-timeout"),
        });
    }
}

/// Counts one open `Watch` stream until the server drops it.
struct OpenWatch(Arc<AtomicUsize>);

impl OpenWatch {
    fn new(open: &Arc<AtomicUsize>) -> OpenWatch {
        open.fetch_add(1, Ordering::SeqCst);
        OpenWatch(Arc::clone(open))
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Recorder {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.record("Check", &request);
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.record("Watch", &request);
        let stream = self.inner.watch(request).await?.into_inner();
        let open = OpenWatch::new(&self.open_watches);
        // The guard lives as long as the stream the server is sending.
        let stream = stream.map(move |item| {
            let _open = &open;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A gRPC server (an engine) on 127.0.0.1:0, h2c or TLS.
struct GrpcEngine {
    addr: SocketAddr,
    reporter: HealthReporter,
    calls: Arc<Mutex<Vec<CallSeen>>>,
    open_watches: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl GrpcEngine {
    async fn start(tls: Option<Identity>) -> GrpcEngine {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind engine");
        let addr = listener.local_addr().expect("addr");
        let reporter = HealthReporter::new();
        reporter
            .set_service_status(ENGINE, ServingStatus::Serving)
            .await;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let open_watches = Arc::new(AtomicUsize::new(0));
        let service = Recorder {
            inner: HealthService::from_health_reporter(reporter.clone()),
            calls: Arc::clone(&calls),
            open_watches: Arc::clone(&open_watches),
        };
        let mut builder = Server::builder();
        if let Some(identity) = tls {
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(identity))
                .expect("engine TLS");
        }
        let stop = CancellationToken::new();
        let server = builder.serve_with_incoming_shutdown(
            HealthServer::new(service),
            TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
        tokio::spawn(server);
        GrpcEngine {
            addr,
            reporter,
            calls,
            open_watches,
            stop,
        }
    }

    fn calls(&self) -> Vec<CallSeen> {
        self.calls.lock().expect("calls").clone()
    }

    fn open_watches(&self) -> usize {
        self.open_watches.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A frontend `grpc` (plain, or TLS when `tls` is given) in front of backend
/// `engines` speaking h2 to `server`. `backend` is extra TOML for
/// `[backends.engines]` and its tables, `frontend` for `[frontends.grpc]`.
fn config(server: SocketAddr, tls: Option<&Pki>, frontend: &str, backend: &str) -> String {
    let tls = tls.map_or(String::new(), |pki| {
        format!(
            "[frontends.grpc.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            pki.cert.display(),
            pki.key.display()
        )
    });
    format!(
        "[frontends.grpc]\nbind = [\"127.0.0.1:0\"]\nbackend = \"engines\"\n{frontend}\n\n{tls}\n\
         [backends.engines]\nprotocol = \"h2\"\n{backend}\n\n\
         [[backends.engines.servers]]\nname = \"engine-1\"\naddress = \"{server}\"\n"
    )
}

/// The frontend's certificate (for grpc.example.com) and its CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: TestCa,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::root("flowgate test CA");
        let (cert, key) = ca
            .server_leaf(&["grpc.example.com"], KeyFormat::EcdsaPkcs8)
            .write(dir.path(), "grpc");
        Pki {
            _dir: dir,
            ca,
            cert,
            key,
        }
    }
}

/// A tonic channel to flowgate: h2c, or TLS (ALPN h2) for grpc.example.com.
async fn channel(addr: SocketAddr, tls: Option<&Pki>) -> Channel {
    let connect = async {
        match tls {
            None => {
                Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .connect()
                    .await
            }
            Some(pki) => {
                Channel::from_shared(format!("https://{addr}"))
                    .expect("uri")
                    .tls_config(
                        ClientTlsConfig::new()
                            .ca_certificate(Certificate::from_pem(pki.ca.pem()))
                            .domain_name("grpc.example.com"),
                    )
                    .expect("client TLS")
                    .connect()
                    .await
            }
        }
    };
    tokio::time::timeout(LIMIT, connect)
        .await
        .expect("connect in time")
        .expect("channel to flowgate")
}

fn check_request(service: &str) -> Request<HealthCheckRequest> {
    Request::new(HealthCheckRequest {
        service: service.to_string(),
    })
}

/// A call's outcome, bounded: a call that hangs fails the test.
async fn bounded<T>(call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("gRPC call answered in time")
}

fn serving(status: i32) -> WireStatus {
    WireStatus::try_from(status).expect("known serving status")
}

/// The next message of a Watch stream, bounded.
async fn next_status(stream: &mut tonic::Streaming<HealthCheckResponse>) -> WireStatus {
    let message = tokio::time::timeout(LIMIT, stream.message())
        .await
        .expect("watch message in time")
        .expect("watch message")
        .expect("stream still open");
    serving(message.status)
}

// ---- Calls that pass through ----

#[tokio::test]
async fn unary_calls_pass_with_status_metadata_and_deadline() {
    let engine = GrpcEngine::start(None).await;
    let pki = Pki::new();
    for tls in [None, Some(&pki)] {
        let proxy = start_proxy(&config(engine.addr, tls, "", "")).await;
        let addr = proxy.local_addr("grpc").expect("bound");
        let mut client = HealthClient::new(channel(addr, tls).await);
        let transport = if tls.is_some() { "TLS" } else { "h2c" };

        let mut request = check_request("");
        request
            .metadata_mut()
            .insert("x-tenant", "acme".parse().expect("metadata"));
        request.set_timeout(Duration::from_secs(3));
        let response = bounded(client.check(request))
            .await
            .unwrap_or_else(|status| panic!("{transport}: {status:?}"));
        assert_eq!(
            serving(response.into_inner().status),
            WireStatus::Serving,
            "{transport}"
        );
        let call = engine.calls().pop().expect("the call reached the engine");
        assert_eq!(call.method, "Check");
        assert_eq!(
            call.tenant.as_deref(),
            Some("acme"),
            "{transport}: metadata"
        );
        // grpc-timeout is "<digits><unit>"; it arrived, at most the 3s set.
        let timeout = call.grpc_timeout.expect("grpc-timeout reached the engine");
        let (digits, unit) = timeout.split_at(timeout.len() - 1);
        let value: u64 = digits.parse().expect("grpc-timeout digits");
        let micros = match unit {
            "H" => value * 3_600_000_000,
            "M" => value * 60_000_000,
            "S" => value * 1_000_000,
            "m" => value * 1_000,
            "u" => value,
            "n" => value / 1_000,
            other => panic!("grpc-timeout unit {other:?}"),
        };
        assert!(
            (1_000_000..=3_000_000).contains(&micros),
            "{transport}: grpc-timeout {timeout}"
        );

        // An error status and its message come back as the server sent them.
        let status = bounded(client.check(check_request("no.such.Service")))
            .await
            .expect_err("unknown service");
        assert_eq!(status.code(), Code::NotFound, "{transport}: {status:?}");
        assert_eq!(status.message(), "service not registered", "{transport}");
    }
}

/// A gRPC message frame: uncompressed, 4-byte length, then the bytes.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

#[tokio::test]
async fn grpc_trailers_pass_as_the_server_sent_them() {
    let engine = GrpcEngine::start(None).await;
    let proxy = start_proxy(&config(engine.addr, None, "", "")).await;
    let addr = proxy.local_addr("grpc").expect("bound");
    let call = |message: &'static [u8]| {
        let request = hyper::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(grpc_frame(message)))
            .expect("request");
        async move {
            let response = tokio::time::timeout(LIMIT, h2c_client().request(request))
                .await
                .expect("answer in time")
                .expect("response");
            let (parts, body) = response.into_parts();
            let collected = tokio::time::timeout(LIMIT, body.collect())
                .await
                .expect("body in time")
                .expect("body");
            (parts, collected.trailers().cloned(), collected.to_bytes())
        }
    };

    // Check(service = ""): one message, then grpc-status 0 in real trailers.
    let (parts, trailers, body) = call(b"").await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert!(parts.headers.get("grpc-status").is_none());
    // HealthCheckResponse { status: SERVING } is field 1 = 1.
    assert_eq!(body, grpc_frame(&[0x08, 0x01]));
    let trailers = trailers.expect("trailers after the message");
    assert_eq!(trailers["grpc-status"], "0");

    // Check(service = "x"): a trailers-only answer with status and message.
    let (parts, trailers, body) = call(&[0x0a, 0x01, b'x']).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["grpc-status"], "5");
    // grpc-message is percent-encoded on the wire (tonic encodes spaces too).
    assert_eq!(parts.headers["grpc-message"], "service%20not%20registered");
    assert!(body.is_empty());
    assert!(trailers.is_none());
}

#[tokio::test]
async fn server_streaming_watch_delivers_each_change() {
    let engine = GrpcEngine::start(None).await;
    let pki = Pki::new();
    for tls in [None, Some(&pki)] {
        let proxy = start_proxy(&config(engine.addr, tls, "", "")).await;
        let addr = proxy.local_addr("grpc").expect("bound");
        let mut client = HealthClient::new(channel(addr, tls).await);

        let mut stream = bounded(client.watch(check_request(ENGINE)))
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(next_status(&mut stream).await, WireStatus::Serving);
        engine
            .reporter
            .set_service_status(ENGINE, ServingStatus::NotServing)
            .await;
        assert_eq!(next_status(&mut stream).await, WireStatus::NotServing);
        engine
            .reporter
            .set_service_status(ENGINE, ServingStatus::Serving)
            .await;
        assert_eq!(next_status(&mut stream).await, WireStatus::Serving);
    }
}

#[tokio::test]
async fn a_cancelled_watch_ends_at_the_server() {
    let engine = GrpcEngine::start(None).await;
    let pki = Pki::new();
    for tls in [None, Some(&pki)] {
        let proxy = start_proxy(&config(engine.addr, tls, "", "")).await;
        let addr = proxy.local_addr("grpc").expect("bound");
        let mut client = HealthClient::new(channel(addr, tls).await);

        let mut stream = bounded(client.watch(check_request(ENGINE)))
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(next_status(&mut stream).await, WireStatus::Serving);
        assert_eq!(engine.open_watches(), 1);
        // The client gives up on the stream (RST_STREAM CANCEL to flowgate):
        // flowgate cancels its own stream to the engine.
        drop(stream);
        wait_until(LIMIT, "the engine to see the watch cancelled", || {
            engine.open_watches() == 0
        })
        .await;
        // The connection itself stays usable.
        let response = bounded(client.check(check_request("")))
            .await
            .expect("check");
        assert_eq!(serving(response.into_inner().status), WireStatus::Serving);
    }
}

#[tokio::test]
async fn grpc_over_tls_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let internal = TestCa::root("internal CA");
    let engine_leaf = internal.server_leaf(&["engine.internal"], KeyFormat::EcdsaPkcs8);
    let identity = Identity::from_pem(engine_leaf.chain_pem(), &engine_leaf.key_pem);
    let engine = GrpcEngine::start(Some(identity)).await;
    let ca = internal.write(dir.path(), "internal.pem");
    let pki = Pki::new();
    let proxy = start_proxy(&config(
        engine.addr,
        Some(&pki),
        "",
        &format!(
            "[backends.engines.tls]\nca = \"{}\"\nserver_name = \"engine.internal\"\n",
            ca.display()
        ),
    ))
    .await;
    let addr = proxy.local_addr("grpc").expect("bound");
    let mut client = HealthClient::new(channel(addr, Some(&pki)).await);

    let response = bounded(client.check(check_request(ENGINE)))
        .await
        .expect("check over TLS to flowgate and to the engine");
    assert_eq!(serving(response.into_inner().status), WireStatus::Serving);
    let mut stream = bounded(client.watch(check_request(ENGINE)))
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next_status(&mut stream).await, WireStatus::Serving);
    engine
        .reporter
        .set_service_status(ENGINE, ServingStatus::NotServing)
        .await;
    assert_eq!(next_status(&mut stream).await, WireStatus::NotServing);
}

// ---- Statuses flowgate answers itself ----

#[tokio::test]
async fn a_dead_server_is_unavailable_at_once() {
    let dead = refused_addr();
    let pki = Pki::new();
    for tls in [None, Some(&pki)] {
        let proxy = start_proxy(&config(
            dead,
            tls,
            "",
            "[backends.engines.health]\ncheck = \"none\"\n",
        ))
        .await;
        let addr = proxy.local_addr("grpc").expect("bound");
        let mut client = HealthClient::new(channel(addr, tls).await);

        let started = Instant::now();
        let status = bounded(client.check(check_request("")))
            .await
            .expect_err("dead server");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "bad gateway");
        let status = bounded(client.watch(check_request(ENGINE)))
            .await
            .expect_err("dead server");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    // Checked and down: no server at all, UNAVAILABLE as well.
    let proxy = start_proxy(&config(dead, None, "", "")).await;
    let addr = proxy.local_addr("grpc").expect("bound");
    let mut client = HealthClient::new(channel(addr, None).await);
    let status = bounded(client.check(check_request("")))
        .await
        .expect_err("no server");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "no server available");
}

#[tokio::test]
async fn a_server_without_an_answer_is_deadline_exceeded() {
    // An engine that accepts the call and never answers it.
    let stuck = Origin::start(|_| async {
        std::future::pending::<()>().await;
        hyper::Response::new(common::empty())
    })
    .await;
    let proxy = start_proxy(&config(
        stuck.addr,
        None,
        "",
        "[backends.engines.timeouts]\nresponse = \"200ms\"\n",
    ))
    .await;
    let addr = proxy.local_addr("grpc").expect("bound");
    let mut client = HealthClient::new(channel(addr, None).await);
    let started = Instant::now();
    let status = bounded(client.check(check_request("")))
        .await
        .expect_err("stuck server");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_refused_client_gets_permission_denied() {
    let engine = GrpcEngine::start(None).await;
    let proxy = start_proxy(&config(engine.addr, None, "deny = [\"127.0.0.0/8\"]", "")).await;
    let addr = proxy.local_addr("grpc").expect("bound");
    let mut client = HealthClient::new(channel(addr, None).await);
    let status = bounded(client.check(check_request("")))
        .await
        .expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        engine.calls().is_empty(),
        "the call never reached the engine"
    );
}
