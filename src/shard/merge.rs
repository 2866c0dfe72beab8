//! Scatter-gather: how the rows of one read sent to every shard combine
//! into the answer one database would give, or a clear refusal when they
//! cannot combine exactly.
//!
//! - plain rows are concatenated; with `ORDER BY` (on select-list columns
//!   of types pgmux can compare) they are merged in order;
//! - `LIMIT n OFFSET m` is sent to the shards as `LIMIT n+m` and applied
//!   after the merge;
//! - `count`, `sum` (integer and numeric), `min` and `max`, alone or with
//!   `GROUP BY` of select-list columns, are combined per group;
//! - anything else (`avg`, `DISTINCT`, `HAVING`, window functions, set
//!   operations, float sums) is refused: never a wrong answer.

use std::cmp::Ordering;

use sqlparser::ast::{
    Expr, FunctionArguments, GroupByExpr, LimitClause, OrderByKind, OrderBySort, Query, SelectItem, SetExpr, Statement,
    Value,
};

use super::values::{self, oid};

/// How one output column is combined across shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    Group,
    Count,
    Sum,
    /// `min` / `max`; `true`: of text under `COLLATE "C"` (bytewise).
    Min(bool),
    Max(bool),
}

/// A sort key: output column (by position or by name) and direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortKey {
    pub column: ColumnRef,
    pub desc: bool,
    pub nulls_first: bool,
    /// `COLLATE "C"`: text compares bytewise.
    pub bytewise: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnRef {
    Position(usize),
    Name(String),
    /// The `k`-th column pgmux appended to the shards' select list (a sort
    /// key the client did not select); dropped before the client sees it.
    Hidden(usize),
}

/// The merge of one scatter-gather read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergePlan {
    /// What each shard runs (LIMIT rewritten, or the statement as given).
    pub sql: String,
    pub order: Vec<SortKey>,
    pub limit: Option<u64>,
    pub offset: u64,
    /// Per output column, when the query aggregates.
    pub aggs: Option<Vec<Agg>>,
    /// Sort-key columns appended to the select list (see [`ColumnRef::Hidden`]).
    pub hidden: usize,
    /// The shards to ask (None: all).
    pub shards: Option<Vec<usize>>,
}

fn number(e: &Expr) -> Option<u64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

fn refuse<T>(why: &str) -> Result<T, String> {
    Err(why.to_string())
}

