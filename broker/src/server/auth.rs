//! Authentication of client calls: who is calling (the principal), from a bearer token or the
//! connection's client certificate.
//!
//! ## Credentials, in order
//! 1. `authorization: Bearer TOKEN` metadata:
//!    - a **static token** (`--auth-tokens-file`, TOML `[[token]] principal = "svc", sha256 =
//!      "<64 hex digits>"`): the principal whose SHA-256 of the token matches (compared in
//!      constant time; the file holds no token itself);
//!    - else a **JWT**: HS256 with the secret of `--auth-jwt-secret-file` (its bytes as written,
//!      surrounding whitespace and a final newline trimmed, never base64-decoded), or RS256 /
//!      EdDSA with a public key of `--auth-jwt-public-keys` (PEM, one or more `PUBLIC KEY`
//!      blocks, tried in turn); `exp` is required and checked, `nbf` checked when present,
//!      `aud` checked when `--auth-jwt-audience` is set (60 s of leeway for clocks); the
//!      principal is `sub`.
//! 2. Else the connection's **client certificate** (mutual TLS: `super::tls`).
//!
//! A call with credentials that do not check out, or with none while authentication is
//! configured, gets UNAUTHENTICATED naming what is wrong (never which principals exist). The
//! principal goes into the request's extensions ([`Principal`]) for the handlers (ACLs).
//! With nothing configured every call is anonymous, as before.
//!
//! Checked: the Broker service and server reflection. Not checked: gRPC health (probes) and the
//! Peer service (node-to-node; protected by peer TLS).
//!
//! It may call `config` and the TLS connection info.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::Status;

pub use crate::config::AuthFiles;

/// Bytes of a bearer token or JWT at most.
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// Why the authentication settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(String);

/// The tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    principal: String,
    sha256: String,
}

/// The claims a JWT must carry.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// Checks credentials (see the module doc).
pub struct Authenticator {
    tokens: HashMap<[u8; 32], String>,
    secret: Option<DecodingKey>,
    public: Vec<(Algorithm, DecodingKey)>,
    audience: Option<String>,
    mutual_tls: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .field("jwt_secret", &self.secret.is_some())
            .field("jwt_public_keys", &self.public.len())
            .field("audience", &self.audience)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError(format!("cannot read {}: {e}", path.display())))
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// The PEM blocks of `text` (each from its BEGIN line to its END line).
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = &mut current {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END ") {
            if let Some(block) = current.take() {
                blocks.push(block);
            }
        }
    }
    blocks
}

impl Authenticator {
    /// Loads what `files` names; None when no authentication is configured (and no mutual TLS).
    pub fn load(files: &AuthFiles, mutual_tls: bool) -> Result<Option<Authenticator>, AuthError> {
        let mut tokens = HashMap::new();
        if let Some(path) = &files.tokens_file {
            let text = String::from_utf8(read(path)?)
                .map_err(|_| AuthError(format!("{} is not UTF-8", path.display())))?;
            let parsed: TokensFile =
                toml::from_str(&text).map_err(|e| AuthError(format!("{}: {e}", path.display())))?;
            for entry in parsed.token {
                let digest = hex32(&entry.sha256).ok_or_else(|| {
                    AuthError(format!(
                        "{}: the sha256 of principal `{}` is not 64 hex digits",
                        path.display(),
                        entry.principal
                    ))
                })?;
                if entry.principal.is_empty() {
                    return Err(AuthError(format!(
                        "{}: a token with an empty principal",
                        path.display()
                    )));
                }
                tokens.insert(digest, entry.principal);
            }
        }
        let secret = match &files.jwt_secret_file {
            Some(path) => {
                let bytes = read(path)?;
                let text = String::from_utf8_lossy(&bytes);
                let trimmed = text.trim();
                if trimmed.is_empty() {
                    return Err(AuthError(format!("{} holds no secret", path.display())));
                }
                Some(DecodingKey::from_secret(trimmed.as_bytes()))
            }
            None => None,
        };
        let mut public = Vec::new();
        if let Some(path) = &files.jwt_public_keys {
            let text = String::from_utf8(read(path)?)
                .map_err(|_| AuthError(format!("{} is not UTF-8 PEM", path.display())))?;
            for block in pem_blocks(&text) {
                if let Ok(key) = DecodingKey::from_rsa_pem(block.as_bytes()) {
                    public.push((Algorithm::RS256, key));
                } else if let Ok(key) = DecodingKey::from_ed_pem(block.as_bytes()) {
                    public.push((Algorithm::EdDSA, key));
                } else {
                    return Err(AuthError(format!(
                        "{}: a PEM block that is neither an RSA nor an Ed25519 public key",
                        path.display()
                    )));
                }
            }
            if public.is_empty() {
                return Err(AuthError(format!("{} holds no public key", path.display())));
            }
        }
        if tokens.is_empty() && secret.is_none() && public.is_empty() && !mutual_tls {
            if files.tokens_file.is_some() {
                return Err(AuthError("the tokens file lists no token".into()));
            }
            return Ok(None);
        }
        Ok(Some(Authenticator {
            tokens,
            secret,
            public,
            audience: files.jwt_audience.clone(),
            mutual_tls,
        }))
    }

