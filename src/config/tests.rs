//! Loader tests: whole files in, exact `FILE:LINE:COL: key.path: message` lines
//! or a checked model out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::*;

/// The problems `flowgate check` would print for `text` read as `flowgate.toml`.
fn errors(text: &str) -> Vec<String> {
    match parse(text, Path::new("flowgate.toml")) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn parsed(text: &str, path: &str) -> Config {
    match parse(text, Path::new(path)) {
        Ok(config) => config,
        Err(errors) => panic!("config should be valid, got:\n{errors}"),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|_| panic!("test address {text:?}"))
}

/// Writes a self-signed certificate and its key (PEM), creating directories, so
/// a config naming them loads.
fn write_pair(cert: &Path, key: &Path) {
    let generated = rcgen::generate_simple_self_signed(vec!["engine.example.com".to_string()])
        .expect("test certificate");
    write_file(cert, &generated.cert.pem());
    write_file(key, &generated.signing_key.serialize_pem());
}

fn write_file(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("test directory");
    }
    std::fs::write(path, text).expect("test file");
}

/// A config directory `<tmp>/etc/flowgate` with the certificate files the
/// contract's example names.
fn contract_pki() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("etc/flowgate");
    write_pair(&dir.join("certs/engine.pem"), &dir.join("certs/engine.key"));
    write_pair(
        &dir.join("certs/clients.pem"),
        &dir.join("certs/clients.key"),
    );
    write_pair(
        &dir.join("certs/internal-ca.pem"),
        &dir.join("certs/internal-ca.key"),
    );
    (root, dir)
}

/// A small valid file; tests append to it (its last line is 8).
const MINIMAL: &str = r#"[frontends.public]
bind = ["127.0.0.1:8080"]
backend = "engines"

[backends.engines]

[[backends.engines.servers]]
address = "127.0.0.1:7233"
"#;

#[test]
fn minimal_file_is_valid() {
    assert_eq!(errors(MINIMAL), Vec::<String>::new());
}

#[test]
fn unknown_key_with_suggestion() {
    let text = format!("{MINIMAL}\n[global]\nthraeds = 4\n");
    assert_eq!(
        errors(&text),
        [r#"flowgate.toml:11:1: global: unknown key "thraeds" (did you mean "threads"?)"#]
    );
}

#[test]
fn unknown_key_without_suggestion_and_at_top_level() {
    let text = format!("colour = \"blue\"\n{MINIMAL}backend = \"x\"\n");
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:1:1: unknown key "colour""#,
            r#"flowgate.toml:10:1: backends.engines.servers[0]: unknown key "backend""#,
        ]
    );
}

#[test]
fn bad_address_as_in_the_contract() {
    let text = r#"[global]
grace_period = "5s"

[frontends.public]
bind = ["127.0.0.1:8080"]
backend = "engines"

[backends.engines]
balance = "round_robin"

[backends.engines.health]
check = "http"
path = "/health"

[backends.engines.timeouts]
connect = "3s"
response = "60s"

[[backends.engines.servers]]
name = "engine-1"
address = "10.0.0.11:80"
weight = 1

[[backends.engines.servers]]
name = "engine-2"
address = "10.0.0.12:80"
weight = 1

[[backends.engines.servers]]
name = "engine-3"
address = "10.0.0.300:80"
"#;
    assert_eq!(
        errors(text),
        [
            r#"flowgate.toml:31:11: backends.engines.servers[2].address: invalid socket address "10.0.0.300:80""#
        ]
    );
}

#[test]
fn file_is_named_as_given() {
    let text = MINIMAL.replace("127.0.0.1:7233", "127.0.0.1");
    let errors = match parse(&text, Path::new("conf/../flowgate.toml")) {
        Ok(_) => panic!("a missing port must be an error"),
        Err(errors) => errors.to_string(),
    };
    assert_eq!(
        errors,
        r#"conf/../flowgate.toml:8:11: backends.engines.servers[0].address: missing port in "127.0.0.1""#
    );
}

#[test]
fn missing_backend() {
    let text = r#"[frontends.public]
bind = ["127.0.0.1:8080"]
backend = "engnes"

[[frontends.public.routes]]
path_prefix = "/api/"
backend = "readers"

[backends.engines]

[[backends.engines.servers]]
address = "127.0.0.1:7233"
"#;
    assert_eq!(
        errors(text),
        [
            r#"flowgate.toml:3:11: frontends.public.backend: unknown backend "engnes" (did you mean "engines"?)"#,
            r#"flowgate.toml:7:11: frontends.public.routes[0].backend: unknown backend "readers""#,
        ]
    );
}

#[test]
fn missing_required_keys_are_reported_at_their_table() {
    let text = r#"[frontends.public]
bind = "127.0.0.1:8080"

[backends.engines]

[[backends.engines.servers]]
name = "engine-1"
"#;
    assert_eq!(
        errors(text),
        [
            "flowgate.toml:1:1: frontends.public.backend: missing required key",
            "flowgate.toml:6:1: backends.engines.servers[0].address: missing required key",
        ]
    );
}