/// The merge plan of a read that goes to every shard, or why it cannot
/// be merged exactly.
pub fn plan(stmt: &Statement, sql: &str) -> Result<MergePlan, String> {
    let Statement::Query(q) = stmt else { return refuse("only queries can run on every shard") };
    let mut q: Query = (**q).clone();
    let SetExpr::Select(select) = q.body.as_ref() else {
        return refuse("set operations (UNION, INTERSECT, EXCEPT) across shards are not supported");
    };
    if select.distinct.is_some() {
        return refuse("DISTINCT across shards is not supported");
    }
    if select.having.is_some() {
        return refuse("HAVING across shards is not supported");
    }
    let group_by: Vec<String> = match &select.group_by {
        GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => exprs.iter().map(|e| e.to_string()).collect(),
        _ => return refuse("GROUP BY ALL / ROLLUP / CUBE across shards is not supported"),
    };
    let mut aggs = Vec::new();
    let mut exprs = Vec::new();
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => {
                aggs.push(None);
                exprs.push(String::new());
                continue;
            }
        };
        exprs.push(expr.to_string());
        aggs.push(aggregate(expr)?);
    }
    // GROUP BY 2 names the second select-list item.
    let group_by: Vec<String> = group_by
        .into_iter()
        .map(|g| match g.parse::<usize>() {
            Ok(n) if n >= 1 && n <= exprs.len() => exprs[n - 1].clone(),
            _ => g,
        })
        .collect();
    let aggregating = !group_by.is_empty() || aggs.iter().any(|a| a.is_some());
    let aggs = if aggregating {
        let mut out = Vec::new();
        for (a, text) in aggs.iter().zip(&exprs) {
            match a {
                Some(a) => out.push(*a),
                None if group_by.contains(text) => out.push(Agg::Group),
                None => {
                    return refuse("a column that is neither aggregated nor grouped cannot be merged across shards")
                }
            }
        }
        if group_by.iter().any(|g| !exprs.contains(g)) {
            return refuse("GROUP BY across shards needs every grouping expression in the select list");
        }
        Some(out)
    } else {
        None
    };
    let wildcard = exprs.iter().any(String::is_empty);
    let mut hidden = Vec::new();
    let mut order = Vec::new();
    if let Some(ob) = &q.order_by {
        let OrderByKind::Expressions(items) = &ob.kind else { return refuse("ORDER BY ALL is not supported") };
        for item in items {
            let (expr, bytewise) = match &item.expr {
                Expr::Collate { expr, collation } => (expr.as_ref(), collation.to_string().trim_matches('"') == "C"),
                e => (e, false),
            };
            let column = if let Some(n) = number(expr) {
                let n = usize::try_from(n).map_err(|_| "ORDER BY position out of range".to_string())?;
                ColumnRef::Position(n.checked_sub(1).ok_or("ORDER BY position 0")?)
            } else if let Some(i) = exprs.iter().position(|t| *t == expr.to_string()) {
                ColumnRef::Position(i)
            } else if !wildcard
                && aggs.is_none()
                && !matches!(expr, Expr::Identifier(id) if select_alias(select, &id.value))
            {
                hidden.push(SelectItem::UnnamedExpr(expr.clone()));
                ColumnRef::Hidden(hidden.len() - 1)
            } else {
                match expr {
                    Expr::Identifier(id) => ColumnRef::Name(id.value.to_lowercase()),
                    Expr::CompoundIdentifier(parts) => {
                        ColumnRef::Name(parts.last().map(|p| p.value.to_lowercase()).unwrap_or_default())
                    }
                    _ => return refuse("ORDER BY across shards must name select-list columns"),
                }
            };
            let desc = match &item.options.sort {
                Some(OrderBySort::Desc) => true,
                Some(OrderBySort::Using(_)) => return refuse("ORDER BY ... USING across shards is not supported"),
                _ => false,
            };
            let nulls_first = item.options.nulls_first.unwrap_or(desc);
            order.push(SortKey { column, desc, nulls_first, bytewise });
        }
    }
    let (limit, offset) = match &q.limit_clause {
        None => (None, 0),
        Some(LimitClause::LimitOffset { limit, offset, limit_by }) if limit_by.is_empty() => {
            let limit = match limit {
                None => None,
                Some(e) => Some(number(e).ok_or("LIMIT across shards must be a number")?),
            };
            let offset = match offset {
                None => 0,
                Some(o) => number(&o.value).ok_or("OFFSET across shards must be a number")?,
            };
            (limit, offset)
        }
        Some(_) => return refuse("this LIMIT form is not supported across shards"),
    };
    if q.fetch.is_some() {
        return refuse("FETCH FIRST across shards is not supported (use LIMIT)");
    }
    let n_hidden = hidden.len();
    if !hidden.is_empty() {
        if let SetExpr::Select(sel) = q.body.as_mut() {
            sel.projection.extend(hidden);
        }
    }
    let rewrite = offset > 0 || (aggregating && limit.is_some()) || n_hidden > 0;
    let sql = if rewrite {
        q.limit_clause = match (aggregating, limit) {
            // Groups combine after the merge: every shard sends all.
            (true, _) | (false, None) => None,
            (false, Some(l)) => Some(LimitClause::LimitOffset {
                limit: Some(Expr::value(Value::Number((l + offset).to_string(), false))),
                offset: None,
                limit_by: Vec::new(),
            }),
        };
        Statement::Query(Box::new(q)).to_string()
    } else {
        sql.to_string()
    };
    Ok(MergePlan { sql, order, limit, offset, aggs, hidden: n_hidden, shards: None })
}

/// Whether the select list has an item aliased `name`.
fn select_alias(select: &sqlparser::ast::Select, name: &str) -> bool {
    select
        .projection
        .iter()
        .any(|item| matches!(item, SelectItem::ExprWithAlias { alias, .. } if alias.value.eq_ignore_ascii_case(name)))
}

