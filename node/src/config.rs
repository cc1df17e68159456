//! Command line, environment and TOML configuration, merged into one validated [`Config`].
//!
//! Precedence, highest first: a command-line flag, its `SHOAL_*` environment variable, the
//! config file (`--config`), the default. Every value is validated at start-up: a typo fails
//! loudly with one line, it is never silently ignored (unknown TOML keys are errors).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use shoal_protocol::serve::ServeConfig;
use shoal_protocol::swarm::SITE_GATEWAYS;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";
/// Default upstream: Docker Hub.
pub const DEFAULT_UPSTREAM: &str = "https://registry-1.docker.io";
/// Default cache cap: 10 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
/// Default time a tag's digest is trusted before it is re-checked upstream.
pub const DEFAULT_TAG_TTL_SECS: u64 = 30;
/// Default upstream timeout: for the response head, and for each read of the body.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 30;

/// `shoal`: a peer-to-peer container image distribution daemon.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OCI Distribution API as a pull-through mirror.
    Run(Box<RunArgs>),
    /// Offline demo: an embedded origin registry and several nodes on loopback, all pulling
    /// one generated image at once; prints where each node's bytes came from.
    Demo(DemoArgs),
}

/// Flags of `shoal demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Nodes to start.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Layers in the generated image.
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    /// Size of each layer, e.g. `16MiB`.
    #[arg(long, default_value = "16MiB")]
    pub layer_size: String,
}

/// Flags of `shoal run`; each may also come from the environment or the config file.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// TOML config file with the same keys as the flags (`listen`, `data_dir`, `upstream`,
    /// `cache_size`, `tag_ttl`, `auth_file`, `upstream_timeout`, and a `[registries]` table).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the `/v2` and `/metrics` listener [default: 127.0.0.1:5000].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<String>,
    /// Directory of the blob store and its metadata [default: /var/lib/shoal].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Upstream for requests without `?ns=` [default: https://registry-1.docker.io].
    // The help text shows the URL as it is; rustdoc would have it in angle brackets.
    #[allow(rustdoc::bare_urls)]
    #[arg(long, env = "SHOAL_UPSTREAM")]
    pub upstream: Option<String>,
    /// Where a registry host really is, `HOST=URL` (repeatable; comma-separated in the env).
    #[arg(long = "registry", env = "SHOAL_REGISTRY", value_delimiter = ',')]
    pub registries: Vec<String>,
    /// Cap on cached bytes, e.g. `10GiB`, `500MB`, `1048576` [default: 10GiB].
    #[arg(long, env = "SHOAL_CACHE_SIZE")]
    pub cache_size: Option<String>,
    /// Seconds a tag's digest is trusted before it is checked upstream again [default: 30].
    #[arg(long, env = "SHOAL_TAG_TTL")]
    pub tag_ttl: Option<u64>,
    /// Docker `config.json`-style file with an `auths` map of upstream credentials.
    #[arg(long, env = "SHOAL_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Seconds to wait for an upstream response head or for each body read [default: 30].
    #[arg(long, env = "SHOAL_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Option<u64>,
    /// Peer-to-peer address, `HOST:PORT`: the DHT on TCP and the chunk exchange on UDP, same
    /// port. Without it the node runs alone (a plain pull-through mirror).
    #[arg(long, env = "SHOAL_P2P_LISTEN")]
    pub p2p_listen: Option<String>,
    /// A peer to bootstrap from: `HOST:PORT` (a DNS name may resolve to many peers) or a
    /// multiaddr (repeatable; comma-separated in the env).
    #[arg(long = "peer", env = "SHOAL_PEER", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// File holding the cluster secret: only nodes with the same secret can join the swarm or
    /// fetch from it.
    #[arg(long, env = "SHOAL_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Discover peers on the local network with mDNS (edge sites).
    #[arg(long, env = "SHOAL_MDNS")]
    pub mdns: bool,
    /// Chunk size for peer transfers, a multiple of 64 bytes [default: 4MiB]. Blobs under 32
    /// chunks of it are cut finer (halved down to 256KiB) so that they still spread in at least
    /// 32 chunks. Every node of a cluster must use the same value.
    #[arg(long, env = "SHOAL_CHUNK_SIZE")]
    pub chunk_size: Option<String>,
    /// Nodes nearest a digest that fetch it from the upstream when nobody has it [default: 1].
    #[arg(long, env = "SHOAL_SEEDERS")]
    pub seeders: Option<usize>,
    /// This node's site (a data centre, a zone, an edge location: up to 64 of A-Z a-z 0-9 . _ -).
    /// Peers of another site are asked only for chunks no peer of this site holds [default: none:
    /// every peer is near].
    #[arg(long, env = "SHOAL_SITE")]
    pub site: Option<String>,
    /// With --site: how many nodes of a site ask other sites for a blob at once (its gateways;
    /// the others wait about 5 s longer). 1 or 2 suit sites behind a link slower than one
    /// host's own; more suit fat links between large sites [default: 8].
    #[arg(long, env = "SHOAL_SITE_GATEWAYS")]
    pub site_gateways: Option<usize>,
    /// Test-only fault injection: serve corrupt chunks to peers (a poisoned peer).
    #[arg(long, hide = true)]
    pub fault_corrupt_chunks: bool,
    /// Test-only fault injection: serve lying midstate tables to peers (one midstate in the
    /// middle is garbage; chunks are genuine).
    #[arg(long, hide = true)]
    pub fault_lie_tables: bool,
    /// Experiments: chunk uploads at once [default: the serve scheduler's].
    #[arg(long, hide = true)]
    pub serve_uploads: Option<u32>,
    /// Experiments: chunk requests waiting for an upload slot (0: `Busy` when all are taken).
    #[arg(long, hide = true)]
    pub serve_queue: Option<u32>,
    /// Experiments: uploads of one chunk at once (0: no cap, and no first copy alone).
    #[arg(long, hide = true)]
    pub serve_per_chunk: Option<u32>,
}

