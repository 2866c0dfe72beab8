//! A `BEGIN` of pgmux's own sent with the request after it instead of a
//! round trip before it (a part of a transaction across shards joining
//! it): queued on the connection, written with the next request
//! ([`ServerConn::send`]), its answer read before that request's
//! ([`ServerConn::settle`]). A connection with one unsettled is never
//! reused (see `Checkout::release`).

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{ServerConn, ServerError};
use crate::protocol::messages::{self as msg, TxStatus};

/// A `BEGIN` of pgmux's own ahead of the next request.
#[derive(Debug, Default)]
pub enum Ahead {
    #[default]
    None,
    /// To be sent with the next request (the Query's bytes).
    Queued(BytesMut),
    /// Sent; its answer not read yet.
    Unread,
}

impl ServerConn {
    /// Queue pgmux's own `begin` to go with the next request.
    pub fn begin_ahead(&mut self, begin: &str) {
        let mut out = BytesMut::new();
        msg::query(&mut out, begin);
        self.ahead = Ahead::Queued(out);
    }

    /// Write `bytes`, after a `BEGIN` queued ahead of them (in one write).
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match std::mem::take(&mut self.ahead) {
            Ahead::Queued(mut out) => {
                out.extend_from_slice(bytes);
                self.ahead = Ahead::Unread;
                self.stream.write_all(&out).await
            }
            other => {
                self.ahead = other;
                self.stream.write_all(bytes).await
            }
        }
    }

    /// Read the answer to the `BEGIN` sent ahead (sent now if still
    /// queued), if any: the transaction must have begun.
    pub async fn settle(&mut self) -> Result<(), ServerError> {
        match std::mem::take(&mut self.ahead) {
            Ahead::None => return Ok(()),
            Ahead::Queued(out) => self.stream.write_all(&out).await?,
            Ahead::Unread => {}
        }
        self.drain_expecting(1, TxStatus::InBlock).await
    }
}
