//! flowgate's own HTTP/1.1 forwarding (src/http/h1), through the proxy: the
//! heads as the origin and the client see them byte for byte, every way a
//! response body can be delimited, bad responses, pooled connections the
//! origin closed, pipelining, and the hand-over to hyper for what the codec
//! does not take. The origin here is a socket that answers scripted bytes.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{ReadEnd, client, read_until_close, servers_toml, start_proxy};

const LIMIT: Duration = Duration::from_secs(5);

/// What the scripted origin does after answering a request.
#[derive(Clone, Copy, PartialEq)]
enum After {
    KeepOpen,
    Close,
}

/// An origin that answers the n-th request it reads (from 0, over all its
/// connections) with `script(n, head)`, and records each request (its head as
/// it arrived, and its body by content-length) and the connection it came on.
struct ScriptedOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    closed: Arc<Mutex<usize>>,
}

impl ScriptedOrigin {
    async fn start(
        script: impl Fn(usize, &str) -> (Vec<Vec<u8>>, After) + Send + Sync + 'static,
    ) -> ScriptedOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(0));
        let script = Arc::new(script);
        let (seen_by_origin, closed_by_origin) = (Arc::clone(&seen), Arc::clone(&closed));
        tokio::spawn(async move {
            let mut connection = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let (seen, closed, script) = (
                    Arc::clone(&seen_by_origin),
                    Arc::clone(&closed_by_origin),
                    Arc::clone(&script),
                );
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    let mut chunk = [0u8; 4096];
                    'serve: loop {
                        while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&data[..end + 4]).into_owned();
                            data.drain(..end + 4);
                            // A body by content-length is read and dropped.
                            let length = head
                                .to_ascii_lowercase()
                                .lines()
                                .find_map(|line| {
                                    line.strip_prefix("content-length:")
                                        .map(str::trim)
                                        .map(str::to_owned)
                                })
                                .and_then(|value| value.parse::<usize>().ok())
                                .unwrap_or(0);
                            while data.len() < length {
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => break 'serve,
                                    Ok(n) => data.extend_from_slice(&chunk[..n]),
                                }
                            }
                            // A chunked body, up to its last chunk (no trailers here).
                            let length = if head
                                .to_ascii_lowercase()
                                .contains("transfer-encoding: chunked")
                            {
                                loop {
                                    if let Some(end) =
                                        data.windows(5).position(|w| w == b"0\r\n\r\n")
                                    {
                                        break end + 5;
                                    }
                                    match stream.read(&mut chunk).await {
                                        Ok(0) | Err(_) => break 'serve,
                                        Ok(n) => data.extend_from_slice(&chunk[..n]),
                                    }
                                }
                            } else {
                                length
                            };
                            let body = String::from_utf8_lossy(&data[..length]).into_owned();
                            data.drain(..length);
                            let number = {
                                let mut seen = seen.lock().expect("lock");
                                seen.push((connection, format!("{head}{body}")));
                                seen.len() - 1
                            };
                            let (pieces, after) = script(number, &head);
                            for piece in pieces {
                                if stream.write_all(&piece).await.is_err() {
                                    break 'serve;
                                }
                            }
                            if after == After::Close {
                                break 'serve;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => data.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream.shutdown().await;
                    drop(stream);
                    let served = seen
                        .lock()
                        .expect("lock")
                        .iter()
                        .any(|(c, _)| *c == connection);
                    if served {
                        *closed.lock().expect("lock") += 1;
                    }
                });
                connection += 1;
            }
        });
        ScriptedOrigin { addr, seen, closed }
    }

    fn heads(&self) -> Vec<(usize, String)> {
        self.seen.lock().expect("lock").clone()
    }

    /// Connections that carried requests (health checks carry none).
    fn connections(&self) -> usize {
        let mut connections: Vec<usize> = self
            .heads()
            .iter()
            .map(|(connection, _)| *connection)
            .collect();
        connections.sort_unstable();
        connections.dedup();
        connections.len()
    }

    fn closed(&self) -> usize {
        *self.closed.lock().expect("lock")
    }
}

fn answer(text: &str) -> Vec<Vec<u8>> {
    vec![text.as_bytes().to_vec()]
}

async fn proxy_for(origin: &ScriptedOrigin, backend: &str) -> flowgate::supervisor::Proxy {
    start_proxy(&format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\n{backend}\n\n{}",
        servers_toml("pool", &[origin.addr])
    ))
    .await
}

