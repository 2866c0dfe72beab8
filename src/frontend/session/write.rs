//! Writes that run on several shards: the same write on each (no key, keys
//! on several shards, a reference table's copies — with
//! `allow_cross_shard_writes` — or a schema change), or an INSERT cut per
//! shard ([`crate::shard::split`]) — over the simple query protocol or as
//! an extended-protocol batch, each shard's part with its own parameters.
//! Outside a transaction the write is one of its own, committed on every
//! shard it touched (two-phase when on, see [`super::multi`]); a schema
//! change PostgreSQL runs only outside a transaction runs on each shard on
//! its own. The answer is one server's: the rows returned, the counts
//! added up.

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::scatter::{bind_for_shards, Answer, Batch};
use super::{Session, Txn};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages as msg;
use crate::shard::schema::Change;
use crate::shard::split::{Part, Split};
use crate::shard::ShardRouter;

/// How the parts of a write across shards add up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WriteKind {
    /// Each shard's rows and counts, added up.
    Parts,
    /// The same rows on each (a reference table): returned and counted once.
    Copies,
    /// A schema change: answered once; what the router knew of the schema
    /// is dropped after it.
    Schema(Change),
}

/// What the shards' answers to a write add up to.
pub(super) struct Written {
    /// The RowDescription (RETURNING), or None (NoData).
    pub(super) desc: Option<BytesMut>,
    /// The statement's description, when the batch asked for it.
    pub(super) stmt_desc: Vec<u8>,
    /// DataRow messages, every shard's.
    pub(super) rows: BytesMut,
    /// The CommandComplete tag, counts summed (`INSERT 0 5`).
    pub(super) tag: String,
}

/// The shards' answers (one per part of `split`, in order) as one; the
/// first error if any failed. `copies`: the same rows on each (a reference
/// table), returned and counted once. Rows an INSERT returned come in the
/// order of its VALUES when each part returned one per row it inserted.
fn add_up(answers: Vec<Result<Answer, PgError>>, split: &Split, copies: bool) -> Result<Written, PgError> {
    let mut w = Written { desc: None, stmt_desc: Vec::new(), rows: BytesMut::new(), tag: String::new() };
    let (mut verb, mut count, mut error) = (None, 0u64, None);
    let by_row = answers
        .iter()
        .zip(&split.parts)
        .all(|(a, p)| !p.rows.is_empty() && a.as_ref().is_ok_and(|a| a.rows.len() == p.rows.len() && a.desc.is_some()));
    let mut returned: Vec<(usize, Vec<u8>)> = Vec::new();
    for (at, (answer, part)) in answers.into_iter().zip(&split.parts).enumerate() {
        let a = match answer {
            Ok(a) => a,
            Err(e) => {
                error.get_or_insert(e);
                continue;
            }
        };
        if let Some(e) = &a.error {
            error.get_or_insert(PgError::error_from_server(e));
        }
        w.desc = w.desc.or(a.desc);
        if w.stmt_desc.is_empty() {
            w.stmt_desc = a.stmt_desc;
        }
        if copies && at > 0 {
            continue;
        }
        match by_row {
            true => returned.extend(part.rows.iter().copied().zip(a.rows)),
            false => returned.extend(a.rows.into_iter().map(|r| (0, r))),
        }
        // `INSERT 0 3` adds up; `CREATE TABLE` is as it is.
        match a.tag.as_deref().map(|t| (t, t.rsplit_once(' ').and_then(|(v, n)| Some((v, n.parse::<u64>().ok()?))))) {
            Some((_, Some((v, n)))) => {
                verb = Some(v.to_string());
                count += n;
            }
            Some((t, None)) => w.tag = t.to_string(),
            None => {}
        }
    }
    // Stable: rows of one part keep their order.
    returned.sort_by_key(|(i, _)| *i);
    for (_, r) in returned {
        let m = msg::start_message(&mut w.rows, b'D');
        w.rows.extend_from_slice(&r);
        msg::finish_message(&mut w.rows, m);
    }
    if let Some(v) = verb {
        w.tag = format!("{v} {count}");
    }
    error.map_or(Ok(w), Err)
}

