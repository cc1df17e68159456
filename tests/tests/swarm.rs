//! Several in-process nodes forming a swarm over loopback: a blob fetched once from the origin
//! reaches the others from their peers, verified chunk by chunk.

use std::time::Duration;

use shoal_node::config::P2pConfig;
use shoal_node::origin::Origin;
use shoal_node::{Config, Node};
use shoal_tests::pseudo_random;

async fn start_node(
    origin: &Origin,
    dir: &std::path::Path,
    peers: Vec<String>,
    key: [u8; 32],
) -> Node {
    start_node_with(origin, dir, peers, key, |_| {}).await
}

/// [`start_node`] with a last change to the node's swarm configuration.
async fn start_node_with(
    origin: &Origin,
    dir: &std::path::Path,
    peers: Vec<String>,
    key: [u8; 32],
    tweak: impl FnOnce(&mut P2pConfig),
) -> Node {
    let mut c = Config::new("127.0.0.1:0".parse().unwrap(), dir, &origin.url());
    c.upstream_timeout = Duration::from_secs(10);
    let mut p2p = P2pConfig::new("127.0.0.1:0".parse().unwrap());
    p2p.peers = peers;
    p2p.cluster_key = Some(key);
    p2p.chunk_size = 1 << 20;
    tweak(&mut p2p);
    c.p2p = Some(p2p);
    Node::start(c).await.expect("node starts")
}

