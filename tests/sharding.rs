//! Sharding on 2 real shard primaries: rows land on the shard their key
//! hashes to (PostgreSQL's hash), keyed statements go to one shard (key
//! from literals, IN lists, INSERT VALUES, Bind parameters; hints and
//! `SET pgmux.shard`), list maps, transactions follow their first
//! statement, and reads without a key run on every shard with results
//! equal to the same query on one unsharded database.

mod support;

use pgmux::proxy::RunningProxy;
use pgmux::shard::hash::{hash_remainder, KeyValue};
use pgmux_testkit::{free_port, Cluster, ClusterSpec, HbaMethod, Role};
use support::{code, rows, scalar, text, APP};
use tokio_postgres::SimpleQueryMessage;

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text, score int, balance numeric);
     CREATE TABLE orders (id bigint, user_id bigint, amount numeric);
     CREATE TABLE events (region text, what text);
     CREATE TABLE countries (code text PRIMARY KEY, name text);
     CREATE TABLE tenants (tenant_id text PRIMARY KEY, name text);
     CREATE TABLE visits (day int, what text);
     INSERT INTO countries VALUES ('ch', 'Switzerland'), ('us', 'United States');";

fn cluster() -> Cluster {
    let spec = ClusterSpec {
        extra_primaries: 1,
        roles: vec![Role::new(APP.0, APP.1, HbaMethod::Scram)],
        databases: vec!["shop".into(), "ref".into()],
        ..ClusterSpec::default()
    };
    let c = Cluster::start(&spec).expect("two shard primaries");
    for node in [&c.primary, &c.extra_primaries[0]] {
        c.psql(node, "shop", SCHEMA).unwrap();
        c.psql(node, "shop", &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}", APP.0)).unwrap();
    }
    c.psql(&c.primary, "ref", SCHEMA).unwrap();
    c.psql(&c.primary, "ref", &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}", APP.0)).unwrap();
    c
}

/// The tests here each start their servers; one at a time, so that their
/// free ports cannot collide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn proxy(c: &Cluster) -> RunningProxy {
    support::start_proxy(&config(c)).await
}

fn config(c: &Cluster) -> String {
    format!(
        r#"[pgmux]
listen = "127.0.0.1:{port}"
log_level = "warn"
admin_users = ["{user}"]

[[users]]
name = "{user}"
password = "{pw}"

[databases.shop]
shards = [{{ name = "s0", primary = "{s0}" }}, {{ name = "s1", primary = "{s1}" }}]
tables = [
  {{ name = "users", key = "id", map = "by_user" }},
  {{ name = "orders", key = "user_id", map = "by_user" }},
  {{ name = "events", key = "region", map = "by_region" }},
  {{ name = "tenants", key = "tenant_id", map = "by_tenant" }},
  {{ name = "visits", key = "day", map = "by_day" }},
]
reference_tables = ["countries"]

[databases.shop.maps.by_user]
kind = "hash"
type = "int8"

[databases.shop.maps.by_region]
kind = "list"
type = "text"
lists = [{{ values = ["eu", "ch"], shard = "s0" }}, {{ values = ["us"], shard = "s1" }}]
default = "s0"

[databases.shop.maps.by_day]
kind = "range"
type = "int4"
ranges = [{{ to = 100, shard = "s0" }}, {{ from = 100, to = 200, shard = "s1" }}]

[databases.shop.maps.by_tenant]
kind = "directory"
type = "text"
backend = "{s0}"
user = "{user}"

[databases.ref]
primary = "{s0}"
"#,
        port = free_port().unwrap(),
        user = APP.0,
        pw = APP.1,
        s0 = c.primary.addr(),
        s1 = c.extra_primaries[0].addr(),
    )
}

async fn client(p: &RunningProxy, db: &str) -> tokio_postgres::Client {
    support::connect_str(&support::conn_str(p.addr.port(), APP.0, APP.1, db)).await.unwrap()
}

fn shard_of(id: i64) -> usize {
    hash_remainder(&KeyValue::Int8(id), 2) as usize
}

/// A value's bytes as the server sent them (binary format).
struct Raw(Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Raw, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }

    fn from_sql_null(_: &tokio_postgres::types::Type) -> Result<Raw, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

