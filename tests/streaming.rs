//! Big bodies through the real `flowgate` binary: an upload and a download of
//! [`SIZE`] bytes each stream through without the proxy holding them, as its
//! resident memory shows.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{FlowgateProcess, Origin, full};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Bytes sent in each direction.
const SIZE: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// How much the proxy's resident memory may grow over its idle baseline while a
/// transfer runs.
const RSS_HEADROOM_KIB: u64 = 64 * 1024;
/// Longest a single transfer may take (a debug build on a shared 2-core box).
const TRANSFER_LIMIT: Duration = Duration::from_secs(30);

/// A body of `remaining` bytes produced chunk by chunk; every chunk shares one
/// buffer, so the body itself holds only [`CHUNK`] bytes.
struct Generated {
    chunk: Bytes,
    remaining: u64,
}

impl Generated {
    fn new(size: u64) -> Generated {
        let pattern: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
        Generated {
            chunk: Bytes::from(pattern),
            remaining: size,
        }
    }
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = this.remaining.min(CHUNK as u64) as usize;
        this.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Reads a body to its end, counting bytes without keeping them.
async fn count_bytes(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

/// Samples the process's resident memory every 10 ms on its own thread until
/// stopped (or for at most 10 minutes), keeping the peak.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, done) = (Arc::clone(&peak_kib), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for _ in 0..60_000 {
                if done.load(Ordering::Acquire) {
                    return;
                }
                if let Some(rss) = rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            peak_kib,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns the peak seen.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sampler thread");
        }
        self.peak_kib.load(Ordering::Acquire)
    }
}

/// VmRSS of `pid` in KiB, or `None` once the process is gone.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// One HTTP/1.1 connection to the proxy.
async fn connect(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<common::Body> {
    let stream = TcpStream::connect(addr).await.expect("connect to flowgate");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("client handshake");
    tokio::spawn(connection);
    sender
}

/// Waits (bounded) until the connection can take the next request.
async fn ready(sender: &mut hyper::client::conn::http1::SendRequest<common::Body>) {
    tokio::time::timeout(Duration::from_secs(5), sender.ready())
        .await
        .expect("client connection ready in time")
        .expect("client connection open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_upload_and_download_stream_through_flowgate() {
    let origin = Origin::start(|request: Request<hyper::body::Incoming>| async move {
        if request.uri().path() == "/download" {
            return Response::new(Generated::new(SIZE).boxed());
        }
        match count_bytes(request.into_body()).await {
            Ok(total) => Response::new(full(total.to_string())),
            Err(err) => {
                let mut response = Response::new(full(format!("upload broke: {err}")));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
            }
        }
    })
    .await;
    let proxy = FlowgateProcess::run(&format!(
        "[global]\naccess_log = \"off\"\n\n\
         [frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
         [[backends.pool.servers]]\nname = \"s0\"\naddress = \"{}\"\n",
        origin.addr
    ));
    let addr = proxy.frontend_addr("web").await;

    // Warm up the data path once, then take the idle baseline.
    let mut sender = connect(addr).await;
    let warm = sender
        .send_request(
            Request::post("/upload")
                .header("host", "engine")
                .body(full(vec![0u8; CHUNK]))
                .expect("request"),
        )
        .await
        .expect("warm-up response");
    assert_eq!(warm.status(), StatusCode::OK);
    let warm = warm.into_body().collect().await.expect("warm-up body");
    assert_eq!(warm.to_bytes(), CHUNK.to_string());
    let baseline = proxy.rss_kib();

    // Upload.
    let sampler = RssSampler::start(proxy.pid());
    let started = Instant::now();
    ready(&mut sender).await;
    let request = Request::post("/upload")
        .header("host", "engine")
        .header("content-length", SIZE)
        .body(Generated::new(SIZE).boxed())
        .expect("request");
    let response = tokio::time::timeout(TRANSFER_LIMIT, sender.send_request(request))
        .await
        .expect("upload finished in time")
        .expect("upload response");
    assert_eq!(response.status(), StatusCode::OK);
    let answer = response.into_body().collect().await.expect("upload answer");
    let upload_time = started.elapsed();
    let upload_peak = sampler.finish();
    assert_eq!(answer.to_bytes(), SIZE.to_string(), "origin byte count");

    // Download, on the same client connection.
    let sampler = RssSampler::start(proxy.pid());
    let started = Instant::now();
    ready(&mut sender).await;
    let request = Request::get("/download")
        .header("host", "engine")
        .body(common::empty())
        .expect("request");
    let downloaded = tokio::time::timeout(TRANSFER_LIMIT, async {
        let response = sender
            .send_request(request)
            .await
            .expect("download response");
        assert_eq!(response.status(), StatusCode::OK);
        count_bytes(response.into_body())
            .await
            .expect("download body")
    })
    .await
    .expect("download finished in time");
    let download_time = started.elapsed();
    let download_peak = sampler.finish();
    assert_eq!(downloaded, SIZE);

    let mib = SIZE as f64 / (1024.0 * 1024.0);
    println!(
        "flowgate RSS baseline {baseline} KiB; upload of {mib} MiB in {upload_time:?} \
         ({:.0} MiB/s), peak {upload_peak} KiB; download in {download_time:?} \
         ({:.0} MiB/s), peak {download_peak} KiB",
        mib / upload_time.as_secs_f64(),
        mib / download_time.as_secs_f64(),
    );
    assert!(upload_peak > 0 && download_peak > 0, "no RSS sample taken");
    for (direction, peak) in [("upload", upload_peak), ("download", download_peak)] {
        assert!(
            peak <= baseline + RSS_HEADROOM_KIB,
            "{direction}: flowgate RSS peaked at {peak} KiB, baseline {baseline} KiB"
        );
    }
}
