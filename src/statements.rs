//! Prepared-statement storage for transaction mode: the statement as
//! servers know it (`pgmux_<hash of query and types>`), one client's named
//! statements (capped), and the least-recently-used set of what one server
//! connection has prepared. [`crate::prepared`] drives them.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::messages::{finish_message, start_message};

/// A statement as servers know it: `pgmux_<hash>`.
#[derive(Debug)]
pub struct Statement {
    pub hash: u64,
    /// `pgmux_<hash>`.
    pub name: String,
    /// The whole Parse message under the server-side name.
    pub(crate) parse: Bytes,
}

/// Hash of a Parse body after the name: query text and parameter types.
pub fn statement_hash(query_and_types: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(query_and_types);
    h.finish()
}

pub fn server_name(hash: u64) -> String {
    format!("pgmux_{hash:016x}")
}

impl Statement {
    /// The query text (for routing).
    pub fn query(&self) -> &[u8] {
        let after_name = self.parse.iter().skip(5).position(|&b| b == 0).map_or(self.parse.len(), |p| 5 + p + 1);
        let rest = self.parse.get(after_name..).unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    }

    /// The Parse body after the name: query text and parameter types.
    pub fn query_and_types(&self) -> &[u8] {
        let after_name = self.parse.iter().skip(5).position(|&b| b == 0).map_or(self.parse.len(), |p| 5 + p + 1);
        self.parse.get(after_name..).unwrap_or_default()
    }

    /// The client's statement of this name, if any.
    pub fn lookup<'a>(stmts: &'a ClientStatements, name: &str) -> Option<&'a Arc<Statement>> {
        stmts.map.get(name)
    }

    pub fn new(query_and_types: &[u8]) -> Statement {
        let hash = statement_hash(query_and_types);
        let name = server_name(hash);
        let mut b = BytesMut::with_capacity(query_and_types.len() + 32);
        let at = start_message(&mut b, b'P');
        put_cstr(&mut b, &name);
        b.put_slice(query_and_types);
        finish_message(&mut b, at);
        Statement { hash, name, parse: b.freeze() }
    }
}

/// One client's named statements, capped.
#[derive(Debug, Default)]
pub struct ClientStatements {
    pub(crate) map: HashMap<String, Arc<Statement>>,
    pub cap: usize,
}

impl ClientStatements {
    pub fn new(cap: usize) -> Self {
        ClientStatements { map: HashMap::new(), cap }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// What one server connection has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<u64, u64>,
    tick: u64,
}

impl ServerStatements {
    /// Whether the statement is prepared; marks it used.
    pub fn touch(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Record a statement as prepared; returns the one to close when the
    /// connection holds more than `cap`.
    pub fn insert(&mut self, hash: u64, cap: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(hash, self.tick);
        if self.used.len() <= cap.max(1) {
            return None;
        }
        let victim = self.used.iter().filter(|(h, _)| **h != hash).min_by_key(|(_, t)| **t).map(|(h, _)| *h)?;
        self.used.remove(&victim);
        Some(victim)
    }

    pub fn remove(&mut self, hash: u64) {
        self.used.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

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
    crate::protocol::messages::ready_for_query(&mut reply, b'I');
    Some((pos, reply))
}

pub(crate) fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

pub(crate) fn split_cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

/// A message with no body.
pub(crate) fn tiny(tag: u8) -> BytesMut {
    let mut b = BytesMut::with_capacity(5);
    b.put_u8(tag);
    b.put_i32(4);
    b
}
