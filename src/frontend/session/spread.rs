//! An extended-protocol batch of several statements (Bind/Execute pairs
//! up to one Sync — a JDBC batch, asyncpg's `executemany`, a pgbench
//! pipeline) whose statements belong to different shards. Each statement
//! runs on its key's shard — each shard's statements sent at once, in
//! order, the shards in parallel — and the replies are given in the
//! batch's order as one server gives them: up to the first error, then
//! nothing until the Sync. The batch is one implicit transaction (or part
//! of the client's): where transactions may span shards it runs in one
//! across them, committed at the Sync unless something failed (see
//! [`super::multi`]). A batch of reads outside a transaction needs none:
//! each shard's part is its own (no snapshot spans shards either way),
//! also where transactions may not span shards.

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::guard::bind_params;
use super::scatter::{bind_for_shards, keep_named};
use super::{Session, Txn};
use crate::backend::server::{ServerConn, ServerError};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::{first_message, HEADER_LEN};
use crate::protocol::messages::{self as msg, split_nul as cstr, TxStatus};
use crate::protocol::statements::ClientStatements;
use crate::shard::{ShardRouter, ShardTarget};

/// The batch, taken apart: what each client message is answered with,
/// and what each shard runs.
pub(super) struct Spread {
    /// The batch's length in the buffer (up to and including its Sync).
    len: usize,
    /// Per client message, in order.
    replies: Vec<Reply>,
    /// The shard of each statement, in the batch's order.
    statements: Vec<usize>,
    /// Each shard's messages: per statement an unnamed Parse, its Bind,
    /// the Describe of the portal if asked, the Execute.
    requests: Vec<(usize, BytesMut)>,
    /// Every statement only reads.
    reads: bool,
}

/// How pgmux answers one client message of the batch.
enum Reply {
    /// A Parse; named: the statement kept once it is answered.
    Parse(Option<(String, Vec<u8>)>),
    /// Statement `k`'s Bind.
    Bind(usize),
    /// A Close; of this named statement, which is forgotten.
    Close(Option<String>),
    /// Statement `k`'s portal described.
    Describe(usize),
    /// Statement `k`'s rows and completion.
    Execute(usize),
}

/// One statement's answer from its shard.
#[derive(Default)]
struct Answer {
    /// ParseComplete and BindComplete seen (an error before both was the
    /// Parse's or the Bind's).
    stage: u8,
    desc: BytesMut,
    rows: BytesMut,
    error: Option<BytesMut>,
}

/// A message, whole.
fn whole(tag: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    let at = msg::start_message(&mut out, tag);
    out.extend_from_slice(body);
    msg::finish_message(&mut out, at);
    out
}

