//! Header rules for forwarded messages: hop-by-hop headers (RFC 9110 7.6.1), the
//! X-Forwarded-* set and X-Request-Id.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers: the fixed set and every header that `Connection`
/// names. With `tunnel`, `Connection: upgrade` and `Upgrade` stay, since they
/// are what asks the next hop for the tunnel.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, tunnel: bool) {
    // Most messages carry none, and most others only `Connection`: one pass
    // over the names tells which are there, and only those are looked up.
    let present = headers
        .keys()
        .fold(0, |present, name| present | hop_by_hop(name));
    if present == 0 {
        return;
    }
    if present & hop::CONNECTION != 0 && !only_persistence(headers) {
        // Connection may come on several lines; every line names headers. (An
        // empty Vec does not allocate.)
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .filter(|token| {
                !token.eq_ignore_ascii_case("close") && !token.eq_ignore_ascii_case("keep-alive")
            })
            .filter(|token| !(tunnel && token.eq_ignore_ascii_case("upgrade")))
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    if present & hop::CONNECTION != 0 && !tunnel {
        headers.remove(header::CONNECTION);
    }
    if present & hop::UPGRADE != 0 && !tunnel {
        headers.remove(header::UPGRADE);
    }
    if present & hop::KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & hop::PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & hop::TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & hop::TE == 0 {
        return;
    }
    // TE is hop-by-hop, but "TE: trailers" is how gRPC says it understands
    // trailers, and HTTP/2 allows exactly that value through. Transfer codings
    // are for this hop only, on whichever line they come.
    let mut te = headers.get_all(header::TE).iter();
    let only_trailers = matches!(
        (te.next(), te.next()),
        (Some(value), None) if value.as_bytes().eq_ignore_ascii_case(b"trailers")
    );
    if !only_trailers && headers.contains_key(header::TE) {
        let trailers = headers
            .get_all(header::TE)
            .iter()
            .flat_map(connection_tokens)
            .any(|token| token.eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// The hop-by-hop headers, one bit each.
mod hop {
    pub const CONNECTION: u8 = 1;
    pub const TRANSFER_ENCODING: u8 = 1 << 1;
    pub const TE: u8 = 1 << 2;
    pub const UPGRADE: u8 = 1 << 3;
    pub const KEEP_ALIVE: u8 = 1 << 4;
    pub const PROXY_CONNECTION: u8 = 1 << 5;
}

/// The [`hop`] bit of a header that never crosses a hop whatever `Connection`
/// says (or of `Connection` itself, which may name more); 0 for any other.
fn hop_by_hop(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        hop::CONNECTION
    } else if name == header::TRANSFER_ENCODING {
        hop::TRANSFER_ENCODING
    } else if name == header::TE {
        hop::TE
    } else if name == header::UPGRADE {
        hop::UPGRADE
    } else if name == KEEP_ALIVE {
        hop::KEEP_ALIVE
    } else if name == PROXY_CONNECTION {
        hop::PROXY_CONNECTION
    } else {
        0
    }
}

/// Whether `Connection` is one line saying only `keep-alive` or `close` (what
/// most servers send), which names no header to remove.
fn only_persistence(headers: &HeaderMap) -> bool {
    let mut lines = headers.get_all(header::CONNECTION).iter();
    matches!(
        (lines.next(), lines.next()),
        (Some(value), None)
            if value.as_bytes().eq_ignore_ascii_case(b"keep-alive")
                || value.as_bytes().eq_ignore_ascii_case(b"close")
    )
}

fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Joins the `Cookie` fields an HTTP/2 client may split (one per cookie) into
/// one, for an HTTP/1.1 server (RFC 9113 8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = Vec::new();
    for cookie in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(cookie.as_bytes());
    }
    // Joined from valid values with "; ", the result is valid too.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether a request is its connection's last, as its client asked: HTTP/1.1
/// with `Connection: close`, HTTP/1.0 without `Connection: keep-alive`.
pub fn closes_connection(version: Version, headers: &HeaderMap) -> bool {
    match version {
        Version::HTTP_09 | Version::HTTP_10 => !connection_lists(headers, "keep-alive"),
        Version::HTTP_11 => connection_lists(headers, "close"),
        _ => false,
    }
}

/// Whether the request asks for a protocol upgrade (WebSocket and the like).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_lists(headers, "upgrade")
}

