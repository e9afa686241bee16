//! Stopping the real binary: SIGTERM and SIGINT close the listeners at once, let
//! in-flight requests finish and exit 0 as soon as nothing is left, or cut what
//! is left when the grace period ends. And how the serving threads share the
//! connections they accept.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    EchoOrigin, FlowgateProcess, Origin, ReadEnd, client, full, held_connections, read_response,
    read_until_close, servers_toml, wait_until,
};
use http_body_util::BodyExt;
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLOW_BODY_BYTES: usize = 256 * 1024;

fn config(origin: SocketAddr, grace_period: &str) -> String {
    config_with_threads(origin, grace_period, 0)
}

/// [`config`] with `global.threads` (0: one thread per core; 1: a single
/// thread, no workers).
fn config_with_threads(origin: SocketAddr, grace_period: &str, threads: usize) -> String {
    format!(
        "[global]\ngrace_period = \"{grace_period}\"\nthreads = {threads}\n\n\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\n\n{}",
        servers_toml("pool", &[origin])
    )
}

/// Whether a new connection to `addr` is refused now.
fn refuses_connections(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
}

/// GET `path` through the proxy; the status and body, or the client error text.
async fn try_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let response = client()
        .get(format!("http://{addr}{path}").parse().expect("uri"))
        .await
        .map_err(|err| format!("{err:?}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("{err:?}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

async fn graceful_stop_finishes_in_flight_requests(signal: &str, threads: usize) {
    let origin = Origin::start(|_| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Response::new(full(vec![b'x'; SLOW_BODY_BYTES]))
    })
    .await;
    let mut flowgate = FlowgateProcess::run(&config_with_threads(origin.addr, "30s", threads));
    let addr = flowgate.frontend_addr("web").await;

    let in_flight = tokio::spawn(async move { try_get(addr, "/slow").await });
    wait_until(Duration::from_secs(5), "the request at the origin", || {
        origin.count() == 1
    })
    .await;

    let stop_sent = Instant::now();
    flowgate.signal(signal);
    wait_until(
        Duration::from_secs(1),
        "new connections refused after the stop signal",
        || refuses_connections(addr),
    )
    .await;

    let (status, body) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("in-flight request finishes")
        .expect("request task")
        .expect("in-flight request answered in full");
    assert_eq!(status, 200);
    assert_eq!(body.len(), SLOW_BODY_BYTES, "truncated body");

    let code = flowgate.wait_exit(Duration::from_secs(5)).await;
    let stopped_after = stop_sent.elapsed();
    assert_eq!(code, Some(0), "log:\n{}", flowgate.log().join("\n"));
    // As soon as nothing is in flight, far below grace_period = 30s.
    assert!(
        stopped_after < Duration::from_secs(5),
        "exit {stopped_after:?} after SIG{signal}"
    );
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn sigterm_stops_gracefully() {
    graceful_stop_finishes_in_flight_requests("TERM", 0).await;
}

#[tokio::test]
async fn sigint_stops_gracefully() {
    graceful_stop_finishes_in_flight_requests("INT", 0).await;
}

#[tokio::test]
async fn sigterm_stops_gracefully_with_one_worker_thread() {
    graceful_stop_finishes_in_flight_requests("TERM", 1).await;
}

#[tokio::test]
async fn grace_period_cuts_what_is_left() {
    let origin = Origin::start(|_| std::future::pending()).await;
    let mut flowgate = FlowgateProcess::run(&config(origin.addr, "500ms"));
    let addr = flowgate.frontend_addr("web").await;

    let in_flight = tokio::spawn(async move { try_get(addr, "/never").await });
    wait_until(Duration::from_secs(5), "the request at the origin", || {
        origin.count() == 1
    })
    .await;

    let stop_sent = Instant::now();
    flowgate.signal("TERM");
    let code = flowgate.wait_exit(Duration::from_secs(3)).await;
    let stopped_after = stop_sent.elapsed();
    assert_eq!(code, Some(0), "log:\n{}", flowgate.log().join("\n"));
    assert!(
        stopped_after >= Duration::from_millis(450) && stopped_after < Duration::from_millis(1500),
        "exit {stopped_after:?} after SIGTERM, grace_period is 500ms"
    );

    let outcome = tokio::time::timeout(Duration::from_secs(2), in_flight)
        .await
        .expect("the client learns of the close")
        .expect("request task");
    assert!(
        outcome.is_err(),
        "a request cut at the grace period got an answer: {outcome:?}"
    );
}

#[tokio::test]
async fn idle_connections_do_not_delay_the_stop() {
    let origin = Origin::named("ok").await;
    let mut flowgate = FlowgateProcess::run(&config(origin.addr, "30s"));
    let addr = flowgate.frontend_addr("web").await;

    // A keep-alive connection idle after one request, and one that never spoke.
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = read_response(&mut idle, Duration::from_secs(2))
        .await
        .expect("response");
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");

    let stop_sent = Instant::now();
    flowgate.signal("TERM");
    let code = flowgate.wait_exit(Duration::from_secs(5)).await;
    let stopped_after = stop_sent.elapsed();
    assert_eq!(code, Some(0), "log:\n{}", flowgate.log().join("\n"));
    assert!(
        stopped_after < Duration::from_secs(2),
        "idle connections held the stop for {stopped_after:?}"
    );
    for stream in [&mut idle, &mut silent] {
        let (data, end) = read_until_close(stream, Duration::from_secs(1)).await;
        assert_eq!(end, ReadEnd::Closed);
        assert!(data.is_empty(), "unexpected bytes {data:?}");
    }
}

/// With two serving threads, the thread that accepts a connection hands it to
/// the one serving fewer: held connections, http and tcp mode alike, end up
/// half on each thread, each one answered there, and the counts fall back to
/// zero as they close.
#[tokio::test]
async fn accepted_connections_are_shared_evenly_by_the_serving_threads() {
    let origin = Origin::named("served").await;
    let echo = EchoOrigin::start().await;
    let toml = format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [frontends.raw]\nbind = [\"127.0.0.1:0\"]\nmode = \"tcp\"\nbackend = \"echo\"\n\n\
         [backends.pool]\n\n{}[backends.echo]\n\n{}",
        servers_toml("pool", &[origin.addr]),
        servers_toml("echo", &[echo.addr]),
    );
    let config = flowgate::config::parse(&toml, std::path::Path::new("test.toml"))
        .unwrap_or_else(|errors| panic!("config:\n{errors}"));
    let workers = flowgate::workers::Workers::start(1).expect("a worker thread");
    let proxy = flowgate::supervisor::Proxy::start_with_workers(config, workers.handles().to_vec())
        .await
        .expect("proxy starts");
    let threads = proxy.serving_threads();
    let (web, raw) = (proxy.local_addr("web"), proxy.local_addr("raw"));
    let (web, raw) = (web.expect("web listens"), raw.expect("raw listens"));

    let mut held = held_connections(web, 8, "served").await;
    assert_eq!(threads.connections(), [4, 4], "8 http connections");
    // Each connection's events are taken by the I/O driver of the thread
    // serving it: one epoll instance per thread.
    assert_eq!(epoll_sets_holding(&[web]), [4, 4], "8 http connections");

    for n in 0..8 {
        let mut stream = TcpStream::connect(raw).await.expect("connect");
        stream.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed));
        read.await.expect("echoed in time").expect("echoed");
        assert_eq!(&echoed, b"ping", "session {n}");
        held.push(stream);
    }
    assert_eq!(threads.connections(), [8, 8], "and 8 tcp sessions");
    assert_eq!(
        epoll_sets_holding(&[web, raw]),
        [8, 8],
        "and 8 tcp sessions"
    );

    drop(held);
    wait_until(Duration::from_secs(5), "every connection ended", || {
        threads.connections() == [0, 0]
    })
    .await;
    drop(proxy);
    drop(workers);
}

