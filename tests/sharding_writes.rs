//! Multi-row INSERTs into sharded tables over 2 real shard primaries,
//! compared with one unsharded database holding the same rows: the rows
//! are cut per shard and land on their key's shard — over the simple
//! protocol and every extended form (unnamed in one batch, a named
//! statement, Parse/Describe/Sync then Bind/Execute/Sync), `$n` renumbered
//! per shard — with `RETURNING` rows in VALUES order and the tag summed;
//! all or nothing with two-phase commit, inside a client's transaction or
//! on their own; directory keys assigned on the way; refused with 0A000
//! when writes may not span shards. COPY splits binary streams and ends
//! at `\.`. Schema changes run on every shard, all or none; an INSERT or
//! COPY without a column list finds its key from the catalog, read again
//! after a schema change.

mod support;

use bytes::BytesMut;
use pgmux::shard::hash::{hash_remainder, KeyValue};
use pgmux_testkit::{free_port, Cluster, ClusterSpec, HbaMethod, Role};
use support::raw::{self, Raw};
use support::{code, rows, text, APP};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::SimpleQueryMessage;

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text, score int);
     CREATE TABLE tenants (tenant_id text PRIMARY KEY, name text);";

fn cluster() -> Cluster {
    let spec = ClusterSpec {
        extra_primaries: 1,
        roles: vec![Role::new(APP.0, APP.1, HbaMethod::Scram)],
        databases: vec!["shop".into(), "ref".into()],
        extra_conf: vec!["max_prepared_transactions = 20".into()],
        ..ClusterSpec::default()
    };
    let c = Cluster::start(&spec).expect("two shard primaries");
    let grant = format!(
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO {0}; GRANT CREATE ON SCHEMA public TO {0}; \
         ALTER TABLE users OWNER TO {0}; ALTER TABLE tenants OWNER TO {0}",
        APP.0
    );
    for (node, db) in [(&c.primary, "shop"), (&c.extra_primaries[0], "shop"), (&c.primary, "ref")] {
        c.psql(node, db, SCHEMA).unwrap();
        c.psql(node, db, &grant).unwrap();
    }
    c
}

/// `shop`: writes may span shards, two-phase commit; `strict`: the same
/// shards, writes may not span them; `ref`: one database.
fn config(c: &Cluster) -> String {
    let db = |name: &str, cross: bool| {
        format!(
            r#"
[databases.{name}]
shards = [{{ name = "s0", primary = "{s0}", dbname = "shop" }}, {{ name = "s1", primary = "{s1}", dbname = "shop" }}]
tables = [
  {{ name = "users", key = "id", map = "by_id" }},
  {{ name = "tenants", key = "tenant_id", map = "by_tenant" }},
  {{ name = "moved", key = "k", map = "by_id" }},
  {{ name = "items", key = "id", map = "by_id" }},
]
allow_cross_shard_writes = {cross}
two_phase_commit = {cross}

[databases.{name}.maps.by_id]
kind = "hash"
type = "int8"

[databases.{name}.maps.by_tenant]
kind = "directory"
type = "text"
backend = "{s0}"
dbname = "shop"
user = "{user}"
"#,
            s0 = c.primary.addr(),
            s1 = c.extra_primaries[0].addr(),
            user = APP.0,
        )
    };
    format!(
        "[pgmux]\nlisten = \"127.0.0.1:{port}\"\nlog_level = \"warn\"\n\n[[users]]\nname = \"{user}\"\n\
         password = \"{pw}\"\n{a}{b}\n[databases.ref]\nprimary = \"{s0}\"\n",
        port = free_port().unwrap(),
        user = APP.0,
        pw = APP.1,
        a = db("shop", true),
        b = db("strict", false),
        s0 = c.primary.addr(),
    )
}

/// The shards and a pgmux in front of them.
async fn start() -> (Cluster, pgmux::proxy::RunningProxy) {
    let c = cluster();
    let p = support::start_proxy(&config(&c)).await;
    (c, p)
}

async fn connect(p: &pgmux::proxy::RunningProxy, db: &str) -> tokio_postgres::Client {
    support::connect_str(&support::conn_str(p.addr.port(), APP.0, APP.1, db)).await.unwrap()
}

