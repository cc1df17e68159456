//! The pull-through mirror against an in-process origin: API, caching, tags, faults, bad input.

use std::time::Duration;

use reqwest::StatusCode;
use shoal_node::origin::{Auth, Fault, Origin};
use shoal_protocol::media::{DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};
use shoal_protocol::Digest;
use shoal_tests::{pseudo_random, Pair};

fn manifest_for(config: &Digest, layers: &[(Digest, usize)]) -> String {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, n)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 2},
        "layers": layers,
    })
    .to_string()
}

async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.expect("OCI error JSON");
    (
        status,
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn pulls_by_tag_and_digest_with_correct_headers() {
    let p = Pair::start(|_| {}).await;
    let layer = pseudo_random(3 << 20, 1);
    let ld = p.origin.put_blob(layer.clone());
    let cd = p.origin.put_blob(&b"{}"[..]);
    let body = manifest_for(&cd, &[(ld, layer.len())]);
    let md = p
        .origin
        .put_manifest("a/b/c", Some("v1"), OCI_MANIFEST, body.clone());

    let r = p.http.get(p.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    for reference in ["v1".to_string(), md.to_string()] {
        let r = p
            .http
            .get(p.url(&format!("/v2/a/b/c/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            md.to_string().as_str()
        );
        assert_eq!(
            r.headers()["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(
            r.bytes().await.unwrap(),
            body.as_bytes(),
            "manifest must pass through byte-exact"
        );
    }
    let r = p
        .http
        .head(p.url("/v2/a/b/c/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        body.len().to_string().as_str()
    );

    let r = p
        .http
        .get(p.url(&format!("/v2/a/b/c/blobs/{ld}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        layer.len().to_string().as_str()
    );
    assert_eq!(
        r.headers()["docker-content-digest"],
        ld.to_string().as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), layer);
    let served = p.origin.blob_bytes_served();
    assert_eq!(served, layer.len() as u64);

    // The second pull comes from the store.
    let r = p
        .http
        .get(p.url(&format!("/v2/a/b/c/blobs/{ld}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), layer);
    assert_eq!(p.origin.blob_bytes_served(), served);
    let r = p
        .http
        .head(p.url(&format!("/v2/a/b/c/blobs/{ld}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        layer.len().to_string().as_str()
    );

    let metrics = p
        .http
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shoal_served_bytes_total{source=\"cache\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shoal_upstream_fetched_bytes_total{registry=\"default\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shoal_http_requests_total{route=\"blob\",method=\"GET\",status=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("shoal_cache_bytes "), "{metrics}");
}

/// HEAD of a blob not cached yet answers the upstream's size (not the empty body's 0), and
/// downloads nothing.
#[tokio::test]
async fn head_of_an_uncached_blob_has_its_size() {
    let p = Pair::start(|_| {}).await;
    let layer = pseudo_random(3 << 20, 2);
    let ld = p.origin.put_blob(layer.clone());
    let r = p
        .http
        .head(p.url(&format!("/v2/a/b/c/blobs/{ld}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        layer.len().to_string().as_str()
    );
    assert_eq!(p.origin.blob_bytes_served(), 0);
}

#[tokio::test]
async fn every_manifest_kind_passes_through_byte_exact() {
    let p = Pair::start(|_| {}).await;
    let kinds = [
        (
            DOCKER_MANIFEST_V2,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#,
        ),
        (
            DOCKER_MANIFEST_LIST,
            r#"{"schemaVersion":2,"manifests":[ ]}"#,
        ),
        (
            OCI_INDEX,
            "{\n  \"schemaVersion\": 2,\n  \"manifests\": []\n}\n",
        ),
        (
            "application/vnd.oci.image.manifest.v1+json",
            r#"{"schemaVersion":2,"artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json","layers":[]}"#,
        ),
    ];
    for (i, (mt, body)) in kinds.iter().enumerate() {
        let tag = if i == 3 {
            "sha256-0123456789abcdef.sig".to_string()
        } else {
            format!("k{i}")
        };
        let d = p
            .origin
            .put_manifest("lib/x", Some(&tag), mt, body.to_string());
        let r = p
            .http
            .get(p.url(&format!("/v2/lib/x/manifests/{tag}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{mt}");
        assert_eq!(r.headers()["content-type"], *mt);
        assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
        assert_eq!(r.bytes().await.unwrap(), body.as_bytes());
    }
    let tags: serde_json::Value = p
        .http
        .get(p.url("/v2/lib/x/tags/list?n=10"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"].as_array().unwrap().len(), 4);
    let d = Digest::of(b"subject");
    let r = p
        .http
        .get(p.url(&format!("/v2/lib/x/referrers/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
}

#[tokio::test]
async fn ranges() {
    let p = Pair::start(|_| {}).await;
    let data = pseudo_random(100_000, 2);
    let d = p.origin.put_blob(data.clone());
    let url = p.url(&format!("/v2/r/blobs/{d}"));
    // A range on a blob not yet stored: served once verified.
    let r = p
        .http
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap(), &data[10..20]);
    let r = p
        .http
        .get(&url)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), &data[99_995..]);
    let r = p
        .http
        .get(&url)
        .header("range", "bytes=99990-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), &data[99_990..]);
    let r = p
        .http
        .get(&url)
        .header("range", "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID".into())
    );
    let r = p
        .http
        .get(&url)
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = p
        .http
        .get(&url)
        .header("range", "bytes=zz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
}

#[tokio::test]
async fn routes_by_ns_to_mapped_registries() {
    let other = Origin::start().await.unwrap();
    let other_url = other.url();
    let p = Pair::start(|c| {
        c.registries.insert("docker.io".into(), other_url.clone());
    })
    .await;
    let a = p.origin.put_manifest(
        "library/alpine",
        Some("latest"),
        OCI_MANIFEST,
        r#"{"schemaVersion":2,"x":"default"}"#,
    );
    let b = other.put_manifest(
        "library/alpine",
        Some("latest"),
        OCI_MANIFEST,
        r#"{"schemaVersion":2,"x":"docker.io"}"#,
    );
    let r = p
        .http
        .get(p.url("/v2/library/alpine/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["docker-content-digest"], a.to_string().as_str());
    let r = p
        .http
        .get(p.url("/v2/library/alpine/manifests/latest?ns=docker.io"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["docker-content-digest"], b.to_string().as_str());
    let r = p
        .http
        .get(p.url("/v2/library/alpine/manifests/latest?ns=bad%2Fhost"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::BAD_REQUEST, "NAME_INVALID".into())
    );
}

#[tokio::test]
async fn repushed_tag_is_seen_after_the_ttl_and_stale_served_when_upstream_down() {
    let p = Pair::start(|c| c.tag_ttl = Duration::from_secs(1)).await;
    let one = p.origin.put_manifest(
        "t",
        Some("latest"),
        OCI_MANIFEST,
        r#"{"schemaVersion":2,"v":1}"#,
    );
    let get = |p: &Pair| p.http.get(p.url("/v2/t/manifests/latest")).send();
    assert_eq!(
        get(&p).await.unwrap().headers()["docker-content-digest"],
        one.to_string().as_str()
    );
    let two = p.origin.put_manifest(
        "t",
        Some("latest"),
        OCI_MANIFEST,
        r#"{"schemaVersion":2,"v":2}"#,
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        get(&p).await.unwrap().headers()["docker-content-digest"],
        two.to_string().as_str()
    );

    // Upstream answers 500: the last-known-good digest is served.
    p.origin.set_fault(Fault::ServerError);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(&p).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        two.to_string().as_str()
    );
    // Upstream gone altogether: the same.
    p.origin.stop();
    let r = get(&p).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        two.to_string().as_str()
    );
    let metrics = p
        .http
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shoal_stale_tag_serves_total 2"),
        "{metrics}"
    );
    // A tag never seen cannot be served.
    let r = p
        .http
        .get(p.url("/v2/t/manifests/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE".into())
    );
}

#[tokio::test]
async fn deleted_tag_is_not_served_stale() {
    let p = Pair::start(|c| c.tag_ttl = Duration::from_secs(0)).await;
    p.origin
        .put_manifest("t", Some("gone"), OCI_MANIFEST, r#"{"schemaVersion":2}"#);
    assert_eq!(
        p.http
            .get(p.url("/v2/t/manifests/gone"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    p.origin.remove_tag("t", "gone");
    let r = p
        .http
        .get(p.url("/v2/t/manifests/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
}

#[tokio::test]
async fn corrupt_upstream_bytes_are_never_completed_or_stored() {
    let p = Pair::start(|_| {}).await;
    let data = pseudo_random(2 << 20, 3);
    let d = p.origin.put_blob(data.clone());
    p.origin.set_fault(Fault::CorruptBlobs);
    let url = p.url(&format!("/v2/x/blobs/{d}"));
    let r = p.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let got = r.bytes().await;
    assert!(
        got.is_err(),
        "a corrupt blob must abort the response, not complete it"
    );
    assert!(!p.node.mirror().store.contains(&d));
    let metrics = p
        .http
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shoal_digest_mismatches_total 1"),
        "{metrics}"
    );
    // Once the upstream behaves, the right bytes arrive.
    p.origin.set_fault(Fault::None);
    assert_eq!(
        p.http
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        data
    );
    assert!(p.node.mirror().store.contains(&d));
}

#[tokio::test]
async fn hanging_upstream_times_out_and_leaves_the_store_intact() {
    let p = Pair::start(|c| c.upstream_timeout = Duration::from_secs(1)).await;
    let d = p.origin.put_blob(pseudo_random(1000, 4));
    p.origin.set_fault(Fault::HangBlobs);
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        p.http
            .get(p.url(&format!("/v2/x/blobs/{d}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
    })
    .await
    .expect("shoal must give up on a hanging upstream");
    assert!(r.is_err());
    assert!(!p.node.mirror().store.contains(&d));
    assert_eq!(
        std::fs::read_dir(p.dir.path().join("partial"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn concurrent_requests_share_one_upstream_fetch() {
    let p = Pair::start(|_| {}).await;
    let data = pseudo_random(8 << 20, 5);
    let d = p.origin.put_blob(data.clone());
    let url = p.url(&format!("/v2/x/blobs/{d}"));
    let mut reqs = Vec::new();
    for _ in 0..10 {
        let (http, url) = (p.http.clone(), url.clone());
        reqs.push(tokio::spawn(async move {
            http.get(&url).send().await.unwrap().bytes().await.unwrap()
        }));
    }
    for r in reqs {
        assert_eq!(r.await.unwrap(), data);
    }
    assert_eq!(
        p.origin.blob_bytes_served(),
        data.len() as u64,
        "the upstream must be asked once"
    );
}

#[tokio::test]
async fn bearer_and_basic_upstream_auth() {
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("auth.json");
    let origin_holder = Origin::start().await.unwrap();
    let host = origin_holder.addr().to_string();
    drop(origin_holder);
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths":{{"{host}":{{"username":"u","password":"p"}}}}}}"#),
    )
    .unwrap();
    // Without credentials: 401 with the upstream's challenge passed back.
    let anon = Pair::start(|_| {}).await;
    anon.origin
        .set_auth(Auth::Bearer("u".into(), "p".into()), &["pub"]);
    let d = anon.origin.put_blob(&b"secret"[..]);
    let r = anon
        .http
        .get(anon.url(&format!("/v2/private/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(
        error_code(r).await,
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED".into())
    );
    // The client's own Basic credentials are used for the token flow.
    let r = anon
        .http
        .get(anon.url(&format!("/v2/private/blobs/{d}")))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), &b"secret"[..]);
    // Wrong credentials are refused.
    let d2 = anon.origin.put_blob(&b"secret2"[..]);
    let r = anon
        .http
        .get(anon.url(&format!("/v2/private/blobs/{d2}")))
        .basic_auth("u", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A public repository needs nothing.
    let r = anon
        .http
        .get(anon.url(&format!("/v2/pub/blobs/{d2}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Configured credentials, for Bearer and for Basic.
    for mode in [
        Auth::Bearer("u".into(), "p".into()),
        Auth::Basic("u".into(), "p".into()),
    ] {
        let origin = Origin::start().await.unwrap();
        origin.set_auth(mode.clone(), &[]);
        let host = origin.addr().to_string();
        std::fs::write(
            &auth_file,
            format!(r#"{{"auths":{{"{host}":{{"username":"u","password":"p"}}}}}}"#),
        )
        .unwrap();
        let ddir = tempfile::tempdir().unwrap();
        let mut c =
            shoal_node::Config::new("127.0.0.1:0".parse().unwrap(), ddir.path(), &origin.url());
        c.auth_file = Some(auth_file.clone());
        let node = shoal_node::Node::start(c).await.unwrap();
        let m = origin.put_manifest(
            "priv/app",
            Some("v1"),
            OCI_MANIFEST,
            r#"{"schemaVersion":2}"#,
        );
        let r = reqwest::get(format!("http://{}/v2/priv/app/manifests/v1", node.addr()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{mode:?}");
        assert_eq!(r.headers()["docker-content-digest"], m.to_string().as_str());
        node.shutdown().await;
    }
}

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[tokio::test]
async fn bad_input_gets_oci_errors() {
    let p = Pair::start(|_| {}).await;
    let cases = [
        (
            "/v2/UPPER/manifests/latest",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a/blobs/sha256:xyz",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/a/blobs/md5:abc",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/a/manifests/-tag",
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        ),
        (
            "/v2/a/uploads/",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        ("/nothing", StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
    ];
    for (path, status, code) in cases {
        let r = p.http.get(p.url(path)).send().await.unwrap();
        assert_eq!(error_code(r).await, (status, code.to_string()), "{path}");
    }
    // Traversal attempts, sent raw: HTTP clients would normalise the path away.
    for path in [
        "/v2/a/../b/manifests/latest",
        "/v2/a/%2e%2e/b/blobs/sha256:00",
        "/v2/../../etc/passwd/blobs/x",
    ] {
        let (status, body) = raw_get(p.node.addr(), path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("NAME_INVALID"), "{path}: {body}");
    }
    let d = Digest::of(b"absent");
    let r = p
        .http
        .get(p.url(&format!("/v2/a/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );
    let r = p
        .http
        .get(p.url("/v2/a/manifests/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    let r = p
        .http
        .put(p.url("/v2/a/manifests/x"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED".into())
    );
    let huge = "x".repeat(100 * 1024);
    let r = p
        .http
        .get(p.url("/v2/"))
        .header("x-big", huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // The node still serves after all of that.
    assert_eq!(
        p.http.get(p.url("/v2/")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn cache_cap_evicts_least_recently_used() {
    let p = Pair::start(|c| c.cache_size = 5 << 20).await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..4)
        .map(|i| {
            let data = pseudo_random(2 << 20, 10 + i);
            (p.origin.put_blob(data.clone()), data)
        })
        .collect();
    for (d, data) in &blobs {
        let got = p
            .http
            .get(p.url(&format!("/v2/x/blobs/{d}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got, data);
    }
    let store = &p.node.mirror().store;
    assert!(store.total_bytes() <= 5 << 20);
    assert!(!store.contains(&blobs[0].0) && store.contains(&blobs[3].0));
    let metrics = p
        .http
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shoal_cache_evictions_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn cached_private_content_is_served_only_to_authorised_clients() {
    let p = Pair::start(|_| {}).await;
    p.origin.set_auth(Auth::Bearer("u".into(), "p".into()), &[]);
    let blob = p.origin.put_blob(&b"private layer"[..]);
    let m = p.origin.put_manifest(
        "priv/app",
        Some("v1"),
        OCI_MANIFEST,
        r#"{"schemaVersion":2,"p":1}"#,
    );
    let urls = [
        p.url("/v2/priv/app/manifests/v1"),
        p.url(&format!("/v2/priv/app/manifests/{m}")),
        p.url(&format!("/v2/priv/app/blobs/{blob}")),
        p.url(&format!("/v2/other/repo/blobs/{blob}")),
    ];
    // An authorised client fills the cache.
    for u in &urls[..3] {
        let r = p
            .http
            .get(u)
            .basic_auth("u", Some("p"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{u}");
    }
    // Anonymous and wrong-password clients get nothing from the cache.
    for u in &urls {
        let r = p.http.get(u).send().await.unwrap();
        assert_eq!(r.status(), 401, "anonymous {u}");
        let r = p
            .http
            .get(u)
            .basic_auth("u", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "wrong password {u}");
        let r = p.http.head(u).send().await.unwrap();
        assert_eq!(r.status(), 401, "anonymous HEAD {u}");
    }
    // The authorised client still reads it, also with the upstream down (confirmed before).
    p.origin.stop();
    for u in &urls[..3] {
        let r = p
            .http
            .get(u)
            .basic_auth("u", Some("p"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{u}");
    }
    let r = p.http.get(&urls[2]).send().await.unwrap();
    assert_eq!(r.status(), 401, "anonymous with upstream down");
}
