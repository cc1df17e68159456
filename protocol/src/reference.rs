//! Repository names and manifest references (tags or digests), validated per the OCI
//! Distribution spec. Validation is what keeps a hostile path out of the store: a name that
//! passes has no `..`, no leading `/` and no characters outside `[a-z0-9._/-]`.

use std::fmt;

use crate::digest::{Digest, DigestError};

/// Longest repository name accepted (the spec's recommended limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted (the spec's grammar allows 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// A validated repository name such as `library/alpine` or `a/b/c`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// Why a name is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty name.
    #[error("repository name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("repository name longer than {MAX_NAME_LEN} characters")]
    TooLong,
    /// A path component does not match `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
    #[error("invalid repository name component")]
    BadComponent,
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // A separator: ".", "_", "__" or one or more "-".
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == b.len() {
            return false;
        }
    }
}

impl Name {
    /// Validates a name.
    pub fn parse(s: &str) -> Result<Name, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !s.split('/').all(valid_component) {
            return Err(NameError::BadComponent);
        }
        Ok(Name(s.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag, resolved upstream.
    Tag(String),
    /// An immutable digest.
    Digest(Digest),
}

/// Why a reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Looks like a digest but is not a valid one.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// Not a valid tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
    #[error("invalid tag")]
    BadTag,
}

/// Whether `s` is a valid tag.
pub fn valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'))
}

impl Reference {
    /// Parses a tag or a digest (anything with a `:` is taken as a digest).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            return Ok(Reference::Digest(Digest::parse(s)?));
        }
        if valid_tag(s) {
            Ok(Reference::Tag(s.to_owned()))
        } else {
            Err(ReferenceError::BadTag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["alpine", "library/alpine", "a/b/c", "a.b_c__d---e/f0", "x1"] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "..", "a/../b", "a..b", "a___b", "-a", "a-", "a b",
            "a%2fb",
        ] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Name::parse(&"a".repeat(256)), Err(NameError::TooLong));
    }

    #[test]
    fn references() {
        assert_eq!(
            Reference::parse("latest"),
            Ok(Reference::Tag("latest".into()))
        );
        assert_eq!(
            Reference::parse("v1.2_3-x"),
            Ok(Reference::Tag("v1.2_3-x".into()))
        );
        assert!(Reference::parse(".hidden").is_err());
        assert!(Reference::parse(&"a".repeat(129)).is_err());
        assert!(Reference::parse("sha256:zz").is_err());
        let d = Digest::of(b"x");
        assert_eq!(Reference::parse(&d.to_string()), Ok(Reference::Digest(d)));
    }

    proptest! {
        #[test]
        fn valid_names_never_escape(s in "[a-z0-9._/-]{1,40}") {
            if let Ok(n) = Name::parse(&s) {
                prop_assert!(!n.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                prop_assert!(!n.as_str().starts_with('/'));
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = Name::parse(&s);
            let _ = Reference::parse(&s);
        }
    }
}
