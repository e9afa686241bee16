//! Cross-checks between sections, run on the model once every section is read.
//!
//! The model carries no positions, so the readers leave [`Locations`] beside it,
//! index-aligned with the model's vectors; each problem is reported at the value
//! it is about. Every check runs even when sections had problems of their own,
//! so one `flowgate check` shows everything.

use std::net::SocketAddr;

use super::reader::{Context, Loc, closest};
use super::{Balance, Config, Mode};

/// Where the values the cross-checks look at are written.
pub(super) struct Locations {
    /// The `frontends` key, or the start of the file when it is missing.
    pub frontends_key: Loc,
    pub admin: Option<AdminLocations>,
    /// One per `config.frontends` entry.
    pub frontends: Vec<FrontendLocations>,
    /// One per `config.backends` entry.
    pub backends: Vec<BackendLocations>,
}

pub(super) struct AdminLocations {
    /// `None` when the address was invalid (already reported).
    pub bind: Option<Loc>,
    /// One per `admin.tokens` entry.
    pub token_names: Vec<Loc>,
}

pub(super) struct FrontendLocations {
    /// The frontend's name, as a table key.
    pub name: Loc,
    /// One per `frontend.bind` entry.
    pub bind: Vec<Loc>,
    /// `None` when left out or invalid (already reported).
    pub backend: Option<Loc>,
    /// The `routes` array, when present.
    pub routes: Option<Loc>,
    /// One per `frontend.routes` entry.
    pub route_backends: Vec<Option<Loc>>,
}

pub(super) struct BackendLocations {
    /// The backend's name, as a table key.
    pub name: Loc,
    /// `balance`, when written and valid.
    pub balance: Option<Loc>,
    /// False when `balance` was written but invalid (already reported).
    pub balance_valid: bool,
    pub hash_key: Option<Loc>,
    pub hash_balance_factor: Option<Loc>,
    /// The `servers` array and how many entries it has, when it is one.
    pub servers: Option<(Loc, usize)>,
    /// One per `backend.servers` entry.
    pub server_names: Vec<ServerNameLoc>,
}

/// Where a server's name comes from: its `name`, or its `address` when the
/// name was left out (the name then defaults to the address).
pub(super) struct ServerNameLoc {
    pub loc: Loc,
    pub written: bool,
}

pub(super) fn check(config: &Config, locations: &Locations, context: &Context) {
    names(locations, config, context);
    if config.frontends.is_empty() {
        context.report(
            &locations.frontends_key,
            "at least one frontend is required",
        );
    }
    backend_references(config, locations, context);
    for (backend, at) in config.backends.iter().zip(&locations.backends) {
        balance(backend, at, context);
        servers(backend, at, context);
    }
    bind_conflicts(config, locations, context);
    if let (Some(admin), Some(at)) = (&config.admin, &locations.admin) {
        let names = admin.tokens.iter().map(|token| token.name.as_str());
        for (_, loc) in duplicates(names.zip(&at.token_names)) {
            context.report(loc, "duplicate token name");
        }
    }
}

/// Frontend and backend names show up in logs, metrics and API paths.
fn names(locations: &Locations, config: &Config, context: &Context) {
    let frontends = config
        .frontends
        .iter()
        .map(|f| f.name.as_str())
        .zip(locations.frontends.iter().map(|at| &at.name));
    let backends = config
        .backends
        .iter()
        .map(|b| b.name.as_str())
        .zip(locations.backends.iter().map(|at| &at.name));
    for (name, loc) in frontends.chain(backends) {
        if name.is_empty() {
            context.report(loc, "name must not be empty");
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            context.report(
                loc,
                format!("invalid name {name:?} (use letters, digits, \"_\", \".\" and \"-\")"),
            );
        }
    }
}

fn backend_references(config: &Config, locations: &Locations, context: &Context) {
    let known: Vec<&str> = config.backends.iter().map(|b| b.name.as_str()).collect();
    let check = |name: &str, loc: &Loc| {
        if !known.contains(&name) {
            let mut message = format!("unknown backend {name:?}");
            if let Some(suggestion) = closest(name, known.iter().copied()) {
                message.push_str(&format!(" (did you mean {suggestion:?}?)"));
            }
            context.report(loc, message);
        }
    };
    for (frontend, at) in config.frontends.iter().zip(&locations.frontends) {
        if let Some(loc) = &at.backend {
            check(&frontend.backend, loc);
        }
        for (route, loc) in frontend.routes.iter().zip(&at.route_backends) {
            if let Some(loc) = loc {
                check(&route.backend, loc);
            }
        }
        if frontend.mode == Mode::Tcp {
            if let Some(loc) = &at.routes {
                context.report(loc, "routes need mode = \"http\"");
            }
        }
    }
}

