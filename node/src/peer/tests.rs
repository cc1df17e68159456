//! In-process tests over loopback: real endpoints, and hand-written misbehaving servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use quinn::VarInt;
use sha2::{Digest as _, Sha256};
use shoal_protocol::chunk::{ChunkVerifier, MidstateTable};
use shoal_protocol::wire::{Bitfield, Request, Response};
use shoal_protocol::Digest;
use tempfile::TempDir;

use super::auth::{exporter, Role};
use super::server::MAX_WATCHES_PER_CONNECTION as MAX_WATCHES;
use super::*;
use crate::store::Store;

const LOOPBACK: &str = "127.0.0.1:0";

fn key(n: u8) -> ClusterKey {
    ClusterKey::new([n; 32])
}

fn config(key: ClusterKey) -> PeerConfig {
    let mut c = PeerConfig::new(LOOPBACK.parse().unwrap(), key);
    c.timeout = Duration::from_secs(5);
    c
}

/// Deterministic incompressible bytes (splitmix64).
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Node {
    _dir: TempDir,
    store: Store,
    endpoint: Endpoint,
}

fn node_with(config: PeerConfig, chunk_size: u32, authorizer: Arc<dyn Authorizer>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with_chunk_size(dir.path(), 1 << 40, chunk_size).unwrap();
    let endpoint =
        Endpoint::bind(config, store.clone(), authorizer, Arc::new(Metrics::new())).unwrap();
    Node {
        _dir: dir,
        store,
        endpoint,
    }
}

fn node(key: ClusterKey, chunk_size: u32) -> Node {
    node_with(config(key), chunk_size, Arc::new(DenyPrivate))
}

fn put(store: &Store, data: &[u8], private: bool) -> Digest {
    let d = Digest::of(data);
    store.put_small(&d, data, None, private).unwrap();
    d
}

/// 1.5 MiB (and one block) chunks: every chunk but the last is sent in two pieces (1 MiB +
/// 0.5 MiB). An odd number of 64-byte blocks, which `chunk_size_for` cannot halve: every blob
/// here is cut at `CS`, however small.
const CS: u32 = (3 << 19) + 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_a_table_and_every_chunk() {
    let a = node(key(1), CS);
    let b = node(key(1), CS);
    let data = blob(5 * (1 << 20) + 777, 1);
    let digest = put(&a.store, &data, false);

    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    let table = conn
        .table(&digest, CS, Some(data.len() as u64), &[])
        .await
        .unwrap();
    assert_eq!(table, MidstateTable::compute(&data, CS).unwrap());
    let count = table.layout().count();
    assert_eq!(count, 4);
    assert_eq!(conn.have(&digest, CS).await.unwrap(), Bitfield::full(count));

    // A few requests in flight, in any order.
    let chunks: Vec<(u32, Bytes)> = futures::stream::iter(0..count)
        .map(|i| {
            let (conn, table) = (conn.clone(), table.clone());
            async move { (i, conn.chunk(&digest, &table, i, &[]).await.unwrap()) }
        })
        .buffer_unordered(3)
        .collect()
        .await;
    let mut chunks = chunks;
    chunks.sort_by_key(|(i, _)| *i);
    let mut verifier =
        ChunkVerifier::new(table.clone(), *digest.as_bytes(), data.len() as u64).unwrap();
    let mut whole = Vec::new();
    for (i, c) in &chunks {
        verifier.accept(*i, c).unwrap();
        whole.extend_from_slice(c);
    }
    assert!(verifier.is_complete());
    assert_eq!(Digest::from_bytes(Sha256::digest(&whole).into()), digest);

    let served = a.endpoint.metrics();
    assert_eq!(served.chunks_served.get(), u64::from(count));
    assert_eq!(served.tables_served.get(), 1);
    let per_peer = served
        .served_bytes
        .get_or_create(&PeerLabels {
            peer: "127.0.0.1".into(),
        })
        .get();
    assert_eq!(per_peer, data.len() as u64);
    assert_eq!(b.endpoint.metrics().fetched_bytes.get(), data.len() as u64);

    // A table for a size that is not the descriptor's is refused.
    let err = conn
        .table(&digest, CS, Some(data.len() as u64 + 1), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::BadTable(_)), "{err:?}");
    a.endpoint.shutdown().await;
    b.endpoint.shutdown().await;
}

