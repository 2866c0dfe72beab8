//! A client that leaves while holding a server connection: the connection
//! is brought back to idle (what runs finishes, the transaction rolls back,
//! session state is reset) and pooled again, or closed.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{Session, CLEANUP_TIMEOUT};
use crate::backend::pool::Checkout;
use crate::backend::server::ServerError;
use crate::config::PoolMode;
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;

impl Session {
    /// The client left while holding a server connection (`pinned`: with
    /// session state on it): bring it back to idle (finish what is
    /// running, roll back, reset) or close it.
    pub(super) async fn abandon(&mut self, mut server: Checkout, pinned: bool) {
        if self.crelay.mid_message() || self.srelay.mid_message() || self.tracker.parse_in_flight() {
            return; // dropping the checkout closes the connection
        }
        let mode = self.mode;
        let reset = self.pool.settings.reset_query.clone();
        let crate::protocol::flight::Flight { pending, unsynced, copy_in, status, .. } = self.tracker.flight;
        let conn = server.conn();
        self.tracker.abandon_block(&mut conn.prepared);
        let cleaned = tokio::time::timeout(CLEANUP_TIMEOUT, async {
            let mut pending = pending;
            let mut out = BytesMut::new();
            if copy_in {
                msg::copy_fail(&mut out, "client disconnected");
            }
            if unsynced {
                out.extend_from_slice(b"S\0\0\0\x04");
                pending += 1;
            }
            if !out.is_empty() {
                conn.stream.write_all(&out).await?;
            }
            let mut status = status;
            if pending > 0 {
                status = conn.drain_status(pending).await?;
            }
            if status != TxStatus::Idle {
                conn.run("ROLLBACK").await?;
            }
            if pinned {
                // Whatever pinned it (LISTEN, temp tables, locks) goes.
                conn.reset("DISCARD ALL").await?;
            } else if mode == PoolMode::Session {
                conn.reset(&reset).await?;
            }
            Ok::<(), ServerError>(())
        })
        .await;
        match cleaned {
            Ok(Ok(())) => server.release(),
            Ok(Err(e)) => tracing::debug!(pool = %self.pool.name(), "closing abandoned server connection: {e}"),
            Err(_) => {
                tracing::debug!(pool = %self.pool.name(), "closing abandoned server connection: cleanup timed out")
            }
        }
        self.rbuf.clear();
    }
}