/// Whether any `Connection` line lists `token`.
fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|value| connection_tokens(value).any(|listed| listed.eq_ignore_ascii_case(token)))
}

/// The client's address as X-Forwarded-For lists it; made once per connection
/// and cloned into each of its requests.
///
/// Formatted on the stack and shared from the start ([`shared_value`]): one
/// allocation, where a value made from a `String` costs three on a
/// connection's first request (the string, its growth and the shared copy
/// its first clone makes).
pub fn forwarded_for_value(client: IpAddr) -> HeaderValue {
    use std::io::Write as _;
    /// Holds the text: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255" is the
    /// longest an address prints, 45 bytes.
    const ROOM: usize = 48;
    struct Text {
        buf: [u8; ROOM],
        len: usize,
    }
    impl AsRef<[u8]> for Text {
        fn as_ref(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }
    let mut text = Text {
        buf: [0; ROOM],
        len: 0,
    };
    let mut rest = &mut text.buf[..];
    if write!(rest, "{client}").is_err() {
        return HeaderValue::from_static("unknown");
    }
    text.len = ROOM - rest.len();
    shared_value(text).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Appends the client (see [`forwarded_for_value`]) to X-Forwarded-For and sets
/// X-Forwarded-Proto and X-Forwarded-Host (the host the client asked for, when
/// known).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    https: bool,
    host: Option<HeaderValue>,
) {
    let client = client.clone();
    // Several X-Forwarded-For lines are one list (RFC 9110 5.3): join them all,
    // in order, before appending the client.
    let mut joined = Vec::new();
    for existing in headers.get_all(&X_FORWARDED_FOR) {
        joined.extend_from_slice(existing.as_bytes());
        joined.extend_from_slice(b", ");
    }
    let forwarded_for = if joined.is_empty() {
        client
    } else {
        joined.extend_from_slice(client.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or(client)
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// Keeps the client's X-Request-Id or sets a new one; returns the id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> &HeaderValue {
    headers
        .entry(&X_REQUEST_ID)
        .or_insert_with(|| RequestIds::global().next())
}

/// Request ids: 32 hex digits, a random per-process half and a counter half, so
/// ids are unique across processes and cost no system call each.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn global() -> &'static RequestIds {
        static IDS: std::sync::OnceLock<RequestIds> = std::sync::OnceLock::new();
        IDS.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            // RandomState is seeded from the OS's random source.
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(std::process::id().into());
            let prefix = hasher.finish();
            RequestIds {
                prefix,
                counter: AtomicU64::new(prefix.rotate_left(17)),
            }
        })
    }

    fn next(&self) -> HeaderValue {
        shared_value(self.next_digits()).unwrap_or(HeaderValue::from_static("0"))
    }

    fn next_digits(&self) -> [u8; 32] {
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut digits = [0u8; 32];
        hex(self.prefix, &mut digits[..16]);
        hex(count, &mut digits[16..]);
        digits
    }
}

/// A new request id, as [`ensure_request_id`] sets one: 32 hex digits.
pub fn new_request_id() -> [u8; 32] {
    RequestIds::global().next_digits()
}

/// A header value whose clones share `text`: one allocation, however often
/// it is cloned. A value copied from a slice is cheap to clone only after its
/// first clone, which makes a shared copy (one more allocation).
fn shared_value<T: AsRef<[u8]> + Send + 'static>(text: T) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
}

