//! Client-side limits and timeouts through the real proxy: the slowloris head
//! timer (408), idle keep-alive, head size (431), allow/deny (403), connection
//! limits, and the server response timeout (504).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    EchoOrigin, Origin, ReadEnd, connect_from, full, get, raw_exchange, read_response,
    read_until_close, servers_toml, start_proxy,
};
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECOND_LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// One http frontend `web` on an ephemeral port in front of backend `pool`;
/// `frontend` and `backend` are extra lines for those two tables (sub-tables
/// go in `tail`).
fn config(origin: SocketAddr, frontend: &str, backend: &str, tail: &str) -> String {
    format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n{frontend}\n\n\
         [backends.pool]\n{backend}\n\n{tail}\n\n{}",
        servers_toml("pool", &[origin])
    )
}

/// An origin answering `/slow` after `delay` and everything else at once.
async fn origin_with_slow_path(delay: Duration) -> Origin {
    Origin::start(move |request| async move {
        if request.uri().path() == "/slow" {
            tokio::time::sleep(delay).await;
            Response::new(full("slow"))
        } else {
            Response::new(full("ok"))
        }
    })
    .await
}

const SIMPLE_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn slow_request_head_gets_408_and_never_reaches_the_server() {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(
        origin.addr,
        "",
        "",
        "[frontends.web.timeouts]\nrequest_header = \"1s\"",
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    // Slowloris: the head trickles in one byte every 200 ms and never completes.
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let answered = Arc::new(AtomicBool::new(false));
    let stop_writing = Arc::clone(&answered);
    let trickle = tokio::spawn(async move {
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n" {
            if stop_writing.load(Ordering::SeqCst) || writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            // Pacing of the slow client, not a wait for the proxy.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        writer
    });

    // Meanwhile a normal client on the same frontend is served.
    assert_eq!(get(addr, "/").await, (200, "ok".to_string()));

    let (answer, end) = read_until_close(&mut reader, Duration::from_secs(3)).await;
    answered.store(true, Ordering::SeqCst);
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "answer: {answer:?}");
    assert!(
        answer.ends_with("\r\n\r\nrequest head too slow\n"),
        "short plain-text body: {answer:?}"
    );
    assert_eq!(end, ReadEnd::Closed, "connection left open after 408");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(2),
        "408 after {elapsed:?}, request_header is 1s"
    );
    drop(trickle.await.expect("slow client"));
    assert_eq!(
        origin.count(),
        1,
        "only the normal request reaches the server"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn slow_second_head_on_a_keep_alive_connection_gets_408() {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(
        origin.addr,
        "",
        "",
        "[frontends.web.timeouts]\nrequest_header = \"500ms\"\nclient_idle = \"10s\"",
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(SIMPLE_GET).await.expect("write");
    let answer = read_response(&mut stream, Duration::from_secs(2))
        .await
        .expect("first response");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");

    // Idle well past request_header (only client_idle applies between
    // requests), then half of the next head, which never completes.
    assert_eq!(
        read_response(&mut stream, Duration::from_millis(800)).await,
        None,
        "an idle keep-alive connection got bytes or was closed"
    );
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost:")
        .await
        .expect("write partial head");
    let started = Instant::now();
    let (answer, end) = read_until_close(&mut stream, Duration::from_secs(2)).await;
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "answer: {answer:?}");
    assert_eq!(end, ReadEnd::Closed);
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(1500),
        "408 after {elapsed:?}, request_header is 500ms"
    );
    assert_eq!(origin.count(), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn silent_connection_is_closed_without_an_answer() {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(
        origin.addr,
        "",
        "",
        "[frontends.web.timeouts]\nrequest_header = \"1s\"",
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (answer, end) = read_until_close(&mut stream, Duration::from_secs(3)).await;
    let elapsed = started.elapsed();
    assert_eq!(end, ReadEnd::Closed, "silent connection still open");
    assert!(
        answer.is_empty(),
        "answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}, request_header is 1s"
    );
    assert_eq!(origin.count(), 0);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn idle_keep_alive_is_closed_but_a_long_request_is_not() {
    let origin = origin_with_slow_path(Duration::from_secs(1)).await;
    let proxy = start_proxy(&config(
        origin.addr,
        "",
        "",
        "[frontends.web.timeouts]\nclient_idle = \"300ms\"",
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    // Idle after one request: flowgate closes the keep-alive connection.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(SIMPLE_GET).await.expect("write");
    let answer = read_response(&mut idle, Duration::from_secs(2))
        .await
        .expect("first response");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    let answered = Instant::now();
    let (rest, end) = read_until_close(&mut idle, Duration::from_secs(2)).await;
    let idle_for = answered.elapsed();
    assert_eq!(end, ReadEnd::Closed, "idle keep-alive connection left open");
    assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
    assert!(
        idle_for >= Duration::from_millis(250) && idle_for < Duration::from_secs(1),
        "closed after {idle_for:?} idle, client_idle is 300ms"
    );

    // Busy for 1 s (more than client_idle) waiting for the server: not cut.
    let mut busy = TcpStream::connect(addr).await.expect("connect");
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = read_response(&mut busy, Duration::from_secs(3))
        .await
        .expect("the long request is answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    assert!(answer.ends_with("slow"), "answer: {answer:?}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// `GET /` with one `X-Big` header of `header_bytes` bytes.
fn request_with_header_of(header_bytes: usize) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(header_bytes)
    )
    .into_bytes()
}

/// A proxy with `limits.max_header_bytes = limit`, its address and its origin.
async fn proxy_with_head_limit(limit: &str) -> (flowgate::supervisor::Proxy, SocketAddr, Origin) {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(
        origin.addr,
        "",
        "",
        &format!("[frontends.web.limits]\nmax_header_bytes = \"{limit}\""),
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    (proxy, addr, origin)
}

#[tokio::test]
async fn request_head_over_max_header_bytes_gets_431() {
    let (proxy, addr, origin) = proxy_with_head_limit("16KiB").await;

    let answer = raw_exchange(
        addr,
        &request_with_header_of(12 * 1024),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "12 KiB head: {answer:?}"
    );
    assert_eq!(origin.count(), 1);

    let answer = raw_exchange(
        addr,
        &request_with_header_of(20 * 1024),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "20 KiB head: {answer:?}"
    );
    assert_eq!(origin.count(), 1, "a too-large head must not be forwarded");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn max_header_bytes_under_8kib_is_enforced() {
    let (proxy, addr, origin) = proxy_with_head_limit("2KiB").await;

    let answer = raw_exchange(addr, &request_with_header_of(1024), Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "1 KiB head: {answer:?}");

    let answer = raw_exchange(
        addr,
        &request_with_header_of(4 * 1024),
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "4 KiB head: {answer:?}");
    assert!(
        answer.ends_with("\r\n\r\nrequest head too large\n"),
        "short plain-text body: {answer:?}"
    );
    assert_eq!(origin.count(), 1, "a too-large head must not be forwarded");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// The contract: flowgate's own error answers are short plain-text bodies.
#[tokio::test]
async fn head_over_the_read_buffer_gets_a_plain_text_431() {
    let (proxy, addr, origin) = proxy_with_head_limit("16KiB").await;

    let answer = raw_exchange(
        addr,
        &request_with_header_of(20 * 1024),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "20 KiB head: {answer:?}"
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain"),
        "plain text: {answer:?}"
    );
    assert!(
        answer.ends_with("\r\n\r\nrequest head too large\n"),
        "short body: {answer:?}"
    );
    assert_eq!(origin.count(), 0);
    proxy.shutdown(Duration::from_secs(1)).await;
}

const CLOSE_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Sends `CLOSE_GET` on `stream` and returns everything until close.
async fn exchange(mut stream: TcpStream) -> String {
    stream.write_all(CLOSE_GET).await.expect("write");
    let (answer, end) = read_until_close(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(end, ReadEnd::Closed, "connection: close was not honoured");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn allow_list_refuses_other_clients_with_403() {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(origin.addr, "allow = [\"127.0.0.2/32\"]", "", "")).await;
    let addr = proxy.local_addr("web").expect("bound");

    let (status, body) = get(addr, "/").await;
    assert_eq!((status, body.as_str()), (403, "forbidden\n"));
    assert_eq!(
        origin.count(),
        0,
        "a refused client must not reach a server"
    );

    let answer = exchange(connect_from(SECOND_LOOPBACK, addr).await).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "from 127.0.0.2: {answer:?}"
    );
    assert!(answer.ends_with("ok"), "from 127.0.0.2: {answer:?}");
    assert_eq!(origin.count(), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn deny_list_refuses_with_403() {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(origin.addr, "deny = [\"127.0.0.1/32\"]", "", "")).await;
    let addr = proxy.local_addr("web").expect("bound");

    let answer = exchange(TcpStream::connect(addr).await.expect("connect")).await;
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "from 127.0.0.1: {answer:?}"
    );
    assert!(
        answer.ends_with("\r\n\r\nforbidden\n"),
        "short body: {answer:?}"
    );
    assert_eq!(origin.count(), 0);

    let answer = exchange(connect_from(SECOND_LOOPBACK, addr).await).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "from 127.0.0.2: {answer:?}"
    );
    assert_eq!(origin.count(), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tcp_mode_closes_refused_clients_without_data() {
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&format!(
        "[frontends.raw]\nbind = [\"127.0.0.1:0\"]\nmode = \"tcp\"\nbackend = \"echo\"\n\
         allow = [\"127.0.0.2/32\"]\n\n[backends.echo.health]\ncheck = \"none\"\n\n{}",
        servers_toml("echo", &[echo.addr])
    ))
    .await;
    let addr = proxy.local_addr("raw").expect("bound");

    let started = Instant::now();
    let mut refused = TcpStream::connect(addr).await.expect("connect");
    let (data, end) = read_until_close(&mut refused, Duration::from_secs(2)).await;
    assert_eq!(end, ReadEnd::Closed, "refused session left open");
    assert!(data.is_empty(), "refused session got {data:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(echo.count(), 0, "a refused session must not reach a server");

    let mut allowed = connect_from(SECOND_LOOPBACK, addr).await;
    allowed.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), allowed.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echoed, b"ping");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Opens a keep-alive connection and proves flowgate serves it.
async fn served_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(SIMPLE_GET).await.expect("write");
    let answer = read_response(&mut stream, Duration::from_secs(2))
        .await
        .expect("response on a connection under the limit");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    stream
}

/// With two connections held open, a third waits (unanswered) until one closes.
async fn third_connection_waits_for_a_slot(frontend: &str, global: &str) {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&format!(
        "{global}\n\n{}",
        config(origin.addr, frontend, "", "")
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    let first = served_connection(addr).await;
    let mut second = served_connection(addr).await;

    // The kernel completes the handshake, but flowgate does not accept it yet.
    let mut third = TcpStream::connect(addr).await.expect("connect third");
    third.write_all(SIMPLE_GET).await.expect("write third");
    assert_eq!(
        read_response(&mut third, Duration::from_millis(300)).await,
        None,
        "a third connection was served past max_connections = 2"
    );

    drop(first);
    let answer = read_response(&mut third, Duration::from_secs(2))
        .await
        .expect("the third connection is served once a slot frees");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");

    // The connection still held goes on working.
    second.write_all(SIMPLE_GET).await.expect("write second");
    let answer = read_response(&mut second, Duration::from_secs(2))
        .await
        .expect("second connection still served");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    assert_eq!(origin.count(), 4);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn global_max_connections_pauses_accepting() {
    third_connection_waits_for_a_slot("", "[global]\nmax_connections = 2").await;
}

#[tokio::test]
async fn frontend_max_connections_pauses_accepting() {
    third_connection_waits_for_a_slot("max_connections = 2", "").await;
}

#[tokio::test]
async fn slow_server_gets_504_after_the_response_timeout() {
    let origin = origin_with_slow_path(Duration::from_secs(2)).await;
    let proxy = start_proxy(&config(
        origin.addr,
        "",
        "",
        "[backends.pool.timeouts]\nresponse = \"200ms\"",
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    let started = Instant::now();
    let (status, body) = get(addr, "/slow").await;
    let elapsed = started.elapsed();
    assert_eq!((status, body.as_str()), (504, "gateway timeout\n"));
    assert!(
        elapsed >= Duration::from_millis(180) && elapsed < Duration::from_secs(1),
        "504 after {elapsed:?}, response timeout is 200ms"
    );
    // Fast requests on the same backend are unaffected.
    assert_eq!(get(addr, "/").await, (200, "ok".to_string()));
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn malformed_request_gets_a_plain_text_400() {
    let origin = Origin::named("ok").await;
    let proxy = start_proxy(&config(origin.addr, "", "", "")).await;
    let addr = proxy.local_addr("web").expect("bound");

    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "answer: {answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain"),
        "plain text: {answer:?}"
    );
    assert!(
        answer.ends_with("\r\n\r\nbad request\n"),
        "short body: {answer:?}"
    );
    assert_eq!(origin.count(), 0);
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Keep-alive connections idle longer than `PARK_AFTER` give their hyper state
/// back and start a fresh one with the next request: every request after such
/// a pause is answered on the same connection, with its own head timer intact.
#[tokio::test]
async fn keep_alive_connection_serves_requests_after_idle_pauses() {
    let origin = origin_with_slow_path(Duration::from_millis(10)).await;
    let proxy = start_proxy(&config(origin.addr, "", "", "")).await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let pause = flowgate::http::conn::PARK_AFTER * 2;
    for round in 0..3 {
        stream.write_all(SIMPLE_GET).await.expect("write");
        let answer = read_response(&mut stream, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("no answer in round {round}"));
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer:?}"
        );
        assert!(answer.ends_with("ok"), "round {round}: {answer:?}");
        // The client's pause between requests (no bytes may arrive meanwhile).
        assert_eq!(
            read_response(&mut stream, pause).await,
            None,
            "round {round}"
        );
    }
    // Two requests written at once after a pause (pipelined) are both answered.
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write pipelined");
    let first = read_response(&mut stream, Duration::from_secs(2)).await;
    assert!(
        first.as_deref().is_some_and(|a| a.ends_with("slow")),
        "{first:?}"
    );
    let second = read_response(&mut stream, Duration::from_secs(2)).await;
    assert!(
        second.as_deref().is_some_and(|a| a.ends_with("ok")),
        "{second:?}"
    );
    assert_eq!(origin.count(), 5);
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// A client that stops reading a large response for longer than `PARK_AFTER`
/// still gets every byte of it: a connection with unwritten response bytes is
/// not idle.
#[tokio::test]
async fn slow_reader_gets_the_whole_response() {
    const SIZE: usize = 8 * 1024 * 1024;
    let body: bytes::Bytes = (0..SIZE)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    let served = body.clone();
    let origin = Origin::start(move |_| {
        let body = served.clone();
        async move { Response::new(full(body)) }
    })
    .await;
    let proxy = start_proxy(&config(origin.addr, "", "", "")).await;
    let addr = proxy.local_addr("web").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(SIMPLE_GET).await.expect("write");
    // The client reads nothing for a while: the socket buffers fill and
    // flowgate holds the rest of the response.
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.expect("first byte");
    tokio::time::sleep(flowgate::http::conn::PARK_AFTER * 3).await;
    let answer = read_response(&mut stream, Duration::from_secs(10))
        .await
        .map(|rest| format!("{}{rest}", first[0] as char))
        .expect("the whole response");
    let (head, received) = answer.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "head: {head:?}");
    assert_eq!(received.len(), SIZE);
    assert!(received.as_bytes() == &body[..], "body differs");
    // And the connection goes on.
    stream.write_all(SIMPLE_GET).await.expect("write");
    let again = read_response(&mut stream, Duration::from_secs(10)).await;
    assert!(again.is_some_and(|a| a.starts_with("HTTP/1.1 200")));
    proxy.shutdown(Duration::from_secs(1)).await;
}
