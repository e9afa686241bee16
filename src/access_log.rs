//! The access log: one line per request (http mode) or session (tcp mode), in
//! text or JSON, to stderr or a file that SIGUSR1 reopens (logrotate).
//!
//! Entries go through a bounded channel to a writer thread of their own, so a
//! slow disk never stalls traffic: when the channel is full the entry is dropped
//! and counted (`flowgate_access_log_dropped_total`).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri};
use tokio::sync::mpsc;

use crate::config::{self, LogFormat};

/// Entries waiting for the writer at most; more are dropped (and counted).
const CAPACITY: usize = 16 * 1024;

/// How long the writer lets entries gather after the first of a batch:
/// traffic then costs one wake-up of the writer and one write per batch,
/// not per request (lines show at most this much later).
const BATCH: Duration = Duration::from_millis(20);

/// One request, as the access log shows it.
#[derive(Debug)]
pub struct HttpEntry {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub frontend: Arc<str>,
    pub backend: Option<Arc<str>>,
    pub server: Option<Arc<str>>,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// Until the response head was ready.
    pub ttfb: Duration,
    /// Until the response body ended.
    pub total: Duration,
    pub request_id: Option<HeaderValue>,
    pub retries: u32,
}

/// One tcp-mode session.
#[derive(Debug)]
pub struct TcpEntry {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub frontend: Arc<str>,
    pub backend: Arc<str>,
    pub server: Option<Arc<str>>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
}

#[derive(Debug)]
pub enum Entry {
    Http(Box<HttpEntry>),
    Tcp(Box<TcpEntry>),
    /// Wakes the writer (to reopen its file).
    Wake,
}

/// Entries dropped because the writer could not keep up, over all loggers.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Entries dropped so far (`flowgate_access_log_dropped_total`).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Where entries go; shared by every connection.
#[derive(Debug)]
pub struct AccessLog {
    sender: mpsc::Sender<Entry>,
    reopen: Arc<AtomicBool>,
    /// What it writes to, to tell whether a reload changed it.
    pub target: config::AccessLog,
    pub format: LogFormat,
}

impl AccessLog {
    /// Starts the writer; `None` when the access log is off.
    pub fn start(
        target: &config::AccessLog,
        format: LogFormat,
    ) -> io::Result<Option<Arc<AccessLog>>> {
        let sink = match target {
            config::AccessLog::Off => return Ok(None),
            config::AccessLog::Stderr => Sink::Stderr,
            config::AccessLog::File(path) => Sink::File(open(path)?, path.clone()),
        };
        let (sender, receiver) = mpsc::channel(CAPACITY);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            receiver,
            sink,
            format,
            reopen: Arc::clone(&reopen),
        };
        std::thread::Builder::new()
            .name("flowgate-access-log".to_string())
            .spawn(move || writer.run())?;
        Ok(Some(Arc::new(AccessLog {
            sender,
            reopen,
            target: target.clone(),
            format,
        })))
    }

    /// Queues an entry; never waits.
    pub fn log(&self, entry: Entry) {
        if self.sender.try_send(entry).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reopens the log file (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        let _ = self.sender.try_send(Entry::Wake);
    }
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

enum Sink {
    Stderr,
    File(File, PathBuf),
}

struct Writer {
    receiver: mpsc::Receiver<Entry>,
    sink: Sink,
    format: LogFormat,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        let mut line = String::with_capacity(512);
        let mut out = BufWriter::with_capacity(64 * 1024, self.sink_writer());
        // Asleep until the first entry of a batch; ends when every sender is
        // gone (the proxy stopped), every batch written out.
        while let Some(first) = self.receiver.blocking_recv() {
            // The rest of the batch arrives meanwhile, and queueing an entry
            // for a writer that is not waiting costs the sender no wake-up.
            std::thread::sleep(BATCH);
            let mut next = Some(first);
            while let Some(entry) = next {
                if self.reopen.swap(false, Ordering::AcqRel) {
                    let _ = out.flush();
                    drop(out);
                    self.reopen_file();
                    out = BufWriter::with_capacity(64 * 1024, self.sink_writer());
                }
                line.clear();
                match self.format {
                    LogFormat::Text => format_text(&entry, &mut line),
                    LogFormat::Json => format_json(&entry, &mut line),
                }
                if !line.is_empty() {
                    let _ = out.write_all(line.as_bytes());
                }
                next = self.receiver.try_recv().ok();
            }
            // Caught up: the batch goes out (a full buffer went out already).
            let _ = out.flush();
        }
    }

    fn sink_writer(&self) -> Box<dyn Write> {
        match &self.sink {
            Sink::Stderr => Box::new(Stderr),
            Sink::File(file, _) => match file.try_clone() {
                Ok(file) => Box::new(file),
                Err(_) => Box::new(io::sink()),
            },
        }
    }

    fn reopen_file(&mut self) {
        if let Sink::File(file, path) = &mut self.sink {
            match open(path) {
                Ok(reopened) => *file = reopened,
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "cannot reopen the access log")
                }
            }
        }
    }
}

