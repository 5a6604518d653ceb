//! Security settings: TLS files, authentication sources, and the guard that refuses to serve a
//! non-loopback address (the client port or the metrics port) without TLS and authentication
//! unless asked to (`--insecure-allow-remote`).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, ConfigError};

/// The security flags (flattened into the broker's flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityFlags {
    /// TLS on the client port: the certificate chain (PEM, leaf first), with --tls-key; clients
    /// then connect with TLS (`syncline --tls-ca`). Reloaded on SIGHUP
    #[arg(
        long,
        env = "SYNCLINE_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). Reloaded on SIGHUP
    #[arg(
        long,
        env = "SYNCLINE_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: require a client certificate signed by one of these CAs (PEM); its subject's
    /// common name is the client's principal. Needs --tls-cert. Reloaded on SIGHUP
    #[arg(
        long,
        env = "SYNCLINE_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Static tokens for services: a TOML file of `[[token]] principal = "NAME"` and
    /// `sha256 = "HEX"` (the SHA-256 of the token, never the token). Calls then need
    /// `authorization: Bearer TOKEN` (or a JWT, or a client certificate)
    #[arg(long, env = "SYNCLINE_AUTH_TOKENS_FILE", value_name = "TOML")]
    pub auth_tokens_file: Option<PathBuf>,

    /// JWTs signed with HS256: the file's bytes are the shared secret as written (surrounding
    /// whitespace and a final newline trimmed, never base64-decoded); the principal is `sub`
    #[arg(long, env = "SYNCLINE_AUTH_JWT_SECRET_FILE", value_name = "FILE")]
    pub auth_jwt_secret_file: Option<PathBuf>,

    /// JWTs signed with RS256 or EdDSA: a PEM file of one or more public keys
    #[arg(long, env = "SYNCLINE_AUTH_JWT_PUBLIC_KEYS", value_name = "PEM")]
    pub auth_jwt_public_keys: Option<PathBuf>,

    /// JWTs must carry this audience (`aud`) [default: not checked]
    #[arg(long, env = "SYNCLINE_AUTH_JWT_AUDIENCE", value_name = "AUD")]
    pub auth_jwt_audience: Option<String>,

    /// Principals allowed every operation (ACLs do not apply to them), comma-separated. In a
    /// cluster with authentication, include every node's certificate subject: nodes call each
    /// other with their certificates, and the Peer service takes superusers only
    #[arg(
        long,
        env = "SYNCLINE_SUPERUSERS",
        value_name = "P1,P2",
        value_delimiter = ','
    )]
    pub superusers: Option<Vec<String>>,

    /// Produce bytes per second each principal may send to this node (0: no limit); a client
    /// over it gets its responses later, never an error. --quotas-file sets it per principal
    #[arg(
        long,
        env = "SYNCLINE_QUOTA_PRODUCE_BYTES_PER_SEC",
        value_name = "BYTES"
    )]
    pub quota_produce_bytes_per_sec: Option<u64>,

    /// Fetch bytes per second each principal may read from this node (Fetch and Subscribe; 0:
    /// no limit)
    #[arg(long, env = "SYNCLINE_QUOTA_FETCH_BYTES_PER_SEC", value_name = "BYTES")]
    pub quota_fetch_bytes_per_sec: Option<u64>,

    /// Per-principal quotas: a TOML file of `[[quota]] principal = "NAME"`,
    /// `produce_bytes_per_sec = N`, `fetch_bytes_per_sec = N` (a missing rate takes the
    /// default; 0: no limit)
    #[arg(long, env = "SYNCLINE_QUOTAS_FILE", value_name = "TOML")]
    pub quotas_file: Option<PathBuf>,

    /// Serve a non-loopback --listen (or --metrics-listen) address without TLS and
    /// authentication: anyone who reaches the port can read, write and delete everything.
    /// Without it such a start is refused
    #[arg(long, env = "SYNCLINE_INSECURE_ALLOW_REMOTE")]
    pub insecure_allow_remote: bool,
}

/// Where the credentials that authenticate clients come from (`server::auth`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthFiles {
    /// Static tokens (TOML).
    pub tokens_file: Option<PathBuf>,
    /// The HS256 secret.
    pub jwt_secret_file: Option<PathBuf>,
    /// RS256 / EdDSA public keys (PEM).
    pub jwt_public_keys: Option<PathBuf>,
    /// The audience JWTs must carry.
    pub jwt_audience: Option<String>,
    /// Principals allowed everything.
    pub superusers: Vec<String>,
}

/// Per-principal byte-rate quotas (`server::quota`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaSettings {
    /// Default produce rate per principal, bytes per second (0: no limit).
    pub produce_bytes_per_sec: u64,
    /// Default fetch rate per principal, bytes per second (0: no limit).
    pub fetch_bytes_per_sec: u64,
    /// Per-principal rates (TOML).
    pub file: Option<PathBuf>,
}

/// The TLS certificate files (`server::tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CAs whose client certificates are accepted (PEM); None: no client certificate asked.
    pub client_ca: Option<PathBuf>,
}

impl AuthFiles {
    /// Whether any credential source is configured.
    pub fn configured(&self) -> bool {
        self.tokens_file.is_some()
            || self.jwt_secret_file.is_some()
            || self.jwt_public_keys.is_some()
    }
}