/// A node tells its site when it accepts a connection; a node without one tells none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_learns_the_peers_site() {
    let mut c = config(key(1));
    c.site = "edge-7".into();
    let a = node_with(c, 64, Arc::new(DenyPrivate));
    let b = node(key(1), 64);
    let to_a = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    assert_eq!(to_a.site(), "edge-7");
    let to_b = a.endpoint.connect(b.endpoint.local_addr()).await.unwrap();
    assert_eq!(to_b.site(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_digests_are_not_found() {
    let a = node(key(1), 64);
    let b = node(key(1), 64);
    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    let absent = Digest::of(b"absent");
    let table = MidstateTable::compute(&[0; 200], 64).unwrap();
    assert_eq!(
        conn.table(&absent, 64, None, &[]).await,
        Err(PeerError::NotFound)
    );
    assert_eq!(
        conn.chunk(&absent, &table, 1, &[]).await,
        Err(PeerError::NotFound)
    );
    assert_eq!(conn.have(&absent, 64).await, Err(PeerError::NotFound));
    // A table for a peer configured with another chunk size: an error that says so (a
    // cluster whose nodes disagree would otherwise only ever fall back to the upstream).
    let present = put(&a.store, &blob(300, 2), false);
    assert_eq!(
        conn.table(&present, 128, None, &[]).await,
        Err(PeerError::Remote(
            "--chunk-size differs: 128 here, 64 at the peer; a cluster's nodes must agree".into()
        ))
    );
    assert!(matches!(
        conn.table(&absent, 128, None, &[]).await,
        Err(PeerError::Remote(_))
    ));
    // ... but its chunks and bitfield are served at any valid chunk size.
    let t128 = MidstateTable::compute(&blob(300, 2), 128).unwrap();
    assert_eq!(conn.chunk(&present, &t128, 2, &[]).await.unwrap().len(), 44);
    assert_eq!(conn.have(&present, 128).await.unwrap(), Bitfield::full(3));
    // Invalid requests are caught before anything is sent.
    assert!(matches!(
        conn.chunk(&present, &t128, 3, &[]).await,
        Err(PeerError::InvalidRequest(_))
    ));
    assert!(matches!(
        conn.have(&present, 100).await,
        Err(PeerError::InvalidRequest(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_and_nothing_is_served() {
    let a = node(key(1), 64);
    let digest = put(&a.store, &blob(1000, 3), false);
    let stranger = node(key(2), 64);

    // Our proof is rejected by the server.
    let err = stranger
        .endpoint
        .connect(a.endpoint.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::AuthFailed(_)), "{err:?}");
    assert!(err.blames_peer());
    let failures = |m: &Metrics, direction: &'static str| {
        m.auth_failures
            .get_or_create(&DirectionLabels { direction })
            .get()
    };
    assert_eq!(failures(a.endpoint.metrics(), "inbound"), 1);

    // A client that does not wait for the verdict and asks at once gets nothing.
    let (_, client_config) = quic_configs(&config(key(2))).unwrap();
    let mut raw = quinn::Endpoint::client(LOOPBACK.parse().unwrap()).unwrap();
    raw.set_default_client_config(client_config);
    let conn = raw
        .connect(a.endpoint.local_addr(), SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let e = exporter(&conn).unwrap();
    let (mut s1, _r1) = conn.open_bi().await.unwrap();
    let proof = key(2).proof(Role::Client, &e);
    s1.write_all(&Request::Auth { proof }.encode())
        .await
        .unwrap();
    let (mut s2, mut r2) = conn.open_bi().await.unwrap();
    let ask = Request::Table {
        digest: *digest.as_bytes(),
        max_chunk_size: 64,
        authz: vec![],
    };
    s2.write_all(&ask.encode()).await.unwrap();
    let _ = s2.finish();
    let got = tokio::time::timeout(Duration::from_secs(5), r2.read_to_end(1 << 20))
        .await
        .unwrap();
    assert!(got.is_err(), "served before authentication: {got:?}");
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, VarInt::from_u32(close::AUTH_FAILED))
        }
        other => panic!("unexpected close: {other:?}"),
    }
    assert_eq!(a.endpoint.metrics().tables_served.get(), 0);
    assert_eq!(failures(a.endpoint.metrics(), "inbound"), 2);

    // A server without the key cannot prove itself to us either.
    let rogue = rogue_server(key(9), Behaviour::AcceptAnyone).await;
    let err = a.endpoint.connect(rogue).await.unwrap_err();
    assert!(matches!(err, PeerError::AuthFailed(_)), "{err:?}");
    assert_eq!(failures(a.endpoint.metrics(), "outbound"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_chunks_are_rejected() {
    let data = blob(4 * 256 + 100, 4);
    let digest = Digest::of(&data);
    let table = MidstateTable::compute(&data, 256).unwrap();
    let client = node(key(1), 256);

    // A byte flipped inside a middle chunk, and inside the last one: the chunk does not chain
    // with the table, and nobody can tell which of the two is wrong.
    for flip in [1u32, 4] {
        let rogue = rogue_server(
            key(1),
            Behaviour::Serve {
                data: data.clone(),
                chunk_size: 256,
                tamper: Tamper::Flip(flip),
            },
        )
        .await;
        let conn = client.endpoint.connect(rogue).await.unwrap();
        let t = conn
            .table(&digest, 256, Some(data.len() as u64), &[])
            .await
            .unwrap();
        assert_eq!(t, table);
        assert!(conn.chunk(&digest, &t, 0, &[]).await.is_ok());
        let err = conn.chunk(&digest, &t, flip, &[]).await.unwrap_err();
        assert_eq!(err, PeerError::Ambiguous { index: flip });
        assert!(!err.blames_peer());
    }

    // A single-chunk blob runs from the IV to the digest: a flipped byte is proven corrupt.
    let small = data[..200].to_vec();
    let small_digest = Digest::of(&small);
    let rogue = rogue_server(
        key(1),
        Behaviour::Serve {
            data: small.clone(),
            chunk_size: 256,
            tamper: Tamper::Flip(0),
        },
    )
    .await;
    let conn = client.endpoint.connect(rogue).await.unwrap();
    let t = conn
        .table(&small_digest, 256, Some(200), &[])
        .await
        .unwrap();
    let err = conn.chunk(&small_digest, &t, 0, &[]).await.unwrap_err();
    assert_eq!(err, PeerError::Corrupt { index: 0 });
    assert!(err.blames_peer());

    // A chunk of the wrong length is refused from its header.
    let rogue = rogue_server(
        key(1),
        Behaviour::Serve {
            data: data.clone(),
            chunk_size: 256,
            tamper: Tamper::Short(2),
        },
    )
    .await;
    let conn = client.endpoint.connect(rogue).await.unwrap();
    let err = conn.chunk(&digest, &table, 2, &[]).await.unwrap_err();
    assert_eq!(err, PeerError::Corrupt { index: 2 });

    let rejected = |reason: &'static str| {
        client
            .endpoint
            .metrics()
            .rejected_chunks
            .get_or_create(&RejectionLabels { reason })
            .get()
    };
    assert_eq!(rejected("ambiguous"), 2);
    assert_eq!(rejected("corrupt"), 2);
    assert_eq!(
        client.endpoint.metrics().fetched_bytes.get(),
        512,
        "only the two good chunks count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_blobs_need_the_authorizer() {
    let data = blob(700, 5);
    let b = node(key(1), 64);

    // Default: private blobs are denied to every request.
    let a = node(key(1), 64);
    let digest = put(&a.store, &data, true);
    let public = put(&a.store, &blob(100, 6), false);
    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    let table = MidstateTable::compute(&data, 64).unwrap();
    assert_eq!(
        conn.table(&digest, 64, None, b"token").await,
        Err(PeerError::Denied)
    );
    assert_eq!(
        conn.chunk(&digest, &table, 0, b"token").await,
        Err(PeerError::Denied)
    );
    // Which chunks it holds is answered (the DHT tells as much); the content is not.
    assert_eq!(conn.have(&digest, 64).await.map(|b| b.is_full()), Ok(true));
    assert!(conn.table(&public, 64, None, &[]).await.is_ok());
    assert_eq!(a.endpoint.metrics().denied.get(), 2);

    // An authorizer that accepts one token, for blobs from one registry.
    let allow = AllowIf(|r: &AuthzRequest<'_>| r.authz == b"token" && r.origin == "reg");
    let a = node_with(config(key(1)), 64, Arc::new(allow));
    a.store.set_origin(&Digest::of(&data), "reg").unwrap();
    let digest = put(&a.store, &data, true);
    // A private blob whose registry is unknown goes to nobody, whatever the authorizer says.
    let unknown = put(&a.store, &blob(300, 8), true);
    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    assert_eq!(
        conn.table(&unknown, 64, None, b"token").await,
        Err(PeerError::Denied)
    );
    assert_eq!(
        conn.table(&digest, 64, None, b"nope").await,
        Err(PeerError::Denied)
    );
    assert_eq!(
        conn.chunk(&digest, &table, 3, &[]).await,
        Err(PeerError::Denied)
    );
    assert_eq!(
        conn.table(&digest, 64, None, b"token").await,
        Ok(table.clone())
    );
    let c = conn.chunk(&digest, &table, 10, b"token").await.unwrap();
    assert_eq!(&c[..], &data[640..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_requests_and_connections_are_refused() {
    let mut c = config(key(1));
    c.max_concurrent_serves = 0;
    c.max_connections = 1;
    let a = node_with(c, 64, Arc::new(DenyPrivate));
    let digest = put(&a.store, &blob(100, 7), false);
    let b = node(key(1), 64);
    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    assert_eq!(
        conn.table(&digest, 64, None, &[]).await,
        Err(PeerError::Refused {
            retry_after: Some(Duration::from_millis(250))
        })
    );
    // Have is cheap and not budgeted.
    assert!(conn.have(&digest, 64).await.is_ok());
    assert_eq!(a.endpoint.metrics().busy.get(), 1);
    // The one connection slot is taken.
    let err = b
        .endpoint
        .connect(a.endpoint.local_addr())
        .await
        .unwrap_err();
    assert_eq!(err, PeerError::Refused { retry_after: None });
    assert_eq!(a.endpoint.metrics().refused_connections.get(), 1);
    // Freed when the connection ends.
    conn.close();
    let mut again = Err(PeerError::NotFound);
    for _ in 0..50 {
        again = b.endpoint.connect(a.endpoint.local_addr()).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_ok(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out() {
    let rogue = rogue_server(key(1), Behaviour::Silent).await;
    let mut c = config(key(1));
    c.timeout = Duration::from_millis(300);
    let client = node_with(c, 64, Arc::new(DenyPrivate));
    let started = std::time::Instant::now();
    let err = client.endpoint.connect(rogue).await.unwrap_err();
    assert!(matches!(err, PeerError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// What a hand-written server does.
#[derive(Clone)]
enum Behaviour {
    /// Answers any proof with `AuthOk` and a proof under its own key.
    AcceptAnyone,
    /// Accepts connections and never answers.
    Silent,
    /// Authenticates properly, then serves `data` with its true table, tampered as told.
    Serve {
        data: Vec<u8>,
        chunk_size: u32,
        tamper: Tamper,
    },
}

#[derive(Clone, Copy)]
enum Tamper {
    /// Flips a byte of this chunk.
    Flip(u32),
    /// Sends this chunk one byte short (and says so in its header).
    Short(u32),
}

/// Starts a misbehaving server holding `key`; returns its address.
async fn rogue_server(key: ClusterKey, behaviour: Behaviour) -> SocketAddr {
    let config = config(key.clone());
    let (server_config, _) = quic_configs(&config).unwrap();
    let endpoint = quinn::Endpoint::server(server_config, config.listen).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let (key, behaviour) = (key.clone(), behaviour.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                rogue_connection(conn, key, behaviour).await;
            });
        }
    });
    addr
}

async fn rogue_connection(conn: quinn::Connection, key: ClusterKey, behaviour: Behaviour) {
    let limit = Duration::from_secs(5);
    match behaviour {
        Behaviour::Silent => {
            conn.closed().await;
        }
        Behaviour::AcceptAnyone => {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let _ = frame::read_request(&mut recv, limit).await;
            let e = exporter(&conn).unwrap();
            let mut answer = Response::AuthOk {
                site: String::new(),
            }
            .encode();
            answer.extend_from_slice(
                &Request::Auth {
                    proof: key.proof(Role::Server, &e),
                }
                .encode(),
            );
            let _ = send.write_all(&answer).await;
            let _ = send.finish();
            conn.closed().await;
        }
        Behaviour::Serve {
            data,
            chunk_size,
            tamper,
        } => {
            if server::accept_auth(&conn, &key, "", limit).await.is_err() {
                conn.close(VarInt::from_u32(close::AUTH_FAILED), b"auth");
                return;
            }
            let table = MidstateTable::compute(&data, chunk_size).unwrap();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let Ok(request) = frame::read_request(&mut recv, limit).await else {
                    return;
                };
                match request {
                    Request::Table { .. } => {
                        let answer = Response::Table {
                            table: table.encode(),
                        };
                        let _ = send.write_all(&answer.encode()).await;
                    }
                    Request::Chunk { index, .. } => {
                        let (start, len) = table.layout().range(index).unwrap();
                        let mut chunk = data[start as usize..][..len as usize].to_vec();
                        match tamper {
                            Tamper::Flip(i) if i == index => chunk[len as usize / 2] ^= 0x10,
                            Tamper::Short(i) if i == index => {
                                chunk.pop();
                            }
                            _ => {}
                        }
                        let header = Response::ChunkHeader {
                            index,
                            len: chunk.len() as u32,
                        };
                        let _ = send.write_all(&header.encode()).await;
                        let _ = send.write_all(&chunk).await;
                    }
                    _ => {
                        let _ = send.write_all(&Response::NotFound.encode()).await;
                    }
                }
                let _ = send.finish();
            }
        }
    }
}

/// The watch's next update, waiting at most 5 s.
async fn next(w: &mut HaveWatch) -> Result<Option<Bitfield>, PeerError> {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("a watch update within 5 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_pushes_each_change_until_the_blob_is_whole_or_gone() {
    use crate::arriving::Arriving;
    let a = node(key(1), 64);
    let b = node(key(1), 64);
    let file = tempfile::tempfile().unwrap();
    let digest = Digest::from_bytes([7; 32]);
    let layout = shoal_protocol::chunk::ChunkLayout::new(4 * 64, 64).unwrap();
    let arriving = Arc::new(Arriving::new(digest, layout, file));
    let registration = a.store.arriving().register(arriving.clone());
    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();

    let mut watch = conn.watch(&digest, 64).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap(), Some(Bitfield::new(4)));
    arriving.mark(2);
    let bits = next(&mut watch).await.unwrap().unwrap();
    assert_eq!(bits.iter_ones().collect::<Vec<_>>(), vec![2]);
    // Changes while nobody reads are coalesced into the whole current bitfield.
    arriving.mark_first(2);
    let bits = next(&mut watch).await.unwrap().unwrap();
    let mut seen = bits.iter_ones().collect::<Vec<_>>();
    if seen.len() < 3 {
        // The first of the two changes may have gone out alone.
        seen = next(&mut watch)
            .await
            .unwrap()
            .unwrap()
            .iter_ones()
            .collect();
    }
    assert_eq!(seen, vec![0, 1, 2]);
    // The last chunk: the full bitfield, then the stream ends.
    arriving.mark(3);
    assert_eq!(next(&mut watch).await.unwrap(), Some(Bitfield::full(4)));
    assert_eq!(next(&mut watch).await.unwrap(), None);

    // A download that fails ends its watches with NotFound.
    drop(registration);
    let digest = Digest::from_bytes([8; 32]);
    let arriving = Arc::new(Arriving::new(digest, layout, tempfile::tempfile().unwrap()));
    let registration = a.store.arriving().register(arriving.clone());
    let mut watch = conn.watch(&digest, 64).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap(), Some(Bitfield::new(4)));
    drop(registration);
    assert_eq!(next(&mut watch).await, Err(PeerError::NotFound));

    // Nothing arriving, nothing held: NotFound at once.
    assert_eq!(
        conn.watch(&digest, 64).await.unwrap_err(),
        PeerError::NotFound
    );

    // A blob held whole: its full bitfield, and the watch is over.
    let data = blob(200, 3);
    let held = put(&a.store, &data, false);
    let mut watch = conn.watch(&held, 64).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap(), Some(Bitfield::full(4)));
    assert_eq!(next(&mut watch).await.unwrap(), None);
    a.endpoint.shutdown().await;
    b.endpoint.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_beyond_the_per_connection_limit_are_refused_busy() {
    use crate::arriving::Arriving;
    let a = node(key(1), 64);
    let b = node(key(1), 64);
    let layout = shoal_protocol::chunk::ChunkLayout::new(4 * 64, 64).unwrap();
    let mut registrations = Vec::new();
    for n in 0..=MAX_WATCHES as u8 {
        let digest = Digest::from_bytes([n; 32]);
        let arriving = Arc::new(Arriving::new(digest, layout, tempfile::tempfile().unwrap()));
        registrations.push(a.store.arriving().register(arriving));
    }
    let conn = b.endpoint.connect(a.endpoint.local_addr()).await.unwrap();
    let mut live = Vec::new();
    for n in 0..MAX_WATCHES as u8 {
        live.push(conn.watch(&Digest::from_bytes([n; 32]), 64).await.unwrap());
    }
    let last = Digest::from_bytes([MAX_WATCHES as u8; 32]);
    let err = conn.watch(&last, 64).await.unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::Refused {
                retry_after: Some(_)
            }
        ),
        "{err:?}"
    );
    // One ends: its slot is free again.
    drop(live.pop());
    let mut again = None;
    for _ in 0..50 {
        match conn.watch(&last, 64).await {
            Ok(w) => {
                again = Some(w);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        again.is_some(),
        "the dropped watch's slot was not given back"
    );
    a.endpoint.shutdown().await;
    b.endpoint.shutdown().await;
}

/// The lying-table fault injection (`PeerConfig::fault_lie_tables`): the table served passes
/// every check a table can pass without the data (it decodes, has the right layout and the
/// right last state) but its middle midstate is garbage, so the genuine chunks on either side of
/// it do not chain: ambiguous, not corrupt (the receiver cannot tell who lies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_told_to_lie_serves_a_table_wrong_in_the_middle_only() {
    let mut c = config(key(1));
    c.fault_lie_tables = true;
    let liar = node_with(c, 256, Arc::new(DenyPrivate));
    let b = node(key(1), 256);
    // 8 chunks: 7 states, the fourth (index 3) is the lie.
    let data = blob(8 * 256 - 10, 4);
    let digest = put(&liar.store, &data, false);
    let honest = MidstateTable::compute(&data, 256).unwrap();

    let conn = b
        .endpoint
        .connect(liar.endpoint.local_addr())
        .await
        .unwrap();
    let lie = conn
        .table(&digest, 256, Some(data.len() as u64), &[])
        .await
        .unwrap();
    assert_eq!(lie.layout(), honest.layout());
    let differ: Vec<usize> = (0..honest.states().len())
        .filter(|&i| lie.states()[i] != honest.states()[i])
        .collect();
    assert_eq!(differ, vec![3], "only the middle state lies");
    for i in 0..8 {
        let got = conn.chunk(&digest, &lie, i, &[]).await;
        if i == 3 || i == 4 {
            assert_eq!(got.unwrap_err(), PeerError::Ambiguous { index: i });
        } else {
            assert!(got.is_ok(), "chunk {i}: {got:?}");
        }
    }
    // Its chunks are genuine: they all check against the honest table.
    for i in 0..8 {
        assert!(conn.chunk(&digest, &honest, i, &[]).await.is_ok());
    }
}
