//! A batch of `Parse(name)…, Sync` answered without a server when every
//! statement in it was prepared successfully before: the client's names
//! recorded, ParseComplete for each, then ReadyForQuery.

use std::sync::Arc;

use bytes::BytesMut;

use super::{split_cstr, tiny, ClientStatements, Statement};
use crate::protocol::messages::TxStatus;

/// Answer a batch of `Parse(name)…, Sync` without a server when every
/// statement in it has been prepared successfully before (`known`): saves a
/// round trip, and keeps drivers that prepare synchronously (pgbench
/// -M prepared) from waiting on a pool their own open transactions hold.
/// Returns (bytes consumed, reply) when the whole batch qualifies.
pub fn answer_parse_batch(
    buf: &[u8],
    stmts: &mut ClientStatements,
    known: impl Fn(u64) -> bool,
) -> Option<(usize, BytesMut)> {
    let mut pos = 0;
    let mut parsed: Vec<(String, Statement)> = Vec::new();
    loop {
        let (tag, len) =
            crate::protocol::frame::peek_header(&buf[pos..], crate::protocol::frame::MAX_MESSAGE_LEN).ok()??;
        let end = pos + 5 + len;
        let body = buf.get(pos + 5..end)?;
        pos = end;
        match tag {
            b'P' => {
                let (name, rest) = split_cstr(body)?;
                let stmt = Statement::new(rest);
                let fresh = !name.is_empty() && !stmts.map.contains_key(name) && !parsed.iter().any(|(n, _)| n == name);
                if !fresh || !known(stmt.hash) || stmts.map.len() + parsed.len() >= stmts.cap {
                    return None;
                }
                parsed.push((name.to_string(), stmt));
            }
            b'S' if !parsed.is_empty() => break,
            _ => return None,
        }
    }
    let mut reply = BytesMut::with_capacity(parsed.len() * 5 + 6);
    for (name, stmt) in parsed {
        stmts.map.insert(name, Arc::new(stmt));
        reply.extend_from_slice(&tiny(b'1'));
    }
    crate::protocol::messages::ready_for_query(&mut reply, TxStatus::Idle);
    Some((pos, reply))
}