/// A size in the config file: a number of bytes or a string such as `"10GiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    upstream: Option<String>,
    #[serde(default)]
    registries: BTreeMap<String, String>,
    cache_size: Option<SizeValue>,
    tag_ttl: Option<u64>,
    auth_file: Option<PathBuf>,
    upstream_timeout: Option<u64>,
    p2p_listen: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    cluster_key_file: Option<PathBuf>,
    mdns: Option<bool>,
    chunk_size: Option<SizeValue>,
    seeders: Option<usize>,
    site: Option<String>,
    site_gateways: Option<usize>,
}

/// Errors in the configuration; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for Shoal.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// The validated configuration of a running node.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Default upstream base URL, without a trailing slash.
    pub upstream: String,
    /// Registry host to base URL.
    pub registries: BTreeMap<String, String>,
    /// Cache cap in bytes.
    pub cache_size: u64,
    /// Tag TTL.
    pub tag_ttl: Duration,
    /// Credentials file.
    pub auth_file: Option<PathBuf>,
    /// Upstream timeout.
    pub upstream_timeout: Duration,
    /// Peer-to-peer settings; `None` runs the node alone.
    pub p2p: Option<P2pConfig>,
}

/// Peer-to-peer settings.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// TCP (DHT) and UDP (chunk exchange) address.
    pub listen: SocketAddr,
    /// Bootstrap peers.
    pub peers: Vec<String>,
    /// The cluster secret (sha256 of the key file's contents); `None`: an open cluster.
    pub cluster_key: Option<[u8; 32]>,
    /// mDNS discovery.
    pub mdns: bool,
    /// Chunk size: that of big blobs, the largest (`shoal_protocol::chunk::chunk_size_for`).
    pub chunk_size: u32,
    /// Designated upstream fetchers per blob.
    pub seeders: usize,
    /// This node's site (empty: none).
    pub site: String,
    /// Gateways a site has per blob (`protocol::swarm::site_gateway`).
    pub site_gateways: usize,
    /// Fault injection for tests: serve corrupt chunks to peers.
    pub fault_corrupt_chunks: bool,
    /// Fault injection for tests: serve lying midstate tables to peers.
    pub fault_lie_tables: bool,
    /// Fault injection for in-process tests (no flag): send chunk headers and no bytes.
    pub fault_stall_chunks: bool,
    /// Fault injection for in-process tests (no flag): send chunk bytes at this many bytes a
    /// second (0: off).
    pub fault_chunk_rate: u64,
    /// How chunk uploads are scheduled.
    pub serve: ServeConfig,
}

