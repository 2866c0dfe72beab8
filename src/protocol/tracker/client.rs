//! The client side of the tracker: each client message on its way to the
//! server, rewritten where the server knows the statement under another
//! name (Parse answered by pgmux, Bind/Describe renamed with the Parse
//! injected when the server lacks it, stale statements closed first, a
//! told shape checked first after DDL, `pg_prepared_statements` read as
//! the client's own), with the replies it will bring queued in order.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::{message, put_message, rerun, Ctx, Expect, Invalidations, Statement, Tracker, Undo, Used};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::Flow;
use crate::protocol::messages::TxStatus;
use crate::protocol::messages::{finish_message, start_message};
use crate::protocol::statements::{identity, put_cstr, put_server_name, split_cstr, tiny};

impl Tracker {
    /// A client message on its way to the server (body present for every
    /// tag but CopyData). Returns what to send instead, if anything.
    pub(in crate::protocol) fn on_client(&mut self, tag: u8, body: &[u8], cx: &mut Ctx) -> Flow {
        if self.flight.copy_in {
            self.rerun.stop();
            return Flow::Forward;
        }
        if let Some(flow) = self.verify_first(tag, body, cx) {
            return flow;
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
                        put_message(&mut out, tag, body);
                    }
                    Flow::Replace(b) => out.extend_from_slice(&b),
                    Flow::StopAfter(b) => {
                        out.extend_from_slice(&b);
                        return Flow::StopAfter(out);
                    }
                    Flow::Drop => {}
                }
                Flow::Replace(out)
            }
        }
    }

    /// A Bind or Describe of a statement whose shape the client was told
    /// before the schema last changed through pgmux: first a Describe of
    /// pgmux's own (prepared fresh if this server lacks it) says whether
    /// the server would still give that shape. The message waits for the
    /// answer (`Flow::StopAfter`) and comes again; if the shape changed it
    /// fails then, as on the client's own connection.
    fn verify_first(&mut self, tag: u8, body: &[u8], cx: &mut Ctx) -> Option<Flow> {
        if !matches!(tag, b'B' | b'D') || self.server_skipping || self.verifying {
            return None;
        }
        // Nothing to check until DDL went through pgmux: the usual Bind
        // costs one atomic load here.
        let upto = cx.log?.all_seq();
        if upto == 0 {
            return None;
        }
        let name = match tag {
            b'B' => split_cstr(body).and_then(|(_, rest)| split_cstr(rest)).map(|(name, _)| name),
            _ => body.strip_prefix(b"S").and_then(split_cstr).map(|(name, _)| name),
        };
        let stmt = cx.stmts.map.get(name.filter(|n| !n.is_empty())?)?;
        if !stmt.unverified(upto) {
            return None;
        }
        let stmt = stmt.clone();
        let mut out = self.close_doomed(cx).unwrap_or_default();
        let ident = identity(stmt.hash, cx.server.context);
        if !cx.server.touch(ident) {
            self.prepare_on_server(&stmt, ident, cx, &mut out, None, true);
        }
        let at = start_message(&mut out, b'D');
        out.put_u8(b'S');
        put_server_name(&mut out, ident);
        finish_message(&mut out, at);
        put_message(&mut out, b'H', &[]);
        self.expect.push_back(Expect::Verify { stmt, upto });
        self.verifying = true;
        cx.events.checks += 1;
        Some(Flow::StopAfter(out))
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
            let sql = crate::protocol::prepared::view::for_client(sql, cx.marks, cx.stmts, cx.server.context, name)?;
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
        if self.flight.status != TxStatus::Idle {
            self.in_block.push(ident);
        }
        stmt.put_parse(out, ident);
        let undo = Undo { hash: Some(ident), client_name: client.map(str::to_string), restore: None };
        self.expect.push_back(Expect::Parse { undo: Some(undo), hidden });
    }

    /// The client's statement `stmt`, prepared on this server (a Parse is
    /// written to `out` when it is not yet), and its identity there.
    fn resolve(&mut self, stmt: &Statement, cx: &mut Ctx, out: &mut BytesMut) -> u64 {
        let ident = identity(stmt.hash, cx.server.context);
        if cx.server.touch(ident) {
            cx.events.hits += 1;
        } else {
            self.prepare_on_server(stmt, ident, cx, out, None, true);
        }
        ident
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
        let Some(stmt) = cx.stmts.map.get(name).cloned() else { return Ok((Flow::Forward, None)) };
        let reshaped = cx.log.is_some_and(|log| stmt.reshaped(identity(stmt.hash, cx.server.context), log));
        if reshaped {
            stmt.mark_stale_shape();
        }
        if stmt.stale_shape() {
            return Err(PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, rerun::RESULT_TYPE_CHANGED));
        }
        let mut out = BytesMut::with_capacity(body.len() + 24);
        let ident = self.resolve(&stmt, cx, &mut out);
        let at = start_message(&mut out, tag);
        write(&mut out, ident);
        finish_message(&mut out, at);
        let rerun = self.rerun.start(tag, body);
        Ok((Flow::Replace(out), Some(Used { client: stmt, ident, rerun })))
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
        match crate::sql::scan::leading_command(sql) {
            crate::sql::scan::Command::Deallocate(name) if cx.stmts.map.contains_key(&name) => {
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
                match crate::protocol::prepared::view::for_client(sql, cx.marks, cx.stmts, cx.server.context, "") {
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
}
