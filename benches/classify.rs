//! Classifier benchmarks: cached and uncached classification of a simple
//! and a 20-line query. Run: `cargo bench --bench classify`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use pgmux::sql::classify::Classifier;

const SIMPLE: &str = "SELECT id, name FROM users WHERE id = $1";

const LARGE: &str = "WITH recent AS (
    SELECT o.customer_id, sum(o.total) AS spent, count(*) AS n
    FROM orders o
    WHERE o.created_at > now() - interval '30 days'
      AND o.status IN ('paid', 'shipped', 'delivered')
    GROUP BY o.customer_id
), top AS (
    SELECT customer_id FROM recent WHERE spent > 1000 ORDER BY spent DESC LIMIT 100
)
SELECT c.id, c.name, lower(c.email) AS email, r.spent, r.n,
       coalesce(a.city, 'unknown') AS city,
       (SELECT max(p.created_at) FROM payments p WHERE p.customer_id = c.id) AS last_payment
FROM customers c
JOIN recent r ON r.customer_id = c.id
LEFT JOIN addresses a ON a.customer_id = c.id AND a.is_primary
WHERE c.id IN (SELECT customer_id FROM top)
  AND NOT EXISTS (SELECT 1 FROM bans b WHERE b.customer_id = c.id)
  AND c.region = $1
ORDER BY r.spent DESC, c.name
LIMIT 50 OFFSET $2";

fn benches(c: &mut Criterion) {
    let cached = Classifier::new(1024, &[], false);
    let _ = cached.classify(SIMPLE);
    c.bench_function("classify/cached_simple", |b| b.iter(|| cached.classify(black_box(SIMPLE))));

    // No cache: every call parses.
    let uncached = Classifier::new(0, &[], false);
    c.bench_function("classify/uncached_simple", |b| b.iter(|| uncached.classify(black_box(SIMPLE))));
    c.bench_function("classify/uncached_20_lines", |b| b.iter(|| uncached.classify(black_box(LARGE))));

    // With a cache but a fresh text each time (miss + insert + eviction).
    let churn = Classifier::new(256, &[], false);
    let n = AtomicU64::new(0);
    c.bench_function("classify/miss_simple_with_cache", |b| {
        b.iter(|| {
            let sql = format!("SELECT id FROM users WHERE id = {}", n.fetch_add(1, Ordering::Relaxed));
            churn.classify(black_box(&sql))
        })
    });
}

criterion_group!(classify_benches, benches);
criterion_main!(classify_benches);
