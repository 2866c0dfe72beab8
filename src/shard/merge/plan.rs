//! The merge plan of a read sent to every shard ([`plan`]): what the
//! statement asks of the merge, step by step — aggregates (`avg` from
//! partial sums and counts appended, hidden; `count(DISTINCT x)` from
//! groups of `x` appended to the shards' `GROUP BY`) and `GROUP BY`,
//! `DISTINCT` and `DISTINCT ON`,
//! `ORDER BY` keys (sort keys the client did not select appended,
//! hidden), `LIMIT` / `OFFSET` — and the statement each shard runs; or
//! why it cannot be merged exactly.

use sqlparser::ast::{
    Distinct, DuplicateTreatment, Expr, FunctionArguments, GroupByExpr, LimitClause, OrderByKind, OrderBySort, Query,
    Select, SelectItem, SetExpr, Statement, Value,
};

use super::{having, refuse, Agg, Collation, ColumnRef, MergePlan, SortKey};

fn number(e: &Expr) -> Option<u64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// The merge plan of a read that goes to every shard, or why it cannot
/// be merged exactly.
pub fn plan(stmt: &Statement, sql: &str) -> Result<MergePlan, String> {
    let Statement::Query(q) = stmt else { return refuse("only queries can run on every shard") };
    let mut q: Query = (**q).clone();
    let SetExpr::Select(select) = q.body.as_mut() else {
        return refuse("set operations (UNION, INTERSECT, EXCEPT) across shards are not supported");
    };
    // The shards return every group; the condition holds after the merge.
    let having_expr = select.having.take();
    let select: Select = (**select).clone();
    let select = &select;
    let (exprs, mut aggs, mut partials) = aggregates(select)?;
    let having = match (&having_expr, aggs.as_mut()) {
        (None, _) => None,
        (Some(_), None) => return refuse("HAVING without aggregates across shards is not supported"),
        (Some(e), Some(aggs)) => {
            let mut extra = Vec::new();
            let first_appended = exprs.len() + partials.len();
            let mut cols = having::Columns { aggregate, exprs: &exprs, first_appended, appended: &mut extra };
            let h = having::compile(e, &mut cols)?;
            for (item, agg) in extra {
                partials.push(item);
                aggs.push(agg);
            }
            Some(h)
        }
    };
    if let Some(x) = distinct_argument(select, having_expr.as_ref())? {
        // count(DISTINCT x): each shard groups by x as well, and the
        // merge counts the groups of x (see `Agg::DistinctArg`).
        if let SetExpr::Select(s) = q.body.as_mut() {
            if let GroupByExpr::Expressions(g, _) = &mut s.group_by {
                g.push(x.clone());
            }
        }
        partials.push(SelectItem::UnnamedExpr(x));
        if let Some(aggs) = aggs.as_mut() {
            aggs.push(Agg::DistinctArg);
        }
    }
    let distinct = match &select.distinct {
        None => None,
        Some(_) if aggs.is_some() => return refuse("DISTINCT with aggregates across shards is not supported"),
        Some(Distinct::Distinct) => Some(Vec::new()),
        Some(Distinct::On(on)) => Some(on.iter().map(|e| select_column(e, &exprs)).collect::<Result<_, _>>()?),
        Some(_) => return refuse("this DISTINCT form is not supported across shards"),
    };
    let appended: Vec<String> = partials.iter().map(|p| p.to_string()).collect();
    let (order, mut hidden) = sort_keys(&q, select, (&exprs, &appended), aggs.is_some() || distinct.is_some())?;
    hidden.extend(partials);
    let (limit, offset) = limit_offset(&q)?;
    if q.fetch.is_some() {
        return refuse("FETCH FIRST across shards is not supported (use LIMIT)");
    }
    let n_hidden = hidden.len();
    // Without its HAVING the text is no longer the client's.
    let sql = match having.is_some() {
        true => shard_sql(q, hidden, aggs.is_some(), limit, offset, None),
        false => shard_sql(q, hidden, aggs.is_some(), limit, offset, Some(sql)),
    };
    Ok(MergePlan { sql, order, limit, offset, aggs, distinct, having, hidden: n_hidden, shards: None })
}

/// A `DISTINCT ON` expression as an output column: a position or a
/// select-list item.
fn select_column(e: &Expr, exprs: &[String]) -> Result<ColumnRef, String> {
    if let Some(n) = number(e) {
        let n = usize::try_from(n).map_err(|_| "DISTINCT ON position out of range".to_string())?;
        return Ok(ColumnRef::Position(n.checked_sub(1).ok_or("DISTINCT ON position 0")?));
    }
    match exprs.iter().position(|t| *t == e.to_string()) {
        Some(i) => Ok(ColumnRef::Position(i)),
        None => refuse("DISTINCT ON across shards needs its expressions in the select list"),
    }
}

