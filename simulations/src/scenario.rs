//! The named scenarios and their parameters.

use shoal_protocol::chunk::{chunk_size_for, DEFAULT_CHUNK_SIZE};
use shoal_protocol::serve::ServeConfig;
use shoal_protocol::swarm::{
    DownloadConfig, HAVE_POLL_MS, IMPORT_HOLD_PERCENT, LOOKUP_INTERVAL_MS, PROVIDER_LIMIT,
    SITE_GATEWAYS, WATCH_BATCH_MS,
};

/// Decimal megabyte, as Kraken's published numbers use.
pub const MB: u64 = 1_000_000;
/// Decimal gigabyte.
pub const GB: u64 = 1_000 * MB;

/// Node count above which [`Params::auto_chunk_size`] picks 16 MiB chunks.
pub const BIG_SWARM: usize = 20_000;

/// The scenario names `shoal-sim run` accepts.
pub const SCENARIOS: &[&str] = &["kraken", "cold-start", "churn", "sites", "poisoned"];

/// Everything a run depends on. Times in microseconds, rates in bytes per second.
#[derive(Debug, Clone)]
pub struct Params {
    /// The scenario's name (for the report).
    pub scenario: String,
    /// Nodes (the upstream registry is extra).
    pub nodes: usize,
    /// Seeds every random choice.
    pub seed: u64,
    /// The image's layer sizes; every node wants every layer, all at once.
    pub blobs: Vec<u64>,
    /// Chunk size of peer transfers: the daemon's `--chunk-size`, the largest
    /// ([`Params::chunk_size_of`]).
    pub chunk_size: u32,
    /// Each blob's chunk size follows its size as in the daemon
    /// (`shoal_protocol::chunk::chunk_size_for`); off, every blob has chunks of `chunk_size`.
    pub adaptive_chunks: bool,
    /// Per-node upload capacity.
    pub up: u64,
    /// Per-node download capacity.
    pub down: u64,
    /// The upstream registry's egress capacity.
    pub upstream_egress: u64,
    /// Round trip between two nodes.
    pub rtt_us: u64,
    /// A chunk request's round trip varies uniformly by up to this percentage of `rtt_us`
    /// either way. Without it every node's requests arrive in lock-step, ties go by node
    /// number, and at a cold start every seeder sent its first chunk to the same four nodes
    /// (whose downlinks then took each first copy at a quarter of their rate).
    pub rtt_jitter_percent: u64,
    /// Round trip between a node and the upstream.
    pub upstream_rtt_us: u64,
    /// Designated seeders per blob (`--seeders`).
    pub seeders: usize,
    /// Nodes start uniformly at random in `[0, start_spread_us)`.
    pub start_spread_us: u64,
    /// Fraction of nodes that die, each at a uniformly random time in `churn_window_us`.
    pub churn_fraction: f64,
    /// When the dying nodes die.
    pub churn_window_us: (u64, u64),
    /// How long a peer takes to notice that a node died (its connection times out).
    pub detect_us: u64,
    /// Fraction of nodes that corrupt every chunk they serve.
    pub poisoned_fraction: f64,
    /// Number of sites (1: one flat network).
    pub sites: usize,
    /// Each site's WAN link capacity, per direction, shared by all its inter-site traffic.
    pub wan: u64,
    /// The site the upstream sits in; `None`: outside every site (reached over the WAN).
    pub upstream_site: Option<usize>,
    /// How a node schedules the chunk requests it serves (`shoal_protocol::serve`): uploads
    /// at once, requests queued, the longest wait.
    pub serve: ServeConfig,
    /// Simulated time after which the run stops even if nodes are incomplete.
    pub time_limit_us: u64,
    /// Providers per lookup and most peers per download (`swarm::PROVIDER_LIMIT`).
    pub provider_limit: usize,
    /// `swarm::LOOKUP_INTERVAL_MS`.
    pub lookup_interval_ms: u64,
    /// `swarm::HAVE_POLL_MS`.
    pub have_poll_ms: u64,
    /// Providers push their new chunks to the nodes following them (a subscription per
    /// provider) instead of being polled every `have_poll_ms`.
    pub have_push: bool,
    /// Look up again sooner while following fewer than `provider_limit` peers
    /// (`swarm::relookup_after_ms`) instead of every `lookup_interval_ms`.
    pub adaptive_lookup: bool,
    /// Pushed Haves reach a node at multiples of this (simulated) time: the daemon's watch
    /// batches (`swarm::WATCH_BATCH_MS`, per provider and follower) modelled as one grid.
    pub notify_quantum_us: u64,
    /// A node that streams a blob from the upstream (a designated seeder) holds its other
    /// downloads' peer requests until the stream ends: its downlink imports first.
    pub import_first: bool,
    /// How much of an import (percent of its chunks) holds the node's other downloads
    /// (`swarm::IMPORT_HOLD_PERCENT`).
    pub import_hold_percent: u64,
    /// Nodes know which peers are in their own site: they follow at most
    /// `swarm::FAR_PEER_LIMIT` peers of other sites and mark them far
    /// (`Download::set_peer_far`).
    pub locality: bool,
    /// The `Download` configuration (its `seed` and `upstream_allowed` are set per node).
    pub download: DownloadConfig,
    /// Seed every node's `Download` of a blob alike (as a daemon seeding it from the digest
    /// alone would) instead of per node.
    pub shared_seed: bool,
    /// Designated seeders are spread over the image's layers (`swarm::seeder_order`: a node is
    /// the designated seeder of at most one layer while there are more nodes than layers)
    /// instead of each layer's nearest node (`swarm::designated_seeders`).
    pub spread_seeders: bool,
    /// A node's chunk requests in flight, all downloads together, follow its measured receive
    /// rate (`swarm::InFlightBudget`) instead of each download's own `max_in_flight_bytes`.
    pub in_flight_budget: bool,
    /// A download at `provider_limit` peers lets one go for a newly found provider when they
    /// cannot finish the blob (`Download::replaceable_peer`).
    pub peer_swap: bool,
    /// Each site's gateways for a blob (`swarm::site_gateway`, judged by each node from the 20
    /// nodes nearest the blob's key, as the daemon does from its DHT); the others wait
    /// `DownloadConfig::site_fallback_ms` longer before they ask far peers. 0: every node is a
    /// gateway (the rule off).
    pub site_gateways: usize,
}