    /// The principal of a call: from its `authorization` value, else its client certificate.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&str>,
    ) -> Result<Principal, String> {
        let Some(value) = authorization else {
            return match certificate {
                Some(principal) => Ok(Principal(principal.to_string())),
                None => Err(
                    if self.mutual_tls && self.tokens.is_empty() && !self.jwt() {
                        "no client certificate".to_string()
                    } else {
                        "no credentials: send `authorization: Bearer TOKEN` (syncline --token)"
                            .to_string()
                    },
                ),
            };
        };
        if value.len() > TOKEN_BYTES_MAX + 7 {
            return Err(format!(
                "an authorization value over {TOKEN_BYTES_MAX} bytes"
            ));
        }
        let value =
            std::str::from_utf8(value).map_err(|_| "an authorization value that is not text")?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or("the authorization value is not `Bearer TOKEN`")?
            .trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Constant time over the digests: which byte differs says nothing.
        let mut found = None;
        for (known, principal) in &self.tokens {
            let diff = known
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(principal);
            }
        }
        if let Some(principal) = found {
            return Ok(Principal(principal.clone()));
        }
        if token.matches('.').count() == 2 && self.jwt() {
            return self.jwt_principal(token);
        }
        Err("the token is not valid".into())
    }

    /// The principal of an HTTP/2 request: its `authorization` header, else the client
    /// certificate of its connection.
    pub fn authenticate_http<B>(&self, request: &http::Request<B>) -> Result<Principal, String> {
        let certificate = request
            .extensions()
            .get::<super::connections::ConnectionInfo>()
            .and_then(|c| c.tls.as_ref())
            .and_then(|t| t.principal.as_deref());
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        self.authenticate(authorization, certificate)
    }

    fn jwt(&self) -> bool {
        self.secret.is_some() || !self.public.is_empty()
    }

    fn jwt_principal(&self, token: &str) -> Result<Principal, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("the JWT does not decode: {e}"))?;
        let keys: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.secret.iter().collect(),
            Algorithm::RS256 | Algorithm::EdDSA => self
                .public
                .iter()
                .filter(|(alg, _)| *alg == header.alg)
                .map(|(_, key)| key)
                .collect(),
            other => {
                return Err(format!(
                    "JWT algorithm {other:?} is not accepted (HS256, RS256, EdDSA)"
                ))
            }
        };
        if keys.is_empty() {
            return Err(format!(
                "no key is configured for JWT algorithm {:?}",
                header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let mut last = String::new();
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) if !data.claims.sub.is_empty() => return Ok(Principal(data.claims.sub)),
                Ok(_) => return Err("the JWT's `sub` is empty".into()),
                Err(error) => last = jwt_error(&error),
            }
        }
        Err(last)
    }
}

fn jwt_error(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "the JWT has expired (`exp`)".into(),
        ErrorKind::ImmatureSignature => "the JWT is not valid yet (`nbf`)".into(),
        ErrorKind::InvalidAudience => "the JWT is for another audience (`aud`)".into(),
        ErrorKind::InvalidSignature => "the JWT's signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the JWT has no `{claim}`"),
        other => format!("the JWT is not valid: {other:?}"),
    }
}

/// A service whose calls are authenticated first (see the module doc).
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

impl<S> Authenticated<S> {
    /// Wraps `inner`; with `auth` None every call passes, anonymous.
    pub fn new(inner: S, auth: Option<Arc<Authenticator>>) -> Self {
        Authenticated { inner, auth }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for Authenticated<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        if let Some(auth) = &self.auth {
            match auth.authenticate_http(&request) {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Err(reason) => {
                    let status = Status::unauthenticated(reason);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}
