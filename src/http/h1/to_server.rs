//! Requests hyper parsed (every h2 request, and the HTTP/1.1 ones the codec
//! hands over) sent to a plain HTTP/1.1 server by the codec's server side,
//! instead of hyper's HTTP/1.1 client: the head is written from the request's
//! header map into one buffer, the response head is parsed in place into the
//! map hyper writes to the client, and the body is read from the pooled
//! socket by whichever task polls it. No connection task, no channel between
//! the two, no second header map.
//!
//! Only requests without a body take this way (a body would have to be
//! streamed from hyper's `Incoming` into the socket); the others, and
//! upgrades, keep hyper's client (`http::proxy::send`). Retries, the response
//! timeout, passive health and metrics are the codec's own (`exchange`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::net::TcpStream;

use super::framing::{ChunkError, Framing, Step};
use super::head::{BadResponse, MAX_HEADERS, ServerHead};
use super::{Attempts, Body, Exchanged, MAX_RESPONSE_HEAD, Outgoing, SERVER_BUFFER, exchange};
use crate::balance::PickContext;
use crate::config::Protocol;
use crate::http::body::{BodyError, RequestBody, ResponseBody};
use crate::http::error::ProxyError;
use crate::http::proxy;
use crate::upstream::{Backend, InFlightGuard, Server};

/// The least room a body read gets.
const MIN_BODY_READ: usize = 4096;

/// Whether `request` (rewritten for `backend`) is sent this way.
pub fn takes(backend: &Backend, request: &http::Request<RequestBody>, tunnel: bool) -> bool {
    !tunnel
        && backend.config.protocol == Protocol::Http1
        && backend.config.tls.is_none()
        && matches!(request.body(), RequestBody::Empty)
}

/// Sends a bodiless request, its head already rewritten for the server
/// (`http::proxy::forward`), and returns the response with its body still to
/// be read from the server.
pub async fn send(
    backend: &Backend,
    pick: PickContext<'_>,
    request: &http::request::Parts,
    attempts: &mut Attempts,
) -> Result<Response<ResponseBody>, ProxyError> {
    let mut wire = Vec::with_capacity(1024);
    write_request(request, &mut wire);
    let outgoing = Outgoing {
        backend,
        pick,
        replayable: proxy::is_idempotent(&request.method),
        head_request: request.method == Method::HEAD,
        request: &wire,
    };
    let mut server = BytesMut::with_capacity(SERVER_BUFFER);
    let mut parts = None;
    let exchanged = {
        let to_parts = |head: &ServerHead<'_, '_>| parts = Some(response_parts(head));
        std::pin::pin!(exchange(&outgoing, &mut server, attempts, to_parts)).await?
    };
    let Exchanged {
        stream,
        guard,
        head,
        server: picked,
    } = exchanged;
    let parts = parts
        .unwrap_or(Err(BadResponse::Malformed))
        .map_err(ProxyError::BadResponse)?;
    server.advance(head.len);
    let body = ServerBody {
        stream: Some(stream),
        buf: server,
        body: Body::new(head.framing),
        trailer: Vec::new(),
        reusable: head.keep_alive,
        ended: false,
        server: picked,
        _guard: guard,
    };
    Ok(Response::from_parts(parts, ResponseBody::server(body)))
}

/// Writes the request for an HTTP/1.1 server: request line, fields as the map
/// holds them, and `content-length: 0` where a server may expect a length.
fn write_request(request: &http::request::Parts, out: &mut Vec<u8>) {
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    let target = request
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &request.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(request.method, Method::POST | Method::PUT | Method::PATCH)
        && !request.headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The response head for hyper: status, the fields the client gets, and the
/// length when the framing gives one.
fn response_parts(head: &ServerHead<'_, '_>) -> Result<http::response::Parts, BadResponse> {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(head.head.status).map_err(|_| BadResponse::Malformed)?;
    parts.version = Version::HTTP_11;
    for field in head.fields() {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| BadResponse::Malformed)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| BadResponse::Malformed)?;
        parts.headers.append(name, value);
    }
    if let Framing::Fixed(length) = head.head.framing {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(parts)
}

