//! The client side of one HTTP connection below hyper: the request-head timer
//! (slowloris: 408 and close) and the idle keep-alive timer.
//!
//! hyper's own header timeout also runs while a keep-alive connection waits for
//! its next request and answers nothing, so flowgate keeps both timers here.
//! [`ClientIo`] sees every byte the client sends; the service tells it through
//! [`ConnActivity`] when a request head was complete and when its response ended.
//! Timers are lazy: one `Sleep` per connection, re-armed only when it fires early.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{ClientBytes, FrontendStats};

/// How long an HTTP/1.1 connection waits for its next request before it is
/// parked: hyper's connection (with its 8 KiB read and write buffers) ends as
/// if the client had closed, the socket stays open, and the next request
/// starts a fresh hyper connection (see `http::server`).
pub const PARK_AFTER: Duration = Duration::from_millis(20);

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 22\r\n\
connection: close\r\n\
\r\n\
request head too slow\n";

/// flowgate's answers in place of hyper's bodiless ones for heads it rejects
/// before any request starts (status code, full response).
const HEAD_ERRORS: [(&[u8; 3], &[u8]); 3] = [
    (
        b"400",
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 12\r\nconnection: close\r\n\r\nbad request\n",
    ),
    (
        b"414",
        b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 24\r\nconnection: close\r\n\r\nrequest target too long\n",
    ),
    (
        b"431",
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 23\r\nconnection: close\r\n\r\nrequest head too large\n",
    ),
];

/// The answer to write instead of `written`, when `written` is hyper's own
/// answer to a head it could not accept (`HTTP/1.1 4xx`, no body).
fn head_error_answer(written: &[u8]) -> Option<&'static [u8]> {
    let status = written.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let answer = HEAD_ERRORS.iter().find(|(code, _)| status == *code)?.1;
    let empty_body = written
        .windows(19)
        .any(|w| w.eq_ignore_ascii_case(b"content-length: 0\r\n"));
    empty_body.then_some(answer)
}

/// Shared between a connection's I/O and its requests.
#[derive(Debug, Default)]
pub struct ConnActivity {
    /// Requests whose head arrived and whose response has not ended yet.
    in_flight: AtomicU32,
    /// Bytes of a request head have arrived and its request has not started yet.
    head_pending: AtomicBool,
    /// The latest request asked for the connection to close after it.
    last: AtomicBool,
}

