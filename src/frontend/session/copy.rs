//! COPY FROM STDIN into a sharded table (text, CSV or binary): one COPY
//! per shard, each row of the client's stream sent to the shard of its
//! key (a header — CSV's line, binary's file header — to every shard), the
//! row counts added up, in one transaction across the shards (committed
//! as [`super::multi`] commits, two-phase when on). A row without a usable
//! key, or an error on any shard, fails the whole COPY on every shard.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::scatter::read_any_answer;
use super::{Session, Txn};
use crate::backend::pool::Checkout;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::first_message;
use crate::protocol::frame::{peek_header, MAX_MESSAGE_LEN};
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;
use crate::shard::copy::{CopyIn, RowSplitter};
use crate::shard::ShardRouter;

/// Bytes buffered for one shard before they are sent.
const FLUSH_AT: usize = 64 * 1024;

fn copy_error(message: String) -> PgError {
    PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, format!("pgmux: {message}"))
}

impl Session {
    /// Run the COPY at the front of the buffer (a Query). `false`: the
    /// client went away.
    pub(super) async fn copy_into_shards(&mut self, copy: CopyIn, sql: String, extended: bool) -> bool {
        let Some(sh) = self.sharding.clone() else { return false };
        // The key's place first: its table's columns may need a connection.
        let key = match row_key(&sh, &copy).await {
            Ok(k) => k,
            Err(e) => return self.refuse(&e).await,
        };
        // Extended protocol: Parse/Bind replies, then the COPY starts at
        // the Execute (a Sync sent before the data is ignored, as
        // PostgreSQL ignores it in COPY mode; the one after CopyDone is
        // answered as usual).
        let mut before = BytesMut::new();
        while let Some((tag, _)) = first_message(&self.rbuf) {
            self.consume_first();
            match tag {
                b'P' => before.extend_from_slice(b"1\0\0\0\x04"),
                b'B' => before.extend_from_slice(b"2\0\0\0\x04"),
                _ => {}
            }
            if !extended || tag == b'E' {
                break;
            }
        }
        if !before.is_empty() && self.stream.write_all(&before).await.is_err() {
            return false;
        }
        // One transaction across the shards: all rows or none.
        self.txn = Txn::AcrossShards(super::multi::Multi::new("BEGIN"));
        let (shards, mut conns): (Vec<usize>, Vec<Checkout>) = match self.shard_conns(&sh, None, false).await {
            Ok(c) => c.into_iter().unzip(),
            Err(e) => {
                let _ = self.finish_multi(false).await;
                return self.answer_error(&e).await;
            }
        };
        let result = self.copy_rows(&sh, &copy, &key, &sql, &mut conns).await;
        let mut out = BytesMut::new();
        let copied = match result {
            Ok(Some(Ended::Copied(n))) => Some(n),
            Ok(Some(Ended::Refused(e))) => {
                e.encode(&mut out);
                None
            }
            Ok(None) | Err(_) => {
                // The shards may be mid-COPY (some of them): their
                // connections close, which rolls back their transaction.
                drop(conns);
                let _ = self.finish_multi(false).await;
                let Err(e) = result else { return false };
                e.encode(&mut out);
                return self.send_copy_end(out, extended).await;
            }
        };
        for (i, c) in shards.into_iter().zip(conns) {
            self.give_back(i, c, TxStatus::InBlock);
        }
        match (self.finish_multi(copied.is_some()).await, copied) {
            (Ok(_), Some(n)) => {
                let at = msg::start_message(&mut out, b'C');
                out.extend_from_slice(format!("COPY {n}\0").as_bytes());
                msg::finish_message(&mut out, at);
            }
            (Err(e), Some(_)) => e.encode(&mut out),
            (_, None) => {}
        }
        self.send_copy_end(out, extended).await
    }

    /// The end of the COPY's answer (and ReadyForQuery over the simple
    /// protocol; the client's Sync brings it otherwise).
    async fn send_copy_end(&mut self, mut out: BytesMut, extended: bool) -> bool {
        if !extended {
            msg::ready_for_query(&mut out, TxStatus::Idle);
        }
        self.stream.write_all(&out).await.is_ok()
    }

