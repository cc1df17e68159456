//! Private content between peers: the grant a node shows, and how the serving node checks it.
//!
//! Goal: a peer hands a private blob only to a node that shows the registry's own token for a
//! repository holding that blob, and the serving node asks the registry itself whether the
//! token opens it; it never takes the asking node's word. Non-goal: private content while the
//! registry cannot be asked (a grant the registry confirmed within [`GRANT_TTL`] still works;
//! otherwise the asking node goes to the upstream itself, which is down too).
//!
//! Trust: a grant shows the token to the providers asked, which are cluster members (they
//! hold the cluster key, and the QUIC session is authenticated with it). A member that
//! announces digests it does not hold could collect such tokens: each opens one repository
//! for pulling, for the token's short life (minutes), and nothing else. The client's password
//! never leaves its node.
//!
//! Invariants:
//! - A grant is honoured only for the registry the blob was fetched from (recorded with the
//!   blob, [`crate::store::Store::origin`], or on the arriving entry): a node cannot name a
//!   registry of its own that answers yes to everything.
//! - The registry is asked with exactly the grant's token, for the grant's repository and the
//!   requested digest (`HEAD /v2/<repo>/blobs/<digest>`); nothing else opens a private blob.
//! - Answers are remembered per (grant, digest): a confirmation for [`GRANT_TTL`], a refusal for
//!   [`REFUSAL_TTL`] (so a peer cannot make this node hammer the registry); a registry that
//!   cannot be reached is not remembered. At most [`MAX_ENTRIES`] answers are kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use shoal_protocol::grant::PeerGrant;
use shoal_protocol::{Digest, Name};
use tracing::{debug, info};

use crate::peer::{Authorizer, AuthzRequest};
use crate::upstream::{ClientAuth, Registry, Upstreams, DEFAULT_KEY};

/// How long a registry's confirmation of a grant is trusted.
pub const GRANT_TTL: Duration = Duration::from_secs(60);
/// How long a registry's refusal of a grant is remembered.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// Most answers remembered; when reached, expired ones go first, then all.
pub const MAX_ENTRIES: usize = 10_000;

/// The grant for a client's request to `name` at `reg`: the registry's bearer token that
/// requests for this client carry (see [`Upstreams::bearer_for`]), encoded for a peer. `None`
/// when there is no token to show (anonymous client, a Basic-only registry, a token too long).
pub fn grant_for(
    upstreams: &Upstreams,
    reg: &Registry,
    name: &Name,
    client: &ClientAuth,
) -> Option<Vec<u8>> {
    let token = upstreams.bearer_for(reg, name.as_str(), client)?;
    PeerGrant::new(&reg.key, name.clone(), &token)
        .ok()
        .map(|g| g.encode())
}

/// A remembered answer's key: the grant's hash and the digest asked for.
type AnswerKey = ([u8; 32], Digest);

/// The [`Authorizer`] of a node in a swarm: checks each grant with the blob's registry.
pub struct RegistryAuthorizer {
    upstreams: Arc<Upstreams>,
    /// A std mutex: map look-ups and inserts only, never across an `.await`.
    answers: Mutex<HashMap<AnswerKey, (Instant, bool)>>,
}

impl RegistryAuthorizer {
    /// An authorizer asking the registries of `upstreams`.
    pub fn new(upstreams: Arc<Upstreams>) -> RegistryAuthorizer {
        RegistryAuthorizer {
            upstreams,
            answers: Mutex::new(HashMap::new()),
        }
    }

    fn remembered(&self, key: &AnswerKey) -> Option<bool> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let (at, allowed) = answers.get(key)?;
        let ttl = if *allowed { GRANT_TTL } else { REFUSAL_TTL };
        (at.elapsed() < ttl).then_some(*allowed)
    }

    fn remember(&self, key: AnswerKey, allowed: bool) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if answers.len() >= MAX_ENTRIES {
            answers.retain(|_, (at, ok)| at.elapsed() < if *ok { GRANT_TTL } else { REFUSAL_TTL });
            if answers.len() >= MAX_ENTRIES {
                answers.clear();
            }
        }
        answers.insert(key, (Instant::now(), allowed));
    }

    async fn check(&self, digest: Digest, origin: String, authz: Vec<u8>) -> bool {
        let grant = match PeerGrant::decode(&authz) {
            Ok(g) => g,
            Err(e) => {
                debug!(digest = %digest, error = %e, "peer grant refused: malformed");
                return false;
            }
        };
        if grant.registry != origin {
            info!(digest = %digest, grant = %grant.registry, origin = %origin, "peer grant refused: another registry than the blob's");
            return false;
        }
        let key = (<[u8; 32]>::from(Sha256::digest(&authz)), digest);
        if let Some(allowed) = self.remembered(&key) {
            return allowed;
        }
        let ns = (origin != DEFAULT_KEY).then_some(origin.as_str());
        let Some(reg) = self.upstreams.route(ns) else {
            return false;
        };
        let path = format!("/v2/{}/blobs/{digest}", grant.repository);
        let status = self
            .upstreams
            .check_bearer(&reg, grant.repository.as_str(), path, &grant.token)
            .await;
        match status {
            Ok(s) if s.is_success() => {
                self.remember(key, true);
                true
            }
            Ok(s) if s.is_server_error() || s.as_u16() == 429 => {
                info!(digest = %digest, status = s.as_u16(), "peer grant not confirmed: registry unavailable");
                false
            }
            Ok(s) => {
                info!(digest = %digest, repo = %grant.repository, status = s.as_u16(), "peer grant refused by the registry");
                self.remember(key, false);
                false
            }
            Err(e) => {
                info!(digest = %digest, error = %e, "peer grant not confirmed: registry unreachable");
                false
            }
        }
    }
}

