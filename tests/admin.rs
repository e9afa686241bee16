//! The admin listener of the real binary: every endpoint with each role and a
//! bad token, drain under load, maint stopping checks, admin state across
//! reloads and restarts (state file), weights, metrics that match the traffic
//! sent, reload through the API, `promtool check metrics`, the status page in
//! headless Chromium, and `flowgate hash-token`.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Body, Engine, FlowgateProcess, HttpClient, Origin, client, empty, full, held_connections,
    refused_addr, unused_addr, wait_refused, wait_until,
};
use flowgate::admin::auth::{hex, token_digest};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use serde_json::Value;

const VIEWER: &str = "viewer-token-1";
const OPERATOR: &str = "operator-token-1";

/// An `[admin]` section on an ephemeral port with one viewer and one operator.
fn admin_section(bind: &str, viewer: &str, operator: &str) -> String {
    format!(
        "[admin]\nbind = \"{bind}\"\n\n\
         [[admin.tokens]]\nname = \"dashboard\"\nrole = \"viewer\"\nsha256 = \"{}\"\n\n\
         [[admin.tokens]]\nname = \"deploy\"\nrole = \"operator\"\nsha256 = \"{}\"\n\n",
        hex(&token_digest(viewer.as_bytes())),
        hex(&token_digest(operator.as_bytes())),
    )
}

/// One frontend `web` in front of backend `pool` (checks off unless
/// `backend_extra` says otherwise), with the admin section.
fn pool_config(servers: &[SocketAddr], backend_extra: &str, global: &str) -> String {
    let servers: String = servers
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            format!("[[backends.pool.servers]]\nname = \"s{i}\"\naddress = \"{addr}\"\n\n")
        })
        .collect();
    format!(
        "[global]\ngrace_period = \"2s\"\n{global}\n\n{}\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [backends.pool]\nretries = 0\n{backend_extra}\n\n{servers}",
        admin_section("127.0.0.1:0", VIEWER, OPERATOR)
    )
}

const CHECKS_OFF: &str = "[backends.pool.health]\ncheck = \"none\"\n";

// ---- A small admin API client ----

#[derive(Debug, Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    Basic(&'a str),
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.body))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

struct AdminApi {
    addr: SocketAddr,
    client: HttpClient,
}

impl AdminApi {
    /// The admin listener of a running flowgate, from its log.
    async fn of(flowgate: &FlowgateProcess) -> AdminApi {
        let line = flowgate
            .wait_for_log("admin listening addr=", Duration::from_secs(10))
            .await;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        AdminApi::at(addr)
    }

    fn at(addr: SocketAddr) -> AdminApi {
        AdminApi {
            addr,
            client: client(),
        }
    }

    async fn call(&self, method: &str, path: &str, auth: Auth<'_>, body: Option<&str>) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        match auth {
            Auth::None => {}
            Auth::Bearer(token) => {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            Auth::Basic(token) => {
                let encoded = base64(format!("operator:{token}").as_bytes());
                request = request.header("authorization", format!("Basic {encoded}"));
            }
        }
        let body: Body = body.map_or_else(empty, |text| full(text.to_string()));
        let response = self
            .client
            .request(request.body(body).expect("request"))
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err:?}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn backends(&self) -> Value {
        let reply = self
            .call("GET", "/api/v1/backends", Auth::Bearer(VIEWER), None)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }

