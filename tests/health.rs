//! Active health checks through the real proxy: servers move up and down after
//! exactly `rise`/`fall` checks, the first check before accepting, transition log
//! lines, leader/follower pools with `balance = "first"`, backup servers, slow
//! start, and checks on a management port of their own.
//!
//! Checks are placed, not timed: each engine records, with every check it
//! receives, the server's state in the proxy at that moment. Checks of one server
//! run one after another, so that state is the outcome of all earlier checks.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    CheckSeen, Engine, FlowgateProcess, client, get, server, server_state, start_proxy, wait_until,
};
use flowgate::upstream::{Health, ServerStatus};

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

const LIMIT: Duration = Duration::from_secs(5);

/// An http frontend `web` in front of backend `b` with `backend` settings, a
/// `[backends.b.health]` table and `servers` (TOML for `[[backends.b.servers]]`).
fn config(backend: &str, health: &str, servers: &str) -> String {
    format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"b\"\n\n\
         [backends.b]\n{backend}\n\n[backends.b.health]\n{health}\n{servers}"
    )
}

/// `[[backends.b.servers]]` for engines named s0, s1, ... with extra keys.
fn servers(engines: &[&Engine], extra: &[&str]) -> String {
    engines
        .iter()
        .enumerate()
        .map(|(i, engine)| {
            format!(
                "[[backends.b.servers]]\nname = \"s{i}\"\naddress = \"{}\"\n{}\n\n",
                engine.addr(),
                extra.get(i).copied().unwrap_or("")
            )
        })
        .collect()
}

