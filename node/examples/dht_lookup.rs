//! Provider-lookup latency on a local DHT cluster: N nodes in this process on loopback (pnet
//! on, as in a real cluster), each providing a few digests; then `providers()` lookups from
//! random nodes for digests held by other nodes, against baselines measured in the same run.
//!
//! ```sh
//! cargo run -p shoal-node --example dht_lookup                       # 20 nodes, 500 lookups
//! cargo run -p shoal-node --example dht_lookup -- --nodes 20 --lookups 500 --digests 3
//! ```
//!
//! Before measuring, every node looks up every digest once (not measured), so the
//! connections lookups use are open, as in a cluster that has been running for a while (idle
//! connections are kept 5 minutes). A lookup that must first dial pays a TCP + pnet + noise +
//! yamux handshake on top: that is what the tail of a cold cluster consists of.
//!
//! Reported rows (all through the public `DhtHandle` API, one call at a time):
//! - `lookup limit=1`: the provider lookup the chunk fetcher makes (answers at the first
//!   provider found); the figure the p99 <= 10 ms target applies to.
//! - `lookup to completion`: asks for more providers than exist, so it waits until the
//!   Kademlia query has finished (the closest nodes answered).
//! - baseline `handle round trip`: `connected_peers()`: handle → actor → reply, no network.
//! - baseline `local-record lookup`: `providers()` on a node that holds the provider record
//!   itself: the same code path minus the network query.
//! - baseline `tcp echo rtt`: a 64-byte request-response over a plain loopback TCP socket in
//!   the same runtime (the network floor, without pnet/noise/yamux).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_node::dht::{Dht, DhtConfig, Metrics, PeerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    nodes: usize,
    digests: usize,
    lookups: usize,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 20,
        digests: 3,
        lookups: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--nodes" => a.nodes = val().max(2),
            "--digests" => a.digests = val().max(1),
            "--lookups" => a.lookups = val().max(1),
            other => panic!("unknown flag {other} (use --nodes N --digests D --lookups L)"),
        }
    }
    a
}

struct Stats {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Stats {
    fn pct(&self, q: f64) -> Duration {
        let mut v = self.samples.clone();
        v.sort();
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
    fn row(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mean =
            self.samples.iter().sum::<Duration>().as_secs_f64() * 1e3 / self.samples.len() as f64;
        println!(
            "{:<32} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            self.name,
            self.samples.len(),
            ms(self.pct(0.5)),
            ms(self.pct(0.99)),
            ms(*self.samples.iter().max().unwrap()),
            mean
        );
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let cluster_key: [u8; 32] = rng.gen();
    let dirs: Vec<tempfile::TempDir> = (0..args.nodes)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();

    // Start: the first node alone, the others pointed at it by address only.
    let t0 = Instant::now();
    let mut nodes: Vec<Dht> = Vec::new();
    let mut seed = String::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut c = DhtConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
        c.cluster_key = Some(cluster_key);
        if i > 0 {
            c.peers = vec![seed.clone()];
        }
        let dht = Dht::start(c, Metrics::new()).await.expect("start");
        if i == 0 {
            seed = dht.listen_addr().to_string();
        }
        nodes.push(dht);
    }
    let handles: Vec<_> = nodes.iter().map(Dht::handle).collect();
    let ids: Vec<PeerId> = nodes.iter().map(Dht::local_peer_id).collect();
    // Converged when every node has every other in its routing table.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut min_known = usize::MAX;
        for h in &handles {
            min_known = min_known.min(h.known_peers().await.unwrap().len());
        }
        if min_known + 1 >= args.nodes {
            break;
        }
        if Instant::now() > deadline {
            println!("warning: not converged (min routing table {min_known})");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} nodes bootstrapped in {:.2} s (routing tables complete)",
        args.nodes,
        t0.elapsed().as_secs_f64()
    );

    // Each node provides `digests` random digests.
    let t1 = Instant::now();
    let mut owned: Vec<([u8; 32], usize)> = Vec::new();
    let mut provides = Vec::new();
    for (i, h) in handles.iter().enumerate() {
        for _ in 0..args.digests {
            let d: [u8; 32] = rng.gen();
            owned.push((d, i));
            let h = h.clone();
            provides.push(tokio::spawn(async move { h.provide(d).await }));
        }
    }
    for p in provides {
        p.await.unwrap().expect("provide");
    }
    println!(
        "{} digests provided in {:.2} s",
        owned.len(),
        t1.elapsed().as_secs_f64()
    );

    // A lookup from a random node for a digest some other node provides.
    let pick = |rng: &mut rand::rngs::StdRng| loop {
        let (d, owner) = *owned.choose(rng).unwrap();
        let from = rng.gen_range(0..args.nodes);
        if from != owner {
            return (d, owner, from);
        }
    };

    // Warm-up, not measured: every node looks up every digest once, so the connections a
    // lookup uses exist (steady state: connections stay open for 5 idle minutes).
    for (from, h) in handles.iter().enumerate() {
        for (d, owner) in &owned {
            if *owner != from {
                h.providers(*d, 1).await.unwrap();
            }
        }
    }
    let mut conns = 0;
    for h in &handles {
        conns += h.connected_peers().await.unwrap().len();
    }
    println!(
        "after warm-up: {:.1} of {} peers connected per node",
        conns as f64 / args.nodes as f64,
        args.nodes - 1
    );

