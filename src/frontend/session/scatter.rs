//! Reads that run on every shard (or the several shards their keys are
//! on): the same statement on a connection of each, in parallel, the rows
//! merged by [`crate::shard::merge`] and answered as one server would —
//! over the simple query protocol, or an extended-protocol batch (Parse,
//! Bind, Describe, Execute, Sync) whose replies pgmux gives in order.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Session;
use crate::backend::pool::Checkout;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::first_message;
use crate::protocol::frame::{peek_header, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;
use crate::protocol::statements::{split_cstr, Statement};
use crate::shard::merge::{self, MergePlan, Row};
use crate::shard::ShardRouter;

/// Rows a merge may hold, in bytes.
const SCATTER_LIMIT: usize = 256 << 20;

/// DataRows and CommandComplete.
fn put_rows(out: &mut BytesMut, rows: &[Row]) {
    for row in rows {
        let body = merge::row_body(row);
        let at = msg::start_message(out, b'D');
        out.extend_from_slice(&body);
        msg::finish_message(out, at);
    }
    let at = msg::start_message(out, b'C');
    out.extend_from_slice(format!("SELECT {}\0", rows.len()).as_bytes());
    msg::finish_message(out, at);
}

fn unsupported(why: &str) -> PgError {
    PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, format!("pgmux: {why}"))
}

/// The client's extended-protocol batch, as far as a scatter needs it.
pub(super) struct Batch {
    /// Tags in order (P, B, D, E, S).
    tags: Vec<u8>,
    /// A named Parse: (name, body after the name).
    pub(super) named: Option<(String, Vec<u8>)>,
    /// Parameter types (from the Parse or the client's statement).
    pub(super) types: Vec<u8>,
    pub(super) bind: Vec<u8>,
    /// A Describe of the statement (before the Bind).
    pub(super) describes_statement: bool,
}

impl Batch {
    /// The replies to the batch, in its order, as one server would give
    /// them: `desc` the portal's RowDescription (or NoData), `stmt_desc`
    /// the statement's descriptions, `executed` the Execute's rows and
    /// CommandComplete.
    pub(super) fn reply(&self, desc: &[u8], stmt_desc: &[u8], executed: &[u8], status: TxStatus) -> BytesMut {
        let mut out = BytesMut::new();
        // The statement's Describe (if any) comes before the Bind.
        let mut statement_pending = self.describes_statement;
        for tag in &self.tags {
            match tag {
                b'P' => out.extend_from_slice(b"1\0\0\0\x04"),
                b'B' => out.extend_from_slice(b"2\0\0\0\x04"),
                b'D' if !std::mem::take(&mut statement_pending) => out.extend_from_slice(desc),
                b'D' => out.extend_from_slice(stmt_desc),
                b'E' => out.extend_from_slice(executed),
                _ => msg::ready_for_query(&mut out, status),
            }
        }
        out
    }

    /// Remember the batch's named statement (its Parse ran only on the
    /// shards, not on a connection the session's statements follow).
    pub(super) fn keep_statement(&mut self, stmts: &mut crate::protocol::statements::ClientStatements) {
        if let Some((name, rest)) = self.named.take() {
            keep_named(stmts, name, &rest);
        }
    }
}

/// Keep the client's statement `name` (its Parse body after the name)
/// that pgmux answered itself, for the Binds that name it.
pub(super) fn keep_named(stmts: &mut crate::protocol::statements::ClientStatements, name: String, rest: &[u8]) {
    stmts.map.insert(name, std::sync::Arc::new(Statement::new(rest)));
}

impl Session {
    /// Run a read on every shard and answer with the merged rows. `false`:
    /// the client went away.
    pub(super) async fn scatter(&mut self, plan: &MergePlan) -> bool {
        let Some(sh) = self.sharding.clone() else { return false };
        self.consume_first();
        let mut request = BytesMut::new();
        msg::query(&mut request, &plan.sql);
        let result = self.gather(&sh, plan, &request).await;
        let mut out = BytesMut::new();
        match result {
            Ok((desc, rows, _)) => {
                out.extend_from_slice(&desc);
                put_rows(&mut out, &rows);
            }
            Err(e) => {
                e.encode(&mut out);
                self.account.error(&e.code);
                self.fail_multi();
            }
        }
        msg::ready_for_query(&mut out, self.txn_status());
        self.stream.write_all(&out).await.is_ok()
    }