/// Default chunk size for peer transfers.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Default number of designated seeders per blob.
pub const DEFAULT_SEEDERS: usize = 1;
/// The most `--site-gateways` accepted.
pub const MAX_SITE_GATEWAYS: usize = 1024;

impl P2pConfig {
    /// Settings for `listen` with every default.
    pub fn new(listen: SocketAddr) -> P2pConfig {
        P2pConfig {
            listen,
            peers: Vec::new(),
            cluster_key: None,
            mdns: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            seeders: DEFAULT_SEEDERS,
            site: String::new(),
            site_gateways: SITE_GATEWAYS,
            fault_corrupt_chunks: false,
            fault_lie_tables: false,
            fault_stall_chunks: false,
            fault_chunk_rate: 0,
            serve: ServeConfig::default(),
        }
    }
}

/// Reads a cluster key file: at least 16 bytes of secret, hashed to 32.
pub fn read_cluster_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    use sha2::Digest as _;
    let shown = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|e| invalid("cluster_key_file", &shown, e.to_string()))?;
    let trimmed = String::from_utf8_lossy(&bytes).trim().len();
    if trimmed < 16 {
        return Err(invalid(
            "cluster_key_file",
            &shown,
            "the secret must be at least 16 bytes",
        ));
    }
    Ok(sha2::Sha256::digest(String::from_utf8_lossy(&bytes).trim().as_bytes()).into())
}

impl Config {
    /// A configuration for tests and embedding: everything default but the two essentials.
    pub fn new(listen: SocketAddr, data_dir: &Path, upstream: &str) -> Config {
        Config {
            listen,
            data_dir: data_dir.to_path_buf(),
            upstream: upstream.trim_end_matches('/').to_owned(),
            registries: BTreeMap::new(),
            cache_size: DEFAULT_CACHE_SIZE,
            tag_ttl: Duration::from_secs(DEFAULT_TAG_TTL_SECS),
            auth_file: None,
            upstream_timeout: Duration::from_secs(DEFAULT_UPSTREAM_TIMEOUT_SECS),
            p2p: None,
        }
    }
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a byte size: a plain number, or a number with a unit (`K`, `KB`, `KiB`, ... `T`).
/// Decimal units (`KB`, `MB`) are powers of 1000, binary ones (`KiB`, `K`) powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err("expected a number of bytes, e.g. 10GiB".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| "size too large".to_string())
}

