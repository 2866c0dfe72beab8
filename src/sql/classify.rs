//! Statement classifier for read/write splitting.
//!
//! [`Classifier::classify`] takes a simple-query string, reads an optional
//! `pgmux:` routing hint from the comments before its first token, parses the
//! text with `sqlparser` (PostgreSQL dialect) and decides whether it may run on
//! a replica ([`Kind::Read`]) or must go to the primary ([`Kind::Write`]), or
//! whether it is transaction control or session state the pooler must track.
//!
//! Anything the parser rejects or this module does not know is a `Write`: a
//! wrong `Write` costs a little primary load, a wrong `Read` fails or, worse,
//! loses a side effect. Results are cached by the exact text in a bounded LRU.

use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;
use sqlparser::ast::{
    ContextModifier, CopySource, CopyTarget, Expr, Ident, ObjectName, Query, Reset, SetExpr, Statement, TableFactor,
    TransactionAccessMode, TransactionMode, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Where a statement may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Primary,
    Replica,
}

/// What a simple-query string does, as far as routing and pooling care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// SELECT/VALUES/TABLE/SHOW/EXPLAIN (no ANALYZE of a write)/COPY ... TO STDOUT.
    Read,
    /// Everything that must go to the primary.
    Write,
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`.
    BeginReadOnly,
    /// Any other `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `ROLLBACK` / `END` / `ABORT` (not `ROLLBACK TO SAVEPOINT`).
    TxnEnd,
    /// Session-scoped state change the pooler must track.
    SessionState(SessionKind),
    /// `SET LOCAL ...` and other transaction-scoped settings.
    SetLocal,
}

impl Kind {
    /// Where a statement of this kind may run on its own (outside any
    /// transaction the proxy has pinned).
    pub fn route(&self) -> Route {
        match self {
            Kind::Read | Kind::BeginReadOnly => Route::Replica,
            _ => Route::Primary,
        }
    }
}

/// The kind of session-state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// `SET name = value`; names are folded as PostgreSQL folds them, values
    /// are the literal text (string quotes removed, several joined by ", ").
    Set {
        name: String,
        value: String,
    },
    /// `RESET name`; `None` = `RESET ALL`.
    Reset(Option<String>),
    Discard,
    Load,
    /// `SET ROLE` / `SET SESSION AUTHORIZATION`.
    Role,
    Prepare,
    Deallocate,
    Other,
}

/// A routing hint from a leading `/* pgmux: ... */` or `-- pgmux: ...` comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
    Shard(u32),
    Key(String),
}

/// The result of classifying one simple-query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    pub kind: Kind,
    pub hint: Option<Hint>,
    /// Number of statements found (0 for an empty or comment-only string).
    pub statements: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClassifyError {
    #[error("unknown pgmux hint \"{0}\" (use primary, replica, shard=N or key=V)")]
    UnknownHint(String),
}

/// Texts longer than this are classified but not cached, so that a few huge
/// statements cannot pin a lot of memory in the cache.
pub const MAX_CACHED_LEN: usize = 16 * 1024;

/// Texts longer than this get their operators counted before parsing.
const DEEP_CHECK_LEN: usize = 8 * 1024;
/// More operators than this in one text: not parsed, classified `Write`.
/// sqlparser's recursion limit does not cover left-deep operator chains
/// (`1+1+1...`), whose AST is as deep as the chain is long: walking and even
/// dropping a 50k-deep tree overflows a 2 MiB thread stack.
pub const MAX_OPERATORS: usize = 4096;

/// Keywords that join operands into (possibly left-deep) expressions.
#[rustfmt::skip]
const OPERATOR_KEYWORDS: &[Keyword] = &[
    Keyword::AND, Keyword::OR, Keyword::NOT, Keyword::IS, Keyword::LIKE, Keyword::ILIKE, Keyword::SIMILAR,
    Keyword::BETWEEN, Keyword::IN, Keyword::AT, Keyword::COLLATE, Keyword::UNION, Keyword::INTERSECT,
    Keyword::EXCEPT, Keyword::OVERLAPS,
];

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

/// Results by exact text; an error is kept as its hint text.
type Cache = LruCache<Box<str>, Result<Classified, String>>;

