use super::*;

#[test]
fn literal_shapes() {
    assert_eq!(
        literal_shape("SELECT abalance FROM t1 WHERE aid = 4217 AND name = 'it''s'"),
        "SELECT abalance FROM t1 WHERE aid = 0 AND name = '?'"
    );
    assert_eq!(literal_shape("/* pgmux: primary */ SELECT 1.5"), "/* pgmux: primary */ SELECT 0");
    assert_eq!(literal_shape("SELECT E'a\\'b', x2"), "SELECT E'?', x2");
    assert_eq!(literal_shape("SELECT '"), "SELECT '?'");
    let (shape, lits) = shape_and_literals("INSERT INTO t VALUES (42, 'it''s', x1, 3.5)").unwrap();
    assert_eq!(shape, "INSERT INTO t VALUES (0, '?', x1, 0)");
    assert_eq!(lits, ["42", "it's", "3.5"]);
    assert!(shape_and_literals("SELECT E'a\\'b'").is_none());
}

#[test]
fn splits_statements_outside_quotes_and_comments() {
    let sql = "SET a = 'x;y'; SELECT $$;$$, $t$ ; $t$ -- ;\n; /* ; */ SELECT \"a;b\"";
    assert_eq!(statements(sql).len(), 3, "{:?}", statements(sql));
}

#[test]
fn finds_leading_commands() {
    assert_eq!(leading_command("PREPARE p AS SELECT 1"), Command::Prepare);
    assert_eq!(leading_command("  /* x /* nested */ */ -- c\n execute p(1)"), Command::Execute);
    assert_eq!(leading_command("DEALLOCATE s1"), Command::Deallocate("s1".into()));
    assert_eq!(leading_command("deallocate prepare \"S_1\";"), Command::Deallocate("S_1".into()));
    assert_eq!(leading_command("DEALLOCATE ALL"), Command::Other);
    assert_eq!(leading_command("DEALLOCATE a; SELECT 1"), Command::Other);
    assert_eq!(leading_command("SELECT 'PREPARE'"), Command::Other);
    assert_eq!(leading_command("delete from t"), Command::Other);
    assert_eq!(leading_command(""), Command::Other);
    assert_eq!(leading_command("/* unterminated"), Command::Other);
}

#[test]
fn transaction_ends_and_savepoints() {
    assert_eq!(transaction_end("COMMIT"), Some(TxnEnd::Commit));
    assert_eq!(transaction_end(" end work; "), Some(TxnEnd::Commit));
    assert_eq!(transaction_end("ROLLBACK TRANSACTION"), Some(TxnEnd::Rollback));
    assert_eq!(transaction_end("abort"), Some(TxnEnd::Rollback));
    assert_eq!(transaction_end("/* app */ COMMIT -- done"), Some(TxnEnd::Commit), "comments skipped");
    assert_eq!(transaction_end("-- c\nrollback\n/* x */;"), Some(TxnEnd::Rollback));
    assert_eq!(transaction_end("ROLLBACK TO SAVEPOINT a"), None);
    assert_eq!(transaction_end("COMMIT AND CHAIN"), None);
    assert_eq!(transaction_end("COMMIT; SELECT 1"), None);
    assert_eq!(transaction_end("SELECT 1"), None);
    assert_eq!(TxnEnd::Rollback.tag(), "ROLLBACK");
    assert!(is_savepoint("SAVEPOINT a"));
    assert!(is_savepoint("/* x */ release savepoint a"));
    assert!(is_savepoint("ROLLBACK WORK TO a"));
    assert!(is_savepoint("rollback to savepoint a"));
    assert!(!is_savepoint("ROLLBACK"));
    assert!(!is_savepoint("ROLLBACK WORK"));
    assert!(!is_savepoint("SELECT 'savepoint'"));
    assert!(is_savepoint("  release savepoint a;"));
    assert!(is_savepoint("RELEASE a"));
    assert!(is_savepoint("ROLLBACK TO a"));
    assert!(!is_savepoint("rollback;"));
}