impl Params {
    /// The defaults every scenario starts from: 1,000 nodes at 1 Gbit/s pulling a 1 GB image in
    /// four layers from a 10 Gbit/s registry, 4 MiB chunks, 0.5 ms RTT.
    pub fn base(scenario: &str) -> Params {
        Params {
            scenario: scenario.to_string(),
            nodes: 1_000,
            seed: 1,
            blobs: vec![400 * MB, 300 * MB, 200 * MB, 100 * MB],
            chunk_size: DEFAULT_CHUNK_SIZE,
            adaptive_chunks: true,
            up: 125 * MB,
            down: 125 * MB,
            upstream_egress: 1_250 * MB,
            rtt_us: 500,
            rtt_jitter_percent: 10,
            upstream_rtt_us: 20_000,
            seeders: 1,
            start_spread_us: 0,
            churn_fraction: 0.0,
            churn_window_us: (0, 0),
            detect_us: 2_000_000,
            poisoned_fraction: 0.0,
            sites: 1,
            wan: u64::MAX,
            upstream_site: None,
            serve: ServeConfig::default(),
            time_limit_us: 3_600_000_000,
            provider_limit: PROVIDER_LIMIT,
            lookup_interval_ms: LOOKUP_INTERVAL_MS,
            have_poll_ms: HAVE_POLL_MS,
            have_push: true,
            adaptive_lookup: true,
            notify_quantum_us: WATCH_BATCH_MS * 1000,
            import_first: true,
            import_hold_percent: IMPORT_HOLD_PERCENT,
            locality: true,
            download: DownloadConfig::default(),
            shared_seed: false,
            peer_swap: true,
            site_gateways: SITE_GATEWAYS,
            spread_seeders: true,
            in_flight_budget: true,
        }
    }

