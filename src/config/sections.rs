//! One function per section of the file. Each reads its table into the model
//! type, applies the defaults the contract gives, and notes where the values the
//! cross-checks need are written (see [`validate`](super::validate)).
//!
//! A section with problems is still built (with defaults or placeholders where a
//! value was bad) so that later sections and the cross-checks can report their
//! own problems too; the [`Config`] is only handed out when nothing was reported.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;

use super::reader::{Field, Loc, Named, TableReader};
use super::validate::{
    AdminLocations, BackendLocations, FrontendLocations, Locations, ServerNameLoc,
};
use super::{
    AccessLog, Admin, AdminToken, Backend, BackendTimeouts, BackendTls, Balance, CertificatePair,
    CheckKind, Config, Frontend, FrontendTimeouts, FrontendTls, Global, HashKey, HealthCheck,
    Limits, LogFormat, Mode, Passive, Protocol, Role, Route, Server, TlsVersion,
};
use crate::tls::{TlsError, TlsSource};

const DEFAULT_ADMIN_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);

const MODES: &[(&str, Mode)] = &[("http", Mode::Http), ("tcp", Mode::Tcp)];

const BALANCES: &[(&str, Balance)] = &[
    ("round_robin", Balance::RoundRobin),
    ("least_conn", Balance::LeastConn),
    ("random", Balance::Random),
    ("p2c", Balance::P2c),
    ("source", Balance::Source),
    ("hash", Balance::Hash),
    ("first", Balance::First),
];

const PROTOCOLS: &[(&str, Protocol)] = &[("http1", Protocol::Http1), ("h2", Protocol::H2)];

const CHECKS: &[(&str, CheckKind)] = &[
    ("none", CheckKind::None),
    ("tcp", CheckKind::Tcp),
    ("http", CheckKind::Http),
];

const ROLES: &[(&str, Role)] = &[("viewer", Role::Viewer), ("operator", Role::Operator)];

const LOG_FORMATS: &[(&str, LogFormat)] = &[("text", LogFormat::Text), ("json", LogFormat::Json)];

const TLS_VERSIONS: &[(&str, TlsVersion)] =
    &[("1.2", TlsVersion::Tls12), ("1.3", TlsVersion::Tls13)];

const ALPN_PROTOCOLS: &[&str] = &["h2", "http/1.1"];
/// The admin API speaks HTTP/1.1 only.
const ADMIN_ALPN: &[&str] = &["http/1.1"];

/// Request heads smaller than this cannot hold a realistic request.
const MIN_HEADER_BYTES: u64 = 1024;
const MAX_HEADER_BYTES: u64 = 16 * 1024 * 1024;

pub(super) fn config(mut root: TableReader<'_>) -> (Config, Locations) {
    let global = root.table("global").map(global).unwrap_or_default();

    let (admin, admin_locations) = match root.table("admin") {
        Some(table) => {
            let (admin, locations) = admin(table);
            (Some(admin), Some(locations))
        }
        None => (None, None),
    };

    let frontends_field = root.get("frontends");
    let frontends_loc = match &frontends_field {
        Some(field) => field.loc(),
        None => root.loc_of("frontends"),
    };
    let mut frontends = Vec::new();
    let mut frontend_locations = Vec::new();
    for (name, table) in frontends_field
        .map(|f| f.named_tables())
        .unwrap_or_default()
    {
        let (frontend, locations) = frontend(name, table);
        frontends.push(frontend);
        frontend_locations.push(locations);
    }

    let mut backends = Vec::new();
    let mut backend_locations = Vec::new();
    for (name, table) in root.named_tables("backends") {
        let (backend, locations) = backend(name, table);
        backends.push(backend);
        backend_locations.push(locations);
    }
    root.finish();

    let config = Config {
        path: PathBuf::new(),
        global,
        admin,
        frontends,
        backends,
    };
    let locations = Locations {
        frontends_key: frontends_loc,
        admin: admin_locations,
        frontends: frontend_locations,
        backends: backend_locations,
    };
    (config, locations)
}

