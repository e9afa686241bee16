//! TLS material: the server side of a frontend (certificates chosen by SNI,
//! ALPN, minimum version, client certificates) and the client side towards a
//! backend's servers.
//!
//! Everything is loaded and checked when a config is loaded (so `flowgate
//! check` and a reload report a broken certificate like any other config
//! problem, and a reload keeps the old certificates), then shared as immutable
//! `Arc`s by every handshake.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{self, CertificatePair, Protocol, TlsVersion};

/// Sessions kept for resumption by session id (tickets need no server state).
const SESSION_CACHE: usize = 16 * 1024;

/// Which key of a `tls` table a problem comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSource {
    Certificates,
    /// `certificates[i].cert`
    Cert(usize),
    /// `certificates[i].key`
    Key(usize),
    ClientCa,
    Ca,
    MinVersion,
}

/// A problem with TLS material and the key it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub source: TlsSource,
    pub message: String,
}

impl TlsError {
    /// The key path relative to the `tls` table, e.g. `certificates[1].key`.
    pub fn key(&self) -> String {
        match self.source {
            TlsSource::Certificates => "certificates".to_string(),
            TlsSource::Cert(index) => format!("certificates[{index}].cert"),
            TlsSource::Key(index) => format!("certificates[{index}].key"),
            TlsSource::ClientCa => "client_ca".to_string(),
            TlsSource::Ca => "ca".to_string(),
            TlsSource::MinVersion => "min_version".to_string(),
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key(), self.message)
    }
}

fn error(source: TlsSource, message: impl Into<String>) -> TlsError {
    TlsError {
        source,
        message: message.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

fn protocol_versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::Tls12 => rustls::ALL_VERSIONS,
        TlsVersion::Tls13 => &TLS13_ONLY,
    }
}

/// The server config of a frontend with a `tls` table.
pub fn server_config(tls: &config::FrontendTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let resolver = SniResolver::load(&tls.certificates, &provider)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(protocol_versions(tls.min_version))
        .map_err(|err| error(TlsSource::MinVersion, err.to_string()))?;
    let builder = match &tls.client_ca {
        Some(path) => {
            let (roots, _) =
                load_roots(path).map_err(|message| error(TlsSource::ClientCa, message))?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|err| error(TlsSource::ClientCa, err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|err| error(TlsSource::Certificates, err.to_string()))?;
    Ok(Arc::new(config))
}

/// The client config for a backend with a `tls` table: verifies servers against
/// `ca` (or the system's roots) and offers the ALPN of the backend's protocol.
/// With it, a digest of the CA certificates loaded (0 for the system's roots).
pub fn client_config(
    tls: &config::BackendTls,
    protocol: Protocol,
) -> Result<(Arc<ClientConfig>, u64), TlsError> {
    let provider = provider();
    let mut ca_digest = 0;
    let roots = match &tls.ca {
        Some(path) => {
            let (roots, digest) =
                load_roots(path).map_err(|message| error(TlsSource::Ca, message))?;
            ca_digest = digest;
            roots
        }
        None => {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(error(
                    TlsSource::Ca,
                    "no system root certificates found; set tls.ca",
                ));
            }
            roots
        }
    };
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|err| error(TlsSource::Ca, err.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|err| error(TlsSource::Ca, err.to_string()))?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn(protocol);
    Ok((Arc::new(config), ca_digest))
}

/// The same client side, offering the ALPN of `protocol` instead (health
/// checks in another protocol than the traffic).
pub fn with_alpn(config: &ClientConfig, protocol: Protocol) -> Arc<ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = alpn(protocol);
    Arc::new(config)
}

fn alpn(protocol: Protocol) -> Vec<Vec<u8>> {
    match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::H2 => vec![b"h2".to_vec()],
    }
}

