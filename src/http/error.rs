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
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Refused => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The short plain-text answer flowgate sends for this error.
    pub fn into_response(self) -> Response<ResponseBody> {
        local_response(self.status(), self.client_message())
    }

    fn client_message(&self) -> &'static str {
        match self {
            ProxyError::Refused => "forbidden\n",
            ProxyError::BadRequest(_) => "bad request\n",
            ProxyError::Unavailable(Unavailable::NoServer) => "no server available\n",
            ProxyError::Unavailable(Unavailable::QueueFull) => "server queue full\n",
            ProxyError::Unavailable(Unavailable::QueueTimeout) => {
                "timed out waiting for a server\n"
            }
            ProxyError::HeadTooLarge(_) => "request head too large\n",
            ProxyError::Connect(_) | ProxyError::Upstream(_) => "bad gateway\n",
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
