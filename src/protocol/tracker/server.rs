//! The server side of the tracker: each server message on its way to the
//! client, matched against the replies expected (pgmux's own answers put
//! in their places, replies to injected messages hidden), with what an
//! error makes the server skip undone.

use super::{message, rerun, Ctx, Event, Expect, Tracker, Undo};
use crate::protocol::frame::Flow;
use crate::protocol::messages::TxStatus;
use crate::protocol::statements::result_shape;

impl Tracker {
    /// A server message on its way to the client (`whole`: its body is
    /// present), the flight already counted. Returns what to send instead
    /// and any event.
    pub(in crate::protocol) fn on_server(&mut self, tag: u8, body: &[u8], whole: bool, cx: &mut Ctx) -> (Flow, Event) {
        if self.rerun.holding() {
            return (self.hold_back(tag, body), Event::None);
        }
        let Some(Noted { hide, before, event }) = self.note_reply(tag, body, whole, cx) else {
            return (Flow::Drop, Event::None);
        };
        // A CopyEnd whose COPY never started (it failed) is moot.
        while matches!(self.expect.front(), Some(Expect::CopyEnd)) {
            self.expect.pop_front();
        }
        if !whole {
            return (Flow::Forward, event);
        }
        let due = self.due();
        (compose(tag, body, hide, before, due), event)
    }

    /// What a server reply means for the expected replies at the head of
    /// the queue: whether it is hidden from the client, what goes before
    /// it, the event; `None`: it is dropped (a stale statement's error,
    /// its batch run again).
    fn note_reply(&mut self, tag: u8, body: &[u8], whole: bool, cx: &mut Ctx) -> Option<Noted> {
        let mut event = Event::None;
        let mut hide = false;
        let mut before = None;
        let head = self.expect.front();
        match tag {
            b't' if matches!(head, Some(Expect::Verify { .. })) => hide = true,
            b'T' | b'n' if matches!(head, Some(Expect::Verify { .. })) => {
                if let Some(Expect::Verify { stmt, upto }) = self.expect.pop_front() {
                    stmt.verified(upto, result_shape(tag, body));
                }
                self.verified();
                hide = true;
            }
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
                    used.client.mark_described(cx.server.seq(used.ident).unwrap_or(0), result_shape(tag, body));
                }
                before = self.param_desc.take();
            }
            b'C' | b'I' | b's' if matches!(head, Some(Expect::Execute)) => {
                self.ddl |= tag == b'C' && rerun::is_ddl(body);
                self.rolled_back(tag == b'C' && body == b"ROLLBACK\0", cx);
                self.expect.pop_front();
            }
            b'C' if matches!(head, Some(Expect::Query)) => event = self.query_done(body, cx),
            b'G' => self.copy_started(),
            b'E' if matches!(head, Some(Expect::Raise(_))) => {
                if let Some(Expect::Raise(own)) = self.expect.front_mut() {
                    before = Some(std::mem::take(own));
                }
                hide = true;
                self.on_error(cx);
            }
            b'E' => {
                if self.stale(body, whole, cx) {
                    self.param_desc = None;
                    return None;
                }
                before = self.param_desc.take();
                let skipped = self.on_error(cx);
                if skipped > 0 {
                    event = Event::Skipped(skipped);
                }
            }
            b'Z' => self.ready(cx),
            _ => {}
        }
        Some(Noted { hide, before, event })
    }

    /// A statement's shape check is over: the client's messages go on.
    fn verified(&mut self) {
        self.verifying = false;
        self.resume = true;
    }

    /// A COPY started: Syncs queued behind the COPY's Execute (and before
    /// a pipelined CopyDone) are ignored by the server; the one after
    /// CopyDone is what it answers.
    fn copy_started(&mut self) {
        if let Some(head) = self.expect.pop_front() {
            let end = self.expect.iter().position(|e| matches!(e, Expect::CopyEnd));
            let mut i = 0;
            self.expect.retain(|e| {
                i += 1;
                let before_end = end.is_none_or(|end| i <= end + 1);
                !(before_end && matches!(e, Expect::Sync | Expect::CopyEnd))
            });
            // (Whether the server is now in COPY IN is the flight's.)
            self.expect.push_front(head);
        }
    }

    /// A simple Query's command completed (its tag in `body`).
    fn query_done(&mut self, body: &[u8], cx: &mut Ctx) -> Event {
        self.ddl |= rerun::is_ddl(body);
        self.rolled_back(body == b"ROLLBACK\0", cx);
        let discard = body == b"DISCARD ALL\0";
        if discard || body == b"DEALLOCATE ALL\0" {
            cx.stmts.clear();
            cx.server.clear();
        }
        if discard {
            Event::DiscardAll
        } else {
            Event::None
        }
    }

    /// ReadyForQuery (the flight has its transaction status): a
    /// transaction that ran DDL ended.
    fn ready(&mut self, cx: &mut Ctx) {
        self.expect.pop_front();
        if self.flight.status == TxStatus::Idle {
            self.in_block.clear();
            if std::mem::take(&mut self.ddl) {
                cx.events.schema_changed = true;
            }
        }
    }

    /// A ROLLBACK (or ROLLBACK TO SAVEPOINT) completed: the statements
    /// prepared in the block are closed here before their next use.
    pub(in crate::protocol) fn rolled_back(&mut self, rollback: bool, cx: &mut Ctx) {
        if rollback {
            for ident in self.in_block.drain(..) {
                cx.server.doom(ident);
            }
        }
    }

    /// Returns how many Query/FunctionCall messages the server will skip.
    pub(in crate::protocol) fn on_error(&mut self, cx: &mut Ctx) -> usize {
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
                        // The check did not run: the client's message goes
                        // to a server skipping to the Sync.
                        Some(Expect::Verify { .. }) => self.verified(),
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

/// What goes to the client for a server message: nothing (`hide`), or it,
/// with what was held before it and pgmux's answers due after it.
fn compose(tag: u8, body: &[u8], hide: bool, before: Option<bytes::BytesMut>, due: Option<bytes::BytesMut>) -> Flow {
    match (hide, before, due) {
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
    }
}

/// A server reply as the tracker relays it (see `note_reply`).
struct Noted {
    hide: bool,
    before: Option<bytes::BytesMut>,
    event: Event,
}
