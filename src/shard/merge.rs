//! Scatter-gather: how the rows of one read sent to every shard combine
//! into the answer one database would give, or a clear refusal when they
//! cannot combine exactly.
//!
//! - plain rows are concatenated; with `ORDER BY` (on select-list columns
//!   of types pgmux can compare) they are merged in order;
//! - `LIMIT n OFFSET m` is sent to the shards as `LIMIT n+m` and applied
//!   after the merge;
//! - `count`, `sum` (integer and numeric), `min` and `max`, alone or with
//!   `GROUP BY` of select-list columns, are combined per group; `avg` (of
//!   integers and numeric) from each shard's `sum` and `count`, divided as
//!   PostgreSQL divides (see [`super::numeric`]);
//! - `count(DISTINCT x)`: the shards group by `x` as well, the merge
//!   combines the groups of each `x` across shards, then counts them;
//! - `DISTINCT` and `DISTINCT ON` keep the first row of each distinct
//!   value after the merge's order;
//! - `HAVING` (comparisons of aggregates with numbers) is applied to the
//!   merged groups (`merge/having.rs`);
//! - anything else (window functions, set operations, `sum(DISTINCT)`,
//!   float sums and averages) is refused: never a wrong answer.
//!
//! Here: what a plan is, and the rows combined by it ([`finish`]). The
//! plan is made in `merge/plan.rs`, DataRow and RowDescription bodies are
//! read and written in `merge/rows.rs`.

use std::cmp::Ordering;

use super::values::{self, oid};

mod having;
mod plan;
mod rows;
pub use plan::plan;
pub use rows::{columns, parse_row, row_body, trim_description, Row};

/// How one output column is combined across shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    Group,
    Count,
    Sum,
    /// `min` / `max`, of text under this collation.
    Min(Collation),
    Max(Collation),
    /// `avg`: from the partial `sum` at this column and `count` after it.
    Avg(usize),
    /// `count(DISTINCT x)`: each shard also groups by `x` (the column
    /// marked [`Agg::DistinctArg`]), so that this column is 1 or 0 (`x`
    /// null) per group and `x`; the merge combines the rows of each group
    /// and `x` first, then counts them per group.
    CountDistinct,
    /// The `x` of `count(DISTINCT x)`, appended to the select list and to
    /// the shards' `GROUP BY`.
    DistinctArg,
    /// A value equal on every row combined (the merge's own first stage).
    First,
}

/// A sort key: output column (by position or by name) and direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortKey {
    pub column: ColumnRef,
    pub desc: bool,
    pub nulls_first: bool,
    /// How text compares.
    pub collation: Collation,
}

/// How text compares in a sort key or in `min` / `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collation {
    /// No `COLLATE`: the database's, bytewise when the shards' database
    /// collation is C or POSIX and no column has another (see
    /// `ShardRouter::text_bytewise`).
    Default,
    /// `COLLATE "C"` or `"POSIX"`: bytewise.
    Bytewise,
    /// Another collation, named: not merged here.
    Other,
}

impl Collation {
    /// Whether text compares bytewise, given whether the database's
    /// default collation does.
    pub fn bytewise(self, default_bytewise: bool) -> bool {
        match self {
            Collation::Default => default_bytewise,
            Collation::Bytewise => true,
            Collation::Other => false,
        }
    }
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
    /// `DISTINCT` (empty: on every column) or `DISTINCT ON` these columns.
    pub distinct: Option<Vec<ColumnRef>>,
    /// `HAVING`, applied to the merged groups.
    pub having: Option<having::Having>,
    /// Sort-key columns appended to the select list (see [`ColumnRef::Hidden`]).
    pub hidden: usize,
    /// The shards to ask (None: all).
    pub shards: Option<Vec<usize>>,
}

impl MergePlan {
    /// Whether the merge compares text under the database's collation
    /// (whose order it needs to know).
    pub fn default_collation(&self) -> bool {
        self.order.iter().any(|k| k.collation == Collation::Default)
            || self
                .aggs
                .iter()
                .flatten()
                .any(|a| matches!(a, Agg::Min(Collation::Default) | Agg::Max(Collation::Default)))
    }
}

/// Why text that does not compare bytewise is not merged.
const TEXT_ORDER: &str =
    "ORDER BY across shards on text needs the C collation (COLLATE \"C\", or a C/POSIX database): pgmux merges bytewise";

fn refuse<T>(why: &str) -> Result<T, String> {
    Err(why.to_string())
}