#[test]
fn duplicate_server() {
    let text = format!(
        "{MINIMAL}name = \"engine-1\"\n\n[[backends.engines.servers]]\nname = \"engine-1\"\naddress = \"127.0.0.1:7234\"\n"
    );
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:12:8: backends.engines.servers[1].name: duplicate server name "engine-1""#
        ]
    );
}

#[test]
fn duplicate_default_server_names_explain_the_default() {
    let text = format!("{MINIMAL}\n[[backends.engines.servers]]\naddress = \"127.0.0.1:7233\"\n");
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:11:11: backends.engines.servers[1].address: duplicate server name "127.0.0.1:7233" (a server's name defaults to its address)"#
        ]
    );
}

#[test]
fn two_problems_in_file_order() {
    // The unknown backend is found by a cross-check after the bad weight, yet
    // it comes first because it comes first in the file.
    let text = r#"[frontends.public]
bind = ["127.0.0.1:8080"]
backend = "missing"

[backends.engines]

[[backends.engines.servers]]
address = "127.0.0.1:7233"
weight = 300
"#;
    assert_eq!(
        errors(text),
        [
            r#"flowgate.toml:3:11: frontends.public.backend: unknown backend "missing""#,
            "flowgate.toml:9:10: backends.engines.servers[0].weight: must be between 0 and 256, got 300",
        ]
    );
}

#[test]
fn every_problem_is_reported() {
    let text = r#"[global]
threads = -1
grace_period = "soon"
log_format = "xml"

[frontends.public]
bind = ["127.0.0.1:8080", "localhost"]
backend = "engines"
allow = ["10.0.0.0/33"]
[frontends.public.timeouts]
client_idle = "0s"

[backends.engines]
retries = "2"

[backends.engines.health]
expect_status = "600"
rise = 0

[[backends.engines.servers]]
address = "127.0.0.1:7233"
slow_start = 5
"#;
    assert_eq!(
        errors(text),
        [
            "flowgate.toml:2:11: global.threads: must be between 0 and 1024, got -1",
            r#"flowgate.toml:3:16: global.grace_period: invalid duration "soon": expected number at 0"#,
            r#"flowgate.toml:4:14: global.log_format: invalid value "xml" (expected "text" or "json")"#,
            r#"flowgate.toml:7:27: frontends.public.bind[1]: invalid socket address "localhost""#,
            r#"flowgate.toml:9:10: frontends.public.allow[0]: invalid cidr "10.0.0.0/33""#,
            "flowgate.toml:11:15: frontends.public.timeouts.client_idle: must be greater than 0s",
            "flowgate.toml:14:11: backends.engines.retries: expected an integer, found string",
            r#"flowgate.toml:17:17: backends.engines.health.expect_status: invalid status "600" (expected a code like "200" or a range like "200-399", within 100-599)"#,
            "flowgate.toml:18:8: backends.engines.health.rise: must be at least 1, got 0",
            r#"flowgate.toml:22:14: backends.engines.servers[0].slow_start: expected a duration string like "2s", found integer 5"#,
        ]
    );
}

#[test]
fn empty_address_and_single_table_for_an_array() {
    let text = MINIMAL.replace("127.0.0.1:7233", "")
        + "\n[frontends.public.routes]\nbackend = \"engines\"\n";
    assert_eq!(
        errors(&text),
        [
            "flowgate.toml:8:11: backends.engines.servers[0].address: must not be empty",
            "flowgate.toml:10:1: frontends.public.routes: expected an array of tables like [[frontends.public.routes]], found table",
        ]
    );
}

#[test]
fn allow_takes_one_network_or_a_list() {
    let text = MINIMAL.replace(
        "backend = \"engines\"\n",
        "backend = \"engines\"\nallow = \"10.0.0.0/8\"\ndeny = [\"10.0.0.1\", \"::1\"]\n",
    );
    let config = parsed(&text, "flowgate.toml");
    let allow: Vec<String> = config.frontends[0]
        .allow
        .iter()
        .map(ToString::to_string)
        .collect();
    let deny: Vec<String> = config.frontends[0]
        .deny
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(allow, ["10.0.0.0/8"]);
    assert_eq!(deny, ["10.0.0.1/32", "::1/128"]);
}

#[test]
fn syntax_error() {
    assert_eq!(
        errors("[global]\nthreads = \n"),
        ["flowgate.toml:2:11: string values must be quoted, expected literal string"]
    );
    assert_eq!(
        errors("[global]\nthreads = 1\nthreads = 2\n"),
        [r#"flowgate.toml:3:1: duplicate key "threads""#]
    );
    assert_eq!(
        errors("[global\n"),
        ["flowgate.toml:1:8: unclosed table, expected `]`"]
    );
}

#[test]
fn duration_given_as_integer() {
    let text = format!("[global]\ngrace_period = 30\n{MINIMAL}");
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:2:16: global.grace_period: expected a duration string like "2s", found integer 30"#
        ]
    );
}

#[test]
fn unknown_enum_value() {
    let text = MINIMAL.replace(
        "[backends.engines]\n",
        "[backends.engines]\nbalance = \"roundrobin\"\n",
    );
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:6:11: backends.engines.balance: invalid value "roundrobin" (expected "round_robin", "least_conn", "random", "p2c", "source", "hash" or "first")"#
        ]
    );
}

