//! Parsing of `/v2/...` request paths into routes.
//!
//! Repository names have any number of components, so the router cannot use fixed path
//! segments: the last one or two segments say which endpoint is meant, and all before them is
//! the name, validated strictly.

use crate::digest::{Digest, DigestError};
use crate::reference::{Name, NameError, Reference, ReferenceError};

/// A parsed read-side Distribution API route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: Name, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: Name, digest: Digest },
    /// `/v2/<name>/tags/list`
    TagsList { name: Name },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: Name, digest: Digest },
}

/// Why a path is not a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not under `/v2/`, or no known endpoint.
    #[error("no such endpoint")]
    NotFound,
    /// The repository name is invalid.
    #[error("invalid repository name: {0}")]
    Name(#[from] NameError),
    /// The digest is invalid.
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
    /// The manifest reference is invalid.
    #[error("invalid reference: {0}")]
    Reference(#[from] ReferenceError),
}

impl Route {
    /// Parses a request path (without the query string).
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        if path == "/v2/" || path == "/v2" {
            return Ok(Route::Base);
        }
        let rest = path.strip_prefix("/v2/").ok_or(RouteError::NotFound)?;
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route::TagsList {
                name: Name::parse(name)?,
            });
        }
        let (head, last) = rest.rsplit_once('/').ok_or(RouteError::NotFound)?;
        let (name, kind) = head.rsplit_once('/').ok_or(RouteError::NotFound)?;
        match kind {
            "manifests" => {
                let name = Name::parse(name)?;
                Ok(Route::Manifest {
                    name,
                    reference: Reference::parse(last)?,
                })
            }
            "blobs" => {
                let name = Name::parse(name)?;
                Ok(Route::Blob {
                    name,
                    digest: Digest::parse(last)?,
                })
            }
            "referrers" => {
                let name = Name::parse(name)?;
                Ok(Route::Referrers {
                    name,
                    digest: Digest::parse(last)?,
                })
            }
            _ => Err(RouteError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes() {
        let d = Digest::of(b"x");
        assert_eq!(Route::parse("/v2/"), Ok(Route::Base));
        assert_eq!(
            Route::parse("/v2/a/b/c/manifests/latest"),
            Ok(Route::Manifest {
                name: Name::parse("a/b/c").unwrap(),
                reference: Reference::Tag("latest".into())
            })
        );
        assert_eq!(
            Route::parse(&format!("/v2/library/alpine/blobs/{d}")),
            Ok(Route::Blob {
                name: Name::parse("library/alpine").unwrap(),
                digest: d
            })
        );
        assert_eq!(
            Route::parse("/v2/x/tags/list"),
            Ok(Route::TagsList {
                name: Name::parse("x").unwrap()
            })
        );
        assert_eq!(
            Route::parse(&format!("/v2/x/referrers/{d}")),
            Ok(Route::Referrers {
                name: Name::parse("x").unwrap(),
                digest: d
            })
        );
        // A repository may itself be called "blobs" or "manifests".
        assert_eq!(
            Route::parse("/v2/blobs/manifests/v1"),
            Ok(Route::Manifest {
                name: Name::parse("blobs").unwrap(),
                reference: Reference::Tag("v1".into())
            })
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(Route::parse("/v3/x"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2/x"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2/x/uploads/y"), Err(RouteError::NotFound));
        assert!(matches!(
            Route::parse("/v2/../etc/blobs/sha256:00"),
            Err(RouteError::Name(_))
        ));
        assert!(Route::parse("/v2/x/blobs/sha256:../../x").is_err());
        assert!(matches!(
            Route::parse("/v2/x/blobs/sha256:..%2f"),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x/manifests/-bad"),
            Err(RouteError::Reference(_))
        ));
        assert!(matches!(
            Route::parse("/v2//manifests/latest"),
            Err(RouteError::Name(_))
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "/v2/\\PC{0,80}") {
            let _ = Route::parse(&s);
        }
    }
}
