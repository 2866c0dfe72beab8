//! Whether a read candidate writes: the walk that looks for what writes
//! inside a query (data-modifying CTEs, locking clauses, `SELECT ... INTO`,
//! calls of write functions), and which functions write (built-in lists,
//! `write_functions`, `functions_are_writes`).

use std::ops::ControlFlow;

use sqlparser::ast::{Expr, ObjectName, Query, SetExpr, Statement, TableFactor, Visit, Visitor};

use super::{Classifier, Kind};

/// Functions with side effects (matched on the unqualified, lower-cased name).
#[rustfmt::skip]
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval", "setval", "currval", "lastval", "pg_notify", "set_config", "txid_current", "pg_current_xact_id",
    "pg_switch_wal",
];
/// Name prefixes of functions with side effects.
const WRITE_PREFIXES: &[&str] = &["pg_advisory_", "pg_try_advisory_", "lo_"];

/// Functions known to be read-only, for `functions_are_writes = true`.
#[rustfmt::skip]
const READ_ONLY_FUNCTIONS: &[&str] = &[
    "abs", "array_agg", "array_length", "avg", "bool_and", "bool_or", "btrim", "cardinality", "ceil", "ceiling",
    "char_length", "clock_timestamp", "coalesce", "concat", "concat_ws", "count", "current_database", "current_date",
    "current_schema", "current_time", "current_timestamp", "current_user", "date_part", "date_trunc", "dense_rank",
    "every", "extract", "floor", "format", "generate_series", "greatest", "json_agg", "json_build_object",
    "jsonb_agg", "jsonb_build_object", "lag", "lead", "least", "left", "length", "localtime", "localtimestamp",
    "lower", "ltrim", "max", "md5", "min", "mod", "now", "nullif", "position", "power", "random", "rank", "replace",
    "right", "round", "row_number", "row_to_json", "rtrim", "session_user", "sqrt", "statement_timestamp",
    "string_agg", "substr", "substring", "sum", "to_char", "to_date", "to_json", "to_jsonb", "to_timestamp",
    "transaction_timestamp", "trim", "unnest", "upper", "version", "inet_server_port", "inet_server_addr",
    "inet_client_addr", "pg_backend_pid", "pg_is_in_recovery", "pg_postmaster_start_time", "pg_typeof",
    "pg_last_wal_replay_lsn", "pg_last_wal_receive_lsn", "pg_last_xact_replay_timestamp", "current_setting",
];

impl Classifier {
    /// `Read` unless something inside `node` writes (see [`WriteFinder`]).
    pub(super) fn read_unless_writes<V: Visit>(&self, node: &V) -> Kind {
        let mut finder = WriteFinder { classifier: self };
        match node.visit(&mut finder) {
            ControlFlow::Continue(()) => Kind::Read,
            ControlFlow::Break(()) => Kind::Write,
        }
    }

    /// Whether calling the function `name` must go to the primary.
    fn is_write_function(&self, name: &ObjectName) -> bool {
        let parts: Vec<String> =
            name.0.iter().map(|p| p.as_ident().map_or_else(|| p.to_string(), |i| i.value.clone())).collect();
        let Some(last) = parts.last().map(|s| s.to_ascii_lowercase()) else {
            return true;
        };
        if WRITE_FUNCTIONS.contains(&last.as_str()) || WRITE_PREFIXES.iter().any(|p| last.starts_with(p)) {
            return true;
        }
        if !self.extra_write_functions.is_empty() {
            let full = parts.join(".").to_ascii_lowercase();
            let hit = |f: &String| if f.contains('.') { *f == full } else { *f == last };
            if self.extra_write_functions.iter().any(hit) {
                return true;
            }
        }
        if self.functions_are_writes {
            let builtin = parts.len() == 1 || (parts.len() == 2 && parts[0].eq_ignore_ascii_case("pg_catalog"));
            return !(builtin && READ_ONLY_FUNCTIONS.contains(&last.as_str()));
        }
        false
    }
}

/// Walks a read candidate and breaks at the first thing that writes: a
/// data-modifying statement (CTE), a locking clause, `SELECT ... INTO`, or a
/// call of a write function anywhere (expressions or FROM-clause functions).
struct WriteFinder<'a> {
    classifier: &'a Classifier,
}

impl Visitor for WriteFinder<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() || set_expr_writes(&query.body) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        match stmt {
            Statement::Query(_) => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        let name = match factor {
            TableFactor::Table { name, args: Some(_), .. } | TableFactor::Function { name, .. } => name,
            _ => return ControlFlow::Continue(()),
        };
        if self.classifier.is_write_function(name) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            if self.classifier.is_write_function(&f.name) {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}

/// A body that writes by itself: INSERT/UPDATE/DELETE/MERGE or SELECT INTO.
fn set_expr_writes(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => set_expr_writes(left) || set_expr_writes(right),
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::Query(_) | SetExpr::Values(_) | SetExpr::Table(_) => false,
    }
}