    /// A named scenario, or `None` for an unknown name.
    pub fn scenario(name: &str) -> Option<Params> {
        let mut p = Params::base(name);
        match name {
            "kraken" => {
                // Kraken's published test: 2,600 hosts, a 3 GB image in 2 layers, 300 MB/s.
                p.nodes = 2_600;
                p.blobs = vec![1_500 * MB, 1_500 * MB];
                p.up = 300 * MB;
                p.down = 300 * MB;
                p.upstream_egress = 1_250 * MB;
            }
            "cold-start" => {}
            "churn" => {
                // 10% of the nodes die while the image is spreading.
                p.churn_fraction = 0.10;
                p.churn_window_us = (1_000_000, 8_000_000);
            }
            "sites" => {
                // Four sites, each behind a 10 Gbit/s WAN link (its 250 nodes have 250 Gbit/s
                // between them); the registry is outside every site.
                p.sites = 4;
                p.wan = 1_250 * MB;
                p.upstream_site = None;
                p.upstream_rtt_us = 40_000;
            }
            "poisoned" => {
                p.poisoned_fraction = 0.05;
            }
            _ => return None,
        }
        Some(p)
    }

    /// Overrides for experiments, `key=value` separated by commas (the `SHOAL_SIM_TUNE`
    /// environment variable): `provider_limit`, `lookup_interval_ms`, `have_poll_ms`,
    /// `serve_active`, `serve_queue`, `serve_wait_ms`, `serve_per_chunk`, `serve_first_alone`,
    /// `serve_min_active` (the `ServeConfig`), `serve_limit=N` (the old sender model: N uploads
    /// at once, no queue), `rtt_us`, `rtt_jitter_percent`, `detect_us`, and the `DownloadConfig`
    /// fields `min_pipeline`,
    /// `max_pipeline`, `pipeline_target_ms`, `in_order_bias`, `initial_peer_rate`,
    /// `endgame_max_requests`, `busy_backoff_ms`, `timeout_floor_ms`, `upstream_grace_ms`,
    /// `takeover_after_ms`, `slow_swarm_percent`, `max_in_flight_bytes`; `shared_seed=1` (every
    /// node's `Download` of a blob seeded alike, as the daemon does today); and for calibration
    /// `rate` (per-node bytes per second, both directions), `upstream_egress`,
    /// `upstream_rtt_us`, `sites`, `wan`, `chunk_size`, `image_bytes` and `layers` (applied in order:
    /// `image_bytes=…,layers=…` splits the size evenly).
    pub fn tune(&mut self, spec: &str) -> Result<(), String> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("bad tuning '{item}': want key=value"))?;
            let v: u64 = v
                .trim()
                .parse()
                .map_err(|_| format!("bad tuning '{item}': not a number"))?;
            let d = &mut self.download;
            match k.trim() {
                "provider_limit" => self.provider_limit = v as usize,
                "lookup_interval_ms" => self.lookup_interval_ms = v,
                "have_poll_ms" => self.have_poll_ms = v,
                "have_push" => self.have_push = v != 0,
                "adaptive_lookup" => self.adaptive_lookup = v != 0,
                "notify_quantum_us" => self.notify_quantum_us = v,
                "import_first" => self.import_first = v != 0,
                "import_hold_percent" => self.import_hold_percent = v,
                "locality" => self.locality = v != 0,
                "far_max_in_flight" => d.far_max_in_flight = v as u32,
                "far_quiet_ms" => d.far_quiet_ms = v,
                "far_quiet_jitter_ms" => d.far_quiet_jitter_ms = v,
                // The old sender model: `v` uploads at once, no queue, more get `Busy`.
                "serve_limit" => {
                    self.serve.max_active = v as u32;
                    self.serve.max_queued = 0;
                    self.serve.max_active_per_chunk = 0;
                    self.serve.first_copy_alone = false;
                }
                "serve_active" => self.serve.max_active = v as u32,
                "serve_queue" => self.serve.max_queued = v as u32,
                "serve_wait_ms" => self.serve.max_wait_ms = v,
                "serve_per_chunk" => self.serve.max_active_per_chunk = v as u32,
                "serve_first_alone" => self.serve.first_copy_alone = v != 0,
                "serve_min_active" => self.serve.min_active = v as u32,
                "rtt_us" => self.rtt_us = v,
                "rtt_jitter_percent" => self.rtt_jitter_percent = v,
                "detect_us" => self.detect_us = v,
                "min_pipeline" => d.min_pipeline = v as u32,
                "max_pipeline" => d.max_pipeline = v as u32,
                "pipeline_target_ms" => d.pipeline_target_ms = v,
                "in_order_bias" => d.in_order_bias = v as u32,
                "initial_peer_rate" => d.initial_peer_rate = v,
                "endgame_max_requests" => d.endgame_max_requests = v as u32,
                "max_in_flight_bytes" => d.max_in_flight_bytes = v,
                "shared_seed" => self.shared_seed = v != 0,
                "peer_swap" => self.peer_swap = v != 0,
                "site_gateways" => self.site_gateways = v as usize,
                "site_fallback_ms" => d.site_fallback_ms = v,
                "site_gateway_quiet_ms" => d.site_gateway_quiet_ms = v,
                "spread_seeders" => self.spread_seeders = v != 0,
                "in_flight_budget" => self.in_flight_budget = v != 0,
                "busy_backoff_ms" => d.busy_backoff_ms = v,
                "timeout_floor_ms" => d.timeout_floor_ms = v,
                "upstream_grace_ms" => d.upstream_grace_ms = v,
                "takeover_after_ms" => d.takeover_after_ms = v,
                "slow_swarm_percent" => d.slow_swarm_percent = v as u32,
                // For calibration against the namespace harness (tools/cluster): per-node link
                // rate in bytes per second (both directions), the registry's egress, and the
                // image as `image_bytes` split into `layers` equal layers.
                "rate" => {
                    self.up = v;
                    self.down = v;
                }
                "upstream_egress" => self.upstream_egress = v,
                "image_bytes" => {
                    let n = self.blobs.len().max(1) as u64;
                    self.blobs = (0..n).map(|i| v / n + u64::from(i < v % n)).collect();
                }
                "layers" => {
                    let total = self.image_bytes();
                    let n = v.max(1);
                    self.blobs = (0..n)
                        .map(|i| total / n + u64::from(i < total % n))
                        .collect();
                }
                "upstream_rtt_us" => self.upstream_rtt_us = v,
                // The harness's `--sites K` and `--wan-rate` (bytes per second, each way).
                "sites" => self.sites = (v as usize).max(1),
                "wan" => self.wan = v,
                "chunk_size" => self.chunk_size = v as u32,
                "adaptive_chunks" => self.adaptive_chunks = v != 0,
                other => return Err(format!("unknown tuning key '{other}'")),
            }
        }
        Ok(())
    }

    /// Above [`BIG_SWARM`] nodes, 16 MiB chunks for every blob instead of the daemon's
    /// (4 MiB at most): a quarter of the chunk events or fewer, so that 100,000 nodes simulate
    /// within minutes (see the README).
    pub fn auto_chunk_size(&mut self) {
        if self.nodes > BIG_SWARM && self.chunk_size == DEFAULT_CHUNK_SIZE {
            self.chunk_size = 16 << 20;
            self.adaptive_chunks = false;
        }
    }

    /// The chunk size of a blob of `blob_size` bytes.
    pub fn chunk_size_of(&self, blob_size: u64) -> u32 {
        if self.adaptive_chunks {
            chunk_size_for(blob_size, self.chunk_size)
        } else {
            self.chunk_size
        }
    }

    /// The image's size.
    pub fn image_bytes(&self) -> u64 {
        self.blobs.iter().sum()
    }

    /// Image size over the per-node download rate: the best any node can do.
    pub fn ideal_s(&self) -> f64 {
        self.image_bytes() as f64 / self.down as f64
    }
}
