//! Request and response heads for flowgate's own HTTP/1.1 forwarding: parsed
//! in place with httparse, checked, and written out for the next hop into one
//! buffer, without building a header map.

use http::HeaderName;

use super::framing::Framing;
use crate::http::route::{Routable, host_header_name};

/// Header lines a head may have on this path; a head with more goes to hyper.
pub const MAX_HEADERS: usize = 64;

/// A request head as the client sent it, borrowed from the read buffer.
#[derive(Debug)]
pub struct RequestHead<'a> {
    /// Bytes of the head in the buffer, blank line included.
    pub len: usize,
    pub method: &'a str,
    /// The request target, origin-form (`/path?query`).
    pub target: &'a str,
    pub headers: &'a [httparse::Header<'a>],
    /// The Host header's value.
    pub host: &'a [u8],
    /// Bytes of body after the head (its `Content-Length`).
    pub body: usize,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// What the bytes read so far hold.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// The head is not complete yet.
    Partial,
    /// A head this codec does not forward: hyper serves it (and answers any
    /// error in it).
    Other,
    Head(RequestHead<'a>),
}

/// Parses a request head. Only the plain case is taken: HTTP/1.1, an
/// origin-form target, one Host, at most one `Content-Length` and no
/// `Transfer-Encoding`, no `Upgrade`, `Expect` or `TE`, a `Connection` that
/// says only close or keep-alive, and not gRPC. Everything else is
/// [`Parsed::Other`].
pub fn parse_request<'a>(
    buf: &'a [u8],
    headers: &'a mut [httparse::Header<'a>; MAX_HEADERS],
) -> Parsed<'a> {
    let mut request = httparse::Request::new(headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Parsed::Other;
    };
    if !target.starts_with('/') || method == "CONNECT" {
        return Parsed::Other;
    }
    let headers: &'a [httparse::Header<'a>] = request.headers;
    let mut host = None;
    let mut close = false;
    let mut body = None;
    for header in headers {
        let name = header.name;
        let value = header.value;
        if name.eq_ignore_ascii_case("host") {
            if host.replace(value).is_some() {
                return Parsed::Other;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Parsed::Other;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let Some(length) = decimal(value) else {
                return Parsed::Other;
            };
            if body.replace(length).is_some() {
                return Parsed::Other;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("te")
            || (name.eq_ignore_ascii_case("content-type") && value.starts_with(b"application/grpc"))
        {
            return Parsed::Other;
        }
    }
    let Some(host) = host else {
        return Parsed::Other;
    };
    Parsed::Head(RequestHead {
        len,
        method,
        target,
        headers,
        host,
        body: body.unwrap_or(0),
        close,
    })
}

/// A `Content-Length` value: digits only.
fn decimal(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The comma-separated tokens of a `Connection` value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&byte| byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

impl RequestHead<'_> {
    /// The size of the head in HTTP/1.1 form as hyper measures it for
    /// `limits.max_header_bytes`: request line, `name: value` lines, blank line.
    pub fn normalized_size(&self) -> usize {
        let fields: usize = self
            .headers
            .iter()
            .map(|header| header.name.len() + 2 + header.value.len() + 2)
            .sum();
        self.method.len() + 1 + self.target.len() + 1 + "HTTP/1.1\r\n".len() + fields + 2
    }

    /// GET, HEAD, OPTIONS, TRACE, PUT and DELETE (RFC 9110 9.2.2): sending
    /// one again after a failure has no further effect.
    pub fn idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// The value of the first `name` header, if any.
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
    }

    /// The client's X-Request-Id, if it sent one.
    pub fn request_id(&self) -> Option<&[u8]> {
        self.first("x-request-id")
    }

    /// Writes the head for the server into `out`: the client's fields less
    /// the hop-by-hop ones, X-Forwarded-For with the client appended,
    /// X-Forwarded-Proto, X-Forwarded-Host, and X-Request-Id (`new_id`) when
    /// the client sent none.
    pub fn write_for_server(
        &self,
        out: &mut Vec<u8>,
        forwarded_for: &[u8],
        https: bool,
        new_id: Option<&[u8]>,
    ) {
        out.clear();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut earlier_hops = 0;
        for header in self.headers {
            let name = header.name;
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                earlier_hops += 1;
                continue;
            }
            if name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("keep-alive")
                || name.eq_ignore_ascii_case("proxy-connection")
                || name.eq_ignore_ascii_case("x-forwarded-proto")
                || name.eq_ignore_ascii_case("x-forwarded-host")
            {
                continue;
            }
            field(out, name.as_bytes(), header.value);
        }
        // Several X-Forwarded-For lines are one list (RFC 9110 5.3): joined
        // in order, then the client.
        out.extend_from_slice(b"x-forwarded-for: ");
        if earlier_hops > 0 {
            for header in self.headers {
                if header.name.eq_ignore_ascii_case("x-forwarded-for") {
                    out.extend_from_slice(header.value);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(forwarded_for);
        out.extend_from_slice(b"\r\n");
        field(
            out,
            b"x-forwarded-proto",
            if https { b"https" } else { b"http" },
        );
        field(out, b"x-forwarded-host", self.host);
        if let Some(id) = new_id {
            field(out, b"x-request-id", id);
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl Routable for RequestHead<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target, |(path, _)| path)
    }

    fn host(&self) -> Option<&str> {
        std::str::from_utf8(self.host).ok().map(host_header_name)
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.first(name.as_str())
    }
}

/// A response head from the server, read whole.
#[derive(Debug)]
pub enum Response<'b, 'h> {
    /// An interim response (1xx but 101) of `len` bytes: dropped, as hyper
    /// does; the final one follows.
    Interim {
        len: usize,
    },
    Final(ServerHead<'b, 'h>),
}

/// What the rest of the exchange needs of a final response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
}

/// A final response head, borrowed from the server's bytes.
#[derive(Debug)]
pub struct ServerHead<'b, 'h> {
    pub head: ResponseHead,
    reason: Option<&'b str>,
    headers: &'h [httparse::Header<'b>],
    /// `Connection` lines: the headers they name are hop-by-hop too.
    connection_lines: usize,
}

/// Why a response cannot be forwarded: the server connection is not reused and
/// the client gets a 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("malformed response head")]
    Malformed,
    #[error("response head over {0} bytes")]
    TooLarge(usize),
    #[error("invalid content-length")]
    ContentLength,
    #[error("101 Switching Protocols without an upgrade request")]
    UnaskedUpgrade,
    #[error("malformed chunked body")]
    Chunked,
    #[error("connection closed before the response head")]
    Closed,
}

