//! The access log as an operator reads it: one line per request with its request
//! id and the server that answered, in text or JSON, to a file that SIGUSR1
//! reopens after logrotate moved it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{FlowgateProcess, Origin, client, full, wait_until};
use http_body_util::BodyExt;

const LIMIT: Duration = Duration::from_secs(10);

fn config(origin: &Origin, log: &Path, format: &str) -> String {
    format!(
        "[global]\naccess_log = \"{}\"\nlog_format = \"{format}\"\n\n\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"engines\"\n\n\
         [backends.engines]\n[backends.engines.health]\ncheck = \"none\"\n\n\
         [[backends.engines.servers]]\nname = \"engine-7\"\naddress = \"{}\"\n",
        log.display(),
        origin.addr
    )
}

async fn request(addr: std::net::SocketAddr, id: &str) -> u16 {
    let request = hyper::Request::get(format!("http://{addr}/api/v1/workflows/42?x=1"))
        .header("x-request-id", id)
        .body(full(""))
        .expect("request");
    let response = client().request(request).await.expect("response");
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("body");
    status
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn each_request_is_one_line_with_its_id_and_server_and_sigusr1_reopens_the_file() {
    let origin = Origin::named("hello").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let flowgate = FlowgateProcess::run(&config(&origin, &log, "text"));
    let addr = flowgate.frontend_addr("web").await;

    assert_eq!(request(addr, "order-42-a").await, 200);
    wait_until(LIMIT, "the access log line", || {
        read(&log).contains("order-42-a")
    })
    .await;
    let text = read(&log);
    let line = text
        .lines()
        .find(|line| line.contains("order-42-a"))
        .expect("line");
    for part in [
        " web engines engine-7 ",
        "\"GET /api/v1/workflows/42?x=1\" 200 5 ",
        "id=order-42-a",
        "retries=0",
        "ttfb=",
        "total=",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert_eq!(text.lines().count(), 1, "one request, one line: {text:?}");

    // logrotate: move the file away, then SIGUSR1; the next line goes to a new
    // file at the configured path.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    flowgate.signal("USR1");
    flowgate
        .wait_for_log("SIGUSR1: access log reopened", LIMIT)
        .await;
    assert_eq!(request(addr, "order-42-b").await, 200);
    wait_until(LIMIT, "a line in the reopened file", || {
        read(&log).contains("order-42-b")
    })
    .await;
    assert!(
        !read(&rotated).contains("order-42-b"),
        "written to the rotated file"
    );
    assert!(read(&rotated).contains("order-42-a"));
}

#[tokio::test]
async fn json_lines_carry_the_same_fields() {
    let origin = Origin::named("hello").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.json");
    let flowgate = FlowgateProcess::run(&config(&origin, &log, "json"));
    // log_format applies to flowgate's own log too: read the address from JSON.
    let listening = flowgate
        .wait_for_log("\"message\":\"listening\"", LIMIT)
        .await;
    let listening: serde_json::Value = serde_json::from_str(&listening).expect("JSON log line");
    let addr: std::net::SocketAddr = listening["fields"]["addr"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .expect("listening address");

    assert_eq!(request(addr, "json-1").await, 200);
    wait_until(LIMIT, "the JSON line", || read(&log).contains("json-1")).await;
    let text = read(&log);
    let entry: serde_json::Value = serde_json::from_str(text.trim_end()).expect("one JSON object");
    assert_eq!(entry["request_id"], "json-1");
    assert_eq!(entry["server"], "engine-7");
    assert_eq!(entry["backend"], "engines");
    assert_eq!(entry["frontend"], "web");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["bytes"], 5);
    assert_eq!(entry["path"], "/api/v1/workflows/42?x=1");
    assert!(entry["total_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
}
