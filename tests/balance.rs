//! Balancing through the real proxy: the shares users see at the origins.

mod common;

use std::time::Duration;

use common::{Origin, get, start_proxy, wait_until};

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

/// `[frontends.web]` in front of `[backends.pool]` with `backend_keys` and the
/// origins as servers s0, s1, ... (checks off unless `backend_keys` sets them).
fn pool_toml(backend_keys: &str, origins: &[&Origin]) -> String {
    let addrs: Vec<_> = origins.iter().map(|origin| origin.addr).collect();
    format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\n{backend_keys}\n\n{}",
        common::servers_toml("pool", &addrs)
    )
}

const NO_CHECKS: &str = "[backends.pool.health]\ncheck = \"none\"\n";

/// GET `path` with an optional header; the body (an origin's name).
async fn get_with(addr: std::net::SocketAddr, path: &str, header: Option<(&str, &str)>) -> String {
    use http_body_util::BodyExt;
    let mut request = hyper::Request::get(format!("http://{addr}{path}"));
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let response = common::client()
        .request(request.body(common::empty()).expect("request"))
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn hash_on_a_header_sends_each_key_to_one_origin() {
    let origins = [
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    ];
    let refs: Vec<&Origin> = origins.iter().collect();
    let toml = pool_toml(
        &format!("balance = \"hash\"\nhash_key = \"header:X-Workflow-Id\"\n{NO_CHECKS}"),
        &refs,
    );
    // Two proxies built apart from one config, as two flowgate processes would be.
    let proxies = [start_proxy(&toml).await, start_proxy(&toml).await];
    let addrs: Vec<_> = proxies
        .iter()
        .map(|proxy| proxy.local_addr("web").expect("bound"))
        .collect();

    let mut home = std::collections::HashMap::new();
    for round in 0..4 {
        for id in 0..24 {
            let key = format!("wf-{id:04}");
            let addr = addrs[(round + id) % 2];
            let origin = get_with(addr, "/api/v1/signal", Some(("X-Workflow-Id", &key))).await;
            let first = home.entry(key.clone()).or_insert_with(|| origin.clone());
            assert_eq!(*first, origin, "{key} moved on round {round}");
        }
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert_eq!(
        used.len(),
        3,
        "24 keys should spread over all origins: {home:?}"
    );

    // Without the header there is nothing to stick to: round robin.
    let mut rotation: Vec<String> = Vec::new();
    for _ in 0..3 {
        rotation.push(get_with(addrs[0], "/", None).await);
    }
    rotation.sort();
    assert_eq!(rotation, ["a", "b", "c"]);

    for proxy in proxies {
        proxy.shutdown(Duration::from_secs(1)).await;
    }
}

/// An origin named `name` that holds each `/hold` request until `gate` gives
/// it a permit, like an engine holding a worker's long-poll.
async fn holding_origin(
    name: &'static str,
    gate: &std::sync::Arc<tokio::sync::Semaphore>,
) -> Origin {
    let gate = std::sync::Arc::clone(gate);
    Origin::start(move |request| {
        let gate = std::sync::Arc::clone(&gate);
        async move {
            if request.uri().path() == "/hold" {
                gate.acquire().await.expect("gate").forget();
            }
            hyper::Response::new(common::full(name))
        }
    })
    .await
}

#[tokio::test]
async fn least_conn_avoids_a_server_held_busy_by_long_requests() {
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    let gates: Vec<Arc<Semaphore>> = (0..3).map(|_| Arc::new(Semaphore::new(0))).collect();
    let origins = [
        holding_origin("a", &gates[0]).await,
        holding_origin("b", &gates[1]).await,
        holding_origin("c", &gates[2]).await,
    ];
    let refs: Vec<&Origin> = origins.iter().collect();
    let toml = pool_toml(&format!("balance = \"least_conn\"\n{NO_CHECKS}"), &refs);
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");

    // Nine long-polls spread three per server...
    let mut polls = Vec::new();
    for sent in 1..=9 {
        polls.push(tokio::spawn(get(addr, "/hold")));
        wait_until(Duration::from_secs(5), "the long-poll to arrive", || {
            origins.iter().map(Origin::count).sum::<usize>() == sent
        })
        .await;
    }
    let counts: Vec<usize> = origins.iter().map(Origin::count).collect();
    assert_eq!(counts, [3, 3, 3]);
    // ...then b and c answer theirs; a still holds three.
    gates[1].add_permits(3);
    gates[2].add_permits(3);
    wait_until(Duration::from_secs(10), "b and c to answer", || {
        polls.iter().filter(|poll| poll.is_finished()).count() == 6
    })
    .await;

    for _ in 0..30 {
        let origin = get(addr, "/").await.1;
        assert_ne!(origin, "a", "least_conn picked the busy server");
    }
    assert_eq!(origins[0].count(), 3);

    gates[0].add_permits(3);
    let mut answers: Vec<String> = Vec::new();
    for poll in polls {
        let (status, origin) = poll.await.expect("task");
        assert_eq!(status, 200);
        answers.push(origin);
    }
    answers.sort();
    assert_eq!(answers, ["a", "a", "a", "b", "b", "b", "c", "c", "c"]);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn first_uses_the_first_server_until_it_is_weight_0_or_down() {
    let origins = [
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    ];
    let refs: Vec<&Origin> = origins.iter().collect();
    let toml = pool_toml(
        "balance = \"first\"\n\n[backends.pool.health]\ncheck = \"tcp\"\n\
         interval = \"100ms\"\ntimeout = \"1s\"\nfall = 1\nrise = 1\n",
        &refs,
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");
    let first_server = || {
        let runtime = proxy.runtime().load();
        let backend = runtime.backend("pool").expect("backend");
        std::sync::Arc::clone(backend.server("s0").expect("s0"))
    };

    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.1, "a");
    }
    // Weight 0 (as through the admin API): no new traffic for "a".
    first_server().state.set_weight_override(Some(0));
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.1, "b");
    }
    first_server().state.set_weight_override(None);
    assert_eq!(get(addr, "/").await.1, "a");

    // "a" goes away: once its check fails, everything moves to "b".
    origins[0].stop();
    wait_until(Duration::from_secs(5), "s0 to be down", || {
        !first_server().is_usable()
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.1, "b");
    }
    assert_eq!(origins[2].count(), 0);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn p2c_sends_less_to_a_slow_origin() {
    let slow = Origin::start(|_| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hyper::Response::new(common::full("slow"))
    })
    .await;
    let fast = Origin::named("fast").await;
    let toml = pool_toml(&format!("balance = \"p2c\"\n{NO_CHECKS}"), &[&slow, &fast]);
    let proxy = start_proxy(&toml).await;
    let addr = proxy.local_addr("web").expect("bound");
    for _ in 0..40 {
        assert_eq!(get(addr, "/").await.0, 200);
    }
    // Once each has answered, the slow one loses the comparisons (random
    // would give it half; a hiccup on a busy machine may cost one or two).
    assert!(slow.count() <= 8, "slow origin got {} of 40", slow.count());
    proxy.shutdown(Duration::from_secs(1)).await;
}
