//! DHT integration tests: in-process nodes on loopback, bootstrapped with `--peer`-style
//! `127.0.0.1:PORT` strings (no peer ids). Every wait is bounded.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_node::dht::{Dht, DhtConfig, Metrics, PeerId, Provider};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(30);

struct TestNode {
    dht: Dht,
    _dir: TempDir,
}

impl TestNode {
    fn addr(&self) -> String {
        self.dht.listen_addr().to_string()
    }
    fn id(&self) -> PeerId {
        self.dht.local_peer_id()
    }
}

fn config(dir: &TempDir, key: Option<[u8; 32]>, peers: Vec<String>) -> DhtConfig {
    let mut c = DhtConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    c.cluster_key = key;
    c.peers = peers;
    c.redial_interval = Duration::from_secs(1);
    c.lookup_timeout = Duration::from_secs(3);
    c
}

async fn start_with(c: DhtConfig, dir: TempDir) -> TestNode {
    let dht = Dht::start(c, Metrics::new()).await.expect("dht start");
    TestNode { dht, _dir: dir }
}

async fn start(key: Option<[u8; 32]>, peers: Vec<String>) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&dir, key, peers);
    start_with(c, dir).await
}

/// Polls `check` every 100 ms until it returns true; panics with `what` after `WAIT`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `n` nodes: the first with no peers, the others pointed at the first by address.
async fn cluster(n: usize, key: Option<[u8; 32]>) -> Vec<TestNode> {
    let first = start(key, vec![]).await;
    let seed = first.addr();
    let mut nodes = vec![first];
    for _ in 1..n {
        nodes.push(start(key, vec![seed.clone()]).await);
    }
    wait_all_known(&nodes).await;
    nodes
}

async fn wait_all_known(nodes: &[TestNode]) {
    let ids: Vec<PeerId> = nodes.iter().map(TestNode::id).collect();
    for node in nodes {
        let h = node.dht.handle();
        let others: HashSet<PeerId> = ids.iter().copied().filter(|p| *p != node.id()).collect();
        eventually("every node in every routing table", || {
            let h = h.clone();
            let others = others.clone();
            async move {
                let known: HashSet<PeerId> = h.known_peers().await.unwrap().into_iter().collect();
                others.is_subset(&known)
            }
        })
        .await;
    }
}

fn digest(n: u8) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest([n]).into()
}