/// Standard error through `eprint!`, one call per flushed batch (test harnesses
/// capture it, unlike raw writes to the file descriptor).
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

fn format_text(entry: &Entry, line: &mut String) {
    use std::fmt::Write as _;
    let dash = |name: &Option<Arc<str>>| {
        name.as_ref()
            .map_or_else(|| "-".to_string(), |n| n.to_string())
    };
    match entry {
        Entry::Http(e) => {
            let id = e
                .request_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .unwrap_or("-");
            let _ = writeln!(
                line,
                "{} {} {} {} {} \"{} {}\" {} {} ttfb={}ms total={}ms id={} retries={}",
                humantime::format_rfc3339_millis(e.time),
                e.client,
                e.frontend,
                dash(&e.backend),
                dash(&e.server),
                e.method,
                e.uri
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .escape_default(),
                e.status,
                e.bytes,
                millis(e.ttfb),
                millis(e.total),
                id.escape_default(),
                e.retries,
            );
        }
        Entry::Tcp(e) => {
            let _ = writeln!(
                line,
                "{} {} {} {} {} tcp in={} out={} duration={}ms",
                humantime::format_rfc3339_millis(e.time),
                e.client,
                e.frontend,
                e.backend,
                dash(&e.server),
                e.bytes_in,
                e.bytes_out,
                millis(e.duration),
            );
        }
        Entry::Wake => {}
    }
}

fn format_json(entry: &Entry, line: &mut String) {
    let value = match entry {
        Entry::Http(e) => serde_json::json!({
            "time": humantime::format_rfc3339_millis(e.time).to_string(),
            "type": "http",
            "client": e.client.to_string(),
            "frontend": &*e.frontend,
            "backend": e.backend.as_deref(),
            "server": e.server.as_deref(),
            "method": e.method.as_str(),
            "path": e.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            "status": e.status,
            "bytes": e.bytes,
            "ttfb_ms": millis(e.ttfb),
            "total_ms": millis(e.total),
            "request_id": e.request_id.as_ref().and_then(|id| id.to_str().ok()),
            "retries": e.retries,
        }),
        Entry::Tcp(e) => serde_json::json!({
            "time": humantime::format_rfc3339_millis(e.time).to_string(),
            "type": "tcp",
            "client": e.client.to_string(),
            "frontend": &*e.frontend,
            "backend": &*e.backend,
            "server": e.server.as_deref(),
            "bytes_in": e.bytes_in,
            "bytes_out": e.bytes_out,
            "duration_ms": millis(e.duration),
        }),
        Entry::Wake => return,
    };
    line.push_str(&value.to_string());
    line.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry::Http(Box::new(HttpEntry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            client: "127.0.0.1:50000".parse().expect("addr"),
            frontend: Arc::from("public"),
            backend: Some(Arc::from("engines")),
            server: Some(Arc::from("engine-1")),
            method: Method::GET,
            uri: Uri::from_static("/api/v1/workflows/7?x=1"),
            status: 200,
            bytes: 85,
            ttfb: Duration::from_micros(1500),
            total: Duration::from_micros(2250),
            request_id: Some(HeaderValue::from_static("abc123")),
            retries: 1,
        }))
    }

    #[test]
    fn text_line_has_every_field() {
        let mut line = String::new();
        format_text(&entry(), &mut line);
        assert_eq!(
            line,
            "2027-01-15T08:00:00.000Z 127.0.0.1:50000 public engines engine-1 \"GET /api/v1/workflows/7?x=1\" 200 85 ttfb=1.5ms total=2.25ms id=abc123 retries=1\n"
        );
    }

    #[test]
    fn json_line_is_one_object() {
        let mut line = String::new();
        format_json(&entry(), &mut line);
        let value: serde_json::Value = serde_json::from_str(line.trim_end()).expect("json");
        assert_eq!(value["server"], "engine-1");
        assert_eq!(value["request_id"], "abc123");
        assert_eq!(value["status"], 200);
        assert_eq!(value["ttfb_ms"], 1.5);
    }
}