impl Authorizer for RegistryAuthorizer {
    fn authorize<'a>(&'a self, request: AuthzRequest<'a>) -> BoxFuture<'a, bool> {
        Box::pin(self.check(
            *request.digest,
            request.origin.to_owned(),
            request.authz.to_vec(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::origin::{Auth, Origin};
    use crate::upstream::Request;
    use http::{HeaderValue, Method};

    fn ask<'a>(digest: &'a Digest, origin: &'a str, authz: &'a [u8]) -> AuthzRequest<'a> {
        AuthzRequest {
            digest,
            origin,
            authz,
            peer: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn a_grant_is_honoured_only_as_the_registry_says() {
        let origin = Origin::start().await.unwrap();
        origin.set_auth(Auth::Bearer("u".into(), "p".into()), &[]);
        let d = origin.put_blob(&b"private bytes"[..]);
        let dir = tempfile::tempdir().unwrap();
        let config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), &origin.url());
        let upstreams = Arc::new(Upstreams::new(&config).unwrap());
        let reg = upstreams.route(None).unwrap();
        let name = Name::parse("team/app").unwrap();
        let client = ClientAuth(Some(HeaderValue::from_static("Basic dTpw"))); // u:p
        let anonymous = ClientAuth(None);

        // No request made yet, or no credentials: nothing to show.
        assert_eq!(grant_for(&upstreams, &reg, &name, &client), None);
        let head = Request {
            method: Method::HEAD,
            repo: name.as_str(),
            path: format!("/v2/{name}/blobs/{d}"),
            accept: None,
            range: None,
        };
        let r = upstreams.send(&reg, &head, &client).await.unwrap();
        assert!(r.inner.status().is_success() && r.authenticated);
        let grant = grant_for(&upstreams, &reg, &name, &client).expect("a token to show");
        assert_eq!(grant_for(&upstreams, &reg, &name, &anonymous), None);

        let authz = RegistryAuthorizer::new(upstreams.clone());
        let before = origin.requests();
        assert!(authz.authorize(ask(&d, DEFAULT_KEY, &grant)).await);
        assert_eq!(origin.requests(), before + 1, "asked the registry once");
        assert!(authz.authorize(ask(&d, DEFAULT_KEY, &grant)).await);
        assert_eq!(origin.requests(), before + 1, "then remembered");

        // The same token, for a blob from another registry: refused without asking anyone.
        assert!(!authz.authorize(ask(&d, "elsewhere.example", &grant)).await);
        let named = PeerGrant::decode(&grant).unwrap();
        let forged = PeerGrant::new("elsewhere.example", name.clone(), &named.token)
            .unwrap()
            .encode();
        assert!(!authz.authorize(ask(&d, DEFAULT_KEY, &forged)).await);
        assert_eq!(origin.requests(), before + 1);
        // A token the registry does not know, or no grant at all: refused.
        let bogus = PeerGrant::new(DEFAULT_KEY, name.clone(), "made-up")
            .unwrap()
            .encode();
        assert!(!authz.authorize(ask(&d, DEFAULT_KEY, &bogus)).await);
        assert!(!authz.authorize(ask(&d, DEFAULT_KEY, b"\x01garbage")).await);
        assert!(!authz.authorize(ask(&d, DEFAULT_KEY, &[])).await);
        // A good token for a digest the registry does not have in that repository: refused.
        let other = Digest::of(b"not in the registry");
        assert!(!authz.authorize(ask(&other, DEFAULT_KEY, &grant)).await);
        // While the registry is down, a fresh grant cannot be confirmed.
        origin.stop();
        let d2 = Digest::of(b"another");
        assert!(!authz.authorize(ask(&d2, DEFAULT_KEY, &grant)).await);
        assert!(
            authz.authorize(ask(&d, DEFAULT_KEY, &grant)).await,
            "confirmed earlier"
        );
    }
}