fn global(mut r: TableReader<'_>) -> Global {
    let defaults = Global::default();
    let global = Global {
        threads: r.int_in("threads", 0..=1024).unwrap_or(defaults.threads),
        max_connections: r
            .int_at_least("max_connections", 1)
            .unwrap_or(defaults.max_connections),
        grace_period: r.duration("grace_period").unwrap_or(defaults.grace_period),
        access_log: r
            .get("access_log")
            .and_then(|field| access_log(&field))
            .unwrap_or(defaults.access_log),
        log_format: r
            .choice("log_format", LOG_FORMATS)
            .unwrap_or(defaults.log_format),
        state_file: r.path("state_file"),
    };
    r.finish();
    global
}

fn access_log(field: &Field<'_>) -> Option<AccessLog> {
    match field.non_empty()? {
        "off" => Some(AccessLog::Off),
        "stderr" => Some(AccessLog::Stderr),
        _ => field.path().map(AccessLog::File),
    }
}

fn admin(mut r: TableReader<'_>) -> (Admin, AdminLocations) {
    let (bind, bind_loc) = match r.get("bind") {
        Some(field) => match field.socket_addr() {
            Some(addr) => (addr, Some(field.loc())),
            None => (DEFAULT_ADMIN_BIND, None),
        },
        None => (DEFAULT_ADMIN_BIND, Some(r.loc_of("bind"))),
    };
    let mut tokens = Vec::new();
    let mut token_names = Vec::new();
    for (i, table) in r.tables("tokens").into_iter().enumerate() {
        let (token, name_loc) = admin_token(table, i);
        tokens.push(token);
        token_names.push(name_loc);
    }
    let tls = r
        .table("tls")
        .map(|table| frontend_tls(table, ADMIN_ALPN, ADMIN_ALPN));
    r.finish();
    let locations = AdminLocations {
        bind: bind_loc,
        token_names,
    };
    (Admin { bind, tokens, tls }, locations)
}

fn admin_token(mut r: TableReader<'_>, index: usize) -> (AdminToken, Loc) {
    let name_field = r.get("name");
    let name = name_field
        .as_ref()
        .and_then(|field| field.non_empty())
        .map_or_else(|| format!("token-{}", index + 1), str::to_string);
    let name_loc = name_field.map_or_else(|| r.loc_of("name"), |field| field.loc());
    let token = AdminToken {
        name,
        // Least privilege when left out.
        role: r.choice("role", ROLES).unwrap_or(Role::Viewer),
        sha256: r
            .require("sha256")
            .and_then(|field| field.parse(parse_sha256))
            .unwrap_or([0; 32]),
    };
    r.finish();
    (token, name_loc)
}

/// The hex SHA-256 of an admin token. The value is not echoed back: a token
/// pasted here by mistake must not end up in logs.
fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let hex_digit = |c: u8| (c as char).to_digit(16);
    if text.len() != 64 || !text.bytes().all(|c| hex_digit(c).is_some()) {
        return Err(format!(
            "expected 64 hex characters, got {} characters",
            text.chars().count()
        ));
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let high = hex_digit(pair[0]).unwrap_or_default();
        let low = hex_digit(pair[1]).unwrap_or_default();
        *byte = (high * 16 + low) as u8;
    }
    Ok(digest)
}

