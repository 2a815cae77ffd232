//! TLS termination: the `--tls-cert`/`--tls-key` PEM files, read and checked at startup, served
//! with rustls (the `ring` provider) offering ALPN `h2` and `http/1.1`, and reloaded when the
//! files change. Each handshake asks [`Certs`] for the certificate of the moment, so a reload
//! changes what new handshakes present and never touches a connection already open. A reload
//! that fails (a half-written file, a key that does not match) keeps the current certificate.
//! Design and why: `docs/tls.md`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsFiles;

/// How often the watcher reads the two files to see whether they changed.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// The protocols offered by ALPN, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate and key could not be loaded. The message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS {what} file {path}: {problem}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("TLS key file {key} does not match the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

const CERT: &str = "certificate";
const KEY: &str = "key";

fn invalid(what: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The two files' contents, certificate first.
type Contents = (Vec<u8>, Vec<u8>);

fn read_both(files: &TlsFiles) -> Result<Contents, TlsError> {
    Ok((read(CERT, &files.cert)?, read(KEY, &files.key)?))
}

/// Checks that the files' contents make a usable pair: at least one certificate, a private
/// key of a kind the provider signs with, and that key being the first certificate's. Errors
/// name the file.
fn parse(
    files: &TlsFiles,
    (cert_pem, key_pem): &Contents,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(CERT, &files.cert, format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(
            CERT,
            &files.cert,
            "no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks, the \
             server's own certificate first)",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid(
            KEY,
            &files.key,
            "no private key in it (expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or \
             `EC PRIVATE KEY` block)",
        ),
        e => invalid(KEY, &files.key, format!("not valid PEM: {e}")),
    })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(KEY, &files.key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        // The provider cannot tell this key's public half: nothing to compare (rustls's own
        // `CertifiedKey::from_der` accepts it too). ring's keys always can.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err(invalid(
            CERT,
            &files.cert,
            format!("the first certificate cannot be parsed: {e}"),
        )),
    }
}

/// The certificate new handshakes present: read under a lock held only to clone an `Arc`
/// (never across an await), swapped whole by a reload.
#[derive(Debug)]
pub struct Certs {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    fn new(first: CertifiedKey) -> Certs {
        Certs {
            current: RwLock::new(Arc::new(first)),
        }
    }

    /// The certificate and key of the moment.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, next: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What the watcher last found in the files.
#[derive(PartialEq, Eq)]
enum Seen {
    Contents(Contents),
    /// Either file could not be read (it may be being replaced); reported once.
    Unreadable,
}

/// A TLS listener's configuration: the acceptor every event loop shares, and the reloadable
/// certificate behind it.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    certs: Arc<Certs>,
    acceptor: TlsAcceptor,
    /// What the files held when last loaded (or tried).
    seen: std::sync::Mutex<Seen>,
}

impl Tls {
    /// Loads and checks the files; an error names the file and what is wrong with it.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let contents = read_both(files)?;
        let first = parse(files, &contents, &provider)?;
        let certs = Arc::new(Certs::new(first));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            files: files.clone(),
            provider,
            certs,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            seen: std::sync::Mutex::new(Seen::Contents(contents)),
        })
    }

    /// What accepts TLS connections with the current certificate (cheap to clone: an `Arc`).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The certificate new handshakes present.
    pub fn certs(&self) -> &Arc<Certs> {
        &self.certs
    }

    /// Reads the files and, if either changed since they were last loaded (or tried), loads
    /// them: `None` if nothing changed, else whether new handshakes now present the new pair
    /// (on an error the current certificate stays). A failed reload is not retried until a
    /// file changes again; an unreadable file is reported once until it is readable again.
    ///
    /// The contents are compared, not the files' size and modification time: a file
    /// rewritten with a certificate of the same length within one tick of the kernel's coarse
    /// clock (a few milliseconds) keeps both. Two reads of a few KiB a second cost nothing.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let read = read_both(&self.files);
        let now = match &read {
            Ok(contents) => Seen::Contents(contents.clone()),
            Err(_) => Seen::Unreadable,
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return None;
            }
            *seen = now;
        }
        Some(read.and_then(|contents| {
            let next = parse(&self.files, &contents, &self.provider)?;
            self.certs.replace(next);
            Ok(())
        }))
    }

    /// Polls the files every `every` until `shutdown`, reloading on change; logs each reload
    /// and each failure (which keeps the current certificate).
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed() {
                None => {}
                Some(Ok(())) => tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS certificate reloaded; new connections use it"
                ),
                Some(Err(e)) => tracing::warn!(
                    error = %e,
                    "TLS certificate reload failed; keeping the current certificate"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        cert: String,
        key: String,
        der: Vec<u8>,
    }

    fn self_signed(name: &str) -> Pair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn write(dir: &Path, pair: &Pair) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, &pair.cert).unwrap();
        std::fs::write(&files.key, &pair.key).unwrap();
        files
    }

    fn leaf_der(certs: &Certs) -> Vec<u8> {
        certs.current().cert[0].to_vec()
    }

    #[test]
    fn a_valid_pair_loads_and_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = self_signed("localhost");
        let files = write(dir.path(), &good);
        Tls::load(&files).expect("a valid pair loads");

        let other = self_signed("other");
        std::fs::write(&files.key, &other.key).unwrap();
        let err = Tls::load(&files).err().unwrap();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");

        std::fs::write(&files.cert, "not a certificate\n").unwrap();
        let err = Tls::load(&files).err().unwrap().to_string();
        assert!(
            err.contains("cert.pem") && err.contains("no certificate"),
            "{err}"
        );

        std::fs::write(&files.cert, &good.cert).unwrap();
        std::fs::write(&files.key, &good.cert).unwrap();
        let err = Tls::load(&files).err().unwrap().to_string();
        assert!(
            err.contains("key.pem") && err.contains("no private key"),
            "{err}"
        );

        std::fs::write(
            &files.key,
            "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = Tls::load(&files).err().unwrap().to_string();
        assert!(
            err.contains("key.pem") && err.contains("not valid PEM"),
            "{err}"
        );

        std::fs::remove_file(&files.key).unwrap();
        let err = Tls::load(&files).err().unwrap().to_string();
        assert!(err.contains("cannot read TLS key file"), "{err}");
    }

    #[test]
    fn a_reload_swaps_the_certificate_only_when_the_new_pair_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let first = self_signed("localhost");
        let files = write(dir.path(), &first);
        let tls = Tls::load(&files).unwrap();
        let before = leaf_der(tls.certs());
        assert!(tls.reload_if_changed().is_none(), "nothing changed yet");

        // Half-way through a replacement: a new certificate, the old key.
        let second = self_signed("localhost");
        std::fs::write(&files.cert, &second.cert).unwrap();
        let failed = tls
            .reload_if_changed()
            .expect("the certificate file changed");
        assert!(matches!(failed, Err(TlsError::Mismatch { .. })));
        assert_eq!(leaf_der(tls.certs()), before, "the old certificate stays");
        assert!(tls.reload_if_changed().is_none(), "not retried unchanged");

        std::fs::write(&files.key, &second.key).unwrap();
        tls.reload_if_changed()
            .expect("the key file changed")
            .expect("the new pair loads");
        assert_eq!(leaf_der(tls.certs()), second.der);
    }
}
