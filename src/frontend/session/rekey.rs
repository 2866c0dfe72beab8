//! An UPDATE that assigns the shard key, run inside the transaction
//! spanning shards that [`super::write`] gives it: the UPDATE on the
//! shards its WHERE names, returning each updated row; then each row whose
//! new key belongs on another shard is deleted where it is and inserted
//! there (see [`crate::shard::rekey`]). The client gets `UPDATE n`.

use std::collections::BTreeMap;

use bytes::BytesMut;

use super::scatter::Batch;
use super::write::{requests, Written};
use super::Session;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::messages as msg;
use crate::shard::map::Key;
use crate::shard::merge;
use crate::shard::rekey::Rekey;
use crate::shard::split::Split;
use crate::shard::ShardRouter;

/// Rows leaving one shard: their `ctid`s there, and (per new shard) their
/// values.
#[derive(Default)]
struct Moves {
    leaving: BTreeMap<usize, Vec<String>>,
    arriving: BTreeMap<usize, Vec<Vec<Option<String>>>>,
}

fn unsupported(why: String) -> PgError {
    PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, format!("pgmux: {why}"))
}

impl Session {
    /// Run `rekey` (the batch or Query consumed; the transaction begun).
    pub(super) async fn move_rows(
        &mut self,
        sh: &ShardRouter,
        rekey: &Rekey,
        batch: Option<&Batch>,
    ) -> Result<Written, PgError> {
        let split = Split::same(&rekey.sql, rekey.shards.iter().copied());
        let update = requests(&split, batch, true)?;
        let answers = self.ask_shards(sh, &rekey.shards, &update).await;
        let mut written = Written { desc: None, stmt_desc: Vec::new(), rows: BytesMut::new(), tag: String::new() };
        let (mut updated, mut moves, mut columns) = (0usize, Moves::default(), Vec::new());
        for (answer, &shard) in answers.into_iter().zip(&rekey.shards) {
            let a = answer?;
            if let Some(e) = &a.error {
                return Err(PgError::error_from_server(e));
            }
            if written.stmt_desc.is_empty() {
                written.stmt_desc = a.stmt_desc;
            }
            let Some(desc) = a.desc else { continue };
            columns = merge::columns(&desc[HEADER_LEN..])
                .ok_or_else(|| PgError::error(sqlstate::PROTOCOL_VIOLATION, "pgmux: bad RowDescription"))?
                .into_iter()
                .map(|c| c.0)
                .collect();
            updated += a.rows.len();
            self.place_rows(sh, rekey, shard, &columns, &a.rows, &mut moves).await?;
        }
        if !moves.leaving.is_empty() {
            self.carry_moves(sh, rekey, &columns[1..], moves).await?;
        }
        written.tag = format!("UPDATE {updated}");
        Ok(written)
    }

    /// Note each row (`ctid`, then every column) of `shard` whose key now
    /// belongs on another shard.
    async fn place_rows(
        &mut self,
        sh: &ShardRouter,
        rekey: &Rekey,
        shard: usize,
        columns: &[String],
        rows: &[Vec<u8>],
        moves: &mut Moves,
    ) -> Result<(), PgError> {
        let (_, map) =
            sh.sharded_table(&rekey.table).ok_or_else(|| unsupported(format!("{} is not sharded", rekey.table)))?;
        let key_type = sh.key_type(map).ok_or_else(|| unsupported("unknown shard map".into()))?;
        let at = columns
            .iter()
            .position(|c| *c == rekey.key)
            .ok_or_else(|| unsupported(format!("the UPDATE returned no column {}", rekey.key)))?;
        let mut resolved = std::mem::take(&mut self.resolved);
        for row in rows {
            let values: Vec<Option<String>> = merge::parse_row(row)
                .ok_or_else(|| PgError::error(sqlstate::PROTOCOL_VIOLATION, "pgmux: bad DataRow"))?
                .into_iter()
                .map(|v| v.map(|v| String::from_utf8_lossy(&v).into_owned()))
                .collect();
            let key = values.get(at).cloned().flatten().ok_or_else(|| unsupported("a NULL shard key".into()))?;
            let key = Key::from_text(key_type, &key)
                .map_err(|e| PgError::error(sqlstate::INVALID_TEXT_REPRESENTATION, format!("pgmux: {e}")))?;
            let to = sh.shard_of_key(map, &key, &mut resolved).await;
            let to = match to {
                Ok(to) => to,
                Err(e) => {
                    self.resolved = resolved;
                    return Err(e);
                }
            };
            if to != shard {
                let ctid = values.first().cloned().flatten().unwrap_or_default();
                moves.leaving.entry(shard).or_default().push(ctid);
                moves.arriving.entry(to).or_default().push(values[1..].to_vec());
            }
        }
        self.resolved = resolved;
        Ok(())
    }

    /// Delete the moving rows where they were and insert them where they
    /// now belong.
    async fn carry_moves(
        &mut self,
        sh: &ShardRouter,
        rekey: &Rekey,
        columns: &[String],
        moves: Moves,
    ) -> Result<(), PgError> {
        let mut work: BTreeMap<usize, String> = BTreeMap::new();
        for (shard, ctids) in &moves.leaving {
            work.insert(*shard, rekey.delete_sql(ctids));
        }
        for (shard, rows) in &moves.arriving {
            let insert = rekey.insert_sql(columns, rows);
            let sql = work.entry(*shard).or_default();
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&insert);
        }
        let shards: Vec<usize> = work.keys().copied().collect();
        let requests: Vec<BytesMut> = work
            .values()
            .map(|sql| {
                let mut q = BytesMut::new();
                msg::query(&mut q, sql);
                q
            })
            .collect();
        for answer in self.ask_shards(sh, &shards, &requests).await {
            if let Some(e) = answer?.error {
                return Err(PgError::error_from_server(&e));
            }
        }
        Ok(())
    }
}
