//! Differential test against a real PostgreSQL 15 server started for the test.
//!
//! For each key type it loads >= 100,000 pseudo-random keys and checks, per key:
//! 1. the full 64-bit column hash (`hash<type>extended(k, HASH_PARTITION_SEED)`) equals `column_hash`;
//! 2. the partition PostgreSQL routes the row to in real `PARTITION BY HASH` tables with MODULUS 2, 3, 4 and 7
//!    equals `hash_remainder`;
//! 3. `satisfies_hash_partition(parent, 2147483647, our_remainder, k)` is true (row hash modulo a large prime).
//!
//! The server comes from the test harness (`pgmux-testkit`, initdb'd for this test).

use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt};
use pgmux::shard::hash::{column_hash, hash_remainder, KeyValue, HASH_PARTITION_SEED};
use pgmux_testkit::{Cluster, ClusterSpec};
use tokio_postgres::{Client, NoTls};

const KEYS_PER_TYPE: usize = 100_000;
const MODULI: [u64; 4] = [2, 3, 4, 7];
const BIG_MODULUS: u64 = 2_147_483_647;

/// SplitMix64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Key {
    I2(i16),
    I4(i32),
    I8(i64),
    Text(String),
    Uuid([u8; 16]),
}

impl Key {
    fn value(&self) -> KeyValue<'_> {
        match self {
            Key::I2(v) => KeyValue::Int2(*v),
            Key::I4(v) => KeyValue::Int4(*v),
            Key::I8(v) => KeyValue::Int8(*v),
            Key::Text(s) => KeyValue::Text(s),
            Key::Uuid(u) => KeyValue::Uuid(*u),
        }
    }

    /// PostgreSQL's output text for the value (what `k::text` returns).
    fn to_pg_text(&self) -> String {
        match self {
            Key::I2(v) => v.to_string(),
            Key::I4(v) => v.to_string(),
            Key::I8(v) => v.to_string(),
            Key::Text(s) => s.clone(),
            Key::Uuid(u) => {
                let mut s = String::with_capacity(36);
                for (i, b) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        s.push('-');
                    }
                    let _ = write!(s, "{b:02x}");
                }
                s
            }
        }
    }
}

fn random_char(rng: &mut Rng) -> char {
    loop {
        let c = match rng.below(100) {
            0..=49 => 0x20 + rng.below(0x5f) as u32, // printable ASCII (incl. backslash)
            50..=54 => [0x09, 0x0a, 0x0d, 0x01, 0x7f][rng.below(5) as usize], // COPY-escaped / control chars
            55..=69 => 0x80 + rng.below(0x780) as u32, // 2-byte UTF-8
            70..=84 => 0x800 + rng.below(0xf800) as u32, // 3-byte UTF-8 (surrogates filtered below)
            85..=94 => 0x10000 + rng.below(0x100000) as u32, // 4-byte UTF-8
            _ => 1 + rng.below(0x10ffff) as u32,     // anything but NUL
        };
        if let Some(ch) = char::from_u32(c) {
            return ch;
        }
    }
}

fn random_text(rng: &mut Rng) -> String {
    let len = match rng.below(100) {
        0..=4 => 0,
        5..=79 => rng.below(30),
        80..=97 => 30 + rng.below(100),
        _ => 130 + rng.below(600),
    };
    (0..len).map(|_| random_char(rng)).collect()
}