/// A write across shards, as [`Session::across_shards`] runs it.
pub(super) enum Across<'a> {
    /// `split`'s parts on their shards.
    Parts(&'a Split, WriteKind),
    /// An UPDATE that assigns the shard key (see [`super::rekey`]).
    Rekey(&'a crate::shard::rekey::Rekey),
}

impl Session {
    /// Run a write across shards and answer as one server would;
    /// `extended`: the batch at the front of the buffer is an
    /// extended-protocol one (up to its Sync), else a Query. Outside a
    /// transaction it is one of its own (but a schema change PostgreSQL
    /// runs only alone). `false`: the client went away.
    pub(super) async fn across_shards(&mut self, work: Across<'_>, extended: bool) -> bool {
        let Some(sh) = self.sharding.clone() else { return false };
        let mut batch = None;
        if extended {
            match self.take_batch().await {
                Some(Ok(b)) => batch = Some(b),
                Some(Err(e)) => return self.answer_error(&e).await,
                None => return false,
            }
        } else {
            self.consume_first();
        }
        let alone = matches!(work, Across::Parts(_, WriteKind::Schema(Change::Alone)));
        let implicit = self.multi().is_none() && !alone;
        if implicit {
            self.txn = Txn::AcrossShards(super::multi::Multi::new("BEGIN"));
        }
        let mut written = match work {
            Across::Parts(split, kind) => self.write_parts(&sh, split, kind, batch.as_ref()).await,
            Across::Rekey(rekey) => self.move_rows(&sh, rekey, batch.as_ref()).await,
        };
        if implicit {
            if let Err(e) = self.finish_multi(written.is_ok()).await {
                written = written.and(Err(e));
            }
        }
        let w = match written {
            Ok(w) => w,
            Err(e) => return self.answer_error(&e).await,
        };
        let mut executed = w.rows;
        let at = msg::start_message(&mut executed, b'C');
        executed.extend_from_slice(w.tag.as_bytes());
        executed.put_u8(0);
        msg::finish_message(&mut executed, at);
        let out = match batch {
            Some(mut b) => {
                b.keep_statement(&mut self.stmts);
                let desc = w.desc.unwrap_or_else(|| BytesMut::from(&b"n\0\0\0\x04"[..]));
                b.reply(&desc, &w.stmt_desc, &executed, self.txn_status())
            }
            None => {
                let mut out = w.desc.unwrap_or_default();
                out.extend_from_slice(&executed);
                msg::ready_for_query(&mut out, self.txn_status());
                out
            }
        };
        self.stream.write_all(&out).await.is_ok()
    }

    /// Run `split`'s parts on their shards' primaries; their answers
    /// added up.
    async fn write_parts(
        &mut self,
        sh: &ShardRouter,
        split: &Split,
        kind: WriteKind,
        batch: Option<&Batch>,
    ) -> Result<Written, PgError> {
        let requests = requests(split, batch, false)?;
        let answers = self.ask_shards(sh, &split.shards(), &requests).await;
        // Where a lone schema change ran, told if it fails somewhere.
        let alone = kind == WriteKind::Schema(Change::Alone);
        let done = if alone { done_on(sh, split, &answers) } else { Vec::new() };
        let written = add_up(answers, split, kind != WriteKind::Parts);
        if let WriteKind::Schema(_) = kind {
            sh.schema_changed();
        }
        match written {
            Err(e) if alone && !done.is_empty() => {
                Err(e.with_detail(format!("pgmux: it ran on shard(s) {} (not in a transaction)", done.join(", "))))
            }
            w => w,
        }
    }

    /// Send `requests[k]` to a primary connection of shard `shards[k]`
    /// (in the transaction spanning shards, its parts) and read the
    /// answers, in shard order.
    pub(super) async fn ask_shards(
        &mut self,
        sh: &ShardRouter,
        shards: &[usize],
        requests: &[BytesMut],
    ) -> Vec<Result<Answer, PgError>> {
        match self.shard_conns_ahead(sh, Some(shards), false).await {
            Ok(mut conns) => {
                let request = |i: usize| shards.iter().position(|&s| s == i).map_or(&[][..], |at| &requests[at][..]);
                self.ask_each(&mut conns, request).await
            }
            Err(e) => vec![Err(e)],
        }
    }
}

/// The shards whose part has an answer without an error.
fn done_on(sh: &crate::shard::ShardRouter, split: &Split, answers: &[Result<Answer, PgError>]) -> Vec<String> {
    let ok = answers.iter().zip(&split.parts).filter(|(a, _)| a.as_ref().is_ok_and(|a| a.error.is_none()));
    ok.filter_map(|(_, p)| Some(sh.backends.get(p.shard)?.name.clone())).collect()
}

/// Each part's request: a Query, or the batch for that shard (its Parse,
/// Bind with the part's parameters, Describe, Execute, Sync; the first
/// part also describes the client's whole statement when asked);
/// `text_results`: rows in text whatever the client asked.
pub(super) fn requests(split: &Split, batch: Option<&Batch>, text_results: bool) -> Result<Vec<BytesMut>, PgError> {
    let Some(batch) = batch else {
        let query = |p: &Part| {
            let mut q = BytesMut::new();
            msg::query(&mut q, &p.sql);
            q
        };
        return Ok(split.parts.iter().map(query).collect());
    };
    let mut out = Vec::with_capacity(split.parts.len());
    for (n, part) in split.parts.iter().enumerate() {
        let mut r = BytesMut::new();
        if n == 0 && batch.describes_statement {
            parse(&mut r, &split.sql, &batch.types);
            r.extend_from_slice(b"D\0\0\0\x06S\0");
        }
        match &part.params {
            None if text_results => {
                parse(&mut r, &part.sql, &batch.types);
                let bind = msg::parse_bind(&batch.bind).ok_or_else(malformed)?;
                let at = msg::start_message(&mut r, b'B');
                r.put_u16(0);
                r.extend_from_slice(bind.params_section);
                r.put_u16(0);
                msg::finish_message(&mut r, at);
            }
            None => {
                parse(&mut r, &part.sql, &batch.types);
                let bind = bind_for_shards(&batch.bind, 0).ok_or_else(malformed)?;
                r.extend_from_slice(&bind);
            }
            Some(map) => {
                parse(&mut r, &part.sql, &part_types(&batch.types, map));
                part_bind(&mut r, &batch.bind, part)?;
            }
        }
        r.extend_from_slice(b"D\0\0\0\x06P\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
        out.push(r);
    }
    Ok(out)
}

fn malformed() -> PgError {
    PgError::error(sqlstate::PROTOCOL_VIOLATION, "pgmux: malformed Bind")
}

/// An unnamed Parse of `sql` with parameter types `types` (count
/// included).
fn parse(out: &mut BytesMut, sql: &str, types: &[u8]) {
    let at = msg::start_message(out, b'P');
    out.put_u8(0);
    out.extend_from_slice(sql.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(types);
    msg::finish_message(out, at);
}

/// The parameter types (count included) of a part whose `$k` is the
/// client's parameter `map[k - 1]`: the client's type, or unspecified.
fn part_types(types: &[u8], map: &[usize]) -> Vec<u8> {
    let oid = |i: usize| types.get(2 + 4 * i..6 + 4 * i).unwrap_or(&[0, 0, 0, 0]);
    let given = types.get(..2).map_or(0, |n| usize::from(u16::from_be_bytes([n[0], n[1]])));
    let mut out = Vec::with_capacity(2 + 4 * map.len());
    out.extend_from_slice(&u16::try_from(map.len()).unwrap_or(u16::MAX).to_be_bytes());
    for &i in map {
        out.extend_from_slice(if i < given { oid(i) } else { &[0, 0, 0, 0] });
    }
    out
}

/// The client's Bind for one part: unnamed portal and statement, the
/// part's parameters (values and formats) in its order.
fn part_bind(out: &mut BytesMut, body: &[u8], part: &Part) -> Result<(), PgError> {
    let bind = msg::parse_bind(body).ok_or_else(malformed)?;
    let map = part.params.as_deref().unwrap_or_default();
    let n = i16::try_from(map.len()).map_err(|_| malformed())?;
    let at = msg::start_message(out, b'B');
    out.put_u16(0);
    out.put_i16(n);
    let mut values = BytesMut::new();
    for &i in map {
        let (value, binary) = bind.params.get(i).ok_or_else(|| {
            PgError::error(
                sqlstate::PROTOCOL_VIOLATION,
                format!("bind message supplies {} parameters, but the statement uses ${}", bind.params.len(), i + 1),
            )
        })?;
        out.put_i16(i16::from(*binary));
        match value {
            Some(v) => {
                values.put_i32(i32::try_from(v.len()).map_err(|_| malformed())?);
                values.extend_from_slice(v);
            }
            None => values.put_i32(-1),
        }
    }
    out.put_i16(n);
    out.extend_from_slice(&values);
    out.extend_from_slice(bind.result_formats);
    msg::finish_message(out, at);
    Ok(())
}