/// The aggregate an output expression is, if any; errors for aggregates
/// that cannot be combined.
fn aggregate(e: &Expr) -> Result<Option<Agg>, String> {
    let Expr::Function(f) = e else {
        return if contains_function(e) {
            refuse("expressions over aggregates cannot be merged across shards")
        } else {
            Ok(None)
        };
    };
    let name = f.name.to_string().to_lowercase();
    let bytewise = f.args.to_string().to_ascii_uppercase().replace(' ', "").ends_with("COLLATE\"C\")");
    let agg = match name.as_str() {
        "count" => Agg::Count,
        "sum" => Agg::Sum,
        "min" => Agg::Min(bytewise),
        "max" => Agg::Max(bytewise),
        "avg" => return refuse("avg() across shards is not supported; use sum() and count()"),
        "stddev" | "variance" | "array_agg" | "string_agg" | "json_agg" | "jsonb_agg" | "bool_and" | "bool_or"
        | "every" | "percentile_cont" | "percentile_disc" | "mode" => {
            return Err(format!("{name}() across shards is not supported"))
        }
        _ => return Ok(None),
    };
    if f.over.is_some() {
        return refuse("window functions across shards are not supported");
    }
    if f.filter.is_some() || !f.within_group.is_empty() {
        return refuse("FILTER / WITHIN GROUP across shards is not supported");
    }
    if let FunctionArguments::List(args) = &f.args {
        if args.duplicate_treatment.is_some() {
            return refuse("DISTINCT aggregates across shards are not supported");
        }
    }
    Ok(Some(agg))
}

fn contains_function(e: &Expr) -> bool {
    let text = e.to_string().to_lowercase();
    ["count(", "sum(", "min(", "max(", "avg("].iter().any(|f| text.contains(f))
}

/// One DataRow's values (None = NULL).
pub type Row = Vec<Option<Vec<u8>>>;

/// Parse a DataRow body.
pub fn parse_row(body: &[u8]) -> Option<Row> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            let end = at + len as usize;
            out.push(Some(body.get(at..end)?.to_vec()));
            at = end;
        }
    }
    Some(out)
}

/// Encode a DataRow body.
pub fn row_body(row: &Row) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(row.len() as u16).to_be_bytes());
    for v in row {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// Output columns of a RowDescription body: (name, type OID, format).
pub fn columns(body: &[u8]) -> Option<Vec<(String, u32, i16)>> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let end = at + body.get(at..)?.iter().position(|&b| b == 0)?;
        let name = String::from_utf8_lossy(&body[at..end]).to_lowercase();
        at = end + 1;
        let f = body.get(at..at + 18)?;
        let type_oid = u32::from_be_bytes([f[6], f[7], f[8], f[9]]);
        let format = i16::from_be_bytes([f[16], f[17]]);
        out.push((name, type_oid, format));
        at += 18;
    }
    Some(out)
}

