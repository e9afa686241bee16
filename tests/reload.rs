//! Hot reload. The triggers (in-place writes, rename-saves, Kubernetes-style
//! symlink swaps, SIGHUP) through the real binary; what a reload keeps
//! (listeners that stay, client connections, long-polls and TCP sessions in
//! flight, server state) and what it refuses (an invalid file, a listener that
//! cannot bind); systemd's notify messages around start, reload and stop; and
//! how long a save takes to be answered by the new config.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    Body, EchoOrigin, FlowgateProcess, Origin, empty, full, get, start_proxy, wait_until,
};
use flowgate::config::Config;
use flowgate::supervisor::{Proxy, ReloadError};
use flowgate::upstream::AdminState;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};
use tokio_util::sync::CancellationToken;

/// Bound on every single wait in this file.
const LIMIT: Duration = Duration::from_secs(5);

/// The tests that load the machine or measure time run one at a time, so that
/// they neither slow each other down nor skew the latency figures.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a log line of a reload the binary applied starts with.
const APPLIED: &str = "reload applied generation=";
/// What every error line of a rejected reload starts with.
const REJECTED: &str = "reload failed, running config kept: ";

// ---- Configs and saving them ----

/// A frontend `web` on 127.0.0.1:0 in front of backend `pool` with `servers`
/// (name, address, weight). `backend` is extra TOML for `[backends.pool]`,
/// `check` the health check kind.
fn http_config(servers: &[(&str, SocketAddr, u32)], backend: &str, check: &str) -> String {
    let mut text = format!(
        "[global]\ngrace_period = \"5s\"\n\n\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\n{backend}\n\n\
         [backends.pool.health]\ncheck = \"{check}\"\ninterval = \"500ms\"\n\n"
    );
    for (name, addr, weight) in servers {
        text += &format!(
            "[[backends.pool.servers]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n\n"
        );
    }
    text
}

fn parse(text: &str) -> Config {
    flowgate::config::parse(text, Path::new("test.toml"))
        .unwrap_or_else(|errors| panic!("config:\n{errors}\n---\n{text}"))
}

/// Saves the way editors and config management do: a new file in the same
/// directory, renamed over the old one.
fn save_by_rename(path: &Path, text: &str) {
    let temporary = path.with_extension("toml.tmp");
    std::fs::write(&temporary, text).expect("write the new file");
    std::fs::rename(&temporary, path).expect("rename it over the config");
}

// ---- Reading the binary's log ----