/// The CA certificates in `path`, and a digest of them.
fn load_roots(path: &Path) -> Result<(RootCertStore, u64), String> {
    use std::hash::{Hash, Hasher};
    let mut roots = RootCertStore::empty();
    let mut digest = std::hash::DefaultHasher::new();
    for cert in read_certs(path)? {
        cert.as_ref().hash(&mut digest);
        roots
            .add(cert)
            .map_err(|err| format!("{}: {err}", path.display()))?;
    }
    Ok((roots, digest.finish()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read {}: {}", path.display(), pem_error(&err)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{}: {}", path.display(), pem_error(&err)))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

fn pem_error(err: &rustls::pki_types::pem::Error) -> String {
    match err {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

/// Picks the certificate for a handshake by SNI: an exact name first, then a
/// wildcard (`*.example.com` covers one label), else the first certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn load(pairs: &[CertificatePair], provider: &CryptoProvider) -> Result<SniResolver, TlsError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for (index, pair) in pairs.iter().enumerate() {
            let certs =
                read_certs(&pair.cert).map_err(|message| error(TlsSource::Cert(index), message))?;
            let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|err| {
                let problem = match err {
                    rustls::pki_types::pem::Error::NoItemsFound => "no private key found".into(),
                    other => pem_error(&other),
                };
                error(
                    TlsSource::Key(index),
                    format!("{}: {problem}", pair.key.display()),
                )
            })?;
            let signing_key = provider.key_provider.load_private_key(key).map_err(|err| {
                error(
                    TlsSource::Key(index),
                    format!("{}: {err}", pair.key.display()),
                )
            })?;
            let names: Vec<String> = webpki::EndEntityCert::try_from(&certs[0])
                .map_err(|err| {
                    error(
                        TlsSource::Cert(index),
                        format!("{}: not a valid certificate ({err:?})", pair.cert.display()),
                    )
                })?
                .valid_dns_names()
                .map(str::to_ascii_lowercase)
                .collect();
            let certified = Arc::new(CertifiedKey::new(certs, signing_key));
            certified.keys_match().map_err(|err| {
                error(
                    TlsSource::Key(index),
                    format!(
                        "{}: does not belong to the certificate in {}: {err}",
                        pair.key.display(),
                        pair.cert.display()
                    ),
                )
            })?;
            for name in names {
                // The first certificate naming a host wins, as listed.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name),
                }
                .or_insert_with(|| Arc::clone(&certified));
            }
            default.get_or_insert(certified);
        }
        let default = default.ok_or_else(|| {
            error(
                TlsSource::Certificates,
                "at least one certificate is needed",
            )
        })?;
        Ok(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    fn resolve_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(|name| name.trim_end_matches('.').to_ascii_lowercase()) else {
            return Arc::clone(&self.default);
        };
        if let Some(key) = self.exact.get(&name) {
            return Arc::clone(key);
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .map_or_else(|| Arc::clone(&self.default), Arc::clone)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.resolve_name(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(cert: &Path, key: &Path) -> config::FrontendTls {
        config::FrontendTls {
            certificates: vec![CertificatePair {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }],
            alpn: Vec::new(),
            min_version: TlsVersion::Tls12,
            client_ca: None,
            server: None,
        }
    }

    #[test]
    fn certificate_and_key_problems_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key, other_key) = (
            dir.path().join("engine.pem"),
            dir.path().join("engine.key"),
            dir.path().join("other.key"),
        );
        let generated = rcgen::generate_simple_self_signed(vec!["engine.example.com".to_string()])
            .expect("certificate");
        std::fs::write(&key, generated.signing_key.serialize_pem()).expect("key");
        let other = rcgen::KeyPair::generate().expect("other key");
        std::fs::write(&other_key, other.serialize_pem()).expect("other key");

        // PEM that is no certificate (a broken rotation, say).
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nbm8gY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        )
        .expect("cert");
        let err = server_config(&frontend(&cert, &key)).expect_err("garbage certificate");
        assert_eq!(err.source, TlsSource::Cert(0));
        assert!(
            err.message
                .starts_with(&format!("{}: not a valid certificate", cert.display())),
            "{err}"
        );

        // A key that belongs to another certificate.
        std::fs::write(&cert, generated.cert.pem()).expect("cert");
        let err = server_config(&frontend(&cert, &other_key)).expect_err("mismatched key");
        assert_eq!(err.source, TlsSource::Key(0));
        assert!(
            err.message.starts_with(&format!(
                "{}: does not belong to the certificate in {}",
                other_key.display(),
                cert.display()
            )),
            "{err}"
        );
        // A key file without a key (the certificate given twice, say).
        let err = server_config(&frontend(&cert, &cert)).expect_err("no key");
        assert_eq!(err.source, TlsSource::Key(0));
        assert_eq!(
            err.message,
            format!("{}: no private key found", cert.display())
        );
        assert!(server_config(&frontend(&cert, &key)).is_ok());
    }
}

/// A TCP connection, plain or with TLS on it (`T` is the client or server side
/// of a TLS stream).
#[derive(Debug)]
pub enum MaybeTls<T> {
    Plain(tokio::net::TcpStream),
    Tls(Box<T>),
}

/// The connection to a server.
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
/// A client's connection.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

impl ClientStream {
    /// Ready when the client has sent something (or closed), without reading
    /// it. A TLS stream must hold no decrypted bytes that were not read yet:
    /// true once a read has returned `Pending`.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            MaybeTls::Plain(stream) => stream.poll_read_ready(cx),
            MaybeTls::Tls(stream) => stream.get_ref().0.poll_read_ready(cx),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            MaybeTls::Plain($stream) => $call,
            MaybeTls::Tls($stream) => $call,
        }
    };
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, stream => Pin::new(stream).poll_read(cx, buf))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, stream => Pin::new(stream).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, stream => Pin::new(stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(stream) => stream.is_write_vectored(),
            MaybeTls::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, stream => Pin::new(stream).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, stream => Pin::new(stream).poll_shutdown(cx))
    }
}
