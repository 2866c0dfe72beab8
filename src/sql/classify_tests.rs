use super::*;

fn c() -> Classifier {
    Classifier::new(64, &[], false)
}

fn kind(sql: &str) -> Kind {
    match c().classify(sql) {
        Ok(r) => r.kind,
        Err(e) => panic!("{sql:?}: {e}"),
    }
}

fn assert_kind(expected: Kind, queries: &[&str]) {
    for q in queries {
        assert_eq!(kind(q), expected, "{q:?}");
    }
}

fn set(name: &str, value: &str) -> Kind {
    Kind::SessionState(SessionKind::Set { name: name.into(), value: value.into() })
}

#[test]
fn reads() {
    assert_kind(
        Kind::Read,
        &[
            "SELECT 1",
            "select * from t where a = 1 order by b limit 3",
            "SELECT count(*), now(), lower(x) FROM t",
            "VALUES (1), (2)",
            "TABLE t",
            "table s.t ; SELECT 2",
            "SHOW search_path",
            "SHOW ALL",
            "EXPLAIN SELECT * FROM t",
            "EXPLAIN DELETE FROM t",
            "EXPLAIN ANALYZE SELECT * FROM t",
            "EXPLAIN (ANALYZE false) DELETE FROM t",
            "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
            "COPY (SELECT * FROM t) TO STDOUT",
            "COPY t TO STDOUT",
            "COPY t (a, b) TO STDOUT WITH (FORMAT csv)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "SELECT * FROM generate_series(1, 3) g",
            "SELECT 1 UNION SELECT 2",
            "SELECT 1; SELECT 2",
            "SELECT 'nextval(1)', \"lo_x\" FROM t",
        ],
    );
}

#[test]
fn writes_dml_ddl_admin() {
    assert_kind(
        Kind::Write,
        &[
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
            "CREATE TABLE t (a int)",
            "ALTER TABLE t ADD COLUMN b int",
            "DROP TABLE t",
            "TRUNCATE t",
            "COMMENT ON TABLE t IS 'x'",
            "CREATE INDEX i ON t (a)",
            "GRANT SELECT ON t TO bob",
            "REVOKE SELECT ON t FROM bob",
            "VACUUM t",
            "ANALYZE t",
            "ANALYZE",
            "REFRESH MATERIALIZED VIEW v",
            "CLUSTER t",
            "REINDEX TABLE t",
            "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
            "LISTEN c",
            "UNLISTEN *",
            "NOTIFY c, 'x'",
            "CALL p(1)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "COPY t FROM STDIN",
            "COPY t TO '/tmp/x'",
            "COPY (DELETE FROM t RETURNING *) TO STDOUT",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "CHECKPOINT",
            "EXECUTE p(1)",
            "SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
        ],
    );
}

#[test]
fn writes_hidden_in_reads() {
    assert_kind(
        Kind::Write,
        &[
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR NO KEY UPDATE",
            "SELECT * FROM t FOR SHARE",
            "SELECT * FROM t FOR KEY SHARE",
            "SELECT * FROM t FOR UPDATE SKIP LOCKED",
            "SELECT * INTO t2 FROM t",
            "SELECT * FROM (SELECT * FROM t FOR UPDATE) x",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            "WITH a AS (SELECT 1), b AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM a",
            "WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x",
            "EXPLAIN ANALYZE DELETE FROM t",
            "EXPLAIN (ANALYZE) INSERT INTO t VALUES (1)",
            "EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = 1",
            "SELECT 1; DELETE FROM t",
            "DELETE FROM t; SELECT 1",
            "TABLE t; DELETE FROM t",
        ],
    );
}

#[test]
fn write_functions_anywhere() {
    assert_kind(
        Kind::Write,
        &[
            "SELECT nextval('s')",
            "SELECT NEXTVAL('s')",
            "SELECT pg_catalog.nextval('s')",
            "SELECT setval('s', 1), currval('s'), lastval()",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_advisory_xact_lock_shared(1)",
            "SELECT pg_try_advisory_lock(1)",
            "SELECT pg_advisory_unlock_all()",
            "SELECT pg_notify('c', 'x')",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT lo_create(0)",
            "SELECT lo_unlink(1)",
            "SELECT txid_current()",
            "SELECT pg_current_xact_id()",
            "SELECT pg_switch_wal()",
            "SELECT * FROM t WHERE a = nextval('s')",
            "SELECT coalesce(1 + nextval('s'), 0)",
            "SELECT (SELECT nextval('s'))",
            "SELECT * FROM t WHERE a IN (SELECT nextval('s'))",
            "SELECT * FROM nextval('s')",
            "SELECT * FROM t, LATERAL nextval('s') n",
            "SELECT * FROM generate_series(1, nextval('s')) g",
            "WITH x AS (SELECT nextval('s')) SELECT * FROM x",
            "SELECT CASE WHEN a THEN pg_advisory_lock(1) END FROM t",
            "SELECT sum(nextval('s')) OVER () FROM t",
            "EXPLAIN ANALYZE SELECT nextval('s')",
        ],
    );
}

