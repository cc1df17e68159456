//! The grant a node shows a peer to be handed private content.
//!
//! A blob the upstream served only with credentials is private: a peer serves it only to a
//! request that carries a [`PeerGrant`], and only after the registry the blob came from has
//! accepted the grant's token for the grant's repository and that digest (the serving peer
//! asks the registry itself; it never trusts the asking node's word). The token is the
//! registry's own short-lived, repository-scoped pull token, which the asking node obtained with
//! its client's credentials; a node never passes on a password or Basic credentials.
//!
//! Wire format (the `authz` field of a `Table` or `Chunk` request, see [`crate::wire`]):
//!
//! ```text
//! version u8 (= GRANT_VERSION)
//! registry_len u8, registry   (visible ASCII: the registry key, a host or "default")
//! repository_len u8, repository (a valid repository name)
//! token_len u16 (big-endian), token (visible ASCII, at most MAX_GRANT_TOKEN_LEN)
//! ```
//!
//! Decoding is canonical: nothing may follow the token.

use crate::reference::Name;

/// The version byte of the encoding.
pub const GRANT_VERSION: u8 = 1;
/// The longest token a grant carries (the whole grant stays within `wire::MAX_AUTHZ_LEN`).
pub const MAX_GRANT_TOKEN_LEN: usize = 7 << 10;

/// Proof of a client's access to a repository, for a peer to check with the registry.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerGrant {
    /// The registry key the asking node routed the client's request to.
    pub registry: String,
    /// The repository the client pulled from.
    pub repository: Name,
    /// The registry's bearer token for that repository.
    pub token: String,
}

impl std::fmt::Debug for PeerGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token: it opens the repository until it expires.
        f.debug_struct("PeerGrant")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

/// Why bytes are not a grant, or a grant cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Empty, or a version this code does not know.
    #[error("unknown grant version")]
    Version,
    /// Ends before a declared field does.
    #[error("grant truncated")]
    Truncated,
    /// Bytes after the token.
    #[error("trailing bytes after the grant")]
    Trailing,
    /// The registry key is empty, too long, or not visible ASCII.
    #[error("invalid registry key in grant")]
    Registry,
    /// The repository is not a valid name.
    #[error("invalid repository name in grant")]
    Repository,
    /// The token is empty, longer than [`MAX_GRANT_TOKEN_LEN`], or not visible ASCII.
    #[error("invalid token in grant")]
    Token,
}

