//! TLS for the tests: a test PKI generated with rcgen (root and intermediate
//! CAs, server and client certificates with ECDSA and RSA keys written as
//! PKCS#8, PKCS#1 or SEC1 PEM), rustls clients that report what a handshake
//! negotiated, HTTP over such a client connection, and an origin that
//! terminates TLS itself (a server behind `backends.*.tls`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, ProtocolVersion, RootCertStore,
    ServerConfig, SignatureScheme, SupportedProtocolVersion,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::{Body, empty};

/// A throwaway 2048-bit RSA key for test certificates only: ring, the crypto
/// backend here, can sign with RSA keys but cannot generate them.
const RSA_TEST_KEY_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCdsko+s6+t3UY6
xwYTJIIejiDzaneDJfVkklplBxRM2J9/kWVVT8p/pt0kMOUt4mR59fpOG2iW489s
p4pz21NxkQnaF+cr3LfcZaVKfYrl29SGv9npUQWEuREehcO6vmzV4AQCe9SocTXA
2WOWPhlBYrV71Zqt592KpKVqPe0wOh0qfuuQi0mtmiPfL2DMX7zou7syyUl9ji32
CELSy2ALFBfwtt+6bOfps16Rk2pWSK9INF9wLOEZbAc5Qo1zEyyue2xTT399lsqs
rPiPEz1yrDPt3X3cemFVbev1+5F0Xa4ca92kCtYh2gYdF18e+jV5eg0UKUYCcN9Q
xdh/QWT/AgMBAAECggEABSTJSoLz6ljlrzR0se/RQAvkw+vSGs4EfhOkAoLuROoV
RxpH/YtiZd2HKGS2j6jrHBX2OdFSYlxAlMu2NryNsTjzjaXqnWylS/loyyWN1UeM
BsUqkh4EGbsroBzphdArnqJK9IXI1Exfs3r5G5p078QM0A2R7mA6GAlHd/qtyj0z
OFF8B5MVY1J3e6CN/LIAu5WbkJu3DEj/o+0IB3EsUeR/lgHoxMrbTPWONElXJ/zQ
F7Sf20u32qVjGKgv41wjBkFtuCXBuY1tk6YE46RsKiX0JDpZdiliNZYKXn9f/GjZ
+YIGTdw6ArsPK0GObLVjdL6sx+Utcp7LTY1CQzZvoQKBgQDXvWklY7Ijn/3Y+kNd
sgSSys3Y1uku38j2RrWWFlADfLgfOm0WZAUtFsaIstDAQCJQXLbk+G1OHAzW4V4k
Vdik7eGGeIDPoGl/kvPKfgVgiH+LbLKGzuX719PxICXWL5kGHWIRYsziAY3oCaml
QFSpZmq0betvQQAPczj1UHT/TwKBgQC7H/UJ80/AkhQxQUov5ubej1aIop49L6Dm
dXrWrJwfocgYL/tK8zYt5G1GYW37uKnapXdiIHToaZphKKyUHwWhsUxCMrEVGepL
QEDrcU0eHSMAyJBbOm1Z6vMLVlMZTbCH8DBDJayf0pEcAJRyGowjlzc9/r8szhsd
gZb4H6pTUQKBgAqrQkzoDkI2wk39qmEy0YkU4HMtxaBczspnGsnOVqyleVGKCSUH
Uz40lyLhfPNU+J1yyFSweG9ZccUaphYz7J/TZ8jHos8hxrXZZZcI/mkUtwIFIRsL
llILDV8qUNSzy+SChXwIn8s5enQULkCO2uD5wKMloHQDCea5swJmtTJ/AoGBAJKr
Mb1i4Jfn57vTmPqC2WKIpyLhk3YR5uO8IVQyZwzEGbobobPVfhnqeVw48aPj0f52
w2Q+XGPuofqVju9qgVeDSGp6oSIQ9fuVmUzxuaho3g63Ja7b1OotpeK0/t1Ob5ed
Q7bdyLhcqzBvo+rrs/wRglMtYVsVEVvHPzWsXCyBAoGBAKnyOiymKZWKCEAG7bvD
4BbPg6utigxT6eJryUirFcLiv6Fs33BdspvOk0PGHnFkZec+d8zxTyDlmrrE3Mgk
s0HyNHdis9vR65I0bzPR6H9co9GC4JGaW2GPklDaMYlWj5LHEChU30LKRnofHN4E
f5Ds2ytGVa4E7jW5zSzHjib9
-----END PRIVATE KEY-----
";

