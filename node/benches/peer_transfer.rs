//! Chunk exchange between two endpoints against raw QUIC, measured in the same run.
//!
//! The measured path: a node connects to another, authenticates, fetches the midstate table
//! of a stored blob (1 GiB by default, 4 MiB chunks) and then every chunk, a few requests in
//! flight, each chunk read from the serving node's blob file and verified on arrival. The
//! baseline: one raw QUIC stream carrying as many bytes from memory between two quinn endpoints
//! with the same TLS and transport configuration, bound to the same kind of address (loopback).
//! Rounds are interleaved, the order alternating, and the medians compared. Target: a ratio
//! (exchange / raw) of at least 0.8.
//!
//! Each round also reports the CPU seconds the process spent per GiB, and the run ends with the
//! CPU cost of chunk verification alone (SHA-256 over every byte, which the raw baseline does
//! not pay). When the machine's cores are saturated, the exchange cannot beat
//! raw / (raw + verification) CPU-seconds, printed as the ceiling; what the exchange costs beyond
//! raw and verification together is printed last. Verification hashes each QUIC
//! segment as the reading task receives it (no copy into one buffer), while the connection's
//! own task decrypts the next packets, so on a machine with idle cores it overlaps with the
//! transfer instead.
//!
//! The workspace has one build profile (dev: dependencies at opt-level 3, our code at 1), and
//! `cargo bench` would rebuild RocksDB under the bench profile, so run it as a test target:
//!
//! ```sh
//! cargo test -p shoal-node --bench peer_transfer
//! ```
//!
//! `SHOAL_BENCH_BYTES` (default 1073741824), `SHOAL_BENCH_ROUNDS` (default 3) and
//! `SHOAL_BENCH_IN_FLIGHT` (default 4) change the blob size, the rounds and the chunk requests
//! in flight. `SHOAL_BENCH_JOIN=1` joins each verified chunk into one buffer
//! (`PeerConn::chunk`, one copy) instead of keeping its segments (`PeerConn::chunk_segments`);
//! each chunk request runs as its own task, as in the daemon (`SHOAL_BENCH_ONE_TASK=1` polls
//! them all from one task instead);
//! `SHOAL_BENCH_STREAM_WINDOW` and `SHOAL_BENCH_RECEIVE_WINDOW` override the client's receive
//! windows (bytes), for both the exchange and the raw baseline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use shoal_node::peer::{
    quic_configs, ClusterKey, DenyPrivate, Endpoint, Metrics, PeerConfig, SERVER_NAME,
};
use shoal_node::store::Store;
use shoal_protocol::chunk::{ChunkVerifier, MidstateTable, DEFAULT_CHUNK_SIZE};
use shoal_protocol::Digest;

const PIECE: usize = 1 << 20;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Piece `n` of the blob: deterministic, incompressible (splitmix64).
fn piece(n: u64, out: &mut [u8]) {
    let mut x = n.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed;
    for word in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let z = (z ^ (z >> 31)).to_le_bytes();
        word.copy_from_slice(&z[..word.len()]);
    }
}

/// Writes a `size`-byte blob into `store` (hashing it first: the writer needs its digest).
fn fill(store: &Store, size: u64) -> Digest {
    let mut buf = vec![0u8; PIECE];
    let pieces = size.div_ceil(PIECE as u64);
    let len = |n: u64| (size - n * PIECE as u64).min(PIECE as u64) as usize;
    let mut h = Sha256::new();
    for n in 0..pieces {
        piece(n, &mut buf[..len(n)]);
        h.update(&buf[..len(n)]);
    }
    let digest = Digest::from_bytes(h.finalize().into());
    let mut w = store.writer(&digest).expect("writer");
    for n in 0..pieces {
        piece(n, &mut buf[..len(n)]);
        w.write(&buf[..len(n)]).expect("write");
    }
    w.commit(store, Some(size), None, false).expect("commit");
    digest
}

fn config(key: &ClusterKey) -> PeerConfig {
    let mut c = PeerConfig::new("127.0.0.1:0".parse().expect("addr"), key.clone());
    if let Some(w) = std::env::var("SHOAL_BENCH_STREAM_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.stream_receive_window = w;
    }
    if let Some(w) = std::env::var("SHOAL_BENCH_RECEIVE_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.receive_window = w;
    }
    c
}

