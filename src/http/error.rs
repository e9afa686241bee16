//! Why a request could not be forwarded, whether another attempt is safe, and the
//! status the client sees. The mapping to a status lives here and nowhere else.

use std::time::Duration;

use http::{Response, StatusCode, header};

use super::body::ResponseBody;
use crate::upstream::{ConnectError, Unavailable};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client address refused by allow/deny")]
    Refused,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Unavailable(#[from] Unavailable),
    #[error("request head of {0} bytes is over limits.max_header_bytes")]
    HeadTooLarge(usize),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("no response head within {0:?}")]
    ResponseTimeout(Duration),
    #[error("server connection failed: {0}")]
    Upstream(hyper::Error),
    /// The server connection failed under flowgate's own HTTP/1.1 codec.
    #[error("server connection failed: {0}")]
    ServerIo(std::io::Error),
    #[error("bad response from server: {0}")]
    BadResponse(#[from] crate::http::h1::BadResponse),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Refused => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Connect(_)
            | ProxyError::Upstream(_)
            | ProxyError::ServerIo(_)
            | ProxyError::BadResponse(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The gRPC status code a gRPC client gets for this error.
    fn grpc_status(&self) -> &'static str {
        match self {
            // PERMISSION_DENIED
            ProxyError::Refused => "7",
            // INTERNAL
            ProxyError::BadRequest(_) => "13",
            // RESOURCE_EXHAUSTED
            ProxyError::HeadTooLarge(_) => "8",
            // UNAVAILABLE: the call never ran, or the server is gone.
            ProxyError::Unavailable(_)
            | ProxyError::Connect(_)
            | ProxyError::Upstream(_)
            | ProxyError::ServerIo(_)
            | ProxyError::BadResponse(_) => "14",
            // DEADLINE_EXCEEDED
            ProxyError::ResponseTimeout(_) => "4",
        }
    }

    /// The answer for a gRPC call: a trailers-only response (HTTP 200 with
    /// `grpc-status` and `grpc-message`), which every gRPC client library reads
    /// as the call's status.
    pub fn into_grpc_response(self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            header::HeaderValue::from_static(self.grpc_status()),
        );
        headers.insert(
            "grpc-message",
            header::HeaderValue::from_static(self.client_message().trim_end()),
        );
        response
    }

    /// The short plain-text answer flowgate sends for this error.
    pub fn into_response(self) -> Response<ResponseBody> {
        local_response(self.status(), self.client_message())
    }

    /// The text of flowgate's answer to the client.
    pub fn client_message(&self) -> &'static str {
        match self {
            ProxyError::Refused => "forbidden\n",
            ProxyError::BadRequest(_) => "bad request\n",
            ProxyError::Unavailable(Unavailable::NoServer) => "no server available\n",
            ProxyError::Unavailable(Unavailable::QueueFull) => "server queue full\n",
            ProxyError::Unavailable(Unavailable::QueueTimeout) => {
                "timed out waiting for a server\n"
            }
            ProxyError::HeadTooLarge(_) => "request head too large\n",
            ProxyError::Connect(_)
            | ProxyError::Upstream(_)
            | ProxyError::ServerIo(_)
            | ProxyError::BadResponse(_) => "bad gateway\n",
            ProxyError::ResponseTimeout(_) => "gateway timeout\n",
        }
    }
}

/// A short plain-text response written by flowgate itself.
pub fn local_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
