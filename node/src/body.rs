//! Response bodies that stream blobs: from the store (memory-mapped windows, so the bytes go
//! from the page cache to the socket without an extra copy) or from an arriving transfer.
//!
//! Memory stays flat whatever the blob size: at most one window per response is mapped ahead
//! of the socket, and each window is unmapped once hyper has written it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::mirror::{Mirror, Transfer};
use crate::store::Pin;

/// The body type of every response.
pub type Body = BoxBody<Bytes, io::Error>;

/// Bytes mapped per window of a stored blob.
pub const WINDOW: u64 = 4 << 20;
/// Largest read from an arriving blob's partial file.
const ARRIVING_READ: u64 = 1 << 20;

/// A body held in memory.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Maps `len` bytes of `file` at `offset` (any alignment) and returns them as `Bytes`.
#[allow(unsafe_code)]
fn map_window(file: &File, offset: u64, len: u64) -> io::Result<Bytes> {
    let page = 4096u64;
    let aligned = offset - offset % page;
    let skip = (offset - aligned) as usize;
    // SAFETY: the file is a complete blob under `blobs/`: it was verified, renamed into place
    // and is never written or truncated again (eviction only unlinks it, which leaves the
    // mapping valid). So the mapped bytes cannot change underneath the `Bytes`.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(aligned)
            .len(skip + len as usize)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map).slice(skip..))
}

/// Streams `[start, end)` of a complete blob.
pub fn stored(file: File, start: u64, end: u64, pin: Pin, mirror: Arc<Mirror>) -> Body {
    let digest = *pin.digest();
    let file = Arc::new(file);
    let s = stream::unfold((start, pin), move |(offset, pin)| {
        let file = file.clone();
        let mirror = mirror.clone();
        async move {
            if offset >= end {
                return None;
            }
            let len = (end - offset).min(WINDOW);
            let mapped = tokio::task::spawn_blocking(move || map_window(&file, offset, len)).await;
            let item = match mapped {
                Ok(Ok(b)) => {
                    mirror.metrics.served("cache", b.len() as u64);
                    mirror.pulls.served_cache(&digest, b.len() as u64);
                    Ok(Frame::data(b))
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(io::Error::other(e)),
            };
            // After an error, end the stream: hyper aborts the response.
            let next = if item.is_ok() { offset + len } else { end };
            Some((item, (next, pin)))
        }
    });
    StreamBody::new(s).boxed()
}

/// Streams a blob that is still arriving, from `start` to its end. The last byte is held back
/// until the whole blob has been verified; if verification fails the stream ends in an error,
/// so the client's response is aborted short of complete. A blob proven before it is stored
/// ([`Progress::verified`](crate::mirror::Progress::verified)) is served to its end, even if
/// storing it then fails (the open file still holds the proven bytes).
pub fn arriving(t: Arc<Transfer>, start: u64, mirror: Arc<Mirror>) -> Body {
    let rx = t.progress.clone();
    let s = stream::unfold((start, rx, false), move |(mut offset, mut rx, finished)| {
        let t = t.clone();
        let mirror = mirror.clone();
        async move {
            if finished {
                return None;
            }
            loop {
                let p = rx.borrow_and_update().clone();
                let limit = match &p.done {
                    _ if p.verified => p.written,
                    Some(Err(e)) => {
                        let err = io::Error::other(format!("blob {} failed: {e}", t.digest));
                        return Some((Err(err), (offset, rx, true)));
                    }
                    Some(Ok(())) => p.written,
                    None => p.written.saturating_sub(1),
                };
                let end = t.size.map_or(limit, |s| s.min(limit));
                if p.done.is_some() && offset >= end {
                    return None;
                }
                if offset < end {
                    let len = (end - offset).min(ARRIVING_READ);
                    let t2 = t.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len as usize];
                        t2.file
                            .read_exact_at(&mut buf, offset)
                            .map(|()| Bytes::from(buf))
                    })
                    .await;
                    return match read {
                        Ok(Ok(b)) => {
                            offset += b.len() as u64;
                            mirror.metrics.served(t.source, b.len() as u64);
                            mirror.pulls.served_arriving(&t.digest, b.len() as u64);
                            Some((Ok(Frame::data(b)), (offset, rx, false)))
                        }
                        Ok(Err(e)) => Some((Err(e), (offset, rx, true))),
                        Err(e) => Some((Err(io::Error::other(e)), (offset, rx, true))),
                    };
                }
                if rx.changed().await.is_err() && rx.borrow().done.is_none() {
                    let err = io::Error::other("blob transfer ended without an outcome");
                    return Some((Err(err), (offset, rx, true)));
                }
            }
        }
    });
    StreamBody::new(s).boxed()
}