#[test]
fn wrong_type_for_a_choice_says_what_is_expected() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pair(&dir.path().join("a.pem"), &dir.path().join("a.key"));
    let text = format!(
        "{MINIMAL}\n[frontends.public.tls]\ncertificates = [{{ cert = \"a.pem\", key = \"a.key\" }}]\nmin_version = 1.2\n"
    );
    let path = dir.path().join("flowgate.toml");
    let errors: Vec<String> = match parse(&text, &path) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    assert_eq!(
        errors,
        [format!(
            r#"{}:12:15: frontends.public.tls.min_version: expected "1.2" or "1.3", found float 1.2"#,
            path.display()
        )]
    );
}

#[test]
fn no_frontend() {
    assert_eq!(
        errors(""),
        ["flowgate.toml:1:1: frontends: at least one frontend is required"]
    );
    assert_eq!(
        errors("frontends = {}\n"),
        ["flowgate.toml:1:13: frontends: at least one frontend is required"]
    );
}

#[test]
fn empty_lists() {
    let text = r#"[frontends.public]
bind = []
backend = "engines"

[backends.engines]
servers = []
"#;
    assert_eq!(
        errors(text),
        [
            "flowgate.toml:2:8: frontends.public.bind: at least one address is required",
            "flowgate.toml:6:11: backends.engines.servers: at least one server is required",
        ]
    );
}

#[test]
fn address_bound_twice() {
    let text = r#"[admin]
bind = "127.0.0.1:8080"

[frontends.public]
bind = ["0.0.0.0:8080", "[::]:8080"]
backend = "engines"

[frontends.internal]
bind = ["127.0.0.1:9000", "[::1]:8080", "127.0.0.1:0", "127.0.0.1:9000"]
backend = "engines"

[frontends.other]
bind = "127.0.0.1:0"
backend = "engines"

[backends.engines]

[[backends.engines.servers]]
address = "127.0.0.1:7233"
"#;
    assert_eq!(
        errors(text),
        [
            "flowgate.toml:5:9: frontends.public.bind[0]: address 0.0.0.0:8080 is already bound by admin.bind",
            "flowgate.toml:9:27: frontends.internal.bind[1]: address [::1]:8080 is already bound by frontends.public.bind[1]",
            "flowgate.toml:9:56: frontends.internal.bind[3]: address 127.0.0.1:9000 is already bound by frontends.internal.bind[0]",
        ]
    );
}

#[test]
fn address_bound_twice_as_in_the_brief() {
    let text = format!(
        "{MINIMAL}\n[frontends.second]\nbind = [\"127.0.0.1:8080\"]\nbackend = \"engines\"\n"
    );
    assert_eq!(
        errors(&text),
        [
            "flowgate.toml:11:9: frontends.second.bind[0]: address 127.0.0.1:8080 is already bound by frontends.public.bind[0]"
        ]
    );
}

#[test]
fn balance_hash_needs_a_hash_key() {
    let text = r#"[frontends.public]
bind = ["127.0.0.1:8080"]
backend = "hashed"

[backends.hashed]
balance = "hash"

[[backends.hashed.servers]]
address = "127.0.0.1:7233"

[backends.factor]
balance = "hash"
hash_key = "cookie:session"
hash_balance_factor = 100

[[backends.factor.servers]]
address = "127.0.0.1:7233"
"#;
    assert_eq!(
        errors(text),
        [
            r#"flowgate.toml:6:11: backends.hashed.balance: balance = "hash" needs a hash_key"#,
            "flowgate.toml:14:23: backends.factor.hash_balance_factor: must be more than 100 (percent), got 100",
        ]
    );
}

#[test]
fn hash_key_is_kept_but_unused_with_another_balance() {
    let text = MINIMAL.replace(
        "[backends.engines]\n",
        "[backends.engines]\nbalance = \"p2c\"\nhash_key = \"path\"\nhash_balance_factor = 150\n",
    );
    let config = parsed(&text, "flowgate.toml");
    assert_eq!(config.backends[0].balance, Balance::P2c);
    assert_eq!(config.backends[0].hash_key, Some(HashKey::Path));
    assert_eq!(config.backends[0].hash_balance_factor, Some(150));
}

#[test]
fn routes_need_http_mode() {
    let text = MINIMAL.replace(
        "backend = \"engines\"\n",
        "backend = \"engines\"\nmode = \"tcp\"\n[[frontends.public.routes]]\nbackend = \"engines\"\n",
    );
    assert_eq!(
        errors(&text),
        [r#"flowgate.toml:5:1: frontends.public.routes: routes need mode = "http""#]
    );
}

#[test]
fn invalid_names() {
    let text = r#"[frontends."pub lic"]
bind = ["127.0.0.1:8080"]
backend = "engines"

[backends.engines]

[[backends.engines.servers]]
name = "a/b"
address = "127.0.0.1:7233"
"#;
    assert_eq!(
        errors(text),
        [
            r#"flowgate.toml:1:12: frontends."pub lic": invalid name "pub lic" (use letters, digits, "_", "." and "-")"#,
            r#"flowgate.toml:8:8: backends.engines.servers[0].name: invalid server name "a/b" (no "/", spaces or control characters)"#,
        ]
    );
}

#[test]
fn route_problems() {
    let text = format!(
        "{MINIMAL}\n[[frontends.public.routes]]\nhost = \"a b\"\npath_prefix = \"api\"\nmethods = [\"get\"]\nheaders = {{ \"X Tenant\" = \"acme\", \"X-Ok\" = \"bad\\u0001\" }}\nbackend = \"engines\"\n"
    );
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:11:8: frontends.public.routes[0].host: invalid host "a b""#,
            r#"flowgate.toml:12:15: frontends.public.routes[0].path_prefix: path "api" must start with "/""#,
            r#"flowgate.toml:13:12: frontends.public.routes[0].methods[0]: invalid method "get" (methods are upper case, like "GET")"#,
            r#"flowgate.toml:14:13: frontends.public.routes[0].headers."X Tenant": invalid header name "X Tenant""#,
            r#"flowgate.toml:14:43: frontends.public.routes[0].headers.X-Ok: invalid header value "bad\u{1}""#,
        ]
    );
}

