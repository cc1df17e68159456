//! Talking to upstream registries: routing by `?ns=`, credentials, and the token flow.
//!
//! A request goes out with the best credentials known for it: the client's own `Authorization`
//! (a Bearer token is forwarded as is; Basic credentials are used for the token flow), else the
//! credentials configured for that registry, else none. On a `401` carrying a Bearer challenge
//! the token is fetched from the realm and the request retried once; tokens are cached per
//! registry, repository and credential until they expire.
//!
//! Non-goals: pushing, and registries that need anything beyond Basic and Bearer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use shoal_protocol::auth::{Challenge, Scheme};

use crate::config::{valid_host, Config};

/// Registry key of requests without `?ns=`.
pub const DEFAULT_KEY: &str = "default";

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// The host the client named (`ns`), or [`DEFAULT_KEY`].
    pub key: String,
    /// Base URL, no trailing slash.
    pub base: String,
}

/// Upstream failures (an answered request, whatever its status, is not an error).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connection refused, reset, DNS failure, TLS failure.
    #[error("upstream {registry} unreachable: {source}")]
    Unreachable {
        /// The registry key.
        registry: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// No response head within the timeout.
    #[error("upstream {registry} timed out")]
    Timeout {
        /// The registry key.
        registry: String,
    },
    /// The token realm failed or answered garbage.
    #[error("token service of {registry}: {reason}")]
    Token {
        /// The registry key.
        registry: String,
        /// What went wrong.
        reason: String,
    },
}

/// Errors loading the credentials file.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// Unreadable.
    #[error("auth file {0}: {1}")]
    Read(String, std::io::Error),
    /// Not a docker config.json with `auths`.
    #[error("auth file {0}: {1}")]
    Parse(String, String),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Credentials {
    user: String,
    pass: String,
}

impl Credentials {
    fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.user, self.pass);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    fn fingerprint(&self) -> String {
        let h = Sha256::digest(format!("{}\0{}", self.user, self.pass));
        hex::encode(&h[..8])
    }

    fn from_basic_header(v: &str) -> Option<Credentials> {
        let b64 = v
            .strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, pass) = raw.split_once(':')?;
        Some(Credentials {
            user: user.to_owned(),
            pass: pass.to_owned(),
        })
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

fn load_auth_file(path: &Path) -> Result<HashMap<String, Credentials>, AuthFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| AuthFileError::Read(shown.clone(), e))?;
    let cfg: DockerConfig = serde_json::from_str(&text)
        .map_err(|e| AuthFileError::Parse(shown.clone(), e.to_string()))?;
    let mut out = HashMap::new();
    for (key, entry) in cfg.auths {
        let creds = match (entry.auth, entry.username, entry.password) {
            (Some(a), _, _) => {
                Credentials::from_basic_header(&format!("Basic {a}")).ok_or_else(|| {
                    AuthFileError::Parse(
                        shown.clone(),
                        format!("entry {key:?}: auth is not base64 of user:password"),
                    )
                })?
            }
            (None, Some(user), Some(pass)) => Credentials { user, pass },
            _ => {
                return Err(AuthFileError::Parse(
                    shown.clone(),
                    format!("entry {key:?}: needs auth or username+password"),
                ))
            }
        };
        // Keys may be URLs (`https://index.docker.io/v1/`): index by bare host too.
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        out.insert(key, creds.clone());
        out.entry(host).or_insert(creds);
    }
    Ok(out)
}

/// What a request carries from the client.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth(pub Option<HeaderValue>);

impl ClientAuth {
    /// A short fingerprint of the client's credentials, for keying caches; `anon` for none.
    pub fn fingerprint(&self) -> String {
        match &self.0 {
            None => "anon".into(),
            Some(v) => hex::encode(&Sha256::digest(v.as_bytes())[..8]),
        }
    }
}