#[test]
fn extra_and_unknown_functions() {
    let extra = vec!["audit_log".to_string(), "App.Bump".to_string()];
    let k = Classifier::new(8, &extra, false);
    let w = |sql| k.classify(sql).map(|r| r.kind);
    assert_eq!(w("SELECT audit_log(1)"), Ok(Kind::Write));
    assert_eq!(w("SELECT public.AUDIT_LOG(1)"), Ok(Kind::Write));
    assert_eq!(w("SELECT app.bump()"), Ok(Kind::Write));
    assert_eq!(w("SELECT bump()"), Ok(Kind::Read));
    assert_eq!(w("SELECT my_func(1)"), Ok(Kind::Read));

    let strict = Classifier::new(8, &[], true);
    let s = |sql| strict.classify(sql).map(|r| r.kind);
    assert_eq!(s("SELECT my_func(1)"), Ok(Kind::Write));
    assert_eq!(s("SELECT * FROM my_srf()"), Ok(Kind::Write));
    assert_eq!(s("SELECT public.lower('A')"), Ok(Kind::Write));
    assert_eq!(
        s("SELECT now(), count(*), sum(a), coalesce(a, 0), lower(b), upper(b), length(b), abs(a) FROM t"),
        Ok(Kind::Read)
    );
    assert_eq!(s("SELECT pg_catalog.lower('A')"), Ok(Kind::Read));
    assert_eq!(s("SELECT 1"), Ok(Kind::Read));
}

#[test]
fn transactions() {
    assert_kind(
        Kind::BeginReadOnly,
        &["BEGIN READ ONLY", "START TRANSACTION READ ONLY", "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY"],
    );
    assert_kind(
        Kind::Begin,
        &[
            "BEGIN",
            "begin transaction",
            "START TRANSACTION",
            "BEGIN READ WRITE",
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
        ],
    );
    assert_kind(Kind::TxnEnd, &["COMMIT", "ROLLBACK", "END", "ABORT", "commit work", "COMMIT; COMMIT"]);
    assert_kind(
        Kind::SetLocal,
        &[
            "SET LOCAL statement_timeout = 0",
            "SET LOCAL ROLE bob",
            "SET TRANSACTION READ ONLY",
            "SET LOCAL TIME ZONE 'UTC'",
        ],
    );
}

#[test]
fn session_state() {
    assert_eq!(kind("SET search_path TO a, b"), set("search_path", "a, b"));
    assert_eq!(kind("SET Statement_Timeout = '5s'"), set("statement_timeout", "5s"));
    assert_eq!(kind("SET SESSION work_mem = 1024"), set("work_mem", "1024"));
    assert_eq!(kind("SET TIME ZONE 'UTC'"), set("timezone", "UTC"));
    assert_eq!(kind("RESET ALL"), Kind::SessionState(SessionKind::Reset(None)));
    assert_eq!(kind("RESET Work_Mem"), Kind::SessionState(SessionKind::Reset(Some("work_mem".into()))));
    assert_eq!(kind("DISCARD ALL"), Kind::SessionState(SessionKind::Discard));
    assert_eq!(kind("LOAD 'auto_explain'"), Kind::SessionState(SessionKind::Load));
    assert_eq!(kind("SET ROLE bob"), Kind::SessionState(SessionKind::Role));
    assert_eq!(kind("SET SESSION AUTHORIZATION bob"), Kind::SessionState(SessionKind::Role));
    assert_eq!(kind("PREPARE p AS SELECT 1"), Kind::SessionState(SessionKind::Prepare));
    assert_eq!(kind("DEALLOCATE p"), Kind::SessionState(SessionKind::Deallocate));
    assert_eq!(kind("DEALLOCATE ALL"), Kind::SessionState(SessionKind::Deallocate));
}

