//! A small in-memory origin registry: the upstream of `shoal demo` and of the integration
//! tests. It serves the read side of the Distribution API from memory, counts every byte it
//! sends (so tests measure upstream egress at the origin, not through Shoal's own metrics), and
//! can misbehave on purpose: require Basic or Bearer auth, corrupt blobs, hang, fail with 500.
//!
//! Non-goal: being a general registry. Content is put in through its handle, not by push.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shoal_protocol::range::parse_range;
use shoal_protocol::{Digest, Route};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};

/// How the origin misbehaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Fault {
    /// Behaves.
    #[default]
    None,
    /// Flips a byte in the middle of every blob body.
    CorruptBlobs,
    /// Sends blob headers, then never sends the body.
    HangBlobs,
    /// Sends the first this many bytes of each blob body, then nothing more (an upstream that
    /// stalls mid-blob).
    HangBlobsAfter(u64),
    /// Answers 500 to everything but `/token`.
    ServerError,
    /// Sends blob bodies at this many bytes per second (a slow upstream link).
    SlowBlobs(u64),
}

/// Which authentication the origin demands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// None.
    #[default]
    Anonymous,
    /// HTTP Basic with this user and password.
    Basic(String, String),
    /// The token flow: `/token` issues a token for this user and password.
    Bearer(String, String),
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Bytes>,
    manifests: HashMap<Digest, (String, Bytes)>,
    tags: HashMap<(String, String), Digest>,
    fault: Fault,
    auth: Auth,
    /// Repositories readable without credentials even when auth is on.
    public_repos: Vec<String>,
}

/// A running origin. Stops when dropped.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    blob_bytes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    cancel: CancellationToken,
}

const TOKEN: &str = "origin-test-token";

impl Origin {
    /// Starts an origin on `127.0.0.1` with an ephemeral port.
    pub async fn start() -> std::io::Result<Origin> {
        Self::start_on("127.0.0.1:0".parse().expect("literal address")).await
    }

    /// Starts an origin on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let o = Origin {
            addr,
            state: Arc::new(Mutex::new(State::default())),
            blob_bytes: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
            cancel: CancellationToken::new(),
        };
        let (state, bytes, reqs, cancel) = (
            o.state.clone(),
            o.blob_bytes.clone(),
            o.requests.clone(),
            o.cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (state, bytes, reqs, cancel) =
                    (state.clone(), bytes.clone(), reqs.clone(), cancel.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (state, bytes, reqs) = (state.clone(), bytes.clone(), reqs.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(serve(
                                &state, &bytes, &reqs, addr, req,
                            ))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! { _ = conn => {}, _ = cancel.cancelled() => {} }
                });
            }
        });
        Ok(o)
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a blob; returns its digest.
    pub fn put_blob(&self, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let d = Digest::of(&data);
        self.lock().blobs.insert(d, data);
        d
    }

    /// Adds a manifest and, if `tag` is given, points the tag at it.
    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: impl Into<Bytes>,
    ) -> Digest {
        let body = body.into();
        let d = Digest::of(&body);
        let mut s = self.lock();
        s.manifests.insert(d, (media_type.to_owned(), body));
        if let Some(t) = tag {
            s.tags.insert((repo.to_owned(), t.to_owned()), d);
        }
        d
    }

    /// Deletes a tag.
    pub fn remove_tag(&self, repo: &str, tag: &str) {
        self.lock().tags.remove(&(repo.to_owned(), tag.to_owned()));
    }

    /// Sets the fault mode.
    pub fn set_fault(&self, f: Fault) {
        self.lock().fault = f;
    }

    /// Sets the authentication mode; `public` repositories stay readable anonymously.
    pub fn set_auth(&self, a: Auth, public: &[&str]) {
        let mut s = self.lock();
        s.auth = a;
        s.public_repos = public.iter().map(|p| p.to_string()).collect();
    }

    /// Blob body bytes sent so far.
    pub fn blob_bytes_served(&self) -> u64 {
        self.blob_bytes.load(Ordering::Relaxed)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops serving (new and open connections).
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r
}

