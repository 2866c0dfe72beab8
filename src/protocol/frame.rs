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

/// The whole first message of `buf` (its tag and body), if it is there.
pub fn first_message(buf: &[u8]) -> Option<(u8, &[u8])> {
    let (tag, len) = peek_header(buf, MAX_MESSAGE_LEN).ok()??;
    Some((tag, buf.get(HEADER_LEN..HEADER_LEN + len)?))
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
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Forward it and keep scanning.
    Forward,
    /// Forward nothing from here on; the message stays at the front of the
    /// buffer for the caller to handle.
    Stop,
    /// Leave it out (only for messages whose body was inspected).
    Drop,
    /// Send these bytes instead (only for messages whose body was inspected).
    Replace(BytesMut),
    /// Send these bytes, then the message.
    Insert(BytesMut),
    /// Send these bytes, then stop as [`Flow::Stop`] does: the message
    /// waits for an answer to them.
    StopAfter(BytesMut),
}

/// The result of one [`Relay::scan`].
#[derive(Debug, Default)]
pub struct Scan {
    /// Leading bytes of the buffer dealt with.
    pub consumed: usize,
    /// When messages were dropped, replaced or inserted: the bytes to send
    /// instead of `buf[..consumed]`. `None` means send the slice as it is.
    pub rewritten: Option<BytesMut>,
}

/// Streaming scanner over one direction of a connection.
///
/// `scan` walks message headers in a buffer and reports how many leading
/// bytes may be forwarded as they are. A message whose body the caller must
/// read (`needs_body(tag)`) is reported only once it is complete; any other
/// message is reported at its header and its body is passed through as it
/// arrives, so a 500 MB COPY row never sits whole in memory. Unchanged
/// traffic is never copied: only a scan that edits something builds a new
/// buffer.
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
    /// `needs_body` is true (an empty slice otherwise).
    pub fn scan(
        &mut self,
        buf: &[u8],
        max: usize,
        needs_body: impl Fn(u8) -> bool,
        mut on_msg: impl FnMut(u8, &[u8]) -> Flow,
    ) -> Result<Scan, FrameError> {
        let mut pos = 0;
        // Edited output so far, and where the not-yet-copied run starts.
        let mut out: Option<BytesMut> = None;
        let mut run = 0;
        let edit = |out: &mut Option<BytesMut>, run: &mut usize, at: usize, bytes: &[u8], resume: usize| {
            let o = out.get_or_insert_with(|| BytesMut::with_capacity(buf.len() + bytes.len()));
            o.extend_from_slice(&buf[*run..at]);
            o.extend_from_slice(bytes);
            *run = resume;
        };
        let done = |out: Option<BytesMut>, run: usize, pos: usize| {
            let rewritten = out.map(|mut o| {
                o.extend_from_slice(&buf[run..pos]);
                o
            });
            Ok(Scan { consumed: pos, rewritten })
        };
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(buf.len() - pos);
                self.passthrough -= n;
                pos += n;
                if self.passthrough > 0 {
                    return done(out, run, pos);
                }
            }
            let header = match peek_header(&buf[pos..], max) {
                Ok(Some(h)) => h,
                Ok(None) => return done(out, run, pos),
                Err(e) => return Err(e),
            };
            let (tag, body) = header;
            let whole = needs_body(tag);
            let end = pos + HEADER_LEN + body;
            if whole && buf.len() < end {
                return done(out, run, pos);
            }
            let flow = on_msg(tag, if whole { &buf[pos + HEADER_LEN..end] } else { &[] });
            match flow {
                Flow::Stop => return done(out, run, pos),
                Flow::StopAfter(bytes) => {
                    edit(&mut out, &mut run, pos, &bytes, pos);
                    return done(out, run, pos);
                }
                Flow::Drop if whole => edit(&mut out, &mut run, pos, &[], end),
                Flow::Replace(bytes) if whole => edit(&mut out, &mut run, pos, &bytes, end),
                Flow::Insert(bytes) => edit(&mut out, &mut run, pos, &bytes, pos),
                _ => {}
            }
            if whole {
                pos = end;
            } else {
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
        assert_eq!(n.consumed, 40);
        assert!(n.rewritten.is_none());
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
        assert_eq!(n.consumed, rest.len());
        assert_eq!(seen, vec![b'd', b'Z']);
    }

    #[test]
    fn waits_for_whole_inspected_message_and_stops() {
        let mut wire = msg(b'Q', b"select 1\0");
        wire.extend(msg(b'X', b""));
        let mut relay = Relay::default();
        let n = relay.scan(&wire[..8], MAX_MESSAGE_LEN, |_| true, |_, _| Flow::Forward).unwrap();
        assert_eq!(n.consumed, 0);
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
        assert_eq!(n.consumed, 14);
    }

    #[test]
    fn edits_build_a_new_buffer() {
        let mut wire = msg(b'1', b"");
        wire.extend(msg(b'2', b""));
        wire.extend(msg(b'D', b"row"));
        wire.extend(msg(b'Z', b"I"));
        let mut relay = Relay::default();
        let scan = relay
            .scan(
                &wire,
                MAX_MESSAGE_LEN,
                |t| t != b'D',
                |t, _| match t {
                    b'1' => Flow::Drop,
                    b'D' => Flow::Insert(BytesMut::from(&msg(b'3', b"")[..])),
                    b'Z' => Flow::Replace(BytesMut::from(&msg(b'Z', b"T")[..])),
                    _ => Flow::Forward,
                },
            )
            .unwrap();
        assert_eq!(scan.consumed, wire.len());
        let mut expect = msg(b'2', b"");
        expect.extend(msg(b'3', b""));
        expect.extend(msg(b'D', b"row"));
        expect.extend(msg(b'Z', b"T"));
        assert_eq!(scan.rewritten.unwrap().to_vec(), expect);
    }

    #[test]
    fn stop_after_sends_its_bytes_and_keeps_the_message() {
        let mut wire = msg(b'P', b"p");
        wire.extend(msg(b'B', b"b"));
        wire.extend(msg(b'S', b""));
        let mut relay = Relay::default();
        let scan = relay
            .scan(
                &wire,
                MAX_MESSAGE_LEN,
                |_| true,
                |t, _| match t {
                    b'B' => Flow::StopAfter(BytesMut::from(&msg(b'H', b"")[..])),
                    _ => Flow::Forward,
                },
            )
            .unwrap();
        assert_eq!(scan.consumed, 6, "the Bind and what follows wait");
        let mut expect = msg(b'P', b"p");
        expect.extend(msg(b'H', b""));
        assert_eq!(scan.rewritten.unwrap().to_vec(), expect);
    }
}