#[test]
fn mixed_kinds_are_writes() {
    let r = c().classify("BEGIN; SELECT 1; COMMIT").unwrap();
    assert_eq!((r.kind, r.statements), (Kind::Write, 3));
    assert_eq!(kind("SET a = 1; SELECT 1"), Kind::Write);
    assert_eq!(c().classify("SELECT 1; SELECT 2; VALUES (3)").unwrap().statements, 3);
}

#[test]
fn empty_input() {
    for q in ["", "   ", ";", "-- just a comment\n", "/* c */"] {
        let r = c().classify(q).unwrap();
        assert_eq!(r.kind, Kind::Read, "{q:?}");
        assert!(r.statements <= 1, "{q:?}");
    }
}

#[test]
fn hints() {
    let h = |sql| c().classify(sql).map(|r| r.hint);
    assert_eq!(h("/* pgmux: primary */ SELECT 1"), Ok(Some(Hint::Primary)));
    assert_eq!(h("/*pgmux:replica*/SELECT 1"), Ok(Some(Hint::Replica)));
    assert_eq!(h("/*  PGMUX :  Replica  */ SELECT 1"), Ok(Some(Hint::Replica)));
    assert_eq!(h("/* pgmux: shard=3 */ SELECT 1"), Ok(Some(Hint::Shard(3))));
    assert_eq!(h("/* pgmux: SHARD = 7 */ SELECT 1"), Ok(Some(Hint::Shard(7))));
    assert_eq!(h("/* pgmux: key=42 */ SELECT 1"), Ok(Some(Hint::Key("42".into()))));
    assert_eq!(h("/* pgmux: key = Ab-c */ SELECT 1"), Ok(Some(Hint::Key("Ab-c".into()))));
    assert_eq!(h("-- pgmux: primary\nSELECT 1"), Ok(Some(Hint::Primary)));
    assert_eq!(h("  -- other\n/* note */ -- pgmux: replica\n SELECT 1"), Ok(Some(Hint::Replica)));
    assert_eq!(h("/* outer /* pgmux: primary */ still */ SELECT 1"), Ok(None));
    assert_eq!(h("/* not a hint */ SELECT 1"), Ok(None));
    assert_eq!(h("SELECT /* pgmux: primary */ 1"), Ok(None));
    assert_eq!(h("SELECT 1 -- pgmux: bogus"), Ok(None));
    assert_eq!(h("/* pgmux: bogus */ SELECT 1"), Err(ClassifyError::UnknownHint("bogus".into())));
    assert_eq!(h("/* pgmux: shard=x */ SELECT 1"), Err(ClassifyError::UnknownHint("shard=x".into())));
    assert_eq!(h("/* pgmux: shard=-1 */ SELECT 1"), Err(ClassifyError::UnknownHint("shard=-1".into())));
    assert_eq!(h("/* pgmux: key= */ SELECT 1"), Err(ClassifyError::UnknownHint("key=".into())));
    assert_eq!(h("-- pgmux:\nSELECT 1"), Err(ClassifyError::UnknownHint(String::new())));
    // The hint does not change the kind.
    assert_eq!(kind("/* pgmux: replica */ DELETE FROM t"), Kind::Write);
    let msg = ClassifyError::UnknownHint("x".into()).to_string();
    assert_eq!(msg, "unknown pgmux hint \"x\" (use primary, replica, shard=N or key=V)");
}

#[test]
fn cache_avoids_reparse() {
    let k = Classifier::new(4, &[], false);
    let first = k.classify("SELECT 1").unwrap();
    assert_eq!((k.parses(), k.cache_len()), (1, 1));
    for _ in 0..10 {
        assert_eq!(k.classify("SELECT 1").unwrap(), first);
    }
    assert_eq!((k.parses(), k.cache_len()), (1, 1));
    // Keyed by exact text.
    k.classify("select 1").unwrap();
    assert_eq!((k.parses(), k.cache_len()), (2, 2));
    // Errors are cached too.
    let bad = "/* pgmux: nope */ SELECT 1";
    assert!(k.classify(bad).is_err());
    assert_eq!(k.classify(bad), Err(ClassifyError::UnknownHint("nope".into())));
    assert_eq!(k.cache_len(), 3);
}