fn err(status: StatusCode, code: &str) -> Response<Body> {
    let mut r = respond(
        status,
        format!("{{\"errors\":[{{\"code\":\"{code}\",\"message\":\"origin\"}}]}}"),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn authorized(s: &State, req: &Request<Incoming>, repo: Option<&str>) -> bool {
    if repo.is_some_and(|r| s.public_repos.iter().any(|p| p == r)) {
        return true;
    }
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match &s.auth {
        Auth::Anonymous => true,
        Auth::Basic(u, p) => {
            got == format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        }
        Auth::Bearer(..) => got == format!("Bearer {TOKEN}"),
    }
}

fn serve(
    state: &Mutex<State>,
    bytes: &AtomicU64,
    reqs: &AtomicU64,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    reqs.fetch_add(1, Ordering::Relaxed);
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    let path = req.uri().path().to_owned();
    if path == "/token" {
        if let Auth::Bearer(u, p) = &s.auth {
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            );
            let got = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            // Anonymous callers get a token too, but one that opens only public repositories.
            let token = if got == want { TOKEN } else { "anonymous" };
            return respond(
                StatusCode::OK,
                format!("{{\"token\":\"{token}\",\"expires_in\":300}}"),
            );
        }
        return err(StatusCode::NOT_FOUND, "UNSUPPORTED");
    }
    if s.fault == Fault::ServerError {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN");
    }
    let route = match Route::parse(&path) {
        Ok(r) => r,
        Err(_) => return err(StatusCode::NOT_FOUND, "UNSUPPORTED"),
    };
    let repo = match &route {
        Route::Base => None,
        Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::TagsList { name }
        | Route::Referrers { name, .. } => Some(name.to_string()),
    };
    if !authorized(&s, &req, repo.as_deref()) {
        let mut r = err(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let challenge = match &s.auth {
            Auth::Basic(..) => "Basic realm=\"origin\"".to_owned(),
            _ => format!(
                "Bearer realm=\"http://{addr}/token\",service=\"origin\",scope=\"repository:{}:pull\"",
                repo.unwrap_or_default()
            ),
        };
        if let Ok(v) = header::HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }
    let head = req.method() == Method::HEAD;
    match route {
        Route::Base => respond(StatusCode::OK, "{}"),
        Route::Manifest { name, reference } => {
            let d = match reference {
                shoal_protocol::Reference::Digest(d) => Some(d),
                shoal_protocol::Reference::Tag(t) => s.tags.get(&(name.to_string(), t)).copied(),
            };
            match d.and_then(|d| s.manifests.get(&d).map(|m| (d, m))) {
                None => err(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
                Some((d, (mt, body))) => {
                    let mut r = respond(
                        StatusCode::OK,
                        if head { Bytes::new() } else { body.clone() },
                    );
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        mt.parse().expect("media type is a header value"),
                    );
                    h.insert(header::CONTENT_LENGTH, body.len().into());
                    h.insert(
                        "docker-content-digest",
                        d.to_string().parse().expect("digest is a header value"),
                    );
                    r
                }
            }
        }
        Route::Blob { digest, .. } => {
            let Some(data) = s.blobs.get(&digest).cloned() else {
                return err(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
            };
            let size = data.len() as u64;
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|h| parse_range(h, size).ok().flatten());
            let (status, slice) = match range {
                Some(r) => (
                    StatusCode::PARTIAL_CONTENT,
                    data.slice(r.start as usize..=r.end as usize),
                ),
                None => (StatusCode::OK, data),
            };
            let len = slice.len();
            let body = if head {
                body::empty()
            } else {
                let slice = if s.fault == Fault::CorruptBlobs && !slice.is_empty() {
                    let mut v = slice.to_vec();
                    let mid = v.len() / 2;
                    v[mid] ^= 0xff;
                    Bytes::from(v)
                } else {
                    slice
                };
                bytes.fetch_add(len as u64, Ordering::Relaxed);
                match s.fault {
                    Fault::HangBlobs => hanging_body(),
                    Fault::HangBlobsAfter(n) => {
                        stalling_body(slice.slice(..slice.len().min(n as usize)))
                    }
                    Fault::SlowBlobs(rate) => throttled(slice, rate),
                    _ => chunked(slice),
                }
            };
            let mut r = Response::new(body);
            *r.status_mut() = status;
            r.headers_mut().insert(header::CONTENT_LENGTH, len.into());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        Route::TagsList { name } => {
            let mut tags: Vec<&str> = s
                .tags
                .keys()
                .filter(|(r, _)| *r == name.as_str())
                .map(|(_, t)| t.as_str())
                .collect();
            tags.sort();
            let body = serde_json::json!({ "name": name.as_str(), "tags": tags }).to_string();
            respond(StatusCode::OK, body)
        }
        Route::Referrers { .. } => {
            let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
            let mut r = respond(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
            );
            r
        }
    }
}

/// A body sent in 256 KiB pieces with a yield between them, so that readers see it arrive.
fn chunked(data: Bytes) -> Body {
    use http_body_util::{BodyExt, StreamBody};
    let pieces: Vec<Bytes> = (0..data.len())
        .step_by(256 << 10)
        .map(|i| data.slice(i..(i + (256 << 10)).min(data.len())))
        .collect();
    let s = futures::stream::iter(pieces.into_iter().map(|b| Ok(hyper::body::Frame::data(b))));
    StreamBody::new(s).boxed()
}

/// `data` in 64 KiB pieces, each sent when the rate allows.
fn throttled(data: Bytes, bytes_per_sec: u64) -> Body {
    use http_body_util::{BodyExt, StreamBody};
    const PIECE: usize = 64 << 10;
    let pause = Duration::from_secs_f64(PIECE as f64 / bytes_per_sec.max(1) as f64);
    let s = futures::stream::unfold(data, move |rest| async move {
        if rest.is_empty() {
            return None;
        }
        tokio::time::sleep(pause).await;
        let n = rest.len().min(PIECE);
        Some((
            Ok(hyper::body::Frame::data(rest.slice(..n))),
            rest.slice(n..),
        ))
    });
    StreamBody::new(s).boxed()
}

/// An hour of nothing, then an empty frame: a body that stalls.
fn stall() -> impl futures::Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>> {
    futures::stream::once(async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(hyper::body::Frame::data(Bytes::new()))
    })
}

/// `head`, then nothing more for an hour.
fn stalling_body(head: Bytes) -> Body {
    use http_body_util::{BodyExt, StreamBody};
    let s = futures::StreamExt::chain(
        futures::stream::iter([Ok(hyper::body::Frame::data(head))]),
        stall(),
    );
    StreamBody::new(s).boxed()
}

fn hanging_body() -> Body {
    use http_body_util::{BodyExt, StreamBody};
    StreamBody::new(stall()).boxed()
}