fn hex(mut value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cookies_are_joined_in_order() {
        let mut map = headers(&[("cookie", "a=1"), ("x-tenant", "acme"), ("cookie", "b=2")]);
        join_cookies(&mut map);
        let cookies: Vec<_> = map.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
        let mut one = headers(&[("cookie", "a=1; b=2")]);
        join_cookies(&mut one);
        assert_eq!(one.get("cookie").expect("cookie"), "a=1; b=2");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let left: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn a_lone_keep_alive_or_close_names_nothing_but_a_second_line_does() {
        for value in ["keep-alive", "Keep-Alive", "close"] {
            let mut map = headers(&[("connection", value), ("x-kept", "yes")]);
            strip_hop_by_hop(&mut map, false);
            let left: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, vec!["x-kept"], "{value}");
        }
        let mut map = headers(&[("x-secret", "1"), ("x-kept", "yes")]);
        map.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        map.append(header::CONNECTION, HeaderValue::from_static("x-secret"));
        strip_hop_by_hop(&mut map, false);
        let left: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
        // A tunnel keeps Connection (it asks for the upgrade).
        let mut map = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map.len(), 2);
    }

    /// Each is found by the one pass over the names, also when it is the only
    /// hop-by-hop header there.
    #[test]
    fn strips_each_hop_by_hop_header_alone() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "te",
            "upgrade",
        ] {
            let mut map = headers(&[("x-kept", "yes"), (name, "gzip"), ("x-also", "yes")]);
            strip_hop_by_hop(&mut map, false);
            let left: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, vec!["x-kept", "x-also"], "{name}");
        }
    }

    #[test]
    fn keeps_te_trailers_and_tunnel_headers() {
        let mut map = headers(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade_request(&map));
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(map.contains_key("upgrade"));
        assert!(map.contains_key("connection"));
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut map = headers(&[("x-forwarded-for", "203.0.113.7")]);
        set_forwarded(
            &mut map,
            &forwarded_for_value("127.0.0.1".parse().expect("ip")),
            false,
            Some(HeaderValue::from_static("engine.example.com")),
        );
        assert_eq!(map["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "engine.example.com");
    }

    #[test]
    fn every_connection_line_and_te_line_counts() {
        let mut map = headers(&[
            ("connection", "close"),
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("te", "gzip"),
        ]);
        strip_hop_by_hop(&mut map, false);
        assert!(!map.contains_key("x-secret"));
        let te: Vec<&[u8]> = map.get_all("te").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(te, vec![&b"trailers"[..]]);

        let mut map = headers(&[("te", "gzip;q=0.5, trailers")]);
        strip_hop_by_hop(&mut map, false);
        assert_eq!(map["te"], "trailers");
        let mut map = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut map, false);
        assert!(!map.contains_key("te"));
    }

    #[test]
    fn appends_to_every_forwarded_for_line() {
        let mut map = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.2, 192.0.2.1"),
        ]);
        let client = forwarded_for_value("127.0.0.1".parse().expect("ip"));
        set_forwarded(&mut map, &client, false, None);
        let values: Vec<&[u8]> = map
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(
            values,
            vec![&b"203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1"[..]]
        );
    }

    #[test]
    fn last_requests_are_told_by_version_and_connection() {
        let close = headers(&[("connection", "Close")]);
        let keep = headers(&[("connection", "keep-alive")]);
        let listed = headers(&[("connection", "upgrade"), ("connection", "x-a, close")]);
        let none = HeaderMap::new();
        assert!(closes_connection(Version::HTTP_11, &close));
        assert!(closes_connection(Version::HTTP_11, &listed));
        assert!(!closes_connection(Version::HTTP_11, &keep));
        assert!(!closes_connection(Version::HTTP_11, &none));
        assert!(closes_connection(Version::HTTP_10, &none));
        assert!(closes_connection(Version::HTTP_10, &close));
        assert!(!closes_connection(Version::HTTP_10, &keep));
        assert!(!closes_connection(Version::HTTP_2, &close));
    }

    #[test]
    fn request_ids_are_kept_or_unique() {
        let mut map = headers(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut map), "abc");
        assert_eq!(map.get_all("x-request-id").iter().count(), 1);
        let (mut first, mut second) = (HeaderMap::new(), HeaderMap::new());
        let a = ensure_request_id(&mut first).clone();
        let b = ensure_request_id(&mut second).clone();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(first["x-request-id"], a);
    }

    #[test]
    fn forwarded_for_values_print_the_address() {
        for (address, text) in [
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
            ("::ffff:255.255.255.255", "::ffff:255.255.255.255"),
        ] {
            let value = forwarded_for_value(address.parse().expect("address"));
            assert_eq!(value, text);
        }
    }
}