fn shard_of(id: i64) -> usize {
    hash_remainder(&KeyValue::Int8(id), 2) as usize
}

/// Each shard's ids of `users`, read directly.
fn ids_on_shards(c: &Cluster) -> [Vec<i64>; 2] {
    let on = |node| {
        let s = c.psql(node, "shop", "SELECT string_agg(id::text, ',' ORDER BY id) FROM users").unwrap();
        s.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
    };
    [on(&c.primary), on(&c.extra_primaries[0])]
}

/// The rows and the CommandComplete count of a simple query.
async fn returned(cl: &tokio_postgres::Client, sql: &str) -> Result<(Vec<Vec<Option<String>>>, u64), String> {
    let msgs = cl.simple_query(sql).await.map_err(|e| format!("{} {}", code(&e), text(&e)))?;
    let mut out = (Vec::new(), 0);
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => out.0.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            SimpleQueryMessage::CommandComplete(n) => out.1 = n,
            _ => {}
        }
    }
    Ok(out)
}

/// `n` VALUES rows `($1, $2), ($3, $4), ...`.
fn placeholders(n: usize) -> String {
    (0..n).map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2)).collect::<Vec<_>>().join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_inserts_are_split_per_shard() {
    let (c, p) = start().await;
    let (cl, reference, strict) = (connect(&p, "shop").await, connect(&p, "ref").await, connect(&p, "strict").await);
    let both = |sql: String| {
        let (cl, reference) = (&cl, &reference);
        async move {
            let got = returned(cl, &sql).await;
            assert_eq!(got, returned(reference, &sql).await, "{sql}");
            got
        }
    };

    // Simple protocol: rows on their shards, RETURNING in VALUES order,
    // the tag summed; a comment and ON CONFLICT in the text are kept.
    let sql = "/* bulk */ INSERT INTO users (id, name, score) VALUES (1, 'a', 1), (2, 'b, (c)', 2), (3, 'c', 3), \
               (4, 'd', 4) ON CONFLICT (id) DO UPDATE SET name = excluded.name RETURNING id, name";
    let (got, n) = both(sql.into()).await.unwrap();
    assert_eq!(n, 4);
    assert_eq!(got.iter().map(|r| r[0].clone().unwrap()).collect::<Vec<_>>(), ["1", "2", "3", "4"]);
    let ids = ids_on_shards(&c);
    for (s, on) in ids.iter().enumerate() {
        assert!(on.iter().all(|&id| shard_of(id) == s), "shard {s}: {on:?}");
    }
    assert_eq!(ids[0].len() + ids[1].len(), 4);
    assert!(!ids[0].is_empty() && !ids[1].is_empty(), "the rows span both shards: {ids:?}");
    let (_, n) = both("INSERT INTO users (score, id, name) VALUES (5, 5, 'e'), (6, 6, 'f')".into()).await.unwrap();
    assert_eq!(n, 2);

    // Extended, Parse/Describe/Sync then Bind/Execute/Sync (a named
    // statement), run twice with other keys; binary parameters.
    let sql = format!("INSERT INTO users (id, name) VALUES {} RETURNING id, name", placeholders(3));
    let stmt = cl.prepare(&sql).await.unwrap();
    let ref_stmt = reference.prepare(&sql).await.unwrap();
    for base in [10i64, 20] {
        let names: Vec<String> = (0..3).map(|i| format!("n{}", base + i)).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let ids: Vec<i64> = (0..3).map(|i| base + i).collect();
        for i in 0..3 {
            params.push(&ids[i]);
            params.push(&names[i]);
        }
        let got = cl.query(&stmt, &params).await.unwrap_or_else(|e| panic!("{}", text(&e)));
        let want = reference.query(&ref_stmt, &params).await.unwrap();
        let pairs = |r: &[tokio_postgres::Row]| r.iter().map(|r| (r.get(0), r.get(1))).collect::<Vec<(i64, String)>>();
        assert_eq!(pairs(&got), pairs(&want));
    }
    // The same, without RETURNING: the count.
    let sql = format!("INSERT INTO users (id, name) VALUES {}", placeholders(2));
    for cl in [&cl, &reference] {
        assert_eq!(cl.execute(&sql, &[&30i64, &"x", &31i64, &"y"]).await.unwrap(), 2);
    }
    // Unnamed, in one batch (Parse/Bind/Describe/Execute/Sync), typed.
    let sql = "INSERT INTO users (id, score, name) VALUES ($1, $3, 'p'), ($2, $3, 'q') RETURNING id, score";
    for cl in [&cl, &reference] {
        let r = cl.query_typed(sql, &[(&40i64, Type::INT8), (&41i64, Type::INT8), (&7i32, Type::INT4)]).await;
        let r = r.unwrap_or_else(|e| panic!("{}", text(&e)));
        assert_eq!(r.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(), [40, 41]);
        assert!(r.iter().all(|r| r.get::<_, i32>(1) == 7));
    }
    // A named Parse in the batch that binds it, then the name alone.
    let mut r = Raw::login(p.addr.port(), APP.0, APP.1, "shop", &[]).await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "bulk", "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4)");
    raw::bind(&mut b, "", "bulk", &[Some("50"), Some("r"), Some("51"), Some("s")]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    raw::bind(&mut b, "", "bulk", &[Some("52"), Some("t"), Some("53"), None]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    r.send(&b).await;
    for _ in 0..2 {
        let msgs = r.until_ready().await;
        let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
        assert!(tags.starts_with(b"1") || tags.starts_with(b"2"), "{:?}", String::from_utf8_lossy(&tags));
        let complete = msgs.iter().find(|m| m.0 == b'C').map(|m| String::from_utf8_lossy(&m.1).to_string());
        assert_eq!(complete.as_deref(), Some("INSERT 0 2\0"), "{:?}", raw::rows_and_errors(&msgs));
    }
    // Describe of the statement and the portal in the batch: the client's
    // statement's parameters (all 4), then the RETURNING rows.
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4) RETURNING id");
    raw::describe_statement(&mut b, "");
    raw::bind(&mut b, "", "", &[Some("55"), Some("u"), Some("54"), Some("v")]);
    raw::describe_portal(&mut b, "");
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    r.send(&b).await;
    let msgs = r.until_ready().await;
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(String::from_utf8_lossy(&tags), "1tT2TDDCZ", "{:?}", raw::rows_and_errors(&msgs));
    assert_eq!(&msgs[1].1[..2], &[0, 4], "ParameterDescription of the whole statement");
    assert_eq!(raw::rows_and_errors(&msgs).0, ["55", "54"]);
    reference
        .execute(
            "INSERT INTO users (id, name) VALUES (50, 'r'), (51, 's'), (52, 't'), (53, NULL), (55, 'u'), (54, 'v')",
            &[],
        )
        .await
        .unwrap();

    // All or nothing: a duplicate key on one shard leaves no row anywhere.
    let before = ids_on_shards(&c);
    let (a, b) = ((60..).find(|&i| shard_of(i) == 0).unwrap(), (60..).find(|&i| shard_of(i) == 1).unwrap());
    let dup = *before[1].first().unwrap();
    let e = returned(&cl, &format!("INSERT INTO users (id, name) VALUES ({a}, 'x'), ({dup}, 'dup')")).await;
    assert!(e.is_err_and(|e| e.starts_with("23505")));
    assert_eq!(ids_on_shards(&c), before);
    // Inside a client's transaction: rolled back, then committed.
    let sql = format!("INSERT INTO users (id, name) VALUES ({a}, 'x'), ({b}, 'y')");
    cl.simple_query("BEGIN").await.unwrap();
    returned(&cl, &sql).await.unwrap();
    cl.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(ids_on_shards(&c), before);
    cl.simple_query("BEGIN").await.unwrap();
    assert_eq!(returned(&cl, &sql).await.unwrap().1, 2);
    let count = |cl| async move { returned(cl, "SELECT count(*) FROM users").await.unwrap().0[0][0].clone() };
    let want = count(&reference).await.unwrap().parse::<i64>().unwrap() + 2;
    assert_eq!(count(&cl).await, Some(want.to_string()), "a read across shards sees the transaction's rows");
    cl.simple_query("COMMIT").await.unwrap();
    reference.simple_query(&sql).await.unwrap();

    // INSERT ... SELECT: its rows made on the shard of the key the select
    // list gives as a constant or $n (ON CONFLICT too); else refused.
    let (k0, k1) = ((2000..).find(|&i| shard_of(i) == 0).unwrap(), (2000..).find(|&i| shard_of(i) == 1).unwrap());
    both(format!("INSERT INTO users (id, name, score) SELECT {k1}, 'sel', 1 RETURNING id, name")).await.unwrap();
    for cl in [&cl, &reference] {
        let sql = "INSERT INTO users (name, id) SELECT $2::text, $1::int8 WHERE true ON CONFLICT (id) DO UPDATE SET name = excluded.name";
        assert_eq!(cl.execute(sql, &[&k0, &"sel0"]).await.unwrap_or_else(|e| panic!("{}", text(&e))), 1);
        assert_eq!(cl.execute(sql, &[&k0, &"sel00"]).await.unwrap(), 1);
    }
    let ids = ids_on_shards(&c);
    assert!(ids[0].contains(&k0) && ids[1].contains(&k1), "{ids:?}");
    for sql in [
        "INSERT INTO users (id, name) SELECT id + 5000, name FROM users".to_string(),
        "INSERT INTO users (id, name) SELECT n, 'x' FROM generate_series(5000, 5001) n".into(),
        format!("INSERT INTO users (id, name) VALUES ({k0}, 'k') ON CONFLICT (id) DO UPDATE SET id = excluded.id + 1"),
        // What pgmux's parser cannot read never runs on a shard it guessed.
        format!("INSERT INTO users (name, id) SELECT 'x', {k1} ON CONFLICT DO NOTHING"),
    ] {
        let e = cl.simple_query(&sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {}", text(&e));
    }

    // Every row equals the one database's.
    let all = "SELECT id, name, score FROM users ORDER BY id";
    assert_eq!(rows(&cl, all).await, rows(&reference, all).await);

    // Directory keys: new ones assigned as the rows go in.
    let values: Vec<String> = (0..12).map(|i| format!("('t{i}', 'tenant {i}')")).collect();
    let sql = format!("INSERT INTO tenants (tenant_id, name) VALUES {} RETURNING tenant_id", values.join(", "));
    let (got, n) = returned(&cl, &sql).await.unwrap();
    assert_eq!((got.len(), n), (12, 12));
    let on = |node| c.psql(node, "shop", "SELECT count(*) FROM tenants").unwrap();
    assert_eq!((on(&c.primary), on(&c.extra_primaries[0])), ("6".to_string(), "6".to_string()));

    // A write without a key over the extended protocol: every shard,
    // counts added up.
    let sql = "UPDATE users SET score = $1 WHERE score IS NULL AND id > $2";
    let updated = cl.execute(sql, &[&9i32, &1i64]).await.unwrap_or_else(|e| panic!("{}", text(&e)));
    assert_eq!(updated, reference.execute(sql, &[&9i32, &1i64]).await.unwrap());
    assert!(updated > 10);
    let all = "SELECT id, name, score FROM users ORDER BY id";
    assert_eq!(rows(&cl, all).await, rows(&reference, all).await);

    // Writes may not span shards: refused, nothing written.
    let (a, b) = ((1000..).find(|&i| shard_of(i) == 0).unwrap(), (1000..).find(|&i| shard_of(i) == 1).unwrap());
    let e = strict.simple_query(&format!("INSERT INTO users (id, name) VALUES ({a}, 'z'), ({b}, 'z')")).await;
    let e = e.unwrap_err();
    assert_eq!(code(&e), "0A000", "{}", text(&e));
    assert!(text(&e).contains("allow_cross_shard_writes"), "{}", text(&e));
    assert_eq!(ids_on_shards(&c).iter().flatten().filter(|&&i| (1000..2000).contains(&i)).count(), 0);
    p.stop().await;
}

/// COPY `data` (text) through `sql`; the rows taken, or "SQLSTATE message".
async fn copy_text(cl: &tokio_postgres::Client, sql: &str, data: &[u8]) -> Result<u64, String> {
    use futures_util::SinkExt;
    let err = |e: tokio_postgres::Error| format!("{} {}", code(&e), text(&e));
    let sink = cl.copy_in(sql).await.map_err(err)?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::copy_from_slice(data)).await.map_err(err)?;
    sink.finish().await.map_err(err)
}

