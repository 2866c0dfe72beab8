//! `SELECT pgmux.unique_id()` on a sharded database, answered by pgmux
//! itself (see [`crate::shard::ids`]) as one server would: a bigint row,
//! over the simple query protocol or an extended-protocol batch (in text
//! or binary, as the Bind asks).

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::Session;
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;

/// RowDescription of one bigint column `name` in `format`.
fn description(name: &str, format: i16) -> BytesMut {
    let mut out = BytesMut::new();
    let at = msg::start_message(&mut out, b'T');
    out.put_i16(1);
    out.extend_from_slice(name.as_bytes());
    out.put_u8(0);
    out.put_u32(0);
    out.put_i16(0);
    out.put_u32(20);
    out.put_i16(8);
    out.put_i32(-1);
    out.put_i16(format);
    msg::finish_message(&mut out, at);
    out
}

/// The statement's Describe: no parameters, one bigint column.
fn statement_description(name: &str) -> BytesMut {
    let mut out = BytesMut::from(&b"t\0\0\0\x06\0\0"[..]);
    out.extend_from_slice(&description(name, 0));
    out
}

/// The id's DataRow and CommandComplete.
fn row(id: i64, binary: bool) -> BytesMut {
    let mut out = BytesMut::new();
    let at = msg::start_message(&mut out, b'D');
    out.put_i16(1);
    let value = if binary { id.to_be_bytes().to_vec() } else { id.to_string().into_bytes() };
    out.put_i32(i32::try_from(value.len()).unwrap_or(0));
    out.extend_from_slice(&value);
    msg::finish_message(&mut out, at);
    let at = msg::start_message(&mut out, b'C');
    out.extend_from_slice(b"SELECT 1\0");
    msg::finish_message(&mut out, at);
    out
}

impl Session {
    /// Answer the `SELECT pgmux.unique_id()` at the front of the buffer
    /// (`extended`: a batch up to its Sync). `false`: the client went away.
    pub(super) async fn unique_id(&mut self, column: &str, extended: bool) -> bool {
        let id = crate::shard::ids::unique_ids(0).next();
        let status = match (self.deferred(), self.txn_status()) {
            (Some(d), _) if d.failed => TxStatus::Failed,
            (Some(_), _) => TxStatus::InBlock,
            (None, s) => s,
        };
        if !extended {
            self.consume_first();
            let mut out = description(column, 0);
            out.extend_from_slice(&row(id, false));
            msg::ready_for_query(&mut out, status);
            return self.stream.write_all(&out).await.is_ok();
        }
        if !self.batch_executes() {
            return self.describe_unique_id(column, status).await;
        }
        let mut batch = match self.take_batch().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => return self.answer_error(&e).await,
            None => return false,
        };
        let binary = msg::parse_bind(&batch.bind).is_some_and(|b| b.result_formats.get(2..4) == Some(&[0, 1]));
        batch.keep_statement(&mut self.stmts);
        let desc = description(column, i16::from(binary));
        let out = batch.reply(&desc, &statement_description(column), &row(id, binary), status);
        self.stream.write_all(&out).await.is_ok()
    }

    /// A Parse (and Describe) of it alone, as drivers prepare first: the
    /// statement is kept for its Bind, the descriptions answered.
    async fn describe_unique_id(&mut self, column: &str, status: TxStatus) -> bool {
        if let Some((b'P', body)) = crate::protocol::frame::first_message(&self.rbuf) {
            let (name, rest) = msg::split_nul(body);
            if !name.is_empty() {
                super::scatter::keep_named(&mut self.stmts, String::from_utf8_lossy(name).into_owned(), rest);
            }
        }
        let Some(batch) = self.skip_to_sync().await else { return false };
        let mut out = BytesMut::new();
        for (tag, kind) in batch {
            match (tag, kind) {
                (b'P', _) => out.extend_from_slice(b"1\0\0\0\x04"),
                (b'D', b'S') => out.extend_from_slice(&statement_description(column)),
                (b'D', _) => out.extend_from_slice(b"n\0\0\0\x04"),
                (b'C', _) => out.extend_from_slice(b"3\0\0\0\x04"),
                (b'S', _) => msg::ready_for_query(&mut out, status),
                _ => {}
            }
        }
        self.stream.write_all(&out).await.is_ok()
    }
}
