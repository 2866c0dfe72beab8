//! Which shards a statement needs, from its AST: the sharded tables it
//! names and the values its top-level `WHERE` (or `INSERT ... VALUES`)
//! gives their key columns — literals, `$n` parameters (resolved from the
//! Bind), `IN (...)` lists, `AND`/`OR` of those.

use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, ObjectName, Query, SetExpr, Statement, TableObject, UnaryOperator, Value, Visit,
    Visitor,
};

/// A key value as written: a literal's text, or parameter `$n` (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyExpr {
    Lit(String),
    Param(usize),
    /// The `n`-th literal of the text (in a cached analysis of a shape).
    LitAt(usize),
}

/// What a statement needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// No sharded table: any shard serves it (reference tables, catalogs,
    /// `SELECT 1`).
    Unsharded,
    /// The shards of these keys of map `map`.
    Keys { map: usize, keys: Vec<KeyExpr> },
    /// Sharded tables (of map `map`) without a usable key: every shard.
    All { map: usize },
    /// Tables sharded by different maps in one statement.
    Mixed(Vec<String>),
    /// An INSERT without a column list, or without the key: its key's
    /// place (or whether the database makes it) needs this table's columns
    /// (see [`Tables::columns`]).
    Columns(String),
    /// An INSERT into a table of map `map` whose key the database makes
    /// (`pgmux_next_id`): any shard.
    Made { map: usize },
}

/// Sharded-table lookup: lower-cased table name (unqualified) → (key
/// column, lower-cased; map index).
pub trait Tables {
    fn sharded(&self, table: &str) -> Option<(&str, usize)>;
    /// A sharded table's columns in order, if known.
    fn columns(&self, _table: &str) -> Option<std::sync::Arc<[String]>> {
        None
    }
    /// Whether a sharded table's key is made by `pgmux_next_id`, if known.
    fn made_key(&self, _table: &str) -> Option<bool> {
        Some(false)
    }
}

fn last_ident(name: &ObjectName) -> String {
    name.0.last().and_then(|p| p.as_ident()).map(|i| fold(&i.value, i.quote_style.is_some())).unwrap_or_default()
}

fn fold(s: &str, quoted: bool) -> String {
    if quoted {
        s.to_string()
    } else {
        s.to_lowercase()
    }
}

struct Relations<'a, T: Tables> {
    tables: &'a T,
    /// (table, key column, map)
    found: Vec<(String, String, usize)>,
}

impl<T: Tables> Visitor for Relations<'_, T> {
    type Break = ();
    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let name = last_ident(relation);
        if let Some((key, map)) = self.tables.sharded(&name) {
            self.found.push((name, key.to_string(), map));
        }
        ControlFlow::Continue(())
    }
}

struct Names(Vec<String>);

impl Visitor for Names {
    type Break = ();
    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.0.push(last_ident(relation));
        ControlFlow::Continue(())
    }
}

/// Every table (or view) the statement names, unqualified, folded.
pub fn relations(stmt: &Statement) -> Vec<String> {
    let mut names = Names(Vec::new());
    let _ = stmt.visit(&mut names);
    names.0
}

