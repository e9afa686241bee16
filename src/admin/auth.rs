//! Who may call the admin API: bearer tokens (and, on viewer routes, HTTP Basic
//! with the token as password) checked against the SHA-256 digests of
//! `[[admin.tokens]]`.
//!
//! The token itself is only ever hashed: it is not stored, compared or logged.
//! Every configured digest is compared in constant time, and all of them are
//! compared whatever matches, so timing tells nothing about a token.

use http::HeaderMap;
use http::header::AUTHORIZATION;
use ring::digest;

use crate::config::{AdminToken, Role};

/// The SHA-256 of a token, as `[[admin.tokens]].sha256` holds it.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token).as_ref());
    out
}

/// Lower-case hex, as the config file expects it.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|byte| {
            [
                DIGITS[usize::from(byte >> 4)] as char,
                DIGITS[usize::from(byte & 0xf)] as char,
            ]
        })
        .collect()
}

/// Equal without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The caller, once a token matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `name` from the config: what logs may show.
    pub name: String,
    pub role: Role,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No usable credentials, or a token that matches no digest: 401.
    Unauthenticated(&'static str),
    /// A valid token whose role is too low for the route: 403.
    Forbidden,
}

/// Checks the request's credentials for a route that needs `needed`. Basic
/// authentication counts only on viewer routes: a browser replays cached Basic
/// credentials on its own, which must never be enough to change anything.
pub fn authorize(
    tokens: &[AdminToken],
    headers: &HeaderMap,
    needed: Role,
) -> Result<Caller, Denied> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(Denied::Unauthenticated("credentials required"));
    };
    let value = value.as_bytes();
    let token = if let Some(token) = strip_scheme(value, b"bearer") {
        token.to_vec()
    } else if let Some(encoded) = strip_scheme(value, b"basic") {
        if needed > Role::Viewer {
            return Err(Denied::Unauthenticated(
                "this route needs Authorization: Bearer",
            ));
        }
        let decoded =
            decode_base64(encoded).ok_or(Denied::Unauthenticated("malformed Basic credentials"))?;
        // "user:password"; the user name is not checked.
        match decoded.iter().position(|&byte| byte == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return Err(Denied::Unauthenticated("malformed Basic credentials")),
        }
    } else {
        return Err(Denied::Unauthenticated("unsupported authorization scheme"));
    };
    let caller = identify(tokens, &token).ok_or(Denied::Unauthenticated("invalid token"))?;
    if caller.role < needed {
        return Err(Denied::Forbidden);
    }
    Ok(caller)
}

/// The configured token whose digest is the token's, comparing every one.
fn identify(tokens: &[AdminToken], token: &[u8]) -> Option<Caller> {
    if token.is_empty() {
        return None;
    }
    let presented = token_digest(token);
    let mut found: Option<&AdminToken> = None;
    for candidate in tokens {
        if constant_time_eq(&presented, &candidate.sha256) && found.is_none() {
            found = Some(candidate);
        }
    }
    found.map(|token| Caller {
        name: token.name.clone(),
        role: token.role,
    })
}

/// `value` without `scheme ` in front (the scheme compared case-insensitively),
/// and without surrounding spaces.
fn strip_scheme<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    let rest = &value[scheme.len()..];
    if rest[0] != b' ' {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Standard base64 (RFC 4648, padding optional), as HTTP Basic uses it.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let text = match text.iter().position(|&c| c == b'=') {
        Some(pad) if text[pad..].iter().all(|&c| c == b'=') && text.len() - pad <= 2 => {
            &text[..pad]
        }
        Some(_) => return None,
        None => text,
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for &c in chunk {
            bits = (bits << 6) | value(c)?;
        }
        // A short last chunk: 2 chars -> 1 byte, 3 chars -> 2 bytes.
        bits <<= 6 * (4 - chunk.len() as u32);
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn tokens() -> Vec<AdminToken> {
        vec![
            AdminToken {
                name: "dash".into(),
                role: Role::Viewer,
                sha256: token_digest(b"view-secret"),
            },
            AdminToken {
                name: "ops".into(),
                role: Role::Operator,
                sha256: token_digest(b"ops-secret"),
            },
        ]
    }

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        headers
    }

    #[test]
    fn digest_matches_sha256sum() {
        // printf 'abc' | sha256sum
        assert_eq!(
            hex(&token_digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(
            decode_base64(b"dTp2aWV3LXNlY3JldA==").as_deref(),
            Some(&b"u:view-secret"[..])
        );
        assert_eq!(
            decode_base64(b"dTp2aWV3LXNlY3JldA").as_deref(),
            Some(&b"u:view-secret"[..])
        );
        assert_eq!(decode_base64(b"YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(decode_base64(b"YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_base64(b"").as_deref(), Some(&b""[..]));
        assert_eq!(decode_base64(b"YW=J"), None);
        assert_eq!(decode_base64(b"Y"), None);
        assert_eq!(decode_base64(b"YW*j"), None);
    }

    #[test]
    fn bearer_tokens_and_roles() {
        let tokens = tokens();
        let viewer = authorize(&tokens, &headers("Bearer view-secret"), Role::Viewer);
        assert_eq!(viewer.map(|c| c.name), Ok("dash".to_string()));
        assert_eq!(
            authorize(&tokens, &headers("Bearer view-secret"), Role::Operator),
            Err(Denied::Forbidden)
        );
        let operator = authorize(&tokens, &headers("bearer  ops-secret "), Role::Operator);
        assert_eq!(operator.map(|c| c.role), Ok(Role::Operator));
        assert!(matches!(
            authorize(&tokens, &headers("Bearer nope"), Role::Viewer),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            authorize(&tokens, &HeaderMap::new(), Role::Viewer),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            authorize(&tokens, &headers("Bearer "), Role::Viewer),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn basic_only_on_viewer_routes() {
        let tokens = tokens();
        // base64("anyone:ops-secret")
        let basic = headers("Basic YW55b25lOm9wcy1zZWNyZXQ=");
        assert_eq!(
            authorize(&tokens, &basic, Role::Viewer).map(|c| c.name),
            Ok("ops".to_string())
        );
        assert!(matches!(
            authorize(&tokens, &basic, Role::Operator),
            Err(Denied::Unauthenticated(_))
        ));
        // base64("anyone-without-colon")
        assert!(matches!(
            authorize(
                &tokens,
                &headers("Basic YW55b25lLXdpdGhvdXQtY29sb24="),
                Role::Viewer
            ),
            Err(Denied::Unauthenticated(_))
        ));
    }
}
