//! The protocol tracker fed arbitrary sequences of client and server
//! messages (tags and bodies drawn from what drivers and servers send,
//! including stale-statement errors and DDL): it never panics, every byte
//! string it sends instead of a message is whole protocol messages, and it
//! never counts more answers outstanding than requests it let through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmux::protocol::frame::{peek_header, Flow, MAX_MESSAGE_LEN};
use pgmux::protocol::prepared::{ClientStatements, Invalidations, ServerStatements};
use pgmux::protocol::tracker::Ctx;
use pgmux::protocol::tracker::Tracker;

const NAMES: [&str; 3] = ["", "a", "b"];
const QUERIES: [&str; 6] = [
    "SELECT 1",
    "SELECT * FROM pg_prepared_statements",
    "DEALLOCATE a",
    "COMMIT",
    "ALTER TABLE t ADD c int",
    "SELECT $1::int",
];

/// Whole messages, back to back, and nothing else.
fn whole_messages(b: &[u8]) -> bool {
    let mut at = 0;
    while at < b.len() {
        match peek_header(&b[at..], MAX_MESSAGE_LEN) {
            Ok(Some((_, len))) if at + 5 + len <= b.len() => at += 5 + len,
            _ => return false,
        }
    }
    true
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// A client message from two input bytes.
fn client_message(k: u8, v: u8) -> (u8, Vec<u8>) {
    let name = NAMES[usize::from(v) % 3];
    let query = QUERIES[usize::from(v / 3) % QUERIES.len()];
    let mut b = Vec::new();
    let tag = match k % 11 {
        0 => {
            cstr(&mut b, name);
            cstr(&mut b, query);
            b.extend_from_slice(&0i16.to_be_bytes());
            b'P'
        }
        1 => {
            cstr(&mut b, "");
            cstr(&mut b, name);
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            b'B'
        }
        2 => {
            b.push(if v % 2 == 0 { b'S' } else { b'P' });
            cstr(&mut b, name);
            b'D'
        }
        3 => {
            cstr(&mut b, "");
            b.extend_from_slice(&0i32.to_be_bytes());
            b'E'
        }
        4 | 5 => b'S',
        6 => b'H',
        7 => {
            cstr(&mut b, query);
            b'Q'
        }
        8 => {
            b.push(b'S');
            cstr(&mut b, name);
            b'C'
        }
        9 => {
            b.extend_from_slice(b"1\t2\n");
            b'd'
        }
        _ => {
            if v % 2 == 0 {
                b'c'
            } else {
                cstr(&mut b, "no");
                b'f'
            }
        }
    };
    (tag, b)
}

/// A server message from two input bytes.
fn server_message(k: u8, v: u8) -> (u8, Vec<u8>) {
    let mut b = Vec::new();
    let tag = match k % 13 {
        0 => b'1',
        1 => b'2',
        2 => b'3',
        3 => {
            b.extend_from_slice(&0i16.to_be_bytes());
            b't'
        }
        4 => {
            b.extend_from_slice(&1i16.to_be_bytes());
            cstr(&mut b, if v % 2 == 0 { "id" } else { "note" });
            b.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0]);
            b'T'
        }
        5 => b'n',
        6 => {
            b.extend_from_slice(&[0, 1, 0, 0, 0, 1, b'1']);
            b'D'
        }
        7 => {
            cstr(&mut b, ["SELECT 1", "ALTER TABLE", "ROLLBACK", "DISCARD ALL"][usize::from(v) % 4]);
            b'C'
        }
        8 => {
            let (code, message, routine) = [
                ("0A000", "cached plan must not change result type", "RevalidateCachedQuery"),
                ("26000", "prepared statement \"pgmux_00ab\" does not exist", "FetchPreparedStatement"),
                ("XX000", "cache lookup failed for type 1", "x"),
                ("22012", "division by zero", "int4div"),
            ][usize::from(v) % 4];
            for (f, s) in [(b'S', "ERROR"), (b'C', code), (b'M', message), (b'R', routine)] {
                b.push(f);
                cstr(&mut b, s);
            }
            b.push(0);
            b'E'
        }
        9 => {
            b.push([b'I', b'T', b'E', b'?'][usize::from(v) % 4]);
            b'Z'
        }
        10 => {
            b.extend_from_slice(&[0, 0, 0]);
            b'G'
        }
        11 => b'I',
        _ => b's',
    };
    (tag, b)
}

fuzz_target!(|data: &[u8]| {
    let mut stmts = ClientStatements::new(4);
    let mut server = ServerStatements::default();
    let log = Invalidations::default();
    let mut t = Tracker::default();
    let mut sent = 0usize;
    for step in data.chunks_exact(3) {
        let (dir, k, v) = (step[0], step[1], step[2]);
        let mut cx = Ctx::new(&mut stmts, &mut server, 3);
        cx.log = Some(&log);
        let flow = if dir % 2 == 0 {
            let (tag, body) = client_message(k, v);
            let flow = t.client(tag, &body, Some(&mut cx), None);
            if matches!(tag, b'Q' | b'S') && flow != Flow::Drop {
                sent += 1;
            }
            flow
        } else {
            let (tag, body) = server_message(k, v);
            t.server(tag, &body, true, Some(&mut cx)).0
        };
        match &flow {
            Flow::Replace(b) | Flow::Insert(b) | Flow::StopAfter(b) => {
                assert!(whole_messages(b), "not whole messages: {b:?}")
            }
            _ => {}
        }
        if let Some(due) = t.due() {
            assert!(whole_messages(&due), "pgmux's own answers are not whole messages: {due:?}");
        }
        if let Some(again) = t.take_rerun() {
            assert!(whole_messages(&again.answer));
            if let Some(resend) = again.resend {
                assert!(whole_messages(&resend));
            }
        }
        let _ = (t.take_sync(), t.take_resume());
        if dir == 255 {
            log.all();
        }
        assert!(t.flight.pending <= sent, "{} answers outstanding for {sent} requests", t.flight.pending);
    }
});