    let mut lookup1 = Stats {
        name: "lookup limit=1",
        samples: Vec::new(),
    };
    let mut wrong = 0;
    let cpu0 = process_cpu_seconds();
    let wall0 = Instant::now();
    for _ in 0..args.lookups {
        let (d, owner, from) = pick(&mut rng);
        let t = Instant::now();
        let got = handles[from].providers(d, 1).await.unwrap();
        lookup1.samples.push(t.elapsed());
        if got.len() != 1
            || got[0].peer_id != ids[owner]
            || got[0].chunk_addr != nodes[owner].listen_addr()
        {
            wrong += 1;
        }
    }

    let cpu_per_lookup = (process_cpu_seconds() - cpu0) / args.lookups as f64;
    let busy = (process_cpu_seconds() - cpu0) / wall0.elapsed().as_secs_f64();

    let mut lookup_all = Stats {
        name: "lookup to completion",
        samples: Vec::new(),
    };
    for _ in 0..args.lookups {
        let (d, owner, from) = pick(&mut rng);
        let t = Instant::now();
        let got = handles[from].providers(d, args.nodes).await.unwrap();
        lookup_all.samples.push(t.elapsed());
        if got.iter().map(|p| p.peer_id).collect::<HashSet<_>>() != HashSet::from([ids[owner]]) {
            wrong += 1;
        }
    }

    // Baseline: the actor round trip.
    let mut rtt = Stats {
        name: "baseline handle round trip",
        samples: Vec::new(),
    };
    for _ in 0..args.lookups {
        let h = &handles[rng.gen_range(0..args.nodes)];
        let t = Instant::now();
        h.connected_peers().await.unwrap();
        rtt.samples.push(t.elapsed());
    }

    // Baseline: lookups answered from a locally held provider record. The nodes nearest a
    // digest (other than its provider) hold its record.
    let mut holders: Vec<([u8; 32], usize)> = Vec::new();
    for (d, owner) in &owned {
        let near = handles[*owner].closest_peers(*d, 3).await.unwrap();
        for p in near.peers {
            if p != ids[*owner] {
                holders.push((*d, ids.iter().position(|x| *x == p).unwrap()));
            }
        }
    }
    let mut local = Stats {
        name: "baseline local-record lookup",
        samples: Vec::new(),
    };
    for _ in 0..args.lookups {
        let (d, from) = *holders.choose(&mut rng).unwrap();
        let t = Instant::now();
        let got = handles[from].providers(d, 1).await.unwrap();
        local.samples.push(t.elapsed());
        if got.len() != 1 {
            wrong += 1;
        }
    }

    // Baseline: plain loopback TCP request-response.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut c = tokio::net::TcpStream::connect(echo_addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut tcp = Stats {
        name: "baseline tcp echo rtt",
        samples: Vec::new(),
    };
    let mut buf = [0u8; 64];
    for _ in 0..args.lookups {
        let t = Instant::now();
        c.write_all(&buf).await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        tcp.samples.push(t.elapsed());
    }

    // Idle cost, last: CPU of the whole process while nothing is asked of the DHT.
    let idle_secs: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let idle0 = process_cpu_seconds();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle = (process_cpu_seconds() - idle0) / idle_secs as f64;

    println!();
    println!(
        "{:<32} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "n", "p50", "p99", "max", "mean"
    );
    for s in [&lookup1, &lookup_all, &rtt, &local, &tcp] {
        s.row();
    }
    let p99 = lookup1.pct(0.99);
    let mut slow = lookup1.samples.clone();
    slow.sort();
    slow.reverse();
    println!();
    println!(
        "lookup limit=1: {} of {} over 10 ms; slowest (ms): {:?}",
        lookup1
            .samples
            .iter()
            .filter(|d| **d > Duration::from_millis(10))
            .count(),
        lookup1.samples.len(),
        slow.iter()
            .take(10)
            .map(|d| (d.as_secs_f64() * 1e4).round() / 10.0)
            .collect::<Vec<_>>()
    );
    let mut conns = 0;
    for h in &handles {
        conns += h.connected_peers().await.unwrap().len();
    }
    println!(
        "mean connected peers per node after the run: {:.1} of {}",
        conns as f64 / args.nodes as f64,
        args.nodes - 1
    );
    println!(
        "lookup limit=1 p99 = {:.3} ms = {:.1}x the local-record lookup p99, {:.1}x the tcp echo p99; target p99 <= 10 ms: {}",
        p99.as_secs_f64() * 1e3,
        p99.as_secs_f64() / local.pct(0.99).as_secs_f64(),
        p99.as_secs_f64() / tcp.pct(0.99).as_secs_f64(),
        if p99 <= Duration::from_millis(10) { "MET" } else { "NOT MET" }
    );
    println!(
        "process CPU per limit=1 lookup (all nodes, both ends, incl. background): {:.3} ms ({:.2} cores busy during that phase)",
        cpu_per_lookup * 1e3,
        busy
    );
    println!(
        "idle: {:.3} cores busy for {} connected nodes doing nothing ({idle_secs} s)",
        idle, args.nodes
    );
    println!("wrong or missing answers: {wrong}");
    for n in nodes {
        n.shutdown().await;
    }
}

/// User + system CPU time of this process, from `/proc/self/stat` (Linux; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Clock ticks are 100 Hz on Linux.
    (ticks(11) + ticks(12)) / 100.0
}