impl Session {
    /// The batch at the front of the buffer, taken apart, when it runs
    /// statements on more than one shard and each can be sent on its own
    /// (the batch whole in the buffer; Parse, Bind, Describe of the
    /// portal, Execute of all rows, Close, Sync).
    pub(super) fn spread(&mut self, sh: &ShardRouter) -> Option<Box<Spread>> {
        if executes(&self.rbuf) < 2 {
            return None;
        }
        let Session { rbuf, stmts, wanted, resolved, .. } = self;
        let session_shard = wanted.get("pgmux.shard").map(String::as_str);
        let mut s = Spread { len: 0, replies: Vec::new(), statements: Vec::new(), requests: Vec::new(), reads: true };
        // Statements the batch parses: (name, Parse body after the name).
        let mut parsed: Vec<(&[u8], &[u8])> = Vec::new();
        let (mut rest, mut shard): (&[u8], Option<usize>) = (rbuf, None);
        loop {
            let (tag, body) = first_message(rest)?;
            rest = &rest[HEADER_LEN + body.len()..];
            s.len += HEADER_LEN + body.len();
            let k = s.statements.len();
            let reply = match tag {
                b'P' => {
                    let (name, after) = cstr(body);
                    parsed.push((name, after));
                    let named = !name.is_empty();
                    Reply::Parse(named.then(|| (String::from_utf8_lossy(name).into_owned(), after.to_vec())))
                }
                b'B' if shard.is_none() => {
                    let parse = super::pipeline::bound(&parsed, stmts, cstr(cstr(body).1).0)?;
                    let sql = String::from_utf8_lossy(cstr(parse).0).into_owned();
                    let Ok(ShardTarget::One(i)) = sh.route(&sql, &bind_params(body), session_shard, resolved) else {
                        return None;
                    };
                    s.reads &= sh.reads(&sql);
                    let out = match s.requests.iter().position(|r| r.0 == i) {
                        Some(at) => &mut s.requests[at].1,
                        None => {
                            s.requests.push((i, BytesMut::new()));
                            &mut s.requests.last_mut()?.1
                        }
                    };
                    let at = msg::start_message(out, b'P');
                    out.put_u8(0);
                    out.extend_from_slice(parse);
                    msg::finish_message(out, at);
                    out.extend_from_slice(&bind_for_shards(body, 0)?);
                    shard = Some(i);
                    Reply::Bind(k)
                }
                b'D' if body.first() == Some(&b'P') => {
                    s.requests.iter_mut().find(|r| Some(r.0) == shard)?.1.extend_from_slice(b"D\0\0\0\x06P\0");
                    Reply::Describe(k)
                }
                b'E' if body.ends_with(&[0, 0, 0, 0]) => {
                    let i = shard.take()?;
                    s.requests.iter_mut().find(|r| r.0 == i)?.1.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
                    s.statements.push(i);
                    Reply::Execute(k)
                }
                b'C' if shard.is_none() => {
                    let (kind, name) = body.split_first()?;
                    let name = cstr(name).0;
                    let named = *kind == b'S' && !name.is_empty();
                    Reply::Close(named.then(|| String::from_utf8_lossy(name).into_owned()))
                }
                b'S' if shard.is_none() => break,
                _ => return None,
            };
            s.replies.push(reply);
        }
        // Writes span shards only in a transaction across them.
        let fits = self.cross() || (s.reads && self.between_transactions());
        (s.requests.len() > 1 && fits).then(|| Box::new(s))
    }

    /// Run a batch taken apart by [`Session::spread`] and answer it.
    /// `false`: the client went away.
    pub(super) async fn run_spread(&mut self, s: Box<Spread>) -> bool {
        let Some(sh) = self.sharding.clone() else { return false };
        bytes::Buf::advance(&mut self.rbuf, s.len);
        // Reads outside a transaction: each shard's part its own.
        let implicit = self.multi().is_none() && !(s.reads && self.between_transactions());
        if implicit {
            self.txn = Txn::AcrossShards(super::multi::Multi::new("BEGIN"));
        }
        let answers = self.ask_spread(&sh, &s).await;
        let mut out = BytesMut::new();
        let mut error = match &answers {
            Ok(answers) => put_replies(&mut out, &s, answers, &mut self.stmts),
            Err(e) => {
                e.encode(&mut out);
                Some(e.code.to_string())
            }
        };
        if error.is_some() {
            self.fail_multi();
        }
        if implicit {
            if let (Err(e), None) = (self.finish_multi(error.is_none()).await, &error) {
                e.encode(&mut out);
                error = Some(e.code.to_string());
            }
        }
        if let Some(code) = error {
            self.account.error(&code);
        }
        msg::ready_for_query(&mut out, self.txn_status());
        self.stream.write_all(&out).await.is_ok()
    }

