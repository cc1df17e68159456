//! Addresses: `--peer` specs, multiaddr ↔ socket address, the chunk-address rule and the
//! bounded book of peers' listen addresses. Pure except for DNS resolution.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::DhtError;

/// Most addresses kept per peer (a peer can advertise many; we need one).
pub(crate) const MAX_ADDRS_PER_PEER: usize = 16;

/// One `--peer` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    /// A literal IP address and TCP port, with the peer id if the multiaddr named one.
    Addr {
        /// `/ip4|ip6/A/tcp/P`.
        addr: Multiaddr,
        /// From a trailing `/p2p/<id>`.
        peer_id: Option<PeerId>,
    },
    /// A DNS name: re-resolved periodically, every address it resolves to is dialed.
    Dns {
        /// The name.
        host: String,
        /// The TCP port.
        port: u16,
        /// `Some(false)` for `/dns4`, `Some(true)` for `/dns6`, `None` for both families.
        ipv6: Option<bool>,
        /// From a trailing `/p2p/<id>`.
        peer_id: Option<PeerId>,
    },
}

impl PeerSpec {
    /// Parses `HOST:PORT` (an IP, `[v6]`, or a DNS name) or a multiaddr
    /// (`/ip4|ip6|dns|dns4|dns6/.../tcp/P` with an optional `/p2p/<id>`).
    pub fn parse(s: &str) -> Result<PeerSpec, DhtError> {
        let bad = |why: &str| DhtError::InvalidPeer {
            spec: s.to_string(),
            reason: why.to_string(),
        };
        let s_trim = s.trim();
        if s_trim.is_empty() {
            return Err(bad("empty"));
        }
        if s_trim.starts_with('/') {
            let ma: Multiaddr = s_trim.parse().map_err(|e| bad(&format!("{e}")))?;
            return Self::from_multiaddr(&ma).map_err(bad);
        }
        if let Ok(sa) = s_trim.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(bad("port 0"));
            }
            return Ok(PeerSpec::Addr {
                addr: socket_to_multiaddr(sa),
                peer_id: None,
            });
        }
        let (host, port) = s_trim
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT or a multiaddr"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        if !valid_dns_name(host) {
            return Err(bad("bad host name"));
        }
        Ok(PeerSpec::Dns {
            host: host.to_ascii_lowercase(),
            port,
            ipv6: None,
            peer_id: None,
        })
    }

    fn from_multiaddr(ma: &Multiaddr) -> Result<PeerSpec, &'static str> {
        let mut it = ma.iter();
        let host = it.next().ok_or("empty multiaddr")?;
        let port = match it.next() {
            Some(Protocol::Tcp(p)) if p != 0 => p,
            Some(Protocol::Tcp(_)) => return Err("port 0"),
            _ => return Err("expected /tcp/<port> after the host"),
        };
        let peer_id = match it.next() {
            None => None,
            Some(Protocol::P2p(id)) => Some(id),
            Some(_) => return Err("only /p2p/<id> may follow /tcp/<port>"),
        };
        if it.next().is_some() {
            return Err("trailing components after /p2p/<id>");
        }
        let dns = |host: std::borrow::Cow<'_, str>, ipv6| {
            if valid_dns_name(&host) {
                Ok(PeerSpec::Dns {
                    host: host.to_ascii_lowercase(),
                    port,
                    ipv6,
                    peer_id,
                })
            } else {
                Err("bad host name")
            }
        };
        match host {
            Protocol::Ip4(ip) => Ok(PeerSpec::Addr {
                addr: socket_to_multiaddr(SocketAddr::new(ip.into(), port)),
                peer_id,
            }),
            Protocol::Ip6(ip) => Ok(PeerSpec::Addr {
                addr: socket_to_multiaddr(SocketAddr::new(ip.into(), port)),
                peer_id,
            }),
            Protocol::Dns(h) => dns(h, None),
            Protocol::Dns4(h) => dns(h, Some(false)),
            Protocol::Dns6(h) => dns(h, Some(true)),
            _ => Err("expected /ip4, /ip6, /dns, /dns4 or /dns6"),
        }
    }

    /// The peer id named by the spec, if any.
    pub fn peer_id(&self) -> Option<PeerId> {
        match self {
            PeerSpec::Addr { peer_id, .. } | PeerSpec::Dns { peer_id, .. } => *peer_id,
        }
    }

    /// The addresses to dial now (DNS names are resolved; every address is returned).
    pub(crate) async fn resolve(&self) -> std::io::Result<Vec<Multiaddr>> {
        match self {
            PeerSpec::Addr { addr, .. } => Ok(vec![addr.clone()]),
            PeerSpec::Dns {
                host, port, ipv6, ..
            } => {
                let mut out: Vec<Multiaddr> = Vec::new();
                for sa in tokio::net::lookup_host((host.as_str(), *port)).await? {
                    let family_ok = match ipv6 {
                        None => true,
                        Some(v6) => sa.is_ipv6() == *v6,
                    };
                    let ma = socket_to_multiaddr(sa);
                    if family_ok && !out.contains(&ma) {
                        out.push(ma);
                    }
                }
                Ok(out)
            }
        }
    }
}

