//! One active check of one server: a TCP connect, or an HTTP GET whose status
//! must fall in `expect_status`. Each is bounded by the check's `timeout` and
//! uses a connection of its own, never one of the server's pooled connections,
//! so checks stay independent of traffic.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{CheckKind, HealthCheck, Protocol};
use crate::upstream::{ServerStream, UpstreamTls};

/// What one check found: `Ok` with a detail such as "HTTP 200", or `Err` with
/// why it failed ("connection refused", "HTTP 503", "timed out after 1s").
pub type ProbeResult = Result<String, String>;

/// Where and how to check one server.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTarget {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub check: HealthCheck,
    /// Checks speak TLS to servers that do.
    pub tls: Option<UpstreamTls>,
}

pub async fn probe(target: &ProbeTarget) -> ProbeResult {
    let check = &target.check;
    let timeout = check.timeout;
    match tokio::time::timeout(timeout, run(target)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn run(target: &ProbeTarget) -> ProbeResult {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(|err| describe(&err))?;
    let _ = stream.set_nodelay(true);
    let stream = match &target.tls {
        None => ServerStream::Plain(stream),
        Some(tls) => ServerStream::Tls(Box::new(
            tls.connect(stream)
                .await
                .map_err(|err| format!("TLS handshake failed: {err}"))?,
        )),
    };
    let check = &target.check;
    match check.check {
        CheckKind::None | CheckKind::Tcp if target.tls.is_some() => Ok("TLS handshake".to_string()),
        CheckKind::None | CheckKind::Tcp => Ok("TCP connect".to_string()),
        CheckKind::Http => {
            let host = check
                .host
                .clone()
                .unwrap_or_else(|| target.addr.to_string());
            let request = Request::get(check.path.as_str())
                .header(header::HOST, host.as_str())
                .header(header::USER_AGENT, "flowgate-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|err| format!("invalid check request: {err}"))?;
            let status = match target.protocol {
                Protocol::Http1 => {
                    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|err| err.to_string())?;
                    tokio::spawn(connection);
                    sender
                        .send_request(request)
                        .await
                        .map_err(|err| err.to_string())?
                        .status()
                }
                Protocol::H2 => {
                    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(TokioIo::new(stream))
                        .await
                        .map_err(|err| err.to_string())?;
                    tokio::spawn(connection);
                    let mut request = request;
                    *request.uri_mut() = format!("http://{host}{}", check.path)
                        .parse()
                        .map_err(|err| format!("invalid check path: {err}"))?;
                    request.headers_mut().remove(header::HOST);
                    sender
                        .send_request(request)
                        .await
                        .map_err(|err| err.to_string())?
                        .status()
                }
            };
            let detail = format!("HTTP {}", status.as_u16());
            let (low, high) = check.expect_status;
            if (low..=high).contains(&status.as_u16()) {
                Ok(detail)
            } else {
                Err(detail)
            }
        }
    }
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn describe(err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_string(),
        std::io::ErrorKind::TimedOut => "connect timed out".to_string(),
        _ => err.to_string(),
    }
}