fn gen_keys(kind: &str, rng: &mut Rng) -> Vec<Key> {
    let mut keys = Vec::with_capacity(KEYS_PER_TYPE + 70_000);
    match kind {
        "int2" => {
            keys.extend((i16::MIN..=i16::MAX).map(Key::I2)); // every int2 value
            while keys.len() < KEYS_PER_TYPE {
                keys.push(Key::I2(rng.next() as i16));
            }
        }
        "int4" => {
            keys.extend([0, 1, -1, i32::MIN, i32::MAX, i32::MIN + 1, i32::MAX - 1].map(Key::I4));
            while keys.len() < KEYS_PER_TYPE {
                let v = if rng.below(4) == 0 { rng.below(20_001) as i32 - 10_000 } else { rng.next() as i32 };
                keys.push(Key::I4(v));
            }
        }
        "int8" => {
            let edges = [0, 1, -1, i64::MIN, i64::MAX, 1 << 31, -(1 << 31), 1 << 32, -(1 << 32), (1 << 32) - 1];
            keys.extend(edges.map(Key::I8));
            while keys.len() < KEYS_PER_TYPE {
                let v = match rng.below(4) {
                    0 => i64::from(rng.next() as i32),            // fits in int4
                    1 => (rng.below(1 << 36) as i64) - (1 << 35), // around the 32-bit boundary
                    _ => rng.next() as i64,
                };
                keys.push(Key::I8(v));
            }
        }
        "text" | "varchar" => {
            keys.push(Key::Text(String::new()));
            keys.push(Key::Text("\\.".into())); // COPY end-of-data marker look-alike
            while keys.len() < KEYS_PER_TYPE {
                keys.push(Key::Text(random_text(rng)));
            }
        }
        "uuid" => {
            keys.push(Key::Uuid([0; 16]));
            keys.push(Key::Uuid([0xff; 16]));
            while keys.len() < KEYS_PER_TYPE {
                let mut u = [0u8; 16];
                u[..8].copy_from_slice(&rng.next().to_le_bytes());
                u[8..].copy_from_slice(&rng.next().to_le_bytes());
                keys.push(Key::Uuid(u));
            }
        }
        other => panic!("unknown type {other}"),
    }
    keys
}

/// Escape a value for COPY's text format.
fn copy_escape(s: &str, out: &mut String) {
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

// ---------------------------------------------------------------- the comparison

async fn check_type(client: &Client, sql_type: &str, hash_fn: &str, keys: &[Key]) -> usize {
    let t = sql_type;
    client
        .batch_execute(&format!(
            "CREATE UNLOGGED TABLE src_{t} (id int4 NOT NULL, k {t} NOT NULL, r_big int4 NOT NULL);
             CREATE TABLE part_{t} (id int4 NOT NULL, k {t} NOT NULL) PARTITION BY HASH (k);
             CREATE UNLOGGED TABLE part_{t}_r0 PARTITION OF part_{t} FOR VALUES WITH (MODULUS 1, REMAINDER 0);"
        ))
        .await
        .expect("create tables");

    // Bulk load: id, key, and our remainder modulo a large prime.
    let sink = client.copy_in(&format!("COPY src_{t} (id, k, r_big) FROM STDIN")).await.expect("copy_in");
    pin_mut!(sink);
    let mut buf = String::new();
    for (id, key) in keys.iter().enumerate() {
        let _ = write!(buf, "{id}\t");
        copy_escape(&key.to_pg_text(), &mut buf);
        let _ = writeln!(buf, "\t{}", hash_remainder(&key.value(), BIG_MODULUS));
        if buf.len() > 1 << 20 {
            sink.send(Bytes::from(std::mem::take(&mut buf))).await.expect("copy send");
        }
    }
    sink.send(Bytes::from(buf)).await.expect("copy send");
    let loaded = sink.finish().await.expect("copy finish");
    assert_eq!(loaded as usize, keys.len());

    let mut mismatches: Vec<String> = Vec::new();

    // 1. Full 64-bit column hash and value round trip.
    let rows = client
        .query(&format!("SELECT id, k::text, {hash_fn}(k, {}) FROM src_{t}", HASH_PARTITION_SEED as i64), &[])
        .await
        .expect("hash query");
    assert_eq!(rows.len(), keys.len());
    for row in &rows {
        let key = &keys[row.get::<_, i32>(0) as usize];
        let (text, pg_hash): (String, i64) = (row.get(1), row.get(2));
        let ours = column_hash(&key.value(), HASH_PARTITION_SEED) as i64;
        if text != key.to_pg_text() || pg_hash != ours {
            mismatches.push(format!("{t} hash {key:?}: server {text:?} {pg_hash}, ours {ours}"));
        }
    }

    // 2. Real tuple routing for each modulus (parent re-partitioned per modulus).
    for m in MODULI {
        let mut ddl = format!(
            "DROP TABLE part_{t}; CREATE TABLE part_{t} (id int4 NOT NULL, k {t} NOT NULL) PARTITION BY HASH (k);"
        );
        for r in 0..m {
            let _ = write!(ddl, "CREATE UNLOGGED TABLE part_{t}_r{r} PARTITION OF part_{t} FOR VALUES WITH (MODULUS {m}, REMAINDER {r});");
        }
        let _ = write!(ddl, "INSERT INTO part_{t} SELECT id, k FROM src_{t};");
        client.batch_execute(&ddl).await.expect("partition + insert");
        let rows =
            client.query(&format!("SELECT id, tableoid::regclass::text FROM part_{t}"), &[]).await.expect("route");
        assert_eq!(rows.len(), keys.len());
        let prefix = format!("part_{t}_r");
        for row in &rows {
            let key = &keys[row.get::<_, i32>(0) as usize];
            let part: String = row.get(1);
            let pg_r: u64 = part.strip_prefix(&prefix).and_then(|r| r.parse().ok()).expect("partition name");
            let ours = hash_remainder(&key.value(), m);
            if pg_r != ours {
                mismatches.push(format!("{t} modulus {m} {key:?}: server remainder {pg_r}, ours {ours}"));
            }
        }
    }

    // 3. Row hash modulo a large prime, checked by the server's own constraint function.
    let bad: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM src_{t} WHERE NOT satisfies_hash_partition('part_{t}'::regclass, {BIG_MODULUS}, r_big, k)"
            ),
            &[],
        )
        .await
        .expect("satisfies_hash_partition")
        .get(0);
    if bad != 0 {
        mismatches.push(format!("{t}: {bad} rows fail satisfies_hash_partition(modulus {BIG_MODULUS})"));
    }

    assert!(
        mismatches.is_empty(),
        "{} mismatches for {t}; first ones:\n{}",
        mismatches.len(),
        mismatches.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    keys.len()
}