#[test]
fn admin_problems() {
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:9100\"\n[[admin.tokens]]\nname = \"ops\"\nrole = \"root\"\nsha256 = \"my-secret-token\"\n[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\n{MINIMAL}",
        "ab".repeat(32)
    );
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:5:8: admin.tokens[0].role: invalid value "root" (expected "viewer" or "operator")"#,
            "flowgate.toml:6:10: admin.tokens[0].sha256: expected 64 hex characters, got 15 characters",
            "flowgate.toml:8:8: admin.tokens[1].name: duplicate token name",
        ]
    );
}

#[test]
fn tls_problems() {
    let text = format!(
        "{MINIMAL}\n[frontends.public.tls]\ncertificates = [{{ cert = \"a.pem\" }}]\nalpn = [\"h3\"]\n"
    );
    assert_eq!(
        errors(&text),
        [
            "flowgate.toml:11:17: frontends.public.tls.certificates[0].key: missing required key",
            r#"flowgate.toml:12:9: frontends.public.tls.alpn[0]: invalid alpn protocol "h3" (expected "h2" or "http/1.1")"#,
        ]
    );
    let empty = format!("{MINIMAL}\n[frontends.public.tls]\ncertificates = []\n");
    assert_eq!(
        errors(&empty),
        [
            "flowgate.toml:11:16: frontends.public.tls.certificates: at least one certificate is required"
        ]
    );
}

#[test]
fn sizes_and_types() {
    let text = format!(
        "{MINIMAL}\n[frontends.public.limits]\nmax_header_bytes = \"64KQ\"\n\n[backends.engines.passive]\nconsecutive_failures = true\n"
    );
    assert_eq!(
        errors(&text),
        [
            r#"flowgate.toml:11:20: frontends.public.limits.max_header_bytes: invalid size "64KQ": unknown unit "KQ" (use B, KB, MB, GB, KiB, MiB or GiB)"#,
            "flowgate.toml:14:24: backends.engines.passive.consecutive_failures: expected an integer, found boolean true",
        ]
    );
    let small = format!("{MINIMAL}\n[frontends.public.limits]\nmax_header_bytes = 100\n");
    assert_eq!(
        errors(&small),
        [
            "flowgate.toml:11:20: frontends.public.limits.max_header_bytes: must be between 1KiB and 16MiB, got 100 bytes"
        ]
    );
}

#[test]
fn defaults() {
    let config = parsed(MINIMAL, "flowgate.toml");
    assert!(config.admin.is_none());

    let global = &config.global;
    assert_eq!(global.threads, 0);
    assert_eq!(global.max_connections, 50_000);
    assert_eq!(global.grace_period, Duration::from_secs(30));
    assert_eq!(global.access_log, AccessLog::Stderr);
    assert_eq!(global.log_format, LogFormat::Text);
    assert_eq!(global.state_file, None);

    let frontend = &config.frontends[0];
    assert_eq!(frontend.name, "public");
    assert_eq!(frontend.bind, [addr("127.0.0.1:8080")]);
    assert_eq!(frontend.mode, Mode::Http);
    assert_eq!(frontend.backend, "engines");
    assert_eq!(frontend.max_connections, None);
    assert!(frontend.allow.is_empty() && frontend.deny.is_empty());
    assert_eq!(frontend.timeouts.client_idle, Duration::from_secs(60));
    assert_eq!(frontend.timeouts.request_header, Duration::from_secs(10));
    assert_eq!(frontend.limits.max_header_bytes, 64 * 1024);
    assert!(frontend.tls.is_none());
    assert!(frontend.routes.is_empty());

    let backend = &config.backends[0];
    assert_eq!(backend.name, "engines");
    assert_eq!(backend.balance, Balance::RoundRobin);
    assert_eq!(backend.hash_key, None);
    assert_eq!(backend.hash_balance_factor, None);
    assert_eq!(backend.protocol, Protocol::Http1);
    assert_eq!(backend.retries, 2);
    assert!(backend.redispatch);
    assert_eq!(backend.max_queue, 1000);
    assert_eq!(backend.timeouts.connect, Duration::from_secs(3));
    assert_eq!(backend.timeouts.response, Duration::from_secs(60));
    assert_eq!(backend.timeouts.idle, Duration::from_secs(90));
    assert_eq!(backend.timeouts.queue, Duration::from_secs(5));
    let health = &backend.health;
    assert_eq!(health.check, CheckKind::Tcp);
    assert_eq!(health.path, "/");
    assert_eq!(health.host, None);
    assert_eq!(health.expect_status, (200, 399));
    assert_eq!(health.interval, Duration::from_secs(2));
    assert_eq!(health.fast_interval, Duration::from_secs(2));
    assert_eq!(health.down_interval, Duration::from_secs(2));
    assert_eq!(health.timeout, Duration::from_secs(1));
    assert_eq!((health.rise, health.fall), (2, 3));
    assert!(backend.passive.is_none());
    assert!(backend.tls.is_none());

    let server = &backend.servers[0];
    assert_eq!(server.name, "127.0.0.1:7233");
    assert_eq!(server.address, "127.0.0.1:7233");
    assert_eq!(server.addr, addr("127.0.0.1:7233"));
    assert_eq!(server.weight, 1);
    assert!(!server.backup);
    assert_eq!(server.max_connections, 0);
    assert_eq!(server.slow_start, Duration::ZERO);
}