fn valid_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `/ip4/A/tcp/P` or `/ip6/A/tcp/P`.
pub fn socket_to_multiaddr(sa: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(sa.ip().into())
        .with(Protocol::Tcp(sa.port()))
}

/// The IP and TCP port of `/ip4|ip6/A/tcp/P[/p2p/<id>]`; `None` for anything else (DNS,
/// other transports, relayed addresses).
pub fn multiaddr_to_socket(ma: &Multiaddr) -> Option<SocketAddr> {
    let mut it = ma.iter();
    let ip: IpAddr = match it.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let port = match it.next()? {
        Protocol::Tcp(p) => p,
        _ => return None,
    };
    match it.next() {
        None | Some(Protocol::P2p(_)) => {}
        Some(_) => return None,
    }
    if it.next().is_some() {
        return None;
    }
    Some(SocketAddr::new(ip, port))
}

/// An address another host could use: not unspecified, multicast or IPv6 link-local, port set.
fn dialable(sa: &SocketAddr) -> bool {
    let ip = sa.ip();
    sa.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
        && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast() || v4.is_link_local())
}

/// A peer's TCP listen addresses, normalised to `/ipX/A/tcp/P`, deduplicated, capped at
/// [`MAX_ADDRS_PER_PEER`], with loopback addresses dropped unless there is nothing else (a
/// remote host's `127.0.0.1` is our own host).
pub(crate) fn usable_addrs<'a>(addrs: impl IntoIterator<Item = &'a Multiaddr>) -> Vec<Multiaddr> {
    let mut sockets: Vec<SocketAddr> = Vec::new();
    for sa in addrs.into_iter().filter_map(multiaddr_to_socket) {
        if dialable(&sa) && !sockets.contains(&sa) {
            sockets.push(sa);
        }
    }
    if sockets.iter().any(|sa| !sa.ip().is_loopback()) {
        sockets.retain(|sa| !sa.ip().is_loopback());
    }
    sockets.truncate(MAX_ADDRS_PER_PEER);
    sockets.into_iter().map(socket_to_multiaddr).collect()
}

/// The chunk-exchange (QUIC, UDP) address of a peer from its TCP listen addresses: the same IP
/// and port number. Non-loopback addresses are preferred; loopback is used only if it is all
/// there is. `None` if no address is usable.
pub fn chunk_addr<'a>(addrs: impl IntoIterator<Item = &'a Multiaddr>) -> Option<SocketAddr> {
    chunk_addr_via(addrs, None)
}

/// [`chunk_addr`], preferring the listen address on `seen_ip`: the IP a connection with the
/// peer actually came from or went to. On a multi-homed host (docker bridges, CNI
/// interfaces) that is the one known to be reachable.
pub(crate) fn chunk_addr_via<'a>(
    addrs: impl IntoIterator<Item = &'a Multiaddr>,
    seen_ip: Option<IpAddr>,
) -> Option<SocketAddr> {
    let usable: Vec<SocketAddr> = usable_addrs(addrs)
        .iter()
        .filter_map(multiaddr_to_socket)
        .collect();
    seen_ip
        .and_then(|ip| usable.iter().find(|sa| sa.ip() == ip))
        .or_else(|| usable.first())
        .copied()
}

