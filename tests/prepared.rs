//! Named prepared statements in transaction mode: statements follow their
//! clients across server connections.

mod support;

use std::time::Duration;

use futures_util::{pin_mut, SinkExt};
use support::{code, scalar, APP};
use tokio_postgres::types::Type;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_statements_move_between_servers() {
    let db = support::fresh_db("prep_tp");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let direct = support::direct(&db).await;
    direct
        .simple_query("CREATE TABLE acc (id int primary key, owner text, balance bigint); GRANT ALL ON acc TO PUBLIC")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for client in 0..8i32 {
        let (port, db) = (p.addr.port(), db.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = support::connect_str(&support::conn_str(port, APP.0, APP.1, &db)).await.unwrap();
            let insert = c.prepare("INSERT INTO acc VALUES ($1, $2, $3)").await.unwrap();
            let select = c.prepare_typed("SELECT balance FROM acc WHERE id = $1", &[Type::INT4]).await.unwrap();
            let mut seen_pids = std::collections::HashSet::new();
            for i in 0..25i32 {
                let id = client * 1000 + i;
                c.execute(&insert, &[&id, &format!("owner{id}"), &(id as i64 * 10)]).await.unwrap();
                let row = c.query_one(&select, &[&id]).await.unwrap();
                assert_eq!(row.get::<_, i64>(0), id as i64 * 10);
                // Unprepared queries with parameters (tokio-postgres prepares
                // them implicitly under new names).
                let n: i64 = c
                    .query_one("SELECT count(*) FROM acc WHERE id BETWEEN $1 AND $1 + 998", &[&(client * 1000)])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, i as i64 + 1);
                let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
                seen_pids.insert(pid);
                tokio::task::yield_now().await;
            }
            // A transaction: statements inside it, then rollback.
            let tx = c.transaction().await.unwrap();
            tx.execute(&insert, &[&(client * 1000 + 999), &"tx", &0i64]).await.unwrap();
            let row = tx.query_one(&select, &[&(client * 1000 + 999)]).await.unwrap();
            assert_eq!(row.get::<_, i64>(0), 0);
            tx.rollback().await.unwrap();
            assert!(c.query_opt(&select, &[&(client * 1000 + 999)]).await.unwrap().is_none());
            seen_pids.len()
        }));
    }
    let mut moved = 0;
    for t in tasks {
        if t.await.unwrap() > 1 {
            moved += 1;
        }
    }
    assert!(moved > 0, "statements never changed server connection; the test proves nothing");
    assert_eq!(scalar(&direct, "SELECT count(*) FROM acc").await, "200");
    assert!(support::backends(&direct, &db).await <= 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_errors_with_prepared_statements() {
    let db = support::fresh_db("prep_copy");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let c = support::app(&p, &db).await;
    c.simple_query("CREATE TABLE items (id int, name text)").await.unwrap();
    let sink = c.copy_in("COPY items FROM STDIN").await.unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..1000 {
        data.push_str(&format!("{i}\titem {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1000);
    // A Parse that fails leaves nothing behind: the session works and the
    // same SQL fixed prepares fine.
    let e = c.prepare("SELEC broken").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    let e = c.prepare("SELECT * FROM no_such_table").await.unwrap_err();
    assert_eq!(code(&e), "42P01");
    let s = c.prepare("SELECT count(*) FROM items WHERE id < $1").await.unwrap();
    let n: i64 = c.query_one(&s, &[&500i32]).await.unwrap().get(0);
    assert_eq!(n, 500);
    // An execution error of a prepared statement, then reuse.
    let div = c.prepare("SELECT 10 / $1::int").await.unwrap();
    assert_eq!(code(&c.query_one(&div, &[&0i32]).await.unwrap_err()), "22012");
    assert_eq!(c.query_one(&div, &[&5i32]).await.unwrap().get::<_, i32>(0), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_pins_and_limits_hold() {
    let db = support::fresh_db("prep_limits");
    let p =
        support::proxy(&db, "default_pool_size = 2\nmax_prepared_statements = 5\nmax_client_prepared_statements = 30")
            .await;
    // SQL PREPARE pins its client to the server connection: EXECUTE works
    // in later transactions while others use the pool.
    let pinned = support::app(&p, &db).await;
    pinned.simple_query("PREPARE p1 AS SELECT 41 + 1").await.unwrap();
    let other = support::app(&p, &db).await;
    other.simple_query("BEGIN").await.unwrap();
    assert_eq!(scalar(&pinned, "EXECUTE p1").await, "42");
    assert_eq!(scalar(&other, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p1'").await, "0");
    other.simple_query("COMMIT").await.unwrap();
    drop((pinned, other));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = support::app(&p, &db).await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p1'").await, "0");
    // 30 statements in use round-robin over a server that keeps 5.
    let mut stmts = Vec::new();
    for i in 0..30 {
        stmts.push(c.prepare(&format!("SELECT {i}::int + $1::int")).await.unwrap());
    }
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[&round]).await.unwrap().get(0);
            assert_eq!(v, i as i32 + round);
        }
    }
    let direct = support::direct(&db).await;
    let on_server =
        scalar(&direct, &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND usename = 'app'"))
            .await;
    assert!(on_server.parse::<i32>().unwrap() <= 2, "{on_server} server connections");
    // The server connection keeps at most 5 (its own list, read through
    // the function behind the view called in a select list, which pgmux
    // leaves alone); the view (and the function in FROM) lists the
    // client's 30.
    let kept = "SELECT count(*) FROM (SELECT pg_prepared_statement()) s";
    assert!(scalar(&c, kept).await.parse::<i32>().unwrap() <= 5);
    assert_eq!(scalar(&c, "SELECT count(*) FROM pg_prepared_statement()").await, "30");
    assert_eq!(scalar(&c, "SELECT count(*) FROM pg_prepared_statements").await, "30");
    // The client-side cap: a clear error, and the session goes on.
    let e = c.prepare("SELECT 'one too many'").await.unwrap_err();
    assert_eq!(code(&e), "53400", "{}", support::text(&e));
    assert!(support::text(&e).contains("max_client_prepared_statements"));
    drop(stmts);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Dropped statements are closed by tokio-postgres: room again.
    let s = c.prepare("SELECT 'room again'").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, &str>(0), "room again");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_clears_the_client_statements() {
    let db = support::fresh_db("prep_discard");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let c = support::app(&p, &db).await;
    let s = c.prepare("SELECT 42").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 42);
    c.simple_query("DISCARD ALL").await.unwrap();
    let e = c.query_one(&s, &[]).await.unwrap_err();
    assert_eq!(code(&e), "26000", "{}", support::text(&e));
    let s = c.prepare("SELECT 43").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 43);
    c.simple_query("DEALLOCATE ALL").await.unwrap();
    let e = c.query_one(&s, &[]).await.unwrap_err();
    assert_eq!(code(&e), "26000", "{}", support::text(&e));
    // A DEALLOCATE of one protocol-level statement (as psycopg 3 sends it).
    let raw_name = {
        let mut r = support::raw::Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
        let mut b = bytes::BytesMut::new();
        support::raw::parse(&mut b, "_pg3_0", "SELECT 44");
        support::raw::sync(&mut b);
        r.send(&b).await;
        r.until_ready().await;
        let (_, errors) = r.query("DEALLOCATE _pg3_0").await;
        assert!(errors.is_empty(), "{errors:?}");
        let mut b = bytes::BytesMut::new();
        support::raw::bind(&mut b, "", "_pg3_0", &[]);
        support::raw::execute(&mut b, "", 0);
        support::raw::sync(&mut b);
        r.send(&b).await;
        let (_, errors) = support::raw::rows_and_errors(&r.until_ready().await);
        errors.join(",")
    };
    assert!(raw_name.starts_with("26000"), "{raw_name}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_statements_on_the_server() {
    let db = support::fresh_db("prep_session");
    let p = support::proxy(&db, "default_pool_size = 2\npool_mode = \"session\"").await;
    let c = support::app(&p, &db).await;
    c.simple_query("PREPARE sqlp AS SELECT 7").await.unwrap();
    assert_eq!(scalar(&c, "EXECUTE sqlp").await, "7");
    let s = c.prepare("SELECT 8").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 8);
    let names = scalar(&c, "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements").await;
    assert!(
        names.contains("sqlp") && names.split(',').any(|n| n.starts_with('s') && n[1..].parse::<u32>().is_ok()),
        "{names}"
    );
    p.stop().await;
}

fn pgbench(port: u16, db: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP.0])
        .args(args)
        .arg(db)
        .env("PGPASSWORD", APP.1)
        .output()
        .expect("run pgbench");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_every_protocol_mode_over_a_small_pool() {
    let db = support::fresh_db("prep_pgbench");
    let p = support::proxy(&db, "default_pool_size = 8").await;
    let port = p.addr.port();
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        pgbench(port, &db2, &["-i", "-s", "1", "-q"]);
        for mode in ["simple", "extended", "prepared"] {
            for script in [&["-S"][..], &["-N"][..]] {
                let mut args = vec!["-c", "32", "-j", "2", "-T", "3", "-n", "-M", mode];
                args.extend_from_slice(script);
                let text = pgbench(port, &db2, &args);
                assert!(text.contains("number of failed transactions: 0 (0.000%)"), "{mode} {script:?}: {text}");
                let processed: u64 = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("number of transactions actually processed: ")?.split('/').next()?.parse().ok()
                    })
                    .unwrap_or(0);
                assert!(processed > 100, "{mode} {script:?}: {text}");
            }
        }
    })
    .await
    .unwrap();
    let direct = support::direct(&db).await;
    assert!(support::backends(&direct, &db).await <= 8);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_copy_in_keeps_tracking_and_releases() {
    // COPY FROM STDIN with CopyData/CopyDone right behind the Query, before
    // the server's CopyInResponse (asyncpg's copy_records_to_table).
    use bytes::BytesMut;
    use support::raw::{self, Raw};
    let db = support::fresh_db("prep_pipecopy");
    let direct = support::direct(&db).await;
    direct.batch_execute("CREATE TABLE t (x int); GRANT ALL ON t TO PUBLIC").await.unwrap();
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"5s\"").await;
    let mut a = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "s1", "SELECT 41 + 1");
    raw::sync(&mut b);
    a.send(&b).await;
    a.until_ready().await;
    for extended in [false, true] {
        let mut b = BytesMut::new();
        if extended {
            raw::parse(&mut b, "", "COPY t FROM STDIN");
            raw::bind(&mut b, "", "", &[]);
            raw::execute(&mut b, "", 0);
            raw::sync(&mut b);
        } else {
            pgmux::protocol::messages::query(&mut b, "COPY t FROM STDIN");
        }
        raw::copy_data(&mut b, b"1\n");
        raw::copy_done(&mut b);
        if extended {
            raw::sync(&mut b);
        }
        a.send(&b).await;
        assert!(raw::rows_and_errors(&a.until_ready().await).1.is_empty());
    }
    let mut b = BytesMut::new();
    raw::bind(&mut b, "", "s1", &[]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    a.send(&b).await;
    assert_eq!(raw::rows_and_errors(&a.until_ready().await), (vec!["42".to_string()], vec![]));
    // The server connection went back to the pool: another client gets it.
    let other = support::app(&p, &db).await;
    assert_eq!(scalar(&other, "SELECT count(*) FROM t").await, "2");
    p.stop().await;
}
