//! Protocol-level prepared statements in transaction mode.
//!
//! A client's next transaction may run on another server connection, where
//! its named statements do not exist. pgmux therefore keeps each client's
//! statements (name → query text + parameter types) and prepares them on
//! servers under a name derived from a hash of (query, types, naming
//! context: `search_path` and `role`): the same statement from many clients
//! with the same name resolution is prepared once per server connection. A
//! Parse the server already has is answered by pgmux; a Bind or Describe of
//! a statement the server lacks gets the Parse injected in front of it, in
//! the same write. Each server connection keeps an LRU of what it has
//! prepared (`max_prepared_statements`); the Close of an evicted or stale
//! statement travels with the next write.
//!
//! A server statement goes stale when the schema changes under it (the
//! server then answers `cached plan must not change result type`, `cache
//! lookup failed for type ...`): [`rerun`] drops it everywhere and, when no
//! byte of the failed batch's answer reached the client, runs the batch
//! again on a fresh statement. DDL relayed (a `CREATE`/`ALTER`/`DROP`
//! command completed) invalidates every statement of the database.
//!
//! Answers pgmux gives itself must reach the client in protocol order, and
//! answers to injected messages must not reach it at all, so a [`Tracker`]
//! keeps the queue of replies expected from the server for every message
//! forwarded, with pgmux's own answers in their places. An error in the
//! extended protocol makes the server skip to Sync; the tracker drops what
//! the server will not answer and undoes bookkeeping for statements that
//! were not created after all.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::Flow;
use crate::protocol::messages::{finish_message, start_message};
pub use crate::statements::{
    answer_parse_batch, identity, naming_context, private_context, server_name, statement_hash, ClientStatements,
    Invalidations, ServerStatements, Statement,
};
use crate::statements::{put_cstr, put_server_name, split_cstr, tiny};

mod rerun;
pub use rerun::Again;

/// Bookkeeping to undo when the server skips a Parse after an error.
#[derive(Debug)]
struct Undo {
    hash: Option<u64>,
    client_name: Option<String>,
    /// A client statement pgmux dropped (Close, DEALLOCATE) to put back.
    restore: Option<(String, Arc<Statement>)>,
}

#[derive(Debug)]
enum Expect {
    /// pgmux answers at this point in the stream.
    Synthetic(BytesMut, Option<Undo>),
    /// ReadyForQuery with the current transaction status, from pgmux.
    SyntheticReady,
    Parse {
        undo: Option<Undo>,
        hidden: bool,
    },
    /// A Bind; of a client's named statement: `Some`.
    Bind(Option<Used>),
    /// A Describe; of a client's named statement: `Some`.
    Describe(Option<Used>),
    Execute,
    Close {
        hidden: bool,
        /// The statement an eviction Close removes from the server set.
        victim: Option<u64>,
        /// A stale statement closed: to close again if the server skips it.
        doomed: Option<u64>,
    },
    /// The client ended a COPY IN before the server started it (pipelined).
    CopyEnd,
    /// A reply (by tag) to a message pgmux injected: not for the client.
    Hidden(u8),
    /// The error pgmux had the server raise: the client gets this message
    /// (PostgreSQL's own fields) in its place.
    Raise(BytesMut),
    Sync,
    Query,
    FunctionCall,
}

/// A client's named statement in use on the server.
#[derive(Debug)]
struct Used {
    client: Arc<Statement>,
    /// Its server-side identity there.
    ident: u64,
    /// This message starts the batch kept for a re-run (its number).
    rerun: Option<u64>,
}

/// Something the session must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    None,
    /// The server ran DISCARD ALL for this client.
    DiscardAll,
    /// A server prepared this statement: its SQL is valid.
    Prepared(u64),
    /// The server will skip this many Query/FunctionCall messages (sent
    /// after an extended-protocol error, before Sync): no ReadyForQuery
    /// comes for them.
    Skipped(usize),
}