/// Listen addresses learned per peer (identify, Kademlia, mDNS, provider records), bounded.
#[derive(Debug)]
pub(crate) struct AddressBook {
    peers: HashMap<PeerId, Vec<Multiaddr>>,
    owners: HashMap<Multiaddr, PeerId>,
    /// The remote IP of the latest connection with each peer.
    seen_ips: HashMap<PeerId, IpAddr>,
    cap: usize,
}

impl AddressBook {
    pub(crate) fn new(cap: usize) -> AddressBook {
        AddressBook {
            peers: HashMap::new(),
            owners: HashMap::new(),
            seen_ips: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Replaces a peer's addresses (identify is authoritative). Returns whether the peer now
    /// has a chunk address.
    pub(crate) fn set<'a>(
        &mut self,
        peer: PeerId,
        addrs: impl IntoIterator<Item = &'a Multiaddr>,
    ) -> bool {
        let addrs = usable_addrs(addrs);
        self.remove(&peer);
        self.insert(peer, addrs)
    }

    /// Adds addresses to a peer's (hints from Kademlia, mDNS and provider records).
    pub(crate) fn add<'a>(
        &mut self,
        peer: PeerId,
        addrs: impl IntoIterator<Item = &'a Multiaddr>,
    ) -> bool {
        let mut merged = self.remove(&peer).unwrap_or_default();
        merged.extend(addrs.into_iter().cloned());
        let merged = usable_addrs(&merged);
        self.insert(peer, merged)
    }

