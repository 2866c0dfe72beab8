use super::*;
use crate::protocol::statements::{answer_parse_batch, server_name, statement_hash};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn parse_body(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

fn bind_body(stmt: &str) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    b
}

struct World {
    stmts: ClientStatements,
    server: ServerStatements,
    t: Tracker,
}

impl World {
    fn new() -> Self {
        World { stmts: ClientStatements::new(10), server: ServerStatements::default(), t: Tracker::default() }
    }
    fn client(&mut self, tag: u8, body: &[u8]) -> Flow {
        let mut cx = Ctx::new(&mut self.stmts, &mut self.server, 2);
        self.t.client(tag, body, Some(&mut cx), None)
    }
    fn server(&mut self, tag: u8, body: &[u8]) -> Flow {
        let mut cx = Ctx::new(&mut self.stmts, &mut self.server, 2);
        self.t.server(tag, body, true, Some(&mut cx)).0
    }
}

fn replaced(f: Flow) -> Vec<u8> {
    match f {
        Flow::Replace(b) => b.to_vec(),
        other => panic!("expected Replace, got {other:?}"),
    }
}

#[test]
fn first_parse_goes_to_server_under_hashed_name() {
    let mut w = World::new();
    let out = replaced(w.client(b'P', &parse_body("s1", "SELECT 1")));
    let hash = statement_hash(&parse_body("", "SELECT 1")[1..]);
    assert_eq!(out, msg(b'P', &parse_body(&server_name(hash), "SELECT 1")));
    assert_eq!(w.server(b'1', b""), Flow::Forward);
    // Bind is renamed; the server already has the statement.
    let out = replaced(w.client(b'B', &bind_body("s1")));
    assert_eq!(out, msg(b'B', &bind_body(&server_name(hash))));
    assert_eq!(w.client(b'S', b""), Flow::Forward);
    assert_eq!(w.server(b'2', b""), Flow::Forward);
    assert_eq!(w.server(b'Z', b"I"), Flow::Forward);
    assert!(w.t.idle());
}

#[test]
fn known_statement_is_answered_by_pgmux_and_injected_when_missing() {
    let mut w = World::new();
    let hash = statement_hash(&parse_body("", "SELECT 2")[1..]);
    w.server.insert(hash, 0, 10);
    // The server has it: ParseComplete comes from pgmux at once.
    assert_eq!(w.client(b'P', &parse_body("a", "SELECT 2")), Flow::Drop);
    assert_eq!(w.t.due().map(|b| b.to_vec()), Some(msg(b'1', b"")));
    // Another server connection without it: Parse injected before Bind,
    // its ParseComplete hidden from the client.
    w.server = ServerStatements::default();
    let out = replaced(w.client(b'B', &bind_body("a")));
    let mut expect = msg(b'P', &parse_body(&server_name(hash), "SELECT 2"));
    expect.extend(msg(b'B', &bind_body(&server_name(hash))));
    assert_eq!(out, expect);
    w.client(b'E', b"\0\0\0\0\0");
    w.client(b'S', b"");
    assert_eq!(w.server(b'1', b""), Flow::Drop);
    assert_eq!(w.server(b'2', b""), Flow::Forward);
    assert_eq!(w.server(b'C', b"SELECT 1\0"), Flow::Forward);
    assert_eq!(w.server(b'Z', b"I"), Flow::Forward);
    assert!(w.t.idle());
}

#[test]
fn failed_parse_leaves_no_half_state() {
    let mut w = World::new();
    let _ = w.client(b'P', &parse_body("bad", "SELEC 1"));
    // A second statement the server already has, answered by pgmux later
    // in the stream, must vanish with the error too.
    let hash = statement_hash(&parse_body("", "SELECT 3")[1..]);
    w.server.insert(hash, 0, 10);
    assert_eq!(w.client(b'P', &parse_body("good", "SELECT 3")), Flow::Drop);
    assert_eq!(w.t.due(), None, "must wait behind the first Parse");
    w.client(b'S', b"");
    assert_eq!(w.server(b'E', b"C42601\0\0"), Flow::Forward);
    assert_eq!(w.server(b'Z', b"I"), Flow::Forward);
    assert!(w.t.idle());
    assert_eq!(w.stmts.len(), 0);
    assert_eq!(w.server.len(), 1, "only the statement prepared before remains");
    // The name is free again.
    assert!(matches!(w.client(b'P', &parse_body("bad", "SELECT 1")), Flow::Replace(_)));
}

