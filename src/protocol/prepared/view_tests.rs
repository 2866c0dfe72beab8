use super::*;

const SUB0: &str = "(SELECT name, statement, prepare_time, parameter_types, from_sql, generic_plans, custom_plans \
     FROM pg_catalog.pg_prepared_statements WHERE NOT pg_catalog.starts_with(name, 'pgmux_'))";

fn none() -> Vec<(String, String, String)> {
    Vec::new()
}

fn two() -> Vec<(String, String, String)> {
    vec![
        ("s1".into(), "pgmux_00000000000000a1".into(), "SELECT 1".into()),
        ("it's".into(), "pgmux_00000000000000b2".into(), "SELECT 'x', $1::int".into()),
    ]
}

/// The rewrite with no own statements, the derived table shown as `V`.
fn short(sql: &str) -> Option<String> {
    rewrite(sql, &none()).map(|s| s.replace(SUB0, "V"))
}

#[test]
fn untouched_without_the_name() {
    assert_eq!(rewrite("SELECT 1", &two()), None);
    assert_eq!(rewrite("", &two()), None);
    assert_eq!(rewrite("SELECT * FROM pg_stat_activity", &two()), None);
}

#[test]
fn untouched_inside_literals_comments_and_identifiers() {
    for sql in [
        "SELECT 'pg_prepared_statements'",
        "SELECT 'it''s FROM pg_prepared_statements'",
        "SELECT E'\\' FROM pg_prepared_statements'",
        "SELECT e'x\\\\' || 'FROM pg_prepared_statements'",
        "SELECT $$ FROM pg_prepared_statements $$",
        "SELECT $fn$ SELECT $$ $x$ FROM pg_prepared_statements $fn$",
        "SELECT 1 -- FROM pg_prepared_statements",
        "SELECT 1 /* FROM /* nested */ pg_prepared_statements */",
        "SELECT * FROM \"PG_PREPARED_STATEMENTS\"",
        "SELECT * FROM \"pg_prepared_statements \"",
        "SELECT * FROM \"x\"\"pg_prepared_statements\"",
        "SELECT * FROM 'pg_prepared_statements",
    ] {
        assert_eq!(rewrite(sql, &two()), None, "{sql}");
    }
}

#[test]
fn untouched_outside_a_relation_position() {
    for sql in [
        "SELECT pg_prepared_statements.name FROM t",
        "SELECT 1 AS pg_prepared_statements",
        "SELECT x::pg_prepared_statements FROM t",
        "UPDATE pg_prepared_statements SET name = 'x'",
        "LOCK TABLE pg_prepared_statements",
        "CREATE TABLE pg_prepared_statements (a int)",
        "SELECT * FROM ONLY pg_prepared_statements",
        "SELECT * FROM myschema.pg_prepared_statements",
        "SELECT * FROM pg_catalog.pg_prepared_statements.x",
        "SELECT a, pg_prepared_statements FROM t",
        "SELECT * FROM f(1, pg_prepared_statements)",
        "SELECT * FROM t pg_prepared_statements",
        "SELECT * FROM t WHERE x = $1 OR pg_prepared_statements",
        "SELECT pg_prepared_statement()",
        "SELECT * FROM pg_prepared_statement() WITH ORDINALITY",
        "SELECT * FROM pg_prepared_statement",
        "SELECT * FROM myschema.pg_prepared_statement()",
    ] {
        assert_eq!(rewrite(sql, &two()), None, "{sql}");
    }
}

#[test]
fn plain_forms() {
    assert_eq!(
        short("SELECT * FROM pg_prepared_statements").as_deref(),
        Some("SELECT * FROM V AS pg_prepared_statements")
    );
    assert_eq!(
        short("SELECT count(*) FROM pg_prepared_statements").as_deref(),
        Some("SELECT count(*) FROM V AS pg_prepared_statements")
    );
    assert_eq!(
        short("SELECT statement FROM pg_prepared_statements WHERE name = 'x'").as_deref(),
        Some("SELECT statement FROM V AS pg_prepared_statements WHERE name = 'x'")
    );
    assert_eq!(
        short("select * from pg_prepared_statements;").as_deref(),
        Some("select * from V AS pg_prepared_statements;")
    );
    assert_eq!(
        short("SELECT pg_prepared_statements.name FROM pg_prepared_statements ORDER BY 1").as_deref(),
        Some("SELECT pg_prepared_statements.name FROM V AS pg_prepared_statements ORDER BY 1")
    );
}

