//! `HAVING` across shards: the shards return every group (their HAVING
//! dropped), and pgmux keeps the merged groups for which the condition
//! holds — comparisons of aggregates or grouped columns with number
//! literals, joined by `AND`, `OR`, `NOT`, in SQL's three-valued logic.
//! An aggregate the select list does not have travels as a hidden column.

use sqlparser::ast::{BinaryOperator, Expr, SelectItem, UnaryOperator, Value};

use super::super::values::{self, oid};
use super::{Agg, Row};

/// A `HAVING` condition over output columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Having {
    /// Column `column` compared (`op`) with the number `value`.
    Cmp {
        column: usize,
        op: Op,
        value: String,
    },
    And(Box<Having>, Box<Having>),
    Or(Box<Having>, Box<Having>),
    Not(Box<Having>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

/// Where the condition's operands are: the select list's texts, and the
/// columns appended after it (`appended` texts at `first_appended` on,
/// growing as the condition needs more).
pub struct Columns<'a> {
    /// The aggregate an expression is (the select list's rules).
    pub aggregate: fn(&Expr) -> Result<Option<Agg>, String>,
    pub exprs: &'a [String],
    pub first_appended: usize,
    pub appended: &'a mut Vec<(SelectItem, Agg)>,
}

fn unsupported<T>() -> Result<T, String> {
    Err("this HAVING across shards is not supported (comparisons of aggregates with numbers)".into())
}

/// The condition `e`, or why it cannot be applied after the merge.
pub fn compile(e: &Expr, cols: &mut Columns) -> Result<Having, String> {
    match e {
        Expr::Nested(inner) => compile(inner, cols),
        Expr::UnaryOp { op: UnaryOperator::Not, expr } => Ok(Having::Not(Box::new(compile(expr, cols)?))),
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            Ok(Having::And(Box::new(compile(left, cols)?), Box::new(compile(right, cols)?)))
        }
        Expr::BinaryOp { left, op: BinaryOperator::Or, right } => {
            Ok(Having::Or(Box::new(compile(left, cols)?), Box::new(compile(right, cols)?)))
        }
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Eq => Op::Eq,
                BinaryOperator::NotEq => Op::NotEq,
                BinaryOperator::Lt => Op::Lt,
                BinaryOperator::LtEq => Op::LtEq,
                BinaryOperator::Gt => Op::Gt,
                BinaryOperator::GtEq => Op::GtEq,
                _ => return unsupported(),
            };
            match (number(right), number(left)) {
                (Some(value), _) => Ok(Having::Cmp { column: column(left, cols)?, op, value }),
                (None, Some(value)) => Ok(Having::Cmp { column: column(right, cols)?, op: flipped(op), value }),
                _ => unsupported(),
            }
        }
        _ => unsupported(),
    }
}

/// `5 > count(*)` is `count(*) < 5`.
fn flipped(op: Op) -> Op {
    match op {
        Op::Lt => Op::Gt,
        Op::LtEq => Op::GtEq,
        Op::Gt => Op::Lt,
        Op::GtEq => Op::LtEq,
        o => o,
    }
}

fn number(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => number(expr).map(|n| format!("-{n}")),
        Expr::Nested(inner) => number(inner),
        _ => None,
    }
}

/// The output column of an operand: a select-list item, or an aggregate
/// appended (count, count(DISTINCT), sum, min, max).
fn column(e: &Expr, cols: &mut Columns) -> Result<usize, String> {
    let text = e.to_string();
    if let Some(i) = cols.exprs.iter().position(|t| *t == text) {
        return Ok(i);
    }
    if let Some(i) = cols.appended.iter().position(|(item, _)| item.to_string() == text) {
        return Ok(cols.first_appended + i);
    }
    let agg = match (cols.aggregate)(e)? {
        Some(a @ (Agg::Count | Agg::CountDistinct | Agg::Sum | Agg::Min(_) | Agg::Max(_))) => a,
        _ => return unsupported(),
    };
    cols.appended.push((SelectItem::UnnamedExpr(e.clone()), agg));
    Ok(cols.first_appended + cols.appended.len() - 1)
}

/// Whether the condition holds for a merged row (NULL: no).
pub fn holds(h: &Having, cols: &[(String, u32, i16)], row: &Row) -> Result<bool, String> {
    Ok(truth(h, cols, row)? == Some(true))
}

fn truth(h: &Having, cols: &[(String, u32, i16)], row: &Row) -> Result<Option<bool>, String> {
    Ok(match h {
        Having::Not(x) => truth(x, cols, row)?.map(|b| !b),
        Having::And(a, b) => match (truth(a, cols, row)?, truth(b, cols, row)?) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Having::Or(a, b) => match (truth(a, cols, row)?, truth(b, cols, row)?) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Having::Cmp { column, op, value } => {
            let (_, type_oid, format) = cols.get(*column).ok_or("HAVING column out of range")?;
            let Some(v) = row.get(*column).and_then(Option::as_deref) else { return Ok(None) };
            let text = match (*type_oid, *format == 1) {
                (oid::INT2 | oid::INT4 | oid::INT8, true) => values::int_binary(v).to_string(),
                (oid::NUMERIC, true) => super::super::numeric::from_binary(v).ok_or("HAVING on NaN")?,
                (oid::INT2 | oid::INT4 | oid::INT8 | oid::NUMERIC, false) => String::from_utf8_lossy(v).into_owned(),
                _ => return Err("HAVING across shards compares integers and numeric only".into()),
            };
            let o = values::compare_decimal(&text, value);
            Some(match op {
                Op::Eq => o.is_eq(),
                Op::NotEq => o.is_ne(),
                Op::Lt => o.is_lt(),
                Op::LtEq => o.is_le(),
                Op::Gt => o.is_gt(),
                Op::GtEq => o.is_ge(),
            })
        }
    })
}