/// Classifies statements; cheap to share (`&self` everywhere).
pub struct Classifier {
    extra_write_functions: Vec<String>,
    functions_are_writes: bool,
    cache: Option<Mutex<Cache>>,
    parses: AtomicU64,
}

impl Classifier {
    /// `cache_capacity` 0 disables the cache. `extra_write_functions` are
    /// matched case-insensitively, on the whole qualified name when they hold
    /// a dot and on the unqualified name otherwise.
    pub fn new(cache_capacity: usize, extra_write_functions: &[String], functions_are_writes: bool) -> Self {
        Classifier {
            extra_write_functions: extra_write_functions.iter().map(|f| f.trim().to_ascii_lowercase()).collect(),
            functions_are_writes,
            cache: NonZeroUsize::new(cache_capacity).map(|c| Mutex::new(LruCache::new(c))),
            parses: AtomicU64::new(0),
        }
    }

    /// Classify a simple-query string (may hold several statements: any
    /// write makes the whole string `Write`; it is `Read` only if all
    /// statements are reads; a mix of other kinds is `Write`, see
    /// [`combine`]). Cached by the exact text.
    pub fn classify(&self, sql: &str) -> Result<Classified, ClassifyError> {
        let cacheable = sql.len() <= MAX_CACHED_LEN;
        if let (true, Some(cache)) = (cacheable, &self.cache) {
            if let Some(hit) = lock(cache).get(sql) {
                return hit.clone().map_err(ClassifyError::UnknownHint);
            }
        }
        let result = self.classify_uncached(sql);
        if let (true, Some(cache)) = (cacheable, &self.cache) {
            let entry = match &result {
                Ok(c) => Ok(c.clone()),
                Err(ClassifyError::UnknownHint(h)) => Err(h.clone()),
            };
            lock(cache).put(sql.into(), entry);
        }
        result
    }

