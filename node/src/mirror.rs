//! The pull-through logic: tags resolved upstream within a TTL, content by digest from the
//! store, missing blobs fetched once and streamed to every client that wants them while they
//! arrive.
//!
//! Invariants:
//! - A tag is re-checked upstream once its TTL has passed; if the upstream is unreachable or
//!   answers 5xx/429, the last-known-good digest is served and the staleness logged.
//! - A blob is fetched from the upstream by at most one task at a time per credential; every
//!   other request for it reads the same partial file.
//! - A client never receives the last byte of an arriving blob before the whole blob was
//!   verified: on a mismatch its response is aborted short of complete.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use shoal_protocol::media::{self, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use shoal_protocol::{Digest, ErrorCode, Name, OciError, Reference};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::flight::SingleFlight;
use crate::metrics::{Metrics, UpstreamLabels};
use crate::store::{BlobWriter, CommitError, OpenBlob, Store};
use crate::upstream::{read_limited, ClientAuth, Registry, Request, UpstreamError, Upstreams};

/// An error for the client: the OCI error, and the upstream's challenge when it asked for auth.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The error body and status.
    pub oci: OciError,
    /// `WWW-Authenticate` to pass back with a 401.
    pub challenge: Option<HeaderValue>,
}

impl ApiError {
    /// An error without a challenge.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            oci: OciError::new(code, message),
            challenge: None,
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> ApiError {
        warn!(error = %e, "upstream failure");
        let msg = match &e {
            UpstreamError::Timeout { .. } => "upstream registry timed out",
            UpstreamError::Unreachable { .. } => "upstream registry unreachable",
            UpstreamError::Token { .. } => "upstream token service failed",
        };
        ApiError::new(ErrorCode::UpstreamUnavailable, msg)
    }
}

fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "{context}");
    ApiError::new(ErrorCode::Internal, "internal error")
}

/// Maps a non-success upstream status to the client's error.
fn status_error(resp: &reqwest::Response, not_found: ErrorCode, what: &str) -> ApiError {
    let status = resp.status();
    let code = match status {
        StatusCode::NOT_FOUND => not_found,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Denied,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooManyRequests,
        _ => ErrorCode::UpstreamUnavailable,
    };
    let message = match code {
        ErrorCode::UpstreamUnavailable => {
            format!("upstream answered {} for {what}", status.as_u16())
        }
        ErrorCode::Unauthorized => format!("authentication required for {what}"),
        ErrorCode::Denied => format!("access to {what} denied"),
        ErrorCode::TooManyRequests => "upstream rate limit reached".into(),
        _ => format!("{what} unknown"),
    };
    let challenge = if code == ErrorCode::Unauthorized {
        resp.headers().get(http::header::WWW_AUTHENTICATE).cloned()
    } else {
        None
    };
    ApiError {
        oci: OciError::new(code, message),
        challenge,
    }
}

/// How long a confirmed (repository, digest, credential) access to private content is trusted
/// before the upstream is asked again.
pub const AUTH_TTL: Duration = Duration::from_secs(60);
/// Most remembered access confirmations; expired ones are dropped first when it is reached.
const MAX_AUTH_ENTRIES: usize = 100_000;

/// Whether a failed tag check may fall back to the last-known-good digest.
fn upstream_down(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// A manifest ready to serve.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes, exactly as the upstream served them.
    pub body: Bytes,
}

/// How far an arriving blob has got.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Bytes written to the partial file.
    pub written: u64,
    /// Every byte written is proven against the digest (a blob assembled from chunks, each
    /// checked against a whole table): readers may serve the last byte before the blob is
    /// stored (fsync, install), and finish even if storing it fails.
    pub verified: bool,
    /// `Some(Ok)` once verified and stored; `Some(Err)` if it failed (the bytes are gone).
    pub done: Option<Result<(), String>>,
}

