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
//!
//! Here: the classifier, its cache and the kind of each statement. The
//! routing hints are read in `classify/hint.rs`, what inside a read writes
//! (and which functions do) is found in `classify/writes.rs`, `SET` and
//! `RESET` are taken apart in `classify/set.rs`.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;
use sqlparser::ast::{CopySource, CopyTarget, Reset, Statement, TransactionAccessMode, TransactionMode};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

mod hint;
mod set;
mod writes;
use hint::leading_hint;
pub use hint::Hint;
use set::{expr_text, fold_name, set_kind};

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

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
