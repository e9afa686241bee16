//! The cost of one pick, for every balancing algorithm, at 3, 100 and 10,000
//! servers, on one thread and with two threads picking from the same backend at
//! once (the per-pick time each thread sees); and the first pick after a
//! change of the server set (health, drain, weight), which rebuilds what the
//! algorithm derives from it (a schedule, a ring, a sampling table) before it
//! picks. A step of a server's slow start changes its weight: `source` and
//! `hash` need a new ring, which in a runtime (as in flowgate) its blocking
//! pool builds while picks go on with the old one, and `round_robin` a new
//! cycle (weights in twentieths then: 20 times the servers' turns); that
//! case measures what the pick pays.
//!
//! `cargo bench --bench balance` (add `-- --quick` for a short run). Servers
//! carry some in-flight work (1 to 7 requests) and response-time estimates so
//! that load-aware algorithms compare real numbers; hash keys are 1,024
//! different 36-byte workflow ids.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flowgate::balance::PickContext;
use flowgate::config;
use flowgate::upstream::{Backend, FULL_WEIGHT, InFlightGuard, response_time};

const SIZES: [usize; 3] = [3, 100, 10_000];

/// (label, backend keys)
const ALGORITHMS: [(&str, &str); 8] = [
    ("round_robin", "balance = \"round_robin\""),
    ("least_conn", "balance = \"least_conn\""),
    ("random", "balance = \"random\""),
    ("p2c", "balance = \"p2c\""),
    ("source", "balance = \"source\""),
    (
        "hash",
        "balance = \"hash\"\nhash_key = \"header:X-Workflow-Id\"",
    ),
    (
        "hash_bounded",
        "balance = \"hash\"\nhash_key = \"header:X-Workflow-Id\"\nhash_balance_factor = 125",
    ),
    ("first", "balance = \"first\""),
];

/// A backend of `size` servers (never contacted), with in-flight work held by
/// the returned guards.
fn backend(keys: &str, size: usize) -> (Backend, Vec<InFlightGuard>) {
    let toml = format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\n{keys}\n\n[backends.pool.health]\ncheck = \"none\"\n\n\
         [[backends.pool.servers]]\naddress = \"127.0.0.1:1\"\n"
    );
    let mut config = config::parse(&toml, Path::new("bench.toml"))
        .expect("config")
        .backends
        .remove(0);
    let template = config.servers[0].clone();
    config.servers = (0..size)
        .map(|i| config::Server {
            name: format!("engine-{i}.workflows.internal"),
            address: format!("10.1.{}.{}:7233", i / 250, i % 250),
            addr: ([10, 1, (i / 250) as u8, (i % 250) as u8], 7233).into(),
            ..template.clone()
        })
        .collect();
    let backend = Backend::build(&config, None);
    let mut guards = Vec::new();
    for (i, server) in backend.servers.iter().enumerate() {
        // Every server busy, so no scan stops early at an idle one.
        for _ in 0..1 + i % 7 {
            guards.push(server.begin());
        }
        // Estimates of different ages, so picks decay them as in service.
        let estimate_us = 2_000.0 + ((i * 7_919) % 20_000) as f64;
        let stamp = response_time::clock_ms().wrapping_sub((i % 5_000) as u32);
        server.state.response_time().record_at(estimate_us, stamp);
    }
    (backend, guards)
}

fn workflow_ids() -> Vec<String> {
    (0..1024u64)
        .map(|i| {
            let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            format!(
                "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                x >> 32,
                (x >> 16) & 0xffff,
                x & 0xfff,
                (x >> 20) & 0xfff,
                x & 0xffff_ffff_ffff
            )
        })
        .collect()
}

/// One pick, with the next workflow id and client address in turn.
#[inline]
fn pick(backend: &Backend, ids: &[String], turn: usize) -> Option<usize> {
    let ctx = PickContext {
        client: [10, 9, (turn >> 8) as u8, turn as u8].into(),
        key: Some(ids[turn % ids.len()].as_bytes()),
    };
    backend.balancer.pick(&backend.servers, &ctx)
}

fn picks(c: &mut Criterion) {
    let ids = workflow_ids();
    for (label, keys) in ALGORITHMS {
        let mut group = c.benchmark_group(format!("pick/{label}"));
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for size in SIZES {
            let (backend, _guards) = backend(keys, size);
            assert!(pick(&backend, &ids, 0).is_some());
            group.bench_function(BenchmarkId::new("1 thread", size), |b| {
                let mut turn = 0usize;
                b.iter(|| {
                    turn = turn.wrapping_add(1);
                    black_box(pick(&backend, &ids, turn))
                });
            });
            group.bench_function(BenchmarkId::new("2 threads", size), |b| {
                b.iter_custom(|iters| two_threads(&backend, &ids, iters));
            });
            group.bench_function(BenchmarkId::new("after a change", size), |b| {
                let mut turn = 0usize;
                b.iter(|| {
                    turn = turn.wrapping_add(1);
                    // What every change of a server's state does.
                    backend.epoch.fetch_add(1, Ordering::AcqRel);
                    black_box(pick(&backend, &ids, turn))
                });
            });
            group.bench_function(BenchmarkId::new("after a slow-start step", size), |b| {
                // In a runtime, as in flowgate: a new hash ring is built on
                // its blocking pool, not by the pick.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                let _in_runtime = runtime.enter();
                let server = &backend.servers[0];
                let mut turn = 0usize;
                b.iter(|| {
                    turn = turn.wrapping_add(1);
                    // Two and three twentieths of its weight, in turn.
                    let factor = FULL_WEIGHT / 20 * (2 + (turn % 2) as u32);
                    server.state.set_weight_factor(factor);
                    black_box(pick(&backend, &ids, turn))
                });
                server.state.set_weight_factor(FULL_WEIGHT);
            });
        }
        group.finish();
    }
}

/// Wall time for each of two threads to make `iters` picks at once.
fn two_threads(backend: &Backend, ids: &[String], iters: u64) -> Duration {
    let ready = AtomicUsize::new(0);
    let times: Vec<Duration> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|thread| {
                let ready = &ready;
                scope.spawn(move || {
                    // Start together, so the picks overlap.
                    ready.fetch_add(1, Ordering::AcqRel);
                    while ready.load(Ordering::Acquire) < 2 {
                        std::hint::spin_loop();
                    }
                    let start = Instant::now();
                    for turn in 0..iters as usize {
                        black_box(pick(backend, ids, turn.wrapping_mul(2) + thread));
                    }
                    start.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("picker"))
            .collect()
    });
    times.into_iter().max().unwrap_or_default()
}

criterion_group!(benches, picks);
criterion_main!(benches);
