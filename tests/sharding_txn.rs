//! Transactions spanning 2 real shard primaries (`allow_cross_shard_writes`):
//! statements run on their key's shard inside one transaction, reads
//! without a key see the transaction's own writes, and the end commits
//! every part — with two-phase commit all or nothing (a deferred
//! constraint failing on one shard at PREPARE leaves nothing anywhere),
//! without it one shard after the other. Prepared transactions a pgmux
//! left behind are settled by recovery from the coordinator's log.

mod support;

use pgmux::proxy::RunningProxy;
use pgmux::shard::hash::{hash_remainder, KeyValue};
use pgmux_testkit::{free_port, Cluster, ClusterSpec, HbaMethod, Role};
use support::{code, scalar, text, APP};

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text);
     CREATE TABLE accounts (id bigint, uniq int UNIQUE DEFERRABLE INITIALLY DEFERRED);
     CREATE TABLE countries (code text PRIMARY KEY, name text);";

fn cluster() -> Cluster {
    let spec = ClusterSpec {
        extra_primaries: 1,
        roles: vec![Role::new(APP.0, APP.1, HbaMethod::Scram)],
        databases: vec!["shop".into()],
        extra_conf: vec!["max_prepared_transactions = 20".into()],
        ..ClusterSpec::default()
    };
    let c = Cluster::start(&spec).expect("two shard primaries");
    for node in [&c.primary, &c.extra_primaries[0]] {
        c.psql(node, "shop", SCHEMA).unwrap();
        c.psql(
            node,
            "shop",
            &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {0}; GRANT CREATE ON SCHEMA public TO {0}", APP.0),
        )
        .unwrap();
    }
    c
}

/// `shop`: two-phase commit; `loose`: the same shards, commits in turn.
fn config(c: &Cluster) -> String {
    let db = |name: &str, two_phase: bool| {
        format!(
            r#"
[databases.{name}]
shards = [{{ name = "s0", primary = "{s0}", dbname = "shop" }}, {{ name = "s1", primary = "{s1}", dbname = "shop" }}]
tables = [{{ name = "users", key = "id", map = "by_id" }}, {{ name = "accounts", key = "id", map = "by_id" }}]
reference_tables = ["countries"]
allow_cross_shard_writes = true
two_phase_commit = {two_phase}

[databases.{name}.maps.by_id]
kind = "hash"
type = "int8"
"#,
            s0 = c.primary.addr(),
            s1 = c.extra_primaries[0].addr(),
        )
    };
    format!(
        "[pgmux]\nlisten = \"127.0.0.1:{port}\"\nlog_level = \"warn\"\n\n[[users]]\nname = \"{user}\"\npassword = \"{pw}\"\n{a}{b}",
        port = free_port().unwrap(),
        user = APP.0,
        pw = APP.1,
        a = db("shop", true),
        b = db("loose", false),
    )
}

async fn client(p: &RunningProxy, db: &str) -> tokio_postgres::Client {
    support::connect_str(&support::conn_str(p.addr.port(), APP.0, APP.1, db)).await.unwrap()
}

/// Ids on shard 0 and shard 1 (PostgreSQL's hash of int8, 2 shards).
fn ids(n: usize) -> (Vec<i64>, Vec<i64>) {
    let on = |s: u64| (1..).filter(move |&i| hash_remainder(&KeyValue::Int8(i), 2) == s).take(n).collect();
    (on(0), on(1))
}

/// Each shard's answer to `sql`, read directly.
fn on_shards(c: &Cluster, sql: &str) -> [String; 2] {
    [c.psql(&c.primary, "shop", sql).unwrap(), c.psql(&c.extra_primaries[0], "shop", sql).unwrap()]
}