fn frontend(named: Named, mut r: TableReader<'_>) -> (Frontend, FrontendLocations) {
    let mode = r.choice("mode", MODES).unwrap_or(Mode::Http);

    let mut bind = Vec::new();
    let mut bind_locs = Vec::new();
    if let Some(field) = r.require("bind") {
        let items = field.one_or_many().unwrap_or_default();
        if field.array_len() == Some(0) {
            field.error("at least one address is required");
        }
        for item in items {
            if let Some(addr) = item.socket_addr() {
                bind.push(addr);
                bind_locs.push(item.loc());
            }
        }
    }

    let (backend, backend_loc) = backend_reference(&mut r);
    let max_connections = r.int_at_least("max_connections", 1);
    let allow = r
        .get("allow")
        .map(|field| networks(&field))
        .unwrap_or_default();
    let deny = r
        .get("deny")
        .map(|field| networks(&field))
        .unwrap_or_default();
    let timeouts = r
        .table("timeouts")
        .map(frontend_timeouts)
        .unwrap_or_default();
    let limits = r.table("limits").map(limits).unwrap_or_default();
    let tls = r.table("tls").map(|table| {
        let offered: &[&str] = match mode {
            Mode::Http => ALPN_PROTOCOLS,
            Mode::Tcp => &[],
        };
        frontend_tls(table, offered, ALPN_PROTOCOLS)
    });

    let routes_field = r.get("routes");
    let mut routes = Vec::new();
    let mut route_backends = Vec::new();
    for table in routes_field.as_ref().map(Field::tables).unwrap_or_default() {
        let (route, backend_loc) = route(table);
        routes.push(route);
        route_backends.push(backend_loc);
    }
    r.finish();

    let frontend = Frontend {
        name: named.name,
        bind,
        mode,
        backend,
        max_connections,
        allow,
        deny,
        timeouts,
        limits,
        tls,
        routes,
    };
    let locations = FrontendLocations {
        name: named.loc,
        bind: bind_locs,
        backend: backend_loc,
        routes: routes_field.map(|field| field.loc()),
        route_backends,
    };
    (frontend, locations)
}

/// A required `backend = "NAME"`; its existence is a cross-check.
fn backend_reference(r: &mut TableReader<'_>) -> (String, Option<Loc>) {
    match r.require("backend") {
        Some(field) => match field.non_empty() {
            Some(name) => (name.to_string(), Some(field.loc())),
            None => (String::new(), None),
        },
        None => (String::new(), None),
    }
}

/// CIDRs for allow/deny; a bare address means that one host.
fn networks(field: &Field<'_>) -> Vec<IpNet> {
    field
        .one_or_many()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|item| item.parse(parse_network))
        .collect()
}

fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("invalid cidr {text:?}"))
}

fn frontend_timeouts(mut r: TableReader<'_>) -> FrontendTimeouts {
    let defaults = FrontendTimeouts::default();
    let timeouts = FrontendTimeouts {
        client_idle: r
            .positive_duration("client_idle")
            .unwrap_or(defaults.client_idle),
        request_header: r
            .positive_duration("request_header")
            .unwrap_or(defaults.request_header),
    };
    r.finish();
    timeouts
}

fn limits(mut r: TableReader<'_>) -> Limits {
    let defaults = Limits::default();
    let max_header_bytes = r
        .get("max_header_bytes")
        .and_then(|field| {
            let bytes = field.size()?;
            if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&bytes) {
                field.error(format!("must be between 1KiB and 16MiB, got {bytes} bytes"));
                return None;
            }
            usize::try_from(bytes).ok()
        })
        .unwrap_or(defaults.max_header_bytes);
    r.finish();
    Limits { max_header_bytes }
}

