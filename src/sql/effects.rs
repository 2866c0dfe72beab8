//! What a statement text does to the session in transaction mode, found
//! without a full parse: its session-level `SET` / `RESET` statements (so
//! a client's settings follow it across server connections and never leak
//! to another client), whether it creates state that pins the client to
//! its server connection, and whether the connection needs a full reset.

use super::marks::Marks;
use super::scan::{at_end, mentions, skip_blank, statements, word};

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

/// [`setting_changes`], [`needs_full_reset`] and [`pins_session`] of one
/// statement text.
pub fn session_effects(sql: &str) -> Effects {
    marked_effects(sql, Marks::of(sql.as_bytes()))
}

/// [`session_effects`] of a text whose marks are known: none of the words
/// every check starts from (nearly every statement) rules them all out.
pub fn marked_effects(sql: &str, marks: Marks) -> Effects {
    if !marks.effects() {
        return Effects::default();
    }
    let (full_reset, pins) = (needs_full_reset(sql), pins_session(sql));
    let names = full_reset || mentions(sql, b"search_path");
    Effects { changes: setting_changes(sql), full_reset, pins, names }
}

#[cfg(test)]
#[path = "effects_tests.rs"]
mod tests;