/// Combine the shards' rows (each shard's in its own order) into the
/// answer. `cols` from the RowDescription; `default_bytewise`: whether
/// text without `COLLATE` compares bytewise on the shards.
pub fn finish(
    plan: &MergePlan,
    cols: &[(String, u32, i16)],
    shards: Vec<Vec<Row>>,
    default_bytewise: bool,
) -> Result<Vec<Row>, String> {
    if shards.iter().flatten().any(|r| r.len() != cols.len()) {
        return refuse("shards returned rows of different widths");
    }
    let keys = sort_columns(plan, cols, default_bytewise)?;
    let mut rows: Vec<Row> = match &plan.aggs {
        Some(aggs) => combine(aggs, cols, shards, default_bytewise)?,
        None => shards.into_iter().flatten().collect(),
    };
    if let Some(h) = &plan.having {
        let mut kept = Vec::with_capacity(rows.len());
        for r in rows {
            if having::holds(h, cols, &r)? {
                kept.push(r);
            }
        }
        rows = kept;
    }
    if !keys.is_empty() {
        // Stable: rows equal on every key keep their shard order.
        rows.sort_by(|a, b| compare_rows(&keys, cols, a, b));
    }
    if let Some(on) = &plan.distinct {
        rows = distinct(plan, on, cols, rows)?;
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

/// The output column of each sort key, checked comparable in its type
/// and format.
fn sort_columns<'a>(
    plan: &'a MergePlan,
    cols: &[(String, u32, i16)],
    default_bytewise: bool,
) -> Result<Vec<(usize, &'a SortKey)>, String> {
    plan.order
        .iter()
        .map(|k| {
            let bytewise = k.collation.bytewise(default_bytewise);
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
                Some(i) if i < cols.len() && cols[i].2 == 1 && values::comparable_binary(cols[i].1, bytewise) => {
                    Ok((i, k))
                }
                Some(i) if i < cols.len() && cols[i].2 == 0 && values::comparable(cols[i].1, bytewise) => Ok((i, k)),
                Some(_) if bytewise => refuse("ORDER BY across shards on a column of this type is not supported"),
                Some(_) => refuse(TEXT_ORDER),
                None => refuse("ORDER BY across shards must name select-list columns"),
            }
        })
        .collect()
}

/// Types whose equal values have equal bytes (text and binary), so that
/// rows group and deduplicate by their bytes.
fn groupable(type_oid: u32) -> bool {
    matches!(type_oid, oid::INT2 | oid::INT4 | oid::INT8 | oid::TEXT | oid::VARCHAR | oid::UUID | oid::BOOL | oid::DATE)
}

/// The first row of each distinct value of the columns `on` (empty: the
/// visible ones), in order.
fn distinct(
    plan: &MergePlan,
    on: &[ColumnRef],
    cols: &[(String, u32, i16)],
    rows: Vec<Row>,
) -> Result<Vec<Row>, String> {
    let visible = cols.len().saturating_sub(plan.hidden);
    let at: Vec<usize> = match on {
        [] => (0..visible).collect(),
        on => on
            .iter()
            .map(|c| match c {
                ColumnRef::Position(i) if *i < visible => Ok(*i),
                _ => refuse("DISTINCT ON across shards needs select-list columns"),
            })
            .collect::<Result<_, _>>()?,
    };
    if at.iter().any(|&i| !groupable(cols[i].1)) {
        return refuse("DISTINCT across shards on a column of this type is not supported");
    }
    let mut seen = std::collections::HashSet::new();
    Ok(rows.into_iter().filter(|r| seen.insert(at.iter().map(|&i| r[i].clone()).collect::<Vec<_>>())).collect())
}