/// The TLS files from the three settings: the certificate and its key go together, and the
/// client CA needs both.
pub(super) fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
        })),
        (None, None) if client_ca.is_none() => Ok(None),
        _ => Err(ConfigError {
            key: "tls_cert",
            message: "tls_cert and tls_key go together (and tls_client_ca needs both)".into(),
        }),
    }
}

/// Principal names, trimmed, empty ones dropped.
pub(super) fn principals(list: Option<Vec<String>>) -> Vec<String> {
    list.unwrap_or_default()
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Refuses authentication in a cluster without mutual TLS: the nodes authenticate each other
/// by their certificates (`server::authorize`), and without them every node-to-node call
/// would be refused.
pub(super) fn check_cluster(config: &Config) -> Result<(), ConfigError> {
    let clustered = config.node.cluster.len() > 1 || config.node.join.is_some();
    let mutual = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if clustered && config.auth.configured() && !mutual {
        return Err(ConfigError {
            key: "tls_client_ca",
            message: "authentication in a cluster needs mutual TLS between the nodes \
                      (--tls-cert, --tls-key and --tls-client-ca, the CA that signs every \
                      node's certificate): nodes authenticate each other by certificate"
                .into(),
        });
    }
    Ok(())
}

/// Refuses a non-loopback client or metrics address without TLS and authentication (a client
/// certificate or a token source), unless `insecure_allow_remote`.
pub(super) fn check_remote(config: &Config) -> Result<(), ConfigError> {
    if config.insecure_allow_remote {
        return Ok(());
    }
    let remote = |address: &SocketAddr| !address.ip().is_loopback();
    let tls = config.tls.is_some();
    let authenticated =
        config.auth.configured() || config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if remote(&config.listen) && !(tls && authenticated) {
        let missing = match (tls, authenticated) {
            (false, false) => "TLS (--tls-cert, --tls-key) and authentication (--auth-tokens-file, --auth-jwt-secret-file, --auth-jwt-public-keys or --tls-client-ca)",
            (false, true) => "TLS (--tls-cert, --tls-key)",
            _ => "authentication (--auth-tokens-file, --auth-jwt-secret-file, --auth-jwt-public-keys or --tls-client-ca)",
        };
        return Err(ConfigError {
            key: "listen",
            message: format!(
                "{} is reachable from other hosts, and the broker would serve it without {missing}: \
                 configure them, listen on a loopback address, or pass --insecure-allow-remote \
                 to serve it as it is",
                config.listen
            ),
        });
    }
    if config.metrics_listen_explicit && remote(&config.metrics_listen) && !(tls && authenticated) {
        return Err(ConfigError {
            key: "metrics_listen",
            message: format!(
                "{} is reachable from other hosts, and /metrics (which names topics and groups) \
                 would be served without TLS and authentication: configure them, listen on a \
                 loopback address, or pass --insecure-allow-remote to serve it as it is",
                config.metrics_listen
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_cluster_with_tokens_it_should_need_mutual_tls_between_the_nodes() {
        let mut config = Config::default();
        config.auth.tokens_file = Some("tokens.toml".into());
        assert!(
            check_cluster(&config).is_ok(),
            "a cluster of one needs no peer TLS"
        );
        config.node.join = Some("127.0.0.1:7450".into());
        let error = check_cluster(&config).expect_err("tokens in a cluster without mTLS");
        assert!(
            error.message.contains("--tls-client-ca"),
            "{}",
            error.message
        );
        config.tls = Some(TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: Some("ca.pem".into()),
        });
        assert!(check_cluster(&config).is_ok());
    }

    #[test]
    fn given_a_remote_listen_address_it_should_need_tls_and_authentication_or_the_flag() {
        let mut config = Config {
            listen: "0.0.0.0:7450".parse().unwrap(),
            ..Config::default()
        };
        let error = check_remote(&config).unwrap_err();
        assert!(
            error.message.contains("--insecure-allow-remote"),
            "{}",
            error.message
        );
        assert!(error.message.contains("TLS"), "{}", error.message);
        config.tls = Some(TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
        });
        let error = check_remote(&config).unwrap_err();
        assert!(
            error.message.contains("authentication"),
            "{}",
            error.message
        );
        config.auth.tokens_file = Some("tokens.toml".into());
        check_remote(&config).unwrap();
        // Mutual TLS authenticates too.
        config.auth = AuthFiles::default();
        config.tls.as_mut().unwrap().client_ca = Some("ca.pem".into());
        check_remote(&config).unwrap();
        // Metrics on a remote address: served with TLS and authentication ...
        config.metrics_listen = "0.0.0.0:7451".parse().unwrap();
        config.metrics_listen_explicit = true;
        check_remote(&config).unwrap();
        // ... refused without, unless asked.
        let mut metrics = Config {
            metrics_listen: "0.0.0.0:7451".parse().unwrap(),
            metrics_listen_explicit: true,
            ..Config::default()
        };
        let error = check_remote(&metrics).unwrap_err();
        assert_eq!(error.key, "metrics_listen");
        metrics.insecure_allow_remote = true;
        check_remote(&metrics).unwrap();
        // Loopback needs nothing.
        let loopback = Config::default();
        check_remote(&loopback).unwrap();
    }
}