/// A `tls` table that serves TLS: a frontend's, or the admin listener's.
/// `offered`: the ALPN protocols offered when the table names none;
/// `allowed`: those it may name.
fn frontend_tls(mut r: TableReader<'_>, offered: &[&str], allowed: &[&str]) -> FrontendTls {
    let mut certificates = Vec::new();
    // Where each pair's cert and key are written, for problems reading them.
    let mut pair_locs = Vec::new();
    let certificates_loc = r.loc_of("certificates");
    if let Some(field) = r.require("certificates") {
        if field.array_len() == Some(0) {
            field.error("at least one certificate is required");
        }
        for mut pair in field.tables() {
            let cert_field = pair.require("cert");
            let key_field = pair.require("key");
            let cert = cert_field.as_ref().and_then(|field| field.path());
            let key = key_field.as_ref().and_then(|field| field.path());
            pair.finish();
            if let (Some(cert), Some(key), Some(cert_field), Some(key_field)) =
                (cert, key, cert_field, key_field)
            {
                certificates.push(CertificatePair { cert, key });
                pair_locs.push((cert_field.loc(), key_field.loc()));
            }
        }
    }
    let alpn = match r.string_array("alpn") {
        Some(items) => items
            .into_iter()
            .filter_map(|(protocol, field)| {
                if allowed.contains(&protocol.as_str()) {
                    Some(protocol)
                } else {
                    let expected: Vec<String> = allowed.iter().map(|p| format!("{p:?}")).collect();
                    field.error(format!(
                        "invalid alpn protocol {protocol:?} (expected {})",
                        expected.join(" or ")
                    ));
                    None
                }
            })
            .collect(),
        None => offered.iter().map(|p| p.to_string()).collect(),
    };
    let mut tls = FrontendTls {
        certificates,
        alpn,
        min_version: r
            .choice("min_version", TLS_VERSIONS)
            .unwrap_or(TlsVersion::Tls12),
        client_ca: r.path("client_ca"),
        server: None,
    };
    // Certificates and keys are read and matched now, so `check` and a reload
    // report a broken one, and a reload with one keeps the running config.
    if !tls.certificates.is_empty() {
        match crate::tls::server_config(&tls) {
            Ok(server) => tls.server = Some(server),
            Err(err) => {
                let loc = match err.source {
                    TlsSource::Cert(index) => pair_locs.get(index).map(|locs| locs.0.clone()),
                    TlsSource::Key(index) => pair_locs.get(index).map(|locs| locs.1.clone()),
                    TlsSource::Certificates => Some(certificates_loc),
                    other => Some(
                        r.loc_of(
                            &TlsError {
                                source: other,
                                message: String::new(),
                            }
                            .key(),
                        ),
                    ),
                };
                if let Some(loc) = loc {
                    r.context().report(&loc, err.message);
                }
            }
        }
    }
    r.finish();
    tls
}

fn route(mut r: TableReader<'_>) -> (Route, Option<Loc>) {
    let host = r.get("host").and_then(|field| field.parse(route_host));
    let path_prefix = r.get("path_prefix").and_then(|field| field.parse(url_path));
    let methods = r
        .string_array("methods")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, field)| field.parse(parse_method))
        .collect();
    let headers = match r.get("headers").and_then(|field| field.entries()) {
        Some(entries) => entries
            .into_iter()
            .filter_map(|(named, value)| {
                let name = HeaderName::from_bytes(named.name.as_bytes());
                if name.is_err() {
                    r.context()
                        .report(&named.loc, format!("invalid header name {:?}", named.name));
                }
                let value = value.parse(|text| {
                    HeaderValue::from_str(text)
                        .map_err(|_| format!("invalid header value {text:?}"))
                });
                Some((name.ok()?, value?))
            })
            .collect(),
        None => Vec::new(),
    };
    let (backend, backend_loc) = backend_reference(&mut r);
    r.finish();
    let route = Route {
        host,
        path_prefix,
        methods,
        headers,
        backend,
    };
    (route, backend_loc)
}

/// A route's host: compared lower-cased and without a port, as Host headers are.
fn route_host(text: &str) -> Result<String, String> {
    let invalid = || format!("invalid host {text:?}");
    let host = if text.starts_with('[') {
        // IPv6 literal, maybe with a port after the bracket.
        let end = text.find(']').ok_or_else(invalid)?;
        let rest = &text[end + 1..];
        let port_ok = rest.is_empty()
            || rest
                .strip_prefix(':')
                .is_some_and(|port| port.parse::<u16>().is_ok());
        if !port_ok || text[1..end].parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid());
        }
        &text[..=end]
    } else {
        let host = match text.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            Some(_) => return Err(invalid()),
            None => text,
        };
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return Err(invalid());
        }
        host
    };
    Ok(host.to_ascii_lowercase())
}

fn url_path(text: &str) -> Result<String, String> {
    if text.starts_with('/') {
        Ok(text.to_string())
    } else {
        Err(format!("path {text:?} must start with \"/\""))
    }
}

