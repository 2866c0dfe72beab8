//! Prepared-statement storage for transaction mode: a client's statement
//! and its name on servers (`pgmux_<identity>`: a hash of query, types and
//! the naming context — `search_path`, `role` — it runs under), one
//! client's named statements (capped), the least-recently-used set of what
//! one server connection has prepared (with the statements to close there
//! before its next use), and the invalidations of one database (DDL
//! relayed, statements found stale) that every connection to it applies
//! when it is next checked out. [`crate::protocol::prepared`] drives them.
//!
//! A batch of Parses of statements servers already know is answered
//! without one in `statements/parse_batch.rs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::messages::{finish_message, start_message};

mod parse_batch;
pub use parse_batch::answer_parse_batch;

/// A client's statement: its query text and parameter types. Servers know
/// it as `pgmux_<identity>`, where the identity mixes its hash with the
/// naming context it runs under (see [`naming_context`]).
#[derive(Debug)]
pub struct Statement {
    /// Hash of the query text and parameter types.
    pub hash: u64,
    /// The Parse body after the name: query text and parameter types.
    body: Bytes,
    /// The client was sent this statement's description (Describe of the
    /// statement): its result shape is the client's to rely on. The
    /// preparation number of the server statement that told it, plus one
    /// (0: never described).
    told: AtomicU64,
    /// The invalidation epoch up to which `told` was checked.
    checked: AtomicU64,
    /// The result shape the client was told (see [`result_shape`]).
    shape: AtomicU64,
    /// The last schema change (see [`Invalidations::all_seq`]) after
    /// which a server statement was found to still have that shape.
    verified: AtomicU64,
    /// Its server statement changed result type after the client was
    /// told its shape: every use fails, as on PostgreSQL, until the client
    /// prepares it again.
    stale_shape: AtomicBool,
}

/// Hash of a Parse body after the name: query text and parameter types.
pub fn statement_hash(query_and_types: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(query_and_types);
    h.finish()
}

/// The naming context of a session's settings: what changes how a
/// statement's names resolve (`search_path`, `role`). 0 when neither is
/// set, so clients on the defaults share their server statements.
pub fn naming_context(settings: &BTreeMap<String, String>) -> u64 {
    let (path, role) = (settings.get("search_path"), settings.get("role"));
    if path.is_none() && role.is_none() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in [path, role] {
        h.write(v.map_or(&[0xff][..], |v| v.as_bytes()));
        h.write_u8(0);
    }
    h.finish() | 1
}

/// A naming context nobody else has: for a connection whose name
/// resolution a client changed in a way pgmux has not confirmed yet.
pub fn private_context() -> u64 {
    rand::random::<u64>() | 1
}