/// The trailer fields of a chunked body's trailer section (fields, then a
/// blank line), as hyper's client would pass them on; `None` without any.
/// Fields that do not parse are dropped, as the body has ended whole.
fn trailers(section: &[u8]) -> Option<HeaderMap> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(section, &mut fields)
    else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) {
            map.append(name, value);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// A response body read from the server's socket as it is polled, split into
/// data frames without a copy (chunked: the data of each chunk).
#[derive(Debug)]
pub struct ServerBody {
    /// `None` once back in the pool.
    stream: Option<TcpStream>,
    /// What was read from the server and not yet passed on.
    buf: BytesMut,
    /// Where the body ends: its framing and how far it has come.
    body: Body,
    /// A chunked body's trailer section, when it came in pieces (at most
    /// `MAX_RESPONSE_HEAD` bytes).
    trailer: Vec<u8>,
    /// The server keeps the connection open, and nothing it sent was
    /// unexpected: it goes back to the pool when the body has ended.
    reusable: bool,
    ended: bool,
    server: Arc<Server>,
    /// The server counts the request as in flight until the body is done.
    _guard: InFlightGuard,
}

impl ServerBody {
    /// The next frame of the body: data, or the trailers of a chunked one;
    /// `None` at its end.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            match self.body.framing {
                Framing::Empty => self.ended = true,
                Framing::Fixed(_) if self.body.left == 0 => self.ended = true,
                Framing::Fixed(_) | Framing::Close if !self.buf.is_empty() => {
                    // All of it for a body the close ends, at most what is
                    // left of a fixed-length one (`take` fails on chunked only).
                    let taken = self.body.take(&self.buf).map_or(0, |(taken, _)| taken);
                    return Poll::Ready(Some(Ok(Frame::data(self.buf.split_to(taken).freeze()))));
                }
                Framing::Chunked if !self.buf.is_empty() => {
                    match self.body.chunks.step(&self.buf) {
                        Ok(Step::Data(take)) => {
                            return Poll::Ready(Some(Ok(Frame::data(
                                self.buf.split_to(take).freeze(),
                            ))));
                        }
                        Ok(Step::Framing(skip)) => self.buf.advance(skip),
                        Ok(Step::Trailer(len)) => {
                            if self.trailer.len() + len > MAX_RESPONSE_HEAD {
                                return Poll::Ready(Some(Err(self.fail(ChunkError.into()))));
                            }
                            self.trailer.extend_from_slice(&self.buf[..len]);
                            self.buf.advance(len);
                        }
                        Ok(Step::End(len)) => {
                            self.ended = true;
                            let trailers = if self.trailer.is_empty() {
                                trailers(&self.buf[..len])
                            } else {
                                self.trailer.extend_from_slice(&self.buf[..len]);
                                trailers(&self.trailer)
                            };
                            self.buf.advance(len);
                            if let Some(trailers) = trailers {
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                        }
                        Err(err) => return Poll::Ready(Some(Err(self.fail(err.into())))),
                    }
                }
                Framing::Fixed(_) | Framing::Chunked | Framing::Close => {
                    if let Some(err) = ready!(self.poll_read(cx)) {
                        return Poll::Ready(Some(Err(self.fail(err))));
                    }
                }
            }
        }
    }

    /// Reads more of the body into `buf`: `Some(err)` when the server failed.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<BodyError>> {
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Some(BodyError::Closed));
        };
        // Reuses the buffer once hyper has dropped the frames taken from it.
        self.buf.reserve(MIN_BODY_READ);
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(stream),
            cx,
            &mut self.buf
        )) {
            Ok(0) if self.body.framing == Framing::Close => {
                self.ended = true;
                self.reusable = false;
                Poll::Ready(None)
            }
            Ok(0) => Poll::Ready(Some(BodyError::Closed)),
            Ok(_) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(BodyError::Server(err))),
        }
    }

    /// The server connection cannot be trusted after `err`: it is closed.
    fn fail(&mut self, err: BodyError) -> BodyError {
        self.reusable = false;
        self.stream = None;
        err
    }

    /// No data is left to read (hyper may then not poll the body at all).
    pub fn is_end_stream(&self) -> bool {
        self.ended || matches!(self.body.framing, Framing::Empty | Framing::Fixed(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.body.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Fixed(_) => SizeHint::with_exact(self.body.left),
            Framing::Chunked | Framing::Close => SizeHint::default(),
        }
    }

    /// The body went out whole: the server connection serves the next request
    /// on this thread, unless the server sent more than the response.
    pub fn finish(&mut self) {
        if let Some(stream) = self.stream.take()
            && self.reusable
            && self.is_end_stream()
            && self.buf.is_empty()
        {
            self.server.pool.checkin_stream(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(request: http::Request<()>) -> String {
        let (parts, ()) = request.into_parts();
        let mut out = Vec::new();
        write_request(&parts, &mut out);
        String::from_utf8(out).expect("ASCII")
    }

    #[test]
    fn writes_the_request_for_an_http11_server() {
        let request = http::Request::get("/workflows?page=2")
            .header("host", "engine")
            .header("x-tenant", "acme")
            .body(())
            .expect("request");
        assert_eq!(
            written(request),
            "GET /workflows?page=2 HTTP/1.1\r\nhost: engine\r\nx-tenant: acme\r\n\r\n"
        );
    }

    #[test]
    fn a_bodiless_post_gets_a_length() {
        let request = http::Request::post("/signal")
            .header("host", "engine")
            .body(())
            .expect("request");
        assert_eq!(
            written(request),
            "POST /signal HTTP/1.1\r\nhost: engine\r\ncontent-length: 0\r\n\r\n"
        );
        let request = http::Request::post("/signal")
            .header("content-length", "0")
            .body(())
            .expect("request");
        assert_eq!(
            written(request),
            "POST /signal HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