#[test]
fn cache_is_lru_bounded() {
    let k = Classifier::new(2, &[], false);
    k.classify("SELECT 1").unwrap();
    k.classify("SELECT 2").unwrap();
    k.classify("SELECT 1").unwrap(); // 1 is now most recent
    k.classify("SELECT 3").unwrap(); // evicts 2
    assert_eq!((k.cache_len(), k.parses()), (2, 3));
    k.classify("SELECT 1").unwrap();
    assert_eq!(k.parses(), 3);
    k.classify("SELECT 2").unwrap();
    assert_eq!((k.cache_len(), k.parses()), (2, 4));

    let none = Classifier::new(0, &[], false);
    none.classify("SELECT 1").unwrap();
    none.classify("SELECT 1").unwrap();
    assert_eq!((none.cache_len(), none.parses()), (0, 2));

    let big = format!("SELECT {}", "1 + ".repeat(MAX_CACHED_LEN / 4) + "1");
    assert_eq!(k.classify(&big).unwrap().kind, Kind::Read);
    assert_eq!(k.cache_len(), 2);
}

#[test]
fn never_panics_on_garbage() {
    let k = Classifier::new(16, &[], false);
    let mut inputs: Vec<String> = [
        "SELEC 1",
        "SELECT * FROM",
        "SELECT 'unterminated",
        "SELECT \"unterminated",
        "SELECT $$unterminated",
        "SELECT $tag$ x $other$",
        "/* unterminated comment",
        "/* /* nested unterminated */ SELECT 1",
        "-- only a line comment without newline",
        "/* pgmux: primary",
        ")))(((",
        ";;;;",
        "\0\0\0",
        "SELECT E'\\",
        "SELECT U&'\\",
        "💥 SELECT 1 ✓",
        "/* pgmux: key=é */ SELECT 1",
        "/*é*/SELECT 1",
        "--é",
        "/",
        "-",
        "/*",
        "*/",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    inputs.push("(".repeat(10_000) + &")".repeat(10_000));
    inputs.push(format!("SELECT {}1{}", "(".repeat(5_000), ")".repeat(5_000)));
    inputs.push(format!("SELECT {}", "a + ".repeat(50_000)));
    inputs.push("SELECT 1; ".repeat(20_000));
    inputs.push("x".repeat(1 << 20));
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    inputs.push(String::from_utf8_lossy(&bytes).into_owned());
    for input in &inputs {
        // Must not panic; whatever it makes of garbage, it is never a hint error
        // unless a pgmux comment says something unknown.
        let _ = k.classify(input);
    }
    let w = |sql: &str| k.classify(sql).map(|r| r.kind);
    for bad in ["SELEC 1", "SELECT 'unterminated", "/* unterminated comment", "/* /* nested */ SELECT 1", "💥 SELECT 1"]
    {
        assert_eq!(w(bad), Ok(Kind::Write), "{bad:?}");
    }
    assert_eq!(w(&"x".repeat(1 << 20)), Ok(Kind::Write));
    // Deep operator chains are not parsed (their AST would overflow the stack).
    assert_eq!(w(&format!("SELECT {}1", "1+".repeat(200_000))), Ok(Kind::Write));
    assert_eq!(w(&format!("SELECT 1 FROM t WHERE {}true", "a = 1 AND ".repeat(5_000))), Ok(Kind::Write));
    assert_eq!(w(&format!("SELECT {}1", "1+".repeat(4_000))), Ok(Kind::Read));
    // A long IN list has no operator chain and is still a read.
    let ids: Vec<String> = (0..5_000).map(|i| i.to_string()).collect();
    assert_eq!(w(&format!("SELECT * FROM t WHERE id IN ({})", ids.join(", "))), Ok(Kind::Read));
    assert_eq!(w(&"SELECT 1; ".repeat(20_000)), Ok(Kind::Read));
    assert_eq!(w("/*é*/SELECT 'é'"), Ok(Kind::Read));
    let r = k.classify("/* pgmux: key=é */ SELECT 1").unwrap();
    assert_eq!(r.hint, Some(Hint::Key("é".into())));
}

#[test]
fn route_of_kind() {
    assert_eq!(Kind::Read.route(), Route::Replica);
    assert_eq!(Kind::Write.route(), Route::Primary);
    assert_eq!(Kind::SetLocal.route(), Route::Primary);
}