/// A blob being fetched from the upstream.
pub struct Transfer {
    /// Its digest.
    pub digest: Digest,
    /// Its size, when the upstream announced it.
    pub size: Option<u64>,
    /// A read handle on the partial file (read with positional reads).
    pub file: File,
    /// Progress, updated as bytes arrive.
    pub progress: watch::Receiver<Progress>,
    /// Fetched with credentials: other clients must show theirs before they may read it.
    pub private: bool,
    /// Where its bytes come from: `upstream` or `peer` (the metrics label).
    pub source: &'static str,
}

/// A blob to serve.
pub enum Blob {
    /// Complete and verified.
    Stored(OpenBlob),
    /// Still arriving.
    Arriving(Arc<Transfer>),
}

/// Size and presence of a blob, for `HEAD`.
#[derive(Debug, Clone, Copy)]
pub struct BlobHead {
    /// Size in bytes, if known.
    pub size: Option<u64>,
}

type FlightKey = (Digest, String);
type AccessKey = (String, String, Digest, String);

/// The mirror: store, upstreams, and the in-flight work.
pub struct Mirror {
    /// The blob store.
    pub store: Store,
    /// The upstream registries.
    pub upstreams: Arc<Upstreams>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Where recent blobs' bytes came from.
    pub pulls: crate::pulls::Pulls,
    /// The swarm, when this node has peers.
    pub swarm: Option<Arc<crate::swarm::Swarm>>,
    tag_ttl: Duration,
    /// Blobs arriving now. A std mutex: look-ups and inserts only.
    arriving: Mutex<HashMap<Digest, Arc<Transfer>>>,
    blob_starts: SingleFlight<FlightKey, Result<Option<Arc<Transfer>>, ApiError>>,
    manifest_fetches: SingleFlight<FlightKey, Result<Manifest, ApiError>>,
    tag_checks: SingleFlight<(String, String, String, String), Result<Digest, ApiError>>,
    /// When each (registry, repository, digest, identity) was last confirmed readable upstream.
    /// A std mutex: map operations only.
    access: Mutex<HashMap<AccessKey, Instant>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The upstream's `Docker-Content-Digest`, if present and valid.
fn header_digest(resp: &reqwest::Response) -> Option<Digest> {
    let v = resp.headers().get("docker-content-digest")?.to_str().ok()?;
    Digest::parse(v).ok()
}

fn content_type(resp: &reqwest::Response) -> Option<String> {
    let v = resp
        .headers()
        .get(http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?;
    let v = v.split(';').next()?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

impl Mirror {
    /// A mirror over a store and a set of upstreams.
    pub fn new(
        store: Store,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
        tag_ttl: Duration,
        swarm: Option<Arc<crate::swarm::Swarm>>,
    ) -> Mirror {
        Mirror {
            store,
            upstreams,
            metrics,
            tag_ttl,
            arriving: Mutex::new(HashMap::new()),
            blob_starts: SingleFlight::default(),
            manifest_fetches: SingleFlight::default(),
            tag_checks: SingleFlight::default(),
            access: Mutex::new(HashMap::new()),
            pulls: crate::pulls::Pulls::default(),
            swarm,
        }
    }

    pub(crate) fn count_upstream(&self, reg: &Registry, bytes: u64) {
        let labels = UpstreamLabels {
            registry: reg.key.clone(),
        };
        self.metrics
            .upstream_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
    }

    fn count_request(&self, reg: &Registry) {
        self.metrics
            .upstream_requests
            .get_or_create(&UpstreamLabels {
                registry: reg.key.clone(),
            })
            .inc();
    }

    async fn send(
        &self,
        reg: &Registry,
        req: &Request<'_>,
        auth: &ClientAuth,
    ) -> Result<crate::upstream::Response, ApiError> {
        self.count_request(reg);
        Ok(self.upstreams.send(reg, req, auth).await?)
    }

    fn access_key(
        &self,
        reg: &Registry,
        name: &Name,
        digest: &Digest,
        auth: &ClientAuth,
    ) -> AccessKey {
        (
            reg.key.clone(),
            name.to_string(),
            *digest,
            self.upstreams.identity(reg, auth),
        )
    }

    /// Remembers that the upstream let this identity read this content.
    pub(crate) fn record_access(
        &self,
        reg: &Registry,
        name: &Name,
        digest: &Digest,
        auth: &ClientAuth,
    ) {
        let key = self.access_key(reg, name, digest, auth);
        let mut m = self.access.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_AUTH_ENTRIES {
            m.retain(|_, t| t.elapsed() < AUTH_TTL);
            if m.len() >= MAX_AUTH_ENTRIES {
                m.clear();
            }
        }
        m.insert(key, Instant::now());
    }

    /// Private content (fetched with credentials) is served only to a request whose own
    /// identity the upstream accepts for that repository and digest: checked with a HEAD,
    /// remembered for [`AUTH_TTL`]. While the upstream is unreachable, an identity confirmed
    /// before keeps its access; any other is refused.
    async fn authorize(
        &self,
        reg: &Registry,
        name: &Name,
        digest: &Digest,
        manifest: bool,
        private: bool,
        auth: &ClientAuth,
    ) -> Result<(), ApiError> {
        if !private {
            return Ok(());
        }
        let key = self.access_key(reg, name, digest, auth);
        let last = self
            .access
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        if last.is_some_and(|t| t.elapsed() < AUTH_TTL) {
            return Ok(());
        }
        let (kind, accept, unknown) = if manifest {
            (
                "manifests",
                Some(MANIFEST_ACCEPT),
                ErrorCode::ManifestUnknown,
            )
        } else {
            ("blobs", None, ErrorCode::BlobUnknown)
        };
        let req = Request {
            method: Method::HEAD,
            repo: name.as_str(),
            path: format!("/v2/{name}/{kind}/{digest}"),
            accept,
            range: None,
        };
        self.count_request(reg);
        let outcome = self.upstreams.send(reg, &req, auth).await;
        let down = match outcome {
            Ok(resp) if resp.inner.status().is_success() => {
                self.record_access(reg, name, digest, auth);
                return Ok(());
            }
            Ok(resp) if !upstream_down(resp.inner.status()) => {
                info!(registry = %reg.key, repo = %name, digest = %digest, status = resp.inner.status().as_u16(), "access to private content refused");
                return Err(status_error(
                    &resp.inner,
                    unknown,
                    &format!("{name}@{digest}"),
                ));
            }
            Ok(resp) => format!("status {}", resp.inner.status().as_u16()),
            Err(e) => e.to_string(),
        };
        if last.is_some() {
            warn!(registry = %reg.key, repo = %name, digest = %digest, reason = %down, "upstream unavailable: serving private content on an earlier confirmation");
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::Unauthorized,
            "cannot confirm access to private content while the upstream is unavailable",
        ))
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        reg: &Registry,
        name: &Name,
        reference: &Reference,
        auth: &ClientAuth,
    ) -> Result<Manifest, ApiError> {
        let digest = match reference {
            Reference::Digest(d) => *d,
            Reference::Tag(t) => self.resolve_tag(reg, name, t, auth).await?,
        };
        let m = self.manifest_by_digest(reg, name, digest, auth).await?;
        if let Some(sw) = &self.swarm {
            sw.note_manifest(&m.body);
        }
        Ok(m)
    }

    async fn resolve_tag(
        self: &Arc<Self>,
        reg: &Registry,
        name: &Name,
        tag: &str,
        auth: &ClientAuth,
    ) -> Result<Digest, ApiError> {
        let cached = self.store.tag(&reg.key, name.as_str(), tag);
        if let Some((d, at)) = cached {
            if now_secs().saturating_sub(at) < self.tag_ttl.as_secs() {
                return Ok(d);
            }
        }
        let key = (
            reg.key.clone(),
            name.to_string(),
            tag.to_owned(),
            auth.fingerprint(),
        );
        let (this, reg2, name2, tag2, auth2) = (
            self.clone(),
            reg.clone(),
            name.clone(),
            tag.to_owned(),
            auth.clone(),
        );
        let result = self
            .tag_checks
            .run(key, async move {
                this.check_tag(&reg2, &name2, &tag2, &auth2).await
            })
            .await
            .unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "internal error")));
        match (result, cached) {
            (Ok(d), _) => Ok(d),
            (Err(e), Some((d, at)))
                if matches!(
                    e.oci.code,
                    ErrorCode::UpstreamUnavailable | ErrorCode::TooManyRequests
                ) =>
            {
                warn!(registry = %reg.key, repo = %name, tag, digest = %d, age_s = now_secs().saturating_sub(at),
                    "upstream unavailable: serving last-known-good digest for tag");
                self.metrics.stale_tags.inc();
                Ok(d)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Asks the upstream what a tag points at (HEAD: not counted against Docker Hub's limits).
    async fn check_tag(
        self: &Arc<Self>,
        reg: &Registry,
        name: &Name,
        tag: &str,
        auth: &ClientAuth,
    ) -> Result<Digest, ApiError> {
        let what = format!("manifest {name}:{tag}");
        let path = format!("/v2/{name}/manifests/{tag}");
        let head = Request {
            method: Method::HEAD,
            repo: name.as_str(),
            path: path.clone(),
            accept: Some(MANIFEST_ACCEPT),
            range: None,
        };
        let resp = self.send(reg, &head, auth).await?;
        let status = resp.inner.status();
        if status == StatusCode::NOT_FOUND {
            let _ = self.store.remove_tag(&reg.key, name.as_str(), tag);
        }
        if !status.is_success() {
            let e = status_error(&resp.inner, ErrorCode::ManifestUnknown, &what);
            if upstream_down(status) {
                warn!(registry = %reg.key, status = status.as_u16(), "upstream failed a tag check");
            }
            return Err(e);
        }
        let header_digest = header_digest(&resp.inner);
        let digest = match header_digest {
            Some(d) => d,
            None => {
                // No digest header: fetch the manifest by tag and hash it ourselves.
                let get = Request {
                    method: Method::GET,
                    ..head
                };
                let resp = self.send(reg, &get, auth).await?;
                if !resp.inner.status().is_success() {
                    return Err(status_error(&resp.inner, ErrorCode::ManifestUnknown, &what));
                }
                let m = self.read_manifest(reg, resp, None).await?;
                m.digest
            }
        };
        self.store
            .set_tag(&reg.key, name.as_str(), tag, &digest)
            .map_err(|e| internal("tag write", e))?;
        info!(registry = %reg.key, repo = %name, tag, digest = %digest, "tag resolved upstream");
        Ok(digest)
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        reg: &Registry,
        name: &Name,
        digest: Digest,
        auth: &ClientAuth,
    ) -> Result<Manifest, ApiError> {
        if let Some((m, private)) = self.stored_manifest(&digest) {
            self.authorize(reg, name, &digest, true, private, auth)
                .await?;
            return Ok(m);
        }
        let key = (digest, auth.fingerprint());
        let (this, reg2, name2, auth2) = (self.clone(), reg.clone(), name.clone(), auth.clone());
        self.manifest_fetches
            .run(key, async move {
                let req = Request {
                    method: Method::GET,
                    repo: name2.as_str(),
                    path: format!("/v2/{name2}/manifests/{digest}"),
                    accept: Some(MANIFEST_ACCEPT),
                    range: None,
                };
                let resp = match this.send(&reg2, &req, &auth2).await {
                    Ok(r) if r.inner.status().is_success() => r,
                    other => {
                        // The upstream cannot give it: content by digest may come from peers.
                        if let Some(m) = this.manifest_from_swarm(&digest).await {
                            return Ok(m);
                        }
                        let resp = other?;
                        return Err(status_error(
                            &resp.inner,
                            ErrorCode::ManifestUnknown,
                            &format!("manifest {digest}"),
                        ));
                    }
                };
                let m = this.read_manifest(&reg2, resp, Some(digest)).await?;
                this.record_access(&reg2, &name2, &digest, &auth2);
                Ok(m)
            })
            .await
            .unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "internal error")))
    }

