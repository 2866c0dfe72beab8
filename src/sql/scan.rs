//! What transaction pooling must know of a simple-query string, found
//! without a full parse: its leading command (`PREPARE`, `EXECUTE`,
//! `DEALLOCATE name`), and the session-level `SET` / `RESET` statements in
//! it, so that a client's settings follow it across server connections and
//! never leak to another client. Skips white space, comments and quotes.

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Prepare,
    Execute,
    /// `DEALLOCATE [PREPARE] name` (not `ALL`), name as PostgreSQL folds it.
    Deallocate(String),
    Other,
}

fn skip_blank(s: &str) -> &str {
    let mut s = s;
    loop {
        let t = s.trim_start();
        if let Some(rest) = t.strip_prefix("--") {
            s = rest.find('\n').map_or("", |i| &rest[i + 1..]);
        } else if let Some(rest) = t.strip_prefix("/*") {
            // PostgreSQL block comments nest.
            let mut depth = 1;
            let b = rest.as_bytes();
            let mut i = 0;
            while i < b.len() && depth > 0 {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            s = rest.get(i..).unwrap_or("");
        } else {
            return t;
        }
    }
}

/// A keyword or identifier at the front: (folded word, rest).
fn word(s: &str) -> Option<(String, &str)> {
    let s = skip_blank(s);
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if rest[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Some((out, &rest[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        return None;
    }
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$')).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].to_lowercase(), &s[end..]))
}

fn at_end(s: &str) -> bool {
    skip_blank(s).trim_start_matches(';').trim().is_empty()
}

pub fn leading_command(sql: &str) -> Command {
    let first = skip_blank(sql).as_bytes().first().map(|b| b.to_ascii_lowercase());
    if !matches!(first, Some(b'p' | b'e' | b'd')) {
        return Command::Other;
    }
    let Some((kw, rest)) = word(sql) else { return Command::Other };
    match kw.as_str() {
        "prepare" => Command::Prepare,
        "execute" => Command::Execute,
        "deallocate" => {
            let Some((mut name, mut rest)) = word(rest) else { return Command::Other };
            if name == "prepare" {
                match word(rest) {
                    Some((n, r)) => (name, rest) = (n, r),
                    None => return Command::Other,
                }
            }
            if name == "all" || !at_end(rest) {
                return Command::Other;
            }
            Command::Deallocate(name)
        }
        _ => Command::Other,
    }
}

/// A session-level setting change (`SET` without `LOCAL`, `RESET`).
#[derive(Debug, PartialEq, Eq)]
pub enum SettingChange {
    /// Value as `set_config` takes it; `None` when pgmux cannot tell.
    Set {
        name: String,
        value: Option<String>,
    },
    Reset(String),
    ResetAll,
}

/// The statements of a query string, split at top-level semicolons.
pub fn statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                // E'...' strings take backslash escapes.
                let escapes = q == b'\'' && i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e');
                i += 1;
                while i < b.len() && b[i] != q {
                    if escapes && b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let rest = &sql[i..];
                i += rest.len() - skip_blank(rest).len() - 1;
            }
            b'$' => {
                let tag_end =
                    b[i + 1..].iter().position(|c| !(c.is_ascii_alphanumeric() || *c == b'_')).map(|p| i + 1 + p);
                if let Some(e) = tag_end.filter(|e| b[*e] == b'$') {
                    let tag = &sql[i..=e];
                    i = sql[e + 1..].find(tag).map_or(b.len(), |p| e + 1 + p + tag.len() - 1);
                }
            }
            b';' => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < sql.len() {
        out.push(&sql[start..]);
    }
    out
}

/// The statement with its literals blanked (`'…'` → `'?'`, numbers → `0`),
/// comments kept: statements of one shape route alike, so a cache keyed by
/// this serves queries that differ only in their values.
pub fn literal_shape(sql: &str) -> String {
    scan_literals(sql, |_, _| {})
}

/// The shape (see [`literal_shape`]) and the literals' values in order:
/// numbers as written, strings without quotes (`''` → `'`). `None` when a
/// string has escapes (`E'…'`).
pub fn shape_and_literals(sql: &str) -> Option<(String, Vec<String>)> {
    let mut literals = Vec::new();
    let mut plain = true;
    let shape = scan_literals(sql, |raw, escapes| {
        plain &= !escapes;
        literals.push(match raw.strip_prefix(b"'") {
            Some(inner) => String::from_utf8_lossy(inner.strip_suffix(b"'").unwrap_or(inner)).replace("''", "'"),
            None => String::from_utf8_lossy(raw).into_owned(),
        });
    });
    plain.then_some((shape, literals))
}

/// Blank the literals of `sql`, passing each (as written; strings with
/// their quotes, and whether they have escapes) to `literal`.
fn scan_literals(sql: &str, mut literal: impl FnMut(&[u8], bool)) -> String {
    let b = sql.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$');
        if c == b'\'' {
            let escapes = i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e');
            let start = i;
            i += 1;
            while i < b.len() {
                if escapes && b[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            literal(b.get(start..=i).unwrap_or(&b[start..]), escapes);
            out.extend_from_slice(b"'?'");
            i += 1;
        } else if c.is_ascii_digit() && !prev_ident {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            literal(&b[start..i], false);
            out.push(b'0');
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| sql.to_string())
}

/// A possibly dotted parameter name.
fn param_name(s: &str) -> Option<(String, &str)> {
    let (mut name, mut rest) = word(s)?;
    while let Some(r) = rest.strip_prefix('.') {
        let (part, r) = word(r)?;
        name = format!("{name}.{part}");
        rest = r;
    }
    Some((name, rest))
}

/// A SET value list as `set_config` wants it: literals unquoted, elements
/// joined with ", ".
fn set_value(s: &str) -> Option<String> {
    let mut parts = Vec::new();
    let mut rest = skip_blank(s);
    loop {
        if let Some(r) = rest.strip_prefix('\'') {
            let mut lit = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                if c == '\'' {
                    if r[i + 1..].starts_with('\'') {
                        lit.push('\'');
                        chars.next();
                    } else {
                        break i + 1;
                    }
                } else {
                    lit.push(c);
                }
            };
            parts.push(lit);
            rest = &r[end..];
        } else if rest.starts_with('"') {
            let end = rest[1..].find('"')? + 2;
            parts.push(rest[..end].to_string());
            rest = &rest[end..];
        } else {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || "_$.-+".contains(c))).unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            parts.push(rest[..end].to_string());
            rest = &rest[end..];
        }
        rest = skip_blank(rest);
        match rest.strip_prefix(',') {
            Some(r) => rest = skip_blank(r),
            None if rest.is_empty() => return Some(parts.join(", ")),
            None => return None,
        }
    }
}

fn one_change(stmt: &str) -> Option<SettingChange> {
    let (kw, rest) = word(stmt)?;
    match kw.as_str() {
        "reset" => {
            let (name, after) = param_name(rest)?;
            match name.as_str() {
                "all" => Some(SettingChange::ResetAll),
                "session" | "role" => None,
                _ if at_end(after) => Some(SettingChange::Reset(name)),
                _ => None,
            }
        }
        "set" => {
            let (mut name, mut rest) = param_name(rest)?;
            if name == "session" {
                (name, rest) = param_name(rest)?;
            }
            let value_text = match name.as_str() {
                "local" | "transaction" | "role" | "authorization" | "characteristics" => return None,
                "time" => {
                    let (zone, r) = word(rest)?;
                    if zone != "zone" {
                        return None;
                    }
                    name = "timezone".into();
                    r
                }
                "names" => {
                    name = "client_encoding".into();
                    rest
                }
                "schema" => {
                    name = "search_path".into();
                    rest
                }
                _ => {
                    let r = skip_blank(rest);
                    match r.strip_prefix('=') {
                        Some(v) => v,
                        None => {
                            let (to, v) = word(r)?;
                            if to != "to" {
                                return None;
                            }
                            v
                        }
                    }
                }
            };
            let value = set_value(value_text.trim_end());
            match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("default") => Some(SettingChange::Reset(name)),
                Some("local") if name == "timezone" => Some(SettingChange::Reset(name)),
                _ => Some(SettingChange::Set { name, value }),
            }
        }
        _ => None,
    }
}

/// Whether `word` occurs anywhere in `sql`, ignoring ASCII case.
pub fn mentions(sql: &str, word: &[u8]) -> bool {
    let Some((&first, rest)) = word.split_first() else { return true };
    let (lower, upper) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
    let b = sql.as_bytes();
    let mut from = 0;
    while let Some(p) = b.get(from..).and_then(|t| t.iter().position(|&c| c == lower || c == upper)) {
        let at = from + p;
        if b.get(at + 1..at + 1 + rest.len()).is_some_and(|w| w.eq_ignore_ascii_case(rest)) {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Whether the string creates session state that outlives the transaction
/// and cannot be replayed on another server connection: `LISTEN`, `LOAD`,
/// SQL `PREPARE`, temporary objects, `DECLARE ... WITH HOLD`, session-level
/// advisory locks, `SET ROLE` / `SESSION AUTHORIZATION` / `SESSION
/// CHARACTERISTICS` and `set_config(..., false)`. The client then keeps its
/// server connection (pinned).
pub fn pins_session(sql: &str) -> bool {
    if mentions(sql, b"pg_advisory_lock") || mentions(sql, b"pg_try_advisory_lock") {
        return true;
    }
    if (mentions(sql, b"set_config") && lasting_set_config(sql)) || identity_changes(sql).contains(&true) {
        return true;
    }
    let cheap = [&b"listen"[..], b"load", b"temp", b"hold", b"prepare"];
    if !cheap.iter().any(|w| mentions(sql, w)) {
        return false;
    }
    statements(sql).into_iter().any(|st| {
        let Some((kw, rest)) = word(st) else { return false };
        match kw.as_str() {
            "listen" | "load" | "prepare" => true,
            "create" => {
                let mut rest = rest;
                for _ in 0..3 {
                    match word(rest) {
                        Some((w, r)) if w == "global" || w == "local" || w == "or" || w == "replace" => rest = r,
                        Some((w, _)) => return w == "temp" || w == "temporary",
                        None => return false,
                    }
                }
                false
            }
            "declare" => mentions(st, b"with hold"),
            _ => false,
        }
    })
}

/// Whether the string changes session state pgmux cannot replay (role,
/// session authorization or characteristics, `set_config(...)`): the
/// connection must be reset before anyone else uses it.
pub fn needs_full_reset(sql: &str) -> bool {
    mentions(sql, b"set_config") || !identity_changes(sql).is_empty()
}

/// SET/RESET of role, session authorization or session characteristics in
/// the string: `true` for one that lasts beyond the transaction (a `SET`
/// without `LOCAL`).
fn identity_changes(sql: &str) -> Vec<bool> {
    if !mentions(sql, b"role") && !mentions(sql, b"authorization") && !mentions(sql, b"characteristics") {
        return Vec::new();
    }
    statements(sql)
        .into_iter()
        .filter_map(|st| {
            let (kw, rest) = word(st)?;
            if kw != "set" && kw != "reset" {
                return None;
            }
            let (mut next, rest) = word(rest)?;
            let local = next == "local";
            if next == "session" || local {
                next = word(rest)?.0;
            }
            matches!(next.as_str(), "role" | "authorization" | "characteristics").then_some(kw == "set" && !local)
        })
        .collect()
}

/// Whether some `set_config(...)` call in the string may outlast the
/// transaction: its last argument is not the literal `true` (is_local).
fn lasting_set_config(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find("set_config") {
        let start = from + i + "set_config".len();
        from = start;
        let Some(open) = lower[start..].find('(').map(|o| start + o) else { return true };
        if !lower[start..open].trim().is_empty() {
            continue;
        }
        let (mut depth, mut quoted, mut last_arg) = (0usize, false, open + 1);
        let mut close = None;
        for (k, c) in lower[open..].char_indices() {
            match c {
                '\'' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + k);
                        break;
                    }
                }
                ',' if !quoted && depth == 1 => last_arg = open + k + 1,
                _ => {}
            }
        }
        match close {
            Some(end) if lower[last_arg..end].trim() == "true" => {}
            _ => return true,
        }
    }
    false
}

/// Session-level SET / RESET statements of a query string, in order.
pub fn setting_changes(sql: &str) -> Vec<SettingChange> {
    if !mentions(sql, b"set") {
        return Vec::new();
    }
    statements(sql).into_iter().filter_map(one_change).collect()
}

/// What a statement text does to the session in transaction mode.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    /// Session-level SET / RESET, in order ([`setting_changes`]).
    pub changes: Vec<SettingChange>,
    /// The server connection needs a full reset after it ([`needs_full_reset`]).
    pub full_reset: bool,
    /// The client must keep its server connection ([`pins_session`]).
    pub pins: bool,
    /// It may change how names resolve (`search_path`, the role), for the
    /// rest of the session or of the transaction.
    pub names: bool,
}