/// Parses a response head from `buf` (`None`: not complete yet) into
/// `headers`. `head_request`: the request was HEAD, so no body follows.
pub fn parse_response<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
    head_request: bool,
) -> Result<Option<Response<'b, 'h>>, BadResponse> {
    let mut response = httparse::Response::new(headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BadResponse::Malformed),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err(BadResponse::Malformed);
    };
    match status {
        101 => return Err(BadResponse::UnaskedUpgrade),
        100..=199 => return Ok(Some(Response::Interim { len })),
        _ => {}
    }
    let reason = response.reason;
    let headers: &'h [httparse::Header<'b>] = response.headers;
    let (mut close, mut keep) = (false, false);
    let mut chunked = None;
    let mut length = None;
    let mut connection_lines = 0;
    for header in headers {
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            connection_lines += 1;
            for token in tokens(header.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides; a body not chunked last runs until close.
            chunked = tokens(header.value)
                .last()
                .map(|coding| coding.eq_ignore_ascii_case(b"chunked"))
                .or(chunked);
        } else if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|value| value.trim().parse::<u64>().ok())
                .ok_or(BadResponse::ContentLength)?;
            if length
                .replace(value)
                .is_some_and(|earlier| earlier != value)
            {
                return Err(BadResponse::ContentLength);
            }
        }
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::Close,
            (None, Some(length)) => Framing::Fixed(length),
        }
    };
    // HTTP/1.0 keeps a connection only when it says so.
    let keep_alive = !close && (version == 1 || keep) && framing != Framing::Close;
    Ok(Some(Response::Final(ServerHead {
        head: ResponseHead {
            len,
            status,
            framing,
            keep_alive,
        },
        reason,
        headers,
        connection_lines,
    })))
}

