//! The peer exchange's Prometheus metrics. The node registers them into its own registry with
//! [`Metrics::register`]; every field is a cheap handle, so the registered copies and these
//! stay in step.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A peer, by IP address. Only authenticated peers get a label, so the label set is bounded by
/// the cluster's size.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's IP address.
    pub peer: String,
}

/// Labels by direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` (a connection a peer opened to us) or `outbound` (one we opened).
    pub direction: &'static str,
}

/// Labels of a rejected chunk.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// `corrupt` (proven wrong: both ends trusted, or the wrong length) or `ambiguous`
    /// (inconsistent with the table: the chunk or the table is wrong).
    pub reason: &'static str,
}

/// Metrics of chunk serving (inbound) and fetching (outbound).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chunk bytes served, by peer.
    pub served_bytes: Family<PeerLabels, Counter>,
    /// Chunks served in full.
    pub chunks_served: Counter,
    /// Chunk sends the requester stopped (reset its stream) before their end: it no longer
    /// wanted the chunk, and the rest was not sent.
    pub chunk_sends_stopped: Counter,
    /// Midstate tables served.
    pub tables_served: Counter,
    /// Requests answered `Busy` (over the serving budget).
    pub busy: Counter,
    /// Requests for private blobs answered `Denied`.
    pub denied: Counter,
    /// Connections refused at the connection cap.
    pub refused_connections: Counter,
    /// Failed mutual authentications, by direction.
    pub auth_failures: Family<DirectionLabels, Counter>,
    /// Authenticated inbound connections open.
    pub connections: Gauge,
    /// Verified chunk bytes fetched from peers.
    pub fetched_bytes: Counter,
    /// Chunks received from peers that failed verification, by reason.
    pub rejected_chunks: Family<RejectionLabels, Counter>,
}

impl Metrics {
    /// Fresh metrics, registered nowhere yet.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Registers every metric under the `peer` prefix of `registry` (so the node's
    /// `shoal_` registry exports `shoal_peer_served_bytes_total`, ...).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("peer");
        r.register(
            "served_bytes",
            "Chunk bytes served to peers, by peer",
            self.served_bytes.clone(),
        );
        r.register(
            "chunks_served",
            "Chunks served to peers",
            self.chunks_served.clone(),
        );
        r.register(
            "chunk_sends_stopped",
            "Chunk sends the requesting peer stopped before their end",
            self.chunk_sends_stopped.clone(),
        );
        r.register(
            "tables_served",
            "Midstate tables served to peers",
            self.tables_served.clone(),
        );
        r.register(
            "busy",
            "Peer requests answered Busy (over the serving budget)",
            self.busy.clone(),
        );
        r.register(
            "denied",
            "Peer requests for private blobs denied",
            self.denied.clone(),
        );
        r.register(
            "refused_connections",
            "Peer connections refused at the connection cap",
            self.refused_connections.clone(),
        );
        r.register(
            "auth_failures",
            "Failed cluster-key authentications, by direction",
            self.auth_failures.clone(),
        );
        r.register(
            "connections",
            "Authenticated inbound peer connections open",
            self.connections.clone(),
        );
        r.register(
            "fetched_bytes",
            "Verified chunk bytes fetched from peers",
            self.fetched_bytes.clone(),
        );
        r.register(
            "rejected_chunks",
            "Chunks from peers that failed verification, by reason",
            self.rejected_chunks.clone(),
        );
    }

    pub(crate) fn auth_failed(&self, direction: &'static str) {
        self.auth_failures
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub(crate) fn rejected(&self, reason: &'static str) {
        self.rejected_chunks
            .get_or_create(&RejectionLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_the_peer_prefix() {
        let m = Metrics::new();
        let mut registry = Registry::with_prefix("shoal");
        m.register(&mut registry);
        m.chunks_served.inc();
        m.served_bytes
            .get_or_create(&PeerLabels {
                peer: "10.0.0.1".into(),
            })
            .inc_by(5);
        m.auth_failed("inbound");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("shoal_peer_chunks_served_total 1"), "{out}");
        assert!(
            out.contains("shoal_peer_served_bytes_total{peer=\"10.0.0.1\"} 5"),
            "{out}"
        );
        assert!(
            out.contains("shoal_peer_auth_failures_total{direction=\"inbound\"} 1"),
            "{out}"
        );
    }
}
