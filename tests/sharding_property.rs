//! A randomized workload through pgmux over 2 and over 3 real shards and,
//! statement for statement, against one unsharded database: single and
//! multi-row INSERTs, UPDATEs by key, of the key (rows move) and without a
//! key, DELETEs, COPY; after every step the same answers (rows, counts,
//! error codes) and the same reads — every row, aggregates merged across
//! shards (`avg`, `sum`, `count`, `min`/`max`, `GROUP BY` with `HAVING`,
//! `DISTINCT`), a keyed read. `PGMUX_PROPERTY_STEPS` sets the steps per
//! shard count (default 600); the seed is printed and `PGMUX_PROPERTY_SEED`
//! replays one (`PGMUX_PROPERTY_TRACE` prints each step).

mod support;

use pgmux_testkit::{free_port, Cluster, ClusterSpec, HbaMethod, Role};
use support::{code, APP};
use tokio_postgres::{Client, SimpleQueryMessage};

const SCHEMA: &str = "CREATE TABLE t (id bigint PRIMARY KEY, g int, v numeric, s text)";

fn cluster() -> Cluster {
    let spec = ClusterSpec {
        extra_primaries: 2,
        roles: vec![Role::new(APP.0, APP.1, HbaMethod::Scram)],
        databases: vec!["p2".into(), "p3".into(), "ref2".into(), "ref3".into()],
        extra_conf: vec!["max_prepared_transactions = 20".into()],
        ..ClusterSpec::default()
    };
    let c = Cluster::start(&spec).expect("three primaries");
    for node in [&c.primary, &c.extra_primaries[0], &c.extra_primaries[1]] {
        for db in ["p2", "p3", "ref2", "ref3"] {
            c.psql(node, db, SCHEMA).unwrap();
            c.psql(node, db, &format!("GRANT ALL ON t TO {}", APP.0)).unwrap();
        }
    }
    c
}

fn config(c: &Cluster) -> String {
    let nodes = [&c.primary, &c.extra_primaries[0], &c.extra_primaries[1]];
    let db = |name: &str, n: usize| {
        let shards: Vec<String> = (0..n)
            .map(|i| format!("{{ name = \"s{i}\", primary = \"{}\", dbname = \"{name}\" }}", nodes[i].addr()))
            .collect();
        format!(
            "\n[databases.{name}]\nshards = [{}]\ntables = [{{ name = \"t\", key = \"id\", map = \"by_id\" }}]\n\
             allow_cross_shard_writes = true\ntwo_phase_commit = true\n\n[databases.{name}.maps.by_id]\n\
             kind = \"hash\"\ntype = \"int8\"\n\n[databases.ref{n}]\nprimary = \"{}\"\n",
            shards.join(", "),
            nodes[0].addr()
        )
    };
    format!(
        "[pgmux]\nlisten = \"127.0.0.1:{}\"\nlog_level = \"warn\"\n\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n{}{}",
        free_port().unwrap(),
        APP.0,
        APP.1,
        db("p2", 2),
        db("p3", 3)
    )
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// What a statement answered: its rows and command tags' counts, or its
/// error's SQLSTATE.
async fn outcome(c: &Client, sql: &str) -> Result<(Vec<Vec<Option<String>>>, Vec<u64>), String> {
    let msgs = c.simple_query(sql).await.map_err(|e| code(&e))?;
    let mut out = (Vec::new(), Vec::new());
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => out.0.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            SimpleQueryMessage::CommandComplete(n) => out.1.push(n),
            _ => {}
        }
    }
    Ok(out)
}

async fn copy(c: &Client, data: &str) -> Result<u64, String> {
    use futures_util::SinkExt;
    let sink = c.copy_in("COPY t (id, g, v, s) FROM STDIN").await.map_err(|e| code(&e))?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data.to_string())).await.map_err(|e| code(&e))?;
    sink.finish().await.map_err(|e| code(&e))
}

fn row(r: &mut Rng) -> (u64, u64, String, String) {
    let id = 1 + r.below(400);
    (id, r.below(6), format!("{}.{}", r.below(1000), r.below(100)), format!("s{}", r.below(50)))
}