fn provider_of(node: &TestNode) -> Provider {
    Provider {
        peer_id: node.id(),
        chunk_addr: node.dht.listen_addr(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_nodes_bootstrap_from_addresses_without_peer_ids() {
    let key = Some([7u8; 32]);
    let first = start(key, vec![]).await;
    let seed = first.addr();
    let port = first.dht.listen_addr().port();
    // Plain HOST:PORT, a DNS name (localhost), a multiaddr with and without /p2p.
    let specs = [
        seed.clone(),
        format!("localhost:{port}"),
        format!("/ip4/127.0.0.1/tcp/{port}"),
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", first.id()),
    ];
    let mut nodes = vec![first];
    for spec in specs {
        nodes.push(start(key, vec![spec]).await);
    }
    wait_all_known(&nodes).await;
    // Everyone learned everyone else, not just the seed.
    let last = nodes.last().unwrap().dht.handle();
    let known: HashSet<PeerId> = last.known_peers().await.unwrap().into_iter().collect();
    assert_eq!(known.len(), nodes.len() - 1);
    for n in nodes {
        n.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_first_node_finds_later_ones_by_redial() {
    // Node A starts pointing at an address where nobody listens yet; B starts later on that
    // exact port (without peers). A's periodic redial must find B.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let a = start(None, vec![format!("127.0.0.1:{port}")]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir, None, vec![]);
    c.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let b = start_with(c, dir).await;
    let nodes = vec![a, b];
    wait_all_known(&nodes).await;
    for n in nodes {
        n.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_provider_is_found_with_its_chunk_addr() {
    let nodes = cluster(4, Some([1u8; 32])).await;
    let d = digest(1);
    nodes[3].dht.handle().provide(d).await.unwrap();
    let want = provider_of(&nodes[3]);
    for (i, node) in nodes.iter().enumerate().take(3) {
        let got = node.dht.handle().providers(d, 5).await.unwrap();
        assert_eq!(got, vec![want], "node {i}");
    }
    // The provider itself is never returned to itself.
    assert!(nodes[3]
        .dht
        .handle()
        .providers(d, 5)
        .await
        .unwrap()
        .is_empty());
    // Two providers: limit respected, both found with limit 2.
    nodes[1].dht.handle().provide(d).await.unwrap();
    let got = nodes[0].dht.handle().providers(d, 1).await.unwrap();
    assert_eq!(got.len(), 1);
    let got: HashSet<Provider> = nodes[0]
        .dht
        .handle()
        .providers(d, 5)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, HashSet::from([want, provider_of(&nodes[1])]));
    // Unknown digest: empty, and quickly (the query ends when the closest nodes answer).
    let t = std::time::Instant::now();
    assert!(nodes[2]
        .dht
        .handle()
        .providers(digest(99), 3)
        .await
        .unwrap()
        .is_empty());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    for n in nodes {
        n.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_withdrawn_provider_disappears_after_the_record_ttl() {
    // Short TTL so the remote copies expire within the test; the control digest stays
    // because it keeps being republished.
    let key = Some([2u8; 32]);
    let mk = |peers: Vec<String>| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&dir, key, peers);
        c.provider_ttl = Duration::from_secs(3);
        c.provider_republish = Duration::from_secs(1);
        (c, dir)
    };
    let (c, dir) = mk(vec![]);
    let first = start_with(c, dir).await;
    let seed = first.addr();
    let mut nodes = vec![first];
    for _ in 0..3 {
        let (c, dir) = mk(vec![seed.clone()]);
        nodes.push(start_with(c, dir).await);
    }
    wait_all_known(&nodes).await;
    let (gone, kept) = (digest(10), digest(11));
    let p = nodes[2].dht.handle();
    p.provide(gone).await.unwrap();
    p.provide(kept).await.unwrap();
    let q = nodes[0].dht.handle();
    assert_eq!(
        q.providers(gone, 3).await.unwrap(),
        vec![provider_of(&nodes[2])]
    );

    p.withdraw(gone).await.unwrap();
    // Remote copies linger until they expire (<= provider_ttl after the last announcement).
    eventually("withdrawn provider no longer found", || {
        let q = q.clone();
        async move { q.providers(gone, 3).await.unwrap().is_empty() }
    })
    .await;
    // Well past the TTL, the still-provided digest is found: republishing refreshes it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        q.providers(kept, 3).await.unwrap(),
        vec![provider_of(&nodes[2])]
    );
    assert!(q.providers(gone, 3).await.unwrap().is_empty());
    for n in nodes {
        n.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_nodes_without_the_cluster_key_cannot_join() {
    let key = [3u8; 32];
    let nodes = cluster(2, Some(key)).await;
    let d = digest(20);
    nodes[1].dht.handle().provide(d).await.unwrap();
    let seed = nodes[0].addr();

    let wrong = start(Some([4u8; 32]), vec![seed.clone()]).await;
    let open = start(None, vec![seed.clone()]).await;
    // A member started now, the positive control: it joins within the same time.
    let member = start(Some(key), vec![seed.clone()]).await;
    let mh = member.dht.handle();
    eventually("member finds the provider", || {
        let mh = mh.clone();
        async move { !mh.providers(d, 3).await.unwrap().is_empty() }
    })
    .await;
    // Give the outsiders several redial rounds (1 s each) too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for outsider in [&wrong, &open] {
        let h = outsider.dht.handle();
        assert!(h.connected_peers().await.unwrap().is_empty());
        assert!(h.known_peers().await.unwrap().is_empty());
        assert!(h.providers(d, 3).await.unwrap().is_empty());
    }
    let outsiders = [wrong.id(), open.id()];
    for n in nodes.iter().chain([&member]) {
        let h = n.dht.handle();
        for p in h
            .connected_peers()
            .await
            .unwrap()
            .into_iter()
            .chain(h.known_peers().await.unwrap())
        {
            assert!(!outsiders.contains(&p), "outsider {p} got in");
        }
    }
    for n in nodes.into_iter().chain([wrong, open, member]) {
        n.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_closest_peers_agree_across_nodes() {
    use libp2p::kad::KBucketKey;
    let nodes = cluster(5, Some([5u8; 32])).await;
    let ids: Vec<PeerId> = nodes.iter().map(TestNode::id).collect();
    for n in 0..10u8 {
        let key = digest(100 + n);
        // Expected: all ids sorted by XOR distance of sha256(peer id) to sha256(key).
        let target = KBucketKey::new(key.to_vec());
        let mut expected = ids.clone();
        expected.sort_by_key(|p| KBucketKey::from(*p).distance(&target));
        expected.truncate(3);
        for node in &nodes {
            let got = node.dht.handle().closest_peers(key, 3).await.unwrap();
            assert_eq!(got.peers, expected);
            assert_eq!(got.includes_self, expected.contains(&node.id()));
        }
    }
    for n in nodes {
        n.dht.shutdown().await;
    }
}

/// Each node tells its site in identify; the nodes nearest a key come with their sites (a
/// node without one: none), which is how a node judges its part in its site for a blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_closest_peers_tell_their_sites() {
    let sites = ["east", "east", "west", ""];
    let mut nodes = Vec::new();
    for site in sites {
        let dir = tempfile::tempdir().unwrap();
        let peers = nodes
            .first()
            .map(|n: &TestNode| vec![n.addr()])
            .unwrap_or_default();
        let mut c = config(&dir, None, peers);
        c.site = site.to_string();
        nodes.push(start_with(c, dir).await);
    }
    wait_all_known(&nodes).await;
    let want = |id: PeerId| {
        let i = nodes.iter().position(|n| n.id() == id).unwrap();
        Some(sites[i].to_string()).filter(|s| !s.is_empty())
    };
    for node in &nodes {
        let h = node.dht.handle();
        eventually("every node's site known to every node", || {
            let h = h.clone();
            async move {
                let got = h.closest_peers(digest(7), 20).await.unwrap();
                got.peers.len() == sites.len()
                    && got
                        .peers
                        .iter()
                        .zip(&got.sites)
                        .all(|(p, s)| *s == want(*p))
            }
        })
        .await;
    }
    // The answer is ordered by the metric `swarm::site_gateway` judges with: the XOR of
    // sha256(digest) and sha256(peer id), the protocol's `xor_distance`.
    use sha2::{Digest as _, Sha256};
    use shoal_protocol::swarm::{xor_distance, PeerId as SwarmId};
    let got = nodes[0]
        .dht
        .handle()
        .closest_peers(digest(7), 20)
        .await
        .unwrap();
    let key: [u8; 32] = Sha256::digest(digest(7)).into();
    let dist = |p: &PeerId| xor_distance(&key, &SwarmId::from_bytes(&p.to_bytes()).unwrap());
    let mut sorted = got.peers.clone();
    sorted.sort_by_key(dist);
    assert_eq!(got.peers, sorted);
    for n in nodes {
        n.dht.shutdown().await;
    }
}

#[test]
fn agent_version_carries_the_site() {
    use shoal_node::dht::{agent_version, site_of_agent};
    assert_eq!(
        site_of_agent(&agent_version("edge-7.b_c")).as_deref(),
        Some("edge-7.b_c")
    );
    assert_eq!(site_of_agent(&agent_version("")), None);
    assert_eq!(site_of_agent("shoal/0.1.0 site=bad/site"), None);
    assert_eq!(site_of_agent("rust-libp2p/0.45"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_identity_survives_restart_and_shutdown_closes_handles() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&dir, None, vec![]);
    let a = Dht::start(c.clone(), Metrics::new()).await.unwrap();
    let id = a.local_peer_id();
    let h = a.handle();
    a.shutdown().await;
    assert!(matches!(
        h.connected_peers().await,
        Err(shoal_node::dht::DhtError::Closed)
    ));
    assert!(dir.path().join(shoal_node::dht::IDENTITY_FILE).exists());
    let b = Dht::start(c, Metrics::new()).await.unwrap();
    assert_eq!(b.local_peer_id(), id);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_start_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir, None, vec!["not a peer".into()]);
    assert!(matches!(
        Dht::start(c.clone(), Metrics::new()).await,
        Err(shoal_node::dht::DhtError::InvalidPeer { .. })
    ));
    c.peers.clear();
    let taken = start(None, vec![]).await;
    c.listen = taken.dht.listen_addr();
    assert!(matches!(
        Dht::start(c, Metrics::new()).await,
        Err(shoal_node::dht::DhtError::Listen { .. })
    ));
    taken.dht.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_digests_provided_before_peers_join_are_announced_to_them() {
    // A node re-providing its cache at start-up, before anyone else is up: its records must
    // reach the nodes that join later (not wait for the 10-minute republish).
    let key = Some([6u8; 32]);
    let a = start(key, vec![]).await;
    let digests: Vec<[u8; 32]> = (0..8).map(|i| digest(200 + i)).collect();
    for d in &digests {
        a.dht.handle().provide(*d).await.unwrap();
    }
    let seed = a.addr();
    let mut nodes = vec![a];
    for _ in 0..8 {
        nodes.push(start(key, vec![seed.clone()]).await);
    }
    wait_all_known(&nodes).await;
    let want = provider_of(&nodes[0]);
    // Let the last bootstrap round (and its re-announcements) finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, node) in nodes.iter().enumerate().skip(1) {
        for (j, d) in digests.iter().enumerate() {
            let got = node.dht.handle().providers(*d, 3).await.unwrap();
            assert_eq!(got, vec![want], "node {i} digest {j}");
        }
    }
    for n in nodes {
        n.dht.shutdown().await;
    }
}

/// Needs multicast on a non-loopback interface (libp2p's mDNS skips loopback; often absent in
/// containers and CI sandboxes): `cargo test -p shoal-node --test dht -- --ignored dht_mdns`.
/// The end-to-end suite covers mDNS with real processes on a namespace LAN
/// (`tests/e2e/test_cluster.sh` case g, `shoal-cluster run --mdns`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs working IPv4 multicast"]
async fn dht_mdns_finds_lan_peers_without_bootstrap_addresses() {
    let key = Some([8u8; 32]);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&dir, key, vec![]);
        c.listen = "0.0.0.0:0".parse().unwrap();
        c.mdns = true;
        nodes.push(start_with(c, dir).await);
    }
    wait_all_known(&nodes).await;
    for n in nodes {
        n.dht.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_starts_and_stops_with_mdns_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir, None, vec![]);
    c.mdns = true;
    let node = start_with(c, dir).await;
    assert!(node.dht.handle().connected_peers().await.is_ok());
    node.dht.shutdown().await;
}