/// The server-side identity of the statement `hash` in context `ctx`.
pub fn identity(hash: u64, ctx: u64) -> u64 {
    if ctx == 0 {
        return hash;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write_u64(hash);
    h.write_u64(ctx);
    h.finish()
}

pub fn server_name(ident: u64) -> String {
    format!("pgmux_{ident:016x}")
}

/// Append `pgmux_<ident>` and its terminating zero.
pub(crate) fn put_server_name(b: &mut BytesMut, ident: u64) {
    use std::fmt::Write;
    let _ = write!(b, "pgmux_{ident:016x}");
    b.put_u8(0);
}

/// What of a RowDescription (`tag` `T`, its body) or NoData (`n`) makes a
/// statement's result type, as PostgreSQL compares it when it re-plans
/// (column names, types and type modifiers; not the source table, which
/// may be a new one of the same shape): its hash, 0 if unreadable.
pub(crate) fn result_shape(tag: u8, body: &[u8]) -> u64 {
    if tag == b'n' {
        return 1;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let Some((count, mut rest)) = body.split_first_chunk::<2>() else { return 0 };
    for _ in 0..i16::from_be_bytes(*count) {
        let Some(end) = rest.iter().position(|&b| b == 0) else { return 0 };
        // name, table oid (4), column number (2), type oid (4), type
        // length (2), type modifier (4), format (2)
        let Some(field) = rest.get(end + 1..end + 19) else { return 0 };
        h.write(&rest[..end]);
        h.write(&field[6..16]);
        rest = &rest[end + 19..];
    }
    h.finish().max(2)
}

impl Statement {
    /// The query text (for routing).
    pub fn query(&self) -> &[u8] {
        self.body.split(|&b| b == 0).next().unwrap_or_default()
    }

    /// The Parse body after the name: query text and parameter types.
    pub fn query_and_types(&self) -> &[u8] {
        &self.body
    }

    /// The client's statement of this name, if any.
    pub fn lookup<'a>(stmts: &'a ClientStatements, name: &str) -> Option<&'a Arc<Statement>> {
        stmts.map.get(name)
    }

    pub fn new(query_and_types: &[u8]) -> Statement {
        Statement {
            hash: statement_hash(query_and_types),
            body: Bytes::copy_from_slice(query_and_types),
            told: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            shape: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            stale_shape: AtomicBool::new(false),
        }
    }

    /// Append the Parse message that prepares it as `pgmux_<ident>`.
    pub(crate) fn put_parse(&self, out: &mut BytesMut, ident: u64) {
        let at = start_message(out, b'P');
        put_server_name(out, ident);
        out.put_slice(&self.body);
        finish_message(out, at);
    }

    /// The client was told its shape (see [`result_shape`]) by the server
    /// statement prepared as number `seq` (see [`Invalidations::next_seq`]).
    pub(crate) fn mark_described(&self, seq: u64, shape: u64) {
        self.shape.store(shape, Ordering::Relaxed);
        self.told.store(seq + 1, Ordering::Relaxed);
    }

    /// Whether the shape the client was told must be checked before the
    /// statement is used: it was told before the schema last changed
    /// through pgmux (`all_seq`), and not checked since.
    pub(crate) fn unverified(&self, all_seq: u64) -> bool {
        self.told().is_some_and(|told| told <= all_seq)
            && self.verified.load(Ordering::Relaxed) < all_seq
            && !self.stale_shape()
    }

    /// A server statement prepared after the schema change `all_seq`
    /// answers with `shape`: the same as the client was told (it may be
    /// used), or not (it fails from now on, as on PostgreSQL).
    pub(crate) fn verified(&self, all_seq: u64, shape: u64) {
        let told = self.shape.load(Ordering::Relaxed);
        if told == shape || told == 0 || shape == 0 {
            self.verified.fetch_max(all_seq, Ordering::Relaxed);
        } else {
            self.mark_stale_shape();
        }
    }

    /// The preparation number of the statement that told the client its
    /// shape, if it was told.
    pub(crate) fn told(&self) -> Option<u64> {
        self.told.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Whether the shape the client was told is gone: a server statement
    /// `ident` prepared no earlier than the one that told it was found to
    /// have changed result type (by any client).
    pub(crate) fn reshaped(&self, ident: u64, log: &Invalidations) -> bool {
        let Some(told) = self.told() else { return false };
        let epoch = log.epoch();
        if self.checked.swap(epoch, Ordering::Relaxed) == epoch {
            return false;
        }
        log.reshaped_upto(ident).is_some_and(|upto| told <= upto)
    }

    pub(crate) fn mark_stale_shape(&self) {
        self.stale_shape.store(true, Ordering::Relaxed);
    }

    pub(crate) fn stale_shape(&self) -> bool {
        self.stale_shape.load(Ordering::Relaxed)
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
    /// Statement → (last use, preparation number).
    used: HashMap<u64, (u64, u64)>,
    tick: u64,
    /// The naming context of the session state on the connection now.
    pub context: u64,
    /// Statements to close on the server before anything else is sent
    /// (stale ones): they are no longer in `used`.
    pub(crate) doomed: Vec<u64>,
    /// The invalidations of its database this connection has applied.
    epoch: u64,
}

impl ServerStatements {
    /// Whether the statement is prepared; marks it used.
    pub fn touch(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&hash) {
            Some((t, _)) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Record a statement as prepared (its preparation number `seq`);
    /// returns the one to close when the connection holds more than `cap`.
    pub fn insert(&mut self, hash: u64, seq: u64, cap: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(hash, (self.tick, seq));
        if self.used.len() <= cap.max(1) {
            return None;
        }
        let victim = self.used.iter().filter(|(h, _)| **h != hash).min_by_key(|(_, (t, _))| *t).map(|(h, _)| *h)?;
        self.used.remove(&victim);
        Some(victim)
    }

    /// The preparation number of a statement prepared here.
    pub fn seq(&self, hash: u64) -> Option<u64> {
        self.used.get(&hash).map(|(_, seq)| *seq)
    }

    pub fn remove(&mut self, hash: u64) {
        self.used.remove(&hash);
    }

    /// The statement is stale: close it on the server with the next write.
    pub fn doom(&mut self, ident: u64) {
        if self.used.remove(&ident).is_some() && !self.doomed.contains(&ident) {
            self.doomed.push(ident);
        }
    }

    pub fn clear(&mut self) {
        self.used.clear();
        self.doomed.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// Apply the invalidations of the connection's database made since it
    /// last looked: doom what they name.
    pub fn catch_up(&mut self, log: &Invalidations) {
        let now = log.epoch();
        if now == self.epoch {
            return;
        }
        match log.since(self.epoch) {
            Some(stale) => stale.into_iter().for_each(|h| self.doom(h)),
            None => {
                let all: Vec<u64> = self.used.keys().copied().collect();
                all.into_iter().for_each(|h| self.doom(h));
            }
        }
        self.epoch = now;
    }
}

/// Invalidations kept, at most; a connection further behind drops all.
const INVALIDATIONS_KEPT: usize = 256;

/// Result-type changes remembered, at most (forgotten wholesale past it).
const RESHAPED_KEPT: usize = 4096;

/// The statement invalidations of one database, shared by every pool
/// (primary, replicas, users) whose connections go to it: the server
/// connections apply them when next checked out ([`ServerStatements::catch_up`]).
#[derive(Debug, Default)]
pub struct Invalidations {
    epoch: AtomicU64,
    /// (epoch, statement) in order; `None`: every statement.
    log: Mutex<VecDeque<(u64, Option<u64>)>>,
    /// Statements whose result type changed: the latest preparation
    /// number found stale.
    reshaped: Mutex<HashMap<u64, u64>>,
    /// Numbers server statements as they are prepared (their order).
    seq: AtomicU64,
    /// The last preparation number issued before the schema last changed
    /// through pgmux ([`Invalidations::all`]).
    all_seq: AtomicU64,
}

impl Invalidations {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A statement found stale on one server; `reshaped`: its result type
    /// changed, and this is the preparation number of the stale copy:
    /// drop it from all.
    pub fn statement(&self, ident: u64, reshaped: Option<u64>) {
        if let Some(seq) = reshaped {
            let mut m = self.reshaped.lock().unwrap_or_else(|e| e.into_inner());
            if m.len() >= RESHAPED_KEPT {
                m.clear();
            }
            let upto = m.entry(ident).or_default();
            *upto = (*upto).max(seq);
        }
        self.push(Some(ident));
    }

    /// The latest preparation of `ident` found to have changed result type.
    fn reshaped_upto(&self, ident: u64) -> Option<u64> {
        self.reshaped.lock().unwrap_or_else(|e| e.into_inner()).get(&ident).copied()
    }

    /// The next preparation number (1, 2, ...).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The schema changed (DDL relayed): drop every statement. Statements
    /// whose shape a client was told are checked before their next use
    /// (see [`Statement::unverified`]).
    pub fn all(&self) {
        self.all_seq.fetch_max(self.seq.load(Ordering::Relaxed), Ordering::Relaxed);
        self.push(None);
    }

    /// See [`Invalidations::all`].
    pub fn all_seq(&self) -> u64 {
        self.all_seq.load(Ordering::Relaxed)
    }

    fn push(&self, what: Option<u64>) {
        let Ok(mut log) = self.log.lock() else { return };
        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        log.push_back((epoch, what));
        if log.len() > INVALIDATIONS_KEPT {
            log.pop_front();
        }
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The statements invalidated after `epoch`; `None`: all of them.
    fn since(&self, epoch: u64) -> Option<Vec<u64>> {
        let log = self.log.lock().ok()?;
        if log.front().is_none_or(|(e, _)| *e > epoch + 1) {
            return None;
        }
        log.iter().filter(|(e, _)| *e > epoch).map(|(_, h)| *h).collect()
    }
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

#[cfg(test)]
mod tests {
    use super::result_shape;

    /// A RowDescription body of columns (name, table oid, type oid, typmod).
    fn row_description(cols: &[(&str, i32, i32, i32)]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (name, table, ty, typmod) in cols {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&table.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&4i16.to_be_bytes());
            b.extend_from_slice(&typmod.to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes());
        }
        b
    }

    #[test]
    fn result_shape_is_names_and_types_not_tables() {
        let shape = |cols| result_shape(b'T', &row_description(cols));
        let base = shape(&[("id", 100, 23, -1), ("v", 100, 25, -1)]);
        assert!(base > 1);
        assert_eq!(base, shape(&[("id", 200, 23, -1), ("v", 200, 25, -1)]), "a table made again");
        assert_ne!(base, shape(&[("id", 100, 20, -1), ("v", 100, 25, -1)]), "a type changed");
        assert_ne!(base, shape(&[("id", 100, 23, -1)]), "a column gone");
        assert_ne!(base, shape(&[("id", 100, 23, -1), ("w", 100, 25, -1)]), "a column renamed");
        assert_eq!(result_shape(b'n', b""), 1);
        assert_eq!(result_shape(b'T', &row_description(&[("id", 1, 23, -1)])[..8]), 0, "cut short");
    }
}
