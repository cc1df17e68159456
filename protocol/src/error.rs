//! OCI Distribution error codes and their JSON body.

use serde::Serialize;

/// The error codes of the OCI Distribution spec that Shoal emits, plus Shoal's own few.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The blob is unknown to the registry.
    BlobUnknown,
    /// The digest did not match, or is malformed.
    DigestInvalid,
    /// The manifest is unknown.
    ManifestUnknown,
    /// The manifest is malformed or too large.
    ManifestInvalid,
    /// The repository name is malformed.
    NameInvalid,
    /// The repository is unknown.
    NameUnknown,
    /// The client is not authenticated.
    Unauthorized,
    /// The client may not access the resource.
    Denied,
    /// The operation is not supported (Shoal is a read-only mirror).
    Unsupported,
    /// The upstream rate-limited the request.
    TooManyRequests,
    /// A `Range` header that cannot be satisfied or parsed.
    RangeInvalid,
    /// The upstream registry could not be reached or misbehaved.
    UpstreamUnavailable,
    /// Shoal itself failed.
    Internal,
}

impl ErrorCode {
    /// The code string in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL_ERROR",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown | ErrorCode::ManifestUnknown | ErrorCode::NameUnknown => 404,
            ErrorCode::DigestInvalid | ErrorCode::ManifestInvalid | ErrorCode::NameInvalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::UpstreamUnavailable => 502,
            ErrorCode::Internal => 500,
        }
    }

    /// Maps an upstream code string back to a code, for passing upstream errors through.
    pub fn from_code_str(s: &str) -> Option<ErrorCode> {
        Some(match s {
            "BLOB_UNKNOWN" => ErrorCode::BlobUnknown,
            "DIGEST_INVALID" => ErrorCode::DigestInvalid,
            "MANIFEST_UNKNOWN" => ErrorCode::ManifestUnknown,
            "MANIFEST_INVALID" => ErrorCode::ManifestInvalid,
            "NAME_INVALID" => ErrorCode::NameInvalid,
            "NAME_UNKNOWN" => ErrorCode::NameUnknown,
            "UNAUTHORIZED" => ErrorCode::Unauthorized,
            "DENIED" => ErrorCode::Denied,
            "UNSUPPORTED" => ErrorCode::Unsupported,
            "TOOMANYREQUESTS" => ErrorCode::TooManyRequests,
            _ => return None,
        })
    }
}

/// One error as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError {
    /// The code.
    pub code: ErrorCode,
    /// A human-readable message; never internal details such as file paths.
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'a str,
    message: &'a str,
}

impl OciError {
    /// An error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OciError {
        OciError {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// `{"errors":[{"code":...,"message":...}]}`
    pub fn to_json(&self) -> String {
        let body = Body {
            errors: [Entry {
                code: self.code.as_str(),
                message: &self.message,
            }],
        };
        // Serializing two strings cannot fail.
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"errors\":[]}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_json() {
        let e = OciError::new(ErrorCode::BlobUnknown, "blob \"x\" unknown");
        assert_eq!(
            e.to_json(),
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob \"x\" unknown"}]}"#
        );
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn codes_round_trip() {
        for c in [
            ErrorCode::BlobUnknown,
            ErrorCode::DigestInvalid,
            ErrorCode::ManifestUnknown,
            ErrorCode::ManifestInvalid,
            ErrorCode::NameInvalid,
            ErrorCode::NameUnknown,
            ErrorCode::Unauthorized,
            ErrorCode::Denied,
            ErrorCode::Unsupported,
            ErrorCode::TooManyRequests,
        ] {
            assert_eq!(ErrorCode::from_code_str(c.as_str()), Some(c));
        }
    }
}
