//! The DHT's Prometheus metrics. The node registers them into its own registry with
//! [`Metrics::register`] (names then read `shoal_dht_...` under the node's `shoal` prefix).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// DHT metrics. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `providers()` calls answered.
    pub provider_lookups: Counter,
    /// Time from a `providers()` command reaching the DHT to its answer, in seconds.
    pub provider_lookup_seconds: Histogram,
    /// Providers returned by `providers()` (sum over lookups).
    pub providers_found: Counter,
    /// Peers with at least one open connection.
    pub peers_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Unregistered metrics (register them with [`Metrics::register`]).
    pub fn new() -> Metrics {
        Metrics {
            provider_lookups: Counter::default(),
            // 0.25 ms .. ~8 s.
            provider_lookup_seconds: Histogram::new(exponential_buckets(0.00025, 2.0, 16)),
            providers_found: Counter::default(),
            peers_connected: Gauge::default(),
        }
    }

    /// Registers every metric under a `dht` sub-prefix of `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dht");
        r.register(
            "provider_lookups",
            "Provider lookups answered",
            self.provider_lookups.clone(),
        );
        r.register(
            "provider_lookup_seconds",
            "Provider lookup latency in seconds",
            self.provider_lookup_seconds.clone(),
        );
        r.register(
            "providers_found",
            "Providers returned by provider lookups",
            self.providers_found.clone(),
        );
        r.register(
            "peers_connected",
            "Peers with an open DHT connection",
            self.peers_connected.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dht_metrics_encode_with_prefix() {
        let mut registry = Registry::with_prefix("shoal");
        let m = Metrics::new();
        m.register(&mut registry);
        m.provider_lookups.inc();
        m.provider_lookup_seconds.observe(0.002);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("shoal_dht_provider_lookups_total 1"), "{out}");
        assert!(
            out.contains("shoal_dht_provider_lookup_seconds_bucket"),
            "{out}"
        );
        assert!(out.contains("shoal_dht_peers_connected 0"), "{out}");
    }
}