#[test]
fn error_without_sync_makes_server_skip_until_sync() {
    let mut w = World::new();
    let _ = w.client(b'P', &parse_body("x", "SELEC"));
    w.client(b'H', b"");
    assert_eq!(w.server(b'E', b"C42601\0\0"), Flow::Forward);
    // Until Sync, nothing is tracked or rewritten: the server ignores it.
    assert_eq!(w.client(b'B', &bind_body("x")), Flow::Forward);
    assert!(!w.t.idle());
    w.client(b'S', b"");
    w.server(b'Z', b"I");
    assert!(w.t.idle());
}

#[test]
fn duplicate_name_and_close_are_emulated() {
    let mut w = World::new();
    let _ = w.client(b'P', &parse_body("d", "SELECT 4"));
    w.server(b'1', b"");
    // The server is made to raise the error itself (so a transaction
    // aborts as on PostgreSQL): an unnamed DO, its replies hidden.
    let out = replaced(w.client(b'P', &parse_body("d", "SELECT 4")));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("RAISE EXCEPTION") && text.contains("42P05") && text.contains("\"d\" already exists"),
        "{text}"
    );
    assert!(w.t.due().is_none());
    let _ = w.client(b'B', &bind_body("d"));
    assert_eq!(w.client(b'S', b""), Flow::Forward);
    assert_eq!(w.server(b'1', b""), Flow::Drop);
    assert_eq!(w.server(b'2', b""), Flow::Drop);
    assert_eq!(w.server(b'E', b"C42P05\0\0"), Flow::Forward);
    assert_eq!(w.server(b'Z', b"E"), Flow::Forward);
    assert!(w.t.settled() && !w.t.idle(), "every reply in, the transaction failed");
    // Close of a statement: answered by pgmux, the server copy stays.
    let mut close = vec![b'S'];
    close.extend_from_slice(b"d\0");
    assert_eq!(w.client(b'C', &close), Flow::Drop);
    assert_eq!(w.t.due().map(|b| b.to_vec()), Some(msg(b'3', b"")));
    assert_eq!(w.stmts.len(), 0);
    assert_eq!(w.server.len(), 1);
}

#[test]
fn lru_eviction_closes_lazily() {
    let mut w = World::new();
    for (i, sql) in ["SELECT 10", "SELECT 11"].iter().enumerate() {
        let _ = w.client(b'P', &parse_body(&format!("q{i}"), sql));
        w.server(b'1', b"");
    }
    // Third statement with a server cap of 2: the least recently used is
    // closed in the same write, its CloseComplete hidden.
    let out = replaced(w.client(b'P', &parse_body("q2", "SELECT 12")));
    let victim = statement_hash(&parse_body("", "SELECT 10")[1..]);
    let mut close = vec![b'S'];
    close.extend_from_slice(server_name(victim).as_bytes());
    close.push(0);
    assert!(out.starts_with(&msg(b'C', &close)));
    assert_eq!(w.server(b'3', b""), Flow::Drop);
    assert_eq!(w.server(b'1', b""), Flow::Forward);
    assert_eq!(w.server.len(), 2);
    // q0 is still the client's: a Bind re-prepares it.
    let out = replaced(w.client(b'B', &bind_body("q0")));
    assert!(out.windows(9).any(|x| x == b"SELECT 10"));
}

#[test]
fn sql_prepare_forwarded_and_deallocate_emulated() {
    let mut w = World::new();
    // SQL PREPARE goes to the server (the session pins the client).
    assert_eq!(w.client(b'Q', b"SELECT 1; PREPARE p AS SELECT 1\0"), Flow::Forward);
    w.server(b'C', b"PREPARE\0");
    w.server(b'Z', b"I");
    assert!(w.t.idle());
    let _ = w.client(b'P', &parse_body("s", "SELECT 5"));
    w.server(b'1', b"");
    assert_eq!(w.client(b'Q', b"DEALLOCATE s\0"), Flow::Drop);
    let out = w.t.due().unwrap().to_vec();
    assert!(out.starts_with(&msg(b'C', b"DEALLOCATE\0")));
    assert_eq!(w.stmts.len(), 0);
    // Unknown names go to the server (SQL-level statements, or its error).
    assert_eq!(w.client(b'Q', b"DEALLOCATE other\0"), Flow::Forward);
}