/// One outgoing request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// GET or HEAD.
    pub method: Method,
    /// The repository, for the token scope.
    pub repo: &'a str,
    /// Path and query, starting with `/v2/`.
    pub path: String,
    /// `Accept`, for manifests.
    pub accept: Option<&'a str>,
    /// `Range`, for partial blob reads.
    pub range: Option<String>,
}

/// An answered request.
pub struct Response {
    /// The upstream's response (any status).
    pub inner: reqwest::Response,
    /// Whether credentials (the client's or configured ones) were sent.
    pub authenticated: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    registry: String,
    repo: String,
    identity: String,
}

/// The set of upstream registries and a shared HTTP client.
pub struct Upstreams {
    default_base: String,
    mapped: BTreeMap<String, String>,
    creds: HashMap<String, Credentials>,
    client: reqwest::Client,
    timeout: Duration,
    /// Cached tokens. A std mutex: only map look-ups and inserts under it, never an `.await`.
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Longest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

impl Upstreams {
    /// Builds the upstream set from the configuration.
    pub fn new(config: &Config) -> Result<Upstreams, AuthFileError> {
        let creds = match &config.auth_file {
            Some(p) => load_auth_file(p)?,
            None => HashMap::new(),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(config.upstream_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthFileError::Parse("http client".into(), e.to_string()))?;
        Ok(Upstreams {
            default_base: config.upstream.clone(),
            mapped: config.registries.clone(),
            creds,
            client,
            timeout: config.upstream_timeout,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The per-read timeout for bodies.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Routes a request by its `ns` query parameter. `None` for a malformed host.
    pub fn route(&self, ns: Option<&str>) -> Option<Registry> {
        match ns {
            None => Some(Registry {
                key: DEFAULT_KEY.into(),
                base: self.default_base.clone(),
            }),
            Some(host) if valid_host(host) => {
                let base = match self.mapped.get(host) {
                    Some(url) => url.clone(),
                    None if host == "docker.io" => crate::config::DEFAULT_UPSTREAM.to_owned(),
                    None => format!("https://{host}"),
                };
                Some(Registry {
                    key: host.to_owned(),
                    base,
                })
            }
            Some(_) => None,
        }
    }

    fn configured_creds(&self, reg: &Registry) -> Option<&Credentials> {
        if let Some(c) = self.creds.get(&reg.key) {
            return Some(c);
        }
        let host = reg
            .base
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or_default();
        if let Some(c) = self.creds.get(host) {
            return Some(c);
        }
        if host == "registry-1.docker.io" || reg.key == "docker.io" {
            return self
                .creds
                .get("docker.io")
                .or_else(|| self.creds.get("index.docker.io"));
        }
        None
    }

    /// Who a request acts as upstream: the client's own credentials, else the ones configured
    /// for the registry, else anonymous. Keys the authorization cache.
    pub fn identity(&self, reg: &Registry, client: &ClientAuth) -> String {
        match (&client.0, self.configured_creds(reg)) {
            (Some(_), _) => format!("client:{}", client.fingerprint()),
            (None, Some(c)) => format!("node:{}", c.fingerprint()),
            (None, None) => "anon".into(),
        }
    }

    /// What a request for `client` to `repo` goes out with: the client's own Bearer header
    /// (forwarded as is), the Basic credentials for the token flow (the client's, else the
    /// configured ones), and the key of the cached token.
    fn credentials_for<'a>(
        &'a self,
        reg: &Registry,
        repo: &str,
        client: &'a ClientAuth,
    ) -> (Option<&'a str>, Option<Cow<'a, Credentials>>, TokenKey) {
        let client_header = client.0.as_ref().and_then(|v| v.to_str().ok());
        let client_basic = client_header.and_then(Credentials::from_basic_header);
        let client_bearer =
            client_header.filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
        let creds = match client_basic {
            Some(c) => Some(Cow::Owned(c)),
            None if client_bearer.is_some() => None,
            None => self.configured_creds(reg).map(Cow::Borrowed),
        };
        let identity = match (client_bearer, &creds) {
            (Some(_), _) => String::new(),
            (None, Some(c)) => c.fingerprint(),
            (None, None) => "anon".into(),
        };
        let key = TokenKey {
            registry: reg.key.clone(),
            repo: repo.to_owned(),
            identity,
        };
        (client_bearer, creds, key)
    }

    /// The registry's bearer token that requests for `client` to `repo` carry now: the client's
    /// own, or one the token flow gave for its credentials (cached, unexpired); `None` when
    /// there is none (anonymous, Basic-only registries, or no request made yet).
    pub fn bearer_for(&self, reg: &Registry, repo: &str, client: &ClientAuth) -> Option<String> {
        let (client_bearer, creds, key) = self.credentials_for(reg, repo, client);
        match client_bearer {
            Some(b) => Some(b[7..].trim().to_owned()),
            None if creds.is_some() => self.cached_token(&key),
            None => None,
        }
    }

    /// Asks the registry whether `token` opens `path` (a HEAD with it, no token flow): the
    /// status it answers.
    pub async fn check_bearer(
        &self,
        reg: &Registry,
        repo: &str,
        path: String,
        token: &str,
    ) -> Result<StatusCode, UpstreamError> {
        let req = Request {
            method: Method::HEAD,
            repo,
            path,
            accept: None,
            range: None,
        };
        let resp = self
            .send_once(reg, &req, Some(&format!("Bearer {token}")))
            .await?;
        Ok(resp.status())
    }

    /// Sends a request, doing the token flow if challenged.
    pub async fn send(
        &self,
        reg: &Registry,
        req: &Request<'_>,
        client: &ClientAuth,
    ) -> Result<Response, UpstreamError> {
        let (client_bearer, creds, key) = self.credentials_for(reg, req.repo, client);
        let creds = creds.as_deref();

        // First attempt: a forwarded bearer, a cached token, or nothing.
        let first_auth = match client_bearer {
            Some(b) => Some(b.to_owned()),
            None => self.cached_token(&key).map(|t| format!("Bearer {t}")),
        };
        let resp = self.send_once(reg, req, first_auth.as_deref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED || client_bearer.is_some() {
            let authenticated =
                first_auth.is_some() && (client_bearer.is_some() || creds.is_some());
            return Ok(Response {
                inner: resp,
                authenticated,
            });
        }
        let challenge = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Challenge::parse(v).ok());
        let Some(challenge) = challenge else {
            return Ok(Response {
                inner: resp,
                authenticated: false,
            });
        };
        let auth = match challenge.scheme {
            Scheme::Basic => match creds {
                Some(c) => c.basic_header(),
                None => {
                    return Ok(Response {
                        inner: resp,
                        authenticated: false,
                    })
                }
            },
            Scheme::Bearer => {
                let token = self.fetch_token(reg, req.repo, &challenge, creds).await?;
                self.store_token(key, &token);
                format!("Bearer {}", token.0)
            }
            Scheme::Other(_) => {
                return Ok(Response {
                    inner: resp,
                    authenticated: false,
                })
            }
        };
        let resp = self.send_once(reg, req, Some(&auth)).await?;
        Ok(Response {
            inner: resp,
            authenticated: creds.is_some(),
        })
    }

    async fn send_once(
        &self,
        reg: &Registry,
        req: &Request<'_>,
        auth: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = format!("{}{}", reg.base, req.path);
        let mut headers = HeaderMap::new();
        if let Some(a) = req.accept {
            headers.insert(
                http::header::ACCEPT,
                HeaderValue::from_str(a).unwrap_or(HeaderValue::from_static("*/*")),
            );
        }
        if let Some(r) = &req.range {
            if let Ok(v) = HeaderValue::from_str(r) {
                headers.insert(http::header::RANGE, v);
            }
        }
        if let Some(a) = auth {
            if let Ok(v) = HeaderValue::from_str(a) {
                headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        let fut = self
            .client
            .request(req.method.clone(), &url)
            .headers(headers)
            .send();
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(UpstreamError::Timeout {
                registry: reg.key.clone(),
            }),
            Ok(Err(e)) if e.is_timeout() => Err(UpstreamError::Timeout {
                registry: reg.key.clone(),
            }),
            Ok(Err(source)) => Err(UpstreamError::Unreachable {
                registry: reg.key.clone(),
                source,
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn cached_token(&self, key: &TokenKey) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(key)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(t, _)| t.clone())
    }

    fn store_token(&self, key: TokenKey, token: &(String, Duration)) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        tokens.retain(|_, (_, exp)| *exp > now);
        // Renew a little early so a token never expires in flight.
        let life = token
            .1
            .saturating_sub(Duration::from_secs(5))
            .max(Duration::from_secs(1));
        tokens.insert(key, (token.0.clone(), now + life));
    }

    async fn fetch_token(
        &self,
        reg: &Registry,
        repo: &str,
        ch: &Challenge,
        creds: Option<&Credentials>,
    ) -> Result<(String, Duration), UpstreamError> {
        let err = |reason: String| UpstreamError::Token {
            registry: reg.key.clone(),
            reason,
        };
        let realm = ch
            .param("realm")
            .ok_or_else(|| err("challenge without realm".into()))?;
        let mut url = reqwest::Url::parse(realm).map_err(|e| err(format!("bad realm: {e}")))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(err("realm is not http(s)".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = ch.param("service") {
                q.append_pair("service", s);
            }
            let scope = ch
                .param("scope")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("repository:{repo}:pull"));
            q.append_pair("scope", &scope);
        }
        let mut rb = self.client.get(url);
        if let Some(c) = creds {
            rb = rb.header(http::header::AUTHORIZATION, c.basic_header());
        }
        let resp = match tokio::time::timeout(self.timeout, rb.send()).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    registry: reg.key.clone(),
                })
            }
            Ok(Err(source)) => {
                return Err(UpstreamError::Unreachable {
                    registry: reg.key.clone(),
                    source,
                })
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // Bad credentials: let the caller's retry answer 401 to the client.
            return Ok((String::new(), Duration::from_secs(1)));
        }
        if !status.is_success() {
            return Err(err(format!("status {status}")));
        }
        let body = read_limited(resp, MAX_TOKEN_RESPONSE, self.timeout)
            .await
            .map_err(err)?;
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| err(format!("bad token JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err("no token in response".into()))?;
        Ok((
            token,
            Duration::from_secs(t.expires_in.unwrap_or(60).clamp(1, 3600)),
        ))
    }
}

/// Reads a whole response body of at most `limit` bytes, each read bounded by `timeout`.
pub async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("body larger than {limit} bytes"));
    }
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(timeout, resp.chunk()).await {
            Err(_) => return Err("timed out reading body".into()),
            Ok(Err(e)) => return Err(format!("reading body: {e}")),
            Ok(Ok(None)) => return Ok(out),
            Ok(Ok(Some(c))) => {
                if out.len() + c.len() > limit {
                    return Err(format!("body larger than {limit} bytes"));
                }
                out.extend_from_slice(&c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path(),
            "http://127.0.0.1:1",
        );
        c.registries
            .insert("docker.io".into(), "http://127.0.0.1:2".into());
        let u = Upstreams::new(&c).unwrap();
        assert_eq!(u.route(None).unwrap().base, "http://127.0.0.1:1");
        assert_eq!(
            u.route(Some("docker.io")).unwrap().base,
            "http://127.0.0.1:2"
        );
        assert_eq!(u.route(Some("quay.io")).unwrap().base, "https://quay.io");
        assert!(u.route(Some("evil/../x")).is_none());
        assert!(u.route(Some("a b")).is_none());
    }

    #[test]
    fn auth_file_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5001":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        let m = load_auth_file(&p).unwrap();
        assert_eq!(m["index.docker.io"].user, "u");
        assert_eq!(m["127.0.0.1:5001"].pass, "b");
        std::fs::write(&p, r#"{"auths":{"x":{"auth":"!!!"}}}"#).unwrap();
        assert!(load_auth_file(&p).is_err());
    }
}