/// `n` nodes sharing `key`, each joining through the first, after 2 s for the DHT to form
/// (with the data directories to keep alive).
async fn start_cluster(
    origin: &Origin,
    n: usize,
    key: [u8; 32],
) -> (Vec<tempfile::TempDir>, Vec<Node>) {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = start_node(origin, dirs[0].path(), vec![], key).await;
    let seed = p2p_addr(&first);
    let mut nodes = vec![first];
    for dir in &dirs[1..] {
        nodes.push(start_node(origin, dir.path(), vec![seed.clone()], key).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    (dirs, nodes)
}

/// The body of a GET, which must succeed.
async fn get_bytes(http: &reqwest::Client, url: String) -> bytes::Bytes {
    http.get(url).send().await.unwrap().bytes().await.unwrap()
}

fn p2p_addr(n: &Node) -> String {
    n.mirror()
        .swarm
        .as_ref()
        .expect("swarm on")
        .listen_addr()
        .to_string()
}

/// A node's Prometheus metrics, as text.
async fn metrics(http: &reqwest::Client, n: &Node) -> String {
    let url = format!("http://{}/metrics", n.addr());
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// The value of counter `name` (0 if absent) in Prometheus text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The nodes' logs go to the test's output, filtered by `SHOAL_LOG` (once per test binary).
fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SHOAL_LOG"))
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_reaches_the_swarm_from_one_upstream_fetch() {
    log_to_test_output();
    let origin = Origin::start().await.unwrap();
    let data = pseudo_random(6 << 20, 77);
    let d = origin.put_blob(data.clone());
    let key = [7u8; 32];
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = start_node(&origin, dirs[0].path(), vec![], key).await;
    let seed = p2p_addr(&first);
    let mut nodes = vec![first];
    for dir in &dirs[1..3] {
        nodes.push(start_node(&origin, dir.path(), vec![seed.clone()], key).await);
    }
    // A node with another key: it cannot join.
    let outsider = start_node(&origin, dirs[3].path(), vec![seed.clone()], [9u8; 32]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let http = reqwest::Client::new();
    let get = |n: &Node| {
        let url = format!("http://{}/v2/x/blobs/{d}", n.addr());
        let http = http.clone();
        async move { get_bytes(&http, url).await }
    };
    assert_eq!(get(&nodes[0]).await, data);
    assert_eq!(origin.blob_bytes_served(), data.len() as u64);
    tokio::time::sleep(Duration::from_millis(500)).await; // let the provider record spread
    for n in &nodes[1..] {
        assert_eq!(get(n).await, data);
    }
    assert_eq!(
        origin.blob_bytes_served(),
        data.len() as u64,
        "the others must get it from peers"
    );
    for n in &nodes[1..] {
        let rec = n.mirror().pulls.get(&d).expect("pull recorded");
        let from_peers: u64 = rec.fetched_from_peers.values().sum();
        assert_eq!(from_peers, data.len() as u64, "{rec:?}");
        assert_eq!(rec.fetched_from_upstream, 0);
    }

    // With the origin gone, the outsider cannot fetch it from the swarm; a member still can.
    origin.stop();
    let r = http
        .get(format!("http://{}/v2/x/blobs/{d}", outsider.addr()))
        .send()
        .await
        .unwrap();
    assert_ne!(
        r.status(),
        200,
        "a node without the cluster key must not get the blob"
    );
    let late_dir = tempfile::tempdir().unwrap();
    let late = start_node(&origin, late_dir.path(), vec![seed.clone()], key).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get(&late).await, data);
    for n in nodes.into_iter().chain([outsider, late]) {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_peer_is_banned_and_costs_only_its_chunks() {
    let origin = Origin::start().await.unwrap();
    let data = pseudo_random(8 << 20, 91);
    let d = origin.put_blob(data.clone());
    let key = [3u8; 32];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let honest = start_node(&origin, dirs[0].path(), vec![], key).await;
    let seed = p2p_addr(&honest);
    // The poisoned node holds the blob (verified) but corrupts every chunk it serves.
    let poisoned = start_node_with(&origin, dirs[1].path(), vec![seed.clone()], key, |p| {
        p.fault_corrupt_chunks = true
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let http = reqwest::Client::new();
    let url = |n: &Node| format!("http://{}/v2/x/blobs/{d}", n.addr());
    assert_eq!(get_bytes(&http, url(&honest)).await, data);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get_bytes(&http, url(&poisoned)).await, data);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served_before = origin.blob_bytes_served();

    let victim = start_node(&origin, dirs[2].path(), vec![seed], key).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = get_bytes(&http, url(&victim)).await;
    assert_eq!(got, data, "the victim must end with the right bytes");
    let rec = victim.mirror().pulls.get(&d).unwrap();
    let metrics = metrics(&http, &victim).await;
    let poisoned_id = poisoned
        .mirror()
        .swarm
        .as_ref()
        .unwrap()
        .peer_id()
        .to_string();
    let from_poisoned = rec
        .fetched_from_peers
        .get(&poisoned_id)
        .copied()
        .unwrap_or(0);
    assert_eq!(
        from_poisoned, 0,
        "no byte from the poisoned peer is kept: {rec:?}"
    );
    if counter(&metrics, "shoal_chunks_rejected_total") == 0 {
        // The scheduler happened to ask only the honest peer: nothing was at risk.
        assert_eq!(
            rec.fetched_from_peers.values().sum::<u64>() + rec.fetched_from_upstream,
            data.len() as u64
        );
    } else {
        assert!(
            counter(&metrics, "shoal_peers_banned_total") > 0,
            "{metrics}"
        );
    }
    assert_eq!(
        origin.blob_bytes_served(),
        served_before,
        "the swarm, not the upstream, recovers"
    );
    for n in [honest, poisoned, victim] {
        n.shutdown().await;
    }
}

/// A sole provider with a fault and a node that pulls from it: the provider (made with `fault`)
/// fetches a `len`-byte blob from the origin, the origin then gets `origin_fault` (if any),
/// and a second node joining through the provider pulls the blob, which must complete right
/// within 90 s. Returns the provider, the victim and the victim's metrics, with the data
/// directories to keep alive.
async fn pull_from_a_faulty_sole_provider(
    len: usize,
    key: [u8; 32],
    fault: impl FnOnce(&mut P2pConfig),
    origin_fault: Option<shoal_node::origin::Fault>,
) -> (Origin, Vec<tempfile::TempDir>, Node, Node, String) {
    let origin = Origin::start().await.unwrap();
    let data = pseudo_random(len, key[0].into());
    let d = origin.put_blob(data.clone());
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let provider = start_node_with(&origin, dirs[0].path(), vec![], key, fault).await;
    let http = reqwest::Client::new();
    let url = |n: &Node| format!("http://{}/v2/x/blobs/{d}", n.addr());
    assert_eq!(get_bytes(&http, url(&provider)).await, data);
    if let Some(f) = origin_fault {
        origin.set_fault(f);
    }
    let victim = start_node(&origin, dirs[1].path(), vec![p2p_addr(&provider)], key).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = tokio::time::timeout(Duration::from_secs(90), get_bytes(&http, url(&victim)))
        .await
        .expect("the pull finishes");
    assert_eq!(got, data, "the victim must end with the right bytes");
    let victim_metrics = metrics(&http, &victim).await;
    (origin, dirs, provider, victim, victim_metrics)
}

/// A peer that announces a chunk and never sends it: the request times out, the download
/// abandons it (`Action::Cancel`), and the abandoned request's stream is reset, so the sender
/// learns that nobody waits for the chunk any more; the blob completes from the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_is_abandoned_and_its_stream_reset() {
    let stall = |p: &mut P2pConfig| p.fault_stall_chunks = true;
    let (_origin, _dirs, stalled, victim, victim_metrics) =
        pull_from_a_faulty_sole_provider(2 << 20, [4u8; 32], stall, None).await;
    assert!(
        counter(&victim_metrics, "shoal_chunk_requests_cancelled_total") > 0,
        "{victim_metrics}"
    );
    // The stalled sender sees its streams stopped (it waits for that, at most its timeout).
    let http = reqwest::Client::new();
    let mut stopped = 0;
    for _ in 0..100 {
        stopped = counter(
            &metrics(&http, &stalled).await,
            "shoal_peer_chunk_sends_stopped_total",
        );
        if stopped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped > 0, "no chunk send was stopped by the requester");
    for n in [stalled, victim] {
        n.shutdown().await;
    }
}

/// A peer behind a thin link (each chunk takes longer than a request's first timeout) is the
/// only source once the upstream is down: the download must not give up on a transfer that
/// is still moving. It reports the bytes received, the request's deadline follows them, and
/// the blob completes from that peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_still_delivers_when_the_upstream_is_down() {
    // Two chunks of 256 KiB at 24 KiB/s: 10.7 s each, over the download's 5 s timeout floor
    // and over the 10 s the connection gives any one wait.
    let thin = |p: &mut P2pConfig| p.fault_chunk_rate = 24 << 10;
    let down = Some(shoal_node::origin::Fault::ServerError);
    let (_origin, _dirs, slow, victim, victim_metrics) =
        pull_from_a_faulty_sole_provider(512 << 10, [6u8; 32], thin, down).await;
    assert_eq!(
        counter(&victim_metrics, "shoal_chunk_requests_cancelled_total"),
        0,
        "a moving transfer was abandoned: {victim_metrics}"
    );
    for n in [slow, victim] {
        n.shutdown().await;
    }
}

/// A seeder streaming a blob from a slow upstream shares it as it arrives: the other nodes,
/// asking at the same time, wait for it (far longer than the takeover time) instead of going
/// upstream themselves, and get their bytes from it and from each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_fetch_from_a_seeder_while_its_blob_arrives() {
    log_to_test_output();
    let origin = Origin::start().await.unwrap();
    // 16 MiB at 2 MiB/s: 8 s, longer than the 5 s takeover time.
    let data = pseudo_random(16 << 20, 78);
    let d = origin.put_blob(data.clone());
    origin.set_fault(shoal_node::origin::Fault::SlowBlobs(2 << 20));
    let key = [5u8; 32];
    let (_dirs, nodes) = start_cluster(&origin, 3, key).await;

    let http = reqwest::Client::new();
    let pulls = nodes.iter().enumerate().map(|(i, n)| {
        let url = format!("http://{}/v2/x/blobs/{d}", n.addr());
        let http = http.clone();
        async move {
            // Staggered a little, so that one node is clearly first.
            tokio::time::sleep(Duration::from_millis(300 * i as u64)).await;
            get_bytes(&http, url).await
        }
    });
    for got in futures::future::join_all(pulls).await {
        assert_eq!(got.len(), data.len());
        assert!(got == data, "content differs");
    }
    let served = origin.blob_bytes_served();
    assert!(
        served <= data.len() as u64 * 12 / 10,
        "upstream served {served} bytes for a {} byte blob",
        data.len()
    );
    let from_peers: u64 = nodes
        .iter()
        .filter_map(|n| n.mirror().pulls.get(&d))
        .map(|r| r.fetched_from_peers.values().sum::<u64>())
        .sum();
    assert!(
        from_peers >= data.len() as u64,
        "the followers got only {from_peers} bytes from peers"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_blobs_go_through_the_swarm_only_to_pullers_the_registry_accepts() {
    log_to_test_output();
    let origin = Origin::start().await.unwrap();
    origin.set_auth(
        shoal_node::origin::Auth::Bearer("u".into(), "p".into()),
        &[],
    );
    let data = pseudo_random(6 << 20, 91);
    let d = origin.put_blob(data.clone());
    let key = [7u8; 32];
    let (_dirs, nodes) = start_cluster(&origin, 3, key).await;
    let http = reqwest::Client::new();
    // A GET of the blob on node `n` by a client with password `creds` for user `u` (or none).
    let get = |n: &Node, creds: Option<&str>| {
        let mut req = http.get(format!("http://{}/v2/team/app/blobs/{d}", n.addr()));
        if let Some(p) = creds {
            req = req.basic_auth("u", Some(p));
        }
        req.send()
    };

    // The first puller's credentials fetch it from the registry.
    let r = get(&nodes[0], Some("p")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(origin.blob_bytes_served(), data.len() as u64);
    tokio::time::sleep(Duration::from_millis(500)).await; // let the provider record spread

    // A client without credentials, or with wrong ones, gets nothing, from the registry or
    // from the peer that holds it.
    for creds in [None, Some("wrong")] {
        let r = get(&nodes[1], creds).await.unwrap();
        assert_eq!(r.status(), 401, "credentials {creds:?}");
    }
    assert!(nodes[1].mirror().store.open_blob(&d).is_none());

    // A client the registry accepts gets it from the peer: the registry is asked (HEAD), but
    // sends no blob bytes again.
    let r = get(&nodes[2], Some("p")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(
        origin.blob_bytes_served(),
        data.len() as u64,
        "the second puller must get it from its peer"
    );
    let rec = nodes[2].mirror().pulls.get(&d).expect("pull recorded");
    assert_eq!(
        rec.fetched_from_peers.values().sum::<u64>(),
        data.len() as u64,
        "{rec:?}"
    );
    // Stored as private on the second node too: its other clients must show credentials.
    let r = get(&nodes[2], None).await.unwrap();
    assert_eq!(r.status(), 401);
    for n in nodes {
        n.shutdown().await;
    }
}

/// This node's peer id, as the pulls record names peers.
fn peer_name(n: &Node) -> String {
    n.mirror().swarm.as_ref().unwrap().peer_id().to_string()
}

/// Puts `data` in `n`'s store, as if it had fetched it, and announces it.
fn hold(n: &Node, data: &[u8]) {
    let d = shoal_protocol::Digest::of(data);
    n.mirror().store.put_small(&d, data, None, false).unwrap();
    n.mirror().swarm.as_ref().unwrap().provide(d);
}

/// A midstate table that lies in the middle (`fault_lie_tables`: the digest and the last state
/// are right, one state in the middle is not) is found out by the chunks, and the arbitration
/// blames the right party:
/// 1. The liar is the only provider: the victim takes its table, the liar's own genuine chunk
///    does not chain with it, and with no third provider to ask the chunk's sender (here the
///    liar itself, the table's source) is banned, as `swarm_fetch` documents.
/// 2. One honest provider appears: the victim still holds the lying table, so an honest chunk
///    does not chain with it either. Nobody else can arbitrate, but the table in use came from a
///    provider now banned: the honest provider's own table decides, disagrees, and the table is
///    cut back and replaced; the honest sender is not banned. The pull completes with the right
///    bytes. (Before, each honest provider found alone was banned in turn and the pull stalled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_table_is_found_out_and_honest_providers_are_not_blamed() {
    log_to_test_output();
    let origin = Origin::start().await.unwrap();
    // 8 chunks of 1 MiB: 7 states, the fourth a lie.
    let data = pseudo_random(8 << 20, 93);
    let d = origin.put_blob(data.clone());
    let key = [4u8; 32];
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = start_node(&origin, dirs[0].path(), vec![], key).await;
    let seed = p2p_addr(&boot);
    let liar = start_node_with(&origin, dirs[1].path(), vec![seed.clone()], key, |p| {
        p.fault_lie_tables = true
    })
    .await;
    let honest = start_node(&origin, dirs[2].path(), vec![seed.clone()], key).await;
    // Never a designated seeder: with no provider it waits for one (the liar) rather than
    // going to the upstream.
    let victim = start_node_with(&origin, dirs[3].path(), vec![seed], key, |p| p.seeders = 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    hold(&liar, &data);
    tokio::time::sleep(Duration::from_millis(500)).await; // let the provider record spread

    let http = reqwest::Client::new();
    let url = format!("http://{}/v2/x/blobs/{d}", victim.addr());
    let pull = tokio::spawn({
        let http = http.clone();
        async move { get_bytes(&http, url).await }
    });

    // 1. Only the liar: banned once its own chunk fails against its own table.
    let liar_name = peer_name(&liar);
    let banned = first_bans(&victim, &d, 200).await;
    assert_eq!(
        banned,
        [liar_name.clone()].into(),
        "with no third provider, the chunk's sender (the liar) is banned"
    );
    assert!(!pull.is_finished(), "no provider left to finish the pull");

    // 2. One honest provider appears; the victim's table is still the lie, and nobody else can
    // arbitrate: since the table came from a provider now banned, the honest provider's own
    // table decides, and its chunks are not held against it.
    hold(&honest, &data);
    let got = tokio::time::timeout(Duration::from_secs(60), pull)
        .await
        .expect("the pull finishes")
        .unwrap();
    assert!(got == data, "the victim must end with the right bytes");
    // (the client gets its last byte once the chunks prove the blob, before it is stored)
    let mut rec = victim.mirror().pulls.get(&d).unwrap();
    for _ in 0..100 {
        if rec.state != "fetching" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        rec = victim.mirror().pulls.get(&d).unwrap();
    }
    assert_eq!(rec.state, "verified", "{rec:?}");
    assert_eq!(
        rec.banned_peers,
        [liar_name].into(),
        "an honest chunk that disagrees with a lying table must not get its sender banned: {rec:?}"
    );
    let from_honest = rec
        .fetched_from_peers
        .get(&peer_name(&honest))
        .copied()
        .unwrap_or(0);
    assert!(from_honest > 0, "{rec:?}");
    let metrics = metrics(&http, &victim).await;
    assert!(
        metrics.contains("shoal_peers_banned_total 1\n"),
        "{metrics}"
    );
    for n in [boot, liar, honest, victim] {
        n.shutdown().await;
    }
}

/// Locality: a node of site "b" pulling a blob that a peer of its own site and a peer of site
/// "a" both hold whole takes it from its own site; the far peer is asked only for chunks no
/// near peer holds, and only once the site has given nothing for `FAR_QUIET_MS` (here: at most
/// the one or two asked before the near peer's bitfield came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_a_blob_from_its_own_site() {
    let origin = Origin::start().await.unwrap();
    // 16 chunks of 1 MiB.
    let data = pseudo_random(16 << 20, 77);
    let d = origin.put_blob(data.clone());
    let key = [6u8; 32];
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = start_node(&origin, dirs[0].path(), vec![], key).await;
    let seed = p2p_addr(&boot);
    let site = |s: &'static str| move |p: &mut P2pConfig| p.site = s.into();
    let far = start_node_with(&origin, dirs[1].path(), vec![seed.clone()], key, site("a")).await;
    let near = start_node_with(&origin, dirs[2].path(), vec![seed.clone()], key, site("b")).await;
    let puller = start_node_with(&origin, dirs[3].path(), vec![seed], key, |p| {
        p.site = "b".into();
        p.seeders = 0;
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    hold(&far, &data);
    hold(&near, &data);
    tokio::time::sleep(Duration::from_millis(500)).await; // let the provider records spread

    let http = reqwest::Client::new();
    let url = format!("http://{}/v2/x/blobs/{d}", puller.addr());
    let got = tokio::time::timeout(Duration::from_secs(60), get_bytes(&http, url))
        .await
        .expect("the pull finishes");
    assert!(got == data, "the puller must end with the right bytes");
    let rec = puller.mirror().pulls.get(&d).unwrap();
    let from = |n: &Node| {
        rec.fetched_from_peers
            .get(&peer_name(n))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(rec.fetched_from_upstream, 0, "{rec:?}");
    assert!(
        from(&far) <= 2 << 20,
        "the far peer served more than two chunks: {rec:?}"
    );
    assert!(from(&near) >= 14 << 20, "{rec:?}");
    // Its site has two nodes, both among the DHT's nodes nearest the blob: it counts itself
    // among its site's gateways (it learnt the other's site from identify).
    assert_eq!(rec.site_role, Some("gateway"), "{rec:?}");
}

/// A provider whose table disagrees with the one in use (the table-conflict path, where no chunk
/// has failed yet): the victim took a partial table from an honest seeder whose import stalled
/// mid-blob (the origin sends 5 of the 8 MiB, then nothing); a liar then provides the whole blob
/// with a table whose fourth state lies, inside the honest prefix. The victim asks the liar for
/// the rest of the table (it holds chunks the victim's table does not cover), finds that it
/// disagrees with the prefix in use and, with no third provider to decide (the honest seeder is
/// the table's source), bans the liar. The honest seeder is not blamed, and its chunks, checked
/// against its own table, keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_whose_table_conflicts_with_the_one_in_use_is_banned() {
    table_conflict(false).await;
}

/// The same with a third provider to decide: a follower that took the honest seeder's prefix
/// before the victim started. The victim's table came from one of the two; the other is asked
/// for its table, agrees with the one in use, and the liar is banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_provider_decides_a_table_conflict() {
    table_conflict(true).await;
}

async fn table_conflict(with_arbiter: bool) {
    log_to_test_output();
    let origin = Origin::start().await.unwrap();
    let data = pseudo_random(8 << 20, 94);
    let d = origin.put_blob(data.clone());
    let key = [5u8; 32];
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = start_node(&origin, dirs[0].path(), vec![], key).await;
    let seed = p2p_addr(&boot);
    // The honest seeder: a designated seeder of every blob, patient with a stalled upstream.
    let honest = {
        let mut c = Config::new(
            "127.0.0.1:0".parse().unwrap(),
            dirs[1].path(),
            &origin.url(),
        );
        c.upstream_timeout = Duration::from_secs(120);
        let mut p2p = P2pConfig::new("127.0.0.1:0".parse().unwrap());
        p2p.peers = vec![seed.clone()];
        p2p.cluster_key = Some(key);
        p2p.chunk_size = 1 << 20;
        p2p.seeders = 10;
        c.p2p = Some(p2p);
        Node::start(c).await.expect("node starts")
    };
    let liar = start_node_with(&origin, dirs[2].path(), vec![seed.clone()], key, |p| {
        p.fault_lie_tables = true
    })
    .await;
    let victim = start_node_with(&origin, dirs[3].path(), vec![seed.clone()], key, |p| {
        p.seeders = 0
    })
    .await;
    let third = start_node_with(&origin, dirs[4].path(), vec![seed], key, |p| p.seeders = 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The honest seeder imports 5 MiB of the blob and stalls.
    origin.set_fault(shoal_node::origin::Fault::HangBlobsAfter(5 << 20));
    let http = reqwest::Client::new();
    let pull = |n: &Node| {
        let (http, url) = (http.clone(), format!("http://{}/v2/x/blobs/{d}", n.addr()));
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status()) })
    };
    let honest_pull = pull(&honest);
    let mut imported = 0;
    for _ in 0..200 {
        imported = honest
            .mirror()
            .pulls
            .get(&d)
            .map_or(0, |r| r.fetched_from_upstream);
        if imported >= 5 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(imported, 5 << 20, "the honest import stalls at 5 MiB");
    // From now on the upstream sends nobody anything: no fallback completes the blob.
    origin.set_fault(shoal_node::origin::Fault::HangBlobs);
    tokio::time::sleep(Duration::from_millis(500)).await; // its provider record spreads

    // With an arbiter: a follower takes the honest seeder's 5 chunks (and its table) first.
    let third_pull = with_arbiter.then(|| pull(&third));
    if with_arbiter {
        for _ in 0..400 {
            if fetched(&third, &d) >= 5 << 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            fetched(&third, &d),
            5 << 20,
            "the follower holds the prefix"
        );
        tokio::time::sleep(Duration::from_millis(500)).await; // its provider record spreads
    }

    // The victim pulls: its providers hold 5 chunks, and so does the table it takes.
    let victim_pull = pull(&victim);
    for _ in 0..200 {
        if fetched(&victim, &d) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fetched(&victim, &d) > 0, "the victim fetches from peers");

    // The liar appears, holding the whole blob: its table disagrees with the prefix in use.
    hold(&liar, &data);
    let liar_name = peer_name(&liar);
    let banned = first_bans(&victim, &d, 600).await;
    assert_eq!(
        banned,
        [liar_name.clone()].into(),
        "the provider whose table disagrees is banned, the honest providers are not"
    );
    let rec = victim.mirror().pulls.get(&d).unwrap();
    let from_liar = rec.fetched_from_peers.get(&liar_name).copied();
    assert!(
        from_liar.unwrap_or(0) <= 1 << 20,
        "at most the chunk in flight when the table came: {rec:?}"
    );
    for task in [Some(honest_pull), Some(victim_pull), third_pull]
        .into_iter()
        .flatten()
    {
        task.abort();
    }
    for n in [boot, honest, liar, victim, third] {
        let _ = tokio::time::timeout(Duration::from_secs(30), n.shutdown()).await;
    }
}

/// Bytes `n` has fetched of `d` from peers, all of them together.
fn fetched(n: &Node, d: &shoal_protocol::Digest) -> u64 {
    n.mirror()
        .pulls
        .get(d)
        .map_or(0, |r| r.fetched_from_peers.values().sum())
}

/// The peers `n`'s pull of `d` has banned, once it has banned any (polled every 50 ms, at most
/// `tries` times; empty if none by then).
async fn first_bans(
    n: &Node,
    d: &shoal_protocol::Digest,
    tries: u32,
) -> std::collections::BTreeSet<String> {
    for _ in 0..tries {
        if let Some(rec) = n.mirror().pulls.get(d) {
            if !rec.banned_peers.is_empty() {
                return rec.banned_peers;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Default::default()
}