/// The reply queue of one attached server connection.
#[derive(Debug)]
pub struct Tracker {
    expect: VecDeque<Expect>,
    /// After an extended-protocol error the server ignores all until Sync.
    server_skipping: bool,
    /// The server is in COPY IN, where it ignores Sync and Flush.
    copy_in: bool,
    status: u8,
    /// The batch kept for a re-run, and a re-run under way.
    rerun: rerun::Rerun,
    /// A DDL command completed: the schema changed once its transaction ends.
    ddl: bool,
    /// The ParameterDescription of a client statement's Describe, held
    /// until its RowDescription/NoData: the server may refuse the rest
    /// (stale), and the Describe then runs again whole.
    param_desc: Option<BytesMut>,
    /// Statements prepared here inside the open transaction block: a
    /// rollback may take with it what they were planned with (a type
    /// created in it), so it drops them.
    in_block: Vec<u64>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            expect: VecDeque::new(),
            server_skipping: false,
            copy_in: false,
            status: b'I',
            rerun: Default::default(),
            ddl: false,
            param_desc: None,
            in_block: Vec::new(),
        }
    }
}

/// The state the tracker works on.
pub struct Ctx<'a> {
    pub stmts: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub server_cap: usize,
    pub events: CacheEvents,
    /// The statement invalidations of the server's database.
    pub log: Option<&'a Invalidations>,
}

/// What the server statement cache did (for metrics).
#[derive(Debug, Default)]
pub struct CacheEvents {
    /// A statement the server had already.
    pub hits: u64,
    /// A statement prepared on the server.
    pub misses: u64,
    /// A statement closed on the server to make room.
    pub evictions: u64,
    /// Server statements found stale (with the preparation number of the
    /// stale copy when their result type changed): to drop from every
    /// connection.
    pub stale: Vec<(u64, Option<u64>)>,
    /// Batches run again after a stale statement.
    pub reruns: u64,
    /// A transaction that ran DDL ended: every statement may be stale.
    pub schema_changed: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(stmts: &'a mut ClientStatements, server: &'a mut ServerStatements, server_cap: usize) -> Self {
        Ctx { stmts, server, server_cap, events: CacheEvents::default(), log: None }
    }
}

impl Tracker {
    /// Nothing outstanding: the connection may go back to the pool.
    pub fn idle(&self) -> bool {
        self.expect.is_empty() && !self.server_skipping && self.rerun.idle()
    }

    /// A Parse is in flight whose outcome the bookkeeping depends on.
    pub fn parse_in_flight(&self) -> bool {
        self.expect.iter().any(|e| matches!(e, Expect::Parse { undo: Some(_), .. }))
    }

    pub fn reset(&mut self, status: u8) {
        self.expect.clear();
        self.server_skipping = false;
        self.copy_in = false;
        self.status = status;
        self.rerun.reset();
        self.ddl = false;
        self.param_desc = None;
        self.in_block.clear();
    }

    /// A batch whose statement was stale, to send again (then the client's
    /// later messages), or the answer to give the client when it cannot
    /// be (see [`Again`]).
    pub fn take_rerun(&mut self) -> Option<Again> {
        self.rerun.take()
    }

    /// A Sync pgmux must send the server now, ending a failed batch the
    /// client has not synced (its ReadyForQuery is not the client's).
    pub fn take_sync(&mut self) -> bool {
        self.rerun.take_sync()
    }

    /// The server's answer to a batch is held back until a re-run: send
    /// the client's next messages after it.
    pub fn holding(&self) -> bool {
        self.rerun.holding()
    }

    /// Answers of pgmux's own that are due now (all earlier replies have
    /// been relayed). Send them to the client.
    pub fn due(&mut self) -> Option<BytesMut> {
        let mut out: Option<BytesMut> = None;
        loop {
            match self.expect.front() {
                Some(Expect::Synthetic(..)) => {
                    if let Some(Expect::Synthetic(b, _)) = self.expect.pop_front() {
                        out.get_or_insert_with(BytesMut::new).extend_from_slice(&b);
                    }
                }
                Some(Expect::SyntheticReady) => {
                    self.expect.pop_front();
                    crate::protocol::messages::ready_for_query(out.get_or_insert_with(BytesMut::new), self.status);
                }
                _ => return out,
            }
        }
    }