    /// Send `request` (the read) to a connection of every shard (a replica where the
    /// shard's routing allows; in a transaction spanning shards, its
    /// parts), read all answers, merge.
    async fn gather(
        &mut self,
        sh: &ShardRouter,
        plan: &MergePlan,
        request: &[u8],
    ) -> Result<(BytesMut, Vec<Row>, Vec<u8>), PgError> {
        let mut conns = self.shard_conns_ahead(sh, plan.shards.as_deref(), true).await?;
        let bytewise = plan.default_collation() && sh.text_bytewise(&mut conns).await;
        let answers = self.ask_each(&mut conns, |_| request).await;
        let mut desc: Option<BytesMut> = None;
        let mut stmt_desc = Vec::new();
        let mut shards_rows = Vec::new();
        let mut error = None;
        let mut held = 0usize;
        for answer in answers {
            match answer {
                Ok(a) => {
                    if let (None, Some(e)) = (&error, &a.error) {
                        error = Some(PgError::error_from_server(e));
                    }
                    held += a.rows.iter().map(Vec::len).sum::<usize>();
                    desc = desc.or(a.desc);
                    if stmt_desc.is_empty() {
                        stmt_desc = a.stmt_desc;
                    }
                    shards_rows.push(a.rows);
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if held > SCATTER_LIMIT {
            return Err(PgError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, "pgmux: result across shards too large"));
        }
        let desc = desc.ok_or_else(|| PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "pgmux: no rows description"))?;
        let cols = merge::columns(&desc[HEADER_LEN..])
            .ok_or_else(|| PgError::error(sqlstate::PROTOCOL_VIOLATION, "pgmux: bad RowDescription"))?;
        let parsed: Vec<Vec<Row>> =
            shards_rows.into_iter().map(|rows| rows.iter().filter_map(|r| merge::parse_row(r)).collect()).collect();
        let rows = merge::finish(plan, &cols, parsed, bytewise)
            .map_err(|why| PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, format!("pgmux: {why}")))?;
        if plan.hidden == 0 {
            return Ok((desc, rows, stmt_desc));
        }
        let keep = cols.len().saturating_sub(plan.hidden);
        let body = merge::trim_description(&desc[HEADER_LEN..], keep)
            .ok_or_else(|| PgError::error(sqlstate::PROTOCOL_VIOLATION, "pgmux: bad RowDescription"))?;
        let mut trimmed = BytesMut::new();
        let at = msg::start_message(&mut trimmed, b'T');
        trimmed.extend_from_slice(&body);
        msg::finish_message(&mut trimmed, at);
        Ok((trimmed, rows, trim_statement_description(&stmt_desc, keep).unwrap_or(stmt_desc)))
    }

    /// Run an extended-protocol read batch (up to its Sync) on the shards
    /// of `plan`. `false`: the client went away.
    pub(super) async fn scatter_extended(&mut self, plan: &MergePlan) -> bool {
        let Some(sh) = self.sharding.clone() else { return false };
        let batch = match self.take_batch().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => return self.answer_error(&e).await,
            None => return false,
        };
        let mut request = BytesMut::new();
        let at = msg::start_message(&mut request, b'P');
        request.put_u8(0);
        request.extend_from_slice(plan.sql.as_bytes());
        request.put_u8(0);
        request.extend_from_slice(&batch.types);
        msg::finish_message(&mut request, at);
        if batch.describes_statement {
            request.extend_from_slice(b"D\0\0\0\x06S\0");
        }
        match bind_for_shards(&batch.bind, plan.hidden) {
            Some(b) => request.extend_from_slice(&b),
            None => return self.answer_error(&unsupported("malformed Bind")).await,
        }
        request.extend_from_slice(b"D\0\0\0\x06P\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
        let (desc, rows, stmt_desc) = match self.gather(&sh, plan, &request).await {
            Ok(r) => r,
            Err(e) => return self.answer_error(&e).await,
        };
        let mut batch = batch;
        batch.keep_statement(&mut self.stmts);
        let mut executed = BytesMut::new();
        put_rows(&mut executed, &rows);
        let out = batch.reply(&desc, &stmt_desc, &executed, self.txn_status());
        self.stream.write_all(&out).await.is_ok()
    }