/// What the select list aggregates: the text of each item (empty for a
/// wildcard); how each output column combines (`None`: no aggregation),
/// the partial aggregates appended after it included; and those partial
/// aggregates (`avg(x)` needs `sum(x)` and `count(x)` from each shard).
type Aggregates = (Vec<String>, Option<Vec<Agg>>, Vec<SelectItem>);

fn aggregates(select: &Select) -> Result<Aggregates, String> {
    let grouping = match &select.group_by {
        GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => exprs,
        _ => return refuse("GROUP BY ALL / ROLLUP / CUBE across shards is not supported"),
    };
    let group_by: Vec<String> = grouping.iter().map(|e| e.to_string()).collect();
    let mut aggs = Vec::new();
    let mut exprs = Vec::new();
    let mut partials = Vec::new();
    let n = select.projection.len();
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
        let agg = aggregate(expr)?;
        if agg == Some(Agg::Avg(0)) {
            aggs.push(Some(Agg::Avg(n + partials.len())));
            partials.extend(["sum", "count"].map(|f| SelectItem::UnnamedExpr(renamed(expr, f))));
        } else {
            aggs.push(agg);
        }
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
    if !aggregating {
        return Ok((exprs, None, partials));
    }
    let mut out = Vec::new();
    for (a, text) in aggs.iter().zip(&exprs) {
        match a {
            Some(a) => out.push(*a),
            None if group_by.contains(text) => out.push(Agg::Group),
            None => return refuse("a column that is neither aggregated nor grouped cannot be merged across shards"),
        }
    }
    for _ in 0..partials.len() / 2 {
        out.extend([Agg::Sum, Agg::Count]);
    }
    // Grouping expressions the client did not select: appended, hidden.
    for (g, e) in group_by.iter().zip(grouping) {
        if !exprs.contains(g) && number(e).is_none() {
            partials.push(SelectItem::UnnamedExpr(e.clone()));
            out.push(Agg::Group);
        }
    }
    Ok((exprs, Some(out), partials))
}

/// The one `x` of the `count(DISTINCT x)` calls in the select list and
/// `HAVING`, if any; refused when they count different expressions.
fn distinct_argument(select: &Select, having: Option<&Expr>) -> Result<Option<Expr>, String> {
    let mut found: Option<Expr> = None;
    let mut visit = |e: &Expr| -> Result<(), String> {
        let Some(x) = counted_distinct(e) else { return Ok(()) };
        match &found {
            Some(f) if f.to_string() != x.to_string() => {
                refuse("count(DISTINCT) of different expressions across shards is not supported")
            }
            _ => {
                found = Some(x);
                Ok(())
            }
        }
    };
    for item in &select.projection {
        if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
            visit(e)?;
        }
    }
    if let Some(h) = having {
        let mut stack = vec![h];
        while let Some(e) = stack.pop() {
            match e {
                Expr::BinaryOp { left, right, .. } => stack.extend([left.as_ref(), right.as_ref()]),
                Expr::UnaryOp { expr, .. } | Expr::Nested(expr) => stack.push(expr),
                e => visit(e)?,
            }
        }
    }
    Ok(found)
}

/// `x` when `e` is `count(DISTINCT x)`.
fn counted_distinct(e: &Expr) -> Option<Expr> {
    let Expr::Function(f) = e else { return None };
    let FunctionArguments::List(args) = &f.args else { return None };
    if !f.name.to_string().eq_ignore_ascii_case("count")
        || args.duplicate_treatment != Some(DuplicateTreatment::Distinct)
    {
        return None;
    }
    match args.args.as_slice() {
        [sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(x))] => Some(x.clone()),
        _ => None,
    }
}

/// The aggregate call `e` with its function renamed `name` (same
/// arguments).
fn renamed(e: &Expr, name: &str) -> Expr {
    let mut e = e.clone();
    if let Expr::Function(f) = &mut e {
        f.name = sqlparser::ast::ObjectName::from(vec![sqlparser::ast::Ident::new(name)]);
    }
    e
}