#[test]
fn qualified_quoted_and_mixed_case() {
    for (sql, want) in [
        ("SELECT * FROM pg_catalog.pg_prepared_statements", "SELECT * FROM V AS pg_prepared_statements"),
        ("SELECT * FROM PG_CATALOG . PG_Prepared_Statements", "SELECT * FROM V AS pg_prepared_statements"),
        ("SELECT * FROM \"pg_catalog\".\"pg_prepared_statements\"", "SELECT * FROM V AS pg_prepared_statements"),
        ("SELECT * FROM \"pg_prepared_statements\"", "SELECT * FROM V AS pg_prepared_statements"),
        ("SELECT * FROM pg_catalog/* c */.pg_prepared_statements", "SELECT * FROM V AS pg_prepared_statements"),
        ("SELECT * FROM Pg_Prepared_Statements", "SELECT * FROM V AS pg_prepared_statements"),
    ] {
        assert_eq!(short(sql).as_deref(), Some(want), "{sql}");
    }
}

#[test]
fn alias_kept() {
    for (sql, want) in [
        ("SELECT p.name FROM pg_prepared_statements p", "SELECT p.name FROM V p"),
        ("SELECT p.name FROM pg_prepared_statements AS p WHERE true", "SELECT p.name FROM V AS p WHERE true"),
        ("SELECT * FROM pg_prepared_statements \"P\"", "SELECT * FROM V \"P\""),
        ("SELECT * FROM pg_prepared_statements p(a, b)", "SELECT * FROM V p(a, b)"),
        ("SELECT * FROM pg_catalog.pg_prepared_statements x", "SELECT * FROM V x"),
        (
            "SELECT * FROM pg_prepared_statements JOIN t ON true",
            "SELECT * FROM V AS pg_prepared_statements JOIN t ON true",
        ),
        (
            "SELECT * FROM pg_prepared_statements LEFT JOIN t USING (name)",
            "SELECT * FROM V AS pg_prepared_statements LEFT JOIN t USING (name)",
        ),
        (
            "SELECT * FROM pg_prepared_statements UNION ALL SELECT * FROM t",
            "SELECT * FROM V AS pg_prepared_statements UNION ALL SELECT * FROM t",
        ),
        ("SELECT * FROM pg_prepared_statements LIMIT 1", "SELECT * FROM V AS pg_prepared_statements LIMIT 1"),
        ("SELECT * FROM pg_prepared_statements)", "SELECT * FROM V AS pg_prepared_statements)"),
    ] {
        assert_eq!(short(sql).as_deref(), Some(want), "{sql}");
    }
}

#[test]
fn every_relation_position() {
    for (sql, want) in [
        ("SELECT * FROM t, pg_prepared_statements", "SELECT * FROM t, V AS pg_prepared_statements"),
        ("SELECT * FROM t a, pg_prepared_statements b", "SELECT * FROM t a, V b"),
        ("SELECT * FROM f(1, 2), pg_prepared_statements", "SELECT * FROM f(1, 2), V AS pg_prepared_statements"),
        ("SELECT * FROM t JOIN pg_prepared_statements p ON true", "SELECT * FROM t JOIN V p ON true"),
        (
            "SELECT * FROM t JOIN u ON (t.a = u.a), pg_prepared_statements",
            "SELECT * FROM t JOIN u ON (t.a = u.a), V AS pg_prepared_statements",
        ),
        (
            "SELECT (SELECT count(*) FROM pg_prepared_statements), 1",
            "SELECT (SELECT count(*) FROM V AS pg_prepared_statements), 1",
        ),
        (
            "WITH x AS (SELECT * FROM pg_prepared_statements) SELECT * FROM x",
            "WITH x AS (SELECT * FROM V AS pg_prepared_statements) SELECT * FROM x",
        ),
        ("TABLE pg_prepared_statements", "SELECT * FROM V AS pg_prepared_statements"),
        ("SELECT 1; table PG_CATALOG.pg_prepared_statements", "SELECT 1; SELECT * FROM V AS pg_prepared_statements"),
        ("(TABLE pg_prepared_statements)", "(SELECT * FROM V AS pg_prepared_statements)"),
        ("TABLE t UNION TABLE pg_prepared_statements", "TABLE t UNION SELECT * FROM V AS pg_prepared_statements"),
        (
            "SELECT * FROM pg_prepared_statements a, pg_catalog.pg_prepared_statements",
            "SELECT * FROM V a, V AS pg_prepared_statements",
        ),
        ("SELECT $1 FROM pg_prepared_statements", "SELECT $1 FROM V AS pg_prepared_statements"),
        (
            "SELECT 'FROM pg_prepared_statements', $$x$$ FROM pg_prepared_statements -- pg_prepared_statements",
            "SELECT 'FROM pg_prepared_statements', $$x$$ FROM V AS pg_prepared_statements -- pg_prepared_statements",
        ),
        ("SELECT 'é' FROM pg_prepared_statements", "SELECT 'é' FROM V AS pg_prepared_statements"),
        // The function behind the view.
        ("SELECT name FROM pg_prepared_statement()", "SELECT name FROM V AS pg_prepared_statement"),
        ("SELECT * FROM pg_catalog.pg_prepared_statement ( ) p", "SELECT * FROM V p"),
        (
            "SELECT pg_prepared_statement.name FROM t, PG_PREPARED_STATEMENT()",
            "SELECT pg_prepared_statement.name FROM t, V AS pg_prepared_statement",
        ),
    ] {
        assert_eq!(short(sql).as_deref(), Some(want), "{sql}");
    }
}