    /// Start the COPY on every shard, split the client's rows, finish.
    /// `Ok(None)`: the client went away. On `Err` the shards may still be
    /// in COPY mode (the caller fails them).
    async fn copy_rows(
        &mut self,
        sh: &ShardRouter,
        copy: &CopyIn,
        key: &RowKey,
        sql: &str,
        conns: &mut [Checkout],
    ) -> Result<Option<Ended>, PgError> {
        let response = start_on_shards(conns, sql).await?;
        let mut reply = BytesMut::new();
        let at = msg::start_message(&mut reply, b'G');
        reply.extend_from_slice(&response.unwrap_or_default());
        msg::finish_message(&mut reply, at);
        if self.stream.write_all(&reply).await.is_err() {
            return Ok(None);
        }
        self.split_rows(sh, copy, key, conns).await
    }

    /// Send each row of the client's COPY data to the shard of its key
    /// (the header line, if any, to every shard) until CopyDone, then
    /// finish the COPY on every shard. `Ok(None)`: the client went away.
    async fn split_rows(
        &mut self,
        sh: &ShardRouter,
        copy: &CopyIn,
        key: &RowKey,
        conns: &mut [Checkout],
    ) -> Result<Option<Ended>, PgError> {
        let mut splitter = RowSplitter::new(copy.clone());
        let mut outgoing: Vec<BytesMut> = conns.iter().map(|_| BytesMut::new()).collect();
        let mut header = copy.header || copy.binary;
        let mut resolved = std::mem::take(&mut self.resolved);
        let result = loop {
            let Some((tag, body)) = first_message(&self.rbuf).map(|(t, b)| (t, b.to_vec())) else {
                if peek_header(&self.rbuf, MAX_MESSAGE_LEN).is_err() {
                    break Err(copy_error("invalid message during COPY".into()));
                }
                self.rbuf.reserve(64 * 1024);
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(n) if n > 0 => continue,
                    _ => break Ok(None),
                }
            };
            self.consume_first();
            match tag {
                b'd' => {
                    let mut rows = Vec::new();
                    if let Err(why) = splitter.feed(&body, |r| rows.push(r.to_vec())) {
                        break Err(PgError::error(sqlstate::BAD_COPY_FILE_FORMAT, why));
                    }
                    for row in rows {
                        if std::mem::take(&mut header) {
                            // Every shard's COPY expects the header line.
                            outgoing.iter_mut().for_each(|o| o.extend_from_slice(&row));
                            continue;
                        }
                        let shard = row_shard(sh, &splitter, &row, key, &mut resolved).await?;
                        outgoing[shard].extend_from_slice(&row);
                    }
                    flush(conns, &mut outgoing, FLUSH_AT).await?;
                }
                b'c' => {
                    let rest = match splitter.finish() {
                        Ok(rest) => rest,
                        Err(why) => break Err(PgError::error(sqlstate::BAD_COPY_FILE_FORMAT, why)),
                    };
                    if !rest.is_empty() {
                        let shard = row_shard(sh, &splitter, &rest, key, &mut resolved).await?;
                        outgoing[shard].extend_from_slice(&rest);
                    }
                    outgoing.iter_mut().for_each(|o| o.extend_from_slice(splitter.trailer()));
                    flush(conns, &mut outgoing, 0).await?;
                    break finish(conns).await.map(Some);
                }
                b'f' => {
                    break Err(PgError::error(
                        "57014",
                        format!("COPY from stdin failed: {}", String::from_utf8_lossy(&body).trim_end_matches('\0')),
                    ))
                }
                // Flush and Sync mean nothing during a COPY.
                b'H' | b'S' => {}
                other => break Err(copy_error(format!("unexpected message {:?} during COPY", other as char))),
            }
        };
        self.resolved = resolved;
        result
    }
}

/// Where the shard key is in the rows of a COPY, and its type and map.
struct RowKey {
    at: usize,
    key_type: crate::config::KeyType,
    map: usize,
}

