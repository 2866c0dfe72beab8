//! Two-phase commit of a transaction that touched several shards
//! (`two_phase_commit = true`).
//!
//! The first shard the transaction touched is its coordinator: its part
//! also writes a row in `pgmux_commit_log`. Every part is prepared
//! (`PREPARE TRANSACTION`); if one fails, all are rolled back. Then the
//! coordinator's part is committed — that commit, which makes the log row
//! visible, *is* the decision — and the others after it.
//!
//! A pgmux that dies between the phases leaves prepared transactions
//! behind. [`recover`] (run by every pgmux, every [`RECOVERY_EVERY`])
//! settles those older than a grace period: committed when the
//! coordinator's log row exists, rolled back when it does not (presumed
//! abort: no row, no decision to commit).
//!
//! Transaction ids: `pgmux_<txn>_<coordinator>_<shard>` (shard indexes),
//! unique per server even when shards share one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::ShardBackend;
use crate::backend::pool::Checkout;
use crate::backend::server::{ServerConn, ServerError};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages::TxStatus;

/// The decision log on each coordinator shard.
pub const LOG_TABLE: &str = "pgmux_commit_log";

/// How often a pgmux looks for prepared transactions left behind.
pub const RECOVERY_EVERY: Duration = Duration::from_secs(30);

/// How old a prepared transaction must be before recovery settles it (a
/// younger one may still be committing).
pub const RECOVERY_GRACE: Duration = Duration::from_secs(60);

/// One part of a two-phase transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gid {
    pub txn: String,
    pub coordinator: usize,
    pub shard: usize,
}

impl Gid {
    pub fn parse(gid: &str) -> Option<Gid> {
        let mut parts = gid.strip_prefix("pgmux_")?.split('_');
        let txn = parts.next().filter(|t| t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit()))?;
        let coordinator = parts.next()?.parse().ok()?;
        let shard = parts.next()?.parse().ok()?;
        parts.next().is_none().then(|| Gid { txn: txn.to_string(), coordinator, shard })
    }
}

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pgmux_{}_{}_{}", self.txn, self.coordinator, self.shard)
    }
}

/// A failed statement of pgmux's own on a shard, as the client's error.
pub fn server_error(e: ServerError) -> PgError {
    match e {
        ServerError::Query(body) => PgError::error_from_server(&body),
        e => PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: shard connection lost during commit: {e}")),
    }
}

/// Commit `parts` (shard index, connection inside the transaction; the
/// coordinator first) all or nothing. The connections are left idle, or
/// broken. `log_ready`: the coordinator's log table is known to exist.
pub async fn commit(parts: &mut [(usize, Checkout)], log_ready: bool) -> Result<(), PgError> {
    let Some(coordinator) = parts.first().map(|p| p.0) else { return Ok(()) };
    let txn = format!("{:016x}", rand::random::<u64>());
    let gid = |shard| Gid { txn: txn.clone(), coordinator, shard }.to_string();
    let create = if log_ready {
        String::new()
    } else {
        format!("CREATE TABLE IF NOT EXISTS {LOG_TABLE} (gid text PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp()); ")
    };
    let log = format!("{create}INSERT INTO {LOG_TABLE} (gid) VALUES ('{txn}')");
    // Phase one: the log row, then every part prepared.
    let mut failure = match parts[0].1.conn().run_expecting(&log, TxStatus::InBlock).await {
        Ok(()) => None,
        Err(e) => Some(server_error(e)),
    };
    let mut prepared = 0;
    if failure.is_none() {
        for (shard, c) in parts.iter_mut() {
            match c.conn().run(&format!("PREPARE TRANSACTION '{}'", gid(*shard))).await {
                Ok(()) => prepared += 1,
                Err(e) => {
                    // A part that failed to prepare is rolled back (or,
                    // its connection lost, settled by recovery: no log row).
                    failure = Some(server_error(e));
                    break;
                }
            }
        }
    }
    if let Some(e) = failure {
        for (i, (shard, c)) in parts.iter_mut().enumerate() {
            let sql = if i < prepared { format!("ROLLBACK PREPARED '{}'", gid(*shard)) } else { "ROLLBACK".into() };
            if let Err(err) = c.conn().run(&sql).await {
                tracing::warn!(gid = %gid(*shard), "rollback after a failed prepare: {err}");
            }
        }
        return Err(e);
    }
    // Phase two: the coordinator's commit is the decision.
    if let Err(e) = parts[0].1.conn().run(&format!("COMMIT PREPARED '{}'", gid(coordinator))).await {
        tracing::warn!(txn = %txn, "commit of the coordinator's part failed: {e}");
        return Err(PgError::error(
            sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
            format!("pgmux: the outcome of this transaction is unknown ({e}); pgmux settles it within a few minutes"),
        ));
    }
    for (shard, c) in parts.iter_mut().skip(1) {
        if let Err(e) = c.conn().run(&format!("COMMIT PREPARED '{}'", gid(*shard))).await {
            // Decided: recovery commits it.
            tracing::warn!(gid = %gid(*shard), "commit of a prepared part failed, recovery will finish it: {e}");
        }
    }
    if let Err(e) = parts[0].1.conn().run(&format!("DELETE FROM {LOG_TABLE} WHERE gid = '{txn}'")).await {
        tracing::debug!(txn = %txn, "commit log cleanup: {e}");
    }
    Ok(())
}