fn parse_method(text: &str) -> Result<Method, String> {
    if text.is_empty() || text.chars().any(|c| c.is_ascii_lowercase()) {
        return Err(format!(
            "invalid method {text:?} (methods are upper case, like \"GET\")"
        ));
    }
    Method::from_bytes(text.as_bytes()).map_err(|_| format!("invalid method {text:?}"))
}

fn backend(named: Named, mut r: TableReader<'_>) -> (Backend, BackendLocations) {
    let balance_field = r.get("balance");
    let balance = balance_field
        .as_ref()
        .and_then(|field| field.choice(BALANCES));
    let balance_loc = match (&balance_field, balance) {
        (Some(field), Some(_)) => Some(field.loc()),
        _ => None,
    };
    let balance = balance.unwrap_or(Balance::RoundRobin);

    let hash_key_field = r.get("hash_key");
    let hash_key = hash_key_field
        .as_ref()
        .and_then(|field| field.parse(parse_hash_key));
    let hash_balance_factor = r.get("hash_balance_factor").and_then(|field| {
        let percent = field.integer()?;
        if percent <= 100 {
            field.error(format!("must be more than 100 (percent), got {percent}"));
            return None;
        }
        field.int_at_least(101)
    });

    let protocol = r.choice("protocol", PROTOCOLS).unwrap_or(Protocol::Http1);
    let retries = r.int_in("retries", 0..=100).unwrap_or(2);
    let redispatch = r.bool("redispatch").unwrap_or(true);
    let max_queue = r.int_at_least("max_queue", 0).unwrap_or(1000);
    let timeouts = r
        .table("timeouts")
        .map(backend_timeouts)
        .unwrap_or_default();
    let mut tls = r.table("tls").map(|table| backend_tls(table, protocol));
    let health = r
        .table("health")
        .map(|table| health(table, tls.is_some()))
        .unwrap_or_default();
    let passive = r.table("passive").map(passive);
    if let Some(tls) = &mut tls
        && health.tls != Some(false)
    {
        let check_protocol = health.protocol_for(protocol);
        tls.check_client = tls.client.as_ref().map(|client| {
            if check_protocol == protocol {
                std::sync::Arc::clone(client)
            } else {
                crate::tls::with_alpn(client, check_protocol)
            }
        });
    }

    let servers_field = r.require("servers");
    let mut servers = Vec::new();
    let mut server_names = Vec::new();
    for table in servers_field
        .as_ref()
        .map(Field::tables)
        .unwrap_or_default()
    {
        let (server, name_loc) = server(table);
        servers.push(server);
        server_names.push(name_loc);
    }
    r.finish();

    let backend = Backend {
        name: named.name,
        balance,
        hash_key,
        hash_balance_factor,
        protocol,
        retries,
        redispatch,
        max_queue,
        timeouts,
        health,
        passive,
        tls,
        servers,
    };
    let locations = BackendLocations {
        name: named.loc,
        balance: balance_loc,
        hash_key: hash_key_field.map(|field| field.loc()),
        servers: servers_field.and_then(|field| Some((field.loc(), field.array_len()?))),
        server_names,
    };
    (backend, locations)
}

fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    let invalid = || {
        format!(
            "invalid hash key {text:?} (expected \"header:NAME\", \"cookie:NAME\", \"query:NAME\", \"path\" or \"source\")"
        )
    };
    match text.split_once(':') {
        None if text == "path" => Ok(HashKey::Path),
        None if text == "source" => Ok(HashKey::Source),
        Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("invalid header name {name:?} in hash key {text:?}")),
        Some(("cookie", name)) if is_token(name) => Ok(HashKey::Cookie(name.to_string())),
        Some(("query", name)) if !name.is_empty() => Ok(HashKey::Query(name.to_string())),
        _ => Err(invalid()),
    }
}

/// An RFC 9110 token (cookie names are tokens).
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

