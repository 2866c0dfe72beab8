//! `SET` and `RESET`: the session-state kind of a SET statement (a setting
//! with its value, `SET LOCAL`, a role), and names and values as pgmux
//! records them (names folded as PostgreSQL folds them, string values
//! without quotes).

use sqlparser::ast::{ContextModifier, Expr, Ident, ObjectName, Value};

use super::{Kind, SessionKind};

pub(super) fn set_kind(set: &sqlparser::ast::Set) -> Kind {
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

pub(super) fn fold_name(name: &ObjectName) -> String {
    let parts: Vec<String> =
        name.0.iter().map(|p| p.as_ident().map_or_else(|| p.to_string().to_lowercase(), fold_ident)).collect();
    parts.join(".")
}

/// The text of a SET value: string literals without quotes, names as written.
pub(super) fn expr_text(e: &Expr) -> String {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) | Value::EscapedStringLiteral(s) => s.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
}
