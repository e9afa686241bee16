//! Failover through the real proxy: no client sees a dead engine. A server killed
//! in the middle of a stream of requests, the FIFO queue behind
//! `max_connections`, retries that never replay a request that may have had
//! effects, passive ejection, no server up, and tcp-mode sessions.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    EchoOrigin, Engine, HttpClient, Origin, ResettingOrigin, client, empty, fetch, full,
    server_state, start_proxy, wait_refused, wait_until,
};
use flowgate::upstream::Health;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Checks every 50 ms in every phase, rise 2, fall 3.
const FAST_CHECKS: &str = r#"check = "http"
path = "/health"
interval = "50ms"
fast_interval = "50ms"
down_interval = "50ms"
timeout = "200ms"
rise = 2
fall = 3
"#;

const NO_CHECKS: &str = "check = \"none\"\n";

const LIMIT: Duration = Duration::from_secs(5);

/// An http frontend `web` in front of backend `b` with `backend` settings (which
/// may open further `[backends.b.*]` tables), a `[backends.b.health]` table and
/// servers s0, s1, ... at `addrs`.
fn config(backend: &str, health: &str, addrs: &[SocketAddr]) -> String {
    format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"b\"\n\n\
         [backends.b]\n{backend}\n\n[backends.b.health]\n{health}\n{}",
        common::servers_toml("b", addrs)
    )
}

/// An answer with `status` and an empty body.
fn status(code: u16) -> Response<common::Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::from_u16(code).expect("status");
    response
}

