//! `WWW-Authenticate` challenges (RFC 9110 section 11.6.1) as registries send them:
//! `Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull"`.

use std::collections::BTreeMap;

/// The scheme of a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// `Basic`
    Basic,
    /// `Bearer` (the token flow).
    Bearer,
    /// Anything else.
    Other(String),
}

/// One parsed challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Its scheme.
    pub scheme: Scheme,
    /// Its auth-params, keys lower-cased.
    pub params: BTreeMap<String, String>,
}

/// Why a challenge does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// Empty header.
    #[error("empty challenge")]
    Empty,
    /// Bad parameter syntax.
    #[error("malformed challenge parameters")]
    Malformed,
}

/// Longest header accepted; anything longer is hostile.
pub const MAX_CHALLENGE_LEN: usize = 8192;

impl Challenge {
    /// Parses the first challenge in a `WWW-Authenticate` value.
    pub fn parse(header: &str) -> Result<Challenge, ChallengeError> {
        if header.len() > MAX_CHALLENGE_LEN {
            return Err(ChallengeError::Malformed);
        }
        let header = header.trim();
        let (scheme, rest) = match header.split_once(char::is_whitespace) {
            Some((s, r)) => (s, r),
            None => (header, ""),
        };
        if scheme.is_empty() {
            return Err(ChallengeError::Empty);
        }
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "basic" => Scheme::Basic,
            "bearer" => Scheme::Bearer,
            _ => Scheme::Other(scheme.to_owned()),
        };
        let mut params = BTreeMap::new();
        let b = rest.as_bytes();
        let mut i = 0;
        let skip_ws = |i: &mut usize| {
            while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
                *i += 1;
            }
        };
        loop {
            skip_ws(&mut i);
            if i >= b.len() {
                break;
            }
            let key_start = i;
            while i < b.len() && b[i] != b'=' && b[i] != b' ' && b[i] != b',' {
                i += 1;
            }
            if i >= b.len() || b[i] != b'=' || i == key_start {
                return Err(ChallengeError::Malformed);
            }
            let key = rest[key_start..i].to_ascii_lowercase();
            i += 1;
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                loop {
                    if i >= b.len() {
                        return Err(ChallengeError::Malformed);
                    }
                    match b[i] {
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b'\\' if i + 1 < b.len() => {
                            v.push(b[i + 1]);
                            i += 2;
                        }
                        c => {
                            v.push(c);
                            i += 1;
                        }
                    }
                }
                String::from_utf8(v).map_err(|_| ChallengeError::Malformed)?
            } else {
                let s = i;
                while i < b.len() && b[i] != b',' && b[i] != b' ' {
                    i += 1;
                }
                rest[s..i].to_owned()
            };
            params.insert(key, value);
        }
        Ok(Challenge { scheme, params })
    }

    /// A parameter by (lower-case) name.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn docker_hub_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, Scheme::Bearer);
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(
            c.param("scope"),
            Some("repository:library/alpine:pull,push")
        );
    }

    #[test]
    fn basic_and_tokens() {
        let c = Challenge::parse(r#"Basic realm=Registry"#).unwrap();
        assert_eq!(c.scheme, Scheme::Basic);
        assert_eq!(c.param("realm"), Some("Registry"));
        assert_eq!(Challenge::parse("Basic").unwrap().params.len(), 0);
        assert!(Challenge::parse(r#"Bearer realm="unterminated"#).is_err());
        assert!(Challenge::parse("").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,120}") {
            let _ = Challenge::parse(&s);
        }
    }
}