    /// Send each shard its statements (and a Sync: inside the transaction
    /// it ends nothing), read their answers; in the batch's order.
    async fn ask_spread(&mut self, sh: &ShardRouter, s: &Spread) -> Result<Vec<Answer>, PgError> {
        let shards: Vec<usize> = s.requests.iter().map(|r| r.0).collect();
        let mut conns = self.shard_conns_ahead(sh, Some(&shards), s.reads).await?;
        let reads = conns.iter_mut().map(|(i, c)| {
            let mut request = s.requests.iter().find(|r| r.0 == *i).map(|r| r.1.clone()).unwrap_or_default();
            request.extend_from_slice(b"S\0\0\0\x04");
            let n = s.statements.iter().filter(|&&at| at == *i).count();
            async move {
                let conn = c.conn();
                conn.send(&request).await?;
                conn.settle().await?;
                read_answers(conn, n).await
            }
        });
        let read = futures_util::future::join_all(reads).await;
        let (mut queues, mut lost) = (Vec::new(), None);
        for (r, (i, c)) in read.into_iter().zip(conns) {
            match r {
                Ok((answers, status)) => {
                    self.give_back(i, c, status);
                    queues.push((i, answers.into_iter()));
                }
                Err(e) => {
                    lost.get_or_insert(e);
                }
            }
        }
        if let Some(e) = lost {
            self.fail_multi();
            return Err(PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: shard: {e}")));
        }
        // Statement k is the next one its shard answered.
        let mut next = |i: usize| queues.iter_mut().find(|q| q.0 == i).and_then(|q| q.1.next()).unwrap_or_default();
        Ok(s.statements.iter().map(|&i| next(i)).collect())
    }
}

/// The Executes of the batch at the front of `buf`, up to its Sync.
fn executes(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let Some((tag, body)) = first_message(buf) {
        match tag {
            b'E' => n += 1,
            b'S' | b'Q' | b'H' => break,
            _ => {}
        }
        buf = &buf[HEADER_LEN + body.len()..];
    }
    n
}

/// A shard's answers to its `n` statements (those after a failed one are
/// skipped by the server: none), up to ReadyForQuery, and the status.
async fn read_answers(conn: &mut ServerConn, n: usize) -> Result<(Vec<Answer>, TxStatus), ServerError> {
    let mut answers = Vec::with_capacity(n);
    let mut a = Answer::default();
    loop {
        let (tag, body) = conn.read_message().await?;
        match tag {
            b'1' | b'2' => a.stage += 1,
            b'T' | b'n' => a.desc = whole(tag, &body),
            b'D' | b'N' => a.rows.extend_from_slice(&whole(tag, &body)),
            b'C' | b'I' | b'E' => {
                if tag == b'E' {
                    a.error = Some(whole(tag, &body));
                } else {
                    a.rows.extend_from_slice(&whole(tag, &body));
                }
                answers.push(std::mem::take(&mut a));
            }
            b'Z' => return Ok((answers, TxStatus::of_ready(&body))),
            _ => {}
        }
    }
}

/// The client's replies, in its batch's order, up to the first error
/// (whose code is returned); the named statements answered are kept.
fn put_replies(out: &mut BytesMut, s: &Spread, answers: &[Answer], stmts: &mut ClientStatements) -> Option<String> {
    let failed = |out: &mut BytesMut, e: &BytesMut| {
        out.extend_from_slice(e);
        Some(crate::ops::metrics::error_code(&e[HEADER_LEN..]).unwrap_or("XX000").to_string())
    };
    for r in &s.replies {
        let a = |k: &usize| answers.get(*k);
        match r {
            Reply::Parse(named) => {
                if let Some((name, body)) = named {
                    keep_named(stmts, name.clone(), body);
                }
                out.extend_from_slice(b"1\0\0\0\x04");
            }
            Reply::Bind(k) => match a(k) {
                Some(Answer { error: Some(e), stage, .. }) if *stage < 2 => return failed(out, e),
                _ => out.extend_from_slice(b"2\0\0\0\x04"),
            },
            Reply::Close(named) => {
                if let Some(name) = named {
                    stmts.map.remove(name);
                }
                out.extend_from_slice(b"3\0\0\0\x04");
            }
            Reply::Describe(k) => match a(k) {
                Some(Answer { error: Some(e), desc, .. }) if desc.is_empty() => return failed(out, e),
                Some(answer) => out.extend_from_slice(&answer.desc),
                None => {}
            },
            Reply::Execute(k) => match a(k) {
                Some(Answer { error: Some(e), rows, .. }) => {
                    out.extend_from_slice(rows);
                    return failed(out, e);
                }
                Some(answer) => out.extend_from_slice(&answer.rows),
                None => {}
            },
        }
    }
    None
}
