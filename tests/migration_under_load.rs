//! A migration in the middle of a prepared-statement load: 16 clients
//! (tokio-postgres statements prepared per call, raw clients binding a
//! statement they prepared once, and `pgbench -M prepared`) run through a
//! pool of 4 while the schema changes straight on the server — a column
//! added, a column's type changed, a table dropped and created again, a
//! view replaced, a type dropped and created again — and once through
//! pgmux. No statement may fail once the DDL has committed.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use support::raw::{self, Raw};
use support::APP;

const SCHEMA: &str = "
    CREATE TYPE mood AS ENUM ('ok');
    CREATE TABLE t (id int PRIMARY KEY, v text);
    INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;
    CREATE VIEW tv AS SELECT id, v FROM t;
    GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;";

/// Each step commits in one transaction, straight on the server.
const MIGRATION: [&str; 5] = [
    "ALTER TABLE t ADD COLUMN note text DEFAULT 'x'",
    "BEGIN; DROP VIEW tv; ALTER TABLE t ALTER COLUMN id TYPE bigint; CREATE VIEW tv AS SELECT id, v FROM t;
     GRANT ALL ON tv TO PUBLIC; COMMIT",
    "BEGIN; DROP VIEW tv; DROP TABLE t; CREATE TABLE t (id bigint PRIMARY KEY, v text, w int DEFAULT 1);
     INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g; CREATE VIEW tv AS SELECT id, v FROM t;
     GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC; ALTER TABLE t OWNER TO app; COMMIT",
    "CREATE OR REPLACE VIEW tv AS SELECT id, v, w FROM t",
    "BEGIN; DROP TYPE mood; CREATE TYPE mood AS ENUM ('ok', 'fine'); COMMIT",
];

/// Statements the load ran, and the errors it saw (with when the
/// statement started and ended).
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: Mutex<Vec<(Instant, Instant, String)>>,
}

impl Tally {
    fn note(&self, started: Instant, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.errors.lock().unwrap().push((started, Instant::now(), e)),
        }
    }
}

async fn tokio_client(url: String, tally: Arc<Tally>, stop: Arc<AtomicBool>, n: i64) {
    let c = support::connect_str(&url).await.unwrap();
    let mut i = n;
    while !stop.load(Ordering::Relaxed) {
        i = i % 100 + 1;
        let id = i.to_string();
        // Text parameters keep the query valid across the id type change.
        for sql in ["SELECT * FROM t WHERE id = $1::text::bigint", "SELECT * FROM tv WHERE id = $1::text::bigint"] {
            let started = Instant::now();
            let r = c.query(sql, &[&id]).await;
            tally.note(started, r.map_err(|e| support::text(&e)).and_then(|rows| check(rows.len() == 1, sql)));
        }
    }
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    ok.then_some(()).ok_or_else(|| format!("wrong answer: {what}"))
}

/// Prepares once (never described: the shape is read per execution, as
/// libpq does), then binds in a loop.
async fn raw_client(port: u16, db: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut c = Raw::login(port, APP.0, APP.1, &db, &[]).await;
    c.prepare("m", "SELECT $1::mood::text").await;
    c.prepare("r", "SELECT * FROM t WHERE id = $1").await;
    while !stop.load(Ordering::Relaxed) {
        for (name, param) in [("m", "ok"), ("r", "7")] {
            let started = Instant::now();
            let mut b = BytesMut::new();
            raw::bind(&mut b, "", name, &[Some(param)]);
            raw::describe_portal(&mut b, "");
            raw::execute(&mut b, "", 0);
            raw::sync(&mut b);
            c.send(&b).await;
            let (rows, errors) = raw::rows_and_errors(&c.until_ready().await);
            tally.note(
                started,
                match errors.first() {
                    Some(e) => Err(e.clone()),
                    None => check(rows.len() == 1, name),
                },
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_under_a_prepared_statement_load() {
    let db = support::fresh_db("mig_load");
    let direct = support::direct(&db).await;
    direct.batch_execute(SCHEMA).await.unwrap();
    let p = support::proxy(&db, "default_pool_size = 4").await;
    let port = p.addr.port();
    let url = support::conn_str(port, APP.0, APP.1, &db);
    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let mut tasks = Vec::new();
    for n in 0..10 {
        tasks.push(tokio::spawn(tokio_client(url.clone(), tally.clone(), stop.clone(), n * 10)));
    }
    for _ in 0..4 {
        tasks.push(tokio::spawn(raw_client(port, db.clone(), tally.clone(), stop.clone())));
    }
    // Two more clients: pgbench -M prepared, for the whole run.
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "\\set id random(1, 100)\nSELECT * FROM t WHERE id = :id;\n").unwrap();
    let pgbench = tokio::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP.0, "-n", "-M", "prepared", "-c", "2", "-T", "12"])
        .arg("-f")
        .arg(script.path())
        .arg(&db)
        .env("PGPASSWORD", APP.1)
        .output();
    let pgbench = tokio::spawn(pgbench);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut committed = Vec::new();
    for step in MIGRATION {
        committed.push(Instant::now());
        direct.batch_execute(step).await.unwrap_or_else(|e| panic!("{step}: {}", support::text(&e)));
        committed.push(Instant::now());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // Once through pgmux (DDL relayed invalidates at once).
    let admin = support::app(&p, &db).await;
    committed.push(Instant::now());
    admin.batch_execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 2").await.unwrap();
    committed.push(Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let out = pgbench.await.unwrap().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench -M prepared failed during the migration:\n{report}");
    assert!(report.contains("number of failed transactions: 0"), "{report}");
    let errors = std::mem::take(&mut *tally.errors.lock().unwrap());
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!("{ok} statements ok, {} errors (all spanning a migration step)", errors.len());
    assert!(ok > 1000, "the load ran too little to prove anything: {ok}");
    // A statement prepared before a step committed and run after it may
    // fail as on PostgreSQL (tokio-postgres was told the old shape); one
    // that did not span a commit may not.
    let spans = |from: &Instant, to: &Instant| committed.iter().any(|c| from < c && c < to);
    let failed: Vec<&String> = errors.iter().filter(|(from, to, _)| !spans(from, to)).map(|(_, _, e)| e).collect();
    assert!(failed.is_empty(), "statements failed after the migration committed: {failed:?}");
    p.stop().await;
}