#[test]
fn not_a_relation_after_the_from_list() {
    assert_eq!(
        short("SELECT * FROM t WHERE a IN (1, 2) AND pg_prepared_statements IS NULL"),
        None,
        "a comma after WHERE is not in the FROM list"
    );
    assert_eq!(short("SELECT 1; SELECT a, pg_prepared_statements FROM t"), None);
}

#[test]
fn own_statements_listed_and_quoted() {
    let out = rewrite("SELECT * FROM pg_prepared_statements", &two()).unwrap_or_default();
    assert!(out.starts_with("SELECT * FROM (SELECT c.name, c.statement, "), "{out}");
    assert!(out.ends_with(" AS pg_prepared_statements"), "{out}");
    assert!(
        out.contains(
            "FROM (VALUES ('s1', 'pgmux_00000000000000a1', 'SELECT 1'), \
             ('it''s', 'pgmux_00000000000000b2', 'SELECT ''x'', $1::int')) AS c(name, srv, statement) \
             LEFT JOIN pg_catalog.pg_prepared_statements s ON s.name = c.srv UNION ALL SELECT name, statement,"
        ),
        "{out}"
    );
    assert!(out.contains("WHERE NOT pg_catalog.starts_with(name, 'pgmux_'))"), "{out}");
}

#[test]
fn backslashes_and_quotes_in_texts_escaped() {
    let own = vec![("a\\'b".to_string(), "pgmux_0000000000000001".to_string(), "SELECT E'\\n', '\\'".to_string())];
    let out = rewrite("TABLE pg_prepared_statements", &own).unwrap_or_default();
    assert!(out.contains("(VALUES (E'a\\\\''b', 'pgmux_0000000000000001', E'SELECT E''\\\\n'', ''\\\\''')"), "{out}");
}

#[test]
fn zero_statements_read_only_the_real_view() {
    let out = rewrite("SELECT * FROM pg_prepared_statements", &none()).unwrap_or_default();
    assert_eq!(out, format!("SELECT * FROM {SUB0} AS pg_prepared_statements"));
    assert!(!out.contains("VALUES"));
}

#[test]
fn output_names_only_the_qualified_view() {
    let once = rewrite("SELECT * FROM pg_prepared_statements", &two()).unwrap_or_default();
    // The real view only qualified (a second pass would rewrite those too:
    // the function is applied once per message), plus the alias.
    assert_eq!(once.matches("pg_catalog.pg_prepared_statements").count(), 2);
    assert_eq!(once.matches("pg_prepared_statements").count(), 3);
}

#[test]
fn unterminated_input_does_not_panic() {
    for sql in [
        "SELECT * FROM pg_prepared_statements /*",
        "SELECT * FROM pg_prepared_statements '",
        "SELECT * FROM pg_prepared_statements \"",
        "SELECT * FROM pg_prepared_statements $a$",
        "SELECT * FROM pg_prepared_statements E'\\",
        "SELECT * FROM pg_catalog.",
        "SELECT * FROM pg_catalog. pg_prepared_statements.",
        "FROM pg_prepared_statements $",
    ] {
        let _ = rewrite(sql, &two());
    }
    assert_eq!(
        short("SELECT * FROM pg_prepared_statements /* pg_prepared_statements").as_deref(),
        Some("SELECT * FROM V AS pg_prepared_statements /* pg_prepared_statements")
    );
}