/// The table an INSERT, UPDATE or DELETE writes.
pub fn write_target(stmt: &Statement) -> Option<String> {
    match stmt {
        Statement::Insert(i) => match &i.table {
            TableObject::TableName(n) => Some(last_ident(n)),
            _ => None,
        },
        Statement::Update(u) => match &u.table.relation {
            sqlparser::ast::TableFactor::Table { name, .. } => Some(last_ident(name)),
            _ => None,
        },
        Statement::Delete(d) => {
            let from = match &d.from {
                sqlparser::ast::FromTable::WithFromKeyword(t) | sqlparser::ast::FromTable::WithoutKeyword(t) => t,
            };
            match &from.first()?.relation {
                sqlparser::ast::TableFactor::Table { name, .. } => Some(last_ident(name)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// An UPDATE of a sharded table that assigns its shard key: (table, key
/// column), both folded.
pub fn sets_key(stmt: &Statement, tables: &impl Tables) -> Option<(String, String)> {
    let Statement::Update(u) = stmt else { return None };
    let table = write_target(stmt)?;
    let (key, _) = tables.sharded(&table)?;
    assigns(&u.assignments, key).then(|| (table, key.to_string()))
}

/// The scope of one statement.
pub fn scope(stmt: &Statement, tables: &impl Tables) -> Scope {
    let mut rel = Relations { tables, found: Vec::new() };
    let _ = stmt.visit(&mut rel);
    let Some(map) = rel.found.first().map(|f| f.2) else { return Scope::Unsharded };
    if rel.found.iter().any(|f| f.2 != map) {
        let mut names: Vec<String> = rel.found.into_iter().map(|f| f.0).collect();
        names.dedup();
        return Scope::Mixed(names);
    }
    let key_cols: Vec<&str> = rel.found.iter().map(|f| f.1.as_str()).collect();
    let keys = match stmt {
        Statement::Query(q) => query_keys(q, &key_cols),
        Statement::Update(u) => u.selection.as_ref().and_then(|e| keys_in(e, &key_cols)),
        Statement::Delete(d) => d.selection.as_ref().and_then(|e| keys_in(e, &key_cols)),
        Statement::Insert(i) => match insert_keys(i, tables) {
            Err(scope) => return scope,
            Ok(keys) => keys,
        },
        _ => None,
    };
    match keys {
        Some(keys) if !keys.is_empty() => Scope::Keys { map, keys },
        _ => Scope::All { map },
    }
}

fn query_keys(q: &Query, key_cols: &[&str]) -> Option<Vec<KeyExpr>> {
    match q.body.as_ref() {
        SetExpr::Select(s) => s.selection.as_ref().and_then(|e| keys_in(e, key_cols)),
        SetExpr::Query(inner) => query_keys(inner, key_cols),
        _ => None,
    }
}

/// The key of each VALUES row of an INSERT (None: not every row has
/// one); `Err`: the scope it has instead (its table's columns are needed
/// first, or the database makes its key).
fn insert_keys(i: &sqlparser::ast::Insert, tables: &impl Tables) -> Result<Option<Vec<KeyExpr>>, Scope> {
    let TableObject::TableName(name) = &i.table else { return Ok(None) };
    let table = last_ident(name);
    let Some((key, map)) = tables.sharded(&table) else { return Ok(None) };
    let at = if i.columns.is_empty() {
        match tables.columns(&table) {
            Some(cols) => cols.iter().position(|c| c == key),
            None => return Err(Scope::Columns(table)),
        }
    } else {
        i.columns.iter().position(|c| last_ident(c) == key)
    };
    let Some(at) = at else {
        // The key is left to its default.
        return match tables.made_key(&table) {
            Some(true) => Err(Scope::Made { map }),
            Some(false) => Ok(None),
            None => Err(Scope::Columns(table)),
        };
    };
    let mut body = i.source.as_ref().map(|s| s.body.as_ref());
    while let Some(SetExpr::Query(q)) = body {
        body = Some(q.body.as_ref());
    }
    Ok(match body {
        Some(SetExpr::Values(values)) => values.rows.iter().map(|row| row.get(at).and_then(value)).collect(),
        // INSERT ... SELECT: every row has the key the select list gives
        // it as a constant (see [`insert_select`]).
        Some(SetExpr::Select(s)) => selected_key(s, at).map(|k| vec![k]),
        _ => None,
    })
}

/// The constant the `at`-th item of a select list is, if it is one (and
/// no wildcard before it hides its place).
fn selected_key(s: &sqlparser::ast::Select, at: usize) -> Option<KeyExpr> {
    use sqlparser::ast::SelectItem;
    match s.projection.get(..=at)? {
        [.., SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }]
            if s.projection[..at]
                .iter()
                .all(|i| matches!(i, SelectItem::UnnamedExpr(_) | SelectItem::ExprWithAlias { .. })) =>
        {
            value(e)
        }
        _ => None,
    }
}

/// The tables an `INSERT ... SELECT` reads, when it is one (functions in
/// its `FROM`, such as `generate_series`, are not tables): its rows are
/// made on the shard their key (a constant of the select list) names,
/// which must hold every table they are read from.
pub fn insert_select(stmt: &Statement) -> Option<Vec<String>> {
    let Statement::Insert(i) = stmt else { return None };
    let source = i.source.as_ref()?;
    if matches!(source.body.as_ref(), SetExpr::Values(_)) {
        return None;
    }
    let mut tables = FromTables(Vec::new());
    let _ = source.visit(&mut tables);
    Some(tables.0)
}

/// The tables (not functions) of `FROM` clauses, unqualified, folded.
struct FromTables(Vec<String>);

impl Visitor for FromTables {
    type Break = ();
    fn pre_visit_table_factor(&mut self, factor: &sqlparser::ast::TableFactor) -> ControlFlow<()> {
        if let sqlparser::ast::TableFactor::Table { name, args: None, .. } = factor {
            self.0.push(last_ident(name));
        }
        ControlFlow::Continue(())
    }
}

/// Whether an `INSERT ... ON CONFLICT DO UPDATE` into a sharded table
/// assigns its shard key (the row would stay on the shard of its old key).
pub fn conflict_sets_key(stmt: &Statement, tables: &impl Tables) -> bool {
    use sqlparser::ast::{OnConflictAction, OnInsert};
    let Statement::Insert(i) = stmt else { return false };
    let Some(OnInsert::OnConflict(c)) = &i.on else { return false };
    let OnConflictAction::DoUpdate(u) = &c.action else { return false };
    write_target(stmt).and_then(|t| tables.sharded(&t).map(|(key, _)| assigns(&u.assignments, key))) == Some(true)
}

/// Whether `assignments` (of an UPDATE or a DO UPDATE) set column `key`.
fn assigns(assignments: &[sqlparser::ast::Assignment], key: &str) -> bool {
    assignments.iter().any(|a| match &a.target {
        sqlparser::ast::AssignmentTarget::ColumnName(c) => last_ident(c) == key,
        sqlparser::ast::AssignmentTarget::Tuple(cs) => cs.iter().any(|c| last_ident(c) == key),
    })
}

fn is_key(e: &Expr, key_cols: &[&str]) -> bool {
    match e {
        Expr::Identifier(i) => key_cols.contains(&fold(&i.value, i.quote_style.is_some()).as_str()),
        Expr::CompoundIdentifier(parts) => {
            parts.last().is_some_and(|i| key_cols.contains(&fold(&i.value, i.quote_style.is_some()).as_str()))
        }
        Expr::Nested(inner) => is_key(inner, key_cols),
        _ => false,
    }
}

/// A constant key value: a literal (possibly cast or negated) or `$n`.
fn value(e: &Expr) -> Option<KeyExpr> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(KeyExpr::Lit(n.clone())),
            Value::SingleQuotedString(s) => Some(KeyExpr::Lit(s.clone())),
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok().map(KeyExpr::Param),
            _ => None,
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => value(expr),
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match value(expr)? {
            KeyExpr::Lit(n) => Some(KeyExpr::Lit(format!("-{n}"))),
            _ => None,
        },
        _ => None,
    }
}

/// The key values a condition restricts the key to (None: not restricted).
fn keys_in(e: &Expr, key_cols: &[&str]) -> Option<Vec<KeyExpr>> {
    match e {
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            if is_key(left, key_cols) {
                value(right).map(|v| vec![v])
            } else if is_key(right, key_cols) {
                value(left).map(|v| vec![v])
            } else {
                None
            }
        }
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            keys_in(left, key_cols).or_else(|| keys_in(right, key_cols))
        }
        Expr::BinaryOp { left, op: BinaryOperator::Or, right } => {
            let mut l = keys_in(left, key_cols)?;
            l.extend(keys_in(right, key_cols)?);
            Some(l)
        }
        Expr::In { expr, target: InTarget::List(list), negated: false, .. } if is_key(expr, key_cols) => {
            list.iter().map(value).collect()
        }
        Expr::Nested(inner) => keys_in(inner, key_cols),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    struct T;
    impl Tables for T {
        fn sharded(&self, table: &str) -> Option<(&str, usize)> {
            match table {
                "users" => Some(("id", 0)),
                "orders" => Some(("user_id", 0)),
                "events" => Some(("tenant", 1)),
                _ => None,
            }
        }
    }

    fn scope_of(sql: &str) -> Scope {
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
        scope(&stmts[0], &T)
    }

    fn lits(v: &[&str]) -> Vec<KeyExpr> {
        v.iter().map(|s| KeyExpr::Lit(s.to_string())).collect()
    }

    #[test]
    fn keys_from_where_insert_and_params() {
        assert_eq!(scope_of("SELECT * FROM users WHERE id = 42"), Scope::Keys { map: 0, keys: lits(&["42"]) });
        assert_eq!(
            scope_of("SELECT * FROM users u WHERE 7 = u.id AND name = 'x'"),
            Scope::Keys { map: 0, keys: lits(&["7"]) }
        );
        assert_eq!(
            scope_of("SELECT * FROM users WHERE id IN (1, 2) OR id = -3"),
            Scope::Keys { map: 0, keys: lits(&["1", "2", "-3"]) }
        );
        assert_eq!(
            scope_of("UPDATE users SET n = 1 WHERE id = $2"),
            Scope::Keys { map: 0, keys: vec![KeyExpr::Param(2)] }
        );
        assert_eq!(
            scope_of("DELETE FROM orders WHERE user_id = '9'::bigint"),
            Scope::Keys { map: 0, keys: lits(&["9"]) }
        );
        assert_eq!(
            scope_of("INSERT INTO users (name, id) VALUES ('a', 1), ('b', $1)"),
            Scope::Keys { map: 0, keys: vec![KeyExpr::Lit("1".into()), KeyExpr::Param(1)] }
        );
        assert_eq!(scope_of("INSERT INTO users (name, id) SELECT 'a', 7"), Scope::Keys { map: 0, keys: lits(&["7"]) });
        assert_eq!(scope_of("INSERT INTO users (id) SELECT id FROM users"), Scope::All { map: 0 });
        assert_eq!(
            scope_of("INSERT INTO users (id) (SELECT $1)"),
            Scope::Keys { map: 0, keys: vec![KeyExpr::Param(1)] }
        );
        let read = |sql| insert_select(&Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap()[0]);
        assert_eq!(
            read("INSERT INTO t SELECT * FROM a JOIN generate_series(1, 2) g ON true, b"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(read("INSERT INTO t VALUES (1)"), None);
        assert_eq!(scope_of("INSERT INTO users (name, id) SELECT *, 7 FROM x"), Scope::All { map: 0 });
        assert_eq!(
            scope_of("SELECT * FROM users JOIN orders ON orders.user_id = users.id WHERE users.id = 5"),
            Scope::Keys { map: 0, keys: lits(&["5"]) }
        );
    }

    #[test]
    fn no_key_mixed_and_unsharded() {
        assert_eq!(scope_of("SELECT count(*) FROM users"), Scope::All { map: 0 });
        assert_eq!(scope_of("SELECT * FROM users WHERE id > 5"), Scope::All { map: 0 });
        assert_eq!(scope_of("SELECT * FROM users WHERE id = 1 OR name = 'x'"), Scope::All { map: 0 });
        assert_eq!(scope_of("INSERT INTO users VALUES (1, 'a')"), Scope::Columns("users".into()));
        assert_eq!(scope_of("SELECT * FROM countries"), Scope::Unsharded);
        assert_eq!(scope_of("SELECT 1"), Scope::Unsharded);
        assert!(matches!(scope_of("SELECT * FROM users, events WHERE id = 1"), Scope::Mixed(_)));
    }
}
