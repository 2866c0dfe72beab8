use super::*;

#[test]
fn session_pinning_statements() {
    for sql in [
        "LISTEN jobs",
        "select 1; listen \"Jobs\"",
        "CREATE TEMP TABLE t (x int)",
        "create global temporary table t (x int)",
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        "SELECT pg_advisory_lock(42)",
        "select pg_try_advisory_lock_shared(1)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "LOAD 'auto_explain'",
        "SELECT 1; PREPARE p AS SELECT 1",
        "SET ROLE admin",
        "SET SESSION AUTHORIZATION bob",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SELECT set_config('app.tenant', '42', false)",
        "SELECT set_config('a', x, $1)",
    ] {
        assert!(pins_session(sql), "{sql}");
    }
    for sql in [
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT pg_advisory_unlock(1)",
        "CREATE TABLE temp (x int)",
        "SELECT 'listen'",
        "UNLISTEN *",
        "DECLARE c CURSOR FOR SELECT 1",
        "NOTIFY jobs",
        "EXECUTE p",
        "DEALLOCATE p",
        "SET LOCAL ROLE admin",
        "RESET ROLE",
        "SELECT set_config('app.tenant', concat('4', '2'), true)",
        "SELECT SET_CONFIG('a', 'b', TRUE), set_config('c', 'd,e', true)",
    ] {
        assert!(!pins_session(sql), "{sql}");
    }
}

#[test]
fn finds_session_settings() {
    use SettingChange::*;
    let set = |n: &str, v: &str| Set { name: n.into(), value: Some(v.into()) };
    assert_eq!(setting_changes("SET search_path = a, \"B\", public"), vec![set("search_path", "a, \"B\", public")]);
    assert_eq!(setting_changes("set statement_timeout to '5s'; select 1"), vec![set("statement_timeout", "5s")]);
    assert_eq!(setting_changes("SET SESSION work_mem = 65536"), vec![set("work_mem", "65536")]);
    assert_eq!(setting_changes("SET myapp.tenant = 'it''s'"), vec![set("myapp.tenant", "it's")]);
    assert_eq!(setting_changes("SET TIME ZONE 'Europe/Paris'"), vec![set("timezone", "Europe/Paris")]);
    assert_eq!(setting_changes("SET search_path TO DEFAULT"), vec![Reset("search_path".into())]);
    assert_eq!(setting_changes("RESET work_mem; RESET ALL"), vec![Reset("work_mem".into()), ResetAll]);
    assert_eq!(setting_changes("SET LOCAL work_mem = '1MB'"), vec![]);
    assert_eq!(setting_changes("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), vec![]);
    assert_eq!(setting_changes("SET ROLE admin"), vec![]);
    assert_eq!(setting_changes("SET SCHEMA 'x'"), vec![set("search_path", "x")]);
    assert!(needs_full_reset("SET ROLE admin"));
    assert!(needs_full_reset("select 1; SET SESSION AUTHORIZATION bob"));
    assert!(needs_full_reset("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"));
    assert!(needs_full_reset("SELECT set_config('work_mem', '1MB', false)"));
    assert!(!needs_full_reset("SELECT rolname FROM pg_roles"));
    assert_eq!(
        setting_changes("SELECT E'\\''; SET statement_timeout = 5"),
        vec![set("statement_timeout", "5")],
        "E'' escapes do not hide what follows"
    );
    assert_eq!(setting_changes("SELECT 'SET x = 1'"), vec![]);
    assert_eq!(
        setting_changes("SET x = now()"),
        vec![Set { name: "x".into(), value: None }],
        "a value pgmux cannot tell is still a change"
    );
}

#[test]
fn effects_in_one_pass_match_the_checks() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 3",
        "SET search_path = app",
        "reset ALL",
        "LISTEN jobs",
        "SELECT pg_advisory_lock(42)",
        "select pg_try_advisory_lock_shared(1)",
        "SELECT set_config('app.tenant', '42', false)",
        "SET LOCAL ROLE admin",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "CREATE TEMP TABLE t (x int)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "LOAD 'auto_explain'",
        "SELECT 1; PREPARE p AS SELECT 1",
        "SET SESSION AUTHORIZATION bob",
        "SELECT pg_catalog.set_config('a', 'b', false)",
        "select x.role from t x",
        "",
    ] {
        let e = session_effects(sql);
        assert_eq!(e.changes, setting_changes(sql), "{sql}");
        assert_eq!(e.full_reset, needs_full_reset(sql), "{sql}");
        assert_eq!(e.pins, pins_session(sql), "{sql}");
    }
    let marked = |sql: &str| crate::sql::marks::Marks::of(sql.as_bytes()).effects();
    assert!(marked("x LiStEn y"));
    assert!(marked("SELECT pg_catalog.set_config('a', 'b', false)"));
    assert!(!marked("SELECT abalance FROM pgbench_accounts WHERE aid = 1"));
    assert!(!marked("SELECT offset_x FROM unset"));
    assert!(!marked("SELECT * FROM pg_prepared_statements"));
    assert!(!marked(""));
}