#[test]
fn section_defaults() {
    let text = format!(
        "[admin]\n[[admin.tokens]]\nsha256 = \"{}\"\n{MINIMAL}\n[frontends.public.tls]\ncertificates = [{{ cert = \"a.pem\", key = \"a.key\" }}]\n\n[frontends.raw]\nmode = \"tcp\"\nbind = \"127.0.0.1:5432\"\nbackend = \"engines\"\n[frontends.raw.tls]\ncertificates = [{{ cert = \"a.pem\", key = \"a.key\" }}]\n\n[backends.engines.health]\ninterval = \"10s\"\n\n[backends.engines.passive]\n",
        "AB".repeat(32)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    write_pair(&dir.path().join("a.pem"), &dir.path().join("a.key"));
    let config = parsed(
        &text,
        &dir.path().join("flowgate.toml").display().to_string(),
    );
    let admin = config
        .admin
        .as_ref()
        .map(|admin| (admin.bind, admin.tokens.clone()));
    let Some((bind, tokens)) = admin else {
        panic!("admin section missing");
    };
    assert_eq!(bind, addr("127.0.0.1:9100"));
    assert_eq!(tokens[0].name, "token-1");
    assert_eq!(tokens[0].role, Role::Viewer);
    assert_eq!(tokens[0].sha256, [0xab; 32]);

    let http_tls = config.frontends[0]
        .tls
        .as_ref()
        .map(|tls| (tls.alpn.clone(), tls.min_version, tls.client_ca.clone()));
    assert_eq!(
        http_tls,
        Some((
            vec!["h2".to_string(), "http/1.1".to_string()],
            TlsVersion::Tls12,
            None
        ))
    );
    let raw = &config.frontends[1];
    assert_eq!(raw.mode, Mode::Tcp);
    assert_eq!(raw.bind, [addr("127.0.0.1:5432")]);
    assert_eq!(raw.tls.as_ref().map(|tls| tls.alpn.len()), Some(0));

    let health = &config.backends[0].health;
    assert_eq!(health.interval, Duration::from_secs(10));
    assert_eq!(health.fast_interval, Duration::from_secs(10));
    assert_eq!(health.down_interval, Duration::from_secs(10));
    let passive = config.backends[0]
        .passive
        .map(|p| (p.consecutive_failures, p.ejection_time));
    assert_eq!(passive, Some((5, Duration::from_secs(10))));
}

#[test]
fn relative_paths_follow_the_config_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let etc = root.join("etc/flowgate");
    write_pair(&etc.join("certs/a.pem"), &root.join("keys/a.key"));
    write_pair(&etc.join("ca.pem"), &etc.join("ca.key"));
    write_pair(
        &root.join("etc/ca/internal.pem"),
        &root.join("etc/ca/internal.key"),
    );
    let keys = root.join("keys/a.key").display().to_string();
    let text = format!(
        "[global]\naccess_log = \"logs/access.log\"\nstate_file = \"/var/lib/flowgate/state.json\"\n{MINIMAL}\n[frontends.public.tls]\ncertificates = [{{ cert = \"certs/a.pem\", key = \"{keys}\" }}]\nclient_ca = \"ca.pem\"\n\n[backends.engines.tls]\nca = \"../ca/internal.pem\"\n"
    );
    let config = parsed(&text, &etc.join("flowgate.toml").display().to_string());
    assert_eq!(config.path, etc.join("flowgate.toml"));
    assert_eq!(
        config.global.access_log,
        AccessLog::File(etc.join("logs/access.log"))
    );
    assert_eq!(
        config.global.state_file,
        Some(PathBuf::from("/var/lib/flowgate/state.json"))
    );
    assert_eq!(
        config.referenced_files(),
        [
            etc.join("certs/a.pem"),
            root.join("keys/a.key"),
            etc.join("ca.pem"),
            etc.join("../ca/internal.pem"),
        ]
    );
    // A bare file name is relative to the current directory, where it was found.
    let bare = format!("[global]\naccess_log = \"logs/access.log\"\n{MINIMAL}");
    let config = parsed(&bare, "flowgate.toml");
    assert_eq!(
        config.global.access_log,
        AccessLog::File(PathBuf::from("logs/access.log"))
    );
}