    /// Number of entries in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| lock(c).len())
    }

    /// Number of texts parsed so far (cache misses).
    pub fn parses(&self) -> u64 {
        self.parses.load(Ordering::Relaxed)
    }

    fn classify_uncached(&self, sql: &str) -> Result<Classified, ClassifyError> {
        let hint = leading_hint(sql)?;
        self.parses.fetch_add(1, Ordering::Relaxed);
        let dialect = PostgreSqlDialect {};
        if sql.len() > DEEP_CHECK_LEN && too_many_operators(sql) {
            return Ok(Classified { kind: Kind::Write, hint, statements: 1 });
        }
        let kinds: Vec<Kind> = match Parser::parse_sql(&dialect, sql) {
            Ok(stmts) => stmts.iter().map(|s| self.statement_kind(s)).collect(),
            Err(_) => self.classify_chunks(sql),
        };
        let statements = kinds.len();
        let kind = kinds.into_iter().reduce(combine).unwrap_or(Kind::Read);
        Ok(Classified { kind, hint, statements })
    }

    /// Slow path when the whole text does not parse: split it at top-level
    /// semicolons and classify each statement on its own, rewriting
    /// `TABLE name` (unknown to sqlparser) as `SELECT * FROM name`. A piece
    /// that still fails to parse is a `Write`.
    fn classify_chunks(&self, sql: &str) -> Vec<Kind> {
        let dialect = PostgreSqlDialect {};
        let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
            return vec![Kind::Write];
        };
        let mut kinds = Vec::new();
        for chunk in tokens.split(|t| *t == Token::SemiColon) {
            let mut chunk: Vec<Token> = chunk.iter().filter(|t| !matches!(t, Token::Whitespace(_))).cloned().collect();
            if chunk.is_empty() {
                continue;
            }
            if matches!(chunk.first(), Some(Token::Word(w)) if w.keyword == Keyword::TABLE) {
                chunk.splice(0..1, [Token::make_keyword("SELECT"), Token::Mul, Token::make_keyword("FROM")]);
            }
            let parsed = Parser::new(&dialect).with_tokens(chunk).parse_statements();
            match parsed {
                Ok(stmts) if stmts.len() == 1 => kinds.extend(stmts.iter().map(|s| self.statement_kind(s))),
                parsed => {
                    let why = parsed.err().map_or_else(|| "several statements".to_string(), |e| e.to_string());
                    let head: String = sql.chars().take(80).collect();
                    tracing::debug!(statement = %head, "not understood, routed to the primary: {why}");
                    kinds.push(Kind::Write);
                }
            }
        }
        if kinds.is_empty() {
            kinds.push(Kind::Write);
        }
        kinds
    }

    fn statement_kind(&self, stmt: &Statement) -> Kind {
        use Statement as S;
        match stmt {
            S::Query(q) => self.read_unless_writes(q.as_ref()),
            S::ShowVariable { .. } | S::ShowVariables { .. } | S::ShowStatus { .. } => Kind::Read,
            S::Explain { analyze, options, statement, .. } => {
                let analyze = *analyze || options.iter().flatten().any(is_analyze_option);
                match (analyze, self.statement_kind(statement)) {
                    (false, _) | (true, Kind::Read) => Kind::Read,
                    _ => Kind::Write,
                }
            }
            S::Copy { source, to: true, target: CopyTarget::Stdout, .. } => match source {
                CopySource::Table { .. } => Kind::Read,
                CopySource::Query(q) => self.read_unless_writes(q.as_ref()),
            },
            S::StartTransaction { modes, statements, .. } if statements.is_empty() => {
                if modes.contains(&TransactionMode::AccessMode(TransactionAccessMode::ReadOnly)) {
                    Kind::BeginReadOnly
                } else {
                    Kind::Begin
                }
            }
            S::Commit { .. } | S::Rollback { savepoint: None, .. } => Kind::TxnEnd,
            S::Set(set) => set_kind(set),
            S::Reset(r) => Kind::SessionState(SessionKind::Reset(match &r.reset {
                Reset::ALL => None,
                Reset::SessionAuthorization => Some("session_authorization".to_string()),
                Reset::ConfigurationParameter(name) => Some(fold_name(name)),
            })),
            S::Discard { .. } => Kind::SessionState(SessionKind::Discard),
            S::Load { .. } => Kind::SessionState(SessionKind::Load),
            S::Prepare { .. } => Kind::SessionState(SessionKind::Prepare),
            S::Deallocate { .. } => Kind::SessionState(SessionKind::Deallocate),
            _ => Kind::Write,
        }
    }

    /// `Read` unless something inside `node` writes (see [`WriteFinder`]).
    fn read_unless_writes<V: Visit>(&self, node: &V) -> Kind {
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

/// Whether `sql` has more than [`MAX_OPERATORS`] operator tokens (or does not
/// tokenize). Over-counts (every token that is not a name, literal or
/// punctuation counts), which only makes the result more conservative.
fn too_many_operators(sql: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else { return true };
    #[rustfmt::skip]
    let is_operator = |t: &Token| match t {
        Token::Word(w) => OPERATOR_KEYWORDS.contains(&w.keyword),
        Token::Number(..) | Token::SingleQuotedString(_) | Token::DoubleQuotedString(_)
        | Token::DollarQuotedString(_) | Token::EscapedStringLiteral(_) | Token::UnicodeStringLiteral(_)
        | Token::NationalStringLiteral(_) | Token::HexStringLiteral(_) | Token::Placeholder(_) | Token::Whitespace(_)
        | Token::Comma | Token::Period | Token::SemiColon | Token::LParen | Token::RParen | Token::LBracket
        | Token::RBracket => false,
        _ => true,
    };
    tokens.iter().filter(|t| is_operator(t)).count() > MAX_OPERATORS
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the LRU inconsistent in a
    // way that matters here; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the kinds of two statements of one string combine: equal kinds stay,
/// anything else (including any `Write`) is `Write`, the most restrictive.
pub fn combine(a: Kind, b: Kind) -> Kind {
    if a == b {
        a
    } else {
        Kind::Write
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

fn is_analyze_option(opt: &sqlparser::ast::UtilityOption) -> bool {
    if !opt.name.value.eq_ignore_ascii_case("analyze") {
        return false;
    }
    match &opt.arg {
        None => true,
        Some(arg) => {
            let text = expr_text(arg).to_ascii_lowercase();
            !matches!(text.as_str(), "false" | "off" | "0" | "no")
        }
    }
}

fn set_kind(set: &sqlparser::ast::Set) -> Kind {
    use sqlparser::ast::Set as St;
    let local = |m: Option<&ContextModifier>| matches!(m, Some(ContextModifier::Local));
    let assign = |name: String, value: String| Kind::SessionState(SessionKind::Set { name, value });
    match set {
        St::SingleAssignment { scope, variable, values, .. } => {
            if local(scope.as_ref()) {
                Kind::SetLocal
            } else {
                assign(fold_name(variable), values.iter().map(expr_text).collect::<Vec<_>>().join(", "))
            }
        }
        St::SetTimeZone { local: true, .. } => Kind::SetLocal,
        St::SetTimeZone { value, .. } => assign("timezone".to_string(), expr_text(value)),
        St::SetNames { charset_name, .. } => assign("client_encoding".to_string(), charset_name.value.clone()),
        St::SetRole { context_modifier, .. } if local(context_modifier.as_ref()) => Kind::SetLocal,
        St::SetSessionAuthorization(p) if local(Some(&p.scope)) => Kind::SetLocal,
        St::SetRole { .. } | St::SetSessionAuthorization(_) => Kind::SessionState(SessionKind::Role),
        St::SetTransaction { session: false, .. } => Kind::SetLocal,
        _ => Kind::SessionState(SessionKind::Other),
    }
}

/// An identifier as PostgreSQL folds it: unquoted parts lower-cased.
fn fold_ident(i: &Ident) -> String {
    match i.quote_style {
        None => i.value.to_lowercase(),
        Some(_) => i.value.clone(),
    }
}

fn fold_name(name: &ObjectName) -> String {
    let parts: Vec<String> =
        name.0.iter().map(|p| p.as_ident().map_or_else(|| p.to_string().to_lowercase(), fold_ident)).collect();
    parts.join(".")
}

/// The text of a SET value: string literals without quotes, names as written.
fn expr_text(e: &Expr) -> String {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) | Value::EscapedStringLiteral(s) => s.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
}

/// The hint in the comments before the first token, if any. Comments that do
/// not start with `pgmux:` are ignored; the first valid hint wins, and any
/// unknown `pgmux:` text is an error.
fn leading_hint(sql: &str) -> Result<Option<Hint>, ClassifyError> {
    let mut rest = sql;
    let mut found = None;
    loop {
        rest = rest.trim_start();
        let body;
        if let Some(after) = rest.strip_prefix("--") {
            let end = after.find('\n').unwrap_or(after.len());
            body = after.get(..end).unwrap_or("");
            rest = after.get(end..).unwrap_or("");
        } else if let Some(after) = rest.strip_prefix("/*") {
            // PostgreSQL block comments nest; an unterminated one ends the scan.
            let Some(end) = block_comment_end(after) else { return Ok(found) };
            body = after.get(..end).unwrap_or("");
            rest = after.get(end + 2..).unwrap_or("");
        } else {
            return Ok(found);
        }
        if let Some(hint) = parse_hint(body)? {
            found.get_or_insert(hint);
        }
    }
}

/// Byte offset of the `*/` closing a block comment whose `/*` was just
/// consumed, honouring nesting.
fn block_comment_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let (mut depth, mut i) = (1usize, 0usize);
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    None
}

/// `Ok(None)` for a comment that is not a pgmux hint.
fn parse_hint(comment: &str) -> Result<Option<Hint>, ClassifyError> {
    let c = comment.trim();
    if !c.get(..5).is_some_and(|h| h.eq_ignore_ascii_case("pgmux")) {
        return Ok(None);
    }
    let Some(text) = c.get(5..).map(str::trim_start).and_then(|t| t.strip_prefix(':')) else { return Ok(None) };
    let text = text.trim();
    let unknown = || ClassifyError::UnknownHint(text.to_string());
    if text.eq_ignore_ascii_case("primary") {
        return Ok(Some(Hint::Primary));
    }
    if text.eq_ignore_ascii_case("replica") {
        return Ok(Some(Hint::Replica));
    }
    let (key, value) = text.split_once('=').ok_or_else(unknown)?;
    let (key, value) = (key.trim(), value.trim());
    if key.eq_ignore_ascii_case("shard") {
        value.parse::<u32>().map(|n| Some(Hint::Shard(n))).map_err(|_| unknown())
    } else if key.eq_ignore_ascii_case("key") && !value.is_empty() {
        Ok(Some(Hint::Key(value.to_string())))
    } else {
        Err(unknown())
    }
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
