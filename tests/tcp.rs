//! Tcp mode through the real proxy: bytes both ways, half-close passed on, the
//! idle timeout, retries after a connect failure, and no server at all.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{EchoOrigin, ReadEnd, read_until_close, servers_toml, start_proxy, unused_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A tcp frontend `raw` in front of backend `echo` with `servers`;
/// `frontend` and `backend` are extra lines for those two tables.
fn config(servers: &[SocketAddr], frontend: &str, backend: &str) -> String {
    format!(
        "[frontends.raw]\nbind = [\"127.0.0.1:0\"]\nmode = \"tcp\"\nbackend = \"echo\"\n{frontend}\n\n\
         [backends.echo]\n{backend}\n\n\
         # Sessions are counted at the origin: no check connections.\n\
         [backends.echo.health]\ncheck = \"none\"\n\n{}",
        servers_toml("echo", servers)
    )
}

/// Writes `message` and reads the same number of bytes back, bounded.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut echoed))
        .await
        .expect("echo within 2s")
        .expect("echo");
    echoed
}

#[tokio::test]
async fn bytes_flow_both_ways() {
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&config(&[echo.addr], "", "")).await;
    let addr = proxy.local_addr("raw").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut stream, b"ping").await, b"ping");
    // Larger than one read buffer, on the same session.
    let large: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(&mut stream, &large).await, large);
    assert_eq!(echo.count(), 1, "one session, one server connection");
    drop(stream);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn half_close_is_passed_on_both_ways() {
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&config(&[echo.addr], "", "")).await;
    let addr = proxy.local_addr("raw").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"hello").await.expect("write");
    stream.shutdown().await.expect("shutdown write side");
    // The server sees EOF only if flowgate passes the half-close on; it then
    // echoes and closes, and that close must reach the client as EOF.
    let (data, end) = read_until_close(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(String::from_utf8_lossy(&data), "hello");
    assert_eq!(end, ReadEnd::Closed, "no EOF after the server closed");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn idle_session_is_closed_after_client_idle() {
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&config(
        &[echo.addr],
        "[frontends.raw.timeouts]\nclient_idle = \"300ms\"",
        "",
    ))
    .await;
    let addr = proxy.local_addr("raw").expect("bound");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut stream, b"x").await, b"x");
    let last_byte = Instant::now();
    let (data, end) = read_until_close(&mut stream, Duration::from_secs(2)).await;
    let idle_for = last_byte.elapsed();
    assert_eq!(end, ReadEnd::Closed, "idle session left open");
    assert!(data.is_empty(), "unexpected bytes {data:?}");
    assert!(
        idle_for >= Duration::from_millis(250) && idle_for < Duration::from_secs(1),
        "closed after {idle_for:?} idle, client_idle is 300ms"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn active_session_outlives_client_idle() {
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&config(
        &[echo.addr],
        "[frontends.raw.timeouts]\nclient_idle = \"300ms\"",
        "",
    ))
    .await;
    let addr = proxy.local_addr("raw").expect("bound");

    // Traffic every 100 ms for well past client_idle keeps the session open.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        assert_eq!(round_trip(&mut stream, b"tick").await, b"tick");
        // Pacing of the client's traffic.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(echo.count(), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_server() {
    let echo = EchoOrigin::start().await;
    let dead = unused_addr();
    let proxy = start_proxy(&config(&[dead, echo.addr], "", "retries = 1")).await;
    let addr = proxy.local_addr("raw").expect("bound");

    // Round robin sends every other session to the dead server first.
    for i in 0..4u8 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(
            round_trip(&mut stream, &[b'a' + i]).await,
            [b'a' + i],
            "session {i}"
        );
    }
    assert_eq!(echo.count(), 4);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn no_reachable_server_closes_the_client_at_once() {
    let proxy = start_proxy(&config(&[unused_addr(), unused_addr()], "", "retries = 1")).await;
    let addr = proxy.local_addr("raw").expect("bound");

    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (data, end) = read_until_close(&mut stream, Duration::from_secs(2)).await;
    let elapsed = started.elapsed();
    assert_eq!(end, ReadEnd::Closed, "client left hanging");
    assert!(data.is_empty(), "unexpected bytes {data:?}");
    assert!(
        elapsed < Duration::from_millis(500),
        "closed after {elapsed:?}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn max_connections_holds_back_further_sessions() {
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&config(&[echo.addr], "max_connections = 1", "")).await;
    let addr = proxy.local_addr("raw").expect("bound");

    let mut first = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut first, b"one").await, b"one");

    // Accepted by the kernel, not by flowgate: no echo while the first is open.
    let mut second = TcpStream::connect(addr).await.expect("connect");
    second.write_all(b"two").await.expect("write");
    let mut echoed = [0u8; 3];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.read_exact(&mut echoed))
            .await
            .is_err(),
        "a second session ran past max_connections = 1"
    );

    drop(first);
    tokio::time::timeout(Duration::from_secs(2), second.read_exact(&mut echoed))
        .await
        .expect("the second session runs once the first ends")
        .expect("echo");
    assert_eq!(&echoed, b"two");
    assert_eq!(echo.count(), 2);
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// The frontend `raw`'s byte counters: (received from clients, sent to them).
fn raw_bytes(proxy: &flowgate::supervisor::Proxy) -> (u64, u64) {
    use std::sync::atomic::Ordering;
    let runtime = proxy.runtime().load();
    let stats = &runtime.frontend("raw").expect("frontend raw").stats;
    (
        stats.bytes_in.load(Ordering::Relaxed),
        stats.bytes_out.load(Ordering::Relaxed),
    )
}

#[tokio::test]
async fn bytes_are_counted_while_a_session_lives_and_however_it_ends() {
    let echo = EchoOrigin::start().await;
    // A server that takes 100 bytes and resets the session.
    let resetting = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let resetting_addr = resetting.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = resetting.accept().await {
            let mut taken = [0u8; 100];
            if stream.read_exact(&mut taken).await.is_ok() {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
    });
    let mut proxy = start_proxy(&config(&[echo.addr], "", "")).await;
    let addr = proxy.local_addr("raw").expect("bound");

    // 64 KiB each way while the session stays open: counted as it moves, at
    // most one 16 KiB step behind.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let large = vec![7u8; 64 * 1024];
    assert_eq!(round_trip(&mut stream, &large).await, large);
    let (received, sent) = raw_bytes(&proxy);
    assert!((48 * 1024..=64 * 1024).contains(&received), "{received}");
    assert!((48 * 1024..=64 * 1024).contains(&sent), "{sent}");
    drop(stream);
    common::wait_until(Duration::from_secs(5), "the session's rest counted", || {
        raw_bytes(&proxy) == (64 * 1024, 64 * 1024)
    })
    .await;

    // A session the server resets: what moved before is counted all the same.
    let text = config(&[resetting_addr], "", "");
    proxy
        .reload(flowgate::config::parse(&text, std::path::Path::new("test.toml")).expect("config"))
        .await
        .expect("reload");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&[1u8; 100]).await.expect("write");
    let (_, end) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(end, ReadEnd::Closed);
    common::wait_until(Duration::from_secs(5), "the reset session counted", || {
        raw_bytes(&proxy) == (64 * 1024 + 100, 64 * 1024)
    })
    .await;
}
