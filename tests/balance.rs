//! Balancing through the real proxy: the shares users see at the origins.

mod common;

use std::time::Duration;

use common::{Origin, get, start_proxy};

#[tokio::test]
async fn weighted_round_robin_is_exact_over_every_cycle() {
    let origins = [
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    ];
    let weights = [5, 1, 3];
    let mut toml = String::from(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n[backends.pool]\nbalance = \"round_robin\"\n\n",
    );
    for (i, (origin, weight)) in origins.iter().zip(weights).enumerate() {
        toml.push_str(&format!(
            "[[backends.pool.servers]]\nname = \"s{i}\"\naddress = \"{}\"\nweight = {weight}\n\n",
            origin.addr
        ));
    }
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");

    let cycle: usize = weights.iter().sum();
    let mut answers = Vec::new();
    for _ in 0..cycle * 4 {
        let (status, body) = get(addr, "/").await;
        assert_eq!(status, 200);
        answers.push(body);
    }
    // Every window of one cycle holds each server exactly `weight` times, and the
    // heavy server is never picked more than twice in a row (smooth, not bunched).
    for window in answers.windows(cycle) {
        for (name, weight) in ["a", "b", "c"].iter().zip(weights) {
            assert_eq!(
                window.iter().filter(|b| b == name).count(),
                weight,
                "window {window:?}"
            );
        }
    }
    assert!(
        !answers.windows(3).any(|w| w.iter().all(|b| b == "a")),
        "bunched: {answers:?}"
    );
    assert_eq!(origins.iter().map(Origin::count).sum::<usize>(), cycle * 4);
    proxy.shutdown(Duration::from_secs(1)).await;
}