#[test]
fn the_contract_example() {
    let (_root, etc) = contract_pki();
    let config = parsed(
        CONTRACT_EXAMPLE,
        &etc.join("flowgate.toml").display().to_string(),
    );

    let global = &config.global;
    assert_eq!(global.threads, 0);
    assert_eq!(global.max_connections, 50_000);
    assert_eq!(global.grace_period, Duration::from_secs(30));
    assert_eq!(global.access_log, AccessLog::Stderr);
    assert_eq!(global.log_format, LogFormat::Text);
    assert_eq!(
        global.state_file,
        Some(PathBuf::from("/var/lib/flowgate/state.json"))
    );

    let Some(admin) = &config.admin else {
        panic!("admin section missing");
    };
    assert_eq!(admin.bind, addr("127.0.0.1:9100"));
    assert_eq!(admin.tokens.len(), 1);
    assert_eq!(admin.tokens[0].name, "ops");
    assert_eq!(admin.tokens[0].role, Role::Operator);
    assert_eq!(admin.tokens[0].sha256[..4], [0x01, 0x23, 0x45, 0x67]);

    let frontend = &config.frontends[0];
    assert_eq!(frontend.name, "public");
    assert_eq!(frontend.bind, [addr("0.0.0.0:8080"), addr("[::]:8080")]);
    assert_eq!(frontend.mode, Mode::Http);
    assert_eq!(frontend.backend, "engines");
    assert_eq!(frontend.max_connections, Some(10_000));
    let allow: Vec<String> = frontend.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["10.0.0.0/8", "127.0.0.1/32"]);
    assert!(frontend.deny.is_empty());
    assert_eq!(frontend.timeouts.client_idle, Duration::from_secs(60));
    assert_eq!(frontend.timeouts.request_header, Duration::from_secs(10));
    assert_eq!(frontend.limits.max_header_bytes, 65_536);
    let Some(tls) = &frontend.tls else {
        panic!("frontend tls missing");
    };
    assert_eq!(
        tls.certificates,
        [CertificatePair {
            cert: etc.join("certs/engine.pem"),
            key: etc.join("certs/engine.key"),
        }]
    );
    assert_eq!(tls.alpn, ["h2", "http/1.1"]);
    assert_eq!(tls.min_version, TlsVersion::Tls12);
    assert_eq!(tls.client_ca, Some(etc.join("certs/clients.pem")));
    assert_eq!(frontend.routes.len(), 1);
    let route = &frontend.routes[0];
    assert_eq!(route.host.as_deref(), Some("engine.example.com"));
    assert_eq!(route.path_prefix.as_deref(), Some("/api/v1/"));
    assert_eq!(route.methods, [Method::GET, Method::HEAD]);
    assert_eq!(
        route.headers,
        [(
            HeaderName::from_static("x-tenant"),
            HeaderValue::from_static("acme")
        )]
    );
    assert_eq!(route.backend, "readers");

    let Some(backend) = config.backend("engines") else {
        panic!("backend engines missing");
    };
    assert_eq!(backend.balance, Balance::RoundRobin);
    assert_eq!(
        backend.hash_key,
        Some(HashKey::Header(HeaderName::from_static("x-workflow-id")))
    );
    assert_eq!(backend.hash_balance_factor, Some(125));
    assert_eq!(backend.protocol, Protocol::Http1);
    assert_eq!(backend.retries, 2);
    assert!(backend.redispatch);
    assert_eq!(backend.max_queue, 1000);
    assert_eq!(backend.timeouts.connect, Duration::from_secs(3));
    assert_eq!(backend.timeouts.response, Duration::from_secs(60));
    assert_eq!(backend.timeouts.idle, Duration::from_secs(90));
    assert_eq!(backend.timeouts.queue, Duration::from_secs(5));
    let health = &backend.health;
    assert_eq!(health.check, CheckKind::Http);
    assert_eq!(health.path, "/health");
    assert_eq!(health.host.as_deref(), Some("engine.internal"));
    assert_eq!(health.expect_status, (200, 399));
    assert_eq!(health.interval, Duration::from_secs(2));
    assert_eq!(health.fast_interval, Duration::from_millis(500));
    assert_eq!(health.down_interval, Duration::from_secs(5));
    assert_eq!(health.timeout, Duration::from_secs(1));
    assert_eq!((health.rise, health.fall), (2, 3));
    let passive = backend
        .passive
        .map(|p| (p.consecutive_failures, p.ejection_time));
    assert_eq!(passive, Some((5, Duration::from_secs(10))));
    let backend_tls = backend
        .tls
        .as_ref()
        .map(|tls| (tls.ca.clone(), tls.server_name.clone()));
    assert_eq!(
        backend_tls,
        Some((
            Some(etc.join("certs/internal-ca.pem")),
            Some("engine.internal".to_string())
        ))
    );
    assert_eq!(backend.servers.len(), 1);
    let server = &backend.servers[0];
    assert_eq!(server.name, "engine-1");
    assert_eq!(server.address, "10.0.0.11:7233");
    assert_eq!(server.addr, addr("10.0.0.11:7233"));
    assert_eq!(server.weight, 1);
    assert!(!server.backup);
    assert_eq!(server.max_connections, 0);
    assert_eq!(server.slow_start, Duration::ZERO);
}

