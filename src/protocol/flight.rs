//! What is in flight between a client and its server connection, read
//! from message tags alone: Queries and Syncs not yet answered by
//! ReadyForQuery, extended-protocol messages not yet synced, COPY IN state
//! (during which the server ignores Sync), and the last transaction status.
//! It is the part of the protocol tracker ([`crate::protocol::tracker::Tracker`])
//! every session keeps, tracked statements or not: the session returns a
//! server connection to the pool only when all of it says idle.

use crate::protocol::messages::TxStatus;

/// What is in flight on the attached server connection, from tags alone.
#[derive(Debug)]
pub struct Flight {
    /// Query/Sync/FunctionCall sent and not yet answered by ReadyForQuery.
    pub pending: usize,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The server is in COPY IN: it ignores Sync and Flush.
    pub copy_in: bool,
    /// Syncs sent since the last Execute/Query; the server ignores them if
    /// that turns out to start a COPY IN.
    pub syncs_after_exec: usize,
    /// The last Execute/Query was an Execute (extended protocol).
    pub exec_extended: bool,
    /// CopyDone/CopyFail arrived before the server's CopyInResponse (a
    /// pipelined COPY), with the Syncs sent before it.
    pub early_copy_end: std::collections::VecDeque<usize>,
    /// Transaction status of the last ReadyForQuery.
    pub status: TxStatus,
}

impl Flight {
    pub fn new() -> Self {
        Flight {
            pending: 0,
            unsynced: false,
            copy_in: false,
            syncs_after_exec: 0,
            exec_extended: false,
            early_copy_end: std::collections::VecDeque::new(),
            status: TxStatus::Idle,
        }
    }

    pub fn client(&mut self, tag: u8, forwarded: bool) {
        match tag {
            b'Q' | b'F' if forwarded => {
                self.pending += 1;
                self.syncs_after_exec = 0;
                self.exec_extended = false;
            }
            b'E' => {
                self.unsynced = true;
                self.syncs_after_exec = 0;
                self.exec_extended = true;
            }
            b'S' if self.copy_in => {}
            b'S' => {
                self.pending += 1;
                self.unsynced = false;
                self.syncs_after_exec += 1;
            }
            b'P' | b'B' | b'D' | b'C' => self.unsynced = true,
            b'c' | b'f' if self.copy_in => self.copy_in = false,
            // A COPY may still start only if something is unanswered;
            // otherwise the server ignores a stray CopyDone/CopyFail.
            b'c' | b'f' if self.pending > 0 || self.unsynced => self.early_copy_end.push_back(self.syncs_after_exec),
            _ => {}
        }
    }

    pub fn server(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'Z' => {
                self.pending = self.pending.saturating_sub(1);
                self.status = TxStatus::of_ready(body);
                if self.pending == 0 {
                    // Every COPY that could start has started or failed.
                    self.early_copy_end.clear();
                }
            }
            b'G' => {
                // Syncs sent behind the COPY's Execute, before CopyDone,
                // are ignored by the server; the one after CopyDone counts.
                let ignored = match self.early_copy_end.pop_front() {
                    Some(before_end) => before_end,
                    None => {
                        self.copy_in = true;
                        self.unsynced |= self.exec_extended;
                        self.syncs_after_exec
                    }
                };
                self.pending = self.pending.saturating_sub(ignored);
                self.syncs_after_exec = 0;
            }
            b'E' => self.copy_in = false,
            _ => {}
        }
    }

    pub fn idle(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.status == TxStatus::Idle && !self.copy_in
    }
}

impl Default for Flight {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_when_everything_is_answered() {
        let mut f = Flight::new();
        for t in [b'P', b'B', b'E'] {
            f.client(t, true);
        }
        assert!(!f.idle(), "unsynced");
        f.client(b'S', true);
        assert!(!f.idle(), "Sync unanswered");
        f.server(b'Z', b"T");
        assert!(!f.idle(), "inside a transaction");
        f.client(b'Q', true);
        f.server(b'Z', b"I");
        assert!(f.idle());
        // A Query pgmux answered itself is not waited for.
        f.client(b'Q', false);
        assert!(f.idle());
    }

    #[test]
    fn copy_in_sync_accounting() {
        // Bind, Execute, Sync (ignored once COPY starts), data, CopyDone, Sync.
        let mut f = Flight::new();
        for t in [b'B', b'E', b'S'] {
            f.client(t, true);
        }
        f.server(b'G', b"");
        assert!(!f.idle());
        f.client(b'd', true);
        f.client(b'c', true);
        assert!(!f.idle(), "the Sync after CopyDone is still to come");
        f.client(b'S', true);
        f.server(b'Z', b"I");
        assert!(f.idle());
        // Pipelined: CopyDone before the server's CopyInResponse.
        let mut f = Flight::new();
        f.client(b'Q', true);
        f.client(b'd', true);
        f.client(b'c', true);
        f.server(b'G', b"");
        assert!(!f.copy_in);
        f.server(b'Z', b"I");
        assert!(f.idle());
    }
}