/// Checks a base URL: `http` or `https`, a host, no query. Returns it without a trailing slash.
pub fn parse_base_url(key: &'static str, s: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(s).map_err(|e| invalid(key, s, e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid(key, s, "scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(invalid(key, s, "no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, s, "must not have a query or fragment"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// Whether `s` is a plausible registry host (`name[:port]`), as sent in `?ns=`.
pub fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

impl RunArgs {
    /// Merges flags (with their env fallbacks), the config file and the defaults.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.message().to_owned(),
                })?
            }
            None => FileConfig::default(),
        };
        let listen_s = self
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_s.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listen",
                &listen_s,
                format!("{e} (expected HOST:PORT, e.g. 127.0.0.1:5000)"),
            )
        })?;
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let upstream_s = self
            .upstream
            .clone()
            .or(file.upstream)
            .unwrap_or_else(|| DEFAULT_UPSTREAM.into());
        let upstream = parse_base_url("upstream", &upstream_s)?;

        let mut registries = BTreeMap::new();
        for (host, url) in file.registries {
            if !valid_host(&host) {
                return Err(invalid("registry", &host, "not a host name"));
            }
            registries.insert(host, parse_base_url("registry", &url)?);
        }
        for entry in &self.registries {
            let (host, url) = entry.split_once('=').ok_or_else(|| {
                invalid(
                    "registry",
                    entry,
                    "expected HOST=URL, e.g. docker.io=http://127.0.0.1:5001",
                )
            })?;
            if !valid_host(host) {
                return Err(invalid("registry", entry, "not a host name"));
            }
            registries.insert(host.to_owned(), parse_base_url("registry", url)?);
        }

        let cache_size = match (&self.cache_size, file.cache_size) {
            (Some(s), _) => parse_size(s).map_err(|r| invalid("cache_size", s, r))?,
            (None, Some(SizeValue::Bytes(n))) => n,
            (None, Some(SizeValue::Text(s))) => {
                parse_size(&s).map_err(|r| invalid("cache_size", &s, r))?
            }
            (None, None) => DEFAULT_CACHE_SIZE,
        };
        let tag_ttl = Duration::from_secs(
            self.tag_ttl
                .or(file.tag_ttl)
                .unwrap_or(DEFAULT_TAG_TTL_SECS),
        );
        let timeout = self
            .upstream_timeout
            .or(file.upstream_timeout)
            .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS);
        if timeout == 0 {
            return Err(invalid(
                "upstream_timeout",
                "0",
                "must be at least 1 second",
            ));
        }
        let auth_file = self.auth_file.clone().or(file.auth_file);
        if let Some(path) = &auth_file {
            if !path.is_file() {
                return Err(invalid(
                    "auth_file",
                    &path.display().to_string(),
                    "no such file",
                ));
            }
        }
        let mut peers = file.peers;
        peers.extend(self.peers.iter().cloned());
        let key_file = self.cluster_key_file.clone().or(file.cluster_key_file);
        let p2p_listen = self.p2p_listen.clone().or(file.p2p_listen);
        let p2p = match p2p_listen {
            None => {
                if !peers.is_empty() || key_file.is_some() {
                    return Err(invalid(
                        "p2p_listen",
                        "",
                        "--peer and --cluster-key-file need --p2p-listen HOST:PORT",
                    ));
                }
                None
            }
            Some(l) => {
                let listen = l.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "p2p_listen",
                        &l,
                        format!("{e} (expected HOST:PORT, e.g. 0.0.0.0:7000)"),
                    )
                })?;
                let cluster_key = key_file.as_deref().map(read_cluster_key).transpose()?;
                let chunk_size = match (&self.chunk_size, file.chunk_size) {
                    (Some(s), _) => parse_size(s).map_err(|r| invalid("chunk_size", s, r))?,
                    (None, Some(SizeValue::Bytes(n))) => n,
                    (None, Some(SizeValue::Text(s))) => {
                        parse_size(&s).map_err(|r| invalid("chunk_size", &s, r))?
                    }
                    (None, None) => u64::from(DEFAULT_CHUNK_SIZE),
                };
                if chunk_size < 64 || !chunk_size.is_multiple_of(64) || chunk_size > 64 << 20 {
                    return Err(invalid(
                        "chunk_size",
                        &chunk_size.to_string(),
                        "must be a multiple of 64 bytes, at most 64MiB",
                    ));
                }
                let seeders = self.seeders.or(file.seeders).unwrap_or(DEFAULT_SEEDERS);
                if seeders == 0 {
                    return Err(invalid(
                        "seeders",
                        "0",
                        "at least one node must be allowed to fetch from the upstream",
                    ));
                }
                let site = self.site.clone().or(file.site);
                if let Some(s) = &site {
                    if s.is_empty() || !shoal_protocol::wire::valid_site(s) {
                        return Err(invalid("site", s, "must be 1 to 64 of A-Z a-z 0-9 . _ -"));
                    }
                }
                let site = site.unwrap_or_default();
                let site_gateways = self
                    .site_gateways
                    .or(file.site_gateways)
                    .unwrap_or(SITE_GATEWAYS);
                if !(1..=MAX_SITE_GATEWAYS).contains(&site_gateways) {
                    return Err(invalid(
                        "site_gateways",
                        &site_gateways.to_string(),
                        format!("must be 1 to {MAX_SITE_GATEWAYS}"),
                    ));
                }
                for p in &peers {
                    if p.trim().is_empty() {
                        return Err(invalid("peer", p, "empty peer address"));
                    }
                }
                let mut serve = ServeConfig::default();
                if let Some(n) = self.serve_uploads {
                    if n == 0 {
                        return Err(invalid("serve-uploads", "0", "at least one upload"));
                    }
                    serve.max_active = n;
                }
                if let Some(n) = self.serve_queue {
                    serve.max_queued = n;
                }
                if let Some(n) = self.serve_per_chunk {
                    serve.max_active_per_chunk = n;
                    serve.first_copy_alone = n != 0;
                }
                Some(P2pConfig {
                    listen,
                    peers,
                    cluster_key,
                    mdns: self.mdns || file.mdns.unwrap_or(false),
                    chunk_size: chunk_size as u32,
                    seeders,
                    site,
                    site_gateways,
                    fault_corrupt_chunks: self.fault_corrupt_chunks,
                    fault_lie_tables: self.fault_lie_tables,
                    fault_stall_chunks: false,
                    fault_chunk_rate: 0,
                    serve,
                })
            }
        };
        Ok(Config {
            listen,
            data_dir,
            upstream,
            registries,
            cache_size,
            tag_ttl,
            auth_file,
            upstream_timeout: Duration::from_secs(timeout),
            p2p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn precedence_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\ncache_size = \"1GiB\"\ntag_ttl = 5\n[registries]\n\"docker.io\" = \"http://127.0.0.1:5001/\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path.clone()),
            tag_ttl: Some(7),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(c.cache_size, 1 << 30);
        assert_eq!(c.tag_ttl, Duration::from_secs(7), "flag beats file");
        assert_eq!(c.registries["docker.io"], "http://127.0.0.1:5001");

        std::fs::write(&path, "listn = \"x\"\n").unwrap();
        let err = RunArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");

        let err = RunArgs {
            registries: vec!["docker.io".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("HOST=URL"), "{err}");
        let err = RunArgs {
            upstream: Some("ftp://x".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("scheme"), "{err}");
        let err = RunArgs {
            listen: Some("nope".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn site_gateways_default_flag_file_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.toml");
        std::fs::write(&path, "p2p_listen = \"127.0.0.1:0\"\nsite_gateways = 3\n").unwrap();
        let p2p = |gw: Option<usize>| {
            RunArgs {
                config: Some(path.clone()),
                site: Some("edge-1".into()),
                site_gateways: gw,
                ..Default::default()
            }
            .resolve()
            .map(|c| c.p2p.expect("p2p").site_gateways)
        };
        assert_eq!(p2p(None).unwrap(), 3, "from the file");
        assert_eq!(p2p(Some(1)).unwrap(), 1, "the flag beats the file");
        let err = p2p(Some(0)).unwrap_err();
        assert!(err.to_string().contains("site_gateways"), "{err}");
        let err = p2p(Some(MAX_SITE_GATEWAYS + 1)).unwrap_err();
        assert!(err.to_string().contains("site_gateways"), "{err}");
        std::fs::write(&path, "p2p_listen = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(p2p(None).unwrap(), SITE_GATEWAYS, "the default");
    }
}