impl ServerHead<'_, '_> {
    /// The server's fields the client gets: all but the hop-by-hop ones and
    /// the length, which the framing gives (HEAD and 304 keep the server's,
    /// which describes the body they do not carry).
    pub fn fields(&self) -> impl Iterator<Item = &httparse::Header<'_>> {
        self.headers.iter().filter(|header| {
            let name = header.name;
            let hop = name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("keep-alive")
                || name.eq_ignore_ascii_case("proxy-connection")
                || name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("te")
                || name.eq_ignore_ascii_case("upgrade")
                || (self.connection_lines > 0 && named_by_connection(self.headers, name));
            let length = name.eq_ignore_ascii_case("content-length")
                && (self.head.framing != Framing::Empty || self.head.status == 204);
            !hop && !length
        })
    }

    /// Writes the head for an HTTP/1.1 client into `out`: the status line, the
    /// [`fields`](Self::fields), the framing, and `connection: close` with
    /// `close_client`.
    pub fn write_for_client(&self, out: &mut Vec<u8>, close_client: bool) {
        let status = self.head.status;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
        out.push(b' ');
        match self.reason {
            Some(reason) if !reason.is_empty() => out.extend_from_slice(reason.as_bytes()),
            _ => out.extend_from_slice(
                http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|status| status.canonical_reason())
                    .unwrap_or("")
                    .as_bytes(),
            ),
        }
        out.extend_from_slice(b"\r\n");
        for header in self.fields() {
            field(out, header.name.as_bytes(), header.value);
        }
        match self.head.framing {
            Framing::Fixed(length) => field(
                out,
                b"content-length",
                itoa::Buffer::new().format(length).as_bytes(),
            ),
            Framing::Chunked | Framing::Close => field(out, b"transfer-encoding", b"chunked"),
            Framing::Empty => {}
        }
        if close_client {
            field(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether a `Connection` line of `headers` names the header `name` (other
/// than close and keep-alive, which name none).
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|header| header.name.eq_ignore_ascii_case("connection"))
        .flat_map(|header| tokens(header.value))
        .any(|token| token.eq_ignore_ascii_case(name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(wire: &[u8]) -> String {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse_request(wire, &mut headers) {
            Parsed::Partial => "partial".into(),
            Parsed::Other => "other".into(),
            Parsed::Head(head) => format!(
                "{} {} close={} body={}",
                head.method, head.target, head.close, head.body
            ),
        }
    }

    #[test]
    fn takes_plain_http11_requests() {
        assert_eq!(
            parsed(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            "GET /a?b=1 close=false body=0"
        );
        assert_eq!(
            parsed(b"POST /signal HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{\"signal\""),
            "POST /signal close=false body=17"
        );
        assert_eq!(
            parsed(b"DELETE /w/7 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nConnection: Keep-Alive, close\r\n\r\n"),
            "DELETE /w/7 close=true body=0"
        );
        assert_eq!(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n"), "partial");
    }

    #[test]
    fn leaves_everything_else_to_hyper() {
        for wire in [
            &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..],
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nbody",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nbody",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret\r\nx-secret: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(parsed(wire), "other", "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn writes_the_head_for_the_server() {
        let wire = b"GET /q HTTP/1.1\r\nHost: engine:8080\r\nX-Tenant: acme\r\nConnection: keep-alive\r\n\
X-Forwarded-For: 10.0.0.1\r\nx-forwarded-proto: https\r\nKeep-Alive: timeout=5\r\nx-forwarded-for: 10.0.0.2\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Parsed::Head(head) = parse_request(wire, &mut headers) else {
            panic!("a head");
        };
        assert_eq!(head.normalized_size(), wire.len());
        assert_eq!(head.host().map(str::to_owned), Some("engine".to_owned()));
        let mut out = Vec::new();
        head.write_for_server(&mut out, b"127.0.0.1", false, Some(b"abc"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /q HTTP/1.1\r\nHost: engine:8080\r\nX-Tenant: acme\r\n\
x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\nx-forwarded-proto: http\r\n\
x-forwarded-host: engine:8080\r\nx-request-id: abc\r\n\r\n"
        );
    }

    /// The parsed head as the tests compare it, and the head written for the client.
    fn response(
        wire: &[u8],
        head_request: bool,
    ) -> (
        Result<Option<Result<ResponseHead, usize>>, BadResponse>,
        String,
    ) {
        response_closing(wire, head_request, false)
    }

    fn response_closing(
        wire: &[u8],
        head_request: bool,
        close_client: bool,
    ) -> (
        Result<Option<Result<ResponseHead, usize>>, BadResponse>,
        String,
    ) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut out = Vec::new();
        let parsed = parse_response(wire, &mut headers, head_request).map(|parsed| {
            parsed.map(|response| match response {
                Response::Final(head) => {
                    head.write_for_client(&mut out, close_client);
                    Ok(head.head)
                }
                Response::Interim { len } => Err(len),
            })
        });
        (parsed, String::from_utf8_lossy(&out).into_owned())
    }

    fn framing(wire: &[u8]) -> Result<(Framing, bool), BadResponse> {
        match response(wire, false).0? {
            Some(Ok(head)) => Ok((head.framing, head.keep_alive)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let fixed = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(framing(fixed), Ok((Framing::Fixed(12), true)));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(framing(chunked), Ok((Framing::Chunked, true)));
        let gzip_last = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(framing(gzip_last), Ok((Framing::Close, false)));
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\n\r\n"),
            Ok((Framing::Close, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            Ok((Framing::Empty, true))
        );
        let closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(closing), Ok((Framing::Fixed(0), false)));
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(old), Ok((Framing::Fixed(0), false)));
        let old_kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(old_kept), Ok((Framing::Fixed(0), true)));
        let twice = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(framing(twice), Ok((Framing::Fixed(2), true)));
    }

    #[test]
    fn bad_responses_are_refused() {
        for (wire, bad) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
                BadResponse::ContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                BadResponse::ContentLength,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                BadResponse::UnaskedUpgrade,
            ),
            (b"HELLO\r\n\r\n", BadResponse::Malformed),
        ] {
            assert_eq!(
                response(wire, false).0,
                Err(bad),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn the_client_gets_the_head_without_hop_by_hop_fields() {
        let wire = b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
Transfer-Encoding: chunked\r\nUpgrade: h2c\r\nX-Engine: temporal\r\n\r\n";
        let (parsed, out) = response(wire, false);
        assert!(matches!(parsed, Ok(Some(Ok(_)))));
        assert_eq!(
            out,
            "HTTP/1.1 200 Fine\r\nX-Engine: temporal\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // HEAD keeps the server's length, which describes the body not sent.
        let (_, out) = response(b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let (_, out) =
            response_closing(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false, true);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn interim_responses_are_told_apart() {
        let wire = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert_eq!(response(wire, false).0, Ok(Some(Err(40))));
    }
}