/// `hash_key` goes with `balance = "hash"` both ways: required by it, and an
/// error without it (a key that does nothing is most likely a mistake).
fn balance(backend: &super::Backend, at: &BackendLocations, context: &Context) {
    if !at.balance_valid {
        return;
    }
    if backend.balance == Balance::Hash {
        if at.hash_key.is_none() {
            if let Some(loc) = &at.balance {
                context.report(loc, "balance = \"hash\" needs a hash_key");
            }
        }
        return;
    }
    let balance = backend.balance.as_str();
    if let Some(loc) = &at.hash_key {
        context.report(
            loc,
            format!("hash_key is only used with balance = \"hash\" (balance is {balance:?})"),
        );
    }
    if let Some(loc) = &at.hash_balance_factor {
        context.report(
            loc,
            format!(
                "hash_balance_factor is only used with balance = \"hash\" (balance is {balance:?})"
            ),
        );
    }
}

fn servers(backend: &super::Backend, at: &BackendLocations, context: &Context) {
    if let Some((loc, 0)) = &at.servers {
        context.report(loc, "at least one server is required");
    }
    let names = backend.servers.iter().map(|server| server.name.as_str());
    for (name, site) in duplicates(names.zip(&at.server_names)) {
        let message = if site.written {
            format!("duplicate server name {name:?}")
        } else {
            format!("duplicate server name {name:?} (a server's name defaults to its address)")
        };
        context.report(&site.loc, message);
    }
}

/// Every item whose name an earlier item already has.
fn duplicates<'n, T>(items: impl Iterator<Item = (&'n str, T)>) -> Vec<(&'n str, T)> {
    let mut seen = Vec::new();
    let mut repeated = Vec::new();
    for (name, item) in items {
        if seen.contains(&name) {
            repeated.push((name, item));
        } else {
            seen.push(name);
        }
    }
    repeated
}

/// No address may be bound twice, over all frontends and the admin listener.
fn bind_conflicts(config: &Config, locations: &Locations, context: &Context) {
    let mut binds: Vec<(SocketAddr, &Loc)> = Vec::new();
    for (frontend, at) in config.frontends.iter().zip(&locations.frontends) {
        binds.extend(frontend.bind.iter().copied().zip(&at.bind));
    }
    if let (
        Some(admin),
        Some(AdminLocations {
            bind: Some(loc), ..
        }),
    ) = (&config.admin, &locations.admin)
    {
        binds.push((admin.bind, loc));
    }
    // Report the later one in the file, wherever the sections are.
    binds.sort_by_key(|(_, loc)| loc.at);
    for (i, (addr, loc)) in binds.iter().enumerate() {
        if let Some((_, first)) = binds[..i].iter().find(|(other, _)| overlaps(*addr, *other)) {
            context.report(
                loc,
                format!("address {addr} is already bound by {}", first.key),
            );
        }
    }
}

/// Whether two listeners would collide. An unspecified address covers its whole
/// family; IPv4 and IPv6 never collide (listeners set IPV6_V6ONLY); port 0 asks
/// for an ephemeral port and so never collides either.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse()
            .unwrap_or_else(|_| panic!("test address {text:?}"))
    }

    #[test]
    fn overlapping_addresses() {
        assert!(overlaps(addr("127.0.0.1:8080"), addr("127.0.0.1:8080")));
        assert!(overlaps(addr("0.0.0.0:8080"), addr("127.0.0.1:8080")));
        assert!(overlaps(addr("127.0.0.1:8080"), addr("0.0.0.0:8080")));
        assert!(overlaps(addr("[::]:8080"), addr("[::1]:8080")));
        assert!(!overlaps(addr("0.0.0.0:8080"), addr("[::]:8080")));
        assert!(!overlaps(addr("127.0.0.1:8080"), addr("127.0.0.2:8080")));
        assert!(!overlaps(addr("127.0.0.1:8080"), addr("127.0.0.1:8081")));
        assert!(!overlaps(addr("127.0.0.1:0"), addr("127.0.0.1:0")));
    }
}