/// How many of this process's established sockets accepted on `listeners`
/// each epoll instance watches (instances watching none left out, sorted),
/// from `/proc/net/tcp`, `/proc/self/fd` and each instance's `fdinfo`.
fn epoll_sets_holding(listeners: &[SocketAddr]) -> Vec<usize> {
    let ports: Vec<u16> = listeners.iter().map(SocketAddr::port).collect();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    // Inodes of established sockets whose local port is a listener's.
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1)?.rsplit(':').next()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let established = fields.get(3) == Some(&"01");
            (established && ports.contains(&port)).then(|| fields.get(9).map(|s| s.to_string()))?
        })
        .collect();
    let mut sockets = Vec::new();
    let mut epolls = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let (target, fd) = (target.to_string_lossy().into_owned(), entry.file_name());
        let fd: i32 = fd.to_string_lossy().parse().expect("an fd number");
        if target == "anon_inode:[eventpoll]" {
            epolls.push(fd);
        } else if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            if inodes.iter().any(|wanted| wanted == inode) {
                sockets.push(fd);
            }
        }
    }
    assert_eq!(sockets.len(), inodes.len(), "every accepted socket found");
    // An instance can be open under more than one fd (a runtime keeps a
    // duplicate): one count per instance, told apart by what it watches
    // (all epoll instances share one anonymous inode).
    let mut instances = std::collections::HashMap::new();
    for epoll in &epolls {
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")) else {
            continue;
        };
        let mut targets: Vec<&str> = info
            .lines()
            .filter(|line| line.starts_with("tfd:"))
            .collect();
        targets.sort_unstable();
        let watched = info
            .lines()
            .filter_map(|line| {
                line.strip_prefix("tfd:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .filter(|fd: &i32| sockets.contains(fd))
            .count();
        instances.insert(targets.join("\n"), watched);
    }
    let mut counts: Vec<usize> = instances.into_values().filter(|&count| count > 0).collect();
    counts.sort_unstable();
    counts
}