    fn stored_manifest(&self, digest: &Digest) -> Option<(Manifest, bool)> {
        let (body, meta) = self.store.read_small(digest, MAX_MANIFEST_BYTES)?;
        let media_type = meta
            .media_type
            .or_else(|| media::sniff_manifest_type(&body))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        Some((
            Manifest {
                digest: *digest,
                media_type,
                body: Bytes::from(body),
            },
            meta.private,
        ))
    }

    /// Reads, verifies and stores a manifest body.
    async fn read_manifest(
        &self,
        reg: &Registry,
        resp: crate::upstream::Response,
        expected: Option<Digest>,
    ) -> Result<Manifest, ApiError> {
        let media_type = content_type(&resp.inner);
        let header_digest = header_digest(&resp.inner);
        let private = resp.authenticated;
        let body = read_limited(resp.inner, MAX_MANIFEST_BYTES, self.upstreams.timeout())
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::UpstreamUnavailable,
                    format!("upstream manifest: {e}"),
                )
            })?;
        self.count_upstream(reg, body.len() as u64);
        let digest = Digest::of(&body);
        if let Some(want) = expected.or(header_digest) {
            if want != digest {
                self.metrics.digest_mismatches.inc();
                warn!(registry = %reg.key, expected = %want, actual = %digest, "upstream manifest does not match its digest");
                return Err(ApiError::new(
                    ErrorCode::UpstreamUnavailable,
                    "upstream manifest does not match its digest",
                ));
            }
        }
        let media_type = media_type
            .filter(|t| t != "application/octet-stream" && t != "text/plain")
            .or_else(|| media::sniff_manifest_type(&body))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        self.store_manifest(digest, body, media_type, private).await
    }

    async fn store_manifest(
        &self,
        digest: Digest,
        body: Vec<u8>,
        media_type: String,
        private: bool,
    ) -> Result<Manifest, ApiError> {
        let store = self.store.clone();
        let (b2, mt2) = (body.clone(), media_type.clone());
        tokio::task::spawn_blocking(move || store.put_small(&digest, &b2, Some(mt2), private))
            .await
            .map_err(|e| internal("manifest store task", e))?
            .map_err(|e| internal("manifest store", e))?;
        if let (Some(sw), false) = (&self.swarm, private) {
            sw.provide(digest);
        }
        Ok(Manifest {
            digest,
            media_type,
            body: Bytes::from(body),
        })
    }

    /// A manifest (or any small blob) by digest from peers, verified chunk by chunk and again
    /// as a whole before it is stored.
    async fn manifest_from_swarm(&self, digest: &Digest) -> Option<Manifest> {
        let sw = self.swarm.as_ref()?;
        let body = sw.fetch_small(digest, MAX_MANIFEST_BYTES).await?;
        if Digest::of(&body) != *digest {
            return None;
        }
        let media_type =
            media::sniff_manifest_type(&body).unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        info!(digest = %digest, "manifest fetched from peers");
        self.store_manifest(*digest, body, media_type, false)
            .await
            .ok()
    }

    /// Size of a blob, for `HEAD`, without downloading it.
    pub async fn blob_head(
        &self,
        reg: &Registry,
        name: &Name,
        digest: &Digest,
        auth: &ClientAuth,
    ) -> Result<BlobHead, ApiError> {
        if let Some(m) = self.store.meta(digest) {
            self.authorize(reg, name, digest, false, m.private, auth)
                .await?;
            return Ok(BlobHead { size: Some(m.size) });
        }
        if let Some(t) = self.arriving_transfer(digest) {
            if t.size.is_some() {
                self.authorize(reg, name, digest, false, t.private, auth)
                    .await?;
                return Ok(BlobHead { size: t.size });
            }
        }
        let req = Request {
            method: Method::HEAD,
            repo: name.as_str(),
            path: format!("/v2/{name}/blobs/{digest}"),
            accept: None,
            range: None,
        };
        let resp = self.send(reg, &req, auth).await?;
        if !resp.inner.status().is_success() {
            return Err(status_error(
                &resp.inner,
                ErrorCode::BlobUnknown,
                &format!("blob {digest}"),
            ));
        }
        // The header itself: the body of an answer to HEAD is empty, so its size hint
        // (`content_length()`) says 0.
        let size = resp
            .inner
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        Ok(BlobHead { size })
    }

    pub(crate) fn insert_arriving(&self, digest: Digest, t: Arc<Transfer>) {
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, t);
    }

    /// Ends an arriving transfer: forgets it, accounts it, and tells its readers.
    pub(crate) fn finish_arriving(
        &self,
        digest: &Digest,
        outcome: Result<(), String>,
        tx: &watch::Sender<Progress>,
    ) {
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        self.pulls.finished(digest, &outcome);
        tx.send_modify(|p| p.done = Some(outcome));
    }

    fn arriving_transfer(&self, digest: &Digest) -> Option<Arc<Transfer>> {
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    /// A blob: from the store, joining an arriving transfer, or fetched from the upstream.
    pub async fn blob(
        self: &Arc<Self>,
        reg: &Registry,
        name: &Name,
        digest: Digest,
        auth: &ClientAuth,
    ) -> Result<Blob, ApiError> {
        for _ in 0..3 {
            if let Some(b) = self.store.open_blob(&digest) {
                self.authorize(reg, name, &digest, false, b.meta.private, auth)
                    .await?;
                return Ok(Blob::Stored(b));
            }
            if let Some(t) = self.arriving_transfer(&digest) {
                self.authorize(reg, name, &digest, false, t.private, auth)
                    .await?;
                return Ok(Blob::Arriving(t));
            }
            let key = (digest, auth.fingerprint());
            let (this, reg2, name2, auth2) =
                (self.clone(), reg.clone(), name.clone(), auth.clone());
            let started = self
                .blob_starts
                .run(key, async move {
                    this.start_fetch(&reg2, &name2, digest, &auth2).await
                })
                .await
                .unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "internal error")))?;
            if let Some(t) = started {
                // The flight was this identity's own upstream request, or one it joined.
                self.authorize(reg, name, &digest, false, t.private, auth)
                    .await?;
                return Ok(Blob::Arriving(t));
            }
            // None: it completed in the meantime; open it from the store.
        }
        Err(ApiError::new(
            ErrorCode::Internal,
            "blob vanished while opening",
        ))
    }

    async fn start_fetch(
        self: &Arc<Self>,
        reg: &Registry,
        name: &Name,
        digest: Digest,
        auth: &ClientAuth,
    ) -> Result<Option<Arc<Transfer>>, ApiError> {
        if self.store.contains(&digest) {
            return Ok(None);
        }
        if let Some(t) = self.arriving_transfer(&digest) {
            return Ok(Some(t));
        }
        if let Some(sw) = self.swarm.clone() {
            if let Some(t) = self.swarm_fetch(&sw, reg, name, digest, auth).await {
                return Ok(Some(t));
            }
            if let Some(t) = self.arriving_transfer(&digest) {
                return Ok(Some(t));
            }
        }
        let req = Request {
            method: Method::GET,
            repo: name.as_str(),
            path: format!("/v2/{name}/blobs/{digest}"),
            accept: None,
            range: None,
        };
        let resp = self.send(reg, &req, auth).await?;
        if !resp.inner.status().is_success() {
            return Err(status_error(
                &resp.inner,
                ErrorCode::BlobUnknown,
                &format!("blob {digest}"),
            ));
        }
        let size = resp.inner.content_length();
        let private = resp.authenticated;
        self.record_access(reg, name, &digest, auth);
        let writer = self
            .store
            .writer(&digest)
            .map_err(|e| internal("partial file", e))?;
        let file = writer.reader().map_err(|e| internal("partial file", e))?;
        let (tx, rx) = watch::channel(Progress::default());
        let transfer = Arc::new(Transfer {
            digest,
            size,
            file,
            progress: rx,
            private,
            source: "upstream",
        });
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, transfer.clone());
        info!(registry = %reg.key, repo = %name, digest = %digest, size, "fetching blob from upstream");
        self.pulls.fetching(&digest, size);
        let this = self.clone();
        let reg = reg.clone();
        tokio::spawn(async move { this.stream_blob(reg, resp, writer, tx, size, digest).await });
        Ok(Some(transfer))
    }

    /// Copies an upstream body into the partial file, then verifies and commits it.
    async fn stream_blob(
        self: Arc<Self>,
        reg: Registry,
        resp: crate::upstream::Response,
        mut writer: BlobWriter,
        tx: watch::Sender<Progress>,
        size: Option<u64>,
        digest: Digest,
    ) {
        let private = resp.authenticated;
        let mut body = resp.inner;
        let timeout = self.upstreams.timeout();
        // Shared with peers while it arrives (blobs of known size; private ones only to peers
        // showing a grant this registry accepts): announced now, each chunk served once hashed
        // into the table prefix.
        let origin = private.then(|| reg.key.clone());
        let sharing = self.share_arriving(&writer, digest, size, origin.clone());
        // A blob of more than a chunk of the configured size: this node's other swarm downloads
        // wait for it (small ones, a config, take no time worth holding anything for).
        let import_started = Instant::now();
        let mut importing = sharing
            .as_ref()
            .filter(|_| size.is_some_and(|s| s > u64::from(self.store.max_chunk_size())))
            .and(self.swarm.as_ref())
            .map(|sw| sw.import());
        let copied: Result<(), String> = loop {
            match tokio::time::timeout(timeout, body.chunk()).await {
                Err(_) => break Err("upstream stalled".into()),
                Ok(Err(e)) => break Err(format!("upstream read failed: {e}")),
                Ok(Ok(None)) => break Ok(()),
                Ok(Ok(Some(chunk))) => {
                    if size.is_some_and(|s| writer.written() + chunk.len() as u64 > s) {
                        break Err("upstream sent more bytes than announced".into());
                    }
                    // A write into the page cache: short enough to do on the runtime.
                    if let Err(e) = writer.write(&chunk) {
                        break Err(format!("store write failed: {e}"));
                    }
                    self.count_upstream(&reg, chunk.len() as u64);
                    self.pulls.from_upstream(&digest, chunk.len() as u64);
                    if let Some(sw) = &self.swarm {
                        sw.received(chunk.len() as u64);
                    }
                    let written = writer.written();
                    // Past `IMPORT_HOLD_PERCENT`, or `IMPORT_HOLD_MAX_MS` into the import, this
                    // node's other downloads go on.
                    let held_enough = size.is_some_and(|s| {
                        u128::from(written) * 100
                            >= u128::from(s)
                                * u128::from(shoal_protocol::swarm::IMPORT_HOLD_PERCENT)
                    });
                    let long = import_started.elapsed()
                        >= Duration::from_millis(shoal_protocol::swarm::IMPORT_HOLD_MAX_MS);
                    if held_enough || long {
                        importing = None;
                    }
                    tx.send_modify(|p| p.written = written);
                    if let (Some(reg), Some(size)) = (&sharing, size) {
                        publish_progress(reg.arriving(), &writer, size);
                    }
                }
            }
        };
        drop(importing);
        let outcome = match copied {
            Ok(()) => {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || {
                    // The origin first: once committed, the blob may be asked for at once.
                    if let Some(o) = &origin {
                        store
                            .set_origin(&digest, o)
                            .map_err(std::io::Error::other)?;
                    }
                    writer.commit(&store, size, None, private)
                })
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e @ CommitError::DigestMismatch { .. })) => {
                        self.metrics.digest_mismatches.inc();
                        Err(e.to_string())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("commit task failed: {e}")),
                }
            }
            Err(e) => Err(e),
        };
        match &outcome {
            Ok(()) => {
                info!(registry = %reg.key, digest = %digest, "blob verified and stored");
                if let Some(sw) = &self.swarm {
                    sw.provide(digest);
                }
            }
            Err(e) => {
                warn!(registry = %reg.key, digest = %digest, error = %e, "blob fetch failed; partial data discarded");
                if let (Some(sw), Some(_)) = (&self.swarm, &sharing) {
                    sw.withdraw(digest);
                }
            }
        }
        // Committed (the store serves it now) or failed: no longer served as arriving.
        drop(sharing);
        self.finish_arriving(&digest, outcome, &tx);
    }

    /// Registers a blob streamed from the upstream as arriving, and announces it, when this node
    /// is in a swarm and the blob is of known size. `origin`: the registry key of a private
    /// blob (`None`: public).
    fn share_arriving(
        &self,
        writer: &BlobWriter,
        digest: Digest,
        size: Option<u64>,
        origin: Option<String>,
    ) -> Option<crate::arriving::Registration> {
        let sw = self.swarm.as_ref()?;
        let layout =
            shoal_protocol::chunk::ChunkLayout::new(size?, self.store.chunk_size_for(size?))
                .ok()?;
        let file = writer.reader().ok()?;
        let mut arriving = crate::arriving::Arriving::new(digest, layout, file);
        if let Some(o) = origin {
            arriving = arriving.private(o);
        }
        let arriving = Arc::new(arriving);
        let registration = self.store.arriving().register(arriving);
        sw.provide(digest);
        Some(registration)
    }

    /// Passes a read-only request (tags list, referrers) through to the upstream.
    pub async fn passthrough(
        &self,
        reg: &Registry,
        name: &Name,
        path: String,
        auth: &ClientAuth,
    ) -> Result<(StatusCode, Option<String>, Option<HeaderValue>, Bytes), ApiError> {
        let req = Request {
            method: Method::GET,
            repo: name.as_str(),
            path,
            accept: Some("application/json, application/vnd.oci.image.index.v1+json"),
            range: None,
        };
        let resp = self.send(reg, &req, auth).await?;
        let status = resp.inner.status();
        if !status.is_success() {
            return Err(status_error(
                &resp.inner,
                ErrorCode::NameUnknown,
                &format!("repository {name}"),
            ));
        }
        let ct = content_type(&resp.inner);
        let link = resp.inner.headers().get(http::header::LINK).cloned();
        let body = read_limited(resp.inner, MAX_MANIFEST_BYTES, self.upstreams.timeout())
            .await
            .map_err(|e| ApiError::new(ErrorCode::UpstreamUnavailable, format!("upstream: {e}")))?;
        Ok((status, ct, link, Bytes::from(body)))
    }
}

/// Publishes what an in-order upstream stream has hashed and written: the table prefix, and the
/// chunks it covers that are wholly on disk.
fn publish_progress(arriving: &crate::arriving::Arriving, writer: &BlobWriter, size: u64) {
    let known = writer.states_known(size);
    let layout = arriving.layout();
    let complete = writer.written() == size;
    if known == 0 && !complete {
        return;
    }
    if (known as u32) > arriving.covered() || complete {
        if let Some(prefix) = writer.prefix(size) {
            let _ = arriving.merge_prefix(&prefix);
        }
    }
    // Chunks wholly written; the last one only with the whole blob (it is then checked against
    // the digest by whoever fetches it, and by the commit that follows).
    let written_chunks = if complete {
        layout.count()
    } else {
        (writer.written() / u64::from(layout.chunk_size())) as u32
    };
    arriving.mark_first(written_chunks.min(arriving.covered()));
}