impl ConnActivity {
    /// A request head is complete; counts the request until the guard drops.
    /// `last`: the client asked for the connection to close after it.
    pub fn begin_request(self: &Arc<Self>, last: bool) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_pending.store(false, Ordering::Release);
        self.last.store(last, Ordering::Release);
        ActiveRequest {
            activity: Arc::clone(self),
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// One request on a client connection, from complete head to end of response.
#[derive(Debug)]
pub struct ActiveRequest {
    activity: Arc<ConnActivity>,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    pub request_header: Duration,
    pub client_idle: Duration,
}

/// A client stream with flowgate's head and idle timers.
#[derive(Debug)]
pub struct ClientIo<S> {
    inner: S,
    activity: Arc<ConnActivity>,
    timeouts: ClientTimeouts,
    protocol: Protocol,
    /// When the current request head started (or the connection was accepted).
    head_started: Instant,
    /// Whether any byte of the pending head has arrived.
    head_bytes: bool,
    last_active: Instant,
    timer: Pin<Box<Sleep>>,
    /// Progress writing the 408 answer, once the head timer fired.
    closing: Option<usize>,
    /// flowgate's answer to a rejected head, replacing hyper's, and how much of
    /// it is written.
    replacing: Option<(&'static [u8], usize)>,
    /// Bytes read before hyper's connection started, for hyper to read first.
    replay: Option<BytesMut>,
    /// hyper's HTTP/1.1 connection runs and may be parked once idle.
    armed: bool,
    /// hyper was told the client closed, to park the connection.
    parked: bool,
    /// The last write or flush could not complete: hyper may hold bytes that
    /// the client has not taken yet, so the connection must not park.
    write_blocked: bool,
    /// Bytes moved, added to the frontend's counters as they add up and in
    /// full when the connection ends.
    bytes: ClientBytes,
    stats: Arc<FrontendStats>,
}

impl<S> Drop for ClientIo<S> {
    fn drop(&mut self) {
        self.bytes.flush(&self.stats);
    }
}

impl<S> ClientIo<S> {
    /// `http2` is known up front when TLS negotiated it by ALPN.
    pub fn new(
        inner: S,
        activity: Arc<ConnActivity>,
        timeouts: ClientTimeouts,
        http2: bool,
        stats: Arc<FrontendStats>,
    ) -> Self {
        let now = Instant::now();
        // A new connection waits for its first head like any other.
        activity.head_pending.store(!http2, Ordering::Release);
        ClientIo {
            inner,
            activity,
            timeouts,
            protocol: if http2 {
                Protocol::Http2
            } else {
                Protocol::Http1
            },
            head_started: now,
            head_bytes: false,
            last_active: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.request_header)),
            closing: None,
            replacing: None,
            replay: None,
            armed: false,
            parked: false,
            write_blocked: false,
            bytes: ClientBytes::default(),
            stats,
        }
    }

    /// The client spoke h2c's preface: no head timer, no parking.
    pub fn set_http2(&mut self) {
        self.protocol = Protocol::Http2;
        self.armed = false;
        self.activity.head_pending.store(false, Ordering::Release);
    }

    /// Keeps bytes read before hyper's connection starts, for hyper to read
    /// first, and lets the connection park once idle again. Returns the bytes.
    pub fn replay(&mut self, bytes: BytesMut) -> &[u8] {
        self.armed = self.protocol == Protocol::Http1;
        self.replay.insert(bytes)
    }

    /// After hyper's connection ended: whether it ended because the connection
    /// was parked (the socket is open and waits for the next request). `unread`
    /// is what hyper had read but not used, read again first.
    pub fn unpark(&mut self, unread: &[u8]) -> bool {
        if !std::mem::take(&mut self.parked) {
            return false;
        }
        self.armed = true;
        if !unread.is_empty() {
            self.replay = Some(BytesMut::from(unread));
        }
        true
    }

    /// Bytes are waiting to be read again (see [`ClientIo::replay`]).
    pub fn has_replay(&self) -> bool {
        self.replay.is_some()
    }

    /// When an idle connection is closed.
    pub fn idle_deadline(&self) -> Instant {
        self.last_active + self.timeouts.client_idle
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn note_read(&mut self, count: usize) {
        self.bytes.received(count as u64, &self.stats);
        let now = Instant::now();
        self.last_active = now;
        if self.protocol == Protocol::Http2 {
            return;
        }
        if self.activity.head_pending.load(Ordering::Acquire) {
            self.head_bytes = true;
        } else if self.activity.idle() {
            // First bytes of the next request on a keep-alive connection.
            self.activity.head_pending.store(true, Ordering::Release);
            self.head_started = now;
            self.head_bytes = true;
        }
    }

    /// When the connection must give up (or park), if nothing happens
    /// before; `None` while a request is in flight: nothing expires then.
    fn due(&self) -> Option<Instant> {
        // (The head timer and parking concern HTTP/1.1 only.)
        if self.protocol != Protocol::Http2 && self.activity.head_pending.load(Ordering::Acquire) {
            Some(self.head_started + self.timeouts.request_header)
        } else if self.activity.idle() {
            let idle = self.last_active + self.timeouts.client_idle;
            Some(if self.armed {
                idle.min(self.last_active + PARK_AFTER)
            } else {
                idle
            })
        } else {
            None
        }
    }

    /// Whether the armed timer wakes the task in time for `due`: then there
    /// is nothing to look at before it fires, and no need to read the clock.
    fn timer_in_time(&self, due: Option<Instant>) -> bool {
        !self.timer.is_elapsed() && due.is_none_or(|due| self.timer.deadline() <= due)
    }
}

impl<S> ClientIo<S> {
    /// Runs one write or flush on the stream, noting whether it blocked.
    fn blocking<T>(
        &mut self,
        op: impl FnOnce(&mut S) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let poll = op(&mut self.inner);
        self.write_blocked = poll.is_pending();
        poll
    }

    /// Arms the connection's one timer for `deadline` and registers the task
    /// to be woken. A later deadline waits for the armed timer to fire first
    /// (it is looked at again then), so most calls reset nothing.
    fn arm_timer(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if deadline < self.timer.deadline() || self.timer.is_elapsed() {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx)
    }

    /// An idle HTTP/1.1 connection, within its idle timeout, that has waited
    /// [`PARK_AFTER`] for its next request.
    fn may_park(&self, now: Instant) -> bool {
        self.armed
            && self.protocol == Protocol::Http1
            && !self.activity.head_pending.load(Ordering::Acquire)
            && self.activity.idle()
            && !self.write_blocked
            && now >= self.last_active + PARK_AFTER
            && now < self.last_active + self.timeouts.client_idle
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientIo<S> {
    /// Writes the 408 answer, then shuts the stream down.
    fn poll_close_with_408(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(written) = self.closing
            && written < REQUEST_TIMEOUT.len()
        {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &REQUEST_TIMEOUT[written..]))?;
            if n == 0 {
                break;
            }
            self.closing = Some(written + n);
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            // End of stream for hyper once the answer is out (errors included:
            // the connection is over either way).
            let _ = ready!(this.poll_close_with_408(cx));
            return Poll::Ready(Ok(()));
        }
        if let Some(replay) = &mut this.replay {
            // Already counted when read from the socket.
            let n = replay.len().min(buf.remaining());
            buf.put_slice(&replay.split_to(n));
            if replay.is_empty() {
                this.replay = None;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let count = buf.filled().len() - before;
                if count > 0 {
                    this.note_read(count);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => loop {
                let due = this.due();
                if this.timer_in_time(due) {
                    // Most waits: the timer armed for an earlier deadline (or
                    // this one) is still ahead.
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    continue;
                }
                let now = Instant::now();
                // A request in flight: look again later, in case the
                // connection goes idle without another read.
                let deadline = due.unwrap_or(now + this.timeouts.client_idle);
                if deadline <= now {
                    if this.may_park(now) {
                        // End of stream for hyper, which then ends its
                        // connection without shutting the socket down.
                        tracing::trace!("parking an idle connection");
                        this.armed = false;
                        this.parked = true;
                        return Poll::Ready(Ok(()));
                    }
                    if this.protocol != Protocol::Http2
                        && this.activity.head_pending.load(Ordering::Acquire)
                        && this.head_bytes
                    {
                        tracing::debug!("request head too slow, answering 408");
                        this.closing = Some(0);
                        let _ = ready!(this.poll_close_with_408(cx));
                    }
                    // Idle, or a connection that never sent a byte: close quietly.
                    return Poll::Ready(Ok(()));
                }
                if this.arm_timer(deadline, cx).is_pending() {
                    return Poll::Pending;
                }
            },
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientIo<S> {
    /// Whether `written` is hyper answering a head it rejected; if so, flowgate's
    /// answer replaces it. Only possible while a head is pending and no request
    /// started, which is exactly when hyper answers on its own.
    fn intercept(&mut self, written: &[u8]) -> bool {
        if self.replacing.is_some() {
            // The rest of hyper's answer, if it came in pieces.
            return true;
        }
        if self.protocol == Protocol::Http2 || !self.activity.head_pending.load(Ordering::Acquire) {
            return false;
        }
        match head_error_answer(written) {
            Some(answer) => {
                self.replacing = Some((answer, 0));
                true
            }
            None => false,
        }
    }

    fn poll_write_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((answer, written)) = self.replacing
            && written < answer.len()
        {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.replacing = Some((answer, written + n));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.intercept(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        let written = ready!(this.blocking(|inner| Pin::new(inner).poll_write(cx, buf)))?;
        this.bytes.sent(written as u64, &this.stats);
        this.last_active = Instant::now();
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|buf| !buf.is_empty())
            && this.intercept(first)
        {
            return Poll::Ready(Ok(bufs.iter().map(|buf| buf.len()).sum()));
        }
        let written = ready!(this.blocking(|inner| Pin::new(inner).poll_write_vectored(cx, bufs)))?;
        this.bytes.sent(written as u64, &this.stats);
        this.last_active = Instant::now();
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_replacement(cx))?;
        ready!(this.blocking(|inner| Pin::new(inner).poll_flush(cx)))?;
        if this.armed && this.activity.idle() && !this.activity.last.load(Ordering::Acquire) {
            // A response has just gone out whole and hyper's read is already
            // waiting on a later deadline: wake up in time to park. (Not
            // after the last response: the connection closes now. An earlier
            // timer also costs a system call: tokio wakes its driver to look
            // at the new deadline.)
            let _ = this.arm_timer(this.last_active + PARK_AFTER, cx);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parked {
            // hyper ends a parked connection as if the client had closed it;
            // the socket stays open for the next request.
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_replacement(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_head_errors_get_flowgate_answers() {
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = head_error_answer(hyper_431).expect("replaced");
        assert!(answer.ends_with(b"\r\n\r\nrequest head too large\n"));
        for (_, answer) in HEAD_ERRORS {
            let text = std::str::from_utf8(answer).expect("utf8");
            let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
            assert!(
                head.contains(&format!("content-length: {}", body.len())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn ordinary_responses_are_left_alone() {
        assert!(
            head_error_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 20\r\n\r\n").is_none()
        );
        assert!(
            head_error_answer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none()
        );
        assert!(head_error_answer(b"0\r\n\r\n").is_none());
    }
}
