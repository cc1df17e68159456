//! Reading and writing [`shoal_protocol::wire`] messages on QUIC streams, with a timeout on
//! every wait. The codec checks a header before any payload is read, so a reader never buffers
//! more than the message kind allows.

use std::time::Duration;

use bytes::Bytes;
use quinn::{ReadExactError, RecvStream, SendStream, WriteError};
use shoal_protocol::wire::{Header, Request, Response, WireError, HEADER_LEN};
use tokio::time::timeout;

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The wait exceeded its timeout.
    #[error("timed out")]
    Timeout,
    /// The stream ended before the message did.
    #[error("stream ended early")]
    Finished,
    /// The stream or its connection failed.
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream or its connection failed.
    #[error("stream: {0}")]
    Write(#[from] WriteError),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
}

impl FrameError {
    /// The connection error underneath, if the connection (not just the stream) failed.
    pub(crate) fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            FrameError::Read(quinn::ReadError::ConnectionLost(e))
            | FrameError::Write(WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        }
    }
}

/// Reads exactly `buf.len()` bytes, waiting at most `limit` for them.
pub(crate) async fn read_exact(
    recv: &mut RecvStream,
    buf: &mut [u8],
    limit: Duration,
) -> Result<(), FrameError> {
    match timeout(limit, recv.read_exact(buf)).await {
        Err(_) => Err(FrameError::Timeout),
        Ok(r) => read_result(r),
    }
}

fn read_result(r: Result<(), ReadExactError>) -> Result<(), FrameError> {
    match r {
        Ok(()) => Ok(()),
        Err(ReadExactError::FinishedEarly(_)) => Err(FrameError::Finished),
        Err(ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads a header checked by `decode_header`, then its payload; `header_wait`: how long the
/// header may take to come (`None`: no limit; the payload then takes at most `limit`).
async fn read_message(
    recv: &mut RecvStream,
    limit: Duration,
    header_wait: Option<Duration>,
    decode_header: fn(&[u8]) -> Result<Header, WireError>,
) -> Result<(Header, Vec<u8>), FrameError> {
    let mut head = [0u8; HEADER_LEN];
    match header_wait {
        Some(wait) => read_exact(recv, &mut head, wait).await?,
        None => read_result(recv.read_exact(&mut head).await)?,
    }
    let header = decode_header(&head)?;
    // Bounded by the kind's cap, checked by `decode_header`.
    let mut payload = vec![0u8; header.payload_len as usize];
    read_exact(recv, &mut payload, limit).await?;
    Ok((header, payload))
}

/// Reads one request.
pub(crate) async fn read_request(
    recv: &mut RecvStream,
    limit: Duration,
) -> Result<Request, FrameError> {
    let (header, payload) = read_message(recv, limit, Some(limit), Request::decode_header).await?;
    Ok(Request::decode_payload(header, &payload)?)
}

/// Reads one response (after a [`Response::ChunkHeader`], the raw chunk bytes are left on the
/// stream).
pub(crate) async fn read_response(
    recv: &mut RecvStream,
    limit: Duration,
) -> Result<Response, FrameError> {
    let (header, payload) = read_message(recv, limit, Some(limit), Response::decode_header).await?;
    Ok(Response::decode_payload(header, &payload)?)
}

/// Reads the next response of a stream that answers with several (a `Watch`), waiting as long
/// as it takes for one to start (`Ok(None)`: the stream finished cleanly between responses);
/// a response once started must finish within `limit`.
pub(crate) async fn read_next_response(
    recv: &mut RecvStream,
    limit: Duration,
) -> Result<Option<Response>, FrameError> {
    match read_message(recv, limit, None, Response::decode_header).await {
        Ok((header, payload)) => Ok(Some(Response::decode_payload(header, &payload)?)),
        Err(FrameError::Finished) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `bytes`, waiting at most `limit` for the peer's flow control to take them.
pub(crate) async fn write(
    send: &mut SendStream,
    bytes: Bytes,
    limit: Duration,
) -> Result<(), FrameError> {
    // `limit` bounds each wait for the peer to take more, not the whole write: a peer behind a
    // thin link that keeps taking bytes is not cut off, one that stops is. (`write_chunks` is
    // cancel-safe: a wait that times out wrote nothing.)
    let mut bufs = [bytes];
    while !bufs[0].is_empty() {
        match timeout(limit, send.write_chunks(&mut bufs)).await {
            Err(_) => return Err(FrameError::Timeout),
            Ok(r) => {
                r?;
            }
        }
    }
    Ok(())
}

/// Writes one request.
pub(crate) async fn write_request(
    send: &mut SendStream,
    request: &Request,
    limit: Duration,
) -> Result<(), FrameError> {
    write(send, Bytes::from(request.encode()), limit).await
}

/// Writes one response.
pub(crate) async fn write_response(
    send: &mut SendStream,
    response: &Response,
    limit: Duration,
) -> Result<(), FrameError> {
    write(send, Bytes::from(response.encode()), limit).await
}
