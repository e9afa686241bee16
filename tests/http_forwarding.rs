//! Http-mode forwarding through the real proxy, as clients and origins see it:
//! forwarded headers, HTTP/1.1 <-> h2c in both directions, trailers, upgrade
//! tunnels, `Expect: 100-continue`, routes, flowgate's own error answers and
//! keep-alive reuse of server connections.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Origin, client, full, h2c_client, raw_exchange, refused_addr, start_proxy};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on every single network wait in this file.
const LIMIT: Duration = Duration::from_secs(5);

/// A frontend `web` on 127.0.0.1:0 in front of backend `pool` with one server.
/// `backend` is extra TOML for `[backends.pool]`.
fn one_server(backend: &str, server: SocketAddr) -> String {
    format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\n{backend}\n\n\
         [[backends.pool.servers]]\nname = \"s0\"\naddress = \"{server}\"\n"
    )
}

/// What an echo origin received: the request's version, target and headers.
#[derive(Debug, serde::Deserialize)]
struct Seen {
    version: String,
    uri: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn parse(body: &str) -> Seen {
        serde_json::from_str(body).unwrap_or_else(|err| panic!("echo body {body:?}: {err}"))
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of `name`, if the origin got the header at all.
    fn one(&self, name: &str) -> Option<&str> {
        let values = self.all(name);
        assert!(values.len() <= 1, "{name} more than once: {values:?}");
        values.first().copied()
    }
}

/// An origin that answers 200 with what it received, as JSON ([`Seen`]).
async fn echo_origin() -> Origin {
    Origin::start(|request: Request<Incoming>| async move {
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let seen = serde_json::json!({
            "version": format!("{:?}", request.version()),
            "uri": request.uri().to_string(),
            "headers": headers,
        });
        Response::new(full(seen.to_string()))
    })
    .await
}

/// A response read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Names lowercased, in wire order.
    headers: Vec<(String, String)>,
    body: String,
}

