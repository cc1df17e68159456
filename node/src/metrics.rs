//! The daemon's Prometheus metrics, one typed struct, exported as text at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `base`, `manifest`, `blob`, `tags`, `referrers`, `metrics`, `other`.
    pub route: &'static str,
    /// HTTP method.
    pub method: String,
    /// HTTP status code.
    pub status: u16,
}

/// Where served bytes came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache` or `upstream`.
    pub source: &'static str,
}

/// Per-upstream labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The registry key (the `ns` host, or `default`).
    pub registry: String,
}

/// Per-peer labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer id.
    pub peer: String,
}

/// All of the daemon's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes sent to clients, by source.
    pub served_bytes: Family<SourceLabels, Counter>,
    /// Bytes received from each upstream for blobs and manifests.
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    /// Requests sent to each upstream.
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    /// Bytes of complete blobs in the store.
    pub cache_bytes: Gauge,
    /// Complete blobs in the store.
    pub cache_blobs: Gauge,
    /// Blobs evicted since start.
    pub cache_evictions: Counter,
    /// Blobs whose bytes did not match their digest (discarded).
    pub digest_mismatches: Counter,
    /// Tags served from the last-known-good digest because the upstream was unavailable.
    pub stale_tags: Counter,
    /// Verified chunk bytes fetched from each peer.
    pub peer_bytes: Family<PeerLabels, Counter>,
    /// Chunks that failed verification.
    pub chunks_rejected: Counter,
    /// Peers banned for sending corrupt chunks.
    pub peers_banned: Counter,
    /// Chunk requests to peers abandoned before their answer (timed out, or the peer was
    /// banned or benched): their streams are reset, so the sender stops sending.
    pub chunk_requests_cancelled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `shoal_` prefix.
    pub fn new() -> Metrics {
        Self::new_with(|_| {})
    }

    /// Like [`Metrics::new`], letting other components register theirs in the same registry.
    pub fn new_with(extra: impl FnOnce(&mut Registry)) -> Metrics {
        let mut registry = Registry::with_prefix("shoal");
        extra(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests served, by route, method and status",
            requests.clone(),
        );
        let served_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "served_bytes",
            "Body bytes sent to clients, by source",
            served_bytes.clone(),
        );
        let upstream_bytes = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_fetched_bytes",
            "Bytes fetched from each upstream",
            upstream_bytes.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests sent to each upstream",
            upstream_requests.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "cache_bytes",
            "Bytes of complete blobs in the store",
            cache_bytes.clone(),
        );
        let cache_blobs = Gauge::default();
        registry.register(
            "cache_blobs",
            "Complete blobs in the store",
            cache_blobs.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Blobs evicted from the store",
            cache_evictions.clone(),
        );
        let digest_mismatches = Counter::default();
        registry.register(
            "digest_mismatches",
            "Upstream blobs discarded for a digest mismatch",
            digest_mismatches.clone(),
        );
        let stale_tags = Counter::default();
        registry.register(
            "stale_tag_serves",
            "Tags served stale while the upstream was unavailable",
            stale_tags.clone(),
        );
        let peer_bytes = Family::<PeerLabels, Counter>::default();
        registry.register(
            "peer_fetched_bytes",
            "Verified chunk bytes fetched from each peer",
            peer_bytes.clone(),
        );
        let chunks_rejected = Counter::default();
        registry.register(
            "chunks_rejected",
            "Chunks from peers that failed verification",
            chunks_rejected.clone(),
        );
        let peers_banned = Counter::default();
        registry.register(
            "peers_banned",
            "Peers banned for sending corrupt chunks",
            peers_banned.clone(),
        );
        let chunk_requests_cancelled = Counter::default();
        registry.register(
            "chunk_requests_cancelled",
            "Chunk requests to peers abandoned before their answer (streams reset)",
            chunk_requests_cancelled.clone(),
        );
        Metrics {
            peers_banned,
            chunk_requests_cancelled,
            peer_bytes,
            chunks_rejected,
            registry,
            requests,
            served_bytes,
            upstream_bytes,
            upstream_requests,
            cache_bytes,
            cache_blobs,
            cache_evictions,
            digest_mismatches,
            stale_tags,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts bytes served from a source.
    pub fn served(&self, source: &'static str, n: u64) {
        self.served_bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(n);
    }
}