#[test]
fn sync_behind_a_copy_in_is_not_expected() {
    // tokio-postgres: Bind, Execute, Sync; then CopyData, CopyDone, Sync.
    let mut w = World::new();
    w.client(b'B', &bind_body(""));
    w.client(b'E', b"\0\0\0\0\0");
    w.client(b'S', b"");
    assert_eq!(w.server(b'2', b""), Flow::Forward);
    assert_eq!(w.server(b'G', b"\0\0\0"), Flow::Forward);
    assert_eq!(w.client(b'd', b"1\n"), Flow::Forward);
    assert_eq!(w.client(b'c', b""), Flow::Forward);
    w.client(b'S', b"");
    assert_eq!(w.server(b'C', b"COPY 1\0"), Flow::Forward);
    assert!(!w.t.idle());
    assert_eq!(w.server(b'Z', b"I"), Flow::Forward);
    assert!(w.t.idle());
}

#[test]
fn known_parse_batches_are_answered_without_a_server() {
    let mut stmts = ClientStatements::new(10);
    let mut wire = msg(b'P', &parse_body("a", "SELECT 1"));
    wire.extend(msg(b'P', &parse_body("b", "SELECT 2")));
    wire.extend(msg(b'S', b""));
    let h1 = statement_hash(&parse_body("", "SELECT 1")[1..]);
    let h2 = statement_hash(&parse_body("", "SELECT 2")[1..]);
    // One statement never prepared anywhere: a server must see the batch.
    assert!(answer_parse_batch(&wire, &mut stmts, |h| h == h1).is_none());
    assert!(stmts.is_empty());
    let (n, reply) = answer_parse_batch(&wire, &mut stmts, |h| h == h1 || h == h2).unwrap();
    assert_eq!(n, wire.len());
    let mut expect = msg(b'1', b"");
    expect.extend(msg(b'1', b""));
    expect.extend(msg(b'Z', b"I"));
    assert_eq!(reply.to_vec(), expect);
    assert_eq!(stmts.len(), 2);
    // A name already taken must get PostgreSQL's error: not answered here.
    assert!(answer_parse_batch(&wire, &mut stmts, |_| true).is_none());
    // Anything but Parse…Sync is not answered here either.
    let mut other = msg(b'P', &parse_body("c", "SELECT 1"));
    other.extend(msg(b'B', &bind_body("c")));
    other.extend(msg(b'S', b""));
    assert!(answer_parse_batch(&other, &mut stmts, |_| true).is_none());
}

#[test]
fn pipelined_copy_ends_before_it_starts() {
    // asyncpg: Query(COPY) + CopyData + CopyDone in one write.
    let mut w = World::new();
    w.client(b'Q', b"COPY t FROM STDIN\0");
    w.client(b'd', b"1\n");
    w.client(b'c', b"");
    w.server(b'G', b"\0\0\0");
    w.server(b'C', b"COPY 1\0");
    w.server(b'Z', b"I");
    assert!(w.t.idle());
    // Then statements are tracked again.
    assert!(matches!(w.client(b'P', &parse_body("s", "SELECT 1")), Flow::Replace(_)));
    // Extended and fully pipelined: Bind, Execute, Sync, data, CopyDone, Sync.
    let mut w = World::new();
    w.client(b'B', &bind_body(""));
    w.client(b'E', b"\0\0\0\0\0");
    w.client(b'S', b"");
    w.client(b'd', b"1\n");
    w.client(b'c', b"");
    w.client(b'S', b"");
    w.server(b'2', b"");
    w.server(b'G', b"\0\0\0");
    w.server(b'C', b"COPY 1\0");
    w.server(b'Z', b"I");
    assert!(w.t.idle());
    // A COPY that fails before starting leaves no marker behind.
    let mut w = World::new();
    w.client(b'Q', b"COPY nosuch FROM STDIN\0");
    w.client(b'c', b"");
    w.server(b'E', b"C42P01\0\0");
    w.server(b'Z', b"I");
    assert!(w.t.idle());
}