fn visible(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl PeerGrant {
    /// A grant, checked as [`PeerGrant::decode`] would check it.
    pub fn new(registry: &str, repository: Name, token: &str) -> Result<PeerGrant, GrantError> {
        if registry.is_empty() || registry.len() > usize::from(u8::MAX) || !visible(registry) {
            return Err(GrantError::Registry);
        }
        if repository.as_str().len() > usize::from(u8::MAX) {
            return Err(GrantError::Repository);
        }
        if token.is_empty() || token.len() > MAX_GRANT_TOKEN_LEN || !visible(token) {
            return Err(GrantError::Token);
        }
        Ok(PeerGrant {
            registry: registry.to_owned(),
            repository,
            token: token.to_owned(),
        })
    }

    /// The encoded grant.
    pub fn encode(&self) -> Vec<u8> {
        let repo = self.repository.as_str();
        let mut out = Vec::with_capacity(5 + self.registry.len() + repo.len() + self.token.len());
        out.push(GRANT_VERSION);
        // Lengths were checked by `new` and `decode`, the only ways to build one.
        out.push(u8::try_from(self.registry.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.registry.as_bytes());
        out.push(u8::try_from(repo.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(repo.as_bytes());
        out.extend_from_slice(
            &u16::try_from(self.token.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(self.token.as_bytes());
        out
    }

    /// Decodes a grant (canonical: [`PeerGrant::encode`] gives the same bytes back).
    pub fn decode(bytes: &[u8]) -> Result<PeerGrant, GrantError> {
        let mut r = bytes;
        let mut take = |n: usize| -> Result<&[u8], GrantError> {
            if r.len() < n {
                return Err(GrantError::Truncated);
            }
            let (head, rest) = r.split_at(n);
            r = rest;
            Ok(head)
        };
        if take(1).map_err(|_| GrantError::Version)? != [GRANT_VERSION] {
            return Err(GrantError::Version);
        }
        let n = usize::from(take(1)?[0]);
        let registry = std::str::from_utf8(take(n)?).map_err(|_| GrantError::Registry)?;
        let n = usize::from(take(1)?[0]);
        let repo = std::str::from_utf8(take(n)?).map_err(|_| GrantError::Repository)?;
        let repository = Name::parse(repo).map_err(|_| GrantError::Repository)?;
        let len = take(2)?;
        let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let token = std::str::from_utf8(take(n)?).map_err(|_| GrantError::Token)?;
        if !r.is_empty() {
            return Err(GrantError::Trailing);
        }
        PeerGrant::new(registry, repository, token)
    }
}

/// A fuzz target body for the grant decoder: never panics, and decoding is canonical. Panics
/// only if an invariant is broken.
#[doc(hidden)]
pub fn fuzz_decode_grant(bytes: &[u8]) {
    if let Ok(g) = PeerGrant::decode(bytes) {
        assert_eq!(g.encode(), bytes, "decoding is not canonical");
        assert!(g.encode().len() <= crate::wire::MAX_AUTHZ_LEN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grant() -> PeerGrant {
        PeerGrant::new("default", Name::parse("team/app").unwrap(), "tok.en").unwrap()
    }

    #[test]
    fn golden_encoding() {
        assert_eq!(
            hex::encode(grant().encode()),
            concat!(
                "01",
                "07",
                "64656661756c74",
                "08",
                "7465616d2f617070",
                "0006",
                "746f6b2e656e",
            )
        );
        assert_eq!(PeerGrant::decode(&grant().encode()).unwrap(), grant());
    }

    #[test]
    fn bad_grants_are_refused() {
        let good = grant().encode();
        assert_eq!(PeerGrant::decode(&[]), Err(GrantError::Version));
        let mut v = good.clone();
        v[0] = 2;
        assert_eq!(PeerGrant::decode(&v), Err(GrantError::Version));
        assert_eq!(
            PeerGrant::decode(&good[..good.len() - 1]),
            Err(GrantError::Truncated)
        );
        let mut v = good.clone();
        v.push(b'x');
        assert_eq!(PeerGrant::decode(&v), Err(GrantError::Trailing));
        let mut v = good.clone();
        v[3] = b' '; // a space in the registry key
        assert_eq!(PeerGrant::decode(&v), Err(GrantError::Registry));
        let mut v = good.clone();
        v[10] = b'A'; // upper case in the repository name
        assert_eq!(PeerGrant::decode(&v), Err(GrantError::Repository));
        let mut v = good;
        let last = v.len() - 1;
        v[last] = b'\n';
        assert_eq!(PeerGrant::decode(&v), Err(GrantError::Token));
        let name = Name::parse("a").unwrap();
        assert_eq!(
            PeerGrant::new("", name.clone(), "t"),
            Err(GrantError::Registry)
        );
        assert_eq!(
            PeerGrant::new("r", name.clone(), ""),
            Err(GrantError::Token)
        );
        assert_eq!(
            PeerGrant::new("r", name, &"t".repeat(MAX_GRANT_TOKEN_LEN + 1)),
            Err(GrantError::Token)
        );
    }

    #[test]
    fn debug_hides_the_token() {
        assert!(!format!("{:?}", grant()).contains("tok.en"));
    }

    #[test]
    fn the_largest_grant_fits_a_request() {
        let g = PeerGrant::new(
            &"r".repeat(255),
            Name::parse(&"a".repeat(255)).unwrap(),
            &"t".repeat(MAX_GRANT_TOKEN_LEN),
        )
        .unwrap();
        assert!(g.encode().len() <= crate::wire::MAX_AUTHZ_LEN);
        fuzz_decode_grant(&g.encode());
    }

    proptest! {
        #[test]
        fn round_trip(reg in "[a-z0-9.:-]{1,40}", repo in "[a-z0-9]{1,20}(/[a-z0-9]{1,20}){0,3}", token in "[!-~]{1,300}") {
            let g = PeerGrant::new(&reg, Name::parse(&repo).unwrap(), &token).unwrap();
            let bytes = g.encode();
            prop_assert_eq!(PeerGrant::decode(&bytes).unwrap(), g);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_decode_grant(&bytes);
            let mut v = bytes.clone();
            if !v.is_empty() { v[0] = GRANT_VERSION; }
            fuzz_decode_grant(&v);
        }
    }
}