    /// Send each connection its request (`request(shard)`) at once and
    /// read the answers; the connections go back (to the transaction, or
    /// their pools).
    pub(super) async fn ask_each<'r>(
        &mut self,
        conns: &mut Vec<(usize, Checkout)>,
        request: impl Fn(usize) -> &'r [u8],
    ) -> Vec<Result<Answer, PgError>> {
        let sends = conns.iter_mut().map(|(i, c)| {
            let request = request(*i);
            async move {
                let conn = c.conn();
                conn.send(request).await?;
                read_any_answer(conn).await
            }
        });
        let answers = futures_util::future::join_all(sends).await;
        let mut out = Vec::new();
        for (answer, (i, c)) in answers.into_iter().zip(conns.drain(..)) {
            out.push(match answer {
                Ok(a) => {
                    self.give_back(i, c, a.status);
                    Ok(a)
                }
                Err(e) => {
                    // Its part of a transaction is lost with it.
                    self.fail_multi();
                    Err(PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: shard: {e}")))
                }
            });
        }
        out
    }

    /// The transaction status pgmux reports after a batch it answered.
    pub(super) fn txn_status(&self) -> TxStatus {
        match self.multi() {
            Some(m) if m.failed => TxStatus::Failed,
            Some(_) => TxStatus::InBlock,
            None => TxStatus::Idle,
        }
    }

    /// Answer a batch with `e` and ReadyForQuery.
    pub(super) async fn answer_error(&mut self, e: &PgError) -> bool {
        self.account.error(&e.code);
        let mut out = BytesMut::new();
        e.encode(&mut out);
        msg::ready_for_query(&mut out, self.failed_status());
        self.stream.write_all(&out).await.is_ok()
    }

    /// Consume the batch at the front of the buffer up to its Sync
    /// (reading more as needed); `None`: the client went away.
    pub(super) async fn take_batch(&mut self) -> Option<Result<Batch, PgError>> {
        let mut batch =
            Batch { tags: Vec::new(), named: None, types: vec![0, 0], bind: Vec::new(), describes_statement: false };
        let mut error = None;
        loop {
            let Some((tag, body)) = first_message(&self.rbuf) else {
                if peek_header(&self.rbuf, MAX_MESSAGE_LEN).is_err() {
                    return None;
                }
                self.rbuf.reserve(8192);
                if !matches!(self.stream.read_buf(&mut self.rbuf).await, Ok(n) if n > 0) {
                    return None;
                }
                continue;
            };
            let body = body.to_vec();
            self.consume_first();
            batch.tags.push(tag);
            match tag {
                b'P' => {
                    let (name, rest) = split_cstr(&body).unwrap_or(("", &[]));
                    batch.types = split_cstr(rest).map(|(_, t)| t.to_vec()).unwrap_or_else(|| vec![0, 0]);
                    if !name.is_empty() {
                        batch.named = Some((name.to_string(), rest.to_vec()));
                    }
                }
                b'B' if batch.bind.is_empty() => {
                    let stmt = split_cstr(&body).and_then(|(_, r)| split_cstr(r)).map(|(s, _)| s).unwrap_or("");
                    if !stmt.is_empty() && batch.named.as_ref().is_none_or(|(n, _)| n != stmt) {
                        if let Some(s) = Statement::lookup(&self.stmts, stmt) {
                            let qt = s.query_and_types();
                            batch.types = split_cstr(qt).map(|(_, t)| t.to_vec()).unwrap_or_else(|| vec![0, 0]);
                        }
                    }
                    batch.bind = body;
                }
                b'D' if body.first() == Some(&b'P') => {}
                b'D' if body.first() == Some(&b'S') && !batch.describes_statement => {
                    batch.describes_statement = true;
                }
                b'E' if body.get(body.len().saturating_sub(4)..) == Some(&[0, 0, 0, 0][..]) => {}
                b'S' => break,
                _ => {
                    error.get_or_insert_with(|| unsupported("this extended-protocol batch cannot run across shards"));
                }
            }
        }
        let shape = batch.tags.iter().filter(|&&t| t == b'B').count() == 1
            && batch.tags.iter().filter(|&&t| t == b'E').count() == 1;
        Some(match error {
            Some(e) => Err(e),
            None if !shape => Err(unsupported("a statement across shards needs one Bind and one Execute per batch")),
            None => Ok(batch),
        })
    }
}

