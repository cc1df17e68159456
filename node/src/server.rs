//! The HTTP front: `/v2` (read side of the OCI Distribution API) and `/metrics`.
//!
//! Every request gets one log line. Every error leaves as OCI error JSON with its status;
//! internal details stay in the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use shoal_protocol::range::parse_range;
use shoal_protocol::{ByteRange, ErrorCode, RangeError, Route, RouteError};
use tracing::info;

use crate::body::{self, Body};
use crate::metrics::RequestLabels;
use crate::mirror::{ApiError, Blob, Mirror};
use crate::upstream::ClientAuth;

const API_VERSION: &str = "registry/2.0";

fn error_response(e: &ApiError, head_only: bool) -> Response<Body> {
    let json = e.oci.to_json();
    let len = json.len();
    let mut r = Response::builder()
        .status(StatusCode::from_u16(e.oci.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .header("docker-distribution-api-version", API_VERSION);
    if let Some(c) = &e.challenge {
        r = r.header(header::WWW_AUTHENTICATE, c.clone());
    }
    let b = if head_only {
        body::empty()
    } else {
        body::full(json)
    };
    r.body(b).unwrap_or_else(|_| Response::new(body::empty()))
}

fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::NotFound => ApiError::new(
            ErrorCode::Unsupported,
            "no such endpoint on this read-only mirror",
        ),
        RouteError::Name(n) => ApiError::new(
            ErrorCode::NameInvalid,
            format!("invalid repository name: {n}"),
        ),
        RouteError::Digest(d) => {
            ApiError::new(ErrorCode::DigestInvalid, format!("invalid digest: {d}"))
        }
        RouteError::Reference(r) => ApiError::new(
            ErrorCode::ManifestInvalid,
            format!("invalid reference: {r}"),
        ),
    }
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

/// The query without `ns`, re-encoded, for passing through.
fn forwarded_query(pairs: &[(String, String)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(k, _)| k != "ns") {
        s.append_pair(k, v);
    }
    let out = s.finish();
    if out.is_empty() {
        out
    } else {
        format!("?{out}")
    }
}

fn route_label(r: &Result<Route, RouteError>, path: &str) -> &'static str {
    match r {
        _ if path == "/metrics" => "metrics",
        _ if path == "/_shoal/pulls" => "pulls",
        Ok(Route::Base) => "base",
        Ok(Route::Manifest { .. }) => "manifest",
        Ok(Route::Blob { .. }) => "blob",
        Ok(Route::TagsList { .. }) => "tags",
        Ok(Route::Referrers { .. }) => "referrers",
        Err(_) => "other",
    }
}

/// Serves one request. Never fails: errors become OCI error responses.
pub async fn handle(
    mirror: Arc<Mirror>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = Route::parse(&path);
    let label = route_label(&route, &path);
    let resp = dispatch(&mirror, &req, route).await;
    let status = resp.status().as_u16();
    mirror
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: label,
            method: method.to_string(),
            status,
        })
        .inc();
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    info!(
        method = %method,
        uri = %req.uri(),
        status,
        bytes = %len,
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    Ok(resp)
}