/// Two rows in the order of the sort keys (`keys`: column and key).
fn compare_rows(keys: &[(usize, &SortKey)], cols: &[(String, u32, i16)], a: &Row, b: &Row) -> Ordering {
    for (i, k) in keys {
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
fn combine(
    aggs: &[Agg],
    cols: &[(String, u32, i16)],
    shards: Vec<Vec<Row>>,
    default_bytewise: bool,
) -> Result<Vec<Row>, String> {
    if aggs.len() != cols.len() {
        return refuse("result columns do not match the select list");
    }
    for (a, c) in aggs.iter().zip(cols) {
        check_type(*a, c, default_bytewise)?;
    }
    let rows = shards.into_iter().flatten();
    let mut groups = if aggs.contains(&Agg::DistinctArg) {
        // First one row per group and distinct value, then per group: the
        // plan with x and its count combined as given.
        let stage = |arg: Agg, counted: Agg| -> Vec<Agg> {
            let each = |a: &Agg| match a {
                Agg::DistinctArg => arg,
                Agg::CountDistinct => counted,
                a => *a,
            };
            aggs.iter().map(each).collect()
        };
        let values = group(&stage(Agg::Group, Agg::First), cols, rows)?;
        let mut groups = group(&stage(Agg::First, Agg::Count), cols, values.into_iter())?;
        if groups.is_empty() && !aggs.contains(&Agg::Group) {
            // No GROUP BY of the client's, no rows: the one row of counts 0.
            groups.push(aggs.iter().zip(cols).map(|(a, c)| empty_aggregate(*a, c)).collect());
        }
        groups
    } else {
        group(aggs, cols, rows)?
    };
    if groups.is_empty() && !aggs.contains(&Agg::Group) {
        return refuse("an aggregate over no shard rows");
    }
    for row in &mut groups {
        for (i, a) in aggs.iter().enumerate() {
            if let Agg::Avg(at) = a {
                row[i] = average(cols, row, *at, cols[i].2 == 1)?;
            }
        }
    }
    Ok(groups)
}

/// Refused when a column of this type and format cannot be combined so.
fn check_type(a: Agg, c: &(String, u32, i16), default_bytewise: bool) -> Result<(), String> {
    let binary = c.2 == 1;
    match a {
        Agg::Avg(_) if c.1 != oid::NUMERIC => {
            refuse("avg() across shards of floating-point values is not exact; cast to numeric")
        }
        Agg::Sum if !matches!(c.1, oid::INT8 | oid::NUMERIC) => {
            refuse("sum() across shards of floating-point values is not exact; cast to numeric")
        }
        Agg::Count | Agg::CountDistinct if binary && c.1 != oid::INT8 => {
            refuse("count() of this type is not supported")
        }
        Agg::Min(b) | Agg::Max(b) if binary && !values::comparable_binary(c.1, b.bytewise(default_bytewise)) => {
            refuse("min()/max() across shards of this type is not supported")
        }
        Agg::Min(b) | Agg::Max(b) if !binary && !values::comparable(c.1, b.bytewise(default_bytewise)) => {
            refuse("min()/max() across shards of this type is not supported")
        }
        Agg::Group if !groupable(c.1) => refuse("GROUP BY across shards on a column of this type is not supported"),
        Agg::DistinctArg if !groupable(c.1) => {
            refuse("count(DISTINCT) across shards of a value of this type is not supported")
        }
        _ => Ok(()),
    }
}

/// What an aggregate over no rows is: 0 for counts, else NULL.
fn empty_aggregate(a: Agg, c: &(String, u32, i16)) -> Option<Vec<u8>> {
    match (a, c.2 == 1) {
        (Agg::Count | Agg::CountDistinct, true) => Some(0i64.to_be_bytes().to_vec()),
        (Agg::Count | Agg::CountDistinct, false) => Some(b"0".to_vec()),
        _ => None,
    }
}

/// Rows combined per value of their `Group` columns.
fn group(aggs: &[Agg], cols: &[(String, u32, i16)], rows: impl Iterator<Item = Row>) -> Result<Vec<Row>, String> {
    let mut groups: Vec<Row> = Vec::new();
    let mut index: std::collections::HashMap<Vec<Option<Vec<u8>>>, usize> = std::collections::HashMap::new();
    for row in rows {
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
                (Agg::Group | Agg::Avg(_) | Agg::First | Agg::DistinctArg, x, _) => x,
                (_, None, y) | (_, y @ Some(_), None) => y,
                (Agg::Count | Agg::CountDistinct | Agg::Sum, Some(x), Some(y)) => Some(add(&cols[i], &x, &y)?),
                (Agg::Min(_), Some(x), Some(y)) => Some(if compare(&cols[i], &y, &x).is_lt() { y } else { x }),
                (Agg::Max(_), Some(x), Some(y)) => Some(if compare(&cols[i], &y, &x).is_gt() { y } else { x }),
            };
        }
    }
    Ok(groups)
}

/// Two partial counts or sums added, in their column's type and format.
fn add(col: &(String, u32, i16), x: &[u8], y: &[u8]) -> Result<Vec<u8>, String> {
    let overflow = || "count/sum across shards overflows".to_string();
    match (col.1, col.2 == 1) {
        (oid::INT8, true) => values::add_int8_binary(x, y).ok_or_else(overflow),
        (_, binary) => {
            let text = |v: &[u8]| match binary {
                true => super::numeric::from_binary(v),
                false => Some(String::from_utf8_lossy(v).into_owned()),
            };
            let sum = text(x)
                .zip(text(y))
                .and_then(|(x, y)| values::add_decimal(&x, &y))
                .ok_or("sum() across shards of NaN or infinite values is not supported")?;
            match binary {
                true => super::numeric::to_binary(&sum).ok_or_else(overflow),
                false => Ok(sum.into_bytes()),
            }
        }
    }
}

/// `avg` of a group from its partial sum (column `at`) and count (`at + 1`).
fn average(cols: &[(String, u32, i16)], row: &Row, at: usize, binary: bool) -> Result<Option<Vec<u8>>, String> {
    let value = |i: usize| -> Option<String> {
        let v = row.get(i)?.as_deref()?;
        match (cols.get(i)?.1, cols.get(i)?.2 == 1) {
            (oid::INT8, true) => Some(i64::from_be_bytes(v.try_into().ok()?).to_string()),
            (_, true) => super::numeric::from_binary(v),
            (_, false) => Some(String::from_utf8_lossy(v).into_owned()),
        }
    };
    let (Some(sum), Some(count)) = (value(at), value(at + 1)) else { return Ok(None) };
    let count: u64 = count.parse().map_err(|_| "avg() across shards: a bad count".to_string())?;
    let Some(avg) = super::numeric::avg(&sum, count) else {
        return if count == 0 {
            Ok(None)
        } else {
            refuse("avg() across shards of NaN or infinite values is not supported")
        };
    };
    match binary {
        true => super::numeric::to_binary(&avg).map(Some).ok_or_else(|| "avg() across shards overflows".to_string()),
        false => Ok(Some(avg.into_bytes())),
    }
}
