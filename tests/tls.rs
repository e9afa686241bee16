//! TLS through the real proxy, with certificates generated here: termination
//! and ALPN, certificate selection by SNI, key formats and chains, protocol
//! versions, session resumption, client certificates, rotation of the files
//! under the running binary, TLS (and HTTP/2) to the servers, and handshakes
//! that never become a client.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{
    ClientTls, HttpsConnection, KeyFormat, Leaf, TestCa, TlsOrigin, https_get, replace_file,
    server_config, tls_connect,
};
use common::{
    EchoOrigin, FlowgateProcess, Origin, ReadEnd, client, fetch, full, read_until_close,
    server_state, start_proxy,
};
use hyper::Request;
use hyper::body::Incoming;
use rustls::{HandshakeKind, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every single network wait in this file.
const LIMIT: Duration = Duration::from_secs(5);

static TLS12_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

/// `certificates = [...]` for the given (cert, key) files.
fn certificates(pairs: &[(PathBuf, PathBuf)]) -> String {
    let pairs: Vec<String> = pairs
        .iter()
        .map(|(cert, key)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                cert.display(),
                key.display()
            )
        })
        .collect();
    format!("certificates = [{}]", pairs.join(", "))
}

/// An http frontend `web` terminating TLS with `pairs` in front of one plain
/// server. `frontend` is extra TOML for `[frontends.web]` (keys or sub-tables),
/// `tls` extra keys for `[frontends.web.tls]`.
fn https_config(
    pairs: &[(PathBuf, PathBuf)],
    tls: &str,
    frontend: &str,
    server: SocketAddr,
) -> String {
    format!(
        "[frontends.web]\nbind = [\"127.0.0.1:0\"]\nbackend = \"pool\"\n{frontend}\n\n\
         [frontends.web.tls]\n{}\n{tls}\n\n\
         [backends.pool]\n\n\
         [[backends.pool.servers]]\nname = \"s0\"\naddress = \"{server}\"\n",
        certificates(pairs)
    )
}

/// An origin that answers with what it received, as JSON.
async fn seen_origin() -> Origin {
    Origin::start(|request: Request<Incoming>| async move {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let seen = serde_json::json!({
            "version": format!("{:?}", request.version()),
            "host": header("host"),
            "proto": header("x-forwarded-proto"),
            "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
        });
        hyper::Response::new(full(seen.to_string()))
    })
    .await
}

fn seen(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("origin body {body:?}: {err}"))
}

/// A tempdir, a CA and one certificate for `names` written as `web.pem` /
/// `web.key`.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: TestCa::root("flowgate test CA"),
        }
    }

    /// A server certificate for `names`, written as `STEM.pem` / `STEM.key`.
    fn server(&self, stem: &str, names: &[&str], format: KeyFormat) -> (Leaf, (PathBuf, PathBuf)) {
        let leaf = self.ca.server_leaf(names, format);
        let files = leaf.write(self.dir.path(), stem);
        (leaf, files)
    }
}

// ---- Termination and ALPN ----