async fn dispatch(
    mirror: &Arc<Mirror>,
    req: &Request<Incoming>,
    route: Result<Route, RouteError>,
) -> Response<Body> {
    let head_only = req.method() == Method::HEAD;
    let head_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().to_string().len();
    if head_bytes > crate::MAX_HEADER_BYTES {
        // hyper's own limit applies only when the head spans several reads; enforce it here too.
        let mut r = error_response(
            &ApiError::new(ErrorCode::Unsupported, "request head too large"),
            head_only,
        );
        *r.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let e = ApiError::new(
            ErrorCode::Unsupported,
            "this mirror is read-only: only GET and HEAD",
        );
        return error_response(&e, false);
    }
    if req.uri().path() == "/metrics" {
        mirror
            .metrics
            .cache_bytes
            .set(mirror.store.total_bytes() as i64);
        mirror
            .metrics
            .cache_blobs
            .set(mirror.store.blob_count() as i64);
        let ev = mirror.store.evictions();
        let seen = mirror.metrics.cache_evictions.get();
        mirror
            .metrics
            .cache_evictions
            .inc_by(ev.saturating_sub(seen));
        return Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(body::full(mirror.metrics.encode()))
            .unwrap_or_else(|_| Response::new(body::empty()));
    }
    if req.uri().path() == "/_shoal/pulls" {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body::full(mirror.pulls.to_json()))
            .unwrap_or_else(|_| Response::new(body::empty()));
    }
    let route = match route {
        Ok(r) => r,
        Err(e) => return error_response(&route_error(e), head_only),
    };
    let pairs = query_pairs(req.uri().query());
    let ns: HashMap<&str, &str> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let Some(reg) = mirror.upstreams.route(ns.get("ns").copied()) else {
        return error_response(
            &ApiError::new(ErrorCode::NameInvalid, "invalid ns registry host"),
            head_only,
        );
    };
    let auth = ClientAuth(req.headers().get(header::AUTHORIZATION).cloned());
    let result = match route {
        Route::Base => Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header("docker-distribution-api-version", API_VERSION)
            .body(body::full("{}"))
            .unwrap_or_else(|_| Response::new(body::empty()))),
        Route::Manifest { name, reference } => mirror
            .manifest(&reg, &name, &reference, &auth)
            .await
            .map(|m| {
                Response::builder()
                    .header(header::CONTENT_TYPE, m.media_type)
                    .header(header::CONTENT_LENGTH, m.body.len())
                    .header("docker-content-digest", m.digest.to_string())
                    .header(header::ETAG, format!("\"{}\"", m.digest))
                    .header("docker-distribution-api-version", API_VERSION)
                    .body(if head_only {
                        body::empty()
                    } else {
                        body::full(m.body)
                    })
                    .unwrap_or_else(|_| Response::new(body::empty()))
            }),
        Route::Blob { name, digest } => {
            let range = req
                .headers()
                .get(header::RANGE)
                .map(|v| v.to_str().unwrap_or("\u{0}").to_owned());
            if head_only {
                mirror
                    .blob_head(&reg, &name, &digest, &auth)
                    .await
                    .map(|h| {
                        let mut r = Response::builder()
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header(header::ACCEPT_RANGES, "bytes")
                            .header("docker-content-digest", digest.to_string())
                            .header("docker-distribution-api-version", API_VERSION);
                        if let Some(s) = h.size {
                            r = r.header(header::CONTENT_LENGTH, s);
                        }
                        r.body(body::empty())
                            .unwrap_or_else(|_| Response::new(body::empty()))
                    })
            } else {
                serve_blob(mirror, &reg, &name, digest, range, &auth).await
            }
        }
        Route::TagsList { name } => {
            let path = format!("/v2/{name}/tags/list{}", forwarded_query(&pairs));
            passthrough(mirror, &reg, &name, path, &auth, head_only).await
        }
        Route::Referrers { name, digest } => {
            let path = format!("/v2/{name}/referrers/{digest}{}", forwarded_query(&pairs));
            passthrough(mirror, &reg, &name, path, &auth, head_only).await
        }
    };
    result.unwrap_or_else(|e| error_response(&e, head_only))
}

async fn passthrough(
    mirror: &Arc<Mirror>,
    reg: &crate::upstream::Registry,
    name: &shoal_protocol::Name,
    path: String,
    auth: &ClientAuth,
    head_only: bool,
) -> Result<Response<Body>, ApiError> {
    let (status, ct, link, body) = mirror.passthrough(reg, name, path, auth).await?;
    let mut r = Response::builder()
        .status(status)
        .header(
            header::CONTENT_TYPE,
            ct.unwrap_or_else(|| "application/json".into()),
        )
        .header(header::CONTENT_LENGTH, body.len())
        .header("docker-distribution-api-version", API_VERSION);
    if let Some(l) = link {
        r = r.header(header::LINK, l);
    }
    Ok(r.body(if head_only {
        body::empty()
    } else {
        body::full(body)
    })
    .unwrap_or_else(|_| Response::new(body::empty())))
}

fn range_error(e: RangeError) -> ApiError {
    ApiError::new(ErrorCode::RangeInvalid, e.to_string())
}

async fn serve_blob(
    mirror: &Arc<Mirror>,
    reg: &crate::upstream::Registry,
    name: &shoal_protocol::Name,
    digest: shoal_protocol::Digest,
    range: Option<String>,
    auth: &ClientAuth,
) -> Result<Response<Body>, ApiError> {
    let mut blob = mirror.blob(reg, name, digest, auth).await?;
    if range.is_some() {
        // Ranges are served from verified bytes only: wait for an arriving blob to complete.
        if let Blob::Arriving(t) = &blob {
            let mut rx = t.progress.clone();
            let done = rx
                .wait_for(|p| p.done.is_some())
                .await
                .map(|p| p.done.clone());
            match done {
                Ok(Some(Ok(()))) => blob = mirror.blob(reg, name, digest, auth).await?,
                _ => {
                    return Err(ApiError::new(
                        ErrorCode::UpstreamUnavailable,
                        "blob fetch from upstream failed",
                    ))
                }
            }
        }
    }
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header("docker-distribution-api-version", API_VERSION);
    let resp = match blob {
        Blob::Stored(b) => {
            let size = b.meta.size;
            let r: Option<ByteRange> = match &range {
                Some(h) => parse_range(h, size).map_err(range_error)?,
                None => None,
            };
            match r {
                Some(r) => builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_RANGE, r.content_range(size))
                    .header(header::CONTENT_LENGTH, r.len())
                    .body(body::stored(
                        b.file,
                        r.start,
                        r.end + 1,
                        b.pin,
                        mirror.clone(),
                    )),
                None => builder
                    .header(header::CONTENT_LENGTH, size)
                    .body(body::stored(b.file, 0, size, b.pin, mirror.clone())),
            }
        }
        Blob::Arriving(t) => {
            let mut b = builder;
            if let Some(s) = t.size {
                b = b.header(header::CONTENT_LENGTH, s);
            }
            b.body(body::arriving(t, 0, mirror.clone()))
        }
    };
    Ok(resp.unwrap_or_else(|_| Response::new(body::empty())))
}
