//! `shoal demo`: an offline demonstration on one machine. It starts an in-process origin
//! registry holding a generated image and several nodes on loopback, pulls the image through
//! all of them at once (as a registry client would: manifest by tag, then config and layers by
//! digest, each checked against its digest), and reports per node the time taken and where
//! its bytes came from, and the origin's egress in copies of the image. Then it stops the
//! origin and pulls again, to show that cached content survives an upstream outage.
//!
//! Every figure is measured in the run: nothing is canned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use shoal_protocol::media;
use shoal_protocol::Digest;

use crate::imagegen::{self, ImageSpec};
use crate::metrics::SourceLabels;
use crate::origin::Origin;
use crate::{Config, Node};

/// What one pull fetched.
#[derive(Debug, Clone, Default)]
pub struct PullReport {
    /// Top-level manifest digest.
    pub manifest_digest: String,
    /// Blob bytes received (config and layers).
    pub blob_bytes: u64,
    /// Objects fetched and verified.
    pub objects: usize,
}

/// Pull failures.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// HTTP failure.
    #[error("GET {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The content did not match its digest.
    #[error("{url}: content does not match digest {digest}")]
    Digest {
        /// The URL.
        url: String,
        /// The digest asked for.
        digest: String,
    },
    /// A manifest that cannot be parsed.
    #[error("manifest {0}: {1}")]
    Manifest(String, String),
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(rename = "mediaType", default)]
    media_type: String,
}

#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

async fn get_verified(
    http: &reqwest::Client,
    url: String,
    digest: Option<&str>,
) -> Result<(Vec<u8>, String), PullError> {
    let err = |reason: String| PullError::Http {
        url: url.clone(),
        reason,
    };
    let resp = http
        .get(&url)
        .header(reqwest::header::ACCEPT, media::MANIFEST_ACCEPT)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("status {}", resp.status())));
    }
    let header_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.bytes().await.map_err(|e| err(e.to_string()))?.to_vec();
    let actual = Digest::of(&body).to_string();
    let want = digest.unwrap_or(&header_digest);
    if actual != want {
        return Err(PullError::Digest {
            url,
            digest: want.to_owned(),
        });
    }
    Ok((body, actual))
}

/// Pulls `repo:tag` through a mirror at `base` (e.g. `http://127.0.0.1:5000`), choosing the
/// first platform of an index, and verifies every object against its digest.
pub async fn pull_image(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
) -> Result<PullReport, PullError> {
    let mut report = PullReport::default();
    let (body, digest) =
        get_verified(http, format!("{base}/v2/{repo}/manifests/{tag}"), None).await?;
    report.manifest_digest = digest.clone();
    let mut doc: ManifestDoc = serde_json::from_slice(&body)
        .map_err(|e| PullError::Manifest(digest.clone(), e.to_string()))?;
    if doc.media_type == media::OCI_INDEX
        || doc.media_type == media::DOCKER_MANIFEST_LIST
        || !doc.manifests.is_empty()
    {
        let first = doc
            .manifests
            .first()
            .ok_or_else(|| PullError::Manifest(digest.clone(), "empty index".into()))?;
        let (body, d) = get_verified(
            http,
            format!("{base}/v2/{repo}/manifests/{}", first.digest),
            Some(&first.digest),
        )
        .await?;
        doc = serde_json::from_slice(&body).map_err(|e| PullError::Manifest(d, e.to_string()))?;
    }
    let blobs = doc.config.into_iter().chain(doc.layers);
    for b in blobs {
        let _ = &b.media_type;
        let (body, _) = get_verified(
            http,
            format!("{base}/v2/{repo}/blobs/{}", b.digest),
            Some(&b.digest),
        )
        .await?;
        report.blob_bytes += body.len() as u64;
        report.objects += 1;
    }
    Ok(report)
}

/// Loads a generated image into an origin under `repo:tag`.
pub fn load_image(origin: &Origin, image: &imagegen::Image, repo: &str, tag: &str) {
    for blob in image.blobs.values() {
        let is_manifest =
            [media::OCI_MANIFEST, media::DOCKER_MANIFEST_V2].contains(&blob.media_type.as_str());
        if is_manifest {
            origin.put_manifest(repo, None, &blob.media_type, blob.data.clone());
        } else {
            origin.put_blob(blob.data.clone());
        }
    }
    origin.put_manifest(repo, Some(tag), &image.media_type, image.manifest.clone());
}