fn user_count(c: &Cluster, ids: &[i64]) -> [String; 2] {
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    on_shards(c, &format!("SELECT count(*) FROM users WHERE id IN ({list})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_spanning_shards_commit_all_or_nothing() {
    let c = cluster();
    let p = support::start_proxy(&config(&c)).await;
    let cl = client(&p, "shop").await;
    let other = client(&p, "shop").await;
    let (a, b) = ids(14);

    // Committed on both shards; invisible to others until then; a read
    // without a key inside the transaction sees its own writes.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'a')", a[0])).await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'b')", b[0])).await.unwrap();
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users").await, "2");
    let port = scalar(&cl, &format!("SELECT inet_server_port() FROM users WHERE id = {}", b[0])).await;
    assert_eq!(port, c.extra_primaries[0].port.to_string());
    assert_eq!(scalar(&other, "SELECT count(*) FROM users").await, "0", "uncommitted rows seen");
    cl.simple_query("COMMIT").await.unwrap();
    assert_eq!(user_count(&c, &[a[0], b[0]]), ["1", "1"]);

    // Rolled back on both.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'a'), ({}, 'a')", a[1], a[2])).await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'b')", b[1])).await.unwrap();
    cl.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(user_count(&c, &[a[1], a[2], b[1]]), ["0", "0"]);

    // An error on one shard fails the whole transaction.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'a')", a[3])).await.unwrap();
    let dup = cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'again')", b[0])).await.unwrap_err();
    assert_eq!(code(&dup), "23505");
    let after = cl.simple_query(&format!("SELECT 1 FROM users WHERE id = {}", a[3])).await.unwrap_err();
    assert_eq!(code(&after), "25P02", "{}", text(&after));
    cl.simple_query("COMMIT").await.unwrap();
    assert_eq!(user_count(&c, &[a[3]]), ["0", "0"]);

    // The client's own BEGIN on every shard joined (the first runs it
    // alone; the next send it with their first statement).
    cl.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'a')", a[13])).await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'b')", b[13])).await.unwrap();
    let level =
        format!("SELECT current_setting('transaction_isolation') FROM users WHERE id IN ({}, {})", a[13], b[13]);
    let levels = cl.simple_query(&level).await.unwrap();
    let levels: Vec<&str> = levels
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(levels, ["repeatable read", "repeatable read"]);
    cl.simple_query("COMMIT").await.unwrap();
    assert_eq!(user_count(&c, &[a[13], b[13]]), ["1", "1"]);

    // A deferred constraint that fails at PREPARE on shard 1: shard 0's
    // part (prepared first) is rolled back too.
    c.psql(&c.extra_primaries[0], "shop", &format!("INSERT INTO accounts (id, uniq) VALUES ({}, 7)", b[2])).unwrap();
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("INSERT INTO accounts (id, uniq) VALUES ({}, 1)", a[4])).await.unwrap();
    cl.simple_query(&format!("INSERT INTO accounts (id, uniq) VALUES ({}, 7)", b[3])).await.unwrap();
    let err = cl.simple_query("COMMIT").await.unwrap_err();
    assert_eq!(code(&err), "23505", "{}", text(&err));
    assert_eq!(on_shards(&c, "SELECT count(*) FROM accounts"), ["0", "1"], "a part committed alone");
    assert_eq!(scalar(&cl, "SELECT 1").await, "1", "the session goes on");

    // The same through a write without a key, outside a transaction: one
    // transaction of its own, atomic.
    c.psql(&c.primary, "shop", &format!("INSERT INTO accounts (id, uniq) VALUES ({}, 1)", a[5])).unwrap();
    c.psql(&c.extra_primaries[0], "shop", &format!("INSERT INTO accounts (id, uniq) VALUES ({}, 2)", b[4])).unwrap();
    let err = cl.simple_query("UPDATE accounts SET uniq = uniq + 5 WHERE uniq IN (1, 2)").await.unwrap_err();
    assert_eq!(code(&err), "23505", "{}", text(&err));
    assert_eq!(on_shards(&c, "SELECT string_agg(uniq::text, ',' ORDER BY uniq) FROM accounts"), ["1", "2,7"]);
    let done = cl.simple_query("UPDATE accounts SET uniq = uniq + 100").await.unwrap();
    assert!(matches!(done.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(3))));

    // Reference tables: a write reaches every shard, counted once; a
    // failure on one shard leaves it nowhere.
    let done = cl.simple_query("INSERT INTO countries (code, name) VALUES ('ch', 'Switzerland')").await.unwrap();
    assert!(matches!(done.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(1))));
    c.psql(&c.extra_primaries[0], "shop", "INSERT INTO countries VALUES ('us', 'United States')").unwrap();
    let err = cl.simple_query("INSERT INTO countries (code, name) VALUES ('us', 'USA')").await.unwrap_err();
    assert_eq!(code(&err), "23505");
    assert_eq!(on_shards(&c, "SELECT string_agg(code, ',' ORDER BY code) FROM countries"), ["ch", "ch,us"]);

    // The extended protocol (tokio-postgres transactions).
    let mut ext = client(&p, "shop").await;
    let t = ext.transaction().await.unwrap();
    t.execute("INSERT INTO users (id, name) VALUES ($1, 'x')", &[&a[6]]).await.unwrap();
    t.execute("INSERT INTO users (id, name) VALUES ($1, 'x')", &[&b[5]]).await.unwrap();
    let n: i64 = t.query_one("SELECT count(*) FROM users WHERE name = 'x'", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    t.commit().await.unwrap();
    assert_eq!(user_count(&c, &[a[6], b[5]]), ["1", "1"]);

    // A write to every shard inside a transaction, rolled back.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query("UPDATE users SET name = 'changed'").await.unwrap();
    assert_eq!(scalar(&cl, "SELECT count(*) FROM users WHERE name = 'changed'").await, "6");
    cl.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(on_shards(&c, "SELECT count(*) FROM users WHERE name = 'changed'"), ["0", "0"]);

    // Savepoints: they undo an error on one shard; a second shard cannot
    // join once one is set.
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'sp')", a[7])).await.unwrap();
    cl.simple_query("SAVEPOINT p").await.unwrap();
    let dup = cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'sp')", a[7])).await.unwrap_err();
    assert_eq!(code(&dup), "23505");
    cl.simple_query("ROLLBACK TO SAVEPOINT p").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'sp')", a[8])).await.unwrap();
    let join = cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'sp')", b[6])).await.unwrap_err();
    assert_eq!(code(&join), "0A000", "{}", text(&join));
    cl.simple_query("ROLLBACK").await.unwrap();
    cl.simple_query("BEGIN").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'sp')", a[7])).await.unwrap();
    cl.simple_query("SAVEPOINT p").await.unwrap();
    cl.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'sp')", a[8])).await.unwrap();
    cl.simple_query("COMMIT").await.unwrap();
    assert_eq!(user_count(&c, &[a[7], a[8]]), ["2", "0"]);

    // A client that leaves mid-transaction: every part rolled back, no
    // server connection left inside a transaction.
    let gone = client(&p, "shop").await;
    gone.simple_query("BEGIN").await.unwrap();
    gone.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'gone')", a[9])).await.unwrap();
    gone.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'gone')", b[7])).await.unwrap();
    drop(gone);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(user_count(&c, &[a[9], b[7]]), ["0", "0"]);
    let stuck = "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'";
    assert_eq!(on_shards(&c, stuck), ["0", "0"]);

    // Nothing left prepared, the decision log cleaned.
    assert_eq!(on_shards(&c, "SELECT count(*) FROM pg_prepared_xacts"), ["0", "0"]);
    assert_eq!(c.psql(&c.primary, "shop", "SELECT count(*) FROM pgmux_commit_log").unwrap(), "0");

    // Without two-phase commit: parts commit in turn, and a failure after
    // the first says which shards committed.
    let loose = client(&p, "loose").await;
    loose.simple_query("BEGIN").await.unwrap();
    loose.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'l')", a[10])).await.unwrap();
    loose.simple_query(&format!("INSERT INTO users (id, name) VALUES ({}, 'l')", b[8])).await.unwrap();
    loose.simple_query("COMMIT").await.unwrap();
    assert_eq!(user_count(&c, &[a[10], b[8]]), ["1", "1"]);
    c.psql(&c.extra_primaries[0], "shop", "DELETE FROM accounts; INSERT INTO accounts VALUES (0, 9)").unwrap();
    loose.simple_query("BEGIN").await.unwrap();
    loose.simple_query(&format!("INSERT INTO accounts (id, uniq) VALUES ({}, 9)", a[11])).await.unwrap();
    loose.simple_query(&format!("INSERT INTO accounts (id, uniq) VALUES ({}, 9)", b[9])).await.unwrap();
    let err = loose.simple_query("COMMIT").await.unwrap_err();
    assert_eq!(code(&err), "23505");
    let detail = err.as_db_error().and_then(|e| e.detail()).unwrap_or_default().to_string();
    assert!(detail.contains("s0"), "{detail}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_settles_prepared_transactions_left_behind() {
    let c = cluster();
    let p = support::start_proxy(&config(&c)).await;
    let cl = client(&p, "shop").await;
    let (a, b) = ids(2);
    assert_eq!(scalar(&cl, "SELECT 1").await, "1");
    c.psql(
        &c.primary,
        "shop",
        "CREATE TABLE pgmux_commit_log (gid text PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp()); GRANT ALL ON pgmux_commit_log TO app",
    )
    .unwrap();
    let (s0, s1) = (&c.primary, &c.extra_primaries[0]);
    // Decided (the coordinator, shard 0, committed with its log row) but
    // not finished on shard 1.
    let t1 = "00000000000000a1";
    c.psql(s0, "shop", &format!("BEGIN; SET LOCAL ROLE app; INSERT INTO users (id, name) VALUES ({}, 't1'); INSERT INTO pgmux_commit_log (gid) VALUES ('{t1}'); PREPARE TRANSACTION 'pgmux_{t1}_0_0'", a[0])).unwrap();
    c.psql(s0, "shop", &format!("COMMIT PREPARED 'pgmux_{t1}_0_0'")).unwrap();
    c.psql(
        s1,
        "shop",
        &format!("BEGIN; SET LOCAL ROLE app; INSERT INTO users (id, name) VALUES ({}, 't1'); PREPARE TRANSACTION 'pgmux_{t1}_0_1'", b[0]),
    )
    .unwrap();
    // Undecided: prepared everywhere, the coordinator's part too.
    let t2 = "00000000000000a2";
    c.psql(s0, "shop", &format!("BEGIN; SET LOCAL ROLE app; INSERT INTO users (id, name) VALUES ({}, 't2'); INSERT INTO pgmux_commit_log (gid) VALUES ('{t2}'); PREPARE TRANSACTION 'pgmux_{t2}_0_0'", a[1])).unwrap();
    c.psql(
        s1,
        "shop",
        &format!("BEGIN; SET LOCAL ROLE app; INSERT INTO users (id, name) VALUES ({}, 't2'); PREPARE TRANSACTION 'pgmux_{t2}_0_1'", b[1]),
    )
    .unwrap();
    // Another user's, and not pgmux's: left alone.
    c.psql(
        s1,
        "shop",
        "BEGIN; INSERT INTO users (id, name) VALUES (-1, 'su'); PREPARE TRANSACTION 'pgmux_00000000000000a3_0_1'",
    )
    .unwrap();
    c.psql(s1, "shop", "BEGIN; SELECT 1; PREPARE TRANSACTION 'someone_else'").unwrap();

    let router = p.proxy.sharding("shop").expect("a router once a client connected");
    let young = router.recover_prepared(std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!((young.committed, young.rolled_back), (0, 0), "young prepared transactions are left to their pgmux");
    let done = router.recover_prepared(std::time::Duration::ZERO).await.unwrap();
    assert_eq!((done.committed, done.rolled_back), (1, 2));
    assert_eq!(user_count(&c, &[a[0], b[0]]), ["1", "1"], "the decided transaction committed everywhere");
    assert_eq!(user_count(&c, &[a[1], b[1]]), ["0", "0"], "the undecided one rolled back everywhere");
    assert_eq!(
        on_shards(&c, "SELECT string_agg(gid, ',' ORDER BY gid) FROM pg_prepared_xacts"),
        ["", "pgmux_00000000000000a3_0_1,someone_else"]
    );
    assert_eq!(c.psql(s0, "shop", "SELECT count(*) FROM pgmux_commit_log").unwrap(), "0");
    c.psql(s1, "shop", "ROLLBACK PREPARED 'someone_else'").unwrap();
    c.psql(s1, "shop", "ROLLBACK PREPARED 'pgmux_00000000000000a3_0_1'").unwrap();
    p.stop().await;
}

/// The tags of the replies up to ReadyForQuery, and the status it gives.
async fn tags(r: &mut support::raw::Raw) -> (String, u8) {
    let msgs = r.until_ready().await;
    let status = msgs.last().map_or(0, |m| m.1[0]);
    (msgs.iter().map(|m| m.0 as char).collect(), status)
}

/// One extended batch (one Sync) of statements for both shards — a JDBC
/// batch, a pgbench pipeline: each statement on its key's shard, one
/// transaction across them, the replies in the batch's order; an error
/// anywhere rolls all of it back, as PostgreSQL's implicit transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_statements_for_several_shards_run_each_on_its_own() {
    use support::raw::{self, Raw};
    let c = cluster();
    let p = support::start_proxy(&config(&c)).await;
    let (a, b) = ids(6);
    for db in ["shop", "loose"] {
        c.psql(&c.primary, "shop", "TRUNCATE users").unwrap();
        c.psql(&c.extra_primaries[0], "shop", "TRUNCATE users").unwrap();
        let mut r = Raw::login(p.addr.port(), APP.0, APP.1, db, &[]).await;
        let insert = "INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id";
        // Unnamed statements, a Describe of each portal.
        let mut m = bytes::BytesMut::new();
        for (n, id) in [a[0], b[0], a[1], b[1]].iter().enumerate() {
            let (id, name) = (id.to_string(), format!("n{n}"));
            raw::parse(&mut m, "", insert);
            raw::bind(&mut m, "", "", &[Some(&id), Some(&name)]);
            raw::describe_portal(&mut m, "");
            raw::execute(&mut m, "", 0);
        }
        raw::sync(&mut m);
        r.send(&m).await;
        let msgs = r.until_ready().await;
        let got: String = msgs.iter().map(|m| m.0 as char).collect();
        assert_eq!(got, "12TDC".repeat(4) + "Z", "{db}: {:?}", raw::rows_and_errors(&msgs));
        assert_eq!(raw::rows_and_errors(&msgs).0, [a[0], b[0], a[1], b[1]].map(|i| i.to_string()));
        assert_eq!(user_count(&c, &[a[0], b[0], a[1], b[1]]), ["2", "2"], "{db}");
        // A named statement prepared first, then bound in a batch; a
        // duplicate key in the third: nothing of the batch stays, the
        // replies stop at the error.
        let mut m = bytes::BytesMut::new();
        raw::parse(&mut m, "ins", insert);
        raw::sync(&mut m);
        r.send(&m).await;
        assert_eq!(tags(&mut r).await, ("1Z".into(), b'I'));
        let mut m = bytes::BytesMut::new();
        for id in [a[2], b[2], b[0], a[3]] {
            raw::bind(&mut m, "", "ins", &[Some(&id.to_string()), Some("x")]);
            raw::execute(&mut m, "", 0);
        }
        raw::sync(&mut m);
        r.send(&m).await;
        let msgs = r.until_ready().await;
        let got: String = msgs.iter().map(|m| m.0 as char).collect();
        assert_eq!(got, "2DC2DC2EZ", "{db}");
        assert!(raw::rows_and_errors(&msgs).1[0].starts_with("23505"), "{:?}", raw::rows_and_errors(&msgs));
        assert_eq!(user_count(&c, &[a[2], b[2], a[3]]), ["0", "0"], "{db}: rolled back everywhere");
        // Inside the client's transaction: part of it, committed with it.
        r.query("BEGIN").await;
        let mut m = bytes::BytesMut::new();
        for id in [a[4], b[4]] {
            raw::bind(&mut m, "", "ins", &[Some(&id.to_string()), Some("t")]);
            raw::execute(&mut m, "", 0);
        }
        raw::sync(&mut m);
        r.send(&m).await;
        assert_eq!(tags(&mut r).await, ("2DC2DCZ".into(), b'T'));
        assert_eq!(user_count(&c, &[a[4], b[4]]), ["0", "0"], "{db}: not before COMMIT");
        assert_eq!(r.query("COMMIT").await, (vec![], vec![]));
        assert_eq!(user_count(&c, &[a[4], b[4]]), ["1", "1"], "{db}");
        // The statement is still the client's.
        assert_eq!(r.run_prepared("ins").await.1.len(), 1, "{db}: no parameters: an error");
    }
    p.stop().await;
}