/// One random write.
fn write(r: &mut Rng) -> String {
    let (id, g, v, s) = row(r);
    match r.below(9) {
        0 | 1 => format!("INSERT INTO t VALUES ({id}, {g}, {v}, '{s}')"),
        2 | 3 => {
            let rows: Vec<String> = (0..2 + r.below(4))
                .map(|_| {
                    let (id, g, v, s) = row(r);
                    format!("({id}, {g}, {v}, '{s}')")
                })
                .collect();
            format!("INSERT INTO t (id, g, v, s) VALUES {}", rows.join(", "))
        }
        4 => format!("UPDATE t SET v = v + 1, s = '{s}' WHERE id = {id}"),
        5 => format!("UPDATE t SET id = {} WHERE id = {id}", 1 + r.below(400)),
        6 => format!("UPDATE t SET g = g + 1 WHERE g = {g}"),
        7 => format!("DELETE FROM t WHERE id = {id}"),
        _ => format!("DELETE FROM t WHERE g = {g} AND v > {v}"),
    }
}

/// The reads compared after every step.
const READS: [&str; 6] = [
    "SELECT id, g, v, s FROM t ORDER BY id",
    "SELECT count(*), sum(v), avg(v), min(s COLLATE \"C\"), max(id), avg(g) FROM t",
    "SELECT g, count(*), avg(v), max(v) FROM t GROUP BY g HAVING count(*) > 1 ORDER BY g",
    "SELECT DISTINCT g FROM t ORDER BY g",
    "SELECT g % 3, count(DISTINCT s), count(*), sum(v) FROM t GROUP BY 1 ORDER BY 1",
    "SELECT s, sum(id) FROM t GROUP BY s ORDER BY sum(id) DESC, s COLLATE \"C\" LIMIT 5",
];

async fn workload(sharded: &Client, reference: &Client, steps: usize, seed: u64) {
    let mut r = Rng(seed | 1);
    for step in 0..steps {
        if std::env::var("PGMUX_PROPERTY_TRACE").is_ok() {
            eprintln!("step {step}");
        }
        if r.below(12) == 0 {
            let data: String = (0..1 + r.below(5))
                .map(|_| {
                    let (id, g, v, s) = row(&mut r);
                    format!("{id}\t{g}\t{v}\t{s}\n")
                })
                .collect();
            if std::env::var("PGMUX_PROPERTY_TRACE").is_ok() {
                eprintln!("  COPY {data:?}");
            }
            assert_eq!(copy(sharded, &data).await, copy(reference, &data).await, "step {step}: COPY {data:?}");
        } else {
            let sql = write(&mut r);
            if std::env::var("PGMUX_PROPERTY_TRACE").is_ok() {
                eprintln!("  {sql}");
            }
            assert_eq!(
                outcome(sharded, &sql).await,
                outcome(reference, &sql).await,
                "step {step} (seed {seed}): {sql}"
            );
        }
        let key = format!("SELECT g, v, s FROM t WHERE id = {}", 1 + r.below(400));
        for sql in READS.iter().copied().chain([key.as_str()]) {
            assert_eq!(outcome(sharded, sql).await, outcome(reference, sql).await, "step {step} (seed {seed}): {sql}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workloads_match_one_database() {
    let steps = std::env::var("PGMUX_PROPERTY_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let seed = std::env::var("PGMUX_PROPERTY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    });
    eprintln!("PGMUX_PROPERTY_SEED={seed}");
    let c = cluster();
    let p = support::start_proxy(&config(&c)).await;
    let port = p.addr.port();
    let conn = |db: &'static str| async move { support::connect_str(&support::conn_str(port, APP.0, APP.1, db)).await };
    for (db, reference) in [("p2", "ref2"), ("p3", "ref3")] {
        let (sharded, reference) = (conn(db).await.unwrap(), conn(reference).await.unwrap());
        workload(&sharded, &reference, steps, seed).await;
    }
    p.stop().await;
}
