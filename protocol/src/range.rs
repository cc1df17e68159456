//! Single byte-range requests (`Range: bytes=...`), RFC 9110 section 14.

/// An inclusive byte range `[start, end]` within a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a satisfiable range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` header value.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, total)
    }
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The header does not parse as a single `bytes=` range.
    #[error("malformed Range header")]
    Malformed,
    /// More than one range was asked for; Shoal serves single ranges only.
    #[error("multiple ranges are not supported")]
    Multiple,
    /// The range lies wholly beyond the end of the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    Unsatisfiable {
        /// The blob's size.
        size: u64,
    },
}

/// Parses a `Range` header against a blob of `size` bytes.
///
/// `Ok(None)`: the header is a unit other than `bytes`, which RFC 9110 says to ignore.
pub fn parse_range(header: &str, size: u64) -> Result<Option<ByteRange>, RangeError> {
    let header = header.trim();
    let Some(spec) = header.strip_prefix("bytes=") else {
        return if header.contains('=') {
            Ok(None)
        } else {
            Err(RangeError::Malformed)
        };
    };
    if spec.contains(',') {
        return Err(RangeError::Multiple);
    }
    let (first, last) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    let range = if first.is_empty() {
        // Suffix range: the last N bytes.
        let n = num(last)?;
        if n == 0 || size == 0 {
            return Err(RangeError::Unsatisfiable { size });
        }
        ByteRange {
            start: size.saturating_sub(n),
            end: size - 1,
        }
    } else {
        let start = num(first)?;
        let end = if last.is_empty() {
            u64::MAX
        } else {
            num(last)?
        };
        if end < start {
            return Err(RangeError::Malformed);
        }
        if start >= size {
            return Err(RangeError::Unsatisfiable { size });
        }
        ByteRange {
            start,
            end: end.min(size - 1),
        }
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms() {
        assert_eq!(
            parse_range("bytes=0-9", 100),
            Ok(Some(ByteRange { start: 0, end: 9 }))
        );
        assert_eq!(
            parse_range("bytes=90-", 100),
            Ok(Some(ByteRange { start: 90, end: 99 }))
        );
        assert_eq!(
            parse_range("bytes=90-1000", 100),
            Ok(Some(ByteRange { start: 90, end: 99 }))
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            Ok(Some(ByteRange { start: 90, end: 99 }))
        );
        assert_eq!(
            parse_range("bytes=-1000", 100),
            Ok(Some(ByteRange { start: 0, end: 99 }))
        );
        assert_eq!(
            parse_range("bytes=100-", 100),
            Err(RangeError::Unsatisfiable { size: 100 })
        );
        assert_eq!(
            parse_range("bytes=-0", 100),
            Err(RangeError::Unsatisfiable { size: 100 })
        );
        assert_eq!(parse_range("bytes=5-1", 100), Err(RangeError::Malformed));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Err(RangeError::Multiple));
        assert_eq!(parse_range("bytes=a-b", 100), Err(RangeError::Malformed));
        assert_eq!(parse_range("bytes=+1-2", 100), Err(RangeError::Malformed));
        assert_eq!(parse_range("garbage", 100), Err(RangeError::Malformed));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 100),
            Err(RangeError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn satisfiable_ranges_lie_within(h in "bytes=[0-9]{0,4}-[0-9]{0,4}", size in 0u64..5000) {
            if let Ok(Some(r)) = parse_range(&h, size) {
                prop_assert!(r.start <= r.end && r.end < size);
            }
        }

        #[test]
        fn never_panics(h in "\\PC{0,40}", size in any::<u64>()) {
            let _ = parse_range(&h, size);
        }
    }
}
