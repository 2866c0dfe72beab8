//! Framing: one PostgreSQL message on the wire.
//!
//! Every message after startup is `tag: u8, len: i32 (counts itself), body`.
//! The startup family (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest) has no tag. This module finds message boundaries without
//! copying or re-encoding: the relay forwards raw byte ranges and looks at a
//! body only when it must (see [`Relay`]).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest message pgmux accepts, as PostgreSQL (`PQ_LARGE_MESSAGE_LIMIT`).
pub const MAX_MESSAGE_LEN: usize = 1 << 30;
/// Largest startup-family packet, as PostgreSQL (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Largest message accepted before the client has authenticated.
pub const MAX_PREAUTH_LEN: usize = 16 * 1024;
/// Tag byte + length word.
pub const HEADER_LEN: usize = 5;

/// A malformed stream: the peer is not speaking the protocol.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed mid-message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Tag and body length of the message at the front of `buf`, if its header
/// has arrived.
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len.into()));
    }
    let body = len as usize - 4;
    if body > max {
        return Err(FrameError::TooLarge { len: body, max });
    }
    Ok(Some((buf[0], body)))
}

/// Split one whole message (tag, body) off the front of `buf` if complete.
pub fn take_message(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, BytesMut)>, FrameError> {
    match peek_header(buf, max)? {
        Some((tag, body)) if buf.len() >= HEADER_LEN + body => {
            buf.advance(HEADER_LEN);
            Ok(Some((tag, buf.split_to(body))))
        }
        _ => Ok(None),
    }
}

/// Read one whole tagged message, for the login and auth phases.
pub async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, BytesMut), FrameError> {
    loop {
        if let Some(msg) = take_message(buf, max)? {
            return Ok(msg);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(FrameError::Truncated);
        }
    }
}

/// Read one untagged startup-family packet: returns (code, payload).
pub async fn read_startup<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Result<(u32, BytesMut), FrameError> {
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len < 8 {
                return Err(FrameError::BadLength(len.into()));
            }
            let len = len as usize;
            if len > MAX_STARTUP_LEN {
                return Err(FrameError::TooLarge { len, max: MAX_STARTUP_LEN });
            }
            if buf.len() >= len.max(8) {
                let mut pkt = buf.split_to(len);
                pkt.advance(4);
                let code = pkt.get_u32();
                return Ok((code, pkt));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(FrameError::Truncated);
        }
    }
}

/// What the relay should do with a message it has just seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Forward it and keep scanning.
    Forward,
    /// Forward nothing from here on; the message stays at the front of the
    /// buffer for the caller to handle.
    Stop,
}

/// Streaming scanner over one direction of a connection.
///
/// `scan` walks message headers in a buffer and reports how many leading
/// bytes may be forwarded as they are. A message whose body the caller must
/// read (`needs_body(tag)`) is reported only once it is complete; any other
/// message is reported at its header and its body is passed through as it
/// arrives, so a 500 MB COPY row never sits whole in memory.
#[derive(Debug, Default)]
pub struct Relay {
    /// Body bytes of an already-reported message still to pass through.
    passthrough: usize,
}

impl Relay {
    /// True while a message is only partly forwarded: the stream is then
    /// not at a message boundary.
    pub fn mid_message(&self) -> bool {
        self.passthrough > 0
    }

    /// Scan `buf`; `on_msg(tag, body)` gets the body only for tags where
    /// `needs_body` is true (an empty slice otherwise). Returns the number
    /// of leading bytes ready to forward.
    pub fn scan(
        &mut self,
        buf: &[u8],
        max: usize,
        needs_body: impl Fn(u8) -> bool,
        mut on_msg: impl FnMut(u8, &[u8]) -> Flow,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(buf.len() - pos);
                self.passthrough -= n;
                pos += n;
                if self.passthrough > 0 {
                    return Ok(pos);
                }
            }
            let Some((tag, body)) = peek_header(&buf[pos..], max)? else {
                return Ok(pos);
            };
            if needs_body(tag) {
                let end = pos + HEADER_LEN + body;
                if buf.len() < end {
                    return Ok(pos);
                }
                if on_msg(tag, &buf[pos + HEADER_LEN..end]) == Flow::Stop {
                    return Ok(pos);
                }
                pos = end;
            } else {
                if on_msg(tag, &[]) == Flow::Stop {
                    return Ok(pos);
                }
                pos += HEADER_LEN;
                self.passthrough = body;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut b = vec![b'Q'];
        b.extend_from_slice(&3i32.to_be_bytes());
        assert!(matches!(peek_header(&b, MAX_MESSAGE_LEN), Err(FrameError::BadLength(3))));
        let mut b = vec![b'Q'];
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert!(matches!(peek_header(&b, MAX_MESSAGE_LEN), Err(FrameError::BadLength(-1))));
        let mut b = vec![b'Q'];
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(peek_header(&b, MAX_MESSAGE_LEN), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn streams_bodies_it_does_not_inspect() {
        let mut wire = msg(b'd', &[7u8; 100]);
        wire.extend(msg(b'Z', b"I"));
        let mut relay = Relay::default();
        let mut seen = Vec::new();
        // Only the first 40 bytes have arrived.
        let n = relay
            .scan(
                &wire[..40],
                MAX_MESSAGE_LEN,
                |t| t == b'Z',
                |t, _| {
                    seen.push(t);
                    Flow::Forward
                },
            )
            .unwrap();
        assert_eq!(n, 40);
        assert!(relay.mid_message());
        let rest = &wire[40..];
        let n = relay
            .scan(
                rest,
                MAX_MESSAGE_LEN,
                |t| t == b'Z',
                |t, body| {
                    seen.push(t);
                    if t == b'Z' {
                        assert_eq!(body, b"I");
                    }
                    Flow::Forward
                },
            )
            .unwrap();
        assert_eq!(n, rest.len());
        assert_eq!(seen, vec![b'd', b'Z']);
    }

    #[test]
    fn waits_for_whole_inspected_message_and_stops() {
        let mut wire = msg(b'Q', b"select 1\0");
        wire.extend(msg(b'X', b""));
        let mut relay = Relay::default();
        let n = relay.scan(&wire[..8], MAX_MESSAGE_LEN, |_| true, |_, _| Flow::Forward).unwrap();
        assert_eq!(n, 0);
        let n = relay
            .scan(
                &wire,
                MAX_MESSAGE_LEN,
                |_| true,
                |t, _| {
                    if t == b'X' {
                        Flow::Stop
                    } else {
                        Flow::Forward
                    }
                },
            )
            .unwrap();
        assert_eq!(n, 14);
    }
}