    /// The server's object from `GET /api/v1/backends`.
    async fn server(&self, backend: &str, server: &str) -> Value {
        let all = self.backends().await;
        all["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["name"] == backend)
            .flat_map(|b| b["servers"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == server)
            .unwrap_or_else(|| panic!("no {backend}/{server} in {all}"))
    }

    async fn set_state(&self, backend: &str, server: &str, state: &str) -> Value {
        let reply = self
            .call(
                "PUT",
                &format!("/api/v1/backends/{backend}/servers/{server}/state"),
                Auth::Bearer(OPERATOR),
                Some(&format!(r#"{{"state":"{state}"}}"#)),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }

    async fn set_weight(&self, backend: &str, server: &str, weight: &str) -> Value {
        let reply = self
            .call(
                "PUT",
                &format!("/api/v1/backends/{backend}/servers/{server}/weight"),
                Auth::Bearer(OPERATOR),
                Some(&format!(r#"{{"weight":{weight}}}"#)),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }

    async fn scrape(&self) -> Scrape {
        let reply = self.call("GET", "/metrics", Auth::None, None).await;
        assert_eq!(reply.status, 200);
        Scrape::parse(&reply.body)
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let bits = u32::from(bytes[0]) << 16 | u32::from(bytes[1]) << 8 | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(bits >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A parsed Prometheus text scrape: (name, labels, value) per sample.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("sample line");
                let value: f64 = value.parse().expect("sample value");
                let (name, labels) = match series.split_once('{') {
                    None => (series, BTreeMap::new()),
                    Some((name, rest)) => {
                        let labels = rest
                            .trim_end_matches('}')
                            .split("\",")
                            .filter(|pair| !pair.is_empty())
                            .map(|pair| {
                                let (key, value) = pair.split_once("=\"").expect("label");
                                (key.to_string(), value.trim_end_matches('"').to_string())
                            })
                            .collect();
                        (name, labels)
                    }
                };
                (name.to_string(), labels, value)
            })
            .collect();
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of the one series named `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == wanted)
            .map(|(_, _, value)| *value)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text))
    }

    fn has_family(&self, name: &str) -> bool {
        self.text.contains(&format!("# TYPE {name} "))
    }
}

/// Polls `check` every 10 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET through the proxy: the status and body, or the client error.
async fn try_get(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let response = client
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
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// ---- Endpoints, roles, errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_each_role_and_a_bad_token() {
    let origin = Origin::named("s0").await;
    let flowgate = FlowgateProcess::run(&pool_config(&[origin.addr], CHECKS_OFF, ""));
    let api = AdminApi::of(&flowgate).await;

    let state = "/api/v1/backends/pool/servers/s0/state";
    let weight = "/api/v1/backends/pool/servers/s0/weight";
    // (method, path, body, role): None = open, Some(false) = viewer, Some(true) = operator.
    let routes: &[(&str, &str, Option<&str>, Option<bool>)] = &[
        ("GET", "/", None, Some(false)),
        ("GET", "/api/v1/backends", None, Some(false)),
        ("PUT", state, Some(r#"{"state":"ready"}"#), Some(true)),
        ("PUT", weight, Some(r#"{"weight":1}"#), Some(true)),
        ("POST", "/api/v1/reload", None, Some(true)),
        ("GET", "/metrics", None, None),
        ("GET", "/healthz", None, None),
        ("GET", "/readyz", None, None),
    ];
    let callers: &[(&str, Auth<'_>)] = &[
        ("no credentials", Auth::None),
        ("a wrong bearer token", Auth::Bearer("not-a-token")),
        ("a wrong basic password", Auth::Basic("not-a-token")),
        ("the viewer bearer token", Auth::Bearer(VIEWER)),
        ("the viewer token by basic", Auth::Basic(VIEWER)),
        ("the operator bearer token", Auth::Bearer(OPERATOR)),
        ("the operator token by basic", Auth::Basic(OPERATOR)),
    ];
    for &(method, path, body, role) in routes {
        for &(who, auth) in callers {
            let expected = match (role, auth) {
                (None, _) => 200,
                (Some(_), Auth::None) => 401,
                (Some(_), Auth::Bearer(t) | Auth::Basic(t)) if t != VIEWER && t != OPERATOR => 401,
                // Basic is for viewer routes (a browser) only.
                (Some(true), Auth::Basic(_)) => 401,
                (Some(true), Auth::Bearer(VIEWER)) => 403,
                _ => 200,
            };
            let reply = api.call(method, path, auth, body).await;
            assert_eq!(
                reply.status, expected,
                "{method} {path} with {who}: {}",
                reply.body
            );
            if expected == 401 {
                let challenge = reply.header("www-authenticate");
                if role == Some(false) {
                    assert_eq!(challenge, "Basic realm=\"flowgate\"", "{method} {path}");
                } else {
                    assert_eq!(challenge, "Bearer realm=\"flowgate\"", "{method} {path}");
                }
            }
            if expected >= 400 {
                assert!(
                    reply.json()["error"].is_string(),
                    "{method} {path}: {}",
                    reply.body
                );
            }
        }
    }

    // What the open and viewer routes answer.
    let healthz = api.call("GET", "/healthz", Auth::None, None).await;
    assert_eq!(healthz.body, "ok\n");
    let head = api.call("HEAD", "/healthz", Auth::None, None).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    let readyz = api.call("GET", "/readyz", Auth::None, None).await;
    assert_eq!((readyz.status, readyz.body.as_str()), (200, "ready\n"));
    let metrics = api.call("GET", "/metrics", Auth::None, None).await;
    assert!(
        metrics
            .header("content-type")
            .starts_with("text/plain; version=0.0.4"),
        "{}",
        metrics.header("content-type")
    );
    assert!(
        metrics
            .body
            .contains("flowgate_server_up{backend=\"pool\",server=\"s0\"} 1")
    );
    let page = api.call("GET", "/", Auth::Basic(VIEWER), None).await;
    assert!(page.header("content-type").starts_with("text/html"));
    assert!(page.body.starts_with("<!DOCTYPE html>"));
    assert!(!page.body.contains("src=\"http") && !page.body.contains("href=\"http"));

    // The JSON document, in the contract's shape.
    let all = api.backends().await;
    assert!(all["generation"].as_u64().is_some_and(|g| g >= 1), "{all}");
    let backend = &all["backends"][0];
    assert_eq!(backend["name"], "pool");
    assert_eq!(backend["balance"], "round_robin");
    assert_eq!(backend["queued"], 0);
    let server = &backend["servers"][0];
    assert_eq!(server["name"], "s0");
    assert_eq!(server["address"], origin.addr.to_string());
    assert_eq!(server["state"], "up");
    assert_eq!(server["check"]["status"], "none");
    assert!(server["check"]["detail"].is_string());
    assert!(server["check"]["last_change_seconds"].is_f64());
    assert_eq!(server["weight"], 1);
    assert_eq!(server["backup"], false);
    assert_eq!(server["in_flight"], 0);
    assert_eq!(server["max_connections"], 0);
    let frontend = &all["frontends"][0];
    assert_eq!(frontend["name"], "web");
    assert_eq!(frontend["mode"], "http");
    let web = flowgate.frontend_addr("web").await;
    assert_eq!(frontend["binds"][0], web.to_string());
    assert!(frontend["active_connections"].is_i64());
    assert!(frontend["requests_total"].is_u64());

    // A PUT answers the server's new object.
    let drained = api.set_state("pool", "s0", "drain").await;
    assert_eq!(
        (drained["name"].as_str(), drained["state"].as_str()),
        (Some("s0"), Some("drain"))
    );
    assert_eq!(api.set_state("pool", "s0", "maint").await["state"], "maint");
    assert_eq!(api.set_state("pool", "s0", "ready").await["state"], "up");
    assert_eq!(api.set_weight("pool", "s0", "3").await["weight"], 3);
    let reset = api.set_weight("pool", "s0", "null").await;
    assert_eq!(
        (
            reset["weight"].as_u64(),
            reset["weight_set_by_api"].as_bool()
        ),
        (Some(1), Some(false))
    );

    // Unknown names: 404 with a JSON error, for an authorized caller.
    let op = Auth::Bearer(OPERATOR);
    for (method, path, auth) in [
        ("GET", "/nope", Auth::None),
        ("GET", "/api/v1/backends/pool", Auth::Bearer(VIEWER)),
        ("PUT", "/api/v1/backends/nope/servers/s0/state", op),
        ("PUT", "/api/v1/backends/pool/servers/nope/state", op),
        ("PUT", "/api/v1/backends/pool/servers/nope/weight", op),
    ] {
        let reply = api
            .call(method, path, auth, Some(r#"{"state":"drain"}"#))
            .await;
        assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
        assert!(reply.json()["error"].is_string());
    }
    // ... and a viewer learns nothing about names on operator routes.
    let reply = api
        .call(
            "PUT",
            "/api/v1/backends/nope/servers/s0/state",
            Auth::Bearer(VIEWER),
            Some("{}"),
        )
        .await;
    assert_eq!(reply.status, 403);

    // Bad bodies: 400 with a JSON error, and nothing changed.
    for (path, body) in [
        (state, "not json"),
        (state, ""),
        (state, r#"{"state":"up"}"#),
        (state, r#"{"state":"drain","extra":1}"#),
        (state, r#"{"state":3}"#),
        (weight, r#"{"weight":257}"#),
        (weight, r#"{"weight":-1}"#),
        (weight, r#"{"weight":1.5}"#),
        (weight, r#"{"weight":"2"}"#),
        (weight, r#"{}"#),
        (weight, r#"{"weight":1,"state":"drain"}"#),
        (weight, "[1]"),
    ] {
        let reply = api.call("PUT", path, op, Some(body)).await;
        assert_eq!(reply.status, 400, "PUT {path} {body}: {}", reply.body);
        assert!(reply.json()["error"].is_string());
    }
    let server = api.server("pool", "s0").await;
    assert_eq!(
        (server["state"].as_str(), server["weight"].as_u64()),
        (Some("up"), Some(1))
    );

    let huge = format!(r#"{{"state":"drain","pad":"{}"}}"#, "x".repeat(70 * 1024));
    assert_eq!(api.call("PUT", state, op, Some(&huge)).await.status, 413);

    // Wrong methods: 405 with Allow.
    for (method, path, allow) in [
        ("POST", "/api/v1/backends", "GET, HEAD"),
        ("DELETE", "/", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/api/v1/reload", "POST"),
        ("GET", state, "PUT"),
        ("POST", weight, "PUT"),
    ] {
        let reply = api.call(method, path, op, None).await;
        assert_eq!(reply.status, 405, "{method} {path}");
        assert_eq!(reply.header("allow"), allow, "{method} {path}");
    }
    // Tokens never reach the log.
    let log = flowgate.log().join("\n");
    assert!(!log.contains(VIEWER) && !log.contains(OPERATOR), "{log}");
    assert!(
        log.contains("pool/s0 set to drain") && log.contains("token=\"deploy\""),
        "{log}"
    );
}

#[tokio::test]
async fn readyz_names_the_backend_without_a_server_up() {
    let origin = Origin::named("s0").await;
    let toml = format!(
        "{}\n[frontends.dead]\nbind = [\"127.0.0.1:0\"]\nbackend = \"dead\"\n\n\
         [backends.dead.health]\ncheck = \"tcp\"\ninterval = \"10s\"\n\n\
         [[backends.dead.servers]]\nname = \"gone\"\naddress = \"{}\"\n",
        pool_config(&[origin.addr], CHECKS_OFF, ""),
        refused_addr()
    );
    let flowgate = FlowgateProcess::run(&toml);
    let api = AdminApi::of(&flowgate).await;
    let reply = api.call("GET", "/readyz", Auth::None, None).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, "backend dead: no server up\n");
    // Draining the last server of a backend makes it unready too.
    api.set_state("pool", "s0", "drain").await;
    let reply = api.call("GET", "/readyz", Auth::None, None).await;
    assert_eq!(
        reply.body,
        "backend pool: no server up\nbackend dead: no server up\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_graceful_stop_readyz_says_stopping_until_the_exit() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let origin = {
        let gate = Arc::clone(&gate);
        Origin::start(move |_| {
            let gate = Arc::clone(&gate);
            async move {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                Response::new(full("done"))
            }
        })
        .await
    };
    let mut flowgate = FlowgateProcess::run(&pool_config(&[origin.addr], CHECKS_OFF, ""));
    let api = AdminApi::of(&flowgate).await;
    let web = flowgate.frontend_addr("web").await;
    let held = tokio::spawn(async move { try_get(&client(), web, "/held").await });
    eventually(Duration::from_secs(5), "the request in flight", || async {
        api.server("pool", "s0").await["in_flight"] == 1
    })
    .await;

    flowgate.signal("TERM");
    eventually(Duration::from_secs(5), "readyz 503", || async {
        let reply = api.call("GET", "/readyz", Auth::None, None).await;
        reply.status == 503 && reply.body == "stopping\n"
    })
    .await;
    // The drain can be watched while it runs.
    assert_eq!(api.server("pool", "s0").await["in_flight"], 1);
    gate.add_permits(1);
    assert_eq!(
        held.await.expect("held request"),
        Ok((200, "done".to_string()))
    );
    assert_eq!(flowgate.wait_exit(Duration::from_secs(10)).await, Some(0));
    wait_refused(api.addr, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_admin_address_that_cannot_be_bound_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let origin = Origin::named("s0").await;
    let toml = pool_config(&[origin.addr], CHECKS_OFF, "").replace(
        "bind = \"127.0.0.1:0\"\n\n[[admin.tokens]]",
        &format!(
            "bind = \"{}\"\n\n[[admin.tokens]]",
            taken.local_addr().expect("addr")
        ),
    );
    let mut flowgate = FlowgateProcess::run(&toml);
    assert_eq!(flowgate.wait_exit(Duration::from_secs(10)).await, Some(1));
    let log = flowgate.log().join("\n");
    assert!(log.contains("admin.bind: cannot listen on"), "{log}");
    assert!(
        !log.contains("listening frontend="),
        "no frontend may start: {log}"
    );
}

#[tokio::test]
async fn a_reload_moves_the_admin_listener_and_swaps_its_tokens() {
    let origin = Origin::named("s0").await;
    let flowgate = FlowgateProcess::run(&pool_config(&[origin.addr], CHECKS_OFF, ""));
    let old = AdminApi::of(&flowgate).await;
    assert_eq!(
        old.call("GET", "/api/v1/backends", Auth::Bearer(VIEWER), None)
            .await
            .status,
        200
    );

    let moved = unused_addr();
    let toml = pool_config(&[origin.addr], CHECKS_OFF, "").replace(
        &admin_section("127.0.0.1:0", VIEWER, OPERATOR),
        &admin_section(&moved.to_string(), "viewer-token-2", OPERATOR),
    );
    std::fs::write(&flowgate.config, toml).expect("write config");
    flowgate.signal("HUP");
    flowgate
        .wait_for_log(
            &format!("admin listening addr={moved}"),
            Duration::from_secs(10),
        )
        .await;
    wait_refused(old.addr, Duration::from_secs(5)).await;
    let new = AdminApi::at(moved);
    let call = |token| new.call("GET", "/api/v1/backends", Auth::Bearer(token), None);
    assert_eq!(call("viewer-token-2").await.status, 200);
    assert_eq!(
        call(VIEWER).await.status,
        401,
        "the old viewer token is gone"
    );
    assert_eq!(call(OPERATOR).await.status, 200);
}

// ---- Admin state: drain, maint, weight ----

/// A client request: whether it started after the drain was answered, and
/// what it got.
type Outcome = (bool, Result<(u16, String), String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_sends_nothing_new_and_lets_in_flight_requests_finish() {
    const WORKERS: usize = 4;
    const MAX_REQUESTS_PER_WORKER: usize = 5000;
    let slow_started = Arc::new(AtomicUsize::new(0));
    let s0 = Origin::named("s0").await;
    let s1 = {
        let slow_started = Arc::clone(&slow_started);
        Origin::start(move |request: Request<hyper::body::Incoming>| {
            let slow = request.uri().path() == "/slow";
            if slow {
                slow_started.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                Response::new(full("s1"))
            }
        })
        .await
    };
    let flowgate = FlowgateProcess::run(&pool_config(&[s0.addr, s1.addr], CHECKS_OFF, ""));
    let web = flowgate.frontend_addr("web").await;
    let api = AdminApi::of(&flowgate).await;

    // Clients in a loop; each request notes whether it started after the
    // drain was answered.
    let drained = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (drained, stop, outcomes) = (
            Arc::clone(&drained),
            Arc::clone(&stop),
            Arc::clone(&outcomes),
        );
        workers.push(tokio::spawn(async move {
            let client = client();
            for _ in 0..MAX_REQUESTS_PER_WORKER {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let after_drain = drained.load(Ordering::SeqCst);
                let outcome = try_get(&client, web, "/work").await;
                outcomes
                    .lock()
                    .expect("outcomes")
                    .push((after_drain, outcome));
            }
        }));
    }
    wait_until(Duration::from_secs(10), "traffic on both servers", || {
        s0.count() > 20 && s1.count() > 20
    })
    .await;

    // A slow request in flight on s1 (round robin puts one of two there).
    let slow_client = client();
    let mut slow_requests = Vec::new();
    for _ in 0..10 {
        let client = slow_client.clone();
        slow_requests.push(tokio::spawn(
            async move { try_get(&client, web, "/slow").await },
        ));
        let started = Instant::now();
        while slow_started.load(Ordering::SeqCst) == 0
            && started.elapsed() < Duration::from_millis(300)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if slow_started.load(Ordering::SeqCst) > 0 {
            break;
        }
    }
    assert_eq!(
        slow_started.load(Ordering::SeqCst),
        1,
        "a slow request reached s1"
    );

    let answer = api.set_state("pool", "s1", "drain").await;
    drained.store(true, Ordering::SeqCst);
    assert_eq!(answer["state"], "drain");
    assert!(
        answer["in_flight"].as_u64().is_some_and(|n| n >= 1),
        "{answer}"
    );

    // Requests picked just before the drain may still arrive; once only the
    // slow one is left on s1, its origin sees nothing more.
    eventually(
        Duration::from_secs(5),
        "only the slow request left on s1",
        || async { api.server("pool", "s1").await["in_flight"] == 1 },
    )
    .await;
    let s1_count = s1.count();
    let s0_count = s0.count();
    wait_until(Duration::from_secs(10), "more traffic on s0", || {
        s0.count() > s0_count + 200
    })
    .await;
    assert_eq!(
        s1.count(),
        s1_count,
        "no new request reached the drained server"
    );

    // The request in flight on s1 when it was drained finished normally.
    let mut slow_answers = Vec::new();
    for request in slow_requests {
        slow_answers.push(request.await.expect("slow request task"));
    }
    assert!(
        slow_answers.contains(&Ok((200, "s1".to_string()))),
        "{slow_answers:?}"
    );
    assert!(
        slow_answers.iter().all(|a| matches!(a, Ok((200, _)))),
        "{slow_answers:?}"
    );

    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("worker");
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| !matches!(o, Ok((200, _))))
        .collect();
    assert!(failed.is_empty(), "failed client requests: {failed:?}");
    let after: Vec<_> = outcomes.iter().filter(|(after, _)| *after).collect();
    assert!(
        after.len() >= 200,
        "{} requests after the drain",
        after.len()
    );
    assert!(
        after
            .iter()
            .all(|(_, o)| matches!(o, Ok((_, body)) if body == "s0")),
        "every request started after the drain went to s0"
    );
    assert_eq!(api.server("pool", "s1").await["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_stops_checks_and_ready_resumes_them() {
    let e0 = Engine::start("e0", "/health", 200).await;
    let e1 = Engine::start("e1", "/health", 200).await;
    let checks = "[backends.pool.health]\ncheck = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n";
    let flowgate = FlowgateProcess::run(&pool_config(&[e0.addr(), e1.addr()], checks, ""));
    let api = AdminApi::of(&flowgate).await;
    wait_until(Duration::from_secs(5), "checks on e1", || {
        e1.checks().len() >= 2
    })
    .await;

    assert_eq!(api.set_state("pool", "s1", "maint").await["state"], "maint");
    // A check of e1 already under way when the PUT came may still land; e0's
    // checks are the clock.
    let clock = e0.checks().len();
    wait_until(Duration::from_secs(5), "3 checks of e0", || {
        e0.checks().len() >= clock + 3
    })
    .await;
    let seen = e1.checks().len();
    let clock = e0.checks().len();
    wait_until(Duration::from_secs(10), "8 more checks of e0", || {
        e0.checks().len() >= clock + 8
    })
    .await;
    assert_eq!(
        e1.checks().len(),
        seen,
        "no check reached the server in maint"
    );
    let scrape = api.scrape().await;
    let state = |s| {
        scrape.get(
            "flowgate_server_state",
            &[("backend", "pool"), ("server", "s1"), ("state", s)],
        )
    };
    assert_eq!((state("maint"), state("up")), (1.0, 0.0));
    // No traffic either.
    let web = flowgate.frontend_addr("web").await;
    let client = client();
    for _ in 0..6 {
        assert_eq!(
            try_get(&client, web, "/").await,
            Ok((200, "e0".to_string()))
        );
    }
    assert_eq!(e1.traffic(), 0);

    assert_eq!(api.set_state("pool", "s1", "ready").await["state"], "up");
    wait_until(Duration::from_secs(5), "checks of e1 again", || {
        e1.checks().len() > seen
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_takes_no_traffic_and_null_restores_the_configured_weight() {
    let s0 = Origin::named("s0").await;
    let s1 = Origin::named("s1").await;
    let flowgate = FlowgateProcess::run(&pool_config(&[s0.addr, s1.addr], CHECKS_OFF, ""));
    let web = flowgate.frontend_addr("web").await;
    let api = AdminApi::of(&flowgate).await;
    let client = client();

    let answer = api.set_weight("pool", "s1", "0").await;
    assert_eq!(
        (answer["weight"].as_u64(), answer["state"].as_str()),
        (Some(0), Some("up"))
    );
    for _ in 0..20 {
        assert_eq!(
            try_get(&client, web, "/").await,
            Ok((200, "s0".to_string()))
        );
    }
    assert_eq!(s1.count(), 0);
    let scrape = api.scrape().await;
    assert_eq!(
        scrape.get(
            "flowgate_server_weight",
            &[("backend", "pool"), ("server", "s1")]
        ),
        0.0
    );

    let answer = api.set_weight("pool", "s1", "null").await;
    assert_eq!(answer["weight"], 1);
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(try_get(&client, web, "/").await.expect("answer").1);
    }
    assert!(bodies.iter().any(|b| b == "s1"), "{bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_state_survives_reloads_and_restarts_with_a_state_file() {
    let s0 = Origin::named("s0").await;
    let s1 = Origin::named("s1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state_file = dir.path().join("state.json");
    let toml = pool_config(
        &[s0.addr, s1.addr],
        CHECKS_OFF,
        &format!("state_file = \"{}\"", state_file.display()),
    );
    let mut flowgate = FlowgateProcess::run(&toml);
    let api = AdminApi::of(&flowgate).await;
    api.set_state("pool", "s0", "drain").await;
    api.set_weight("pool", "s1", "7").await;
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state file"))
            .expect("state file is JSON");
    assert_eq!(saved["backends"]["pool"]["s0"]["state"], "drain");
    assert_eq!(saved["backends"]["pool"]["s1"]["state"], "ready");
    assert_eq!(saved["backends"]["pool"]["s1"]["weight"], 7);

    let kept = |api: &AdminApi| {
        let api = AdminApi::at(api.addr);
        async move {
            let s0 = api.server("pool", "s0").await;
            let s1 = api.server("pool", "s1").await;
            assert_eq!(s0["state"], "drain", "{s0}");
            assert_eq!(
                (s1["state"].as_str(), s1["weight"].as_u64()),
                (Some("up"), Some(7)),
                "{s1}"
            );
        }
    };
    // A reload by SIGHUP, then one through the API.
    flowgate.signal("HUP");
    eventually(Duration::from_secs(10), "generation 2", || async {
        api.backends().await["generation"] == 2
    })
    .await;
    kept(&api).await;
    let reply = api
        .call("POST", "/api/v1/reload", Auth::Bearer(OPERATOR), None)
        .await;
    assert_eq!(
        (reply.status, reply.json()["generation"].as_u64()),
        (200, Some(3))
    );
    kept(&api).await;

    // A restart: the state is back before the first request.
    flowgate.signal("TERM");
    assert_eq!(flowgate.wait_exit(Duration::from_secs(10)).await, Some(0));
    let flowgate = FlowgateProcess::run(&toml);
    let api = AdminApi::of(&flowgate).await;
    kept(&api).await;
    let web = flowgate.frontend_addr("web").await;
    let client = client();
    for _ in 0..6 {
        assert_eq!(
            try_get(&client, web, "/").await,
            Ok((200, "s1".to_string()))
        );
    }
    assert_eq!(s0.count(), 0, "s0 drained since before the restart");
    flowgate
        .wait_for_log("state file: pool/s0 restored", Duration::from_secs(1))
        .await;
    drop(flowgate);

    // A corrupt state file is logged and ignored.
    std::fs::write(&state_file, "{\"backends\": {\"pool\": ").expect("write");
    let flowgate = FlowgateProcess::run(&toml);
    let api = AdminApi::of(&flowgate).await;
    flowgate
        .wait_for_log("state file is corrupt", Duration::from_secs(1))
        .await;
    assert_eq!(api.server("pool", "s0").await["state"], "up");
}

// ---- Metrics and reload ----

/// `flowgate_thread_connections`: with two serving threads, held client
/// connections show up half on each (a new one goes to the thread serving
/// fewer), admin connections not among them, and leave as they close.
#[tokio::test]
async fn thread_connections_show_how_the_threads_share_the_clients() {
    let origin = Origin::named("served").await;
    let flowgate = FlowgateProcess::run(&pool_config(&[origin.addr], CHECKS_OFF, "threads = 2"));
    let api = AdminApi::of(&flowgate).await;
    let web = flowgate.frontend_addr("web").await;
    let per_thread = |scrape: Scrape| {
        ["0", "1"].map(|thread| scrape.get("flowgate_thread_connections", &[("thread", thread)]))
    };
    assert_eq!(per_thread(api.scrape().await), [0.0, 0.0]);

    let held = held_connections(web, 6, "served").await;
    assert_eq!(per_thread(api.scrape().await), [3.0, 3.0]);

    drop(held);
    eventually(
        Duration::from_secs(5),
        "every connection closed",
        || async { per_thread(api.scrape().await) == [0.0, 0.0] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_traffic_sent() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let origin = {
        let gate = Arc::clone(&gate);
        Origin::start(move |request: Request<hyper::body::Incoming>| {
            let gate = Arc::clone(&gate);
            async move {
                let status = match request.uri().path() {
                    "/fail" => 503,
                    "/slow" => {
                        if let Ok(permit) = gate.acquire().await {
                            permit.forget();
                        }
                        200
                    }
                    _ => 200,
                };
                let mut response = Response::new(full("answer"));
                *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                response
            }
        })
        .await
    };
    let engine = Engine::start("e0", "/health", 200).await;
    let toml = format!(
        "{}\n[frontends.checked]\nbind = [\"127.0.0.1:0\"]\nbackend = \"checked\"\n\n\
         [backends.checked.health]\ncheck = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n\n\
         [[backends.checked.servers]]\nname = \"e0\"\naddress = \"{}\"\n",
        pool_config(&[origin.addr], CHECKS_OFF, ""),
        engine.addr()
    );
    let flowgate = FlowgateProcess::run(&toml);
    let api = AdminApi::of(&flowgate).await;
    let web = flowgate.frontend_addr("web").await;

    // Every contract series exists from the first scrape, at 0.
    let first = api.scrape().await;
    for name in [
        "flowgate_server_up",
        "flowgate_server_state",
        "flowgate_server_in_flight",
        "flowgate_server_check_failures_total",
        "flowgate_backend_responses_total",
        "flowgate_backend_response_seconds",
        "flowgate_backend_queue_length",
        "flowgate_backend_retries_total",
        "flowgate_frontend_connections_total",
        "flowgate_frontend_active_connections",
        "flowgate_frontend_requests_total",
        "flowgate_thread_connections",
        "flowgate_config_reloads_total",
        "flowgate_config_generation",
        "flowgate_config_last_reload_success_timestamp_seconds",
    ] {
        assert!(first.has_family(name), "{name} missing:\n{}", first.text);
    }
    let pool = [("backend", "pool"), ("server", "s0")];
    for code in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        let labels = [("backend", "pool"), ("server", "s0"), ("code", code)];
        assert_eq!(first.get("flowgate_backend_responses_total", &labels), 0.0);
    }
    for state in ["down", "drain", "maint"] {
        let labels = [("backend", "pool"), ("server", "s0"), ("state", state)];
        assert_eq!(first.get("flowgate_server_state", &labels), 0.0);
    }
    assert_eq!(
        first.get(
            "flowgate_server_state",
            &[("backend", "pool"), ("server", "s0"), ("state", "up")]
        ),
        1.0
    );
    assert_eq!(first.get("flowgate_server_up", &pool), 1.0);
    assert_eq!(first.get("flowgate_server_in_flight", &pool), 0.0);
    assert_eq!(
        first.get("flowgate_server_check_failures_total", &pool),
        0.0
    );
    assert_eq!(
        first.get(
            "flowgate_backend_response_seconds_count",
            &[("backend", "pool")]
        ),
        0.0
    );
    assert_eq!(
        first.get("flowgate_backend_queue_length", &[("backend", "pool")]),
        0.0
    );
    assert_eq!(
        first.get("flowgate_backend_retries_total", &[("backend", "pool")]),
        0.0
    );
    for metric in [
        "flowgate_frontend_connections_total",
        "flowgate_frontend_active_connections",
        "flowgate_frontend_requests_total",
    ] {
        assert_eq!(first.get(metric, &[("frontend", "web")]), 0.0, "{metric}");
    }
    assert_eq!(
        first.get("flowgate_config_reloads_total", &[("result", "success")]),
        0.0
    );
    assert_eq!(
        first.get("flowgate_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert_eq!(first.get("flowgate_config_generation", &[]), 1.0);
    assert!(first.get("flowgate_config_last_reload_success_timestamp_seconds", &[]) > 1.6e9);

    // 7 answered 200 and 3 answered 503 by the origin.
    let client = client();
    for path in [
        "/ok", "/fail", "/ok", "/ok", "/fail", "/ok", "/ok", "/fail", "/ok", "/ok",
    ] {
        let expected = if path == "/fail" { 503 } else { 200 };
        assert_eq!(
            try_get(&client, web, path).await.map(|(s, _)| s),
            Ok(expected)
        );
    }
    let scrape = api.scrape().await;
    let responses = |code| {
        scrape.get(
            "flowgate_backend_responses_total",
            &[("backend", "pool"), ("server", "s0"), ("code", code)],
        )
    };
    assert_eq!((responses("2xx"), responses("5xx")), (7.0, 3.0));
    assert_eq!(
        (responses("1xx"), responses("3xx"), responses("4xx")),
        (0.0, 0.0, 0.0)
    );
    assert_eq!(
        scrape.get("flowgate_frontend_requests_total", &[("frontend", "web")]),
        10.0
    );
    assert_eq!(
        scrape.get(
            "flowgate_backend_response_seconds_count",
            &[("backend", "pool")]
        ),
        10.0
    );
    assert_eq!(
        scrape.get("flowgate_backend_retries_total", &[("backend", "pool")]),
        0.0
    );
    assert!(
        scrape.get(
            "flowgate_frontend_connections_total",
            &[("frontend", "web")]
        ) >= 1.0
    );
    // Health checks are not responses.
    let checked = |code| {
        scrape.get(
            "flowgate_backend_responses_total",
            &[("backend", "checked"), ("server", "e0"), ("code", code)],
        )
    };
    assert!(!engine.checks().is_empty());
    assert_eq!(checked("2xx"), 0.0);

    // A request held open counts in flight until it is answered.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { try_get(&client, web, "/slow").await })
    };
    eventually(Duration::from_secs(5), "in_flight 1", || async {
        api.scrape().await.get("flowgate_server_in_flight", &pool) == 1.0
    })
    .await;
    assert_eq!(api.server("pool", "s0").await["in_flight"], 1);
    gate.add_permits(1);
    assert_eq!(slow.await.expect("slow task").map(|(s, _)| s), Ok(200));
    eventually(Duration::from_secs(5), "in_flight 0", || async {
        api.scrape().await.get("flowgate_server_in_flight", &pool) == 0.0
    })
    .await;

    // A failed check takes the server down.
    let e0 = [("backend", "checked"), ("server", "e0")];
    assert_eq!(api.scrape().await.get("flowgate_server_up", &e0), 1.0);
    engine.set_status(500);
    eventually(Duration::from_secs(5), "e0 down", || async {
        api.scrape().await.get("flowgate_server_up", &e0) == 0.0
    })
    .await;
    let scrape = api.scrape().await;
    assert!(scrape.get("flowgate_server_check_failures_total", &e0) >= 1.0);
    assert_eq!(
        scrape.get(
            "flowgate_server_state",
            &[("backend", "checked"), ("server", "e0"), ("state", "down")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_through_the_api_answers_the_generation_or_the_errors() {
    let origin = Origin::named("s0").await;
    let toml = pool_config(&[origin.addr], CHECKS_OFF, "");
    let flowgate = FlowgateProcess::run(&toml);
    let api = AdminApi::of(&flowgate).await;
    let operator = Auth::Bearer(OPERATOR);

    let reply = api.call("POST", "/api/v1/reload", operator, None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), serde_json::json!({"generation": 2}));
    let scrape = api.scrape().await;
    assert_eq!(
        scrape.get("flowgate_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(scrape.get("flowgate_config_generation", &[]), 2.0);
    let failures_before = scrape.get("flowgate_config_reloads_total", &[("result", "failure")]);

    // Two problems, both reported; the running config stays.
    let broken = toml.replace(
        "retries = 0",
        "retries = 0\nbalance = \"fastest\"\nmax_queue = -1",
    );
    std::fs::write(&flowgate.config, &broken).expect("write config");
    let reply = api.call("POST", "/api/v1/reload", operator, None).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let errors: Vec<String> = reply.json()["errors"]
        .as_array()
        .expect("errors array")
        .iter()
        .map(|line| line.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("flowgate.toml:") && errors[0].contains("backends.pool.balance"),
        "{errors:?}"
    );
    assert!(errors[1].contains("backends.pool.max_queue"), "{errors:?}");
    let scrape = api.scrape().await;
    assert!(
        scrape.get("flowgate_config_reloads_total", &[("result", "failure")]) > failures_before
    );
    assert_eq!(scrape.get("flowgate_config_generation", &[]), 2.0);
    let all = api.backends().await;
    assert_eq!(all["generation"], 2);
    assert_eq!(
        all["reloads"]["last_errors"].as_array().map(Vec::len),
        Some(2)
    );
    let web = flowgate.frontend_addr("web").await;
    assert_eq!(
        try_get(&client(), web, "/").await,
        Ok((200, "s0".to_string()))
    );

    // Fixed: the next reload applies (the file watcher may have been first).
    std::fs::write(&flowgate.config, &toml).expect("write config");
    let reply = api.call("POST", "/api/v1/reload", operator, None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.json()["generation"].as_u64().is_some_and(|g| g >= 3));
    assert_eq!(
        api.backends().await["reloads"]["last_errors"],
        serde_json::json!([])
    );
}

// ---- External tools: promtool and a real browser ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_to_report_in_the_metrics() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIPPED: promtool is not installed (Debian: apt-get install prometheus)");
        return;
    }
    let origin = Origin::named("s0").await;
    let flowgate = FlowgateProcess::run(&pool_config(&[origin.addr, refused_addr()], "", ""));
    let api = AdminApi::of(&flowgate).await;
    let web = flowgate.frontend_addr("web").await;
    let client = client();
    for _ in 0..5 {
        assert_eq!(try_get(&client, web, "/").await.map(|(s, _)| s), Ok(200));
    }
    let scrape = api.call("GET", "/metrics", Auth::None, None).await.body;
    let checked = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(scrape.as_bytes())
            .expect("feed promtool");
        promtool.wait_with_output().expect("promtool output")
    })
    .await
    .expect("promtool task");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && report.trim().is_empty(),
        "promtool:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_down_server_in_headless_chromium() {
    let Some(browser) = ["chromium", "chromium-browser"].into_iter().find(|name| {
        Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        eprintln!("SKIPPED: chromium is not installed (Debian: apt-get install chromium)");
        return;
    };
    let up = Engine::start("e0", "/health", 200).await;
    let drained = Engine::start("e2", "/health", 200).await;
    let checks =
        "[backends.pool.health]\ncheck = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\n";
    let servers = [up.addr(), refused_addr(), drained.addr()];
    let flowgate = FlowgateProcess::run(&pool_config(&servers, checks, ""));
    let api = AdminApi::of(&flowgate).await;
    assert_eq!(api.server("pool", "s1").await["state"], "down");
    api.set_state("pool", "s2", "drain").await;

    let profile = tempfile::tempdir().expect("profile dir");
    let dom_path = profile.path().join("dom.html");
    let url = format!("http://viewer:{VIEWER}@{}/", api.addr);
    let dom_file = std::fs::File::create(&dom_path).expect("dom file");
    let mut chromium = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .args(["--dump-dom", &url])
        .stdin(Stdio::null())
        .stdout(dom_file)
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = chromium.try_wait().expect("chromium status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = chromium.kill();
            let _ = chromium.wait();
            panic!("chromium did not finish within 40 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "chromium: {status}");
    let dom = std::fs::read_to_string(&dom_path).expect("dom");

    let row = |server: &str| -> String {
        let marker = format!("data-server=\"pool/{server}\"");
        let at = dom
            .find(&marker)
            .unwrap_or_else(|| panic!("no row for {server} in:\n{dom}"));
        let start = dom[..at].rfind('<').expect("tag start");
        let end = at + dom[at..].find('>').expect("tag end");
        dom[start..=end].to_string()
    };
    assert!(row("s1").contains("data-state=\"down\""), "{}", row("s1"));
    assert!(row("s0").contains("data-state=\"up\""), "{}", row("s0"));
    assert!(row("s2").contains("data-state=\"drain\""), "{}", row("s2"));
    // The page refreshed itself with the browser's Basic credentials.
    assert!(
        dom.contains("id=\"refresh\" data-status=\"ok\""),
        "refresh indicator:\n{dom}"
    );
    assert!(dom.contains("data-frontend=\"web\""));
}

// ---- flowgate hash-token ----

#[test]
fn hash_token_prints_the_digest_the_config_wants() {
    let run = |input: &[u8]| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .arg("hash-token")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run hash-token");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write token");
        child.wait_with_output().expect("hash-token output")
    };
    // printf abc | sha256sum
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n";
    for input in [&b"abc"[..], b"abc\n", b"abc\r\n"] {
        let output = run(input);
        assert!(output.status.success());
        assert_eq!(String::from_utf8_lossy(&output.stdout), abc, "{input:?}");
    }
    let empty = run(b"\n");
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_grow_while_a_connection_lives_and_end_exact() {
    use tokio::io::AsyncWriteExt;
    // Reads the whole upload before answering.
    let origin = Origin::start(|request: Request<hyper::body::Incoming>| async move {
        let stored = request.into_body().collect().await.is_ok();
        Response::new(full(if stored { "stored" } else { "broken" }))
    })
    .await;
    let flowgate = FlowgateProcess::run(&pool_config(&[origin.addr], CHECKS_OFF, ""));
    let api = AdminApi::of(&flowgate).await;
    let web = flowgate.frontend_addr("web").await;
    let bytes = |scrape: &Scrape| {
        let labels = [("frontend", "web")];
        (
            scrape.get("flowgate_frontend_received_bytes_total", &labels),
            scrape.get("flowgate_frontend_sent_bytes_total", &labels),
        )
    };
    assert_eq!(bytes(&api.scrape().await), (0.0, 0.0));

    // A 40,000-byte upload on a keep-alive connection that stays open.
    let body = vec![b'x'; 40_000];
    let mut request = format!(
        "POST /upload HTTP/1.1\r\nHost: engine\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let mut stream = tokio::net::TcpStream::connect(web).await.expect("connect");
    stream.write_all(&request).await.expect("write");
    let response = common::read_response(&mut stream, Duration::from_secs(5))
        .await
        .expect("a response");
    assert!(response.ends_with("stored"), "{response}");

    // Counted while the connection lives, in steps of 16 KiB at most behind.
    let (received, sent) = bytes(&api.scrape().await);
    let request_len = request.len() as f64;
    assert!(
        received >= request_len - 16_384.0 && received <= request_len,
        "{received} of {request_len} while open"
    );
    assert!(sent <= response.len() as f64, "{sent}");

    // In full once it closes.
    drop(stream);
    let expected = (request_len, response.len() as f64);
    let (api, bytes) = (&api, &bytes);
    eventually(
        Duration::from_secs(5),
        &format!("the byte counters to reach {expected:?}"),
        || async move { bytes(&api.scrape().await) == expected },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tls_serves_https_only() {
    use common::tls::{ClientTls, KeyFormat, TestCa, https_get};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::root("admin CA");
    let (cert, key) = ca
        .server_leaf(&["admin.internal"], KeyFormat::EcdsaPkcs8)
        .write(dir.path(), "admin");
    let origin = Origin::named("ok").await;
    let toml = format!(
        "{}\n[admin.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        pool_config(&[origin.addr], CHECKS_OFF, ""),
        cert.display(),
        key.display()
    );
    let flowgate = FlowgateProcess::run(&toml);
    let admin = AdminApi::of(&flowgate).await.addr;
    let trusting = ClientTls::trusting(&ca).config();

    let (negotiated, status, body) = https_get(admin, &trusting, "admin.internal", "/metrics")
        .await
        .expect("HTTPS to the admin listener");
    assert_eq!(status, 200);
    assert!(body.contains("flowgate_frontend_requests_total"), "{body}");
    assert_eq!(negotiated.version, Some(rustls::ProtocolVersion::TLSv1_3));
    let (_, status, _) = https_get(admin, &trusting, "admin.internal", "/api/v1/backends")
        .await
        .expect("HTTPS");
    assert_eq!(status, 401, "tokens are still needed");

    // Plain HTTP gets no answer: the token never crosses the wire in clear.
    let plain = common::raw_exchange(
        admin,
        b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(!plain.starts_with("HTTP/"), "{plain:?}");
}