/// The `ORDER BY` keys over the output columns (`exprs`: the select
/// list's texts; `appended`: those of the partial aggregates and grouping
/// expressions appended to it), and the sort expressions appended to the
/// shards' select list because the client did not select them (see
/// [`ColumnRef::Hidden`]).
fn sort_keys(
    q: &Query,
    select: &Select,
    (exprs, appended): (&[String], &[String]),
    aggregating: bool,
) -> Result<(Vec<SortKey>, Vec<SelectItem>), String> {
    let wildcard = exprs.iter().any(String::is_empty);
    let mut hidden = Vec::new();
    let mut order = Vec::new();
    let Some(ob) = &q.order_by else { return Ok((order, hidden)) };
    let OrderByKind::Expressions(items) = &ob.kind else { return refuse("ORDER BY ALL is not supported") };
    for item in items {
        let (expr, collation) = match &item.expr {
            Expr::Collate { expr, collation } => (expr.as_ref(), named(&collation.to_string())),
            e => (e, collation_of(&e.to_string())),
        };
        let column = if let Some(n) = number(expr) {
            let n = usize::try_from(n).map_err(|_| "ORDER BY position out of range".to_string())?;
            ColumnRef::Position(n.checked_sub(1).ok_or("ORDER BY position 0")?)
        } else if let Some(i) = exprs.iter().position(|t| *t == expr.to_string()) {
            ColumnRef::Position(i)
        } else if let Some(h) = appended.iter().position(|t| *t == expr.to_string()) {
            // A grouping expression appended (sort keys are not appended
            // when aggregating).
            ColumnRef::Hidden(h)
        } else if !wildcard && !aggregating && !matches!(expr, Expr::Identifier(id) if select_alias(select, &id.value))
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
        order.push(SortKey { column, desc, nulls_first, collation });
    }
    Ok((order, hidden))
}

/// `LIMIT n OFFSET m`, plain numbers only.
fn limit_offset(q: &Query) -> Result<(Option<u64>, u64), String> {
    match &q.limit_clause {
        None => Ok((None, 0)),
        Some(LimitClause::LimitOffset { limit, offset, limit_by }) if limit_by.is_empty() => {
            let limit = match limit {
                None => None,
                Some(e) => Some(number(e).ok_or("LIMIT across shards must be a number")?),
            };
            let offset = match offset {
                None => 0,
                Some(o) => number(&o.value).ok_or("OFFSET across shards must be a number")?,
            };
            Ok((limit, offset))
        }
        Some(_) => refuse("this LIMIT form is not supported across shards"),
    }
}

/// What each shard runs: the statement as given (`sql`; None: `q` was
/// changed), or (with an offset, hidden sort keys, or a limit on groups)
/// rewritten with the hidden sort keys appended and `LIMIT n+m` (no limit
/// when aggregating: groups combine after the merge).
fn shard_sql(
    mut q: Query,
    hidden: Vec<SelectItem>,
    aggregating: bool,
    limit: Option<u64>,
    offset: u64,
    sql: Option<&str>,
) -> String {
    let n_hidden = hidden.len();
    if !hidden.is_empty() {
        if let SetExpr::Select(sel) = q.body.as_mut() {
            sel.projection.extend(hidden);
        }
    }
    let rewrite = offset > 0 || (aggregating && limit.is_some()) || n_hidden > 0;
    match sql {
        Some(sql) if !rewrite => sql.to_string(),
        _ => {
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
        }
    }
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
    let collation = collation_of(&f.args.to_string());
    let agg = match name.as_str() {
        "count" => Agg::Count,
        "sum" => Agg::Sum,
        "min" => Agg::Min(collation),
        "max" => Agg::Max(collation),
        "avg" => Agg::Avg(0),
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
        match (args.duplicate_treatment, agg) {
            (None | Some(DuplicateTreatment::All), _) => {}
            // The smallest distinct value is the smallest value.
            (Some(_), Agg::Min(_) | Agg::Max(_)) => {}
            (Some(_), Agg::Count) if counted_distinct(e).is_some() => return Ok(Some(Agg::CountDistinct)),
            (Some(_), _) => {
                return refuse("DISTINCT aggregates across shards other than count(DISTINCT x) are not supported")
            }
        }
    }
    Ok(Some(agg))
}

/// The collation `COLLATE name` names.
fn named(name: &str) -> Collation {
    match name.trim_matches('"') {
        "C" | "POSIX" => Collation::Bytewise,
        _ => Collation::Other,
    }
}

/// The collation text in an expression's text compares under: the one a
/// trailing `COLLATE` names, another when one is named inside it, else
/// the database's.
fn collation_of(text: &str) -> Collation {
    let text = text.trim_end_matches(')');
    match text.rfind(" COLLATE ") {
        Some(at) if !text[..at].contains(" COLLATE ") => named(text[at + 9..].trim()),
        Some(_) => Collation::Other,
        None => Collation::Default,
    }
}

fn contains_function(e: &Expr) -> bool {
    let text = e.to_string().to_lowercase();
    ["count(", "sum(", "min(", "max(", "avg("].iter().any(|f| text.contains(f))
}