#[test]
fn expect_status_and_sizes_accept_integers() {
    let text = format!(
        "{MINIMAL}\n[frontends.public.limits]\nmax_header_bytes = 32768\n\n[backends.engines.health]\nexpect_status = 204\n"
    );
    let config = parsed(&text, "flowgate.toml");
    assert_eq!(config.frontends[0].limits.max_header_bytes, 32_768);
    assert_eq!(config.backends[0].health.expect_status, (204, 204));
}

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "config/flowgate.toml",
        "config/examples/rest-engines.toml",
        "config/examples/grpc-engines.toml",
        "config/examples/leader-follower.toml",
    ] {
        if let Err(errors) = load(&root.join(file)) {
            panic!("{file} should be valid, got:\n{errors}");
        }
    }
}

#[test]
fn unreadable_file() {
    let Err(errors) = load(Path::new("/nonexistent/flowgate.toml")) else {
        panic!("a missing file must be an error");
    };
    assert_eq!(errors.len(), 1);
    assert!(
        errors
            .to_string()
            .starts_with("/nonexistent/flowgate.toml: ")
    );
}

/// The example from CONTRACT.md as is, but with a real sha256 and the "readers"
/// backend its route names.
const CONTRACT_EXAMPLE: &str = r#"[global]                       # all optional
threads = 0                    # runtime worker threads; 0 = one per core
max_connections = 50000        # all frontends together; past it, accepting pauses
grace_period = "30s"           # stop and removed-listener drain limit
access_log = "stderr"          # "off" | "stderr" | a file path
log_format = "text"            # "text" | "json"
state_file = "/var/lib/flowgate/state.json"  # optional: admin states (drain/maint/weight) survive restarts

[admin]                        # optional; no admin listener when absent
bind = "127.0.0.1:9100"
[[admin.tokens]]               # the API needs "Authorization: Bearer TOKEN"
name = "ops"
role = "operator"              # "viewer": read-only; "operator": may change state and reload
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"   # the token itself never appears in the file

[frontends.public]             # a listener group, named "public"
bind = ["0.0.0.0:8080", "[::]:8080"]
mode = "http"                  # "http" (HTTP/1.1, h2c and, with tls, h2 by ALPN) | "tcp"
backend = "engines"            # where requests go when no route matches
max_connections = 10000        # optional, this frontend alone
allow = ["10.0.0.0/8", "127.0.0.1/32"]   # optional client CIDR allow-list; others are refused
deny = []                      # optional deny-list, checked first
[frontends.public.timeouts]
client_idle = "60s"            # idle keep-alive (http) or idle session (tcp)
request_header = "10s"         # whole request head must arrive in this time (slowloris)
[frontends.public.limits]
max_header_bytes = "64KiB"     # larger request heads get 431
[frontends.public.tls]         # present => TLS is terminated here
certificates = [ { cert = "certs/engine.pem", key = "certs/engine.key" } ]  # chosen by SNI; first is the default
alpn = ["h2", "http/1.1"]
min_version = "1.2"            # "1.2" | "1.3"
client_ca = "certs/clients.pem"  # optional: require client certificates (mTLS)
[[frontends.public.routes]]    # http mode: first match wins
host = "engine.example.com"    # optional exact host (port ignored)
path_prefix = "/api/v1/"       # optional
methods = ["GET", "HEAD"]      # optional
headers = { "X-Tenant" = "acme" }  # optional exact header matches
backend = "readers"

[backends.engines]
balance = "round_robin"        # "round_robin" | "least_conn" | "random" | "p2c" | "source" | "hash" | "first"
hash_key = "header:X-Workflow-Id"  # balance = "hash": "header:NAME" | "cookie:NAME" | "query:NAME" | "path" | "source"
hash_balance_factor = 125      # optional, percent (>100): bounded-load consistent hashing
protocol = "http1"             # to servers: "http1" | "h2" (h2c, or h2 over TLS by ALPN) ; tcp mode ignores it
retries = 2                    # extra attempts on another server after a connect failure
                               # (and after a 502/503/reset for idempotent requests)
redispatch = true              # retries may pick another server
max_queue = 1000               # requests waiting for a server slot (see servers.max_connections)
[backends.engines.timeouts]
connect = "3s"
response = "60s"               # until the response head arrives; long-poll users raise it
idle = "90s"                   # pooled idle server connections are closed after this
queue = "5s"                   # longest wait in the queue, then 503
[backends.engines.health]
check = "http"                 # "none" | "tcp" | "http"
path = "/health"
host = "engine.internal"       # optional Host header for the check
expect_status = "200-399"      # a code, or a range
interval = "2s"                # HAProxy inter
fast_interval = "500ms"        # HAProxy fastinter: while a server is going up or down
down_interval = "5s"           # HAProxy downinter: while a server is down
timeout = "1s"
rise = 2                       # consecutive successes to go up
fall = 3                       # consecutive failures to go down
[backends.engines.passive]     # learn from live traffic too (optional)
consecutive_failures = 5       # connect errors, resets, 502/503/504 from the server
ejection_time = "10s"          # then treat as down for this long (doubled each repeat, capped)
[backends.engines.tls]         # optional: TLS to the servers
ca = "certs/internal-ca.pem"
server_name = "engine.internal"

