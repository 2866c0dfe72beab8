//! Shard key hashing (PostgreSQL `PARTITION BY HASH` compatible) per key
//! type: the cost pgmux adds to every keyed statement of a sharded table.

use criterion::{criterion_group, criterion_main, Criterion};
use pgmux::shard::hash::{hash_remainder, KeyValue};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let text16 = "customer-0012345";
    let text80 = "héllo wörld ✓ 日本語 🦀 — a somewhat longer tenant identifier string!";
    let cases = [
        ("hash_int2", KeyValue::Int2(-12345)),
        ("hash_int4", KeyValue::Int4(123_456_789)),
        ("hash_int8", KeyValue::Int8(-1_234_567_890_123)),
        ("hash_text_16B", KeyValue::Text(text16)),
        ("hash_text_80B", KeyValue::Text(text80)),
        ("hash_uuid", KeyValue::Uuid([0x5a; 16])),
    ];
    for (name, v) in cases {
        c.bench_function(name, |b| b.iter(|| hash_remainder(black_box(&v), black_box(7))));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
