//! Certificates for TLS tests, generated with rcgen (never checked in): a CA, and a server
//! certificate for 127.0.0.1/localhost and a client certificate it issued, written as PEM.

use std::path::{Path, PathBuf};

/// A CA and what it issued, as PEM files in a directory.
pub struct Pki {
    pub ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        Pki { ca, issuer }
    }

    /// A certificate for `names` (DNS names or IP addresses) with common name `cn`: (cert, key).
    pub fn issue(&self, cn: &str, names: &[&str], client: bool) -> (String, String) {
        let usage = if client {
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]
        };
        self.issue_for(cn, names, usage)
    }

    /// A certificate with the extended key usages `usage` (a node's: both).
    pub fn issue_for(
        &self,
        cn: &str,
        names: &[&str],
        usage: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = usage;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn write(&self, dir: &Path, prefix: &str) -> Files {
        let write = |name: &str, text: &str| -> PathBuf {
            let path = dir.join(format!("{prefix}-{name}"));
            std::fs::write(&path, text).unwrap();
            path
        };
        let (server_cert, server_key) = self.issue("broker", &["127.0.0.1", "localhost"], false);
        let (client_cert, client_key) = self.issue("service-a", &[], true);
        Files {
            ca: write("ca.pem", &self.ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }
}

pub struct Files {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}
