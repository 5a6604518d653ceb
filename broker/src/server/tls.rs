//! TLS for client connections (rustls, ring provider), with certificates that reload without a
//! restart.
//!
//! - `--tls-cert` and `--tls-key` (PEM: the certificate chain, leaf first; a PKCS#8, PKCS#1 or
//!   SEC1 private key) turn TLS on for the client port: every connection must complete a TLS
//!   handshake (ALPN `h2`) within the HTTP/2 handshake deadline; a plain-text client gets its
//!   connection closed (it sees a protocol error, not a hang).
//! - `--tls-client-ca` (PEM, one or more CA certificates) requires a client certificate signed
//!   by one of them (mutual TLS); the certificate's subject common name (else its whole subject)
//!   becomes the connection's principal ([`TlsInfo::principal`]).
//! - The metrics port (`/metrics`) serves the same certificate (ALPN `http/1.1`), and asks for
//!   a client certificate the same way.
//! - [`Tls::reload`] (on SIGHUP) reads the three files again and swaps them in for new
//!   connections; open ones keep theirs. A reload that fails (a missing file, a key that does
//!   not match, a PEM that does not parse) is logged and changes nothing.
//!
//! It may call `config` and `error`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

pub use crate::config::TlsFiles;

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind wanted.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration (a key that does not match the certificate, ...).
    #[error("TLS settings refused: {0}")]
    Rustls(String),
}

/// What a connection's TLS handshake established.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The client certificate's principal (mutual TLS), if one was presented.
    pub principal: Option<String>,
}

/// The server's TLS state: the acceptor of new connections, swapped on reload.
pub struct Tls {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    /// For the client port (ALPN `h2`) and the metrics port (ALPN `http/1.1`).
    acceptors: parking_lot::RwLock<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver {
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: format!("not a PEM certificate list: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: "holds no certificate (expected `-----BEGIN CERTIFICATE-----`)".into(),
        });
    }
    Ok(certs)
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certificates(&files.cert)?;
    let pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        message: format!("holds no private key in PEM (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        TlsError::Rustls(format!(
            "{} with {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    Ok(Arc::new(key))
}

fn acceptor(
    files: &TlsFiles,
    resolver: Arc<Resolver>,
    alpn: &[u8],
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    message: format!("a CA certificate rustls refuses: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Tls {
    /// Loads `files`; refuses what cannot serve.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let resolver = Arc::new(Resolver {
            current: parking_lot::RwLock::new(certified_key(&files)?),
        });
        let acceptors = (
            acceptor(&files, resolver.clone(), b"h2")?,
            acceptor(&files, resolver.clone(), b"http/1.1")?,
        );
        Ok(Tls {
            files,
            resolver,
            acceptors: parking_lot::RwLock::new(acceptors),
        })
    }

    /// Reads the files again and uses them for new connections; on an error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = certified_key(&self.files)?;
        let acceptors = (
            acceptor(&self.files, self.resolver.clone(), b"h2")?,
            acceptor(&self.files, self.resolver.clone(), b"http/1.1")?,
        );
        *self.resolver.current.write() = key;
        *self.acceptors.write() = acceptors;
        Ok(())
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptors.read().0.clone()
    }

    /// The acceptor for a new metrics connection (HTTP/1.1).
    pub fn metrics_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptors.read().1.clone()
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// The principal of the first certificate in the PEM file at `path` (this node's own, as the
/// other nodes see it), if it reads.
pub fn subject_of(path: &Path) -> Option<String> {
    certificates(path).ok()?.first().and_then(principal_of)
}

/// The principal a client certificate names: its subject's common name, else the whole
/// subject (RFC 4514 form).
pub fn principal_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    common_name.or_else(|| Some(subject.to_string()).filter(|s| !s.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn issued(cn: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn given_good_files_when_loaded_and_reloaded_should_serve_and_refuse_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = issued("broker");
        let files = TlsFiles {
            cert: write(dir.path(), "cert.pem", &cert),
            key: write(dir.path(), "key.pem", &key),
            client_ca: None,
        };
        let tls = Tls::load(files.clone()).unwrap();
        assert!(!tls.mutual());
        // Another certificate: reloaded.
        let (cert2, key2) = issued("broker-2");
        write(dir.path(), "cert.pem", &cert2);
        write(dir.path(), "key.pem", &key2);
        tls.reload().unwrap();
        // A key that does not match the certificate: refused, the old pair stays.
        write(dir.path(), "key.pem", &key);
        let error = tls.reload().unwrap_err();
        assert!(matches!(error, TlsError::Rustls(_)), "{error}");
        // Not PEM at all, or missing.
        write(dir.path(), "cert.pem", "hello");
        assert!(matches!(tls.reload().unwrap_err(), TlsError::Pem { .. }));
        std::fs::remove_file(dir.path().join("cert.pem")).unwrap();
        assert!(matches!(tls.reload().unwrap_err(), TlsError::Read { .. }));
        assert!(Tls::load(files).is_err());
    }

    #[test]
    fn given_a_client_certificate_its_principal_should_be_the_common_name() {
        let (cert, _) = issued("service-a");
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(principal_of(&der).as_deref(), Some("service-a"));
    }
}