/// Combine the shards' rows (each shard's in its own order) into the
/// answer. `cols` from the RowDescription.
pub fn finish(plan: &MergePlan, cols: &[(String, u32, i16)], shards: Vec<Vec<Row>>) -> Result<Vec<Row>, String> {
    if shards.iter().flatten().any(|r| r.len() != cols.len()) {
        return refuse("shards returned rows of different widths");
    }
    let keys: Vec<(usize, &SortKey)> = plan
        .order
        .iter()
        .map(|k| {
            let i = match &k.column {
                ColumnRef::Position(i) => Some(*i),
                ColumnRef::Hidden(h) => Some(cols.len().saturating_sub(plan.hidden) + h),
                ColumnRef::Name(n) => {
                    let mut hits = cols.iter().enumerate().filter(|(_, c)| c.0 == *n);
                    match (hits.next(), hits.next()) {
                        (Some((i, _)), None) => Some(i),
                        _ => None,
                    }
                }
            };
            match i {
                Some(i) if i < cols.len() && cols[i].2 == 1 && values::comparable_binary(cols[i].1, k.bytewise) => {
                    Ok((i, k))
                }
                Some(i) if i < cols.len() && cols[i].2 == 0 && values::comparable(cols[i].1, k.bytewise) => Ok((i, k)),
                Some(_) if k.bytewise => refuse("ORDER BY across shards on a column of this type is not supported"),
                Some(_) => refuse("ORDER BY across shards on text needs COLLATE \"C\" (pgmux merges bytewise)"),
                None => refuse("ORDER BY across shards must name select-list columns"),
            }
        })
        .collect::<Result<_, _>>()?;
    let mut rows: Vec<Row> = match &plan.aggs {
        Some(aggs) => combine(aggs, cols, shards)?,
        None => shards.into_iter().flatten().collect(),
    };
    if !keys.is_empty() {
        // Stable: rows equal on every key keep their shard order.
        rows.sort_by(|a, b| {
            for (i, k) in &keys {
                let o = match (&a[*i], &b[*i]) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) => {
                        if k.nulls_first {
                            Ordering::Less
                        } else {
                            Ordering::Greater
                        }
                    }
                    (Some(_), None) => {
                        if k.nulls_first {
                            Ordering::Greater
                        } else {
                            Ordering::Less
                        }
                    }
                    (Some(x), Some(y)) => {
                        let o = compare(&cols[*i], x, y);
                        if k.desc {
                            o.reverse()
                        } else {
                            o
                        }
                    }
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
    }
    let skip = usize::try_from(plan.offset).unwrap_or(usize::MAX);
    let take = plan.limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let visible = cols.len().saturating_sub(plan.hidden);
    Ok(rows
        .into_iter()
        .skip(skip)
        .take(take)
        .map(|mut r| {
            r.truncate(visible);
            r
        })
        .collect())
}

/// A RowDescription body with only its first `keep` fields.
pub fn trim_description(body: &[u8], keep: usize) -> Option<Vec<u8>> {
    let mut at = 2;
    for _ in 0..keep {
        at += body.get(at..)?.iter().position(|&b| b == 0)? + 1 + 18;
    }
    let mut out = (keep as u16).to_be_bytes().to_vec();
    out.extend_from_slice(body.get(2..at)?);
    Some(out)
}

/// Compare two values of output column `col` in its format.
fn compare(col: &(String, u32, i16), a: &[u8], b: &[u8]) -> Ordering {
    if col.2 == 1 {
        values::compare_binary(col.1, a, b)
    } else {
        values::compare(col.1, a, b)
    }
}

/// Aggregate rows of all shards per group.
fn combine(aggs: &[Agg], cols: &[(String, u32, i16)], shards: Vec<Vec<Row>>) -> Result<Vec<Row>, String> {
    if aggs.len() != cols.len() {
        return refuse("result columns do not match the select list");
    }
    for (a, c) in aggs.iter().zip(cols) {
        let binary = c.2 == 1;
        match a {
            Agg::Sum if !matches!(c.1, oid::INT8 | oid::NUMERIC) => {
                return refuse("sum() across shards of floating-point values is not exact; cast to numeric")
            }
            Agg::Count | Agg::Sum if binary && c.1 != oid::INT8 => {
                return refuse("sum() across shards of numeric values in binary format is not supported")
            }
            Agg::Min(b) | Agg::Max(b) if binary && !values::comparable_binary(c.1, *b) => {
                return refuse("min()/max() across shards of this type is not supported")
            }
            Agg::Min(b) | Agg::Max(b) if !binary && !values::comparable(c.1, *b) => {
                return refuse("min()/max() across shards of this type is not supported")
            }
            Agg::Group
                if !matches!(
                    c.1,
                    oid::INT2 | oid::INT4 | oid::INT8 | oid::TEXT | oid::VARCHAR | oid::UUID | oid::BOOL | oid::DATE
                ) =>
            {
                return refuse("GROUP BY across shards on a column of this type is not supported")
            }
            _ => {}
        }
    }
    let mut groups: Vec<Row> = Vec::new();
    let mut index: std::collections::HashMap<Vec<Option<Vec<u8>>>, usize> = std::collections::HashMap::new();
    for row in shards.into_iter().flatten() {
        let key: Vec<Option<Vec<u8>>> =
            aggs.iter().zip(&row).filter(|(a, _)| **a == Agg::Group).map(|(_, v)| v.clone()).collect();
        let Some(&g) = index.get(&key) else {
            index.insert(key, groups.len());
            groups.push(row);
            continue;
        };
        let acc = &mut groups[g];
        for (i, a) in aggs.iter().enumerate() {
            let (x, y) = (acc[i].take(), row.get(i).cloned().flatten());
            acc[i] = match (a, x, y) {
                (Agg::Group, x, _) => x,
                (_, None, y) | (_, y @ Some(_), None) => y,
                (Agg::Count | Agg::Sum, Some(x), Some(y)) if cols[i].2 == 1 => {
                    Some(values::add_int8_binary(&x, &y).ok_or("count/sum across shards overflows")?)
                }
                (Agg::Count | Agg::Sum, Some(x), Some(y)) => {
                    let sum = values::add_decimal(&String::from_utf8_lossy(&x), &String::from_utf8_lossy(&y))
                        .ok_or("sum() across shards of NaN or infinite values is not supported")?;
                    Some(sum.into_bytes())
                }
                (Agg::Min(_), Some(x), Some(y)) => Some(if compare(&cols[i], &y, &x).is_lt() { y } else { x }),
                (Agg::Max(_), Some(x), Some(y)) => Some(if compare(&cols[i], &y, &x).is_gt() { y } else { x }),
            };
        }
    }
    if groups.is_empty() && !aggs.contains(&Agg::Group) {
        return refuse("an aggregate over no shard rows");
    }
    Ok(groups)
}