/// A steady stream of GETs from a few client loops, bounded in count and time;
/// every answer other than a 200, and every request that got no answer, is a
/// failure.
struct Stream {
    answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    loops: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Stream {
    fn start(addr: SocketAddr, loops: usize, max: usize, limit: Duration) -> Stream {
        let http = client();
        let started = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + limit;
        let loops = (0..loops)
            .map(|_| {
                let (http, started, answered, stop) = (
                    http.clone(),
                    Arc::clone(&started),
                    Arc::clone(&answered),
                    Arc::clone(&stop),
                );
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::SeqCst)
                        && Instant::now() < deadline
                        && started.fetch_add(1, Ordering::SeqCst) < max
                    {
                        match send_get(&http, addr).await {
                            Ok((200, _)) => {}
                            Ok((code, body)) => failures.push(format!("{code}: {body}")),
                            Err(err) => failures.push(err),
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                        // A steady rate rather than a flood.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    failures
                })
            })
            .collect();
        Stream {
            answered,
            stop,
            loops,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Stops the loops; how many requests were answered, and the failures.
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for task in self.loops {
            failures.extend(task.await.expect("client loop"));
        }
        (self.answered.load(Ordering::SeqCst), failures)
    }
}

async fn send_get(http: &HttpClient, addr: SocketAddr) -> Result<(u16, String), String> {
    let response = http
        .get(format!("http://{addr}/").parse().expect("uri"))
        .await
        .map_err(|err| format!("request failed: {err:?}"))?;
    let code = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("body failed: {err}"))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_engines_fails_no_request() {
    let engines = [
        Engine::start("s0", "/health", 200).await,
        Engine::start("s1", "/health", 200).await,
        Engine::start("s2", "/health", 200).await,
    ];
    let addrs: Vec<SocketAddr> = engines.iter().map(Engine::addr).collect();
    let proxy = start_proxy(&config("retries = 2", FAST_CHECKS, &addrs)).await;
    let addr = proxy.local_addr("web").expect("bound");
    let state = server_state(&proxy, "b", 1);

    let stream = Stream::start(addr, 2, 4000, Duration::from_secs(10));
    wait_until(LIMIT, "the stream under way", || stream.answered() >= 50).await;
    assert!(
        engines[1].traffic() > 0,
        "s1 took no traffic before the kill"
    );

    // The engine dies: its listener closes and its open connections drop.
    engines[1].stop();
    wait_until(LIMIT, "s1 marked down", || state.health() == Health::Down).await;
    let at_down = stream.answered();
    wait_until(LIMIT, "traffic while s1 is down", || {
        stream.answered() >= at_down + 50
    })
    .await;

    // It restarts on the same address.
    let restarted = Engine::start_on(addrs[1], "s1", "/health", 200).await;
    restarted.observe(Arc::clone(&state));
    wait_until(LIMIT, "a check that sees s1 up", || {
        restarted
            .checks()
            .iter()
            .any(|check| check.state == Some(Health::Up))
    })
    .await;
    let checks = restarted.checks();
    // A check that arrived before `observe` came before any success was counted.
    let before_up = checks
        .iter()
        .position(|check| check.state == Some(Health::Up))
        .expect("a check saw it up");
    assert_eq!(before_up, 2, "up after exactly rise = 2 checks: {checks:?}");
    wait_until(LIMIT, "traffic to the restarted s1", || {
        restarted.traffic() >= 10
    })
    .await;

    let (answered, failures) = stream.finish().await;
    eprintln!("{answered} requests answered across the kill and the restart");
    assert!(
        failures.is_empty(),
        "{} of {answered} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// An origin that holds every request until `gate` is closed.
async fn gated_origin(gate: &Arc<tokio::sync::Semaphore>) -> Origin {
    let gate = Arc::clone(gate);
    Origin::start(move |_| {
        let gate = Arc::clone(&gate);
        async move {
            // Closing the semaphore lets every waiter through at once.
            let _ = gate.acquire().await;
            Response::new(full("done"))
        }
    })
    .await
}

fn backend_queue(proxy: &flowgate::supervisor::Proxy) -> Arc<flowgate::upstream::Queue> {
    let runtime = proxy.runtime().load();
    Arc::clone(&runtime.backend("b").expect("backend").queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_queues_requests_in_fifo_order() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let (current, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let origin = {
        let (arrivals, current, most) = (
            Arc::clone(&arrivals),
            Arc::clone(&current),
            Arc::clone(&most),
        );
        Origin::start(move |request| {
            let seq: usize = request
                .headers()
                .get("x-seq")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
                .expect("x-seq");
            arrivals.lock().expect("arrivals").push(seq);
            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let current = Arc::clone(&current);
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                current.fetch_sub(1, Ordering::SeqCst);
                Response::new(full(seq.to_string()))
            }
        })
        .await
    };
    let toml = format!(
        "{}max_connections = 2\n",
        config("", NO_CHECKS, &[origin.addr])
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");
    let queue = backend_queue(&proxy);

    let http = client();
    let mut requests = Vec::new();
    for seq in 0..10usize {
        let http = http.clone();
        requests.push(tokio::spawn(async move {
            let request = Request::get(format!("http://{addr}/"))
                .header("x-seq", seq)
                .body(empty())
                .expect("request");
            let response = http.request(request).await.expect("response");
            let code = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (code, body)
        }));
        // Each is sent once the previous one is placed (at the origin or in the
        // queue), so the queue order is known; and 20 ms apart, so the slots
        // freed for them come free 20 ms apart too and two requests handed a slot
        // do not race each other to the origin.
        wait_until(LIMIT, "request placed", || {
            arrivals.lock().expect("arrivals").len() + queue.len() == seq + 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (seq, request) in requests.into_iter().enumerate() {
        let (code, body) = request.await.expect("request task");
        assert_eq!((code, body), (200, Bytes::from(seq.to_string())));
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "concurrent requests at the origin"
    );
    assert_eq!(
        *arrivals.lock().expect("arrivals"),
        (0..10).collect::<Vec<_>>(),
        "the origin saw them out of queue order"
    );
    assert_eq!(queue.len(), 0);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_at_once() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let origin = gated_origin(&gate).await;
    let toml = format!(
        "{}max_connections = 2\n",
        config(
            "max_queue = 1\n\n[backends.b.timeouts]\nqueue = \"5s\"",
            NO_CHECKS,
            &[origin.addr]
        )
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");
    let queue = backend_queue(&proxy);

    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { common::get(addr, "/").await }))
        .collect();
    wait_until(LIMIT, "both slots busy", || origin.count() == 2).await;
    let waiting = tokio::spawn(async move { common::get(addr, "/").await });
    wait_until(LIMIT, "one request queued", || queue.len() == 1).await;

    let started = Instant::now();
    let answer = common::get(addr, "/").await;
    let took = started.elapsed();
    assert_eq!(answer, (503, "server queue full\n".to_string()));
    assert!(took < Duration::from_millis(500), "503 after {took:?}");

    gate.close();
    for request in held.into_iter().chain([waiting]) {
        assert_eq!(request.await.expect("task"), (200, "done".to_string()));
    }
    assert_eq!(origin.count(), 3, "the refused request reached the origin");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_times_out_with_503() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let origin = gated_origin(&gate).await;
    let toml = format!(
        "{}max_connections = 1\n",
        config(
            "[backends.b.timeouts]\nqueue = \"200ms\"",
            NO_CHECKS,
            &[origin.addr]
        )
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");
    let queue = backend_queue(&proxy);

    let held = tokio::spawn(async move { common::get(addr, "/").await });
    wait_until(LIMIT, "the slot busy", || origin.count() == 1).await;

    let started = Instant::now();
    let answer = common::get(addr, "/").await;
    let took = started.elapsed();
    assert_eq!(
        answer,
        (503, "timed out waiting for a server\n".to_string())
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
        "queue timeout of 200ms answered after {took:?}"
    );
    assert_eq!(queue.len(), 0, "the timed-out waiter left the queue");

    gate.close();
    assert_eq!(held.await.expect("task"), (200, "done".to_string()));
    assert_eq!(origin.count(), 1);
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// A request waiting for a slot gets one as soon as a server can take it, also
/// when the slot came free while its server was down: nothing hands that slot
/// over, so the server's return must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_is_served_when_its_server_comes_back() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let arrived = Arc::new(AtomicUsize::new(0));
    let origin = {
        let (gate, health, arrived) =
            (Arc::clone(&gate), Arc::clone(&health), Arc::clone(&arrived));
        Origin::start(move |request| {
            let (gate, health, arrived) =
                (Arc::clone(&gate), Arc::clone(&health), Arc::clone(&arrived));
            async move {
                if request.uri().path() == "/health" {
                    return status(health.load(Ordering::SeqCst));
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                let _ = gate.acquire().await;
                Response::new(full("done"))
            }
        })
        .await
    };
    let toml = format!(
        "{}max_connections = 1\n",
        config(
            "[backends.b.timeouts]\nqueue = \"3s\"",
            FAST_CHECKS,
            &[origin.addr]
        )
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");
    let queue = backend_queue(&proxy);
    let state = server_state(&proxy, "b", 0);

    let running = tokio::spawn(async move { common::get(addr, "/").await });
    wait_until(LIMIT, "the slot busy", || {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    let waiting = tokio::spawn(async move { common::get(addr, "/").await });
    wait_until(LIMIT, "one request queued", || queue.len() == 1).await;

    // The server goes down while busy; its running request ends meanwhile.
    health.store(503, Ordering::SeqCst);
    wait_until(LIMIT, "server down", || state.health() == Health::Down).await;
    gate.close();
    assert_eq!(running.await.expect("task"), (200, "done".to_string()));
    // It comes back with its slot free.
    health.store(200, Ordering::SeqCst);
    wait_until(LIMIT, "server up", || state.health() == Health::Up).await;
    let back = Instant::now();
    let answer = waiting.await.expect("task");
    assert_eq!(
        answer,
        (200, "done".to_string()),
        "the waiting request, {:?} after its server came back with a free slot",
        back.elapsed()
    );
    assert!(
        back.elapsed() < Duration::from_millis(500),
        "served {:?} after its server came back",
        back.elapsed()
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

async fn post(http: &HttpClient, addr: SocketAddr) -> u16 {
    let request = Request::post(format!("http://{addr}/workflows/start"))
        .header("content-type", "application/json")
        .body(full(r#"{"workflow":"payment"}"#))
        .expect("request");
    let response = http.request(request).await.expect("response");
    let code = response.status().as_u16();
    let _ = response.into_body().collect().await;
    code
}

/// A server that resets the connection after receiving a request may have acted
/// on it: a POST is not sent again, a GET is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_server_received_is_never_replayed() {
    let crashing = ResettingOrigin::start().await;
    let healthy = Origin::named("healthy").await;
    let proxy = start_proxy(&config(
        "retries = 2\nredispatch = true",
        NO_CHECKS,
        &[crashing.addr, healthy.addr],
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    let stats = {
        let runtime = proxy.runtime().load();
        Arc::clone(&runtime.backend("b").expect("backend").stats)
    };
    let http = client();

    let mut bad_gateways = 0;
    for _ in 0..6 {
        let (crashed, served) = (crashing.count(), healthy.count());
        match post(&http, addr).await {
            502 => {
                bad_gateways += 1;
                assert_eq!(
                    crashing.count(),
                    crashed + 1,
                    "one delivery to the crashing server"
                );
                assert_eq!(healthy.count(), served, "the POST was replayed");
            }
            200 => {
                assert_eq!(crashing.count(), crashed);
                assert_eq!(healthy.count(), served + 1);
            }
            other => panic!("POST answered {other}"),
        }
    }
    assert!(bad_gateways > 0, "no POST went to the crashing server");
    assert_eq!(stats.retries.load(Ordering::Relaxed), 0);

    let (crashed, served) = (crashing.count(), healthy.count());
    for _ in 0..6 {
        assert_eq!(fetch(&http, addr, "/").await, (200, "healthy".to_string()));
    }
    let hit_crashing = crashing.count() - crashed;
    assert!(hit_crashing > 0, "no GET went to the crashing server");
    assert_eq!(healthy.count() - served, 6);
    assert_eq!(
        stats.retries.load(Ordering::Relaxed),
        hit_crashing as u64,
        "one retry per GET the crashing server reset"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_up_answers_503_at_once() {
    let engines = [
        Engine::start("s0", "/health", 503).await,
        Engine::start("s1", "/health", 503).await,
        Engine::start("s2", "/health", 503).await,
    ];
    let addrs: Vec<SocketAddr> = engines.iter().map(Engine::addr).collect();
    let proxy = start_proxy(&config("retries = 2", FAST_CHECKS, &addrs)).await;
    let addr = proxy.local_addr("web").expect("bound");
    for index in 0..3 {
        assert_eq!(server_state(&proxy, "b", index).health(), Health::Down);
    }
    let http = client();
    for _ in 0..5 {
        let started = Instant::now();
        let answer = fetch(&http, addr, "/").await;
        let took = started.elapsed();
        assert_eq!(answer, (503, "no server available\n".to_string()));
        assert!(took < Duration::from_millis(50), "503 after {took:?}");
    }
    assert!(engines.iter().all(|engine| engine.traffic() == 0));
    proxy.shutdown(Duration::from_secs(1)).await;
}

const PASSIVE: &str =
    "retries = 0\n\n[backends.b.passive]\nconsecutive_failures = 3\nejection_time = \"500ms\"";

/// Sends GETs (at most `max`, a few ms apart, within `limit`) until `done`.
async fn send_until(
    http: &HttpClient,
    addr: SocketAddr,
    max: usize,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    let mut sent = 0;
    while !done() {
        assert!(
            sent < max && Instant::now() < deadline,
            "not done after {sent} requests"
        );
        let (code, _) = fetch(http, addr, "/").await;
        assert!(code == 200 || code == 503, "answered {code}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_checks_eject_a_failing_server_for_longer_each_time() {
    let failing = Origin::start(|_| async { status(503) }).await;
    let healthy = Origin::named("healthy").await;
    let proxy = start_proxy(&config(PASSIVE, NO_CHECKS, &[failing.addr, healthy.addr])).await;
    let addr = proxy.local_addr("web").expect("bound");
    let state = server_state(&proxy, "b", 0);
    let http = client();

    for (round, ejection) in [(1, Duration::from_millis(500)), (2, Duration::from_secs(1))] {
        // Three failures in a row (one of them already counted after round 1).
        send_until(&http, addr, 20, LIMIT, || failing.count() == 3 * round).await;
        let ejected = Instant::now();
        assert!(state.is_ejected(), "round {round}: not ejected");
        for _ in 0..20 {
            assert_eq!(fetch(&http, addr, "/").await, (200, "healthy".to_string()));
        }
        assert_eq!(failing.count(), 3 * round, "an ejected server took traffic");
        send_until(&http, addr, 2000, LIMIT, || failing.count() > 3 * round).await;
        let out = ejected.elapsed();
        eprintln!("ejection {round} lasted {out:?}");
        assert!(
            out >= ejection - Duration::from_millis(50),
            "ejection {round} lasted {out:?}, expected {ejection:?}"
        );
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_checks_never_eject_the_last_server() {
    let failing = Origin::start(|_| async { status(503) }).await;
    let proxy = start_proxy(&config(PASSIVE, NO_CHECKS, &[failing.addr])).await;
    let addr = proxy.local_addr("web").expect("bound");
    let http = client();
    for _ in 0..10 {
        assert_eq!(fetch(&http, addr, "/").await.0, 503);
    }
    assert_eq!(failing.count(), 10, "every request reached the only server");
    assert!(!server_state(&proxy, "b", 0).is_ejected());
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// One tcp session: sends a line, half-closes, expects it echoed back whole.
async fn echo_session(addr: SocketAddr, n: usize) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let line = format!("session {n}\n");
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(|err| format!("write: {err}"))?;
    stream
        .shutdown()
        .await
        .map_err(|err| format!("shutdown: {err}"))?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut back))
        .await
        .map_err(|_| "no end of session within 2s".to_string())?
        .map_err(|err| format!("read: {err}"))?;
    if back == line.as_bytes() {
        Ok(())
    } else {
        Err(format!(
            "session {n}: got {:?}",
            String::from_utf8_lossy(&back)
        ))
    }
}

async fn sessions(addr: SocketAddr, count: usize) -> Vec<String> {
    let mut failures = Vec::new();
    for n in 0..count {
        if let Err(err) = echo_session(addr, n).await {
            failures.push(err);
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sessions_fail_over_and_close_at_once_with_no_server() {
    let echoes = [EchoOrigin::start().await, EchoOrigin::start().await];
    let addrs = [echoes[0].addr, echoes[1].addr];
    let toml = format!(
        "[frontends.tcp]\nbind = [\"127.0.0.1:0\"]\nmode = \"tcp\"\nbackend = \"b\"\n\n\
         [backends.b]\nretries = 2\n\n[backends.b.health]\ncheck = \"tcp\"\n\
         interval = \"50ms\"\nfast_interval = \"50ms\"\ndown_interval = \"50ms\"\n\
         timeout = \"200ms\"\nrise = 2\nfall = 3\n\n{}",
        common::servers_toml("b", &addrs)
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("tcp").expect("bound");
    let states = [server_state(&proxy, "b", 0), server_state(&proxy, "b", 1)];

    assert_eq!(sessions(addr, 20).await, Vec::<String>::new());
    assert!(echoes.iter().all(|echo| echo.count() > 0));

    // s1 dies; new sessions go on before and after it is marked down.
    echoes[1].stop();
    wait_refused(addrs[1], LIMIT).await;
    let failures = sessions(addr, 100).await;
    assert!(
        failures.is_empty(),
        "{} of 100 sessions failed: {failures:?}",
        failures.len()
    );
    wait_until(LIMIT, "s1 down", || states[1].health() == Health::Down).await;

    // It comes back on the same address and takes sessions again.
    let restarted = EchoOrigin::start_on(addrs[1]).await;
    wait_until(LIMIT, "s1 up again", || states[1].health() == Health::Up).await;
    assert_eq!(sessions(addr, 20).await, Vec::<String>::new());
    assert!(restarted.count() > 0, "the restarted server got no session");

    // Every server gone: the client is closed at once.
    echoes[0].stop();
    restarted.stop();
    wait_refused(addrs[0], LIMIT).await;
    wait_refused(addrs[1], LIMIT).await;
    wait_until(LIMIT, "both down", || {
        states.iter().all(|state| state.health() == Health::Down)
    })
    .await;
    for _ in 0..5 {
        let started = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = stream.write_all(b"anyone?\n").await;
        let mut back = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut back))
            .await
            .expect("the session was not closed within 1s");
        let took = started.elapsed();
        assert!(read.is_err() || back.is_empty(), "got {back:?}");
        assert!(took < Duration::from_millis(50), "closed after {took:?}");
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}