impl RawResponse {
    fn parse(text: &str) -> RawResponse {
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The data of a chunked body (trailers ignored).
fn dechunk(mut rest: &str) -> String {
    let mut data = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if size == 0 {
            break;
        }
        data.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    data
}

/// Sends one raw request (which should say `Connection: close`) and parses the
/// answer.
async fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    RawResponse::parse(&raw_exchange(addr, request.as_bytes(), LIMIT).await)
}

/// Reads from `stream` until a whole response head has arrived (byte by byte,
/// so nothing after the head is consumed); bounded by [`LIMIT`].
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let read = tokio::time::timeout(LIMIT, async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read head");
            assert!(
                n > 0,
                "connection closed after {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no response head within {LIMIT:?}; got {:?}",
        String::from_utf8_lossy(&head)
    );
    String::from_utf8_lossy(&head).into_owned()
}

/// A body of fixed frames (data and trailers), for origins that send trailers.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

async fn text(response: Response<Incoming>) -> String {
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

// 1. Forwarded headers.

#[tokio::test]
async fn origin_sees_forwarded_headers_and_no_hop_by_hop_headers() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let answer = raw_request(
        addr,
        "GET /echo?x=1 HTTP/1.1\r\n\
         Host: Engine.Example.com:8080\r\n\
         X-Forwarded-For: 203.0.113.7\r\n\
         Connection: close, X-Secret\r\n\
         X-Secret: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: gzip\r\n\
         Upgrade: h2c\r\n\
         X-End-To-End: kept\r\n\
         Accept: text/plain\r\n\
         \r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = Seen::parse(&answer.body);
    assert_eq!(seen.uri, "/echo?x=1");
    assert_eq!(seen.one("host"), Some("Engine.Example.com:8080"));
    assert_eq!(seen.one("x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.one("x-forwarded-host"),
        Some("Engine.Example.com:8080")
    );
    let id = seen.one("x-request-id").expect("x-request-id set");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "request id {id:?} is not 32 hex digits"
    );
    for hop in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(
            seen.all(hop),
            Vec::<&str>::new(),
            "{hop} reached the origin"
        );
    }
    assert_eq!(seen.one("x-end-to-end"), Some("kept"));
    assert_eq!(seen.one("accept"), Some("text/plain"));

    // A second request: the client's request id is kept, "TE: trailers" passes,
    // and without an incoming X-Forwarded-For the client address starts it.
    let answer = raw_request(
        addr,
        "GET /echo HTTP/1.1\r\n\
         Host: engine.example.com\r\n\
         X-Request-Id: client-chosen-id-42\r\n\
         TE: trailers\r\n\
         Connection: close\r\n\
         \r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = Seen::parse(&answer.body);
    assert_eq!(seen.one("x-request-id"), Some("client-chosen-id-42"));
    assert_eq!(seen.one("te"), Some("trailers"));
    assert_eq!(seen.one("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.one("host"), Some("engine.example.com"));

    // Generated ids differ from request to request.
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..2 {
            let answer = raw_request(
                addr,
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
            let seen = Seen::parse(&answer.body);
            ids.push(seen.one("x-request-id").expect("id").to_owned());
        }
        ids
    };
    assert_ne!(ids[0], ids[1]);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn repeated_header_lines_are_handled_as_one_list() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    // RFC 9110 5.3: a field sent on several lines means the comma-joined list.
    let answer = raw_request(
        addr,
        "GET / HTTP/1.1\r\n\
         Host: engine\r\n\
         X-Forwarded-For: 203.0.113.7\r\n\
         X-Forwarded-For: 198.51.100.2\r\n\
         Connection: close\r\n\
         Connection: X-Secret\r\n\
         X-Secret: 1\r\n\
         TE: trailers\r\n\
         TE: gzip\r\n\
         \r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = Seen::parse(&answer.body);
    assert_eq!(
        seen.all("x-forwarded-for").join(", "),
        "203.0.113.7, 198.51.100.2, 127.0.0.1"
    );
    assert_eq!(
        seen.all("x-secret"),
        Vec::<&str>::new(),
        "named by the 2nd Connection line"
    );
    assert_eq!(seen.all("connection"), Vec::<&str>::new());
    assert_eq!(seen.all("te"), vec!["trailers"]);
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Answers every request on every connection with a fixed response full of
/// hop-by-hop headers, then closes the connection.
async fn hop_by_hop_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Health checks connect and close without a request.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(LIMIT, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let response = "HTTP/1.1 200 OK\r\n\
                                Connection: close, X-Resp-Secret\r\n\
                                X-Resp-Secret: 1\r\n\
                                Keep-Alive: timeout=5, max=100\r\n\
                                Proxy-Connection: keep-alive\r\n\
                                Upgrade: h2c\r\n\
                                X-End-To-End: kept\r\n\
                                Content-Type: text/plain\r\n\
                                Transfer-Encoding: chunked\r\n\
                                \r\n\
                                5\r\nhello\r\n0\r\n\r\n";
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn client_sees_no_hop_by_hop_headers_from_the_origin() {
    let origin = hop_by_hop_origin().await;
    let proxy = start_proxy(&one_server("", origin)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let response = client()
        .get(format!("http://{addr}/").parse().expect("uri"))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    for hop in [
        "connection",
        "x-resp-secret",
        "keep-alive",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            !headers.contains_key(hop),
            "{hop} reached the client: {headers:?}"
        );
    }
    assert_eq!(
        headers.get("x-end-to-end").map(|v| v.as_bytes()),
        Some(&b"kept"[..])
    );
    assert_eq!(text(response).await, "hello");
    proxy.shutdown(Duration::from_secs(1)).await;
}

// 2. HTTP/1.1 <-> h2c.

#[tokio::test]
async fn h2c_client_reaches_http1_origin_with_authority_as_host() {
    let origin = echo_origin().await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    let request = Request::get("http://engine.example.com:8443/h2?q=1")
        .body(common::empty())
        .expect("request");
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = Seen::parse(&text(response).await);
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.uri, "/h2?q=1");
    assert_eq!(seen.one("host"), Some("engine.example.com:8443"));
    assert_eq!(
        seen.one("x-forwarded-host"),
        Some("engine.example.com:8443")
    );
    assert_eq!(seen.one("x-forwarded-proto"), Some("http"));
    drop(sender);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http1_client_reaches_h2c_origin_through_h2_backend() {
    let origin = Origin::start(|request: Request<Incoming>| async move {
        let answer = format!(
            "{:?} authority={}",
            request.version(),
            request.uri().authority().map_or("none", |a| a.as_str())
        );
        let mut response = Response::new(full(answer));
        if request.version() != Version::HTTP_2 {
            *response.status_mut() = StatusCode::HTTP_VERSION_NOT_SUPPORTED;
        }
        response
    })
    .await;
    let proxy = start_proxy(&one_server("protocol = \"h2\"", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let request = Request::get(format!("http://{addr}/grpc.Service/Method"))
        .header("host", "engine.example.com:8080")
        .body(common::empty())
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(
        text(response).await,
        "HTTP/2.0 authority=engine.example.com:8080"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

// 3. Trailers.

#[tokio::test]
async fn h2_trailers_reach_the_h2c_client() {
    let origin = Origin::start(|_request: Request<Incoming>| async move {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert("grpc-message", http::HeaderValue::from_static("done"));
        let frames = Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"first ")),
            Frame::data(Bytes::from_static(b"second")),
            Frame::trailers(trailers),
        ]));
        let mut response = Response::new(frames.boxed());
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    })
    .await;
    let proxy = start_proxy(&one_server("protocol = \"h2\"", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let request = Request::post(format!("http://{addr}/pkg.Engine/Start"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(full("request"))
        .expect("request");
    let response = tokio::time::timeout(LIMIT, h2c_client().request(request))
        .await
        .expect("answer in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reached the client");
    assert_eq!(collected.to_bytes(), "first second");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"done"[..])
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http1_chunked_request_trailers_reach_the_origin() {
    let origin = Origin::start(|request: Request<Incoming>| async move {
        let collected = request.into_body().collect().await.expect("request body");
        let checksum = collected
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "none".to_owned());
        let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
        Response::new(full(format!("body={body} checksum={checksum}")))
    })
    .await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let answer = raw_request(
        addr,
        "POST /upload HTTP/1.1\r\n\
         Host: engine\r\n\
         Transfer-Encoding: chunked\r\n\
         Trailer: X-Checksum\r\n\
         Connection: close\r\n\
         \r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "body=hello world checksum=abc123");
    proxy.shutdown(Duration::from_secs(1)).await;
}

// 4. Upgrade tunnel.

/// Answers `Upgrade: echo` with 101 and then echoes every byte on the upgraded
/// connection.
async fn upgrade_echo_origin() -> Origin {
    Origin::start(|mut request: Request<Incoming>| async move {
        let wants_echo = request
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"echo"));
        if !wants_echo {
            let mut response = Response::new(full("upgrade: echo expected"));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            // Ends when the tunnel closes.
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut response = Response::new(common::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("connection", http::HeaderValue::from_static("Upgrade"));
        response
            .headers_mut()
            .insert("upgrade", http::HeaderValue::from_static("echo"));
        response
    })
    .await
}

#[tokio::test]
async fn upgrade_tunnel_carries_bytes_both_ways() {
    let origin = upgrade_echo_origin().await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: engine\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .expect("write upgrade request");
    let head = read_head(&mut stream).await;
    let response = RawResponse::parse(&head);
    assert_eq!(response.status, 101, "{head}");
    assert_eq!(response.header("upgrade"), Some("echo"), "{head}");
    assert!(
        response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );

    for message in [&b"ping"[..], b"second message"] {
        stream.write_all(message).await.expect("write in tunnel");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read echo");
        assert_eq!(echoed, message);
    }
    drop(stream);
    assert!(
        proxy.shutdown(Duration::from_secs(2)).await,
        "tunnel still open after the client closed"
    );
}

// 5. Expect: 100-continue.

#[tokio::test]
async fn expect_100_continue_gets_interim_answer_then_final() {
    let origin = Origin::start(|request: Request<Incoming>| async move {
        let expect = request.headers().contains_key("expect");
        let bytes = request
            .into_body()
            .collect()
            .await
            .expect("request body")
            .to_bytes();
        Response::new(full(format!(
            "received {} bytes, expect={expect}",
            bytes.len()
        )))
    })
    .await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let body = b"workflow-input-0123456789";
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: engine\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    let interim = read_head(&mut stream).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "expected 100 Continue, got {interim:?}"
    );

    stream.write_all(body).await.expect("write body");
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut rest))
        .await
        .expect("final answer in time")
        .expect("read final answer");
    let answer = RawResponse::parse(&String::from_utf8_lossy(&rest));
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body,
        format!("received {} bytes, expect=false", body.len())
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

// 6. Routes.

async fn routed(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    tenant: Option<&str>,
) -> String {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", host);
    if let Some(tenant) = tenant {
        request = request.header("x-tenant", tenant);
    }
    let response = client()
        .request(request.body(common::empty()).expect("request"))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    text(response).await
}

#[tokio::test]
async fn routes_pick_the_first_matching_backend_else_the_default() {
    let origins = [
        Origin::named("hosted").await,
        Origin::named("writers").await,
        Origin::named("tenant").await,
        Origin::named("default").await,
    ];
    let mut toml = String::from(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"default\"\n\n\
         [[frontends.web.routes]]\nhost = \"Engine.Example.com\"\nbackend = \"hosted\"\n\n\
         [[frontends.web.routes]]\npath_prefix = \"/api/\"\nmethods = [\"POST\", \"PUT\"]\nbackend = \"writers\"\n\n\
         [[frontends.web.routes]]\npath_prefix = \"/api/\"\nheaders = { \"X-Tenant\" = \"acme\" }\nbackend = \"tenant\"\n\n",
    );
    for (name, origin) in ["hosted", "writers", "tenant", "default"]
        .iter()
        .zip(&origins)
    {
        toml.push_str(&format!(
            "[[backends.{name}.servers]]\nname = \"{name}-1\"\naddress = \"{}\"\n\n",
            origin.addr
        ));
    }
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");

    let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
        // Host: exact, case-insensitive, port ignored.
        ("GET", "engine.example.com", "/", None, "hosted"),
        (
            "GET",
            "ENGINE.example.COM:9999",
            "/anything",
            None,
            "hosted",
        ),
        ("GET", "engine.example.org", "/", None, "default"),
        ("GET", "sub.engine.example.com", "/", None, "default"),
        // First match wins: the host route comes before the method route.
        ("POST", "engine.example.com", "/api/start", None, "hosted"),
        // Prefix and method.
        ("POST", "other", "/api/start", None, "writers"),
        ("PUT", "other", "/api/", None, "writers"),
        ("DELETE", "other", "/api/start", None, "default"),
        ("POST", "other", "/apix", None, "default"),
        // The method route comes before the header route.
        ("POST", "other", "/api/start", Some("acme"), "writers"),
        ("GET", "other", "/api/list", Some("acme"), "tenant"),
        ("GET", "other", "/api/list", Some("other"), "default"),
        ("GET", "other", "/api/list", None, "default"),
        ("GET", "other", "/list", Some("acme"), "default"),
    ];
    for &(method, host, path, tenant, want) in cases {
        assert_eq!(
            routed(addr, method, host, path, tenant).await,
            want,
            "{method} {path} Host: {host} X-Tenant: {tenant:?}"
        );
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

// 7. flowgate's own error answers.

/// Asserts a short plain-text answer with `status`.
fn assert_error_answer(answer: &RawResponse, status: u16) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "not plain text: {answer:?}"
    );
    assert!(
        !answer.body.trim().is_empty() && answer.body.len() < 200,
        "not a short text body: {answer:?}"
    );
}

const GET_CLOSE: &str = "GET / HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn refused_server_connection_answers_502() {
    let toml = one_server("health = { check = \"none\" }", refused_addr());
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");

    let started = Instant::now();
    let answer = raw_request(addr, GET_CLOSE).await;
    assert_error_answer(&answer, 502);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "502 took {:?}",
        started.elapsed()
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn no_server_taking_traffic_answers_503() {
    let origin = Origin::named("unused").await;
    let toml = format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [[backends.pool.servers]]\nname = \"a\"\naddress = \"{0}\"\nweight = 0\n\n\
         [[backends.pool.servers]]\nname = \"b\"\naddress = \"{0}\"\nweight = 0\n",
        origin.addr
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");

    let started = Instant::now();
    let answer = raw_request(addr, GET_CLOSE).await;
    assert_error_answer(&answer, 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 took {:?}",
        started.elapsed()
    );
    assert_eq!(origin.count(), 0);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn slow_origin_answers_504_at_the_response_timeout() {
    let origin = Origin::start(|_| async {
        // The origin's own behaviour under test: far slower than the timeout.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Response::new(full("too late"))
    })
    .await;
    let proxy = start_proxy(&one_server(
        "timeouts = { response = \"200ms\" }",
        origin.addr,
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    let started = Instant::now();
    let answer = raw_request(addr, GET_CLOSE).await;
    let took = started.elapsed();
    assert_error_answer(&answer, 504);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1500),
        "504 after {took:?}, expected shortly after 200ms (the origin takes 2s)"
    );
    common::wait_until(LIMIT, "the request to reach the origin", || {
        origin.count() == 1
    })
    .await;
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// A request line hyper cannot parse.
const MALFORMED: &[u8] = b"NOT A VALID REQUEST LINE\r\n\r\n";

#[tokio::test]
async fn malformed_request_line_answers_400_and_serving_goes_on() {
    let origin = Origin::named("fine").await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    // The answer comes and the connection closes well within the limit.
    let started = Instant::now();
    let answer = RawResponse::parse(&raw_exchange(addr, MALFORMED, LIMIT).await);
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "connection left open"
    );
    assert_eq!(origin.count(), 0);

    let next = raw_request(addr, GET_CLOSE).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.body, "fine");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn malformed_request_line_answer_is_short_plain_text() {
    let origin = Origin::named("fine").await;
    let proxy = start_proxy(&one_server("", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    let answer = RawResponse::parse(&raw_exchange(addr, MALFORMED, LIMIT).await);
    assert_error_answer(&answer, 400);
    proxy.shutdown(Duration::from_secs(1)).await;
}

// 8. Keep-alive to servers.

#[tokio::test]
async fn sequential_requests_reuse_server_connections() {
    let (origin, accepted) =
        Origin::start_counting_connections(|_| async { Response::new(full("ok")) }).await;
    // No health checks: they would open connections of their own.
    let proxy = start_proxy(&one_server("health = { check = \"none\" }", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    // One client connection, 50 requests one after another.
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let connection = tokio::spawn(connection);
    for i in 0..50 {
        let request = Request::get(format!("/req/{i}"))
            .header("host", "engine")
            .body(common::empty())
            .expect("request");
        tokio::time::timeout(LIMIT, sender.ready())
            .await
            .expect("client connection ready in time")
            .expect("client connection open");
        let response = tokio::time::timeout(LIMIT, sender.send_request(request))
            .await
            .expect("answer in time")
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        assert_eq!(text(response).await, "ok");
    }
    assert_eq!(origin.count(), 50);
    let connections = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        connections, 1,
        "50 sequential requests used {connections} server connections"
    );
    drop(sender);
    let _ = tokio::time::timeout(LIMIT, connection).await;
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// An origin that answers each connection's first request with 200 and its
/// body, keeps the connection alive by HTTP's rules, then closes it. Each
/// request's body and each close are reported.
async fn one_shot_origin() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    let (bodies, bodies_rx) = tokio::sync::mpsc::unbounded_channel();
    let (closed, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (bodies, closed) = (bodies.clone(), closed.clone());
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                let mut body = vec![0; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = bodies.send(body);
                drop(stream);
                let _ = closed.send(());
            });
        }
    });
    (addr, bodies_rx, closed_rx)
}

#[tokio::test]
async fn post_after_the_server_closed_the_pooled_connection_arrives_once() {
    let (origin, mut bodies, mut closed) = one_shot_origin().await;
    let proxy = start_proxy(&one_server("health = { check = \"none\" }", origin)).await;
    let addr = proxy.local_addr("web").expect("bound");
    let http = client();

    for i in 0..3 {
        // The server connection of the previous request is pooled, and closed by
        // the server: a POST must not be written on it (nor retried: a POST
        // is never replayed), but go out once on a fresh connection.
        let body = format!("order-{i}");
        let request = Request::post(format!("http://{addr}/orders"))
            .body(full(body.clone()))
            .expect("request");
        let response = tokio::time::timeout(LIMIT, http.request(request))
            .await
            .expect("answer in time")
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        assert_eq!(text(response).await, body, "request {i}");
        let seen = tokio::time::timeout(LIMIT, bodies.recv())
            .await
            .expect("origin got the body in time")
            .expect("origin running");
        assert_eq!(seen, body.as_bytes(), "request {i}");
        tokio::time::timeout(LIMIT, closed.recv())
            .await
            .expect("origin closed in time")
            .expect("origin running");
    }
    assert!(bodies.try_recv().is_err(), "a POST arrived twice");
    proxy.shutdown(Duration::from_secs(1)).await;
}