/// Fetches the whole blob over the chunk exchange; returns the seconds it took.
async fn exchange(
    client: Arc<Endpoint>,
    server: SocketAddr,
    digest: Digest,
    size: u64,
    in_flight: usize,
) -> f64 {
    let started = Instant::now();
    let conn = client.connect(server).await.expect("connect");
    let table = conn
        .table(&digest, DEFAULT_CHUNK_SIZE, Some(size), &[])
        .await
        .expect("table");
    let count = table.layout().count();
    // `SHOAL_BENCH_JOIN=1`: each chunk joined into one buffer (`PeerConn::chunk`, one copy)
    // rather than kept as received (`PeerConn::chunk_segments`).
    let join = std::env::var("SHOAL_BENCH_JOIN").is_ok_and(|v| v == "1");
    // Each request is its own task, as in the daemon's swarm driver (`SHOAL_BENCH_ONE_TASK=1`:
    // all polled from this one, so their verification shares one thread).
    let one_task = std::env::var("SHOAL_BENCH_ONE_TASK").is_ok_and(|v| v == "1");
    let table = Arc::new(table);
    let received: u64 = futures::stream::iter(0..count)
        .map(|i| {
            let (conn, table) = (conn.clone(), table.clone());
            let fetch = async move {
                let len = if join {
                    conn.chunk(&digest, &table, i, &[]).await.map(|c| c.len())
                } else {
                    conn.chunk_segments(&digest, &table, i, &[])
                        .await
                        .map(|c| c.len())
                };
                len.expect("verified chunk") as u64
            };
            async move {
                if one_task {
                    fetch.await
                } else {
                    tokio::spawn(fetch).await.expect("chunk task")
                }
            }
        })
        .buffered(in_flight)
        .fold(0u64, |acc, n| async move { acc + n })
        .await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(received, size);
    conn.close();
    secs
}

/// Raw QUIC: one stream carrying `size` bytes from memory; returns the seconds it took.
async fn raw(client: quinn::Endpoint, server: SocketAddr, size: u64) -> f64 {
    let started = Instant::now();
    let conn = client
        .connect(server, SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&size.to_be_bytes()).await.expect("ask");
    let _ = send.finish();
    let mut received = 0u64;
    while let Some(c) = recv.read_chunk(usize::MAX, true).await.expect("read") {
        received += c.bytes.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(received, size);
    conn.close(0u32.into(), b"done");
    secs
}

/// The raw server: for each stream, reads the size asked and sends that many bytes.
fn raw_server(endpoint: quinn::Endpoint) {
    tokio::spawn(async move {
        let mut data = vec![0u8; PIECE];
        piece(0, &mut data);
        let data = Bytes::from(data);
        while let Some(incoming) = endpoint.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut ask = [0u8; 8];
                    if recv.read_exact(&mut ask).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(ask);
                    while left > 0 {
                        let n = left.min(PIECE as u64) as usize;
                        if send.write_chunk(data.slice(..n)).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            });
        }
    });
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): utime is the 12th, stime
    // the 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// Runs `f` as a task (as the node would), returning its wall-clock seconds and the CPU seconds
/// the process used meanwhile.
async fn timed(f: impl std::future::Future<Output = f64> + Send + 'static) -> (f64, f64) {
    let cpu = cpu_secs();
    let wall = tokio::spawn(f).await.expect("transfer task");
    (wall, cpu_secs() - cpu)
}

