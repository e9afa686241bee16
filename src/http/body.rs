//! Bodies on both sides of the proxy. Both stream frame by frame (data and
//! trailers); nothing here buffers a body whole.
//!
//! [`ResponseBody`] carries what a response holds on to until its last frame has
//! been passed on: the server's in-flight guard, the pooled server connection
//! (released for reuse only after a complete response) and the client
//! connection's request count.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::conn::ActiveRequest;
use super::h1::{ChunkError, ServerBody};
use crate::access_log::{AccessLog, Entry, HttpEntry};
use crate::upstream::{Connection, InFlightGuard};

/// A request body on its way to a server.
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    Streaming(Incoming),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Streaming(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Streaming(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Streaming(body) => body.size_hint(),
        }
    }
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("server connection: {0}")]
    Server(std::io::Error),
    #[error("the server closed the connection before the body's end")]
    Closed,
    #[error(transparent)]
    Chunked(#[from] ChunkError),
}

/// What an upstream response holds until its body has ended.
#[derive(Debug)]
pub struct Completion {
    pub guard: InFlightGuard,
    pub connection: Option<Connection>,
}

impl Completion {
    /// The response arrived whole: the server connection can serve again.
    fn finish(self) {
        if let Some(connection) = self.connection {
            connection.release();
        }
    }
}

/// A response body on its way to the client.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    request: Option<ActiveRequest>,
    log: Option<PendingLog>,
}

/// An access log entry, written once the response body has ended (or was
/// abandoned).
#[derive(Debug)]
pub struct PendingLog {
    pub log: Arc<AccessLog>,
    pub entry: Box<HttpEntry>,
    pub started: Instant,
}

impl PendingLog {
    fn write(mut self) {
        self.entry.total = self.started.elapsed();
        self.log.log(Entry::Http(self.entry));
    }
}

#[derive(Debug)]
enum Kind {
    Upstream {
        body: Incoming,
        completion: Option<Completion>,
    },
    /// Read by flowgate's own HTTP/1.1 codec from the server's socket.
    Server(ServerBody),
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: Incoming, completion: Completion) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream {
                body,
                completion: Some(completion),
            },
            request: None,
            log: None,
        }
    }

    pub fn server(body: ServerBody) -> ResponseBody {
        ResponseBody {
            kind: Kind::Server(body),
            request: None,
            log: None,
        }
    }

    /// A short body flowgate writes itself (error answers).
    pub fn local(text: impl Into<Bytes>) -> ResponseBody {
        let text = text.into();
        ResponseBody {
            kind: Kind::Local((!text.is_empty()).then_some(text)),
            request: None,
            log: None,
        }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody::local(Bytes::new())
    }

    /// Ties the client connection's request count to this body's lifetime.
    pub(crate) fn track(mut self, request: ActiveRequest) -> ResponseBody {
        self.request = Some(request);
        self
    }

    /// Writes an access log entry for this response when it ends.
    pub(crate) fn log(mut self, pending: PendingLog) -> ResponseBody {
        self.log = Some(pending);
        self
    }

    fn complete(&mut self) {
        match &mut self.kind {
            Kind::Upstream { completion, .. } => {
                if let Some(completion) = completion.take() {
                    completion.finish();
                }
            }
            Kind::Server(body) => body.finish(),
            Kind::Local(_) => {}
        }
        self.request = None;
        if let Some(pending) = self.log.take() {
            pending.write();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Upstream { body, .. } => Pin::new(body).poll_frame(cx).map_err(BodyError::Hyper),
            Kind::Server(body) => body.poll_frame(cx),
            Kind::Local(text) => Poll::Ready(text.take().map(|text| Ok(Frame::data(text)))),
        };
        if let (Some(pending), Poll::Ready(Some(Ok(frame)))) = (&mut this.log, &polled)
            && let Some(data) = frame.data_ref()
        {
            pending.entry.bytes += data.len() as u64;
        }
        match &polled {
            Poll::Ready(None) => this.complete(),
            // A broken server body: the server connection is not reusable; the
            // guard and the client's request count go when the body is dropped.
            Poll::Ready(Some(Err(_))) => {
                if let Kind::Upstream { completion, .. } = &mut this.kind
                    && let Some(completion) = completion.as_mut()
                {
                    completion.connection = None;
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Server(body) => body.is_end_stream(),
            Kind::Local(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Server(body) => body.size_hint(),
            Kind::Local(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may never poll a body it knows is empty (204, HEAD, length 0);
        // such a response is complete all the same.
        if self.is_end_stream() {
            self.complete();
        }
        // An abandoned response is logged too, with what was sent.
        if let Some(pending) = self.log.take() {
            pending.write();
        }
    }
}