/// An address on 127.0.0.1 where nothing listens.
fn dead_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// The states seen by the scripted checks, in order.
fn scripted(checks: &[CheckSeen]) -> Vec<(u16, Health)> {
    checks
        .iter()
        .filter(|check| check.scripted)
        .map(|check| (check.answered, check.state.expect("observed")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_move_a_server_exactly_at_fall_and_rise() {
    let engine = Engine::start("s0", "/health", 200).await;
    let proxy = start_proxy(&config("", FAST_CHECKS, &servers(&[&engine], &[]))).await;
    let state = server_state(&proxy, "b", 0);
    assert_eq!(state.health(), Health::Up, "up after its first check");
    engine.observe(Arc::clone(&state));

    // Two failures and a success do not take it down; three failures do. While
    // down, a failure restarts the count; two successes bring it back.
    let script = [
        503, 503, 200, // a success resets the failure streak
        503, 503, 503, // the third failure in a row: down
        503, 200, 503, // one success is not enough, a failure restarts the count
        200, 200, // the second success in a row: up
        200,
    ];
    engine.script(&script);
    wait_until(LIMIT, "every scripted check answered", || {
        engine.checks().iter().filter(|c| c.scripted).count() == script.len()
    })
    .await;
    // The check after the last scripted one sees the final state too.
    let total = engine.checks().len();
    wait_until(LIMIT, "one more check", || engine.checks().len() > total).await;
    let next_state = engine.checks()[total].state.expect("observed");

    use Health::{Down, Up};
    let seen: Vec<Health> = scripted(&engine.checks())
        .into_iter()
        .map(|(_, state)| state)
        .skip(1)
        .chain([next_state])
        .collect();
    // seen[k]: the state after scripted check k.
    assert_eq!(
        seen,
        [Up, Up, Up, Up, Up, Down, Down, Down, Down, Down, Up, Up],
        "state after each scripted check {script:?}"
    );
    assert_eq!(state.status(), ServerStatus::Up);
    assert_eq!(state.check_status().detail, "HTTP 200");
    // Failed checks are counted: every 503 of the script.
    assert_eq!(state.check_failures(), 7);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_is_down_until_its_first_check() {
    let engine = Engine::start("s0", "/health", 200).await;
    // A slow health endpoint: start must wait for the answer.
    engine.delay_checks(Duration::from_millis(150));
    let toml = config("", FAST_CHECKS, &servers(&[&engine], &[]));

    // Before any check, the server is down and its check pending.
    let parsed = flowgate::config::parse(&toml, std::path::Path::new("test.toml")).expect("valid");
    let runtime = flowgate::runtime::Runtime::build(Arc::new(parsed), None);
    let unchecked = &runtime.backend("b").expect("backend").servers[0];
    assert_eq!(unchecked.state.health(), Health::Down);
    assert_eq!(unchecked.state.check_status().status, "pending");
    assert!(!unchecked.is_usable());

    let started = Instant::now();
    let proxy = start_proxy(&toml).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(140),
        "start returned after {took:?}, before the first check was answered"
    );
    let state = server_state(&proxy, "b", 0);
    assert_eq!(state.health(), Health::Up, "one successful check is enough");
    assert_eq!(state.check_status().status, "ok");
    assert_eq!(engine.checks()[0].answered, 200);
    engine.delay_checks(Duration::ZERO);
    // The very first request is served: flowgate never starts with an empty pool.
    let addr = proxy.local_addr("web").expect("bound");
    assert_eq!(get(addr, "/").await, (200, "s0".to_string()));
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_first_check_fails_needs_rise_successes() {
    let engine = Engine::start("s0", "/health", 503).await;
    let proxy = start_proxy(&config("", FAST_CHECKS, &servers(&[&engine], &[]))).await;
    let addr = proxy.local_addr("web").expect("bound");
    let state = server_state(&proxy, "b", 0);
    assert_eq!(state.health(), Health::Down);
    assert_eq!(state.check_status().status, "failed");
    assert_eq!(get(addr, "/").await.0, 503);
    assert_eq!(engine.traffic(), 0);

    engine.observe(Arc::clone(&state));
    engine.script(&[200, 200, 200]);
    wait_until(LIMIT, "three scripted checks", || {
        engine.checks().iter().filter(|c| c.scripted).count() == 3
    })
    .await;
    assert_eq!(
        scripted(&engine.checks()),
        [(200, Health::Down), (200, Health::Down), (200, Health::Up)],
        "up after exactly rise = 2 successes"
    );
    assert_eq!(get(addr, "/").await, (200, "s0".to_string()));
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// An engine that accepts connections but stops answering is taken down by
/// check timeouts, and its traffic moves to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_is_taken_down_by_check_timeouts() {
    let hung = Engine::start("s0", "/health", 200).await;
    let healthy = Engine::start("s1", "/health", 200).await;
    let proxy = start_proxy(&config("", FAST_CHECKS, &servers(&[&hung, &healthy], &[]))).await;
    let addr = proxy.local_addr("web").expect("bound");
    let state = server_state(&proxy, "b", 0);
    assert_eq!(state.health(), Health::Up);

    hung.delay_checks(Duration::from_secs(2));
    wait_until(LIMIT, "the hung engine down", || {
        state.health() == Health::Down
    })
    .await;
    assert_eq!(state.check_status().detail, "timed out after 200ms");
    let http = client();
    let before = hung.traffic();
    for _ in 0..10 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "s1".into()));
    }
    assert_eq!(hung.traffic(), before);
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Through the binary: each transition is logged once, in HAProxy's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_are_logged_once_each() {
    let engine = Engine::start("s0", "/health", 200).await;
    let dead = dead_addr();
    let toml = config(
        "",
        FAST_CHECKS,
        &format!(
            "{}[[backends.b.servers]]\nname = \"s1\"\naddress = \"{dead}\"\n",
            servers(&[&engine], &[])
        ),
    );
    let flowgate = FlowgateProcess::run(&toml);
    flowgate
        .wait_for_log("b/s0 UP after 1 successful check: HTTP 200", LIMIT)
        .await;
    flowgate
        .wait_for_log(
            "b/s1 is DOWN: first check failed: connection refused",
            LIMIT,
        )
        .await;
    engine.set_status(503);
    flowgate
        .wait_for_log("b/s0 DOWN after 3 failed checks: HTTP 503", LIMIT)
        .await;
    engine.set_status(200);
    flowgate
        .wait_for_log("b/s0 UP after 2 successful checks: HTTP 200", LIMIT)
        .await;
    // A few more checks without a change log nothing more.
    let checks = engine.checks().len();
    wait_until(LIMIT, "three more checks", || {
        engine.checks().len() >= checks + 3
    })
    .await;
    let log = flowgate.log();
    let count = |needle: &str| log.iter().filter(|line| line.contains(needle)).count();
    assert_eq!(count("b/s0 UP after"), 2, "log:\n{}", log.join("\n"));
    assert_eq!(count("b/s0 DOWN after"), 1, "log:\n{}", log.join("\n"));
    assert_eq!(count("b/s1 "), 1, "log:\n{}", log.join("\n"));
}

/// A Patroni-style pool: only the leader answers 200 on /primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_switch_moves_all_traffic_to_the_new_leader() {
    let (interval, fast_interval, fall) = (200u64, 50u64, 3u64);
    let a = Engine::start("a", "/primary", 200).await;
    let b = Engine::start("b", "/primary", 503).await;
    let c = Engine::start("c", "/primary", 503).await;
    let health = format!(
        "check = \"http\"\npath = \"/primary\"\ninterval = \"{interval}ms\"\n\
         fast_interval = \"{fast_interval}ms\"\ndown_interval = \"100ms\"\n\
         timeout = \"200ms\"\nrise = 2\nfall = {fall}\n"
    );
    let proxy = start_proxy(&config(
        "balance = \"first\"",
        &health,
        &servers(&[&a, &b, &c], &[]),
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    let (state_a, state_b) = (server_state(&proxy, "b", 0), server_state(&proxy, "b", 1));
    let http = client();

    for _ in 0..20 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "a".into()));
    }
    assert_eq!((a.traffic(), b.traffic(), c.traffic()), (20, 0, 0));

    // Failover: the old leader steps down, B is promoted.
    a.set_status(503);
    b.set_status(200);
    let switched = Instant::now();
    // fall checks at fast_interval after the first failure, which comes at most
    // one interval (plus 5% jitter) after the change; a margin for a busy machine.
    let bound = Duration::from_millis(fall * fast_interval + interval) + Duration::from_secs(1);
    wait_until(bound, "A down and B up", || {
        state_a.health() == Health::Down && state_b.health() == Health::Up
    })
    .await;
    eprintln!("leader switch took {:?}", switched.elapsed());

    let at_a = a.traffic();
    for _ in 0..50 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "b".into()));
    }
    assert_eq!(a.traffic(), at_a, "a request went to the old leader");
    assert_eq!((b.traffic(), c.traffic()), (50, 0));
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// `first` prefers the earliest server up in file order even while others are
/// up, and goes back to it when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sends_everything_to_the_earliest_server_up() {
    let a = Engine::start("a", "/health", 200).await;
    let b = Engine::start("b", "/health", 200).await;
    let c = Engine::start("c", "/health", 200).await;
    let proxy = start_proxy(&config(
        "balance = \"first\"",
        FAST_CHECKS,
        &servers(&[&a, &b, &c], &[]),
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    let state_a = server_state(&proxy, "b", 0);
    let http = client();

    for _ in 0..20 {
        assert_eq!(common::fetch(&http, addr, "/").await.0, 200);
    }
    assert_eq!(
        (a.traffic(), b.traffic(), c.traffic()),
        (20, 0, 0),
        "every request to the first server while it is up"
    );

    a.set_status(503);
    wait_until(LIMIT, "A down", || state_a.health() == Health::Down).await;
    for _ in 0..20 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "b".into()));
    }
    a.set_status(200);
    wait_until(LIMIT, "A up", || state_a.health() == Health::Up).await;
    for _ in 0..20 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "a".into()));
    }
    assert_eq!((a.traffic(), b.traffic(), c.traffic()), (40, 20, 0));
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_traffic_only_while_no_primary_is_up() {
    let p0 = Engine::start("p0", "/health", 200).await;
    let p1 = Engine::start("p1", "/health", 200).await;
    let backup = Engine::start("backup", "/health", 200).await;
    let proxy = start_proxy(&config(
        "",
        FAST_CHECKS,
        &servers(&[&p0, &p1, &backup], &["", "", "backup = true"]),
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    let states = [server_state(&proxy, "b", 0), server_state(&proxy, "b", 1)];
    let http = client();

    for _ in 0..20 {
        assert_eq!(common::fetch(&http, addr, "/").await.0, 200);
    }
    assert_eq!(
        backup.traffic(),
        0,
        "the backup took traffic with primaries up"
    );
    assert_eq!(p0.traffic() + p1.traffic(), 20);

    // One primary down: the other carries everything, still not the backup.
    p0.set_status(503);
    wait_until(LIMIT, "p0 down", || states[0].health() == Health::Down).await;
    for _ in 0..10 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "p1".into()));
    }
    assert_eq!(backup.traffic(), 0);

    p1.set_status(503);
    wait_until(LIMIT, "both primaries down", || {
        states.iter().all(|state| state.health() == Health::Down)
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            common::fetch(&http, addr, "/").await,
            (200, "backup".into())
        );
    }
    assert_eq!(backup.traffic(), 20);

    p1.set_status(200);
    wait_until(LIMIT, "p1 up again", || states[1].health() == Health::Up).await;
    for _ in 0..10 {
        assert_eq!(common::fetch(&http, addr, "/").await, (200, "p1".into()));
    }
    assert_eq!(
        backup.traffic(),
        20,
        "the backup kept traffic after p1 came back"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Takes engine `index` down through its check and brings it back; returns once
/// the proxy sees it up again.
async fn bounce(engine: &Engine, state: &flowgate::upstream::ServerState) {
    engine.set_status(503);
    wait_until(LIMIT, "server down", || state.health() == Health::Down).await;
    engine.set_status(200);
    wait_until(LIMIT, "server up again", || state.health() == Health::Up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_returning_servers_weight() {
    let engines = [
        Engine::start("s0", "/health", 200).await,
        Engine::start("s1", "/health", 200).await,
    ];
    let proxy = start_proxy(&config(
        "",
        FAST_CHECKS,
        &servers(
            &[&engines[0], &engines[1]],
            &["weight = 10", "weight = 10\nslow_start = \"1s\""],
        ),
    ))
    .await;
    let returning = server(&proxy, "b", 1);
    assert_eq!(
        returning.weight(),
        10,
        "a server that starts up takes full weight"
    );

    bounce(&engines[1], &returning.state).await;
    let back = Instant::now();
    let mut samples = vec![returning.weight()];
    assert!(
        samples[0] <= 5,
        "weight {} just after coming back",
        samples[0]
    );
    while returning.weight() < 10 {
        assert!(
            back.elapsed() < Duration::from_secs(4),
            "no full weight after {:?}: {samples:?}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        samples.push(returning.weight());
    }
    samples.dedup();
    assert!(
        samples.windows(2).all(|w| w[0] <= w[1]),
        "weight went down during the ramp: {samples:?}"
    );
    assert!(samples.len() >= 4, "no ramp, a jump: {samples:?}");
    assert!(
        back.elapsed() >= Duration::from_millis(900),
        "full weight after only {:?}",
        back.elapsed()
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Requests sent right after a server returns with slow start: its share.
async fn share_after_return(weight: u32, requests: usize) -> usize {
    let engines = [
        Engine::start("s0", "/health", 200).await,
        Engine::start("s1", "/health", 200).await,
        Engine::start("s2", "/health", 200).await,
    ];
    let plain = format!("weight = {weight}");
    let slow = format!("weight = {weight}\nslow_start = \"30s\"");
    let proxy = start_proxy(&config(
        "",
        FAST_CHECKS,
        &servers(
            &[&engines[0], &engines[1], &engines[2]],
            &[&plain, &plain, &slow],
        ),
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    bounce(&engines[2], &server_state(&proxy, "b", 2)).await;
    let before = engines[2].traffic();
    let http = client();
    for _ in 0..requests {
        assert_eq!(common::fetch(&http, addr, "/").await.0, 200);
    }
    proxy.shutdown(Duration::from_secs(1)).await;
    engines[2].traffic() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_gives_a_returning_server_a_small_share() {
    // Three servers of weight 10: without slow start the returning one would take
    // a third (14 of 42); 3 s into a 30 s ramp its weight is 1 (1 in 21).
    let share = share_after_return(10, 42).await;
    assert!(share <= 4, "{share} of 42 requests right after returning");
}

/// The default weight is 1: slow start must ramp those servers too (the shipped
/// examples use slow_start without weights).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_servers_of_default_weight() {
    let share = share_after_return(1, 30).await;
    assert!(
        share <= 3,
        "{share} of 30 requests right after returning with slow_start = 30s and weight 1: \
         the ramp has no effect at weight 1 (a third is what a server without slow start gets)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_go_to_the_management_port_in_its_own_protocol() {
    // An engine serving traffic on one port (HTTP/1.1, as the backend speaks)
    // and its health on a management port, asked over h2c.
    let traffic = common::Origin::named("engine-1").await;
    let management = Engine::start("management", "/actuator/health", 503).await;
    let health = format!(
        "{}port = {}\nprotocol = \"h2\"\n",
        FAST_CHECKS.replace("/health", "/actuator/health"),
        management.addr().port()
    );
    let servers = format!(
        "[[backends.b.servers]]\nname = \"s0\"\naddress = \"{}\"\n",
        traffic.addr
    );
    let proxy = start_proxy(&config("", &health, &servers)).await;
    let state = server_state(&proxy, "b", 0);
    let addr = proxy.local_addr("web").expect("web is bound");

    // The management port says 503: down, though its traffic port would answer.
    assert_eq!(state.health(), Health::Down);
    assert_eq!(get(addr, "/").await.0, 503);
    assert_eq!(traffic.count(), 0, "no check and no request reached it");

    management.set_status(200);
    wait_until(LIMIT, "the server to come up", || {
        state.health() == Health::Up
    })
    .await;
    assert_eq!(get(addr, "/").await, (200, "engine-1".to_string()));
    assert_eq!(traffic.count(), 1, "only the request");
    assert_eq!(
        management.traffic(),
        0,
        "no request went to the management port"
    );
    let checks = management.checks();
    assert!(checks.len() >= 3, "{checks:?}");
    assert!(
        checks
            .iter()
            .all(|check| check.version == hyper::Version::HTTP_2),
        "{checks:?}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}