fn backend_timeouts(mut r: TableReader<'_>) -> BackendTimeouts {
    let defaults = BackendTimeouts::default();
    let timeouts = BackendTimeouts {
        connect: r.positive_duration("connect").unwrap_or(defaults.connect),
        response: r.positive_duration("response").unwrap_or(defaults.response),
        idle: r.duration("idle").unwrap_or(defaults.idle),
        queue: r.duration("queue").unwrap_or(defaults.queue),
    };
    r.finish();
    timeouts
}

/// `[backends.NAME.health]`; `traffic_tls`: whether the backend has a `tls`
/// table (checks can speak TLS only with its CA and server name).
fn health(mut r: TableReader<'_>, traffic_tls: bool) -> HealthCheck {
    let defaults = HealthCheck::default();
    let check = r.choice("check", CHECKS).unwrap_or(defaults.check);
    let path = r
        .get("path")
        .and_then(|field| field.parse(url_path))
        .unwrap_or(defaults.path);
    let host = r
        .get("host")
        .and_then(|field| field.non_empty().map(str::to_string));
    let expect_status = r
        .get("expect_status")
        .and_then(|field| status_range(&field))
        .unwrap_or(defaults.expect_status);
    let interval = r.positive_duration("interval").unwrap_or(defaults.interval);
    let health = HealthCheck {
        check,
        path,
        host,
        expect_status,
        interval,
        // HAProxy's fastinter/downinter default to inter as well.
        fast_interval: r.positive_duration("fast_interval").unwrap_or(interval),
        down_interval: r.positive_duration("down_interval").unwrap_or(interval),
        timeout: r.positive_duration("timeout").unwrap_or(defaults.timeout),
        rise: r.int_at_least("rise", 1).unwrap_or(defaults.rise),
        fall: r.int_at_least("fall", 1).unwrap_or(defaults.fall),
        port: r.int_in("port", 1..=65535),
        protocol: r.choice("protocol", PROTOCOLS),
        tls: r.get("tls").and_then(|field| {
            let tls = field.bool()?;
            if tls && !traffic_tls {
                field.error(
                    "checks speak TLS only to a backend with a tls table (it has the CA and server name to verify with)",
                );
                return None;
            }
            Some(tls)
        }),
    };
    r.finish();
    health
}

/// `expect_status`: `"200"`, `"200-399"`, or an integer code.
fn status_range(field: &Field<'_>) -> Option<(u16, u16)> {
    if field.is_integer() {
        let code = field.integer()?;
        return field.ok(parse_status_range(&code.to_string()));
    }
    field.parse(parse_status_range)
}

fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let code = |part: &str| {
        part.trim()
            .parse::<u16>()
            .ok()
            .filter(|code| (100..=599).contains(code))
    };
    let range = match text.split_once('-') {
        Some((low, high)) => code(low).zip(code(high)),
        None => code(text).map(|code| (code, code)),
    };
    match range {
        Some((low, high)) if low <= high => Ok((low, high)),
        Some(_) => Err(format!(
            "invalid status range {text:?} (low end above high end)"
        )),
        None => Err(format!(
            "invalid status {text:?} (expected a code like \"200\" or a range like \"200-399\", within 100-599)"
        )),
    }
}

fn passive(mut r: TableReader<'_>) -> Passive {
    let passive = Passive {
        consecutive_failures: r.int_at_least("consecutive_failures", 1).unwrap_or(5),
        ejection_time: r
            .positive_duration("ejection_time")
            .unwrap_or(Duration::from_secs(10)),
    };
    r.finish();
    passive
}

fn backend_tls(mut r: TableReader<'_>, protocol: Protocol) -> BackendTls {
    let mut tls = BackendTls {
        ca: r.path("ca"),
        server_name: r
            .get("server_name")
            .and_then(|field| field.non_empty().map(str::to_string)),
        client: None,
        check_client: None,
        ca_digest: 0,
    };
    // The CA file is read now, so a bad one is a config problem like any other.
    match crate::tls::client_config(&tls, protocol) {
        Ok((client, ca_digest)) => {
            tls.client = Some(client);
            tls.ca_digest = ca_digest;
        }
        Err(err) => r.context().report(&r.loc_of(&err.key()), err.message),
    }
    r.finish();
    tls
}

