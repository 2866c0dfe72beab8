//! Micro-benchmarks of what pgmux reads from a statement's text without a
//! parse (`sql::marks`, the one pass every relayed statement gets;
//! `sql::scan`, `sql::effects`) — what the session asks of every
//! Query in transaction mode (session effects, transaction end, savepoint,
//! leading command) and the router's shape key — on a plain SELECT, a SET
//! and a 20-line query.
//!
//! Run: `cargo bench --bench scan`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use pgmux::sql::marks::Marks;
use pgmux::sql::{effects, scan};

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213";
const SET: &str = "SET search_path TO tenant_42, public";
const LARGE: &str = "WITH recent AS (
    SELECT o.id, o.customer_id, o.total, o.created_at
      FROM orders o
     WHERE o.created_at > now() - interval '7 days'
       AND o.status IN ('paid', 'shipped')
), ranked AS (
    SELECT r.*, row_number() OVER (PARTITION BY r.customer_id ORDER BY r.total DESC) AS rn
      FROM recent r
)
SELECT c.id, c.name, c.email, k.total, k.created_at
  FROM customers c
  JOIN ranked k ON k.customer_id = c.id
 WHERE k.rn <= 3
   AND c.region = 'eu-west' -- the region of this shard
   AND c.email NOT LIKE '%@example.com'
   /* a comment with 'quotes' and ; inside */
 ORDER BY k.total DESC, c.id
 LIMIT 50
OFFSET 0";

fn bench_scan(c: &mut Criterion) {
    for (name, sql) in [("plain_select", SELECT), ("set", SET), ("20_lines", LARGE)] {
        c.bench_function(&format!("scan/marks/{name}"), |b| b.iter(|| Marks::of(black_box(sql).as_bytes())));
        c.bench_function(&format!("scan/session/{name}"), |b| {
            b.iter(|| {
                let sql = black_box(sql);
                (
                    effects::session_effects(sql),
                    scan::transaction_end(sql),
                    scan::is_savepoint(sql),
                    scan::leading_command(sql),
                )
            })
        });
        c.bench_function(&format!("scan/shape/{name}"), |b| b.iter(|| scan::literal_shape(black_box(sql))));
    }
}

criterion_group!(benches, bench_scan);
criterion_main!(benches);
