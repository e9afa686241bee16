//! The key a request is hashed on when its backend has `balance = "hash"`:
//! a header's value, a cookie's value, a query parameter's value or the path,
//! as `hash_key` says (`hash_key = "source"` hashes the client address, which
//! the balancer has anyway).
//!
//! The key is held as a cheap clone of the header value or request target it
//! sits in (both share the request's buffer) plus a byte range, so taking it
//! copies nothing and it outlives the request being sent. Values are taken as
//! they appear on the wire: no percent-decoding, no unquoting, first occurrence
//! wins. An absent or empty value is no key: the balancer then goes round robin.

use std::ops::Range;

use http::HeaderValue;
use http::header::COOKIE;
use http::request::Parts;
use http::uri::PathAndQuery;

use crate::config::{self, HashKey};

/// A request's hash key.
#[derive(Debug, Clone)]
pub struct RequestKey {
    within: Within,
    range: Range<usize>,
}

#[derive(Debug, Clone)]
enum Within {
    Header(HeaderValue),
    Target(PathAndQuery),
}

impl RequestKey {
    /// The key of a request to `backend`, when the backend hashes one from the
    /// request and the request has it.
    pub fn of(backend: &config::Backend, parts: &Parts) -> Option<RequestKey> {
        if backend.balance != config::Balance::Hash {
            return None;
        }
        let key = match backend.hash_key.as_ref()? {
            HashKey::Header(name) => {
                let value = parts.headers.get(name)?;
                RequestKey {
                    range: 0..value.len(),
                    within: Within::Header(value.clone()),
                }
            }
            HashKey::Cookie(name) => parts.headers.get_all(COOKIE).iter().find_map(|value| {
                let range = cookie_value(value.as_bytes(), name.as_bytes())?;
                Some(RequestKey {
                    range,
                    within: Within::Header(value.clone()),
                })
            })?,
            HashKey::Query(name) => {
                let target = parts.uri.path_and_query()?;
                let query_start = target.as_str().find('?')? + 1;
                let range = query_value(target.query()?.as_bytes(), name.as_bytes())?;
                RequestKey {
                    range: range.start + query_start..range.end + query_start,
                    within: Within::Target(target.clone()),
                }
            }
            HashKey::Path => {
                let target = parts.uri.path_and_query()?;
                RequestKey {
                    range: 0..target.path().len(),
                    within: Within::Target(target.clone()),
                }
            }
            HashKey::Source => return None,
        };
        (!key.range.is_empty()).then_some(key)
    }

    pub fn as_bytes(&self) -> &[u8] {
        let whole = match &self.within {
            Within::Header(value) => value.as_bytes(),
            Within::Target(target) => target.as_str().as_bytes(),
        };
        &whole[self.range.clone()]
    }
}

/// The range of cookie `name`'s value in one `Cookie` header value
/// (`a=1; b=2`, RFC 6265 section 4.2), without surrounding whitespace.
fn cookie_value(header: &[u8], name: &[u8]) -> Option<Range<usize>> {
    pieces(header, b';').find_map(|(offset, piece)| {
        let equals = piece.iter().position(|&b| b == b'=')?;
        (piece[..equals].trim_ascii() == name).then(|| {
            let value = &piece[equals + 1..];
            let start = offset + equals + 1 + (value.len() - value.trim_ascii_start().len());
            start..start + value.trim_ascii().len()
        })
    })
}

/// The range of parameter `name`'s value in a query string (`a=1&b=2`).
fn query_value(query: &[u8], name: &[u8]) -> Option<Range<usize>> {
    pieces(query, b'&').find_map(|(offset, piece)| {
        let equals = piece.iter().position(|&b| b == b'=')?;
        (&piece[..equals] == name).then(|| offset + equals + 1..offset + piece.len())
    })
}

/// The pieces of `bytes` between `separator`s, each with its offset.
fn pieces(bytes: &[u8], separator: u8) -> impl Iterator<Item = (usize, &[u8])> {
    bytes
        .split(move |&b| b == separator)
        .scan(0, |offset, piece| {
            let start = *offset;
            *offset += piece.len() + 1;
            Some((start, piece))
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn backend(hash_key: &str) -> config::Backend {
        let toml = format!(
            "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n\n\
             [backends.pool]\nbalance = \"hash\"\nhash_key = \"{hash_key}\"\n\n\
             [[backends.pool.servers]]\naddress = \"127.0.0.1:1\"\n"
        );
        config::parse(&toml, Path::new("test.toml"))
            .unwrap()
            .backends
            .remove(0)
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn key(hash_key: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        RequestKey::of(&backend(hash_key), &parts(uri, headers))
            .map(|key| String::from_utf8(key.as_bytes().to_vec()).unwrap())
    }

    #[test]
    fn header_value() {
        let headers = [("X-Workflow-Id", "wf-42"), ("x-workflow-id", "second")];
        assert_eq!(
            key("header:X-Workflow-Id", "/", &headers).as_deref(),
            Some("wf-42")
        );
        assert_eq!(key("header:X-Workflow-Id", "/", &[]), None);
        assert_eq!(
            key("header:X-Workflow-Id", "/", &[("X-Workflow-Id", "")]),
            None
        );
    }

    #[test]
    fn cookie_value_from_any_cookie_header() {
        let headers = [
            ("Cookie", "theme=dark; other=1"),
            ("Cookie", "a=b;  session = abc123 ;z=9"),
        ];
        assert_eq!(
            key("cookie:session", "/", &headers).as_deref(),
            Some("abc123")
        );
        assert_eq!(key("cookie:theme", "/", &headers).as_deref(), Some("dark"));
        assert_eq!(key("cookie:z", "/", &headers).as_deref(), Some("9"));
        // A name that only ends like the one asked for is another cookie.
        assert_eq!(key("cookie:ession", "/", &headers), None);
        assert_eq!(key("cookie:session", "/", &[("Cookie", "session=")]), None);
    }

    #[test]
    fn query_parameter_value() {
        let uri = "/api/v1/workflows?namespace=prod&workflow=wf-7&x";
        assert_eq!(key("query:workflow", uri, &[]).as_deref(), Some("wf-7"));
        assert_eq!(key("query:namespace", uri, &[]).as_deref(), Some("prod"));
        assert_eq!(key("query:x", uri, &[]), None);
        assert_eq!(key("query:flow", uri, &[]), None);
        assert_eq!(key("query:workflow", "/no-query", &[]), None);
        assert_eq!(
            key("query:id", "http://engine:8080/p?id=a%20b", &[]).as_deref(),
            Some("a%20b")
        );
    }

    #[test]
    fn path_without_query() {
        assert_eq!(
            key("path", "/api/v1/workflows/wf-9?verbose=1", &[]).as_deref(),
            Some("/api/v1/workflows/wf-9")
        );
    }

    #[test]
    fn source_and_other_algorithms_take_nothing_from_the_request() {
        assert_eq!(key("source", "/x", &[]), None);
        let mut other = backend("header:X-Id");
        other.balance = config::Balance::RoundRobin;
        let request = parts("/", &[("X-Id", "1")]);
        assert!(RequestKey::of(&other, &request).is_none());
    }
}