fn server(mut r: TableReader<'_>) -> (Server, ServerNameLoc) {
    let name_field = r.get("name");
    let name = name_field
        .as_ref()
        .and_then(|field| field.parse(server_name));

    let address_field = r.require("address");
    let address = address_field.as_ref().and_then(|field| field.non_empty());
    let addr = match (&address_field, address) {
        (Some(field), Some(address)) => field.ok(resolve(address)),
        _ => None,
    };
    let address = address.unwrap_or_default().to_string();

    let name_loc = match (&name_field, &address_field) {
        (Some(field), _) => ServerNameLoc {
            loc: field.loc(),
            written: true,
        },
        (None, Some(field)) => ServerNameLoc {
            loc: field.loc(),
            written: false,
        },
        (None, None) => ServerNameLoc {
            loc: r.loc_of("name"),
            written: false,
        },
    };
    let server = Server {
        name: name.unwrap_or_else(|| address.clone()),
        address,
        // Only a placeholder when the address is bad: the problem is reported
        // and this Config is never handed out.
        addr: addr.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
        weight: r.int_in("weight", 0..=256).unwrap_or(1),
        backup: r.bool("backup").unwrap_or(false),
        max_connections: r.int_at_least("max_connections", 0).unwrap_or(0),
        slow_start: r.duration("slow_start").unwrap_or(Duration::ZERO),
    };
    r.finish();
    (server, name_loc)
}

/// Server names appear in admin API paths and metric labels.
fn server_name(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("must not be empty".to_string());
    }
    if text
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "invalid server name {text:?} (no \"/\", spaces or control characters)"
        ));
    }
    Ok(text.to_string())
}

/// A server address: `ip:port`, or `host:port` resolved now (IPv4 preferred).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return check_port(text, addr);
    }
    let invalid = || format!("invalid socket address {text:?}");
    if text.chars().any(char::is_whitespace) {
        return Err(invalid());
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("missing port in {text:?}"));
    };
    if port.is_empty() {
        return Err(format!("missing port in {text:?}"));
    }
    // An IP literal that failed to parse above is wrong, not a name to look up
    // ("10.0.0.300:80", "[::1]:http", "::1:80" without brackets).
    let looks_like_ip = host.starts_with('[')
        || host.contains(':')
        || host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if looks_like_ip || port.parse::<u16>().is_err() {
        return Err(invalid());
    }
    let port: u16 = port.parse().map_err(|_| invalid())?;
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve {text:?}: {err}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("cannot resolve {text:?}: no addresses"))?;
    check_port(text, addr)
}