#[tokio::test(flavor = "current_thread")]
async fn matches_real_postgres_15() {
    let started = Instant::now();
    let cluster = Cluster::start(&ClusterSpec { databases: vec!["hashcheck".into()], ..ClusterSpec::default() })
        .expect("a PostgreSQL server");
    let conn = cluster.primary.conn_str("postgres", Cluster::superuser_password(), "hashcheck");
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let version: String = client.query_one("SHOW server_version", &[]).await.expect("version").get(0);
    assert!(version.starts_with("15."), "expected PostgreSQL 15, got {version}");
    let encoding: String = client.query_one("SHOW server_encoding", &[]).await.expect("encoding").get(0);
    assert_eq!(encoding, "UTF8");
    eprintln!("PostgreSQL {version} on 127.0.0.1:{} ready after {:?}", cluster.primary.port, started.elapsed());

    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let types = [
        ("int2", "hashint2extended"),
        ("int4", "hashint4extended"),
        ("int8", "hashint8extended"),
        ("text", "hashtextextended"),
        ("varchar", "hashtextextended"),
        ("uuid", "uuid_hash_extended"),
    ];
    let mut summary = Vec::new();
    for (sql_type, hash_fn) in types {
        let t0 = Instant::now();
        let keys = gen_keys(sql_type, &mut rng);
        let n = check_type(&client, sql_type, hash_fn, &keys).await;
        let line = format!(
            "{sql_type}: {n} keys matched (64-bit {hash_fn}, routing with MODULUS {MODULI:?}, \
             satisfies_hash_partition modulus {BIG_MODULUS}) in {:?}",
            t0.elapsed()
        );
        eprintln!("{line}");
        summary.push(line);
    }
    drop(client);
    drop(cluster);
    eprintln!("total {:?}\n{}", started.elapsed(), summary.join("\n"));
}
