//! TLS for tests: a throwaway certificate authority (rcgen) issuing server certificates for
//! `localhost` and 127.0.0.1, the files a gateway is started with, and a real TLS client
//! (tokio-rustls) that trusts only that authority.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sandgate::config::TlsFiles;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use rustls::pki_types::{CertificateDer, ServerName};

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// A server certificate and its key, as PEM (what the gateway reads) and DER (what a client
/// sees in the handshake).
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sandgate test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `localhost` and 127.0.0.1 with common name `cn` (a fresh key and
    /// serial number each time).
    pub fn issue(&self, cn: &str) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// The authority's certificate, PEM (for `curl --cacert`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A client that trusts this authority only, offers `alpn` (none if empty), and never
    /// resumes a session, so that every handshake shows the server's certificate of the moment.
    pub fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(config))
    }
}

/// A CA, a server certificate it issued, and the files holding that certificate (and the CA's,
/// for curl) in a directory of the test's own.
pub struct CertDir {
    pub ca: TestCa,
    pub files: TlsFiles,
    pub leaf: Leaf,
    dir: tempfile::TempDir,
}

impl CertDir {
    pub fn new() -> CertDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let leaf = ca.issue("sandgate test server 1");
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write the CA file");
        let certs = CertDir {
            ca,
            files,
            leaf,
            dir,
        };
        certs.install(&certs.leaf);
        certs
    }

    /// Overwrites the certificate and key files (in place, certificate first) with `leaf`.
    pub fn install(&self, leaf: &Leaf) {
        std::fs::write(&self.files.cert, &leaf.cert_pem).expect("write the certificate file");
        std::fs::write(&self.files.key, &leaf.key_pem).expect("write the key file");
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A client trusting the CA, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        self.ca.connector(alpn)
    }
}

/// A TLS connection to `addr`, verified for the name `localhost`.
pub async fn connect(addr: SocketAddr, tls: &TlsConnector) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let name = ServerName::try_from("localhost").expect("server name");
    tls.connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))
}

/// The server's certificate (DER) and the protocol ALPN agreed on a connection.
pub fn handshake_facts(stream: &TlsStream<TcpStream>) -> (Vec<u8>, Option<Vec<u8>>) {
    let (_, conn) = stream.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("the server presented a certificate");
    (leaf, conn.alpn_protocol().map(|p| p.to_vec()))
}

/// One side of a hyper client connection over TLS: HTTP/2 if ALPN agreed on `h2`, else
/// HTTP/1.1.
pub enum Sender<B> {
    H1(hyper::client::conn::http1::SendRequest<B>),
    H2(hyper::client::conn::http2::SendRequest<B>),
}

impl<B> Sender<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Starts hyper's client on `stream` (its connection task runs in the background).
    pub async fn handshake(stream: TlsStream<TcpStream>) -> Result<Sender<B>, String> {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        if h2 {
            let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(Sender::H2(tx))
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
            tokio::spawn(conn.with_upgrades());
            Ok(Sender::H1(tx))
        }
    }

    pub async fn send(&mut self, req: Request<B>) -> Result<Response<Incoming>, String> {
        match self {
            Sender::H1(tx) => {
                tx.ready().await.map_err(|e| format!("connection: {e}"))?;
                tx.send_request(req).await
            }
            Sender::H2(tx) => tx.send_request(req).await,
        }
        .map_err(|e| format!("request: {e}"))
    }
}

/// Sends one request on a fresh TLS connection to `addr`.
pub async fn send_request<B>(
    addr: SocketAddr,
    tls: &TlsConnector,
    req: Request<B>,
) -> Result<Response<Incoming>, String>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = connect(addr, tls).await?;
    Sender::handshake(stream).await?.send(req).await
}