fn check_port(text: &str, addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err(format!("invalid socket address {text:?} (port 0)"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys() {
        assert_eq!(
            parse_hash_key("header:X-Workflow-Id"),
            Ok(HashKey::Header(HeaderName::from_static("x-workflow-id")))
        );
        assert_eq!(
            parse_hash_key("cookie:session"),
            Ok(HashKey::Cookie("session".to_string()))
        );
        assert_eq!(
            parse_hash_key("query:workflow"),
            Ok(HashKey::Query("workflow".to_string()))
        );
        assert_eq!(parse_hash_key("path"), Ok(HashKey::Path));
        assert_eq!(parse_hash_key("source"), Ok(HashKey::Source));
        assert!(parse_hash_key("header:").is_err());
        assert!(parse_hash_key("header:bad name").is_err());
        assert!(parse_hash_key("cookie:").is_err());
        assert!(parse_hash_key("uri").is_err());
    }

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200"), Ok((200, 200)));
        assert_eq!(parse_status_range("200-399"), Ok((200, 399)));
        assert_eq!(
            parse_status_range("399-200"),
            Err("invalid status range \"399-200\" (low end above high end)".to_string())
        );
        assert!(parse_status_range("600").is_err());
        assert!(parse_status_range("99").is_err());
        assert!(parse_status_range("ok").is_err());
        assert!(parse_status_range("200-").is_err());
    }

    #[test]
    fn route_hosts() {
        assert_eq!(
            route_host("Engine.Example.com"),
            Ok("engine.example.com".to_string())
        );
        assert_eq!(
            route_host("engine.example.com:8443"),
            Ok("engine.example.com".to_string())
        );
        assert_eq!(route_host("[::1]:8080"), Ok("[::1]".to_string()));
        assert_eq!(route_host("[::1]"), Ok("[::1]".to_string()));
        assert!(route_host("").is_err());
        assert!(route_host("a b").is_err());
        assert!(route_host("host:port").is_err());
        assert!(route_host("[::1").is_err());
    }

    #[test]
    fn methods() {
        assert_eq!(parse_method("GET"), Ok(Method::GET));
        assert_eq!(
            parse_method("PURGE").map(|m| m.to_string()),
            Ok("PURGE".to_string())
        );
        assert_eq!(
            parse_method("get"),
            Err("invalid method \"get\" (methods are upper case, like \"GET\")".to_string())
        );
        assert!(parse_method("GE T").is_err());
    }

    #[test]
    fn networks_accept_bare_addresses() {
        assert_eq!(
            parse_network("10.0.0.0/8"),
            "10.0.0.0/8".parse::<IpNet>().map_err(|e| e.to_string())
        );
        assert_eq!(
            parse_network("127.0.0.1"),
            "127.0.0.1/32".parse::<IpNet>().map_err(|e| e.to_string())
        );
        assert_eq!(
            parse_network("::1"),
            "::1/128".parse::<IpNet>().map_err(|e| e.to_string())
        );
        assert_eq!(
            parse_network("10.1.2.3/8"),
            "10.0.0.0/8".parse::<IpNet>().map_err(|e| e.to_string())
        );
        assert_eq!(
            parse_network("10.0.0.0/33"),
            Err("invalid cidr \"10.0.0.0/33\"".to_string())
        );
    }

    #[test]
    fn sha256_digests() {
        let hex = "00ff".repeat(16);
        let digest = parse_sha256(&hex).unwrap_or_default();
        assert_eq!(digest[0], 0x00);
        assert_eq!(digest[1], 0xff);
        assert_eq!(digest[31], 0xff);
        assert_eq!(
            parse_sha256("secret-token"),
            Err("expected 64 hex characters, got 12 characters".to_string())
        );
    }

    #[test]
    fn server_addresses() {
        assert_eq!(
            resolve("10.0.0.11:7233"),
            Ok(SocketAddr::from(([10, 0, 0, 11], 7233)))
        );
        assert_eq!(
            resolve("[::1]:80"),
            Ok("[::1]:80".parse().unwrap_or(DEFAULT_ADMIN_BIND))
        );
        assert_eq!(
            resolve("10.0.0.300:80"),
            Err("invalid socket address \"10.0.0.300:80\"".to_string())
        );
        assert_eq!(
            resolve("engine"),
            Err("missing port in \"engine\"".to_string())
        );
        assert_eq!(
            resolve("engine:"),
            Err("missing port in \"engine:\"".to_string())
        );
        assert_eq!(
            resolve("engine:http"),
            Err("invalid socket address \"engine:http\"".to_string())
        );
        assert_eq!(
            resolve(" engine:80"),
            Err("invalid socket address \" engine:80\"".to_string())
        );
        assert_eq!(
            resolve("::1:80"),
            Err("invalid socket address \"::1:80\"".to_string())
        );
        assert_eq!(
            resolve("10.0.0.1:0"),
            Err("invalid socket address \"10.0.0.1:0\" (port 0)".to_string())
        );
        // Resolved from /etc/hosts, no DNS: IPv4 preferred.
        assert_eq!(
            resolve("localhost:80"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 80)))
        );
    }
}
