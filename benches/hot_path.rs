//! Micro-benchmarks of the per-message hot path: frame scanning, and the
//! prepared-statement work done for each Bind in transaction mode
//! (statement-name hashing, client lookup, rename).
//!
//! Run: `cargo bench --bench hot_path`

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

use pgmux::protocol::frame::{Flow, Relay, MAX_MESSAGE_LEN};
use pgmux::protocol::prepared::{statement_hash, ClientStatements, ServerStatements};
use pgmux::protocol::tracker::Ctx;
use pgmux::protocol::tracker::Tracker;

const QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

fn msg(b: &mut BytesMut, tag: u8, body: &[u8]) {
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
}

fn parse_body(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v.extend_from_slice(QUERY.as_bytes());
    v.extend_from_slice(&[0, 0, 1, 0, 0, 0, 23]);
    v
}

fn bind_body(stmt: &str) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(stmt.as_bytes());
    v.push(0);
    v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 5, b'1', b'2', b'3', b'4', b'5', 0, 0]);
    v
}

fn bench_statements(c: &mut Criterion) {
    let query_and_types = &parse_body("")[1..];
    c.bench_function("statement_hash", |b| b.iter(|| statement_hash(black_box(query_and_types))));

    // What each statement text is checked for in transaction mode (SET,
    // RESET, pinning state): nothing, in the common case.
    let select = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";
    c.bench_function("session_effects_plain_select", |b| {
        b.iter(|| pgmux::sql::effects::session_effects(black_box(select)))
    });
    c.bench_function("session_effects_three_checks", |b| {
        b.iter(|| {
            let sql = black_box(select);
            (
                pgmux::sql::effects::setting_changes(sql),
                pgmux::sql::effects::needs_full_reset(sql),
                pgmux::sql::effects::pins_session(sql),
            )
        })
    });

    // A client with 50 statements; the server has them all: a Bind is
    // looked up, renamed, and queued.
    let mut stmts = ClientStatements::new(1000);
    let mut server = ServerStatements::default();
    let mut tracker = Tracker::default();
    for i in 0..50 {
        let mut cx = Ctx::new(&mut stmts, &mut server, 500);
        let _ = tracker.client(b'P', &parse_body(&format!("P_{i}")), Some(&mut cx), None);
        let _ = tracker.server(b'1', b"", true, Some(&mut cx));
    }
    let bind = bind_body("P_17");
    c.bench_function("bind_lookup_and_rename", |b| {
        b.iter(|| {
            let mut cx = Ctx::new(&mut stmts, &mut server, 500);
            let flow = tracker.client(b'B', black_box(&bind), Some(&mut cx), None);
            let _ = tracker.server(b'2', b"", true, Some(&mut cx));
            black_box(flow)
        })
    });
}

fn bench_relay(c: &mut Criterion) {
    // What a server sends for one pgbench -S transaction.
    let mut wire = BytesMut::new();
    msg(&mut wire, b'T', &[0; 30]);
    msg(&mut wire, b'D', &[0, 1, 0, 0, 0, 4, b'1', b'2', b'3', b'4']);
    msg(&mut wire, b'C', b"SELECT 1\0");
    msg(&mut wire, b'Z', b"I");
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("scan_select_reply", |b| {
        let mut relay = Relay::default();
        b.iter(|| {
            let mut status = 0u8;
            let scan = relay
                .scan(
                    black_box(&wire),
                    MAX_MESSAGE_LEN,
                    |t| t == b'Z' || t == b'S',
                    |t, body| {
                        if t == b'Z' {
                            status = body[0];
                        }
                        Flow::Forward
                    },
                )
                .unwrap_or_default();
            black_box((scan.consumed, status))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_statements, bench_relay);
criterion_main!(benches);