    /// Report an error pgmux detects in the extended protocol. The server
    /// raises it (an unnamed `DO` that raises it, run in place of the
    /// message), so the transaction is aborted and the rest of the batch
    /// skipped exactly as PostgreSQL would.
    fn emulate_error(&mut self, err: PgError) -> Flow {
        let mut out = BytesMut::new();
        let at = start_message(&mut out, b'P');
        out.put_u8(0);
        put_cstr(&mut out, &raise_sql(&err));
        out.put_i16(0);
        finish_message(&mut out, at);
        let at = start_message(&mut out, b'B');
        out.put_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        finish_message(&mut out, at);
        let at = start_message(&mut out, b'E');
        out.put_u8(0);
        out.put_i32(0);
        finish_message(&mut out, at);
        self.expect.push_back(Expect::Parse { undo: None, hidden: true });
        self.expect.push_back(Expect::Hidden(b'2'));
        self.expect.push_back(Expect::Execute);
        Flow::Replace(out)
    }

    /// Refuse the client message `tag` (a Query, or a Bind/Parse/Describe/
    /// Execute) with `err`: the server raises it in the message's place,
    /// so the transaction fails as it would on PostgreSQL.
    pub fn refuse(&mut self, tag: u8, body: &[u8], cx: &mut Ctx, err: PgError) -> Flow {
        if self.copy_in || self.server_skipping || !matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'E') {
            return self.on_client(tag, body, cx);
        }
        if tag != b'Q' {
            return self.emulate_error(err);
        }
        let mut out = BytesMut::new();
        crate::protocol::messages::query(&mut out, &raise_sql(&err));
        self.expect.push_back(Expect::Query);
        Flow::Replace(out)
    }

    /// A client message on its way to the server (body present for every
    /// tag but CopyData). Returns what to send instead, if anything.
    pub fn on_client(&mut self, tag: u8, body: &[u8], cx: &mut Ctx) -> Flow {
        if self.copy_in {
            self.rerun.stop();
            if matches!(tag, b'c' | b'f') {
                self.copy_in = false;
            }
            return Flow::Forward;
        }
        self.rerun.message(tag, body);
        let closes = match tag {
            b'P' | b'B' | b'D' | b'C' | b'E' | b'H' | b'S' if !self.server_skipping => self.close_doomed(cx),
            _ => None,
        };
        let flow = self.handle_client(tag, body, cx);
        match closes {
            None => flow,
            Some(mut out) => {
                match flow {
                    Flow::Forward | Flow::Insert(_) | Flow::Stop => {
                        if let Flow::Insert(b) = &flow {
                            out.extend_from_slice(b);
                        }
                        out.put_u8(tag);
                        out.put_i32(body.len() as i32 + 4);
                        out.put_slice(body);
                    }
                    Flow::Replace(b) => out.extend_from_slice(&b),
                    Flow::Drop => {}
                }
                Flow::Replace(out)
            }
        }
    }

    /// Close statements found stale on this server (hidden), ahead of the
    /// next extended-protocol message.
    fn close_doomed(&mut self, cx: &mut Ctx) -> Option<BytesMut> {
        if cx.server.doomed.is_empty() {
            return None;
        }
        let mut out = BytesMut::new();
        for ident in std::mem::take(&mut cx.server.doomed) {
            let at = start_message(&mut out, b'C');
            out.put_u8(b'S');
            put_server_name(&mut out, ident);
            finish_message(&mut out, at);
            self.expect.push_back(Expect::Close { hidden: true, victim: None, doomed: Some(ident) });
        }
        Some(out)
    }

    fn handle_client(&mut self, tag: u8, body: &[u8], cx: &mut Ctx) -> Flow {
        if tag == b'S' {
            self.server_skipping = false;
            self.expect.push_back(Expect::Sync);
            return Flow::Forward;
        }
        if self.server_skipping {
            return Flow::Forward;
        }
        if matches!(tag, b'c' | b'f') {
            // A pipelined CopyDone before the COPY started; a stray one
            // (nothing that could start a COPY is pending) is ignored by
            // the server and expects nothing.
            if self.expect.iter().any(|e| matches!(e, Expect::Execute | Expect::Query)) {
                self.expect.push_back(Expect::CopyEnd);
            }
            return Flow::Forward;
        }
        match tag {
            b'P' => self.parse(body, cx),
            b'B' => self.bind(body, cx),
            b'D' => self.describe(body, cx),
            b'C' => self.close(body, cx),
            b'E' => {
                self.expect.push_back(Expect::Execute);
                Flow::Forward
            }
            b'Q' => self.query(body, cx),
            b'F' => {
                self.expect.push_back(Expect::FunctionCall);
                Flow::Forward
            }
            _ => Flow::Forward,
        }
    }

    fn parse(&mut self, body: &[u8], cx: &mut Ctx) -> Flow {
        let Some((name, rest)) = split_cstr(body) else { return Flow::Forward };
        // A text reading pg_prepared_statements reads the client's own.
        let own_view = split_cstr(rest).and_then(|(sql, types)| {
            let sql = crate::prepared_view::for_client(sql, cx.stmts, cx.server.context)?;
            let mut rest = BytesMut::with_capacity(sql.len() + 1 + types.len());
            put_cstr(&mut rest, &sql);
            rest.put_slice(types);
            Some(rest)
        });
        let rest = own_view.as_deref().unwrap_or(rest);
        if name.is_empty() {
            self.expect.push_back(Expect::Parse { undo: None, hidden: false });
            return match own_view {
                Some(_) => Flow::Replace(message(b'P', &[&[0u8][..], rest].concat())),
                None => Flow::Forward,
            };
        }
        if cx.stmts.map.contains_key(name) {
            return self.emulate_error(PgError::error(
                sqlstate::DUPLICATE_PSTATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            ));
        }
        if cx.stmts.map.len() >= cx.stmts.cap {
            return self.emulate_error(
                PgError::error(
                    sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                    format!(
                        "pgmux: too many prepared statements for this client (max_client_prepared_statements = {})",
                        cx.stmts.cap
                    ),
                )
                .with_hint("Close statements you no longer need."),
            );
        }
        let stmt = Arc::new(Statement::new(rest));
        cx.stmts.map.insert(name.to_string(), stmt.clone());
        let ident = identity(stmt.hash, cx.server.context);
        if cx.server.touch(ident) {
            cx.events.hits += 1;
            let undo = Undo { hash: None, client_name: Some(name.to_string()), restore: None };
            self.expect.push_back(Expect::Synthetic(tiny(b'1'), Some(undo)));
            return Flow::Drop;
        }
        let mut out = BytesMut::new();
        self.prepare_on_server(&stmt, ident, cx, &mut out, Some(name), false);
        Flow::Replace(out)
    }

    fn prepare_on_server(
        &mut self,
        stmt: &Statement,
        ident: u64,
        cx: &mut Ctx,
        out: &mut BytesMut,
        client: Option<&str>,
        hidden: bool,
    ) {
        cx.events.misses += 1;
        let seq = cx.log.map_or(0, Invalidations::next_seq);
        if let Some(victim) = cx.server.insert(ident, seq, cx.server_cap) {
            cx.events.evictions += 1;
            let at = start_message(out, b'C');
            out.put_u8(b'S');
            put_server_name(out, victim);
            finish_message(out, at);
            self.expect.push_back(Expect::Close { hidden: true, victim: Some(victim), doomed: None });
        }
        if self.status != b'I' {
            self.in_block.push(ident);
        }
        stmt.put_parse(out, ident);
        let undo = Undo { hash: Some(ident), client_name: client.map(str::to_string), restore: None };
        self.expect.push_back(Expect::Parse { undo: Some(undo), hidden });
    }

    /// The statement named `name`, prepared on this server (a Parse is
    /// written to `out` when it is not yet), and its identity there.
    fn resolve(&mut self, name: &str, cx: &mut Ctx, out: &mut BytesMut) -> Option<(Arc<Statement>, u64)> {
        let stmt = cx.stmts.map.get(name)?.clone();
        let ident = identity(stmt.hash, cx.server.context);
        if cx.server.touch(ident) {
            cx.events.hits += 1;
        } else {
            self.prepare_on_server(&stmt, ident, cx, out, None, true);
        }
        Some((stmt, ident))
    }

    /// A Bind or Describe of a client's named statement (`name`), with the
    /// message written by `write` under the server's name.
    fn use_statement(
        &mut self,
        tag: u8,
        body: &[u8],
        name: &str,
        cx: &mut Ctx,
        write: impl FnOnce(&mut BytesMut, u64),
    ) -> Result<(Flow, Option<Used>), PgError> {
        let Some(stmt) = cx.stmts.map.get(name) else { return Ok((Flow::Forward, None)) };
        let reshaped = cx.log.is_some_and(|log| stmt.reshaped(identity(stmt.hash, cx.server.context), log));
        if reshaped {
            stmt.mark_stale_shape();
        }
        if stmt.stale_shape() {
            return Err(PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, rerun::RESULT_TYPE_CHANGED));
        }
        let mut out = BytesMut::with_capacity(body.len() + 24);
        let Some((client, ident)) = self.resolve(name, cx, &mut out) else { return Ok((Flow::Forward, None)) };
        let at = start_message(&mut out, tag);
        write(&mut out, ident);
        finish_message(&mut out, at);
        let rerun = self.rerun.start(tag, body);
        Ok((Flow::Replace(out), Some(Used { client, ident, rerun })))
    }

    fn bind(&mut self, body: &[u8], cx: &mut Ctx) -> Flow {
        let Some((portal, after)) = split_cstr(body) else { return self.expect_bind(None, Flow::Forward) };
        let Some((name, rest)) = split_cstr(after).filter(|(n, _)| !n.is_empty()) else {
            return self.expect_bind(None, Flow::Forward);
        };
        let write = |out: &mut BytesMut, ident| {
            put_cstr(out, portal);
            put_server_name(out, ident);
            out.put_slice(rest);
        };
        match self.use_statement(b'B', body, name, cx, write) {
            Ok((flow, used)) => self.expect_bind(used, flow),
            Err(e) => self.raise_stale_shape(e),
        }
    }

    fn expect_bind(&mut self, used: Option<Used>, flow: Flow) -> Flow {
        self.expect.push_back(Expect::Bind(used));
        flow
    }

    fn describe(&mut self, body: &[u8], cx: &mut Ctx) -> Flow {
        let name = match body.split_first() {
            Some((b'S', rest)) => split_cstr(rest).map(|(n, _)| n).filter(|n| !n.is_empty()),
            _ => None,
        };
        let Some(name) = name else {
            self.expect.push_back(Expect::Describe(None));
            return Flow::Forward;
        };
        let write = |out: &mut BytesMut, ident| {
            out.put_u8(b'S');
            put_server_name(out, ident);
        };
        match self.use_statement(b'D', body, name, cx, write) {
            Ok((flow, used)) => {
                self.expect.push_back(Expect::Describe(used));
                flow
            }
            Err(e) => self.raise_stale_shape(e),
        }
    }

    fn close(&mut self, body: &[u8], cx: &mut Ctx) -> Flow {
        if let Some((b'S', rest)) = body.split_first() {
            if let Some((name, _)) = split_cstr(rest) {
                if !name.is_empty() {
                    // The server copy stays for other clients; the LRU
                    // closes it when it is no longer wanted.
                    let restore = cx.stmts.map.remove(name).map(|st| (name.to_string(), st));
                    let undo = Undo { hash: None, client_name: None, restore };
                    self.expect.push_back(Expect::Synthetic(tiny(b'3'), Some(undo)));
                    return Flow::Drop;
                }
            }
        }
        self.expect.push_back(Expect::Close { hidden: false, victim: None, doomed: None });
        Flow::Forward
    }

    fn query(&mut self, body: &[u8], cx: &mut Ctx) -> Flow {
        let sql = split_cstr(body).map(|(s, _)| s).unwrap_or("");
        match crate::sqlhead::leading_command(sql) {
            crate::sqlhead::Command::Deallocate(name) if cx.stmts.map.contains_key(&name) => {
                let restore = cx.stmts.map.remove(&name).map(|st| (name, st));
                let mut b = BytesMut::new();
                let at = start_message(&mut b, b'C');
                put_cstr(&mut b, "DEALLOCATE");
                finish_message(&mut b, at);
                self.expect.push_back(Expect::Synthetic(b, Some(Undo { hash: None, client_name: None, restore })));
                self.expect.push_back(Expect::SyntheticReady);
                Flow::Drop
            }
            _ => {
                self.expect.push_back(Expect::Query);
                match crate::prepared_view::for_client(sql, cx.stmts, cx.server.context) {
                    Some(own_view) => {
                        let mut out = BytesMut::new();
                        crate::protocol::messages::query(&mut out, &own_view);
                        Flow::Replace(out)
                    }
                    None => Flow::Forward,
                }
            }
        }
    }

    /// A server message on its way to the client (`whole`: its body is
    /// present). Returns what to send instead and any event.
    pub fn on_server(&mut self, tag: u8, body: &[u8], whole: bool, cx: &mut Ctx) -> (Flow, Event) {
        if self.rerun.holding() {
            return (self.hold_back(tag, body), Event::None);
        }
        let mut event = Event::None;
        let mut hide = false;
        let mut before = None;
        let head = self.expect.front();
        match tag {
            b't' if whole && matches!(head, Some(Expect::Describe(Some(_)))) => {
                self.param_desc = Some(message(tag, body));
                hide = true;
            }
            b'1' if matches!(head, Some(Expect::Parse { .. })) => {
                if let Some(Expect::Parse { hidden, undo }) = self.expect.pop_front() {
                    hide = hidden;
                    if let Some(h) = undo.and_then(|u| u.hash) {
                        event = Event::Prepared(h);
                    }
                }
            }
            b'2' if matches!(head, Some(Expect::Bind(_))) => {
                self.expect.pop_front();
            }
            b'2' if matches!(head, Some(Expect::Hidden(b'2'))) => {
                self.expect.pop_front();
                hide = true;
            }
            b'3' if matches!(head, Some(Expect::Close { .. })) => {
                if let Some(Expect::Close { hidden, .. }) = self.expect.pop_front() {
                    hide = hidden;
                }
            }
            b'T' | b'n' if matches!(head, Some(Expect::Describe(_))) => {
                if let Some(Expect::Describe(Some(used))) = self.expect.pop_front() {
                    used.client.mark_described(cx.server.seq(used.ident).unwrap_or(0));
                }
                before = self.param_desc.take();
            }
            b'C' | b'I' | b's' if matches!(head, Some(Expect::Execute)) => {
                self.ddl |= tag == b'C' && rerun::is_ddl(body);
                self.rolled_back(tag == b'C' && body == b"ROLLBACK\0", cx);
                self.expect.pop_front();
            }
            b'C' if matches!(head, Some(Expect::Query)) => {
                self.ddl |= rerun::is_ddl(body);
                self.rolled_back(body == b"ROLLBACK\0", cx);
                if body == b"DISCARD ALL\0" {
                    cx.stmts.clear();
                    cx.server.clear();
                    event = Event::DiscardAll;
                } else if body == b"DEALLOCATE ALL\0" {
                    cx.stmts.clear();
                    cx.server.clear();
                }
            }
            b'G' => {
                // Syncs queued behind the COPY's Execute (and before a
                // pipelined CopyDone) are ignored by the server; the one
                // after CopyDone is what it answers.
                if let Some(head) = self.expect.pop_front() {
                    let end = self.expect.iter().position(|e| matches!(e, Expect::CopyEnd));
                    let mut i = 0;
                    self.expect.retain(|e| {
                        i += 1;
                        let before_end = end.is_none_or(|end| i <= end + 1);
                        !(before_end && matches!(e, Expect::Sync | Expect::CopyEnd))
                    });
                    self.copy_in = end.is_none();
                    self.expect.push_front(head);
                }
            }
            b'E' if matches!(head, Some(Expect::Raise(_))) => {
                if let Some(Expect::Raise(own)) = self.expect.front_mut() {
                    before = Some(std::mem::take(own));
                }
                hide = true;
                self.on_error(cx);
            }
            b'E' => {
                self.copy_in = false;
                if self.stale(body, whole, cx) {
                    self.param_desc = None;
                    return (Flow::Drop, Event::None);
                }
                before = self.param_desc.take();
                let skipped = self.on_error(cx);
                if skipped > 0 {
                    event = Event::Skipped(skipped);
                }
            }
            b'Z' => {
                self.expect.pop_front();
                self.status = body.first().copied().unwrap_or(b'I');
                if self.status == b'I' {
                    self.in_block.clear();
                }
                if self.ddl && self.status == b'I' {
                    self.ddl = false;
                    cx.events.schema_changed = true;
                }
            }
            _ => {}
        }
        // A CopyEnd whose COPY never started (it failed) is moot.
        while matches!(self.expect.front(), Some(Expect::CopyEnd)) {
            self.expect.pop_front();
        }
        if !whole {
            return (Flow::Forward, event);
        }
        let due = self.due();
        let flow = match (hide, before, due) {
            (true, None, None) => Flow::Drop,
            (true, None, Some(d)) => Flow::Replace(d),
            (false, None, None) => Flow::Forward,
            (hide, before, due) => {
                let mut b = before.unwrap_or_default();
                if !hide {
                    b.extend_from_slice(&message(tag, body));
                }
                b.extend_from_slice(&due.unwrap_or_default());
                Flow::Replace(b)
            }
        };
        (flow, event)
    }

    /// A ROLLBACK (or ROLLBACK TO SAVEPOINT) completed: the statements
    /// prepared in the block are closed here before their next use.
    fn rolled_back(&mut self, rollback: bool, cx: &mut Ctx) {
        if rollback {
            for ident in self.in_block.drain(..) {
                cx.server.doom(ident);
            }
        }
    }

    /// Returns how many Query/FunctionCall messages the server will skip.
    fn on_error(&mut self, cx: &mut Ctx) -> usize {
        let mut skipped = 0;
        match self.expect.front() {
            None | Some(Expect::Query | Expect::FunctionCall | Expect::Sync | Expect::CopyEnd) => {}
            Some(_) => {
                // Extended protocol: the server skips to the next Sync.
                while !matches!(self.expect.front(), None | Some(Expect::Sync)) {
                    match self.expect.pop_front() {
                        Some(Expect::Parse { undo: Some(u), .. }) | Some(Expect::Synthetic(_, Some(u))) => undo(u, cx),
                        // The server skipped the eviction Close: it still has it.
                        Some(Expect::Close { victim: Some(h), .. }) => {
                            cx.server.insert(h, 0, usize::MAX);
                        }
                        Some(Expect::Close { doomed: Some(h), .. }) => cx.server.doomed.push(h),
                        Some(Expect::Query | Expect::FunctionCall) => skipped += 1,
                        _ => {}
                    }
                }
                if self.expect.is_empty() {
                    self.server_skipping = true;
                }
            }
        }
        skipped
    }
}

/// A whole message of `tag` with `body`.
fn message(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b
}

/// SQL that makes the server raise `err` (SQLSTATE, message, hint).
fn raise_sql(err: &PgError) -> String {
    use crate::protocol::messages::quote_literal;
    let clean = |t: &str| t.replace("$pgmux_raise$", "");
    let mut sql = format!(
        "DO $pgmux_raise$BEGIN RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}",
        quote_literal(&clean(&err.code)),
        quote_literal(&clean(&err.message))
    );
    if let Some(h) = &err.hint {
        sql.push_str(&format!(", HINT = {}", quote_literal(&clean(h))));
    }
    sql.push_str("; END$pgmux_raise$");
    sql
}

fn undo(u: Undo, cx: &mut Ctx) {
    if let Some((name, stmt)) = u.restore {
        cx.stmts.map.insert(name, stmt);
    }
    if let Some(h) = u.hash {
        cx.server.remove(h);
    }
    if let Some(name) = u.client_name {
        cx.stmts.map.remove(&name);
    }
}

#[cfg(test)]
#[path = "prepared_tests.rs"]
mod tests;