/// How a certificate's private key is made and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// ECDSA P-256, PKCS#8 `PRIVATE KEY` (what rcgen writes).
    EcdsaPkcs8,
    /// ECDSA P-384, SEC1 `EC PRIVATE KEY` with its curve named (what
    /// `openssl ecparam -genkey` writes).
    EcdsaSec1,
    /// RSA 2048, PKCS#8 `PRIVATE KEY`.
    RsaPkcs8,
    /// RSA 2048, PKCS#1 `RSA PRIVATE KEY` (what `openssl genrsa -traditional`
    /// writes).
    RsaPkcs1,
}

impl KeyFormat {
    /// A key pair to sign with, and its PEM in this format.
    fn key(self) -> (KeyPair, String) {
        match self {
            KeyFormat::EcdsaPkcs8 => {
                let key = KeyPair::generate().expect("P-256 key");
                let pem = key.serialize_pem();
                (key, pem)
            }
            KeyFormat::EcdsaSec1 => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
                let pem = pem("EC PRIVATE KEY", &sec1_from_pkcs8(&key.serialize_der()));
                (key, pem)
            }
            KeyFormat::RsaPkcs8 => (rsa_key(), RSA_TEST_KEY_PKCS8.to_string()),
            KeyFormat::RsaPkcs1 => {
                let key = rsa_key();
                let pem = pem("RSA PRIVATE KEY", &pkcs1_from_pkcs8(&key.serialize_der()));
                (key, pem)
            }
        }
    }
}

fn rsa_key() -> KeyPair {
    KeyPair::from_pem(RSA_TEST_KEY_PKCS8).expect("RSA test key")
}

/// A certificate authority of the test PKI: a root, or an intermediate that
/// a root signed.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Certificates between this CA and its root, this one first (nothing for
    /// a root): what a server sends after its leaf.
    chain: Vec<CertificateDer<'static>>,
}