/// CPU seconds per GiB of `ChunkVerifier::verify_chunk` alone, over a 64 MiB blob in memory.
fn verify_cost() -> f64 {
    let size = 64usize << 20;
    let mut data = vec![0u8; size];
    for (n, p) in data.chunks_mut(PIECE).enumerate() {
        piece(n as u64, p);
    }
    let digest: [u8; 32] = Sha256::digest(&data).into();
    let table = MidstateTable::compute(&data, DEFAULT_CHUNK_SIZE).expect("table");
    let started = cpu_secs();
    let mut bytes = 0u64;
    while cpu_secs() - started < 1.0 {
        for (i, c) in data.chunks(DEFAULT_CHUNK_SIZE as usize).enumerate() {
            ChunkVerifier::verify_chunk(&table, &digest, i as u32, c).expect("verifies");
        }
        bytes += size as u64;
    }
    (cpu_secs() - started) / (bytes as f64 / f64::from(1u32 << 30))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let size = env_or("SHOAL_BENCH_BYTES", 1 << 30);
    let rounds = env_or("SHOAL_BENCH_ROUNDS", 3).max(1);
    let in_flight = env_or("SHOAL_BENCH_IN_FLIGHT", 4).max(1) as usize;
    let key = ClusterKey::new([0x5a; 32]);

    let dirs = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let serving = Store::open(dirs.0.path(), u64::MAX).expect("store");
    let fetching = Store::open(dirs.1.path(), u64::MAX).expect("store");
    let setup = Instant::now();
    let s = serving.clone();
    let digest = tokio::task::spawn_blocking(move || fill(&s, size))
        .await
        .expect("fill");
    eprintln!(
        "stored a {size}-byte blob with its table in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    let a = Endpoint::bind(
        config(&key),
        serving,
        Arc::new(DenyPrivate),
        Arc::new(Metrics::new()),
    )
    .expect("bind");
    let b = Arc::new(
        Endpoint::bind(
            config(&key),
            fetching,
            Arc::new(DenyPrivate),
            Arc::new(Metrics::new()),
        )
        .expect("bind"),
    );

    let (server_config, _) = quic_configs(&config(&key)).expect("configs");
    let (_, client_config) = quic_configs(&config(&key)).expect("configs");
    let raw_srv =
        quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let raw_addr = raw_srv.local_addr().expect("addr");
    raw_server(raw_srv);
    let mut raw_cli = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    raw_cli.set_default_client_config(client_config);

    // Warm-up: the page cache, the connection paths, the allocator.
    let warm = size.min(64 << 20);
    timed(raw(raw_cli.clone(), raw_addr, warm)).await;
    timed(exchange(b.clone(), a.local_addr(), digest, size, in_flight)).await;

    let mb = |secs: f64| size as f64 / secs / 1e6;
    let gib = size as f64 / f64::from(1u32 << 30);
    let (mut raws, mut peers) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let raw_run = || timed(raw(raw_cli.clone(), raw_addr, size));
        let peer_run = || timed(exchange(b.clone(), a.local_addr(), digest, size, in_flight));
        // For profiling one side: `SHOAL_BENCH_ONLY=raw` or `=exchange`.
        let only = std::env::var("SHOAL_BENCH_ONLY").unwrap_or_default();
        if !only.is_empty() {
            let (w, c) = if only == "raw" {
                raw_run().await
            } else {
                peer_run().await
            };
            println!("{only} only: {:.0} MB/s, {:.2} CPU-s/GiB", mb(w), c / gib);
            continue;
        }
        let (r, p) = if round % 2 == 0 {
            let r = raw_run().await;
            (r, peer_run().await)
        } else {
            let p = peer_run().await;
            (raw_run().await, p)
        };
        println!(
            "round {}: raw quic {:.0} MB/s ({:.2} CPU-s/GiB), chunk exchange {:.0} MB/s \
             ({:.2} CPU-s/GiB), ratio {:.2}",
            round + 1,
            mb(r.0),
            r.1 / gib,
            mb(p.0),
            p.1 / gib,
            r.0 / p.0
        );
        raws.push(r);
        peers.push(p);
    }
    if raws.is_empty() {
        return;
    }
    let wall = |v: &[(f64, f64)]| median(v.iter().map(|x| x.0).collect());
    let cpu = |v: &[(f64, f64)]| median(v.iter().map(|x| x.1).collect()) / gib;
    let (r, p) = (wall(&raws), wall(&peers));
    println!(
        "median over {rounds} rounds ({size} bytes, {} MiB chunks, {in_flight} in flight): \
         raw quic {:.0} MB/s ({:.2} CPU-s/GiB), chunk exchange {:.0} MB/s ({:.2} CPU-s/GiB), \
         ratio {:.2} (target >= 0.80)",
        DEFAULT_CHUNK_SIZE >> 20,
        mb(r),
        cpu(&raws),
        mb(p),
        cpu(&peers),
        r / p
    );
    let sha = tokio::task::spawn_blocking(verify_cost)
        .await
        .expect("verify cost");
    println!(
        "chunk verification alone: {sha:.2} CPU-s/GiB; with the CPU saturated the ratio is at \
         most raw / (raw + verification) = {:.2}",
        cpu(&raws) / (cpu(&raws) + sha)
    );
    // Paired rounds run back to back, so their difference is steadier under load than either.
    let extra = median(raws.iter().zip(&peers).map(|(r, p)| p.1 - r.1).collect()) / gib;
    println!(
        "exchange CPU beyond raw (median of the rounds' differences): {extra:.2} CPU-s/GiB, \
         {:.2} beyond raw + verification (framing, file mapping, tasks, buffers)",
        extra - sha
    );
    a.shutdown().await;
    if let Ok(b) = Arc::try_unwrap(b) {
        b.shutdown().await;
    }
    raw_cli.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), raw_cli.wait_idle()).await;
}