#[tokio::test]
async fn https_reaches_a_plain_origin_with_alpn_chosen_by_the_client() {
    let pki = Pki::new();
    let (_, files) = pki.server("a", &["a.example.com"], KeyFormat::EcdsaPkcs8);
    let origin = seen_origin().await;
    let proxy = start_proxy(&https_config(
        std::slice::from_ref(&files),
        "",
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    // A client that offers only http/1.1.
    let http1 = ClientTls::trusting(&pki.ca).alpn(&["http/1.1"]).config();
    let (negotiated, status, body) = https_get(addr, &http1, "a.example.com", "/orders?id=7")
        .await
        .expect("HTTPS over HTTP/1.1");
    assert_eq!(negotiated.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(status, 200);
    let at_origin = seen(&body);
    assert_eq!(at_origin["version"], "HTTP/1.1");
    assert_eq!(at_origin["host"], "a.example.com");
    assert_eq!(at_origin["proto"], "https");
    assert_eq!(at_origin["path"], "/orders?id=7");

    // A client that offers h2 first gets h2; the plain HTTP/1.1 origin sees
    // the :authority as Host.
    let h2 = ClientTls::trusting(&pki.ca)
        .alpn(&["h2", "http/1.1"])
        .config();
    let (negotiated, status, body) = https_get(addr, &h2, "a.example.com", "/orders?id=8")
        .await
        .expect("HTTPS over h2");
    assert_eq!(negotiated.alpn.as_deref(), Some("h2"));
    assert_eq!(status, 200);
    let at_origin = seen(&body);
    assert_eq!(
        at_origin["version"], "HTTP/1.1",
        "backend protocol is http1"
    );
    assert_eq!(at_origin["host"], "a.example.com");
    assert_eq!(at_origin["proto"], "https");
    assert_eq!(at_origin["path"], "/orders?id=8");

    // A client that offers no ALPN at all speaks HTTP/1.1.
    let none = ClientTls::trusting(&pki.ca).config();
    let (negotiated, status, _) = https_get(addr, &none, "a.example.com", "/")
        .await
        .expect("HTTPS without ALPN");
    assert_eq!((negotiated.alpn, status), (None, 200));

    // `alpn = ["http/1.1"]` keeps h2 off even for clients that prefer it.
    let proxy = start_proxy(&https_config(
        &[files],
        "alpn = [\"http/1.1\"]",
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    let (negotiated, status, _) = https_get(addr, &h2, "a.example.com", "/")
        .await
        .expect("HTTPS with http/1.1 only");
    assert_eq!(negotiated.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(status, 200);
}

// ---- Certificates: SNI, key formats, chains ----

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_the_first_certificate() {
    let pki = Pki::new();
    let (a, a_files) = pki.server("a", &["a.example.com"], KeyFormat::EcdsaPkcs8);
    let (b, b_files) = pki.server("b", &["b.example.com"], KeyFormat::EcdsaPkcs8);
    let (wild, wild_files) = pki.server("wild", &["*.wild.example.com"], KeyFormat::EcdsaPkcs8);
    let origin = Origin::named("engine").await;
    let proxy = start_proxy(&https_config(
        &[a_files, b_files, wild_files],
        "",
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    // Names a certificate covers: the client verifies the certificate it got.
    let verifying = ClientTls::trusting(&pki.ca).config();
    for (name, expected) in [
        ("a.example.com", &a),
        ("b.example.com", &b),
        ("x.wild.example.com", &wild),
    ] {
        let (negotiated, status, body) = https_get(addr, &verifying, name, "/")
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!((status, body.as_str()), (200, "engine"), "{name}");
        assert!(
            negotiated.leaf() == &expected.der,
            "{name}: wrong certificate"
        );
    }

    // Names no certificate covers get the first one: an unknown name, two
    // labels under a wildcard (a wildcard covers exactly one), the wildcard's
    // own parent. The client accepts anything to see what it was sent.
    let any = ClientTls {
        trust: None,
        ..ClientTls::trusting(&pki.ca)
    }
    .config();
    for name in [
        "unknown.example.org",
        "y.x.wild.example.com",
        "wild.example.com",
    ] {
        let (negotiated, status, _) = https_get(addr, &any, name, "/")
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(status, 200, "{name}");
        assert!(
            negotiated.leaf() == &a.der,
            "{name}: expected the default (first) certificate"
        );
    }

    // No SNI at all: the first certificate too, which verifies as
    // a.example.com.
    let mut no_sni = (*verifying).clone();
    no_sni.enable_sni = false;
    let no_sni = Arc::new(no_sni);
    let (negotiated, status, _) = https_get(addr, &no_sni, "a.example.com", "/")
        .await
        .expect("handshake without SNI");
    assert_eq!(status, 200);
    assert!(negotiated.leaf() == &a.der, "no SNI: expected the default");
}

#[tokio::test]
async fn rsa_and_ecdsa_keys_load_from_pkcs8_pkcs1_and_sec1() {
    let pki = Pki::new();
    let kinds = [
        (
            "rsa-pkcs1.example.com",
            KeyFormat::RsaPkcs1,
            "RSA PRIVATE KEY",
        ),
        ("rsa-pkcs8.example.com", KeyFormat::RsaPkcs8, "PRIVATE KEY"),
        (
            "ec-sec1.example.com",
            KeyFormat::EcdsaSec1,
            "EC PRIVATE KEY",
        ),
        ("ec-pkcs8.example.com", KeyFormat::EcdsaPkcs8, "PRIVATE KEY"),
    ];
    let mut leaves = Vec::new();
    let mut files = Vec::new();
    for (index, (name, format, label)) in kinds.iter().enumerate() {
        let (leaf, pair) = pki.server(&format!("key{index}"), &[name], *format);
        assert!(
            leaf.key_pem
                .starts_with(&format!("-----BEGIN {label}-----\n")),
            "{name}: key written as {label}"
        );
        leaves.push(leaf);
        files.push(pair);
    }
    let origin = Origin::named("engine").await;
    let proxy = start_proxy(&https_config(&files, "", "", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    // Each key signs handshakes of both versions (RSA-PSS and ECDSA in 1.3,
    // ECDHE_RSA and ECDHE_ECDSA suites in 1.2).
    for versions in [&TLS12_ONLY[..], &TLS13_ONLY[..]] {
        let config = ClientTls::trusting(&pki.ca).versions(versions).config();
        for ((name, format, _), leaf) in kinds.iter().zip(&leaves) {
            let (negotiated, status, _) = https_get(addr, &config, name, "/")
                .await
                .unwrap_or_else(|err| panic!("{name} ({format:?}, {versions:?}): {err}"));
            assert_eq!(status, 200, "{name}");
            assert!(negotiated.leaf() == &leaf.der, "{name}: wrong certificate");
        }
    }
}

#[tokio::test]
async fn a_full_chain_is_served_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = TestCa::root("flowgate test root");
    let intermediate = root.intermediate("flowgate test intermediate");
    let leaf = intermediate.server_leaf(&["chain.example.com"], KeyFormat::EcdsaPkcs8);
    assert_eq!(leaf.chain.len(), 2, "the file holds leaf + intermediate");
    let files = leaf.write(dir.path(), "chain");
    let origin = Origin::named("engine").await;
    let proxy = start_proxy(&https_config(&[files], "", "", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    // The client trusts the root only: it needs the intermediate from flowgate.
    let config = ClientTls::trusting(&root).config();
    let (negotiated, status, _) = https_get(addr, &config, "chain.example.com", "/")
        .await
        .expect("chain verifies up to the root");
    assert_eq!(status, 200);
    assert_eq!(negotiated.peer_chain.len(), 2);
    assert!(negotiated.peer_chain[0] == leaf.der);
    assert!(negotiated.peer_chain[1] == intermediate.der());
}

// ---- Protocol versions ----

/// A ClientHello as a client that knows nothing newer than `version` sends it
/// (TLS 1.0 is 0x0301, TLS 1.1 0x0302): no supported_versions extension. Such
/// clients send no signature_algorithms either (it came with TLS 1.2) unless
/// `signature_algorithms` asks for it.
fn legacy_client_hello(version: [u8; 2], signature_algorithms: bool) -> Vec<u8> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&version);
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // no session id
    // ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256 (TLS 1.2),
    // ECDHE-ECDSA-AES128-SHA, ECDHE-RSA-AES128-SHA, AES128-SHA (older)
    let suites = [0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x09, 0xc0, 0x13, 0x00, 0x2f];
    hello.extend_from_slice(&(suites.len() as u16).to_be_bytes());
    hello.extend_from_slice(&suites);
    hello.extend_from_slice(&[1, 0]); // compression: null only
    let mut extensions = vec![
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // groups: x25519, P-256
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
    ];
    if signature_algorithms {
        // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        extensions.extend_from_slice(&[
            0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
        ]);
    }
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend(extensions);
    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Sends `hello` on a new connection; the alert description flowgate answers
/// with (the connection must close after it).
async fn alert_for(addr: SocketAddr, hello: &[u8]) -> u8 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(hello).await.expect("write hello");
    let (answer, end) = read_until_close(&mut stream, LIMIT).await;
    assert_eq!(end, ReadEnd::Closed, "connection closed after the alert");
    // An alert record: type 21, version, length 2, level 2 (fatal), description.
    assert!(
        answer.len() == 7 && answer[0] == 0x15 && answer[3..6] == [0, 2, 2],
        "expected one fatal alert, got {answer:?}"
    );
    answer[6]
}

#[tokio::test]
async fn min_version_refuses_older_clients() {
    let pki = Pki::new();
    let (_, files) = pki.server("web", &["engine.example.com"], KeyFormat::EcdsaPkcs8);
    let origin = Origin::named("engine").await;
    let tls12 = ClientTls::trusting(&pki.ca).versions(&TLS12_ONLY).config();
    let tls13 = ClientTls::trusting(&pki.ca).versions(&TLS13_ONLY).config();

    // The default, "1.2": a TLS 1.2 client is served with TLS 1.2.
    let default = start_proxy(&https_config(
        std::slice::from_ref(&files),
        "",
        "",
        origin.addr,
    ))
    .await;
    let addr = default.local_addr("web").expect("bound");
    let (negotiated, status, _) = https_get(addr, &tls12, "engine.example.com", "/")
        .await
        .expect("TLS 1.2 client with the default min_version");
    assert_eq!(status, 200);
    assert_eq!(negotiated.version, Some(ProtocolVersion::TLSv1_2));

    // TLS 1.0 and 1.1 are never accepted (rustls implements neither). A real
    // client of that age sends no signature_algorithms and gets
    // handshake_failure; one that sends them gets protocol_version. Either
    // way a fatal alert, then the connection closes.
    const HANDSHAKE_FAILURE: u8 = 40;
    const PROTOCOL_VERSION: u8 = 70;
    for (name, version) in [("TLS 1.0", [3, 1]), ("TLS 1.1", [3, 2])] {
        assert_eq!(
            alert_for(addr, &legacy_client_hello(version, false)).await,
            HANDSHAKE_FAILURE,
            "{name}"
        );
        assert_eq!(
            alert_for(addr, &legacy_client_hello(version, true)).await,
            PROTOCOL_VERSION,
            "{name} with signature_algorithms"
        );
    }
    // The same hello saying TLS 1.2 is answered with a ServerHello: the
    // version is what the alert was about.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&legacy_client_hello([3, 3], true))
        .await
        .expect("write hello");
    let mut record = [0u8; 6];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut record))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(
        (record[0], record[5]),
        (0x16, 2),
        "a handshake record with a ServerHello"
    );

    // "1.3": the TLS 1.2-only client is refused, a TLS 1.3 one served.
    let strict = start_proxy(&https_config(
        &[files],
        "min_version = \"1.3\"",
        "",
        origin.addr,
    ))
    .await;
    let addr = strict.local_addr("web").expect("bound");
    let refused = https_get(addr, &tls12, "engine.example.com", "/").await;
    assert!(
        refused.is_err(),
        "TLS 1.2 client served despite min_version = 1.3"
    );
    let (negotiated, status, _) = https_get(addr, &tls13, "engine.example.com", "/")
        .await
        .expect("TLS 1.3 client");
    assert_eq!(status, 200);
    assert_eq!(negotiated.version, Some(ProtocolVersion::TLSv1_3));
}

// ---- Session resumption ----

#[tokio::test]
async fn sessions_resume_on_the_next_connection() {
    let pki = Pki::new();
    let (_, files) = pki.server("web", &["engine.example.com"], KeyFormat::EcdsaPkcs8);
    let origin = Origin::named("engine").await;
    let proxy = start_proxy(&https_config(&[files], "", "", origin.addr)).await;
    let addr = proxy.local_addr("web").expect("bound");

    // TLS 1.3 resumes with tickets, TLS 1.2 with tickets or the session cache.
    for versions in [&TLS13_ONLY[..], &TLS12_ONLY[..]] {
        // One config: it keeps the client's session store between connections.
        let config = ClientTls::trusting(&pki.ca).versions(versions).config();
        let (first, status, _) = https_get(addr, &config, "engine.example.com", "/")
            .await
            .expect("first connection");
        assert_eq!(status, 200);
        assert_eq!(first.kind, Some(HandshakeKind::Full), "{versions:?}");
        let (second, status, _) = https_get(addr, &config, "engine.example.com", "/")
            .await
            .expect("second connection");
        assert_eq!(status, 200);
        assert_eq!(
            second.kind,
            Some(HandshakeKind::Resumed),
            "{versions:?}: second connection resumed"
        );
    }
}

// ---- Client certificates ----

#[tokio::test]
async fn client_ca_requires_a_certificate_signed_by_it() {
    let pki = Pki::new();
    let (_, files) = pki.server("web", &["engine.example.com"], KeyFormat::EcdsaPkcs8);
    let clients = TestCa::root("flowgate test clients CA");
    let other = TestCa::root("some other CA");
    let client_ca = clients.write(pki.dir.path(), "clients.pem");
    let origin = Origin::named("engine").await;
    let proxy = start_proxy(&https_config(
        &[files],
        &format!("client_ca = \"{}\"", client_ca.display()),
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");

    let trusted = clients.client_leaf("worker-1");
    let config = ClientTls::trusting(&pki.ca).identity(&trusted).config();
    let (_, status, body) = https_get(addr, &config, "engine.example.com", "/")
        .await
        .expect("client with a certificate from client_ca");
    assert_eq!((status, body.as_str()), (200, "engine"));

    // Without a certificate, or with one from another CA, no request gets
    // through (TLS 1.3 reports it on the first read, after the handshake).
    let anonymous = ClientTls::trusting(&pki.ca).config();
    let stranger = other.client_leaf("worker-2");
    let foreign = ClientTls::trusting(&pki.ca).identity(&stranger).config();
    for (who, config) in [("no certificate", &anonymous), ("other CA", &foreign)] {
        let result = https_get(addr, config, "engine.example.com", "/").await;
        assert!(result.is_err(), "{who}: served {result:?}");
    }
    // With TLS 1.2 the handshake itself fails.
    let anonymous12 = ClientTls::trusting(&pki.ca).versions(&TLS12_ONLY).config();
    assert!(
        tls_connect(addr, &anonymous12, "engine.example.com")
            .await
            .is_err(),
        "TLS 1.2 handshake without a client certificate completed"
    );
    assert_eq!(
        origin.count(),
        1,
        "only the trusted client reached the origin"
    );
}

// ---- Rotation under the running binary ----

/// Opens new connections until one is served `expected`, for at most `limit`.
async fn wait_for_certificate(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    expected: &Leaf,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok((negotiated, 200, _)) = https_get(addr, config, "engine.example.com", "/").await
            && negotiated.leaf() == &expected.der
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new handshakes did not get the new certificate within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_files_reach_new_handshakes_only() {
    let pki = Pki::new();
    let (old, (cert, key)) = pki.server("web", &["engine.example.com"], KeyFormat::EcdsaPkcs8);
    let origin = Origin::named("engine").await;
    let flowgate = FlowgateProcess::run(&https_config(
        &[(cert.clone(), key.clone())],
        "",
        "",
        origin.addr,
    ));
    let addr = flowgate.frontend_addr("web").await;
    let config = ClientTls::trusting(&pki.ca).alpn(&["http/1.1"]).config();

    // A keep-alive connection opened before the rotation.
    let mut open = HttpsConnection::open(addr, &config, "engine.example.com")
        .await
        .expect("connection before rotation");
    assert!(open.negotiated.leaf() == &old.der);
    assert_eq!(
        open.get("engine.example.com", "/").await.expect("request"),
        (200, "engine".to_string())
    );

    // Rename-save a new certificate and key: new handshakes get it.
    let new = pki
        .ca
        .server_leaf(&["engine.example.com"], KeyFormat::EcdsaPkcs8);
    replace_file(&cert, &new.chain_pem());
    replace_file(&key, &new.key_pem);
    wait_for_certificate(addr, &config, &new, Duration::from_secs(10)).await;
    // The connection opened before goes on with its own session.
    assert_eq!(
        open.get("engine.example.com", "/")
            .await
            .expect("request on the connection opened before"),
        (200, "engine".to_string())
    );

    // A broken certificate file: the reload fails at that file and the
    // certificate in use stays.
    let seen_lines = flowgate.log().len();
    replace_file(
        &cert,
        "-----BEGIN CERTIFICATE-----\nthis is no certificate\n-----END CERTIFICATE-----\n",
    );
    let path = cert.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !flowgate.log()[seen_lines..].iter().any(|line| {
        line.contains("reload failed")
            && line.contains("frontends.web.tls.certificates[0].cert")
            && line.contains(&path)
    }) {
        assert!(
            Instant::now() < deadline,
            "no \"reload failed\" line naming {path}; log:\n{}",
            flowgate.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (negotiated, status, _) = https_get(addr, &config, "engine.example.com", "/")
        .await
        .expect("served after the failed reload");
    assert_eq!(status, 200);
    assert!(
        negotiated.leaf() == &new.der,
        "the last good certificate is kept"
    );
    assert_eq!(
        open.get("engine.example.com", "/")
            .await
            .expect("the old connection still works"),
        (200, "engine".to_string())
    );
}

// ---- TLS to the servers ----

/// An origin terminating TLS with `leaf`, answering with the HTTP version it
/// received.
async fn tls_engine(leaf: &Leaf) -> TlsOrigin {
    TlsOrigin::start(
        server_config(leaf, &["h2", "http/1.1"]),
        |request: Request<Incoming>| async move {
            hyper::Response::new(full(format!("{:?}", request.version())))
        },
    )
    .await
}

/// A frontend `NAME` (plain http) in front of backend `NAME` with one server
/// at `server`; `backend` is extra TOML for `[backends.NAME]` and its tables.
fn plain_pair(name: &str, server: SocketAddr, backend: &str) -> String {
    format!(
        "[frontends.{name}]\nbind = [\"127.0.0.1:0\"]\nbackend = \"{name}\"\n\n\
         [backends.{name}]\n{backend}\n\n\
         [[backends.{name}.servers]]\nname = \"s0\"\naddress = \"{server}\"\n\n"
    )
}

#[tokio::test]
async fn tls_to_servers_verifies_the_ca_and_the_server_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let internal = TestCa::root("internal CA");
    let other = TestCa::root("other CA");
    let ca = internal.write(dir.path(), "internal.pem");
    let other_ca = other.write(dir.path(), "other.pem");
    let engine =
        tls_engine(&internal.server_leaf(&["engine.internal"], KeyFormat::EcdsaPkcs8)).await;
    let tls = |ca: &PathBuf, name: &str| {
        format!(
            "[backends.NAME.tls]\nca = \"{}\"\nserver_name = \"{name}\"\n",
            ca.display()
        )
    };
    let pair = |name: &str, check: &str, tls: String| {
        plain_pair(
            name,
            engine.addr,
            &format!(
                "[backends.{name}.health]\ncheck = \"{check}\"\n\n{}",
                tls.replace("NAME", name)
            ),
        )
    };
    let config = [
        pair("good", "tcp", tls(&ca, "engine.internal")),
        pair("wrongname", "none", tls(&ca, "wrong.internal")),
        pair("wrongca", "none", tls(&other_ca, "engine.internal")),
        pair("checked", "tcp", tls(&ca, "wrong.internal")),
    ]
    .concat();
    let proxy = start_proxy(&config).await;
    let http = client();

    // The right CA and name: requests pass, the check is a TLS handshake,
    // and the server saw the configured name as SNI.
    let good = proxy.local_addr("good").expect("bound");
    assert_eq!(fetch(&http, good, "/").await, (200, "HTTP/1.1".to_string()));
    let check = server_state(&proxy, "good", 0).check_status();
    assert_eq!(
        (check.status, check.detail.as_str()),
        ("ok", "TLS handshake")
    );
    let handshakes = engine.handshakes();
    assert!(!handshakes.is_empty());
    assert!(
        handshakes
            .iter()
            .all(|h| h.sni.as_deref() == Some("engine.internal")
                && h.alpn.as_deref() == Some("http/1.1")),
        "{handshakes:?}"
    );

    // A name the certificate does not cover, or an untrusted CA: 502.
    for frontend in ["wrongname", "wrongca"] {
        let addr = proxy.local_addr(frontend).expect("bound");
        let (status, _) = fetch(&http, addr, "/").await;
        assert_eq!(status, 502, "{frontend}");
    }

    // With checks on, the same mismatch keeps the server down: 503.
    let state = server_state(&proxy, "checked", 0);
    let check = state.check_status();
    assert_eq!(state.health(), flowgate::upstream::Health::Down);
    assert!(
        check.detail.starts_with("TLS handshake failed"),
        "check detail: {}",
        check.detail
    );
    let checked = proxy.local_addr("checked").expect("bound");
    assert_eq!(fetch(&http, checked, "/").await.0, 503);
}

#[tokio::test]
async fn tls_to_servers_names_the_address_host_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let internal = TestCa::root("internal CA");
    let ca = internal.write(dir.path(), "internal.pem");
    // A certificate for the IP address the server is configured with.
    let engine = tls_engine(&internal.server_leaf(&["127.0.0.1"], KeyFormat::EcdsaPkcs8)).await;
    let proxy = start_proxy(&plain_pair(
        "web",
        engine.addr,
        &format!("[backends.web.tls]\nca = \"{}\"\n", ca.display()),
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    assert_eq!(
        fetch(&client(), addr, "/").await,
        (200, "HTTP/1.1".to_string())
    );
    // An IP address is verified against the certificate but never sent as SNI.
    assert!(engine.handshakes().iter().all(|h| h.sni.is_none()));
}

/// A TLS engine for engine.internal behind a proxy that speaks h2 to it over
/// TLS and checks it with HTTP checks; `health` adds keys to the check table.
/// The directory holds the CA file the proxy verifies with.
async fn h2_over_tls_to(
    health: &str,
) -> (tempfile::TempDir, TlsOrigin, flowgate::supervisor::Proxy) {
    let dir = tempfile::tempdir().expect("tempdir");
    let internal = TestCa::root("internal CA");
    let ca = internal.write(dir.path(), "internal.pem");
    let engine =
        tls_engine(&internal.server_leaf(&["engine.internal"], KeyFormat::EcdsaPkcs8)).await;
    let proxy = start_proxy(&plain_pair(
        "web",
        engine.addr,
        &format!(
            "protocol = \"h2\"\n\n\
             [backends.web.health]\ncheck = \"http\"\npath = \"/health\"\n{health}\n\
             [backends.web.tls]\nca = \"{}\"\nserver_name = \"engine.internal\"\n",
            ca.display()
        ),
    ))
    .await;
    (dir, engine, proxy)
}

#[tokio::test]
async fn h2_to_servers_over_tls_is_negotiated_by_alpn() {
    let (_dir, engine, proxy) = h2_over_tls_to("").await;
    // The HTTP check went over TLS with h2 too.
    let check = server_state(&proxy, "web", 0).check_status();
    assert_eq!((check.status, check.detail.as_str()), ("ok", "HTTP 200"));

    let addr = proxy.local_addr("web").expect("bound");
    let http = client();
    for _ in 0..3 {
        assert_eq!(fetch(&http, addr, "/").await, (200, "HTTP/2.0".to_string()));
    }
    let handshakes = engine.handshakes();
    assert!(
        handshakes
            .iter()
            .all(|h| h.alpn.as_deref() == Some("h2")
                && h.sni.as_deref() == Some("engine.internal")),
        "{handshakes:?}"
    );
}

#[tokio::test]
async fn checks_over_tls_offer_the_alpn_of_their_own_protocol() {
    // Traffic in h2, checks in HTTP/1.1, both over TLS to the same port.
    let (_dir, engine, proxy) = h2_over_tls_to("protocol = \"http1\"\n").await;
    let check = server_state(&proxy, "web", 0).check_status();
    assert_eq!((check.status, check.detail.as_str()), ("ok", "HTTP 200"));
    let addr = proxy.local_addr("web").expect("bound");
    assert_eq!(
        fetch(&client(), addr, "/").await,
        (200, "HTTP/2.0".to_string())
    );
    let alpn: Vec<Option<String>> = engine.handshakes().into_iter().map(|h| h.alpn).collect();
    assert_eq!(
        alpn[0].as_deref(),
        Some("http/1.1"),
        "the first check: {alpn:?}"
    );
    assert!(
        alpn.contains(&Some("h2".to_string())),
        "the traffic: {alpn:?}"
    );
}

#[tokio::test]
async fn pooled_tls_connections_outlive_a_reload_that_keeps_the_tls_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let internal = TestCa::root("internal CA");
    let ca = internal.write(dir.path(), "internal.pem");
    let engine = tls_engine(&internal.server_leaf(
        &["engine.internal", "engine.example.com"],
        KeyFormat::EcdsaPkcs8,
    ))
    .await;
    let config = |server_name: &str| {
        plain_pair(
            "web",
            engine.addr,
            &format!(
                "[backends.web.health]\ncheck = \"none\"\n\n\
                 [backends.web.tls]\nca = \"{}\"\nserver_name = \"{server_name}\"\n",
                ca.display()
            ),
        )
    };
    let parse = |text: &str| {
        flowgate::config::parse(text, std::path::Path::new("test.toml"))
            .unwrap_or_else(|errors| panic!("{errors}"))
    };
    let mut proxy = start_proxy(&config("engine.internal")).await;
    let addr = proxy.local_addr("web").expect("bound");
    let http = client();
    assert_eq!(fetch(&http, addr, "/").await.0, 200);
    assert_eq!(engine.handshakes().len(), 1);

    // The same file again (a new client config, from the same CA): the pooled
    // connection carries the next request.
    proxy
        .reload(parse(&config("engine.internal")))
        .await
        .expect("reload");
    assert_eq!(fetch(&http, addr, "/").await.0, 200);
    assert_eq!(engine.handshakes().len(), 1, "no new handshake");

    // Another server name is another TLS identity: a new connection.
    proxy
        .reload(parse(&config("engine.example.com")))
        .await
        .expect("reload");
    assert_eq!(fetch(&http, addr, "/").await.0, 200);
    let handshakes = engine.handshakes();
    assert_eq!(handshakes.len(), 2, "{handshakes:?}");
    assert_eq!(handshakes[1].sni.as_deref(), Some("engine.example.com"));
}

// ---- Hostile handshakes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_are_closed_and_disturb_no_one() {
    let pki = Pki::new();
    let (_, files) = pki.server("web", &["engine.example.com"], KeyFormat::EcdsaPkcs8);
    let origin = Origin::named("engine").await;
    let proxy = start_proxy(&https_config(
        &[files],
        "",
        "[frontends.web.timeouts]\nrequest_header = \"500ms\"\n",
        origin.addr,
    ))
    .await;
    let addr = proxy.local_addr("web").expect("bound");
    let config = ClientTls::trusting(&pki.ca).config();

    // A client that connects and says nothing, and one that stops in the
    // middle of its ClientHello.
    let silent_since = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut partial = TcpStream::connect(addr).await.expect("connect");
    let hello = legacy_client_hello([3, 3], true);
    partial.write_all(&hello[..20]).await.expect("write");

    // Garbage instead of a ClientHello, and plaintext HTTP on the TLS port:
    // closed at once (after an alert at most), never an HTTP answer.
    for (what, bytes) in [
        (
            "garbage",
            &b"\x00\xff\x13garbage garbage garbage\r\n\r\n"[..],
        ),
        (
            "plaintext HTTP",
            &b"GET / HTTP/1.1\r\nHost: engine.example.com\r\n\r\n"[..],
        ),
    ] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(bytes).await.expect("write");
        let (answer, end) = read_until_close(&mut stream, LIMIT).await;
        assert_eq!(end, ReadEnd::Closed, "{what}: closed");
        assert!(
            !String::from_utf8_lossy(&answer).contains("HTTP/1.1"),
            "{what}: answered {answer:?}"
        );
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{what}: expected nothing or a TLS alert, got {answer:?}"
        );
    }

    // Meanwhile a real client is served.
    let (_, status, body) = https_get(addr, &config, "engine.example.com", "/")
        .await
        .expect("served beside hostile connections");
    assert_eq!((status, body.as_str()), (200, "engine"));

    // The silent and the partial clients are closed after request_header.
    for (what, stream) in [("silent", &mut silent), ("partial hello", &mut partial)] {
        let (answer, end) = read_until_close(stream, LIMIT).await;
        assert_eq!(end, ReadEnd::Closed, "{what}: closed");
        assert!(answer.is_empty(), "{what}: sent {answer:?}");
    }
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "closed after {waited:?}, request_header is 500ms"
    );
    assert_eq!(origin.count(), 1, "only the real client reached the origin");
    // Each hostile client is one failed handshake in the frontend's metric.
    let stats = Arc::clone(
        &proxy
            .runtime()
            .load()
            .frontend("web")
            .expect("frontend")
            .stats,
    );
    common::wait_until(LIMIT, "4 failed handshakes counted", || {
        stats
            .tls_handshake_failures
            .load(std::sync::atomic::Ordering::SeqCst)
            == 4
    })
    .await;
}

// ---- tcp mode ----

#[tokio::test]
async fn tcp_mode_terminates_tls_and_forwards_plain_bytes() {
    let pki = Pki::new();
    let (_, files) = pki.server("raw", &["tchannel.example.com"], KeyFormat::EcdsaPkcs8);
    let echo = EchoOrigin::start().await;
    let proxy = start_proxy(&format!(
        "[frontends.raw]\nbind = [\"127.0.0.1:0\"]\nmode = \"tcp\"\nbackend = \"echo\"\n\n\
         [frontends.raw.tls]\n{}\n\n\
         [backends.echo]\n\n[backends.echo.health]\ncheck = \"none\"\n\n\
         [[backends.echo.servers]]\nname = \"s0\"\naddress = \"{}\"\n",
        certificates(&[files]),
        echo.addr
    ))
    .await;
    let addr = proxy.local_addr("raw").expect("bound");
    let config = ClientTls::trusting(&pki.ca).config();
    let mut stream = tls_connect(addr, &config, "tchannel.example.com")
        .await
        .expect("TLS handshake");
    stream.write_all(b"ping over tls").await.expect("write");
    let mut echoed = [0u8; 13];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echoed, b"ping over tls");
    // The client's close_notify ends the session at the server too.
    stream.shutdown().await.expect("close");
    let (rest, end) = read_until_close(&mut stream, LIMIT).await;
    assert_eq!((rest.len(), end), (0, ReadEnd::Closed));
    common::wait_until(LIMIT, "the echo session to end", || echo.count() == 1).await;
}