/// COPY ... (FORMAT binary) of users `ids` (name `b<id>`, score `id % 5`).
async fn copy_binary(cl: &tokio_postgres::Client, ids: std::ops::Range<i64>) -> Result<u64, tokio_postgres::Error> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    let sink = cl.copy_in("COPY users (id, name, score) FROM STDIN (FORMAT binary)").await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::INT4]);
    futures_util::pin_mut!(writer);
    for id in ids {
        let score = i32::try_from(id % 5).unwrap_or(0);
        writer.as_mut().write(&[&id, &format!("b{id}"), &score]).await?;
    }
    writer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_splits_binary_and_honours_the_end_marker() {
    let (c, p) = start().await;
    let (cl, reference) = (connect(&p, "shop").await, connect(&p, "ref").await);

    // Binary: the header to every shard, each tuple to its key's shard.
    for cl in [&cl, &reference] {
        assert_eq!(copy_binary(cl, 1..201).await.unwrap_or_else(|e| panic!("{}", text(&e))), 200);
    }
    let ids = ids_on_shards(&c);
    for (s, on) in ids.iter().enumerate() {
        assert!(!on.is_empty() && on.iter().all(|&id| shard_of(id) == s), "shard {s}: {on:?}");
    }
    let all = "SELECT id, name, score FROM users ORDER BY id";
    assert_eq!(rows(&cl, all).await, rows(&reference, all).await);
    // A stream that is not binary COPY fails on every shard.
    let e = copy_text(&cl, "COPY users (id, name) FROM STDIN (FORMAT binary)", b"1\tx\n").await.unwrap_err();
    assert!(e.starts_with("22P04"), "{e}");
    assert_eq!(ids_on_shards(&c), ids);

    // A row one shard refuses (a duplicate key) keeps no row anywhere:
    // the COPY is one transaction across the shards.
    let other = (900..).find(|&i| shard_of(i) != shard_of(1)).unwrap();
    let e = copy_text(&cl, "COPY users (id, name) FROM STDIN", format!("{other}\tnew\n1\tdup\n").as_bytes()).await;
    assert!(e.as_ref().is_err_and(|e| e.starts_with("23505")), "{e:?}");
    assert_eq!(ids_on_shards(&c), ids);
    // The text format's end-of-data line: what follows it is not data.
    let got = copy_text(&cl, "COPY users (id, name) FROM STDIN", b"301\tx\n302\ty\n\\.\n303\tz\n").await;
    assert_eq!(got, Ok(2));
    let got = copy_text(&cl, "COPY users (id, name) FROM STDIN CSV", b"304,x\r\n\\.\r\n").await;
    assert_eq!(got, Ok(1));
    // psql running a script with inline data.
    let dir = std::env::temp_dir().join(format!("pgmux-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("load.sql");
    std::fs::write(&script, "COPY users (id, name) FROM STDIN;\n310\tp\n311\tq\n312\tr\n\\.\nSELECT 'done';\n")
        .unwrap();
    let out = std::process::Command::new("psql")
        .env("PGPASSWORD", APP.1)
        .args(["-h", "127.0.0.1", "-p", &p.addr.port().to_string(), "-U", APP.0, "-d", "shop", "-v", "ON_ERROR_STOP=1"])
        .arg("-f")
        .arg(&script)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("COPY 3") && stdout.contains("done"), "{stdout}");
    let copied = "SELECT id, name FROM users WHERE id > 300 ORDER BY id";
    let want = ["301", "302", "304", "310", "311", "312"];
    let got = rows(&cl, copied).await;
    assert_eq!(got.iter().map(|r| r[0].clone().unwrap()).collect::<Vec<_>>(), want);
    p.stop().await;
}

/// Whether `sql` (a boolean query) holds on each shard, read directly.
fn on_both(c: &Cluster, sql: &str) -> [bool; 2] {
    [&c.primary, &c.extra_primaries[0]].map(|n| c.psql(n, "shop", sql).unwrap() == "t")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_run_on_every_shard() {
    let (c, p) = start().await;
    let (cl, strict) = (connect(&p, "shop").await, connect(&p, "strict").await);
    let fails = |r: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>| match r {
        Ok(_) => panic!("succeeded"),
        Err(e) => (code(&e), e.as_db_error().and_then(|d| d.detail()).unwrap_or_default().to_string()),
    };
    let tag = |msgs: Vec<SimpleQueryMessage>| msgs.len();

    // On every shard, answered once; the extended protocol too.
    cl.simple_query("CREATE TABLE moved (a int, k bigint)").await.unwrap();
    assert_eq!(on_both(&c, "SELECT to_regclass('moved') IS NOT NULL"), [true, true]);
    let msgs = cl.simple_query("ALTER TABLE users ADD COLUMN extra int; ").await.unwrap();
    assert_eq!(tag(msgs), 1);
    assert_eq!(on_both(&c, "SELECT count(*) = 1 FROM pg_attribute WHERE attname = 'extra'"), [true, true]);
    cl.execute("COMMENT ON TABLE users IS 'sharded'", &[]).await.unwrap();
    assert_eq!(on_both(&c, "SELECT obj_description('users'::regclass) = 'sharded'"), [true, true]);
    cl.simple_query("CREATE INDEX users_name ON users (name)").await.unwrap();
    cl.simple_query("CREATE SEQUENCE ids").await.unwrap();
    assert_eq!(
        on_both(&c, "SELECT to_regclass('users_name') IS NOT NULL AND to_regclass('ids') IS NOT NULL"),
        [true, true]
    );

    // A failure on one shard changes none.
    c.psql(&c.extra_primaries[0], "shop", "CREATE TABLE clash (x int)").unwrap();
    let (code1, _) = fails(cl.simple_query("CREATE TABLE clash (x int)").await);
    assert_eq!(code1, "42P07");
    assert_eq!(on_both(&c, "SELECT to_regclass('clash') IS NOT NULL"), [false, true]);
    // In a transaction across shards: rolled back everywhere.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query("ALTER TABLE users ADD COLUMN later int").await.unwrap();
    cl.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(on_both(&c, "SELECT count(*) = 0 FROM pg_attribute WHERE attname = 'later'"), [true, true]);
    cl.simple_query("BEGIN").await.unwrap();
    let (code2, _) = fails(cl.simple_query("CREATE INDEX CONCURRENTLY users_score ON users (score)").await);
    assert_eq!(code2, "25001");
    cl.simple_query("ROLLBACK").await.unwrap();
    // What PostgreSQL runs only outside a transaction: on each shard on its
    // own; a failure says where it ran.
    cl.simple_query("CREATE INDEX CONCURRENTLY users_score ON users (score)").await.unwrap();
    assert_eq!(on_both(&c, "SELECT to_regclass('users_score') IS NOT NULL"), [true, true]);
    c.psql(&c.extra_primaries[0], "shop", "CREATE INDEX lone ON users (extra)").unwrap();
    let (code3, detail) = fails(cl.simple_query("CREATE INDEX CONCURRENTLY lone ON users (extra)").await);
    assert_eq!((code3.as_str(), detail.contains("s0")), ("42P07", true), "{detail}");
    // Writes may not span shards: outside a transaction still everywhere
    // (committed in turn), inside one refused.
    strict.simple_query("CREATE TABLE plain (x int)").await.unwrap();
    assert_eq!(on_both(&c, "SELECT to_regclass('plain') IS NOT NULL"), [true, true]);
    strict.simple_query("BEGIN").await.unwrap();
    let (code4, _) = fails(strict.simple_query("DROP TABLE plain").await);
    assert_eq!(code4, "0A000");
    strict.simple_query("ROLLBACK").await.unwrap();

    // INSERT and COPY without a column list: the key's place from the
    // catalog (k is second)...
    let on_shard = |s: usize| (100..).find(move |&k| shard_of(k) == s).unwrap();
    let (k0, k1) = (on_shard(0), on_shard(1));
    cl.simple_query(&format!("INSERT INTO moved VALUES (1, {k0}), (2, {k1})")).await.unwrap();
    let on = |sql: &str| [&c.primary, &c.extra_primaries[0]].map(|n| c.psql(n, "shop", sql).unwrap());
    assert_eq!(on("SELECT string_agg(k::text, ',') FROM moved"), [k0.to_string(), k1.to_string()]);
    // ... read again after the table changes through pgmux (k is first):
    // keys whose shard differs from that of the value now second, so that
    // the old place would send them astray.
    cl.simple_query("DROP TABLE moved").await.unwrap();
    cl.simple_query("CREATE TABLE moved (k bigint, a int)").await.unwrap();
    let astray = |a: i64| (200..).find(move |&k| shard_of(k) != shard_of(a)).unwrap();
    strict.simple_query(&format!("INSERT INTO moved VALUES ({}, 1)", astray(1))).await.unwrap();
    cl.execute(&format!("INSERT INTO moved VALUES ({}, 2)", astray(2)), &[]).await.unwrap();
    let data = format!("{}\t3\n{}\t4\n", astray(3), astray(4));
    assert_eq!(copy_text(&cl, "COPY moved FROM STDIN", data.as_bytes()).await, Ok(2));
    let placed = on("SELECT coalesce(string_agg(k::text, ','), '') FROM moved");
    for (s, keys) in placed.iter().enumerate() {
        assert!(keys.split(',').filter(|k| !k.is_empty()).all(|k| shard_of(k.parse().unwrap()) == s), "{placed:?}");
    }
    assert_eq!(placed.iter().map(|p| p.split(',').filter(|k| !k.is_empty()).count()).sum::<usize>(), 4);

    // Text merges in order without COLLATE while the shards' collation is
    // C (as here) and no column has another: a column of another collation,
    // made through pgmux, ends that until it goes.
    let by_name = ["SELECT name FROM users ORDER BY name DESC", "SELECT max(name) FROM users"];
    for sql in by_name {
        cl.simple_query(sql).await.unwrap();
    }
    cl.simple_query("CREATE TABLE worded (w text COLLATE \"und-x-icu\")").await.unwrap();
    for sql in by_name {
        assert_eq!(fails(cl.simple_query(sql).await).0, "0A000", "{sql}");
    }
    cl.simple_query("DROP TABLE worded").await.unwrap();
    for sql in by_name {
        cl.simple_query(sql).await.unwrap();
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_that_change_the_key_move_rows() {
    let (c, p) = start().await;
    let (cl, reference, strict) = (connect(&p, "shop").await, connect(&p, "ref").await, connect(&p, "strict").await);
    let values: Vec<String> = (1..=40).map(|i| format!("({i}, 'u{i}', {})", i % 4)).collect();
    let load = format!("INSERT INTO users (id, name, score) VALUES {}", values.join(", "));
    for cl in [&cl, &reference] {
        cl.simple_query(&load).await.unwrap();
    }
    let all = "SELECT id, name, score FROM users ORDER BY id";
    let placed = |c: &Cluster| {
        let ids = ids_on_shards(c);
        ids.iter().enumerate().all(|(s, on)| on.iter().all(|&id| shard_of(id) == s))
    };
    let (a, b) = ((1..).find(|&i| shard_of(i) == 0).unwrap(), (100..).find(|&i| shard_of(i) == 1).unwrap());
    // Simple protocol: the row leaves its shard for its new key's.
    let sql = format!("UPDATE users SET id = {b}, name = 'moved' WHERE id = {a}");
    for cl in [&cl, &reference] {
        assert_eq!(returned(cl, &sql).await, Ok((vec![], 1)), "{sql}");
    }
    assert!(placed(&c), "{:?}", ids_on_shards(&c));
    assert_eq!(rows(&cl, all).await, rows(&reference, all).await);
    // Extended, parameters: another row, and one that stays.
    let (x, y) = ((1..).find(|&i| shard_of(i) == 1 && i != b).unwrap(), (200..).find(|&i| shard_of(i) == 0).unwrap());
    let w = (1..=40).find(|&i| i != a && i != x).unwrap();
    let z = (300..).find(|&i| shard_of(i) == shard_of(w)).unwrap();
    for cl in [&cl, &reference] {
        let n = cl.execute("UPDATE users SET id = $1 WHERE id = $2", &[&y, &x]).await;
        assert_eq!(n.unwrap_or_else(|e| panic!("{}", text(&e))), 1);
        assert_eq!(cl.execute("UPDATE users SET id = $1 WHERE id = $2", &[&z, &w]).await.unwrap(), 1);
    }
    // Without a key: every shard, rows moving both ways.
    let sql = "UPDATE users SET id = id + 1000 WHERE score = 2";
    for cl in [&cl, &reference] {
        assert_eq!(returned(cl, sql).await.map(|r| r.1), Ok(10), "{sql}");
    }
    assert!(placed(&c), "{:?}", ids_on_shards(&c));
    assert_eq!(rows(&cl, all).await, rows(&reference, all).await);

    // All or nothing: a move onto a key taken there changes nothing.
    let before = ids_on_shards(&c);
    let taken = before[1][0];
    let from = before[0][0];
    let e = returned(&cl, &format!("UPDATE users SET id = {taken} WHERE id = {from}")).await.unwrap_err();
    assert!(e.starts_with("23505"), "{e}");
    assert_eq!(ids_on_shards(&c), before);
    // In the client's transaction: rolled back with it.
    cl.simple_query("BEGIN").await.unwrap();
    returned(&cl, &format!("UPDATE users SET id = 5000 WHERE id = {from}")).await.unwrap();
    cl.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(ids_on_shards(&c), before);
    // Refused: RETURNING, and where writes may not span shards.
    let e = returned(&cl, &format!("UPDATE users SET id = 5000 WHERE id = {from} RETURNING id")).await.unwrap_err();
    assert!(e.starts_with("0A000"), "{e}");
    let e = returned(&strict, &format!("UPDATE users SET id = 5000 WHERE id = {from}")).await.unwrap_err();
    assert!(e.starts_with("0A000") && e.contains("allow_cross_shard_writes"), "{e}");
    assert_eq!(ids_on_shards(&c), before);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_made_on_a_shard_route_back_to_it() {
    let (c, p) = start().await;
    let cl = connect(&p, "shop").await;
    cl.batch_execute("CREATE SEQUENCE items_id_seq").await.unwrap();
    cl.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY DEFAULT pgmux_next_id('items_id_seq'), n int)")
        .await
        .unwrap();
    // A row's id finds the row again.
    let id: i64 = cl.query_one("INSERT INTO items (n) VALUES (7) RETURNING id", &[]).await.unwrap().get(0);
    let n: i32 = cl.query_one("SELECT n FROM items WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(n, 7);
    // 8 clients, 104,000 ids: each on the shard it hashes to (so none is
    // on two shards), none twice on one (the primary key).
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cl = connect(&p, "shop").await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..13 {
                cl.execute("INSERT INTO items (n) SELECT g FROM generate_series(1, 1000) g", &[]).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap_or_else(|e| panic!("{}", text(&e)));
    }
    let mut total = 0;
    for (s, node) in [&c.primary, &c.extra_primaries[0]].into_iter().enumerate() {
        let check = format!(
            "SELECT count(*) || ' ' || count(*) FILTER (WHERE satisfies_hash_partition('pgmux_hash_int8'::regclass, 2, {s}, id)) FROM items"
        );
        let got = c.psql(node, "shop", &check).unwrap();
        let (all, here) = got.split_once(' ').unwrap();
        assert_eq!(all, here, "shard {s}: ids of another shard");
        assert!(all.parse::<i64>().unwrap() >= 30_000, "shard {s} took {all} of 104,001 rows");
        total += all.parse::<i64>().unwrap();
        let sample =
            c.psql(node, "shop", "SELECT string_agg(id::text, ',') FROM (SELECT id FROM items LIMIT 500) x").unwrap();
        assert!(sample.split(',').all(|i| shard_of(i.parse().unwrap()) == s), "shard {s}");
    }
    assert_eq!(total, 104_001);
    // Ids made in pgmux: increasing, simple and extended protocol alike.
    let mut last = 0i64;
    for i in 0..200 {
        let id: i64 = if i % 2 == 0 {
            cl.query_one("SELECT pgmux.unique_id()", &[]).await.unwrap().get(0)
        } else {
            rows(&cl, "SELECT pgmux.unique_id() AS id").await[0][0].as_deref().unwrap().parse().unwrap()
        };
        assert!(id > last, "{id} after {last}");
        last = id;
    }
    p.stop().await;
}