/// ParameterDescription + RowDescription with the RowDescription's first
/// `keep` fields only.
fn trim_statement_description(msgs: &[u8], keep: usize) -> Option<Vec<u8>> {
    let (tag, len) = peek_header(msgs, MAX_MESSAGE_LEN).ok()??;
    let split = HEADER_LEN + len;
    if tag != b't' || msgs.get(split) != Some(&b'T') {
        return None;
    }
    let body = merge::trim_description(msgs.get(split + HEADER_LEN..)?, keep)?;
    let mut out = BytesMut::from(msgs.get(..split)?);
    let at = msg::start_message(&mut out, b'T');
    out.extend_from_slice(&body);
    msg::finish_message(&mut out, at);
    Some(out.to_vec())
}

/// The client's Bind for the shards: unnamed portal and statement, and
/// text format for the hidden sort columns when formats are per column.
pub(super) fn bind_for_shards(body: &[u8], hidden: usize) -> Option<Vec<u8>> {
    let bind = msg::parse_bind(body)?;
    let rf = bind.result_formats;
    let nr = usize::try_from(i16::from_be_bytes([*rf.first()?, *rf.get(1)?])).ok()?;
    let mut out = BytesMut::new();
    let m = msg::start_message(&mut out, b'B');
    out.put_u8(0);
    out.put_u8(0);
    out.extend_from_slice(bind.params_section);
    if nr > 1 {
        out.put_i16(i16::try_from(nr + hidden).ok()?);
        out.extend_from_slice(rf.get(2..)?);
        for _ in 0..hidden {
            out.put_i16(0);
        }
    } else {
        out.extend_from_slice(rf);
    }
    msg::finish_message(&mut out, m);
    Some(out.to_vec())
}

/// One shard's answer to a read (or a COPY).
pub(super) struct Answer {
    /// The whole RowDescription message (of the portal).
    pub(super) desc: Option<BytesMut>,
    /// ParameterDescription and RowDescription of a Describe of the
    /// statement, whole, if one was sent.
    pub(super) stmt_desc: Vec<u8>,
    /// DataRow bodies.
    pub(super) rows: Vec<Vec<u8>>,
    pub(super) error: Option<BytesMut>,
    /// Rows a COPY took (its CommandComplete).
    pub(super) copied: u64,
    /// The CommandComplete tag.
    pub(super) tag: Option<String>,
    /// The transaction status after it.
    status: TxStatus,
}

/// A shard's answer, with the transaction status it left.
pub(super) async fn read_any_answer(
    conn: &mut crate::backend::server::ServerConn,
) -> Result<Answer, crate::backend::server::ServerError> {
    let mut a = Answer {
        desc: None,
        stmt_desc: Vec::new(),
        rows: Vec::new(),
        error: None,
        copied: 0,
        tag: None,
        status: TxStatus::Idle,
    };
    let mut statement_next = false;
    conn.settle().await?;
    loop {
        let (tag, body) = conn.read_message().await?;
        let whole = || {
            let mut whole = BytesMut::with_capacity(body.len() + HEADER_LEN);
            let at = msg::start_message(&mut whole, tag);
            whole.extend_from_slice(&body);
            msg::finish_message(&mut whole, at);
            whole
        };
        match tag {
            b't' => {
                a.stmt_desc.extend_from_slice(&whole());
                statement_next = true;
            }
            b'T' | b'n' if statement_next => {
                a.stmt_desc.extend_from_slice(&whole());
                statement_next = false;
            }
            b'T' => a.desc = Some(whole()),
            b'D' => a.rows.push(body.to_vec()),
            b'E' => a.error = Some(body),
            b'C' => {
                let tag = String::from_utf8_lossy(&body).trim_end_matches('\0').to_string();
                if let Some(n) = tag.strip_prefix("COPY ") {
                    a.copied = n.parse().unwrap_or(0);
                }
                a.tag = Some(tag);
            }
            b'Z' => {
                a.status = TxStatus::of_ready(&body);
                return Ok(a);
            }
            _ => {}
        }
    }
}