async fn extended_count(c: &tokio_postgres::Client) -> Result<(i64, i32, i64), String> {
    let sql = "SELECT count(*), min(score), max(id) FROM users WHERE score >= $1";
    let r = c.query_one(sql, &[&2i32]).await.map_err(|e| text(&e))?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// (bigint, text) rows of an extended-protocol query with one int4 parameter (3).
async fn extended_rows(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<(i64, String)>, String> {
    let rows = c.query(sql, &[&3i32]).await.map_err(|e| text(&e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// COPY `data` in through `sql`; the rows taken, or the error's text.
async fn copy_in(c: &tokio_postgres::Client, sql: &str, data: &str) -> Result<u64, String> {
    use futures_util::SinkExt;
    let sink = c.copy_in(sql).await.map_err(|e| text(&e))?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data.to_string())).await.map_err(|e| text(&e))?;
    sink.finish().await.map_err(|e| text(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_routing_and_scatter_gather() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c).await;
    let mut cl = client(&p, "shop").await;
    let reference = client(&p, "ref").await;
    let ports = [c.primary.port.to_string(), c.extra_primaries[0].port.to_string()];
    // Writes by key: each row on the shard its key hashes to.
    for id in 1..=200i64 {
        let sql = format!(
            "INSERT INTO users (id, name, score, balance) VALUES ({id}, 'user{id:03}', {}, {}.{:02})",
            id % 7,
            id * 3,
            id % 100
        );
        cl.simple_query(&sql).await.unwrap();
        reference.simple_query(&sql).await.unwrap();
    }
    for (i, node) in [&c.primary, &c.extra_primaries[0]].into_iter().enumerate() {
        let ids = c.psql(node, "shop", "SELECT string_agg(id::text, ',') FROM users").unwrap();
        for id in ids.split(',').filter(|s| !s.is_empty()) {
            assert_eq!(shard_of(id.parse().unwrap()), i, "user {id} on shard {i}");
        }
    }
    // Keyed reads: one shard, by literal, IN list on one shard, parameter.
    for id in [1i64, 2, 77, 150] {
        let port = scalar(&cl, &format!("SELECT inet_server_port() FROM users WHERE id = {id}")).await;
        assert_eq!(port, ports[shard_of(id)], "id {id}");
        let row = cl.query_one("SELECT name, inet_server_port()::text FROM users WHERE id = $1", &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("user{id:03}"));
        assert_eq!(row.get::<_, String>(1), ports[shard_of(id)]);
    }
    // Statements of one shape take their key from their own text, even
    // when a first one had the key's value twice.
    let (k0, k1) = ((1..).find(|&i| shard_of(i) == 0).unwrap(), (1..).find(|&i| shard_of(i) == 1).unwrap());
    for (score, id) in [(k0, k0), (k1, k0), (k0, k1), (k1, k1)] {
        let sql = format!("SELECT inet_server_port() FROM users WHERE score = {score} AND id = {id}");
        let got = rows(&cl, &sql).await;
        assert!(got.is_empty() || got[0][0].as_deref() == Some(ports[shard_of(id)].as_str()), "{sql}: {got:?}");
        let port =
            scalar(&cl, &format!("SELECT inet_server_port() FROM users WHERE id = {id} AND {score} = {score}")).await;
        assert_eq!(port, ports[shard_of(id)], "id {id}, score {score}");
    }
    // Co-located tables: orders follow their user.
    cl.simple_query("INSERT INTO orders (id, user_id, amount) VALUES (1, 77, 9.50)").await.unwrap();
    let joined = "SELECT u.name, o.amount FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 77";
    assert_eq!(rows(&cl, joined).await, vec![vec![Some("user077".into()), Some("9.50".into())]]);
    // Hints and the session setting.
    assert_eq!(scalar(&cl, "/* pgmux: shard=1 */ SELECT inet_server_port()").await, ports[1]);
    assert_eq!(scalar(&cl, "/* pgmux: key=77 */ SELECT inet_server_port()").await, ports[shard_of(77)]);
    cl.simple_query("SET pgmux.shard = 's1'").await.unwrap();
    assert_eq!(scalar(&cl, "SELECT inet_server_port()").await, ports[1]);
    cl.simple_query("SET pgmux.shard = 'auto'").await.unwrap();
    // List map.
    cl.simple_query("INSERT INTO events (region, what) VALUES ('us', 'signup')").await.unwrap();
    cl.simple_query("INSERT INTO events (region, what) VALUES ('fr', 'login')").await.unwrap();
    assert_eq!(c.psql(&c.extra_primaries[0], "shop", "SELECT string_agg(what, ',') FROM events").unwrap(), "signup");
    assert_eq!(c.psql(&c.primary, "shop", "SELECT string_agg(what, ',') FROM events").unwrap(), "login");
    // Range map: from inclusive, to exclusive; a gap is an error on write.
    for (day, shard) in [(-5, 0), (99, 0), (100, 1), (199, 1)] {
        let sql = format!("INSERT INTO visits (day, what) VALUES ({day}, 'v') RETURNING inet_server_port()");
        assert_eq!(scalar(&cl, &sql).await, ports[shard], "day {day}");
    }
    let e = cl.simple_query("INSERT INTO visits (day, what) VALUES (200, 'v')").await.unwrap_err();
    assert_eq!(code(&e), "23514", "{}", text(&e));
    // A transaction goes where its first statement goes, all of it.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query("INSERT INTO users (id, name, score, balance) VALUES (1001, 'late', 1, 0)").await.unwrap();
    assert_eq!(scalar(&cl, "SELECT inet_server_port()").await, ports[shard_of(1001)]);
    cl.simple_query("ROLLBACK").await.unwrap();
    // A statement for another shard cannot join a transaction: refused,
    // the transaction fails (nothing runs on the wrong shard).
    let (a, b) = ((1..).find(|&i| shard_of(i) == 0).unwrap(), (1..).find(|&i| shard_of(i) == 1).unwrap());
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("UPDATE users SET score = 100 WHERE id = {a}")).await.unwrap();
    let e = cl.simple_query(&format!("UPDATE users SET score = 100 WHERE id = {b}")).await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{}", text(&e));
    let e = cl.query_one("SELECT name FROM users WHERE id = $1", &[&b]).await.unwrap_err();
    assert_eq!(code(&e), "25P02", "{}", text(&e));
    cl.simple_query("COMMIT").await.unwrap();
    assert_eq!(scalar(&cl, &format!("SELECT score FROM users WHERE id = {a}")).await, (a % 7).to_string());
    // Pipelined extended-protocol transaction on one shard, keys in Binds.
    let tx = cl.transaction().await.unwrap();
    tx.execute("UPDATE users SET score = score + 1 WHERE id = $1", &[&a]).await.unwrap();
    let e = tx.execute("UPDATE users SET score = score + 1 WHERE id = $1", &[&b]).await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{}", text(&e));
    drop(tx);
    // Reference tables: reads on any shard, writes refused (they would
    // reach one shard only).
    assert_eq!(scalar(&cl, "SELECT name FROM countries WHERE code = 'ch'").await, "Switzerland");
    let e = cl.simple_query("UPDATE countries SET name = 'CH' WHERE code = 'ch'").await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{}", text(&e));
    // Tables neither sharded nor reference live on the first shard.
    c.psql(&c.primary, "shop", &format!("CREATE TABLE notes (n int); GRANT ALL ON notes TO {}", APP.0)).unwrap();
    cl.simple_query("INSERT INTO notes VALUES (1)").await.unwrap();
    assert_eq!(scalar(&cl, "SELECT inet_server_port() FROM notes").await, ports[0]);
    // Keys on several shards: those shards, merged.
    let (x, y) = ((1..).find(|&i| shard_of(i) == 0).unwrap(), (1..).find(|&i| shard_of(i) == 1).unwrap());
    let sql = format!("SELECT id, name FROM users WHERE id IN ({x}, {y}, 1) ORDER BY id");
    assert_eq!(rows(&cl, &sql).await, rows(&reference, &sql).await);
    // Scatter-gather equals one database with the same rows.
    for sql in [
        "SELECT count(*) FROM users",
        "SELECT count(*), sum(score), min(score), max(balance), sum(balance) FROM users",
        "SELECT id, name FROM users ORDER BY id LIMIT 10 OFFSET 5",
        "SELECT id FROM users WHERE score > 4 ORDER BY score DESC, id",
        "SELECT score, count(*), sum(id), max(name COLLATE \"C\") FROM users GROUP BY score ORDER BY score",
        "SELECT name FROM users ORDER BY name COLLATE \"C\" DESC LIMIT 3",
        // The shards' database collation is C: text without COLLATE too.
        "SELECT name, id FROM users ORDER BY name DESC, id LIMIT 7",
        "SELECT score, min(name), max(name) FROM users GROUP BY score ORDER BY score",
        "SELECT count(*) FROM users WHERE id > 1000",
        "SELECT avg(score), avg(balance), avg(id) FROM users",
        "SELECT avg(score) FROM users WHERE id > 1000",
        "SELECT score, avg(balance), count(*), avg(id::int2) FROM users GROUP BY score ORDER BY score",
        "SELECT DISTINCT score FROM users ORDER BY score",
        "SELECT score, count(*) FROM users GROUP BY score HAVING count(*) > 28 ORDER BY score",
        "SELECT score FROM users GROUP BY score HAVING sum(balance) >= 3000 AND NOT max(id) < 150 ORDER BY 1",
        "SELECT score, avg(balance) FROM users GROUP BY score HAVING min(id) = 1 OR 29 <> count(*) ORDER BY 1",
        "SELECT count(*), max(id) FROM users GROUP BY score % 3 ORDER BY score % 3",
        "SELECT score % 3, sum(id), avg(score) FROM users GROUP BY score % 3 ORDER BY 1 DESC",
        "SELECT DISTINCT score, id % 2 = 0 FROM users ORDER BY 1, 2 LIMIT 5 OFFSET 1",
        "SELECT DISTINCT ON (score) score, id FROM users ORDER BY score, id DESC",
        "SELECT DISTINCT ON (score) score, name FROM users ORDER BY score DESC, name COLLATE \"C\" LIMIT 3",
        "SELECT count(DISTINCT score) FROM users",
        "SELECT count(DISTINCT score), count(*), sum(id), min(name COLLATE \"C\") FROM users WHERE id > 1000",
        "SELECT id % 4, count(DISTINCT name), count(*), avg(balance) FROM users GROUP BY 1 ORDER BY 1",
        "SELECT score FROM users GROUP BY score HAVING count(DISTINCT id % 5) = 5 ORDER BY 1",
        "SELECT score, count(DISTINCT id % 3) FROM users GROUP BY score ORDER BY count(DISTINCT id % 3), score",
    ] {
        assert_eq!(rows(&cl, sql).await, rows(&reference, sql).await, "{sql}");
    }
    // The same over the extended protocol (binary results).
    assert_eq!(extended_count(&cl).await, extended_count(&reference).await);
    for sql in [
        "SELECT id, name FROM users WHERE score > $1 ORDER BY id DESC LIMIT 5 OFFSET 2",
        "SELECT id, name FROM users WHERE score = $1 ORDER BY name COLLATE \"C\"",
        "SELECT score::int8, max(name COLLATE \"C\") FROM users WHERE score <> $1 GROUP BY 1 ORDER BY 1",
    ] {
        assert_eq!(extended_rows(&cl, sql).await, extended_rows(&reference, sql).await, "{sql}");
    }
    let typed = cl.query_typed("SELECT count(*) FROM users", &[]).await.unwrap();
    assert_eq!(typed[0].get::<_, i64>(0), 200);
    // numeric sums and averages in binary: PostgreSQL's very bytes.
    for sql in [
        "SELECT sum(balance), avg(balance), avg(score) FROM users",
        "SELECT avg(balance), sum(balance) FROM users GROUP BY score ORDER BY score",
    ] {
        let raw = |rows: Vec<tokio_postgres::Row>| {
            rows.iter().map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i).0).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let got = raw(cl.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {}", text(&e))));
        assert_eq!(got, raw(reference.query(sql, &[]).await.unwrap()), "{sql}");
    }
    // COPY FROM STDIN: rows split by key (text, then CSV with a header and
    // no column list), counted as one COPY.
    let mut tsv = String::new();
    for id in 300..400 {
        tsv.push_str(&format!("{id}\tcopied{id}\t{}\t{}\n", id % 7, id));
    }
    assert_eq!(copy_in(&cl, "COPY users (id, name, score, balance) FROM STDIN", &tsv).await, Ok(100));
    let mut csv = String::from("id,name,score,balance\n");
    for id in 400..450 {
        csv.push_str(&format!("{id},\"csv, {id}\",{},{id}.5\n", id % 7));
    }
    assert_eq!(copy_in(&cl, "COPY users FROM STDIN WITH (FORMAT csv, HEADER true)", &csv).await, Ok(50));
    for (i, node) in [&c.primary, &c.extra_primaries[0]].into_iter().enumerate() {
        let ids = c.psql(node, "shop", "SELECT string_agg(id::text, ',') FROM users WHERE id >= 300").unwrap();
        for id in ids.split(',').filter(|s| !s.is_empty()) {
            assert_eq!(shard_of(id.parse().unwrap()), i, "copied user {id} on shard {i}");
        }
    }
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users WHERE id >= 300").await, "150");
    assert_eq!(scalar(&cl, "SELECT name FROM users WHERE id = 401").await, "csv, 401");
    // psql's \copy (simple query protocol).
    let port = p.addr.port().to_string();
    let out = std::process::Command::new("psql")
        .env("PGPASSWORD", APP.1)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", APP.0, "-d", "shop", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "\\copy users (id, name, score, balance) from stdin with (format csv)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all((450..460).map(|i| format!("{i},psql {i},1,1\n")).collect::<String>().as_bytes())?;
            }
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("COPY 10"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users WHERE id BETWEEN 450 AND 459").await, "10");
    reference
        .batch_execute("INSERT INTO users SELECT id, 'psql ' || id, 1, 1 FROM generate_series(450, 459) id")
        .await
        .unwrap();
    // A bad key fails the whole COPY on every shard.
    let bad = "500\tok\t1\t1\nnot-a-number\tbad\t1\t1\n";
    let e = copy_in(&cl, "COPY users (id, name, score, balance) FROM STDIN", bad).await.unwrap_err();
    assert!(e.starts_with("22P02"), "{e}");
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users WHERE id = 500").await, "0");
    reference
        .batch_execute("INSERT INTO users SELECT id, 'copied' || id, id % 7, id FROM generate_series(300, 399) id")
        .await
        .unwrap();
    reference
        .batch_execute("INSERT INTO users SELECT id, 'csv, ' || id, id % 7, id + 0.5 FROM generate_series(400, 449) id")
        .await
        .unwrap();
    // What cannot be merged exactly is refused, and the session goes on.
    for sql in [
        "SELECT avg(score::float8) FROM users",
        "SELECT sum(DISTINCT score) FROM users",
        "SELECT count(DISTINCT score), count(DISTINCT id) FROM users",
        "SELECT count(DISTINCT balance) FROM users",
        "SELECT score FROM users GROUP BY score HAVING max(name) > 'x'",
        "SELECT DISTINCT balance::float8 FROM users",
        "SELECT name FROM users ORDER BY name COLLATE \"und-x-icu\"",
        "SELECT min(name COLLATE \"und-x-icu\") FROM users",
        "UPDATE users SET score = 0",
    ] {
        let e = cl.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {}", text(&e));
    }
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users WHERE id = 5").await, "1");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_assigns_new_keys_and_follows_changes() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c).await;
    let q = proxy(&c).await;
    let cl = client(&p, "shop").await;
    let nodes = [&c.primary, &c.extra_primaries[0]];
    let ports = [c.primary.port.to_string(), c.extra_primaries[0].port.to_string()];
    // New keys go to the least-loaded shard: 20 tenants split 10/10.
    for i in 0..20 {
        cl.simple_query(&format!("INSERT INTO tenants (tenant_id, name) VALUES ('t{i}', 'tenant {i}')")).await.unwrap();
    }
    let on = |n: usize| c.psql(nodes[n], "shop", "SELECT count(*) FROM tenants").unwrap();
    assert_eq!((on(0), on(1)), ("10".to_string(), "10".to_string()));
    // Each key is where the directory says, and reads find it there.
    let dir = c
        .psql(&c.primary, "shop", "SELECT string_agg(key || '=' || shard, ',' ORDER BY key) FROM pgmux_directory")
        .unwrap();
    for entry in dir.split(',') {
        let (key, shard) = entry.split_once('=').unwrap();
        let i = usize::from(shard == "s1");
        let port = scalar(&cl, &format!("SELECT inet_server_port() FROM tenants WHERE tenant_id = '{key}'")).await;
        assert_eq!(port, ports[i], "{key}");
        let row = cl.query_one("SELECT name FROM tenants WHERE tenant_id = $1", &[&key]).await.unwrap();
        assert!(row.get::<_, String>(0).starts_with("tenant"));
    }
    // A key nobody inserted: no rows, no error.
    assert!(rows(&cl, "SELECT * FROM tenants WHERE tenant_id = 'nobody'").await.is_empty());
    // Two pgmux instances racing on one new key agree on its shard.
    let other = client(&q, "shop").await;
    let a = cl.simple_query("INSERT INTO tenants (tenant_id, name) VALUES ('race', 'a') ON CONFLICT DO NOTHING");
    let b = other.simple_query("INSERT INTO tenants (tenant_id, name) VALUES ('race', 'b') ON CONFLICT DO NOTHING");
    let (ra, rb) = tokio::join!(a, b);
    ra.unwrap();
    rb.unwrap();
    let total: i64 = (0..2)
        .map(|n| {
            c.psql(nodes[n], "shop", "SELECT count(*) FROM tenants WHERE tenant_id = 'race'")
                .unwrap()
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 1, "the race left rows on both shards");
    let via = |cl| async move { scalar(cl, "SELECT inet_server_port() FROM tenants WHERE tenant_id = 'race'").await };
    assert_eq!(via(&cl).await, via(&other).await);
    // allow_cross_shard_writes: a write without a key runs on every shard
    // (counts added up, RETURNING rows from each); INSERTs still need keys.
    let wide_cfg = config(&c).replace("reference_tables = ", "allow_cross_shard_writes = true\nreference_tables = ");
    let wide = support::start_proxy(&wide_cfg).await;
    let w = client(&wide, "shop").await;
    let msgs = w
        .simple_query("UPDATE tenants SET name = name || '!' WHERE tenant_id LIKE 't1%' RETURNING tenant_id")
        .await
        .unwrap();
    let returned = msgs.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).count();
    let updated = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!((returned, updated), (11, Some(11)), "t1 and t10..t19 over both shards");
    // INSERT ... SELECT: on the shard of its constant key; reading a
    // sharded table, refused.
    w.simple_query("INSERT INTO users SELECT 9999, 'x', 1, 1").await.unwrap();
    let e = w.simple_query("INSERT INTO users SELECT id + 10000, name, 1, 1 FROM users").await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{}", text(&e));
    wide.stop().await;
    // A change of the directory reaches every pgmux (LISTEN/NOTIFY).
    let from = c.psql(&c.primary, "shop", "SELECT shard FROM pgmux_directory WHERE key = 't0'").unwrap();
    let (src, dst, to) = if from == "s0" { (0, 1, "s1") } else { (1, 0, "s0") };
    c.psql(nodes[dst], "shop", "INSERT INTO tenants VALUES ('t0', 'tenant 0 moved')").unwrap();
    c.psql(nodes[src], "shop", "DELETE FROM tenants WHERE tenant_id = 't0'").unwrap();
    c.psql(&c.primary, "shop", &format!("UPDATE pgmux_directory SET shard = '{to}' WHERE key = 't0'")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for client in [&cl, &other] {
        loop {
            let got = rows(client, "SELECT name FROM tenants WHERE tenant_id = 't0'").await;
            if got == vec![vec![Some("tenant 0 moved".to_string())]] {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "directory change not seen: {got:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    // The admin console: SHOW SHARDS counts the directory's keys per
    // shard, SHARD MOVE moves one.
    let admin = client(&p, "pgmux").await;
    let shards = rows(&admin, "SHOW SHARDS").await;
    let tenants: Vec<_> = shards.iter().filter(|r| r[1].as_deref() == Some("by_tenant")).collect();
    assert_eq!(tenants.len(), 2, "{shards:?}");
    let keys: i64 = tenants.iter().map(|r| r[7].as_deref().unwrap_or("x").parse::<i64>().unwrap()).sum();
    assert_eq!(keys, 21, "t0..t19 and race");
    let from = c.psql(&c.primary, "shop", "SELECT shard FROM pgmux_directory WHERE key = 't5'").unwrap();
    let (dst, to) = if from == "s0" { (1, "s1") } else { (0, "s0") };
    let moved = rows(&admin, &format!("SHARD MOVE shop by_tenant 't5' TO {to} GRACE 50")).await;
    assert_eq!(moved, vec![vec![Some("1".to_string())]]);
    assert_eq!(scalar(&cl, "SELECT inet_server_port() FROM tenants WHERE tenant_id = 't5'").await, ports[dst]);
    let e = admin.simple_query("SHARD MOVE shop by_tenant 't5' TO s9").await.unwrap_err();
    assert_eq!(code(&e), "22023", "{}", text(&e));
    let e = admin.simple_query("FROBNICATE").await.unwrap_err();
    assert_eq!(code(&e), "42601", "{}", text(&e));
    // The directory cache's hits and misses reach the metrics.
    let metrics = String::from_utf8(p.proxy.render_metrics()).unwrap();
    let count = |result: &str| -> f64 {
        let series = format!("pgmux_directory_cache_total{{database=\"shop\",map=\"by_tenant\",result=\"{result}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(series.as_str())?.parse().ok()).unwrap_or(0.0)
    };
    assert!(count("hit") > 0.0 && count("miss") > 0.0, "{metrics}");
    p.stop().await;
    q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_key_under_write_load_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c).await;
    let nodes = [&c.primary, &c.extra_primaries[0]];
    let cl = client(&p, "shop").await;
    cl.simple_query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'row 0')").await.unwrap();
    let from = c.psql(&c.primary, "shop", "SELECT shard FROM pgmux_directory WHERE key = 'acme'").unwrap();
    let (src, dst, to) = if from == "s0" { (0, 1, "s1") } else { (1, 0, "s0") };
    // A writer inserts rows of the key while it moves (tenant_id is the
    // key; rows are told apart by name).
    let writer = client(&p, "shop").await;
    c.psql(nodes[0], "shop", "ALTER TABLE tenants DROP CONSTRAINT tenants_pkey").unwrap();
    c.psql(nodes[1], "shop", "ALTER TABLE tenants DROP CONSTRAINT tenants_pkey").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let load = tokio::spawn(async move {
        let mut ok = 1u64;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            let sql = format!("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'row {ok}')");
            writer.simple_query(&sql).await.unwrap_or_else(|e| panic!("a write failed during the move: {}", text(&e)));
            ok += 1;
        }
        ok
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let config = p.proxy.config();
    let req = pgmux::shard::mover::MoveRequest {
        database: "shop".into(),
        map: "by_tenant".into(),
        key: "acme".into(),
        to: to.into(),
        grace: std::time::Duration::from_millis(200),
    };
    let moved = pgmux::shard::mover::move_key(&config, &req).await.unwrap();
    assert!(moved > 0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = load.await.unwrap();
    let count = |n: usize| c.psql(nodes[n], "shop", "SELECT count(*) FROM tenants WHERE tenant_id = 'acme'").unwrap();
    assert_eq!(count(src), "0", "rows left on the source shard");
    assert_eq!(count(dst), written.to_string(), "rows lost or duplicated");
    let distinct =
        c.psql(nodes[dst], "shop", "SELECT count(DISTINCT name) FROM tenants WHERE tenant_id = 'acme'").unwrap();
    assert_eq!(distinct, written.to_string());
    assert_eq!(
        scalar(&cl, "SELECT count(*) FROM tenants WHERE tenant_id = 'acme'").await,
        written.to_string(),
        "pgmux reads the key on its new shard"
    );

    // A move killed between its copy and its delete leaves the rows on
    // both shards and the key marked moving; running it again finishes it
    // without doubling a row.
    let from = c.psql(nodes[dst], "shop", "SELECT count(*) FROM tenants WHERE tenant_id = 'acme'").unwrap();
    let rows = c
        .psql(
            nodes[dst],
            "shop",
            "SELECT string_agg(format('(%L, %L)', tenant_id, name), ',') FROM tenants WHERE tenant_id = 'acme'",
        )
        .unwrap();
    c.psql(nodes[src], "shop", &format!("INSERT INTO tenants (tenant_id, name) VALUES {rows}")).unwrap();
    c.psql(&c.primary, "shop", "UPDATE pgmux_directory SET moving = true WHERE key = 'acme'").unwrap();
    let back = pgmux::shard::mover::MoveRequest { to: if to == "s0" { "s1" } else { "s0" }.into(), ..req };
    // The directory still names the new shard: moving back is the rerun
    // of a move to the old one that died after copying.
    let moved = pgmux::shard::mover::move_key(&config, &back).await.unwrap();
    assert_eq!(moved.to_string(), from);
    assert_eq!(count(dst), "0");
    assert_eq!(count(src), written.to_string(), "rows doubled by the rerun");
    p.stop().await;
}

/// Batches sent behind one another (pipelined) that run on one shard go
/// on together on its connection; the answers are each batch's, in order,
/// errors included, whichever shards the batches go to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_for_one_shard_go_on_together() {
    use std::sync::atomic::Ordering::Relaxed;
    use support::raw::{self, Raw};
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c).await;
    let (cl, reference) = (client(&p, "shop").await, client(&p, "ref").await);
    let rows: Vec<String> = (1..=100).map(|id| format!("({id}, 'user{id}', {}, {id})", id % 7)).collect();
    for row in &rows {
        let sql = format!("INSERT INTO users VALUES {row}");
        for cl in [&cl, &reference] {
            cl.simple_query(&sql).await.unwrap_or_else(|e| panic!("{}", text(&e)));
        }
    }
    let on = |s: usize| (1..=100i64).filter(move |&i| shard_of(i) == s);
    let sh = p.proxy.sharding("shop").unwrap();
    let checkouts = |i: usize| sh.backends[i].primary.stats.checkouts.load(Relaxed);

    // 20 keyed Queries for shard 0 in one write (an INSERT and a failing
    // one among them): one checkout, each answer in its place.
    let mut r = Raw::login(p.addr.port(), APP.0, APP.1, "shop", &[]).await;
    let ids: Vec<i64> = on(0).take(20).collect();
    let mut b = bytes::BytesMut::new();
    for (n, id) in ids.iter().enumerate() {
        let sql = match n {
            7 => format!("SELECT 1 / (id - id) FROM users WHERE id = {id}"),
            11 => format!("INSERT INTO users (id, name) VALUES ({}, 'new') RETURNING id", id + 1000),
            _ => format!("SELECT id FROM users WHERE id = {id}"),
        };
        pgmux::protocol::messages::query(&mut b, &sql);
    }
    let before = checkouts(0);
    r.send(&b).await;
    for (n, id) in ids.iter().enumerate() {
        let (rows, errors) = raw::rows_and_errors(&r.until_ready().await);
        match n {
            7 => assert!(errors.len() == 1 && errors[0].starts_with("22012"), "{errors:?}"),
            11 => assert_eq!(rows, [(id + 1000).to_string()]),
            _ => assert_eq!((rows, errors), (vec![id.to_string()], vec![])),
        }
    }
    assert!(checkouts(0) - before <= 2, "{} checkouts for 20 pipelined batches", checkouts(0) - before);
    assert_eq!(
        c.psql(&c.primary, "shop", &format!("SELECT count(*) FROM users WHERE id = {}", ids[11] + 1000)).unwrap(),
        "1"
    );
    reference.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'new')", ids[11] + 1000)).await.unwrap();

    // Extended batches alternating between the shards (unnamed and named
    // statements): every answer the one database gives.
    let mixed: Vec<i64> = on(0).zip(on(1)).flat_map(|(a, b)| [a, b]).take(30).collect();
    let mut b = bytes::BytesMut::new();
    raw::parse(&mut b, "byid", "SELECT name FROM users WHERE id = $1");
    raw::sync(&mut b);
    for (n, id) in mixed.iter().enumerate() {
        let id = id.to_string();
        if n % 3 == 0 {
            raw::parse(&mut b, "", "SELECT name FROM users WHERE id = $1");
            raw::bind(&mut b, "", "", &[Some(&id)]);
        } else {
            raw::bind(&mut b, "", "byid", &[Some(&id)]);
        }
        raw::execute(&mut b, "", 0);
        raw::sync(&mut b);
    }
    r.send(&b).await;
    r.until_ready().await;
    for id in &mixed {
        let (rows, errors) = raw::rows_and_errors(&r.until_ready().await);
        assert_eq!((rows, errors), (vec![format!("user{id}")], vec![]), "id {id}");
    }

    // One batch (one Sync) of reads for both shards: each on its shard,
    // the rows in the batch's order; of writes, refused (it would be a
    // transaction across shards), nothing written.
    let mut b = bytes::BytesMut::new();
    for id in &mixed[..6] {
        raw::bind(&mut b, "", "byid", &[Some(&id.to_string())]);
        raw::execute(&mut b, "", 0);
    }
    raw::sync(&mut b);
    r.send(&b).await;
    let msgs = r.until_ready().await;
    let want: Vec<String> = mixed[..6].iter().map(|id| format!("user{id}")).collect();
    assert_eq!(raw::rows_and_errors(&msgs), (want, vec![]));
    assert_eq!(msgs.iter().map(|m| m.0 as char).collect::<String>(), "2DC".repeat(6) + "Z");
    let mut b = bytes::BytesMut::new();
    raw::parse(&mut b, "", "INSERT INTO users (id, name) VALUES ($1, 'pipelined')");
    for s in [0, 1] {
        let id = (5000..).find(|&i| shard_of(i) == s).unwrap();
        raw::bind(&mut b, "", "", &[Some(&id.to_string())]);
        raw::execute(&mut b, "", 0);
    }
    raw::sync(&mut b);
    r.send(&b).await;
    let (_, errors) = raw::rows_and_errors(&r.until_ready().await);
    assert!(errors.len() == 1 && errors[0].starts_with("0A000"), "{errors:?}");
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users WHERE name = 'pipelined'").await, "0");

    // tokio-postgres pipelines concurrent queries on one client.
    let queries = (1..=100i64).map(|id| {
        let cl = &cl;
        async move { cl.query_one("SELECT name, score FROM users WHERE id = $1", &[&id]).await }
    });
    let got = futures_util::future::join_all(queries).await;
    for (id, row) in (1..=100i64).zip(got) {
        let row = row.unwrap_or_else(|e| panic!("{}", text(&e)));
        let want = reference.query_one("SELECT name, score FROM users WHERE id = $1", &[&id]).await.unwrap();
        assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), (want.get(0), want.get(1)));
    }
    p.stop().await;
}