/// The generation of the last reload the binary applied; 1 before any.
fn applied_generation(flowgate: &FlowgateProcess) -> u64 {
    flowgate
        .log()
        .iter()
        .filter_map(|line| {
            line.split(APPLIED)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(1)
}

/// Waits (bounded) until the binary applied a reload after `previous`; returns
/// the new generation.
async fn wait_for_reload_after(flowgate: &FlowgateProcess, previous: u64) -> u64 {
    let deadline = Instant::now() + LIMIT;
    loop {
        let generation = applied_generation(flowgate);
        if generation > previous {
            return generation;
        }
        assert!(
            Instant::now() < deadline,
            "no reload after generation {previous} within {LIMIT:?}; log:\n{}",
            flowgate.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The error lines of rejected reloads, without the prefix.
fn rejected_lines(flowgate: &FlowgateProcess) -> Vec<String> {
    flowgate
        .log()
        .iter()
        .filter_map(|line| line.split(REJECTED).nth(1).map(str::to_owned))
        .collect()
}

/// Every address a frontend started listening on, in log order.
fn listening_addrs(flowgate: &FlowgateProcess, frontend: &str) -> Vec<SocketAddr> {
    let needle = format!(" listening frontend={frontend} addr=");
    flowgate
        .log()
        .iter()
        .filter(|line| !line.contains("stopped listening"))
        .filter_map(|line| {
            line.split(&needle)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

async fn wait_until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + LIMIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts {LIMIT:?} after its listener was removed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- Clients ----

/// One HTTP/1.1 client connection, kept alive for as long as the test wants
/// it: if flowgate closed it, the next request fails instead of quietly
/// opening another connection.
struct KeepAlive(SendRequest<Body>);

impl KeepAlive {
    async fn open(addr: SocketAddr) -> Result<KeepAlive, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        stream
            .set_nodelay(true)
            .map_err(|err| format!("nodelay: {err}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| format!("handshake: {err}"))?;
        tokio::spawn(connection);
        Ok(KeepAlive(sender))
    }

    async fn get(&mut self, path: &str) -> Result<(u16, Bytes), String> {
        self.0
            .ready()
            .await
            .map_err(|err| format!("connection closed: {err}"))?;
        let request = Request::get(path)
            .header(hyper::header::HOST, "flowgate.test")
            .body(empty())
            .expect("request");
        let response = self
            .0
            .send_request(request)
            .await
            .map_err(|err| format!("request: {err}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("body: {err}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// What a set of load clients saw.
#[derive(Debug, Default)]
struct Load {
    answered: AtomicU64,
    failed: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Load {
    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first_failures.lock().expect("failures lock");
        if first.len() < 10 {
            first.push(what);
        }
    }
}

/// Sends requests without pause over one keep-alive connection until `stop`.
/// Anything but a 200 counts as a failure; after a connection error it opens
/// another connection (and that error has been counted).
async fn keep_alive_client(addr: SocketAddr, load: Arc<Load>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let mut connection = match KeepAlive::open(addr).await {
            Ok(connection) => connection,
            Err(err) => {
                load.fail(err);
                // Do not spin on a listener that refuses.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while !stop.is_cancelled() {
            match connection.get("/").await {
                Ok((200, _)) => {
                    load.answered.fetch_add(1, Ordering::SeqCst);
                }
                Ok((status, body)) => load.fail(format!("{status} {body:?}")),
                Err(err) => {
                    load.fail(err);
                    break;
                }
            }
        }
    }
}

/// Starts `count` load clients on `addr` and waits until each could have
/// answered once.
async fn start_load(
    addr: SocketAddr,
    count: usize,
) -> (
    Arc<Load>,
    CancellationToken,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let load = Arc::new(Load::default());
    let stop = CancellationToken::new();
    let clients = (0..count)
        .map(|_| tokio::spawn(keep_alive_client(addr, Arc::clone(&load), stop.clone())))
        .collect();
    let started = Arc::clone(&load);
    wait_until(LIMIT, "the load clients' first answers", move || {
        started.answered() >= count as u64
    })
    .await;
    (load, stop, clients)
}

/// Stops the load clients (each finishes the request it has in flight).
async fn stop_load(stop: CancellationToken, clients: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for client in clients {
        tokio::time::timeout(LIMIT, client)
            .await
            .expect("load client stops")
            .expect("load client task");
    }
}

/// Writes `message` on a TCP session and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    echoed
}

// ---- Under load ----

const LOAD_CLIENTS: usize = 32;
const REWRITES: usize = 50;

/// Revision `revision` of the config under load. Every revision differs from
/// the one before: the weights of s0 and s1 change, a third server s2 is there
/// in revisions 1 and 2 of every 4, a second listener `extra` in 2 and 3. A
/// route `/revision/N/` to the `marker` backend tells which one runs.
fn load_config(revision: usize, origins: &[SocketAddr], marker: SocketAddr) -> String {
    let weights = [1 + revision % 3, 1 + (revision + 1) % 3];
    let third_server = matches!(revision % 4, 1 | 2);
    let second_listener = matches!(revision % 4, 2 | 3);
    // Two threads, whatever the machine: listeners that reloads add and remove
    // accept on both, under load.
    let mut text = format!(
        "[global]\ngrace_period = \"5s\"\nthreads = 2\n\n\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\
         [[frontends.web.routes]]\npath_prefix = \"/revision/{revision}/\"\nbackend = \"marker\"\n\n"
    );
    if second_listener {
        text += "[frontends.extra]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n";
    }
    text += &format!(
        "[backends.marker]\n[backends.marker.health]\ncheck = \"none\"\n\
         [[backends.marker.servers]]\nname = \"marker\"\naddress = \"{marker}\"\n\n\
         [backends.pool]\n\n[backends.pool.health]\ncheck = \"none\"\n\n"
    );
    let count = if third_server { 3 } else { 2 };
    for (index, addr) in origins.iter().take(count).enumerate() {
        let weight = weights.get(index).copied().unwrap_or(2);
        text += &format!(
            "[[backends.pool.servers]]\nname = \"s{index}\"\naddress = \"{addr}\"\nweight = {weight}\n\n"
        );
    }
    text
}

/// Waits (bounded) until revision `revision` of [`load_config`] answers, on a
/// keep-alive connection of its own to the listener that stays.
async fn wait_for_revision(
    flowgate: &FlowgateProcess,
    connection: &mut KeepAlive,
    revision: usize,
) {
    let path = format!("/revision/{revision}/");
    let deadline = Instant::now() + LIMIT;
    loop {
        match connection.get(&path).await {
            Ok((200, body)) if body == "marker" => return,
            Ok((200, _)) => {}
            other => panic!("{path}: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "revision {revision} not running after {LIMIT:?}; log:\n{}",
            flowgate.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One request on a new connection to the second listener: it must answer 200.
async fn probe(flowgate: &FlowgateProcess, addr: SocketAddr, revision: usize, what: &str) {
    let answer = match KeepAlive::open(addr).await {
        Ok(mut connection) => connection.get("/").await,
        Err(err) => Err(err),
    };
    assert!(
        matches!(answer, Ok((200, _))),
        "{what} {addr} at revision {revision}: {answer:?}; log:\n{}",
        flowgate.log().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_lose_no_request() {
    let _heavy = HEAVY.lock().await;
    let origins = [
        Origin::named("s0").await,
        Origin::named("s1").await,
        Origin::named("s2").await,
    ];
    let marker = Origin::named("marker").await;
    let addrs: Vec<SocketAddr> = origins.iter().map(|origin| origin.addr).collect();
    let flowgate = FlowgateProcess::run(&load_config(0, &addrs, marker.addr));
    let web = flowgate.frontend_addr("web").await;
    let (load, stop, clients) = start_load(web, LOAD_CLIENTS).await;
    let mut watching = KeepAlive::open(web).await.expect("connect");

    let started = Instant::now();
    let mut extra: Option<SocketAddr> = None;
    for revision in 1..=REWRITES {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "50 reloads take more than 20s (at revision {revision})"
        );
        let text = load_config(revision, &addrs, marker.addr);
        let extra_listeners = listening_addrs(&flowgate, "extra").len();
        match revision % 3 {
            0 => std::fs::write(&flowgate.config, &text).expect("write in place"),
            1 => save_by_rename(&flowgate.config, &text),
            // The watcher sees this save too: when it comes first, SIGHUP
            // reloads the same file once more.
            _ => {
                save_by_rename(&flowgate.config, &text);
                flowgate.signal("HUP");
            }
        }
        wait_for_revision(&flowgate, &mut watching, revision).await;

        // The second listener comes, stays once, and goes.
        let wanted = matches!(revision % 4, 2 | 3);
        match (extra, wanted) {
            (None, true) => {
                // Logged just after the new config is published.
                wait_until(LIMIT, "the added listener", || {
                    listening_addrs(&flowgate, "extra").len() > extra_listeners
                })
                .await;
                let addr = *listening_addrs(&flowgate, "extra").last().expect("logged");
                probe(&flowgate, addr, revision, "the added listener").await;
                extra = Some(addr);
            }
            (Some(addr), true) => {
                probe(&flowgate, addr, revision, "the kept listener").await;
                assert_eq!(
                    listening_addrs(&flowgate, "extra").len(),
                    extra_listeners,
                    "a listener that stays was bound again"
                );
            }
            (Some(addr), false) => {
                wait_until_refused(addr).await;
                extra = None;
            }
            (None, false) => {}
        }
    }
    let reloading = started.elapsed();
    stop_load(stop, clients).await;
    let generation = applied_generation(&flowgate);

    let log = flowgate.log();
    let by = |trigger: &str| {
        log.iter()
            .filter(|line| line.contains(APPLIED) && line.contains(trigger))
            .count()
    };
    let (by_signal, by_file) = (by("SIGHUP"), by("file change"));
    // An in-place write read half-way is rejected (and its end reloads).
    let rejected = rejected_lines(&flowgate);
    eprintln!(
        "under load: {} requests answered, {} failed, through {LOAD_CLIENTS} keep-alive \
         connections during {REWRITES} rewrites in {reloading:?} (reaching generation \
         {generation}: {by_file} by file change, {by_signal} by SIGHUP; rejected: \
         {rejected:?}); per server: s0 {}, s1 {}, s2 {}",
        load.answered(),
        load.failed(),
        origins[0].count(),
        origins[1].count(),
        origins[2].count(),
    );
    assert_eq!(
        load.failed(),
        0,
        "failed requests on the listener that stayed: {:?}",
        load.first_failures.lock().expect("failures lock")
    );
    assert!(generation > REWRITES as u64, "generation {generation}");
    assert!(by_signal > 0 && by_file > 0, "both triggers were used");
    assert_eq!(
        listening_addrs(&flowgate, "web"),
        vec![web],
        "the listener under load was bound again"
    );
    assert!(origins[2].count() > 0, "the added server took no traffic");
}

// ---- In-flight work across a reload ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_finish_on_the_server_and_listener_a_reload_removed() {
    let slow = Origin::start(|request| async move {
        if request.uri().path() == "/poll" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Response::new(full("slow"))
    })
    .await;
    let fast = Origin::named("fast").await;
    let backend = "[backends.pool.timeouts]\nresponse = \"10s\"";
    // A second listener, `old`, that the reload removes with the slow server.
    let before = format!(
        "{}[frontends.old]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n",
        http_config(&[("slow", slow.addr, 1)], backend, "none")
    );
    let mut proxy = start_proxy(&before).await;
    let web = proxy.local_addr("web").expect("bound");
    let old = proxy.local_addr("old").expect("bound");

    let started = Instant::now();
    let polls = [web, old].map(|addr| tokio::spawn(get(addr, "/poll")));
    wait_until(LIMIT, "both long-polls at the slow server", || {
        slow.count() == 2
    })
    .await;

    let generation = proxy
        .reload(parse(&http_config(
            &[("fast", fast.addr, 1)],
            backend,
            "none",
        )))
        .await
        .expect("reload");
    assert_eq!(generation, 2);
    let runtime = proxy.runtime().load();
    assert!(
        runtime
            .backend("pool")
            .expect("pool")
            .server("slow")
            .is_none()
    );
    assert_eq!(
        get(web, "/").await,
        (200, "fast".to_owned()),
        "new requests"
    );
    wait_until_refused(old).await;

    for (poll, listener) in polls.into_iter().zip(["web", "old"]) {
        let (status, body) = tokio::time::timeout(LIMIT, poll)
            .await
            .expect("the long-poll ends")
            .expect("long-poll task");
        assert_eq!((status, body.as_str()), (200, "slow"), "poll on {listener}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "a poll was cut short"
    );
    assert_eq!(slow.count(), 2, "a poll was sent again");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_session_outlives_reloads() {
    let first = EchoOrigin::start().await;
    let second = EchoOrigin::start().await;
    let config = |servers: &[(&str, SocketAddr, u32)], client_idle: &str| {
        let mut text = format!(
            "[frontends.raw]\nbind = [\"127.0.0.1:0\"]\nmode = \"tcp\"\nbackend = \"echo\"\n\
             [frontends.raw.timeouts]\nclient_idle = \"{client_idle}\"\n\n\
             [backends.echo]\n[backends.echo.health]\ncheck = \"none\"\n\n"
        );
        for (name, addr, weight) in servers {
            text += &format!(
                "[[backends.echo.servers]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n\n"
            );
        }
        text
    };
    let mut proxy = start_proxy(&config(&[("first", first.addr, 1)], "60s")).await;
    let addr = proxy.local_addr("raw").expect("bound");
    let mut session = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut session, b"before").await, b"before");
    assert_eq!(first.count(), 1);

    let reloads = [
        // A weight and the frontend's idle timeout.
        config(&[("first", first.addr, 3)], "30s"),
        // A server added.
        config(
            &[("first", first.addr, 3), ("second", second.addr, 1)],
            "30s",
        ),
        // The session's own server removed: it finishes its work.
        config(&[("second", second.addr, 1)], "30s"),
    ];
    for (index, text) in reloads.iter().enumerate() {
        proxy.reload(parse(text)).await.expect("reload");
        let message = format!("after reload {index}");
        assert_eq!(
            round_trip(&mut session, message.as_bytes()).await,
            message.as_bytes()
        );
    }
    assert_eq!(proxy.local_addr("raw"), Some(addr));
    assert_eq!(first.count(), 1, "the session was opened again");

    // New sessions go to the server that is left.
    let mut fresh = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut fresh, b"new").await, b"new");
    assert_eq!(second.count(), 1);
    drop((session, fresh));
    proxy.shutdown(Duration::from_secs(1)).await;
}

// ---- Reloads that are refused ----

/// Two problems: an unknown key and a bad server address.
fn invalid_config(server: SocketAddr) -> String {
    format!(
        "[global]\ngrace_period = \"5s\"\n\n\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\nretrys = 2\n\n\
         [backends.pool.health]\ncheck = \"none\"\n\n\
         [[backends.pool.servers]]\nname = \"s0\"\naddress = \"{server}\"\n\n\
         [[backends.pool.servers]]\nname = \"s1\"\naddress = \"127.0.0.1:99999\"\n"
    )
}

/// The `FILE:LINE:COL: key: ` each problem of [`invalid_config`] is reported with.
fn invalid_config_locations(text: &str, file: &Path) -> [String; 2] {
    let line_of = |needle: &str| {
        1 + text
            .lines()
            .position(|line| line.starts_with(needle))
            .expect("line in config")
    };
    let file = file.display();
    [
        format!("{file}:{}:1: backends.pool: ", line_of("retrys")),
        format!(
            "{file}:{}:11: backends.pool.servers[1].address: ",
            line_of("address = \"127.0.0.1:99999\"")
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_during_load_keeps_the_running_config() {
    let _heavy = HEAVY.lock().await;
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let flowgate = FlowgateProcess::run(&http_config(&[("s0", a.addr, 1)], "", "none"));
    let web = flowgate.frontend_addr("web").await;
    let (load, stop, clients) = start_load(web, 8).await;

    let invalid = invalid_config(b.addr);
    // By rename: an in-place write read half-way would add its own error.
    save_by_rename(&flowgate.config, &invalid);
    let deadline = Instant::now() + LIMIT;
    while rejected_lines(&flowgate).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the invalid file was not reported; log:\n{}",
            flowgate.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every problem, in the format of `flowgate check`, once.
    let errors = rejected_lines(&flowgate);
    for (error, location) in errors
        .iter()
        .zip(invalid_config_locations(&invalid, &flowgate.config))
    {
        assert!(
            error.starts_with(&location),
            "{error:?} is not at {location:?}"
        );
    }
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["check", "--config"])
        .arg(&flowgate.config)
        .output()
        .expect("flowgate check");
    let checked: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(errors, checked, "reload and check report differently");

    // The running config serves on, unchanged.
    let answered = load.answered();
    wait_until(LIMIT, "more answers after the rejected reload", || {
        load.answered() > answered + 100
    })
    .await;
    assert_eq!(get(web, "/").await, (200, "a".to_owned()));
    assert_eq!(b.count(), 0, "part of the invalid file was applied");
    assert_eq!(applied_generation(&flowgate), 1);

    // Fixed, it is reloaded.
    save_by_rename(
        &flowgate.config,
        &http_config(&[("s0", b.addr, 1)], "", "none"),
    );
    assert_eq!(wait_for_reload_after(&flowgate, 1).await, 2);
    assert_eq!(get(web, "/").await, (200, "b".to_owned()));
    stop_load(stop, clients).await;
    eprintln!(
        "invalid file under load: {} requests answered, {} failed",
        load.answered(),
        load.failed()
    );
    assert_eq!(
        load.failed(),
        0,
        "failed requests: {:?}",
        load.first_failures.lock().expect("failures lock")
    );
    assert_eq!(rejected_lines(&flowgate).len(), 2, "one rejected reload");
}

#[tokio::test]
async fn invalid_file_counts_a_failure_and_changes_nothing() {
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flowgate.toml");
    std::fs::write(&path, http_config(&[("s0", a.addr, 1)], "", "none")).expect("write");
    let mut proxy = Proxy::start(flowgate::config::load(&path).expect("valid"))
        .await
        .expect("start");
    let addr = proxy.local_addr("web").expect("bound");

    let invalid = invalid_config(b.addr);
    std::fs::write(&path, &invalid).expect("write");
    let Err(ReloadError::Invalid(errors)) = proxy.reload_file().await else {
        panic!("an invalid file was accepted");
    };
    let lines: Vec<String> = errors.to_string().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, location) in lines.iter().zip(invalid_config_locations(&invalid, &path)) {
        assert!(
            line.starts_with(&location),
            "{line:?} is not at {location:?}"
        );
    }
    let stats = proxy.reload_stats();
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.successes.load(Ordering::Relaxed), 0);
    assert!(stats.last_errors.lock().expect("lock").is_some());
    assert_eq!(proxy.runtime().load().generation, 1);
    assert_eq!(get(addr, "/").await, (200, "a".to_owned()));

    std::fs::write(&path, http_config(&[("s0", b.addr, 1)], "", "none")).expect("write");
    assert_eq!(proxy.reload_file().await.expect("fixed file"), 2);
    let stats = proxy.reload_stats();
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.successes.load(Ordering::Relaxed), 1);
    assert!(stats.last_errors.lock().expect("lock").is_none());
    assert_eq!(get(addr, "/").await, (200, "b".to_owned()));
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// The second loopback address: no other test here listens on it.
const LOOPBACK_2: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// How many listening TCP sockets this process holds on `ip`, from /proc: the
/// listeners flowgate bound and closed again leave no trace in its own state.
fn listening_sockets_on(ip: std::net::Ipv4Addr) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    // The kernel prints the address in network byte order as a host integer.
    let local = format!("{:08X}:", u32::from_ne_bytes(ip.octets()));
    std::fs::read_to_string("/proc/self/net/tcp")
        .expect("/proc/self/net/tcp")
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| {
            fields.len() > 9
                && fields[1].starts_with(&local)
                && fields[3] == "0A" // LISTEN
                && ours.contains(fields[9])
        })
        .count()
}

#[tokio::test]
async fn listener_on_an_occupied_port_fails_the_whole_reload() {
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let occupied = std::net::TcpListener::bind((LOOPBACK_2, 0)).expect("occupy a port");
    let busy = occupied.local_addr().expect("busy addr");
    let mut proxy = start_proxy(&http_config(&[("s0", a.addr, 1)], "", "none")).await;
    let web = proxy.local_addr("web").expect("bound");
    assert_eq!(listening_sockets_on(LOOPBACK_2), 1);

    // Another server, a listener that can bind and, after it in the file, one
    // that cannot.
    let config = |with_busy: bool| {
        let mut text = http_config(&[("s0", b.addr, 1)], "", "none");
        text += &format!("[frontends.spare]\nbind = [\"{LOOPBACK_2}:0\"]\nbackend = \"pool\"\n\n");
        if with_busy {
            text += &format!("[frontends.extra]\nbind = [\"{busy}\"]\nbackend = \"pool\"\n");
        }
        text
    };
    let err = proxy
        .reload(parse(&config(true)))
        .await
        .expect_err("a listener on an occupied port");
    assert!(matches!(err, ReloadError::Bind(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("frontends.extra") && message.contains(&busy.to_string()),
        "{message}"
    );
    assert_eq!(proxy.reload_stats().failures.load(Ordering::Relaxed), 1);

    // Nothing of it applies: same generation, same listeners, same server; the
    // socket it had bound for `spare` is closed again.
    assert_eq!(proxy.runtime().load().generation, 1);
    let listeners: Vec<SocketAddr> = proxy.listeners().iter().map(|l| l.addr).collect();
    assert_eq!(listeners, vec![web]);
    assert_eq!(proxy.local_addr("spare"), None);
    assert_eq!(proxy.local_addr("extra"), None);
    assert_eq!(
        listening_sockets_on(LOOPBACK_2),
        1,
        "a socket of the failed reload is still open"
    );
    assert_eq!(get(web, "/").await, (200, "a".to_owned()));
    assert_eq!(b.count(), 0);

    // Without the listener on the occupied port, the rest loads.
    assert_eq!(
        proxy.reload(parse(&config(false))).await.expect("reload"),
        2
    );
    let spare = proxy.local_addr("spare").expect("spare bound");
    assert_eq!(listening_sockets_on(LOOPBACK_2), 2);
    assert_eq!(get(spare, "/").await, (200, "b".to_owned()));
    assert_eq!(get(web, "/").await, (200, "b".to_owned()));
    drop(occupied);
    proxy.shutdown(Duration::from_secs(1)).await;
}

// ---- Triggers ----

#[tokio::test]
async fn symlink_swap_like_a_configmap_reloads() {
    use std::os::unix::fs::symlink;

    let origins = [
        Origin::named("v1").await,
        Origin::named("v2").await,
        Origin::named("v3").await,
    ];
    let config = |version: usize| http_config(&[("s0", origins[version - 1].addr, 1)], "", "none");
    // What the kubelet lays out for a ConfigMap volume:
    //   flowgate.toml -> ..data/flowgate.toml, ..data -> ..v1, ..v1/flowgate.toml
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let version_dir = |version: usize| {
        let path = root.join(format!("..2025_01_01_00_00_0{version}.000000000"));
        std::fs::create_dir(&path).expect("version dir");
        std::fs::write(path.join("flowgate.toml"), config(version)).expect("write version");
        path
    };
    let v1 = version_dir(1);
    symlink(v1.file_name().expect("name"), root.join("..data")).expect("..data");
    symlink("..data/flowgate.toml", root.join("flowgate.toml")).expect("flowgate.toml");
    let flowgate = FlowgateProcess::run_in(dir, root.join("flowgate.toml"), &[]);
    let web = flowgate.frontend_addr("web").await;
    assert_eq!(get(web, "/").await.1, "v1");

    // An update: a new version directory, `..data` swapped by rename, the old
    // version removed.
    let mut previous = v1;
    for version in [2, 3] {
        let next = version_dir(version);
        let swap = root.join("..data_tmp");
        symlink(next.file_name().expect("name"), &swap).expect("new link");
        std::fs::rename(&swap, root.join("..data")).expect("swap ..data");
        std::fs::remove_dir_all(&previous).expect("remove old version");
        previous = next;

        let generation = wait_for_reload_after(&flowgate, version as u64 - 1).await;
        assert_eq!(generation, version as u64);
        assert_eq!(get(web, "/").await.1, format!("v{version}"));
    }
    assert!(
        flowgate
            .log()
            .iter()
            .any(|line| line.contains(APPLIED) && line.contains("file change"))
    );
}

#[tokio::test]
async fn sigusr1_neither_stops_nor_reloads() {
    let origin = Origin::named("ok").await;
    let mut flowgate = FlowgateProcess::run(&http_config(&[("s0", origin.addr, 1)], "", "none"));
    let web = flowgate.frontend_addr("web").await;

    // What logrotate's postrotate sends; its default action ends a process.
    flowgate.signal("USR1");
    flowgate.wait_for_log("SIGUSR1", LIMIT).await;
    assert_eq!(get(web, "/").await, (200, "ok".to_owned()));
    assert_eq!(applied_generation(&flowgate), 1, "SIGUSR1 reloaded");

    flowgate.signal("TERM");
    assert_eq!(flowgate.wait_exit(LIMIT).await, Some(0));
}

#[tokio::test]
async fn save_during_a_reload_is_reloaded_too() {
    let (a, c) = (Origin::named("a").await, Origin::named("c").await);
    // A server whose checks hang: a reload that adds it waits for its first
    // check until the check timeout.
    let hanging = Origin::start(|_| std::future::pending()).await;
    let config = |servers: &[(&str, SocketAddr, u32)]| {
        http_config(servers, "", "http").replace(
            "interval = \"500ms\"",
            "interval = \"10s\"\ntimeout = \"1s\"",
        )
    };
    let flowgate = FlowgateProcess::run(&config(&[("s0", a.addr, 1)]));
    let web = flowgate.frontend_addr("web").await;

    // Save B: its reload has read the file once the new server gets its check.
    save_by_rename(
        &flowgate.config,
        &config(&[("s0", a.addr, 1), ("slow", hanging.addr, 1)]),
    );
    wait_until(LIMIT, "the first check of the added server", || {
        hanging.count() == 1
    })
    .await;
    // Save C while that reload still runs.
    save_by_rename(&flowgate.config, &config(&[("s0", c.addr, 1)]));

    assert_eq!(wait_for_reload_after(&flowgate, 1).await, 2, "B");
    // C must not be lost: it is what the file says now.
    assert_eq!(
        wait_for_reload_after(&flowgate, 2).await,
        3,
        "C was not reloaded"
    );
    assert_eq!(get(web, "/").await, (200, "c".to_owned()));
}

#[tokio::test]
async fn save_during_start_is_reloaded() {
    let c = Origin::named("c").await;
    // The first check of this server holds the start for the check timeout.
    let hanging = Origin::start(|_| std::future::pending()).await;
    let slow_check = |text: String| {
        text.replace(
            "interval = \"500ms\"",
            "interval = \"10s\"\ntimeout = \"1s\"",
        )
    };
    let flowgate = FlowgateProcess::run(&slow_check(http_config(
        &[("slow", hanging.addr, 1)],
        "",
        "http",
    )));
    wait_until(LIMIT, "the first check at start", || hanging.count() == 1).await;
    save_by_rename(
        &flowgate.config,
        &slow_check(http_config(&[("s0", c.addr, 1)], "", "http")),
    );

    let web = flowgate.frontend_addr("web").await;
    assert_eq!(
        wait_for_reload_after(&flowgate, 1).await,
        2,
        "the save was lost"
    );
    assert_eq!(get(web, "/").await, (200, "c".to_owned()));
}

// ---- What a server that stays keeps ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_server_stays_drained_across_a_reload() {
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let mut proxy = start_proxy(&http_config(
        &[("s0", a.addr, 1), ("s1", b.addr, 1)],
        "",
        "tcp",
    ))
    .await;
    let web = proxy.local_addr("web").expect("bound");
    let server = |proxy: &Proxy| {
        let runtime = proxy.runtime().load();
        Arc::clone(
            runtime
                .backend("pool")
                .expect("pool")
                .server("s1")
                .expect("s1"),
        )
    };
    let before = server(&proxy);
    assert_eq!(before.state.check_status().status, "ok");
    before.state.set_admin_state(AdminState::Drain);

    let generation = proxy
        .reload(parse(&http_config(
            &[("s0", a.addr, 1), ("s1", b.addr, 3)],
            "",
            "tcp",
        )))
        .await
        .expect("reload");
    assert_eq!(generation, 2);
    let after = server(&proxy);
    assert!(
        !Arc::ptr_eq(&before, &after),
        "a new snapshot has new servers"
    );
    assert!(
        Arc::ptr_eq(&before.state, &after.state),
        "state not carried over"
    );
    assert_eq!(after.base_weight(), 3, "the new weight");
    assert_eq!(after.state.admin_state(), AdminState::Drain);
    assert_eq!(
        after.state.check_status().status,
        "ok",
        "health state reset"
    );

    for _ in 0..20 {
        assert_eq!(get(web, "/").await, (200, "a".to_owned()));
    }
    assert_eq!(b.count(), 0, "a drained server got requests");

    // Back to ready, it takes its new share (3 of 4).
    after.state.set_admin_state(AdminState::Ready);
    for _ in 0..40 {
        assert_eq!(get(web, "/").await.0, 200);
    }
    assert!((25..=35).contains(&b.count()), "s1 got {} of 40", b.count());
    proxy.shutdown(Duration::from_secs(1)).await;
}

// ---- systemd ----

/// The next datagram on the notify socket, bounded.
async fn notification(socket: &UnixDatagram) -> String {
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buffer))
        .await
        .expect("a notify message in time")
        .expect("recv");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

#[tokio::test]
async fn sd_notify_messages_in_order_across_start_reload_and_stop() {
    let origin = Origin::named("ok").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let config = dir.path().join("flowgate.toml");
    std::fs::write(&config, http_config(&[("s0", origin.addr, 1)], "", "http")).expect("write");
    let mut flowgate =
        FlowgateProcess::run_in(dir, config, &[("NOTIFY_SOCKET", socket_path.as_os_str())]);

    assert_eq!(notification(&socket).await, "READY=1\n");
    // Ready means bound and checked: the origin counted the check request
    // before it answered it.
    assert!(origin.count() >= 1, "READY=1 before the first check");
    let web = flowgate.frontend_addr("web").await;
    assert_eq!(get(web, "/").await.0, 200);

    flowgate.signal("HUP");
    let reloading = notification(&socket).await;
    let mut fields: Vec<&str> = reloading.lines().collect();
    fields.sort_unstable();
    assert_eq!(fields.len(), 2, "{reloading:?}");
    assert_eq!(fields[1], "RELOADING=1", "{reloading:?}");
    let usec: u64 = fields[0]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|usec| usec.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    assert_eq!(notification(&socket).await, "READY=1\n");
    assert_eq!(wait_for_reload_after(&flowgate, 1).await, 2);

    flowgate.signal("TERM");
    assert_eq!(notification(&socket).await, "STOPPING=1\n");
    assert_eq!(flowgate.wait_exit(LIMIT).await, Some(0));
    let mut buffer = [0u8; 64];
    assert!(
        socket.try_recv(&mut buffer).is_err(),
        "a message after STOPPING=1"
    );
}

#[tokio::test]
async fn watchdog_pings_at_half_of_watchdog_usec() {
    let origin = Origin::named("ok").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let config = dir.path().join("flowgate.toml");
    std::fs::write(&config, http_config(&[("s0", origin.addr, 1)], "", "none")).expect("write");
    // systemd names the process that should ping in WATCHDOG_PID; the shell
    // sets its own pid, which flowgate keeps through exec.
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_flowgate"))
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000");
    let mut flowgate = FlowgateProcess::run_command(command, dir, config);

    assert_eq!(notification(&socket).await, "READY=1\n");
    let mut pings = Vec::new();
    while pings.len() < 3 {
        assert_eq!(notification(&socket).await, "WATCHDOG=1\n");
        pings.push(Instant::now());
    }
    let span = pings[2] - pings[0];
    // Every 100 ms; far less often than that would let systemd kill it.
    assert!(
        span >= Duration::from_millis(150) && span < Duration::from_secs(2),
        "3 pings over {span:?} at WATCHDOG_USEC=200ms"
    );
    flowgate.signal("TERM");
    assert_eq!(flowgate.wait_exit(LIMIT).await, Some(0));
}

// ---- Latency ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_latency_from_save_to_answer() {
    const RELOADS: usize = 20;
    let _heavy = HEAVY.lock().await;
    let origins = [Origin::named("even").await, Origin::named("odd").await];
    let names = ["even", "odd"];
    let config = |revision: usize| {
        format!(
            "# revision {revision}\n{}",
            http_config(&[("s0", origins[revision % 2].addr, 1)], "", "none")
        )
    };
    let flowgate = FlowgateProcess::run(&config(0));
    let web = flowgate.frontend_addr("web").await;
    let mut client = KeepAlive::open(web).await.expect("connect");
    assert_eq!(client.get("/").await.expect("answer").1, "even");

    let mut latencies = Vec::new();
    let mut generation = 1;
    for revision in 1..=RELOADS {
        let expected = names[revision % 2];
        let saved = Instant::now();
        save_by_rename(&flowgate.config, &config(revision));
        loop {
            let (status, body) = client.get("/").await.expect("answer during the reload");
            assert_eq!(status, 200);
            if body == expected {
                break;
            }
            assert!(
                saved.elapsed() < LIMIT,
                "revision {revision} not answering after {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(saved.elapsed());
        generation = wait_for_reload_after(&flowgate, generation).await;
    }
    latencies.sort_unstable();
    let median = (latencies[RELOADS / 2 - 1] + latencies[RELOADS / 2]) / 2;
    eprintln!(
        "reload latency, rename-save to the new config answering, {RELOADS} reloads at a \
         {:?} debounce: min {:?}, median {median:?}, max {:?}",
        flowgate::config::watch::DEBOUNCE,
        latencies[0],
        latencies[RELOADS - 1],
    );
    assert!(median < Duration::from_secs(1), "median {median:?}");
}