    fn insert(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> bool {
        if addrs.is_empty() {
            return false;
        }
        while self.peers.len() >= self.cap {
            // Bounded: forget an arbitrary peer (it is re-learned on its next identify).
            let Some(victim) = self.peers.keys().next().copied() else {
                break;
            };
            self.remove(&victim);
        }
        for a in &addrs {
            self.owners.insert(a.clone(), peer);
        }
        self.peers.insert(peer, addrs);
        true
    }

    fn remove(&mut self, peer: &PeerId) -> Option<Vec<Multiaddr>> {
        let addrs = self.peers.remove(peer)?;
        for a in &addrs {
            if self.owners.get(a) == Some(peer) {
                self.owners.remove(a);
            }
        }
        Some(addrs)
    }

    pub(crate) fn get(&self, peer: &PeerId) -> &[Multiaddr] {
        self.peers.get(peer).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The peer last seen listening on `addr`.
    pub(crate) fn owner(&self, addr: &Multiaddr) -> Option<PeerId> {
        self.owners.get(addr).copied()
    }

    /// Records the remote IP of a connection with `peer`.
    pub(crate) fn saw(&mut self, peer: PeerId, ip: IpAddr) {
        if self.seen_ips.len() >= self.cap && !self.seen_ips.contains_key(&peer) {
            // Bounded: keep the IPs of peers still in the book.
            let peers = &self.peers;
            self.seen_ips.retain(|p, _| peers.contains_key(p));
            if self.seen_ips.len() >= self.cap {
                self.seen_ips.clear();
            }
        }
        self.seen_ips.insert(peer, ip);
    }

    pub(crate) fn chunk_addr(&self, peer: &PeerId) -> Option<SocketAddr> {
        chunk_addr_via(self.get(peer), self.seen_ips.get(peer).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_host_port_and_multiaddrs() {
        assert_eq!(
            PeerSpec::parse("10.0.0.5:7000").unwrap(),
            PeerSpec::Addr {
                addr: ma("/ip4/10.0.0.5/tcp/7000"),
                peer_id: None
            }
        );
        assert_eq!(
            PeerSpec::parse("[::1]:7000").unwrap(),
            PeerSpec::Addr {
                addr: ma("/ip6/::1/tcp/7000"),
                peer_id: None
            }
        );
        assert_eq!(
            PeerSpec::parse("shoal.kube-system.svc.cluster.local:7000").unwrap(),
            PeerSpec::Dns {
                host: "shoal.kube-system.svc.cluster.local".into(),
                port: 7000,
                ipv6: None,
                peer_id: None
            }
        );
        let id = PeerId::random();
        assert_eq!(
            PeerSpec::parse(&format!("/ip4/127.0.0.1/tcp/9/p2p/{id}")).unwrap(),
            PeerSpec::Addr {
                addr: ma("/ip4/127.0.0.1/tcp/9"),
                peer_id: Some(id)
            }
        );
        assert_eq!(
            PeerSpec::parse("/dns4/Shoal/tcp/9").unwrap(),
            PeerSpec::Dns {
                host: "shoal".into(),
                port: 9,
                ipv6: Some(false),
                peer_id: None
            }
        );
        for bad in [
            "",
            "host",
            "host:",
            "host:0",
            "host:70000",
            "ho st:1",
            "-a:1",
            "/ip4/1.2.3.4",
            "/ip4/1.2.3.4/udp/5",
            "/ip4/1.2.3.4/tcp/0",
            "/ip4/1.2.3.4/tcp/5/ws",
            "/unix/tmp",
            "1.2.3.4:0",
        ] {
            assert!(PeerSpec::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn chunk_addr_prefers_non_loopback() {
        let only_lo = [ma("/ip4/127.0.0.1/tcp/7000")];
        assert_eq!(
            chunk_addr(&only_lo),
            Some("127.0.0.1:7000".parse().unwrap())
        );
        let mixed = [
            ma("/ip4/127.0.0.1/tcp/7000"),
            ma("/ip4/0.0.0.0/tcp/7000"),
            ma("/ip6/fe80::1/tcp/7000"),
            ma("/ip4/10.1.2.3/tcp/7000/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"),
            ma("/dns4/example.com/tcp/7000"),
        ];
        assert_eq!(chunk_addr(&mixed), Some("10.1.2.3:7000".parse().unwrap()));
        assert_eq!(chunk_addr(&[ma("/ip4/0.0.0.0/tcp/1")]), None);
        assert_eq!(chunk_addr(&[ma("/ip4/1.2.3.4/udp/1/quic-v1")]), None);
        let usable = usable_addrs(&mixed);
        assert_eq!(usable, vec![ma("/ip4/10.1.2.3/tcp/7000")]);
    }

    #[test]
    fn address_book_is_bounded_and_tracks_owners() {
        let mut book = AddressBook::new(2);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(book.set(a, &[ma("/ip4/10.0.0.1/tcp/1")]));
        assert!(book.add(b, &[ma("/ip4/10.0.0.2/tcp/1")]));
        assert_eq!(book.owner(&ma("/ip4/10.0.0.2/tcp/1")), Some(b));
        assert!(book.add(b, &[ma("/ip4/127.0.0.1/tcp/1")]));
        assert_eq!(book.get(&b), &[ma("/ip4/10.0.0.2/tcp/1")]);
        assert!(book.set(c, &[ma("/ip4/10.0.0.3/tcp/1")]));
        assert_eq!(book.peers.len(), 2);
        assert_eq!(book.owners.len(), 2);
        assert_eq!(book.chunk_addr(&c), Some("10.0.0.3:1".parse().unwrap()));
        assert!(!book.set(a, &[]));
    }

    #[test]
    fn chunk_addr_prefers_the_ip_a_connection_used() {
        let mut book = AddressBook::new(8);
        let p = PeerId::random();
        let addrs = [
            ma("/ip4/172.17.0.1/tcp/7000"),
            ma("/ip4/10.0.0.7/tcp/7000"),
            ma("/ip4/127.0.0.1/tcp/7000"),
        ];
        book.set(p, &addrs);
        assert_eq!(
            book.chunk_addr(&p),
            Some("172.17.0.1:7000".parse().unwrap())
        );
        book.saw(p, "10.0.0.7".parse().unwrap());
        assert_eq!(book.chunk_addr(&p), Some("10.0.0.7:7000".parse().unwrap()));
        // An IP it does not listen on changes nothing.
        book.saw(p, "192.168.1.1".parse().unwrap());
        assert_eq!(
            book.chunk_addr(&p),
            Some("172.17.0.1:7000".parse().unwrap())
        );
    }
}
