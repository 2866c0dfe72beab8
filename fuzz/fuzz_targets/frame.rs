//! The frame scanner on arbitrary bytes, with what the caller does at each
//! message (forward, stop, drop, replace, insert, send-then-stop) chosen by
//! the input: it never panics, never consumes more than it was given, and
//! an edited scan's output is what it kept plus what was put in.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgmux::protocol::frame::{peek_header, Flow, Relay, MAX_MESSAGE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&choice, bytes)) = data.split_first() else { return };
    let max = if choice & 1 == 0 { MAX_MESSAGE_LEN } else { usize::from(choice) };
    let _ = peek_header(bytes, max);
    let mut relay = Relay::default();
    let mut n = 0usize;
    let scanned = relay.scan(
        bytes,
        max,
        |t| (t ^ choice) % 3 != 0,
        |tag, body| {
            n += 1;
            match (tag.wrapping_add(choice) as usize + n) % 7 {
                0 => Flow::Stop,
                1 => Flow::Drop,
                2 => Flow::Replace(BytesMut::from(body)),
                3 => Flow::Insert(BytesMut::from(&b"H\0\0\0\x04"[..])),
                4 => Flow::StopAfter(BytesMut::from(&b"H\0\0\0\x04"[..])),
                _ => Flow::Forward,
            }
        },
    );
    if let Ok(scan) = scanned {
        assert!(scan.consumed <= bytes.len());
        if let Some(out) = scan.rewritten {
            // Edits put in at most one 5-byte message per message seen.
            assert!(out.len() <= scan.consumed + 5 * n + bytes.len());
        }
    }
});