/// The shard key of the COPY's rows: its column's position (in the COPY's
/// column list, or the table's columns in order), type and map.
async fn row_key(sh: &ShardRouter, copy: &CopyIn) -> Result<RowKey, PgError> {
    let (key_col, map) =
        sh.sharded_table(&copy.table).ok_or_else(|| copy_error(format!("{} is not sharded", copy.table)))?;
    let key_type = sh.key_type(map).ok_or_else(|| copy_error("unknown shard map".into()))?;
    let columns =
        if copy.columns.is_empty() { sh.table_columns(&copy.table).await?.to_vec() } else { copy.columns.clone() };
    let key_at = columns
        .iter()
        .position(|c| *c == key_col)
        .ok_or_else(|| copy_error(format!("COPY into {} must include its shard key column {key_col}", copy.table)))?;
    Ok(RowKey { at: key_at, key_type, map })
}

/// Send the COPY to every shard; the body of their CopyInResponse (the
/// first shard's), or the first error (that shard's answer read to its end).
async fn start_on_shards(conns: &mut [Checkout], sql: &str) -> Result<Option<BytesMut>, PgError> {
    let mut start = BytesMut::new();
    msg::query(&mut start, sql);
    let mut response = None;
    for c in conns.iter_mut() {
        let conn = c.conn();
        conn.stream.write_all(&start).await.map_err(|e| copy_error(e.to_string()))?;
        let (tag, body) = conn.read_message().await.map_err(|e| copy_error(e.to_string()))?;
        match tag {
            b'G' => response = response.or(Some(body)),
            b'E' => {
                let _ = read_any_answer(conn).await;
                return Err(PgError::error_from_server(&body));
            }
            other => return Err(copy_error(format!("unexpected reply {:?} to COPY", other as char))),
        }
    }
    Ok(response)
}

/// The shard of one row.
async fn row_shard(
    sh: &ShardRouter,
    splitter: &RowSplitter,
    row: &[u8],
    key: &RowKey,
    resolved: &mut crate::shard::Resolved,
) -> Result<usize, PgError> {
    let key_value = splitter
        .key(row, key.at, key.key_type)
        .ok_or_else(|| copy_error("a row of COPY into a sharded table has no shard key".into()))?
        .map_err(|e| PgError::error(sqlstate::INVALID_TEXT_REPRESENTATION, format!("pgmux: {e}")))?;
    sh.shard_of_key(key.map, &key_value, resolved).await
}

/// Send each shard's buffered rows (when over `at` bytes) as CopyData.
async fn flush(conns: &mut [Checkout], outgoing: &mut [BytesMut], at: usize) -> Result<(), PgError> {
    for (c, o) in conns.iter_mut().zip(outgoing.iter_mut()) {
        if o.is_empty() || o.len() < at {
            continue;
        }
        let mut m = BytesMut::with_capacity(o.len() + 5);
        m.put_u8(b'd');
        m.put_u32(u32::try_from(o.len() + 4).map_err(|_| copy_error("row too large".into()))?);
        m.extend_from_slice(o);
        o.clear();
        c.conn().stream.write_all(&m).await.map_err(|e| copy_error(e.to_string()))?;
    }
    Ok(())
}

/// How a COPY that reached its end on every shard ended.
enum Ended {
    /// The rows every shard took, added up.
    Copied(u64),
    /// A shard refused it (its error); every shard's COPY is over.
    Refused(PgError),
}

/// CopyDone to every shard; how it ended there.
async fn finish(conns: &mut [Checkout]) -> Result<Ended, PgError> {
    let mut total = 0u64;
    let mut error = None;
    for c in conns.iter_mut() {
        let conn = c.conn();
        conn.stream.write_all(b"c\0\0\0\x04").await.map_err(|e| copy_error(e.to_string()))?;
    }
    for c in conns.iter_mut() {
        let a = read_any_answer(c.conn()).await.map_err(|e| copy_error(e.to_string()))?;
        if let (None, Some(e)) = (&error, &a.error) {
            error = Some(PgError::error_from_server(e));
        }
        total += a.copied;
    }
    Ok(match error {
        Some(e) => Ended::Refused(e),
        None => Ended::Copied(total),
    })
}