impl TestCa {
    pub fn root(name: &str) -> TestCa {
        let issuer =
            CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().expect("key"))
                .expect("root CA");
        TestCa {
            issuer,
            chain: Vec::new(),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> TestCa {
        let issuer = CertifiedIssuer::signed_by(
            ca_params(name),
            KeyPair::generate().expect("key"),
            &self.issuer,
        )
        .expect("intermediate CA");
        let mut chain = vec![issuer.der().clone()];
        chain.extend(self.chain.iter().cloned());
        TestCa { issuer, chain }
    }

    /// This CA's own certificate.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes this CA's certificate to `dir/file`.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        write_file(dir, file, &self.pem())
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server_leaf(&self, names: &[&str], format: KeyFormat) -> Leaf {
        self.leaf(names, format, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mTLS) for `name`.
    pub fn client_leaf(&self, name: &str) -> Leaf {
        self.leaf(
            &[name],
            KeyFormat::EcdsaPkcs8,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(&self, names: &[&str], format: KeyFormat, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("leaf names");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let (key, key_pem) = format.key();
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let der = cert.der().clone();
        let mut chain = vec![der.clone()];
        chain.extend(self.chain.iter().cloned());
        Leaf {
            der,
            chain,
            key_pem,
        }
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A leaf certificate, the chain a server (or client) sends with it, and its
/// private key as PEM in the format it was made for.
#[derive(Clone)]
pub struct Leaf {
    /// The leaf alone.
    pub der: CertificateDer<'static>,
    /// The leaf, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
}

impl Leaf {
    /// The certificate file's text: the whole chain, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|cert| pem("CERTIFICATE", cert))
            .collect()
    }

    /// Writes `dir/STEM.pem` (the chain) and `dir/STEM.key`; returns both paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        (
            write_file(dir, &format!("{stem}.pem"), &self.chain_pem()),
            write_file(dir, &format!("{stem}.key"), &self.key_pem),
        )
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM")
    }
}

pub fn write_file(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write test file");
    path
}

/// Replaces `path` the way editors and deploy tools save: a new file renamed
/// over the old one.
pub fn replace_file(path: &Path, text: &str) {
    let temporary = path.with_extension("saving");
    std::fs::write(&temporary, text).expect("write new file");
    std::fs::rename(&temporary, path).expect("rename over old file");
}

// ---- PEM and the little DER needed to rewrap keys ----

fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = Vec::new();
    for chunk in der.chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |bits, (i, &byte)| {
            bits | u32::from(byte) << (16 - 8 * i)
        });
        for i in 0..4 {
            encoded.push(if i <= chunk.len() {
                ALPHABET[(bits >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
    }
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// One DER element.
struct Der<'a> {
    tag: u8,
    contents: &'a [u8],
    /// Tag, length and contents, as found.
    encoded: &'a [u8],
}

/// Splits one DER element off `input`; returns it and what follows it.
fn der_element(input: &[u8]) -> (Der<'_>, &[u8]) {
    let tag = input[0];
    let (length, header) = match input[1] {
        short if short < 0x80 => (usize::from(short), 2),
        long => {
            let count = usize::from(long & 0x7f);
            let length = input[2..2 + count]
                .iter()
                .fold(0usize, |length, &byte| length << 8 | usize::from(byte));
            (length, 2 + count)
        }
    };
    let end = header + length;
    let element = Der {
        tag,
        contents: &input[header..end],
        encoded: &input[..end],
    };
    (element, &input[end..])
}

fn der_encode(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = contents.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes = length.to_be_bytes();
        let skip = bytes.iter().take_while(|&&byte| byte == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// The RSAPrivateKey (PKCS#1) inside a PKCS#8 PrivateKeyInfo.
fn pkcs1_from_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    let (info, _) = der_element(pkcs8);
    let (_version, rest) = der_element(info.contents);
    let (_algorithm, rest) = der_element(rest);
    let (key, _) = der_element(rest);
    assert_eq!(key.tag, 0x04, "PKCS#8 private key is an OCTET STRING");
    key.contents.to_vec()
}

/// The ECPrivateKey (SEC1) inside a PKCS#8 PrivateKeyInfo, with the curve
/// named in its `parameters` as OpenSSL writes it (PKCS#8 keeps the curve in
/// the algorithm identifier instead).
fn sec1_from_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    let (info, _) = der_element(pkcs8);
    let (_version, rest) = der_element(info.contents);
    let (algorithm, rest) = der_element(rest);
    let (_id_ec_public_key, parameters) = der_element(algorithm.contents);
    let (curve, _) = der_element(parameters);
    let (wrapped, _) = der_element(rest);
    let (ec_private_key, _) = der_element(wrapped.contents);
    let (version, rest) = der_element(ec_private_key.contents);
    let (private, rest) = der_element(rest);
    let mut contents = [version.encoded, private.encoded].concat();
    if rest.first() != Some(&0xa0) {
        contents.extend(der_encode(0xa0, curve.encoded));
    }
    contents.extend_from_slice(rest);
    der_encode(0x30, &contents)
}

// ---- Clients ----

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a client is to offer and trust.
pub struct ClientTls<'a> {
    /// CAs trusted for the server's certificate; `None` accepts any
    /// certificate (to look at what the server sends for a name it has no
    /// certificate for).
    pub trust: Option<&'a TestCa>,
    pub alpn: &'a [&'a str],
    pub versions: &'a [&'static SupportedProtocolVersion],
    /// A client certificate to present (mTLS).
    pub identity: Option<&'a Leaf>,
}

impl<'a> ClientTls<'a> {
    /// TLS 1.2 and 1.3, no ALPN, verifying against `ca`.
    pub fn trusting(ca: &'a TestCa) -> ClientTls<'a> {
        ClientTls {
            trust: Some(ca),
            alpn: &[],
            versions: rustls::ALL_VERSIONS,
            identity: None,
        }
    }

    pub fn alpn(self, alpn: &'a [&'a str]) -> ClientTls<'a> {
        ClientTls { alpn, ..self }
    }

    pub fn versions(self, versions: &'a [&'static SupportedProtocolVersion]) -> ClientTls<'a> {
        ClientTls { versions, ..self }
    }

    pub fn identity(self, identity: &'a Leaf) -> ClientTls<'a> {
        ClientTls {
            identity: Some(identity),
            ..self
        }
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)
            .expect("protocol versions");
        let builder = match self.trust {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.der()).expect("trust anchor");
                builder.with_root_certificates(roots)
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider()))),
        };
        let mut config = match self.identity {
            Some(leaf) => builder
                .with_client_auth_cert(leaf.chain.clone(), leaf.private_key())
                .expect("client certificate"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// Accepts any server certificate (signatures are still checked).
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `addr` and completes a TLS handshake for `server_name` (sent as
/// SNI unless the config disables it, or the name is an IP address).
pub async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> Result<TlsStream<TcpStream>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let name = ServerName::try_from(server_name.to_string()).map_err(|err| err.to_string())?;
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, stream),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|err| format!("TLS handshake: {err}"))
}