[[backends.engines.servers]]
name = "engine-1"              # unique in its backend; defaults to the address
address = "10.0.0.11:7233"     # ip:port or host:port (resolved at load and on reload)
weight = 1                     # 0..=256; 0 = takes no new traffic
backup = false                 # used only while no non-backup server is up
max_connections = 0            # concurrent requests (http) or sessions (tcp); 0 = no limit; past it: queue
slow_start = "0s"              # after going up, ramp weight from ~0 to full over this time

[backends.readers]

[[backends.readers.servers]]
address = "10.0.0.21:8080"
"#;

#[test]
fn checks_may_go_to_another_port_in_another_protocol_with_or_without_tls() {
    let root = tempfile::tempdir().expect("tempdir");
    write_pair(&root.path().join("ca.pem"), &root.path().join("ca.key"));
    let config_path = root.path().join("flowgate.toml");
    let with_tls = |health: &str| {
        format!(
            "{}protocol = \"h2\"\n\n[backends.engines.tls]\nca = \"ca.pem\"\n\n[backends.engines.health]\ncheck = \"http\"\n{health}\n[[backends.engines.servers]]\naddress = \"127.0.0.1:7233\"\n",
            MINIMAL.split("[[backends").next().unwrap_or_default()
        )
    };
    let alpn = |config: &Config| {
        let tls = config.backends[0].tls.as_ref().expect("tls");
        let client = tls
            .client
            .as_ref()
            .expect("traffic client")
            .alpn_protocols
            .clone();
        let check = tls.check_client.as_ref().map(|c| c.alpn_protocols.clone());
        (client, check)
    };

    // By default checks speak as the traffic does, on its port.
    let config = parsed(&with_tls(""), &config_path.display().to_string());
    let health = &config.backends[0].health;
    assert_eq!(
        (health.port, health.protocol, health.tls),
        (None, None, None)
    );
    assert_eq!(health.protocol_for(Protocol::H2), Protocol::H2);
    assert_eq!(
        alpn(&config),
        (vec![b"h2".to_vec()], Some(vec![b"h2".to_vec()]))
    );

    // A management port speaking HTTP/1.1 over TLS.
    let config = parsed(
        &with_tls("port = 9600\nprotocol = \"http1\"\n"),
        &config_path.display().to_string(),
    );
    let health = &config.backends[0].health;
    assert_eq!(health.port, Some(9600));
    assert_eq!(health.protocol_for(Protocol::H2), Protocol::Http1);
    assert_eq!(
        alpn(&config),
        (vec![b"h2".to_vec()], Some(vec![b"http/1.1".to_vec()]))
    );

    // ... or plain.
    let config = parsed(
        &with_tls("port = 9600\nprotocol = \"http1\"\ntls = false\n"),
        &config_path.display().to_string(),
    );
    assert_eq!(config.backends[0].health.tls, Some(false));
    assert_eq!(alpn(&config).1, None);
}

#[test]
fn check_port_protocol_and_tls_problems() {
    let text =
        format!("{MINIMAL}[backends.engines.health]\nport = 0\nprotocol = \"h3\"\ntls = true\n");
    assert_eq!(
        errors(&text),
        [
            "flowgate.toml:10:8: backends.engines.health.port: must be between 1 and 65535, got 0",
            r#"flowgate.toml:11:12: backends.engines.health.protocol: invalid value "h3" (expected "http1" or "h2")"#,
            "flowgate.toml:12:7: backends.engines.health.tls: checks speak TLS only to a backend with a tls table (it has the CA and server name to verify with)",
        ]
    );
}

#[test]
fn admin_tls_loads_its_certificates_and_speaks_http1_only() {
    let root = tempfile::tempdir().expect("tempdir");
    write_pair(
        &root.path().join("admin.pem"),
        &root.path().join("admin.key"),
    );
    let path = root.path().join("flowgate.toml");
    let text = |alpn: &str| {
        format!(
            "[admin]\nbind = \"127.0.0.1:9100\"\n\n[admin.tls]\ncertificates = [{{ cert = \"admin.pem\", key = \"admin.key\" }}]\n{alpn}\n{MINIMAL}"
        )
    };
    let config = parsed(&text(""), &path.display().to_string());
    let tls = config
        .admin
        .as_ref()
        .and_then(|admin| admin.tls.as_ref())
        .expect("admin tls");
    assert_eq!(tls.alpn, ["http/1.1"]);
    let server = tls.server.as_ref().expect("loaded");
    assert_eq!(server.alpn_protocols, [b"http/1.1".to_vec()]);
    // A rotated admin certificate is a reload like a frontend's.
    assert_eq!(
        config.referenced_files(),
        [root.path().join("admin.pem"), root.path().join("admin.key")]
    );
    let errors = match parse(&text("alpn = [\"h2\"]"), &path) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    assert_eq!(
        errors,
        [format!(
            r#"{}:6:9: admin.tls.alpn[0]: invalid alpn protocol "h2" (expected "http/1.1")"#,
            path.display()
        )]
    );
}