/// Reads one response off a keep-alive connection: its head, then its body by
/// content-length or chunked framing. Returns the head and the body bytes as
/// they came on the wire.
async fn read_one(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end + 4]).into_owned();
            let lower = head.to_ascii_lowercase();
            let rest = &pending[end + 4..];
            let body_len = if lower.starts_with("http/1.1 204") || lower.starts_with("http/1.1 304")
            {
                Some(0)
            } else if lower.contains("transfer-encoding: chunked") {
                rest.windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .filter(|&at| at == 0 || rest[at - 2..at] == *b"\r\n")
                    .map(|at| at + 5)
            } else {
                let length = lower
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                (rest.len() >= length).then_some(length)
            };
            if let Some(body_len) = body_len {
                let body = String::from_utf8_lossy(&rest[..body_len]).into_owned();
                pending.drain(..end + 4 + body_len);
                return (head, body);
            }
        }
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("a whole response in time")
            .expect("read");
        assert!(read > 0, "closed before a whole response: {pending:?}");
        pending.extend_from_slice(&chunk[..read]);
    }
}

#[tokio::test]
async fn the_origin_gets_the_clients_fields_as_written_plus_the_forwarding_ones() {
    let origin = ScriptedOrigin::start(|_, _| {
        (
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Engine: temporal\r\n\r\nok"),
            After::KeepOpen,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"GET /api/v1/namespaces?page=2 HTTP/1.1\r\nHost: engine.example:8080\r\n\
X-Tenant-Id: acme\r\nConnection: keep-alive\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n",
        )
        .await
        .expect("write");
    let mut pending = Vec::new();
    let (head, body) = read_one(&mut stream, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("X-Engine: temporal\r\n"), "{head}");
    assert_eq!(body, "ok");

    let heads = origin.heads();
    let (_, seen) = &heads[0];
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "GET /api/v1/namespaces?page=2 HTTP/1.1");
    for line in [
        "Host: engine.example:8080",
        "X-Tenant-Id: acme",
        "x-forwarded-for: 10.1.2.3, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: engine.example:8080",
    ] {
        assert!(lines.contains(&line), "{line:?} in {seen}");
    }
    let id = lines
        .iter()
        .find_map(|line| line.strip_prefix("x-request-id: "))
        .expect("a request id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(!seen.to_ascii_lowercase().contains("connection:"), "{seen}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_chunked_body_passes_through_with_its_trailers_and_the_connection_is_reused() {
    let origin = ScriptedOrigin::start(|_, _| {
        (
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5\r\nhel".to_vec(),
                b"lo\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n".to_vec(),
            ],
            After::KeepOpen,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let client = client();
    for _ in 0..3 {
        let response = client
            .get(format!("http://{addr}/history").parse().expect("uri"))
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        let collected = response.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(collected.to_bytes(), "hello world");
        assert_eq!(trailers.get("x-checksum").expect("x-checksum"), "42");
    }
    assert_eq!(
        origin.connections(),
        1,
        "one server connection for all three"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_body_ended_by_the_close_reaches_the_client_chunked_on_a_connection_that_stays_open() {
    let origin = ScriptedOrigin::start(|n, _| {
        (
            answer(&format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstreamed {n}"
            )),
            After::Close,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut pending = Vec::new();
    for n in 0..2 {
        stream
            .write_all(b"GET /export HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = read_one(&mut stream, &mut pending).await;
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let text = format!("streamed {n}");
        assert_eq!(body, format!("{:x}\r\n{text}\r\n0\r\n\r\n", text.len()));
    }
    assert_eq!(
        origin.connections(),
        2,
        "a closed server connection is not reused"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn head_204_and_304_answers_carry_no_body_and_the_next_answer_is_intact() {
    let origin = ScriptedOrigin::start(|_, head| {
        let text = match head.split(' ').nth(1) {
            _ if head.starts_with("HEAD") => "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            Some("/deleted") => "HTTP/1.1 204 No Content\r\n\r\n",
            Some("/cached") => "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n",
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody",
        };
        (answer(text), After::KeepOpen)
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut pending = Vec::new();
    stream
        .write_all(b"HEAD /workflows HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // A HEAD answer has no body whatever its length says: read just the head.
    let mut chunk = [0u8; 1024];
    while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0);
        pending.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&pending).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Length: 1234\r\n"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "nothing after the head: {head:?}"
    );
    pending.clear();

    for (path, status) in [("/deleted", "204"), ("/cached", "304"), ("/body", "200")] {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let (head, body) = read_one(&mut stream, &mut pending).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert_eq!(body, if status == "200" { "body" } else { "" });
    }
    assert!(pending.is_empty(), "nothing extra: {pending:?}");
    assert_eq!(origin.connections(), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn interim_answers_are_dropped_and_the_final_one_arrives() {
    let origin = ScriptedOrigin::start(|_, _| {
        (
            answer("HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"),
            After::KeepOpen,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_one(&mut stream, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, "final");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bad_answers_become_502_and_their_server_connection_is_dropped() {
    let huge = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(70_000)
    );
    let origin = ScriptedOrigin::start(move |n, _| {
        let text = match n {
            0 => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_string(),
            1 => "NOT HTTP AT ALL\r\n\r\n".to_string(),
            2 => huge.clone(),
            3 => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n".to_string(),
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string(),
        };
        (answer(&text), After::KeepOpen)
    })
    .await;
    // No retries: each bad answer is the client's answer.
    let proxy = proxy_for(&origin, "retries = 0").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut pending = Vec::new();
    for expected in ["502", "502", "502", "502", "200"] {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = read_one(&mut stream, &mut pending).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {expected}")), "{head}");
        assert_eq!(
            body,
            if expected == "200" {
                "ok"
            } else {
                "bad gateway\n"
            }
        );
    }
    assert_eq!(origin.connections(), 5, "no bad connection is used again");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_pooled_connection_the_origin_closed_is_replaced_without_the_client_noticing() {
    // Every answer ends its connection without saying so.
    let origin = ScriptedOrigin::start(|n, _| {
        (
            answer(&format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{n}")),
            After::Close,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "retries = 0").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut pending = Vec::new();
    // GET may be sent again; a bodiless POST may not, so it must find the
    // closed connection before sending.
    for (n, method) in ["GET", "POST", "GET", "POST"].iter().enumerate() {
        let request = format!("{method} /signal HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let (head, body) = read_one(&mut stream, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{method}: {head}");
        assert_eq!(body, n.to_string());
        common::wait_until(LIMIT, "the origin closed its connection", || {
            origin.closed() == n + 1
        })
        .await;
    }
    assert_eq!(
        origin.heads().len(),
        4,
        "each request reached the origin once"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let origin = ScriptedOrigin::start(|_, head| {
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        (
            answer(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                path.len()
            )),
            After::KeepOpen,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\nGET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (all, end) = read_until_close(&mut stream, LIMIT).await;
    assert_eq!(end, ReadEnd::Closed, "closed after the last, as asked");
    let text = String::from_utf8_lossy(&all);
    let bodies: Vec<&str> = text
        .split("HTTP/1.1 200 OK\r\n")
        .filter(|part| !part.is_empty())
        .map(|part| part.rsplit("\r\n\r\n").next().unwrap_or(""))
        .collect();
    assert_eq!(bodies, ["/one", "/two", "/three"], "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn small_bodies_are_forwarded_whole_and_others_go_to_hyper_on_the_same_connection() {
    let origin = ScriptedOrigin::start(|_, _| {
        (
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            After::KeepOpen,
        )
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut pending = Vec::new();
    let large = "x".repeat(10_000);
    let requests: [(&[u8], &[u8]); 4] = [
        // A body in the head's write, and one written a moment after it.
        (b"POST /signal HTTP/1.1\r\nHost: x\r\nX-Case: Kept\r\nContent-Length: 13\r\n\r\n{\"go\": true}\n", b""),
        (b"POST /query HTTP/1.1\r\nHost: x\r\nX-Case: Kept\r\nContent-Length: 4\r\n\r\n", b"late"),
        // Chunked: hyper's path.
        (b"POST /start HTTP/1.1\r\nHost: x\r\nX-Case: Kept\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ninput\r\n0\r\n\r\n", b""),
        (b"GET /b HTTP/1.1\r\nHost: x\r\nX-Case: Kept\r\n\r\n", b""),
    ];
    for (request, later) in requests {
        stream.write_all(request).await.expect("write");
        if !later.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(later).await.expect("write");
        }
        let (head, body) = read_one(&mut stream, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "ok");
    }
    let heads = origin.heads();
    assert_eq!(heads.len(), 4);
    // The codec writes field names as they came; hyper in lower case.
    assert!(
        heads[0].1.contains("\r\nX-Case: Kept\r\n"),
        "{}",
        heads[0].1
    );
    assert!(
        heads[0].1.ends_with("\r\n\r\n{\"go\": true}\n"),
        "{}",
        heads[0].1
    );
    assert!(
        heads[1].1.contains("\r\nX-Case: Kept\r\n"),
        "{}",
        heads[1].1
    );
    assert!(heads[1].1.ends_with("\r\n\r\nlate"), "{}", heads[1].1);
    assert!(
        heads[2].1.starts_with("POST /start HTTP/1.1\r\n"),
        "{}",
        heads[2].1
    );
    assert!(
        heads[2].1.contains("\r\nx-case: Kept\r\n"),
        "{}",
        heads[2].1
    );
    assert!(
        heads[3].1.contains("\r\nx-case: Kept\r\n"),
        "hyper serves on: {}",
        heads[3].1
    );

    // A body larger than the codec takes, on a new connection: hyper streams it.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "PUT /blob HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{large}",
        large.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let (head, body) = read_one(&mut stream, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok");
    let heads = origin.heads();
    assert!(heads[4].1.ends_with(&large), "the whole body arrived");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// 1 MiB answers for the n-th request: by length (even n) or chunked, in
/// pieces of odd sizes.
fn large_answer(body: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    if n % 2 == 0 {
        pieces.push(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes(),
        );
        pieces.extend(body.chunks(70_001).map(<[u8]>::to_vec));
    } else {
        pieces.push(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec());
        for chunk in body.chunks(33_333) {
            let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
            piece.extend_from_slice(chunk);
            piece.extend_from_slice(b"\r\n");
            pieces.push(piece);
        }
        pieces.push(b"0\r\n\r\n".to_vec());
    }
    pieces
}

#[tokio::test]
async fn a_large_body_arrives_intact_by_length_and_chunked() {
    // 1 MiB of a pattern, in pieces of odd sizes, by length and chunked.
    let body: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let expected = body.clone();
    let origin = ScriptedOrigin::start(move |n, _| (large_answer(&body, n), After::KeepOpen)).await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");

    let client = client();
    for _ in 0..4 {
        let response = client
            .get(format!("http://{addr}/history.json").parse().expect("uri"))
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        let got = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert!(got == expected, "1 MiB intact (got {} bytes)", got.len());
    }
    assert_eq!(
        origin.connections(),
        1,
        "the server connection is reused after each"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

// h2 clients: their requests are parsed by hyper, and those without a body
// go to HTTP/1.1 servers through the codec's server side (src/http/h1/to_server.rs).

/// The h2 client's answer: status, headers, body and trailers.
async fn h2_fetch(
    client: &common::HttpClient,
    request: http::Request<common::Body>,
) -> (u16, http::HeaderMap, Vec<u8>, Option<http::HeaderMap>) {
    let response = tokio::time::timeout(LIMIT, client.request(request))
        .await
        .expect("an answer in time")
        .expect("response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (parts, body) = response.into_parts();
    let collected = tokio::time::timeout(LIMIT, body.collect())
        .await
        .expect("the body in time")
        .expect("body");
    let trailers = collected.trailers().cloned();
    (
        parts.status.as_u16(),
        parts.headers,
        collected.to_bytes().to_vec(),
        trailers,
    )
}

fn h2_get(addr: SocketAddr, path: &str) -> http::Request<common::Body> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(common::empty())
        .expect("request")
}

#[tokio::test]
async fn h2_requests_reach_an_http11_server_and_every_answer_comes_back_whole() {
    let origin = ScriptedOrigin::start(|_, head| {
        let target = head.split(' ').nth(1).unwrap_or("");
        let path = target.split('?').next().unwrap_or("");
        let pieces: Vec<&[u8]> = match path {
            _ if head.starts_with("HEAD") => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"],
            "/fixed" => vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Engine: temporal\r\n\
Connection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\nhel",
                b"lo",
            ],
            "/chunked" => vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5\r\nhel",
                b"lo\r\n6\r\n world\r\n0\r\nx-check",
                b"sum: 42\r\n\r\n",
            ],
            "/deleted" => vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
            "/interim" => vec![b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"],
            _ => vec![b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close"],
        };
        let after = if path == "/export" {
            After::Close
        } else {
            After::KeepOpen
        };
        (pieces.into_iter().map(<[u8]>::to_vec).collect(), after)
    })
    .await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");
    let client = common::h2c_client();

    let request = http::Request::get(format!("http://{addr}/fixed?page=2"))
        .header("cookie", "a=1")
        .header("x-tenant", "acme")
        .header("cookie", "b=2")
        .body(common::empty())
        .expect("request");
    let (status, headers, body, _) = h2_fetch(&client, request).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello");
    assert_eq!(headers.get("x-engine").expect("x-engine"), "temporal");
    assert!(headers.get("x-hop").is_none() && headers.get("connection").is_none());

    let (status, _, body, trailers) = h2_fetch(&client, h2_get(addr, "/chunked")).await;
    assert_eq!((status, &body[..]), (200, &b"hello world"[..]));
    let trailers = trailers.expect("the server's trailers");
    assert_eq!(trailers.get("x-checksum").expect("x-checksum"), "42");

    let head = http::Request::head(format!("http://{addr}/workflows"))
        .body(common::empty())
        .expect("request");
    let (status, headers, body, _) = h2_fetch(&client, head).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-length").expect("length"), "1234");
    assert!(body.is_empty());
    let (status, _, body, _) = h2_fetch(&client, h2_get(addr, "/deleted")).await;
    assert_eq!((status, body.len()), (204, 0));
    let (status, _, body, _) = h2_fetch(&client, h2_get(addr, "/interim")).await;
    assert_eq!((status, &body[..]), (200, &b"final"[..]));
    assert_eq!(
        origin.connections(),
        1,
        "one server connection for every answer with a length or chunks"
    );
    let (status, _, body, _) = h2_fetch(&client, h2_get(addr, "/export")).await;
    assert_eq!((status, &body[..]), (200, &b"until the close"[..]));
    let (status, _, body, _) = h2_fetch(&client, h2_get(addr, "/fixed")).await;
    assert_eq!((status, &body[..]), (200, &b"hello"[..]));
    assert_eq!(
        origin.connections(),
        2,
        "the connection the server closed is not reused"
    );

    let heads = origin.heads();
    let (_, first) = &heads[0];
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "GET /fixed?page=2 HTTP/1.1");
    for line in [
        format!("host: {addr}").as_str(),
        "cookie: a=1; b=2",
        "x-tenant: acme",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        format!("x-forwarded-host: {addr}").as_str(),
    ] {
        assert!(lines.contains(&line), "{line:?} in {first}");
    }
    assert!(
        lines.iter().any(|line| line.starts_with("x-request-id: ")),
        "{first}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn h2_clients_get_502_for_bad_answers_and_never_notice_a_closed_pooled_connection() {
    let origin = ScriptedOrigin::start(|n, _| match n {
        0 => (
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
            After::KeepOpen,
        ),
        1 => (
            // The body breaks off: the client's stream is reset.
            answer("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"),
            After::Close,
        ),
        // Every other answer ends its connection without saying so.
        _ => (
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            After::Close,
        ),
    })
    .await;
    let proxy = proxy_for(&origin, "retries = 0").await;
    let addr = proxy.local_addr("web").expect("bound");
    let client = common::h2c_client();

    let (status, _, body, _) = h2_fetch(&client, h2_get(addr, "/")).await;
    assert_eq!((status, &body[..]), (502, &b"bad gateway\n"[..]));

    // The stream is reset: before the head reaches the client, or after it.
    let answer = tokio::time::timeout(LIMIT, client.request(h2_get(addr, "/")))
        .await
        .expect("an answer in time");
    if let Ok(response) = answer {
        assert_eq!(response.status(), 200);
        let broken = tokio::time::timeout(LIMIT, response.into_body().collect())
            .await
            .expect("the body ends in time");
        assert!(
            broken.is_err(),
            "a body cut short is not passed off as whole"
        );
    }

    for _ in 0..3 {
        let (status, _, body, _) = h2_fetch(&client, h2_get(addr, "/")).await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    }
    assert_eq!(origin.connections(), 5);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn h2_large_bodies_arrive_intact_by_length_and_chunked() {
    let body: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let expected = body.clone();
    let origin = ScriptedOrigin::start(move |n, _| (large_answer(&body, n), After::KeepOpen)).await;
    let proxy = proxy_for(&origin, "").await;
    let addr = proxy.local_addr("web").expect("bound");
    let client = common::h2c_client();
    for _ in 0..4 {
        let (status, _, got, trailers) = h2_fetch(&client, h2_get(addr, "/history.json")).await;
        assert_eq!(status, 200);
        assert!(got == expected, "1 MiB intact (got {} bytes)", got.len());
        assert!(trailers.is_none());
    }
    assert_eq!(origin.connections(), 1, "the server connection is reused");
    proxy.shutdown(Duration::from_secs(1)).await;
}
