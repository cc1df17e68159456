//! Chunk verification against plain SHA-256 over the same 64 MiB blob (4 MiB chunks).
//!
//! Verifying every chunk does the same compression work as hashing the blob once, plus one state
//! load and compare per chunk, so its throughput should be within a few percent of
//! `Sha256::digest`: the target is a ratio of at least 0.95.
//!
//! Run: `cargo bench -p shoal-protocol --bench chunk_verify -- --warm-up-time 1 --measurement-time 5`
//!
//! Besides criterion's figures, a bench run (not `cargo test --benches`) ends with an interleaved
//! A/B measurement of both, which is fairer on a shared machine, and prints their ratio.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use sha2::{Digest as _, Sha256};
use shoal_protocol::chunk::{ChunkVerifier, MidstateTable, TableBuilder, DEFAULT_CHUNK_SIZE};

const BLOB: usize = 64 << 20;

struct Fixture {
    data: Vec<u8>,
    digest: [u8; 32],
    table: MidstateTable,
}

fn fixture() -> Fixture {
    // splitmix64: incompressible, deterministic.
    let mut x = 0x5eed_u64;
    let mut data = Vec::with_capacity(BLOB);
    while data.len() < BLOB {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        data.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    let digest: [u8; 32] = Sha256::digest(&data).into();
    let table = MidstateTable::compute(&data, DEFAULT_CHUNK_SIZE).expect("layout");
    assert_eq!(table.layout().count(), 16);
    Fixture {
        data,
        digest,
        table,
    }
}

fn plain_digest(f: &Fixture) -> [u8; 32] {
    Sha256::digest(black_box(&f.data)).into()
}

fn verify_all(f: &Fixture) {
    let chunk = f.table.layout().chunk_size() as usize;
    for (i, data) in (0..).zip(black_box(&f.data).chunks(chunk)) {
        ChunkVerifier::verify_chunk(&f.table, &f.digest, i, data).expect("chunk verifies");
    }
}

fn build_table(f: &Fixture) -> (MidstateTable, [u8; 32]) {
    // At most 4 MiB chunks: `chunk_size_for` cuts this 64 MiB blob in 32 chunks of 2 MiB.
    let mut builder = TableBuilder::new(DEFAULT_CHUNK_SIZE).expect("chunk size");
    // Pieces of an odd size, as a network stream delivers them.
    for piece in black_box(&f.data).chunks(65_537) {
        builder.update(piece);
    }
    builder.finish().expect("layout")
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let mut group = c.benchmark_group("64MiB_in_4MiB_chunks");
    group.throughput(Throughput::Bytes(BLOB as u64));
    group.sample_size(10);
    group.bench_function("sha256_digest", |b| b.iter(|| plain_digest(&f)));
    group.bench_function("verify_all_chunks", |b| b.iter(|| verify_all(&f)));
    group.bench_function("table_builder_stream", |b| b.iter(|| build_table(&f)));
    group.finish();
}

/// Interleaves the two measurements so that both see the same machine load, and prints the
/// median throughputs and their ratio.
fn ab_ratio() {
    let f = fixture();
    let rounds = 15;
    let mut plain = Vec::with_capacity(rounds);
    let mut chunked = Vec::with_capacity(rounds);
    for _ in 0..2 {
        black_box(plain_digest(&f));
        verify_all(&f);
    }
    for _ in 0..rounds {
        let t = Instant::now();
        black_box(plain_digest(&f));
        plain.push(t.elapsed());
        let t = Instant::now();
        verify_all(&f);
        chunked.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let mib_s = |d: Duration| (BLOB as f64 / (1 << 20) as f64) / d.as_secs_f64();
    let (p, c) = (mib_s(median(&mut plain)), mib_s(median(&mut chunked)));
    println!("interleaved A/B over {rounds} rounds of 64 MiB (median):");
    println!("  sha256_digest      {p:8.1} MiB/s");
    println!("  verify_all_chunks  {c:8.1} MiB/s");
    println!("  ratio verify/plain {:.3} (target >= 0.95)", c / p);
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` does not (criterion's quick test mode).
    if std::env::args().any(|a| a == "--bench") {
        ab_ratio();
    }
}