/// Every word the session checks start from, at the start of a word (a
/// text without any of them — nearly every statement — has no effect).
const EFFECT_WORDS: [&[u8]; 12] = [
    b"set",
    b"reset",
    b"role",
    b"authorization",
    b"characteristics",
    b"listen",
    b"load",
    b"temp",
    b"hold",
    b"prepare",
    b"pg_advisory",
    b"pg_try_advisory",
];

/// [`setting_changes`], [`needs_full_reset`] and [`pins_session`] of one
/// statement text, with one pass over it when it has none.
pub fn session_effects(sql: &str) -> Effects {
    if !starts_a_word(sql, &EFFECT_WORDS) {
        return Effects::default();
    }
    let (full_reset, pins) = (needs_full_reset(sql), pins_session(sql));
    let names = full_reset || mentions(sql, b"search_path");
    Effects { changes: setting_changes(sql), full_reset, pins, names }
}

/// Whether a word of `sql` starts with one of `words` (lowercase ASCII),
/// in any case. One pass, looking only where a word starts.
pub fn starts_a_word(sql: &str, words: &[&[u8]]) -> bool {
    let b = sql.as_bytes();
    let mut in_word = false;
    for (at, &c) in b.iter().enumerate() {
        let ident = c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
        if ident && !in_word {
            let first = c.to_ascii_lowercase();
            let rest = &b[at..];
            if words
                .iter()
                .any(|w| w.first() == Some(&first) && rest.get(..w.len()).is_some_and(|t| t.eq_ignore_ascii_case(w)))
            {
                return true;
            }
        }
        in_word = ident;
    }
    false
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