/// What a client's handshake ended with.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub alpn: Option<String>,
    pub version: Option<ProtocolVersion>,
    pub kind: Option<HandshakeKind>,
    /// What the server sent: its leaf first.
    pub peer_chain: Vec<CertificateDer<'static>>,
}

impl Negotiated {
    pub fn of(stream: &TlsStream<TcpStream>) -> Negotiated {
        let connection = stream.get_ref().1;
        Negotiated {
            alpn: connection
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            version: connection.protocol_version(),
            kind: connection.handshake_kind(),
            peer_chain: connection
                .peer_certificates()
                .map(|certs| certs.iter().map(|cert| cert.clone().into_owned()).collect())
                .unwrap_or_default(),
        }
    }

    /// The leaf certificate the server presented.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        self.peer_chain.first().expect("server sent a certificate")
    }
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

/// An HTTPS client connection: HTTP/1.1, or HTTP/2 when ALPN chose h2.
pub struct HttpsConnection {
    pub negotiated: Negotiated,
    sender: Sender,
}

impl HttpsConnection {
    pub async fn open(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<HttpsConnection, String> {
        let stream = tls_connect(addr, config, server_name).await?;
        let negotiated = Negotiated::of(&stream);
        let io = TokioIo::new(stream);
        let sender = if negotiated.alpn.as_deref() == Some("h2") {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|err| format!("h2 handshake: {err}"))?;
            tokio::spawn(connection);
            Sender::Http2(sender)
        } else {
            let (sender, connection) = http1::handshake(io)
                .await
                .map_err(|err| format!("http1 handshake: {err}"))?;
            tokio::spawn(connection);
            Sender::Http1(sender)
        };
        Ok(HttpsConnection { negotiated, sender })
    }

    /// GET `path` for `host` (the Host header, or the h2 `:authority`); the
    /// status and the body as text.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<(u16, String), String> {
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                let request = Request::get(path)
                    .header(hyper::header::HOST, host)
                    .body(empty())
                    .expect("request");
                sender.ready().await.map_err(|err| err.to_string())?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                let request = Request::get(format!("https://{host}{path}"))
                    .body(empty())
                    .expect("request");
                sender.ready().await.map_err(|err| err.to_string())?;
                sender.send_request(request).await
            }
        }
        .map_err(|err| format!("request: {err}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("body: {err}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One HTTPS GET on a new connection: what was negotiated, the status, the
/// body. Any failure (handshake, alert, closed connection) is an `Err`.
pub async fn https_get(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
    path: &str,
) -> Result<(Negotiated, u16, String), String> {
    let mut connection = HttpsConnection::open(addr, config, server_name).await?;
    let limit = std::time::Duration::from_secs(5);
    let (status, body) = tokio::time::timeout(limit, connection.get(server_name, path))
        .await
        .map_err(|_| "no answer within 5s".to_string())??;
    Ok((connection.negotiated, status, body))
}

// ---- An origin that speaks TLS itself ----

/// A server config for an origin: `leaf` for every name, ALPN `alpn`.
pub fn server_config(leaf: &Leaf, alpn: &[&str]) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.private_key())
        .expect("origin certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A handshake a [`TlsOrigin`] completed: the SNI and ALPN the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub sni: Option<String>,
    pub alpn: Option<String>,
}

/// An origin server that terminates TLS itself (tokio-rustls), then serves
/// HTTP/1.1 or HTTP/2 with `handler`. Records each completed handshake.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub handshakes: Arc<Mutex<Vec<Handshake>>>,
    stop: CancellationToken,
}

impl TlsOrigin {
    pub async fn start<F, Fut>(config: Arc<ServerConfig>, handler: F) -> TlsOrigin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS origin");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let handler = Arc::new(handler);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (seen, token) = (Arc::clone(&handshakes), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                let (acceptor, handler, seen, token) = (
                    acceptor.clone(),
                    Arc::clone(&handler),
                    Arc::clone(&seen),
                    token.clone(),
                );
                tokio::spawn(async move {
                    // A failed handshake (a client that does not trust us) just ends.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let connection = stream.get_ref().1;
                    seen.lock().expect("handshakes").push(Handshake {
                        sni: connection.server_name().map(str::to_string),
                        alpn: connection
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).into_owned()),
                    });
                    let service = service_fn(move |request| {
                        let response = handler(request);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        TlsOrigin {
            addr,
            handshakes,
            stop,
        }
    }

    pub fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().expect("handshakes").clone()
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