/// Settings of `shoal demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Nodes to start.
    pub nodes: usize,
    /// Layers in the image.
    pub layers: usize,
    /// Bytes per layer.
    pub layer_size: usize,
}

fn served(node: &Node, source: &'static str) -> u64 {
    node.mirror()
        .metrics
        .served_bytes
        .get_or_create(&SourceLabels { source })
        .get()
}

/// Runs the demo, printing its report to stdout.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.nodes >= 1 && opts.nodes <= 64,
        "--nodes must be between 1 and 64"
    );
    anyhow::ensure!(
        opts.layers >= 1 && opts.layers <= 64,
        "--layers must be between 1 and 64"
    );
    let spec = ImageSpec {
        layers: opts.layers,
        layer_size: opts.layer_size,
        seed: 42,
        ..ImageSpec::default()
    };
    let image = tokio::task::spawn_blocking(move || imagegen::generate(&spec)).await?;
    let image_bytes: u64 = image.blobs.values().map(|b| b.data.len() as u64).sum();
    let origin = Origin::start().await?;
    load_image(&origin, &image, "demo/app", "latest");
    println!(
        "origin registry at {} holds demo/app:latest: {} layers, {:.1} MiB of blobs",
        origin.url(),
        opts.layers,
        image_bytes as f64 / (1 << 20) as f64
    );

    let root = tempfile::tempdir()?;
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    // A fresh cluster secret for this run: only the demo's own nodes can join.
    let cluster_key: [u8; 32] = rand::random();
    let mut bootstrap: Option<String> = None;
    for i in 0..opts.nodes {
        let dir = root.path().join(format!("node{i}"));
        let mut config = Config::new("127.0.0.1:0".parse()?, &dir, &origin.url());
        config.upstream_timeout = Duration::from_secs(10);
        let mut p2p = crate::config::P2pConfig::new("127.0.0.1:0".parse()?);
        p2p.cluster_key = Some(cluster_key);
        p2p.peers = bootstrap.iter().cloned().collect();
        config.p2p = Some(p2p);
        let node = Node::start(config).await?;
        if bootstrap.is_none() {
            bootstrap = node
                .mirror()
                .swarm
                .as_ref()
                .map(|s| s.listen_addr().to_string());
        }
        nodes.push(Arc::new(node));
    }
    // Give the DHT a moment to connect everyone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "started {} nodes on loopback, bootstrapped from {}\n",
        nodes.len(),
        bootstrap.unwrap_or_default()
    );

    for round in [
        "cold pull, all nodes at once",
        "warm pull",
        "warm pull with the origin stopped",
    ] {
        if round.contains("stopped") {
            origin.stop();
        }
        let before_origin = origin.blob_bytes_served();
        let before: Vec<(u64, u64, u64)> = nodes
            .iter()
            .map(|n| (served(n, "cache"), served(n, "peer"), served(n, "upstream")))
            .collect();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for n in &nodes {
            let base = format!("http://{}", n.addr());
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let t = Instant::now();
                let r = pull_image(&http, &base, "demo/app", "latest").await;
                (r, t.elapsed())
            }));
        }
        println!("== {round}");
        println!(
            "{:<6} {:>9} {:>9} {:>11} {:>11} {:>11}",
            "node", "time_s", "MiB", "cache", "peers", "upstream"
        );
        for (i, t) in tasks.into_iter().enumerate() {
            let (r, took) = t.await?;
            let r = r.map_err(|e| anyhow::anyhow!("node {i}: {e}"))?;
            let n = &nodes[i];
            let cache = served(n, "cache") - before[i].0;
            let peer = served(n, "peer") - before[i].1;
            let up = served(n, "upstream") - before[i].2;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            println!(
                "{:<6} {:>9.3} {:>9.1} {:>10.1}M {:>10.1}M {:>10.1}M",
                i,
                took.as_secs_f64(),
                mib(r.blob_bytes),
                mib(cache),
                mib(peer),
                mib(up)
            );
        }
        let egress = origin.blob_bytes_served() - before_origin;
        println!(
            "round took {:.3}s; origin egress {:.2} copies of the image ({:.1} MiB)\n",
            started.elapsed().as_secs_f64(),
            egress as f64 / image_bytes as f64,
            egress as f64 / (1 << 20) as f64
        );
    }
    println!("Every object was checked against its sha256 digest by the puller.");
    println!("Columns cache/peers/upstream: bytes each node served to its client, by where they came from.");
    for n in nodes {
        if let Ok(n) = Arc::try_unwrap(n) {
            n.shutdown().await;
        }
    }
    Ok(())
}