/// What one recovery pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub committed: usize,
    pub rolled_back: usize,
}

/// The text fields of each row `sql` returns.
async fn rows(conn: &mut ServerConn, sql: &str) -> Result<Vec<Vec<String>>, ServerError> {
    let rows = conn.query_rows(sql).await?;
    Ok(rows
        .iter()
        .filter_map(|r| super::merge::parse_row(r))
        .map(|r| r.into_iter().map(|v| String::from_utf8_lossy(&v.unwrap_or_default()).into_owned()).collect())
        .collect())
}

/// The transactions a coordinator's log says were decided.
async fn logged_txns(conn: &mut ServerConn) -> Result<BTreeSet<String>, ServerError> {
    let exists = rows(conn, &format!("SELECT to_regclass('{LOG_TABLE}') IS NOT NULL")).await?;
    let exists = exists.first().and_then(|r| r.first()).is_some_and(|v| v == "t");
    if !exists {
        return Ok(BTreeSet::new());
    }
    let found = rows(conn, &format!("SELECT gid FROM {LOG_TABLE}")).await?;
    Ok(found.into_iter().filter_map(|r| r.into_iter().next()).collect())
}

/// Settle the prepared transactions pgmux left on the shards of
/// `backends` that are older than `grace` and belong to their pools' user
/// (only they, or a superuser, may finish them).
pub async fn recover(backends: &[ShardBackend], grace: Duration) -> Result<Recovered, PgError> {
    let mut conns = Vec::new();
    for b in backends {
        let c = b.primary.get().await.map_err(|e| PgError::error(sqlstate::CONNECTION_FAILURE, e.to_string()))?;
        conns.push(c);
    }
    // Every pgmux part prepared on each shard: txn → [(shard, gid, old enough)].
    let mut txns: BTreeMap<String, Vec<(usize, Gid, bool)>> = BTreeMap::new();
    let list = format!(
        "SELECT gid, (now() - prepared >= interval '{} milliseconds')::text FROM pg_prepared_xacts \
         WHERE database = current_database() AND owner = current_user AND gid LIKE 'pgmux\\_%'",
        grace.as_millis()
    );
    for (i, c) in conns.iter_mut().enumerate() {
        for row in rows(c.conn(), &list).await.map_err(server_error)? {
            if let (Some(gid), Some(old)) = (row.first().and_then(|g| Gid::parse(g)), row.get(1)) {
                txns.entry(gid.txn.clone()).or_default().push((i, gid, old == "true"));
            }
        }
    }
    let mut logged: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut done = Recovered::default();
    for parts in txns.values().filter(|p| p.iter().all(|(_, _, old)| *old)) {
        let coordinator = parts[0].1.coordinator;
        if let std::collections::btree_map::Entry::Vacant(e) = logged.entry(coordinator) {
            let Some(c) = conns.get_mut(coordinator) else { continue };
            e.insert(logged_txns(c.conn()).await.map_err(server_error)?);
        }
        let commit = logged.get(&coordinator).is_some_and(|l| l.contains(&parts[0].1.txn));
        for (i, gid, _) in parts {
            let verb = if commit { "COMMIT" } else { "ROLLBACK" };
            conns[*i].conn().run(&format!("{verb} PREPARED '{gid}'")).await.map_err(server_error)?;
            tracing::info!(%gid, "settled a prepared transaction left behind: {verb}");
            if commit {
                done.committed += 1;
            } else {
                done.rolled_back += 1;
            }
        }
    }
    // Log rows no prepared part needs any more.
    for (&coordinator, found) in &logged {
        let stale: Vec<String> = found
            .iter()
            .filter(|t| txns.get(*t).is_none_or(|p| p.iter().all(|x| x.2)))
            .map(|t| format!("'{t}'"))
            .collect();
        if !stale.is_empty() {
            let sql = format!(
                "DELETE FROM {LOG_TABLE} WHERE gid IN ({}) AND at < now() - interval '{} milliseconds'",
                stale.join(", "),
                grace.as_millis()
            );
            conns[coordinator].conn().run(&sql).await.map_err(server_error)?;
        }
    }
    for c in conns {
        c.release();
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::Gid;

    #[test]
    fn gids_round_trip() {
        let g = Gid { txn: "00ff00ff00ff00ff".into(), coordinator: 1, shard: 3 };
        assert_eq!(g.to_string(), "pgmux_00ff00ff00ff00ff_1_3");
        assert_eq!(Gid::parse(&g.to_string()), Some(g));
        assert_eq!(Gid::parse("pgmux_xyz_1_3"), None);
        assert_eq!(Gid::parse("pgmux_00ff00ff00ff00ff_1_3_4"), None);
        assert_eq!(Gid::parse("other"), None);
    }
}
