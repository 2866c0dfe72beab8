//! Wire protocol through pgmux against real PostgreSQL: simple and extended
//! query, COPY both ways, notices and notifications, errors mid-batch,
//! pipelining, and malformed input.

mod support;

use bytes::{BufMut, BytesMut};
use support::raw::{self, Raw};
use support::{code, scalar, APP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_multi_statement_queries() {
    let db = support::fresh_db("proto_simple");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let c = support::app(&p, &db).await;
    assert_eq!(scalar(&c, "SELECT 1 + 1").await, "2");
    let msgs = c
        .simple_query("CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b'); SELECT v FROM t ORDER BY id")
        .await
        .unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["a", "b"]);
    // An error in the middle of a multi-statement string stops it there and
    // the implicit transaction rolls back; the session goes on.
    let e =
        c.simple_query("INSERT INTO t VALUES (3, 'c'); SELECT 1/0; INSERT INTO t VALUES (4, 'd')").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "2");
    // Empty query.
    assert!(c.simple_query("").await.unwrap().is_empty() || c.simple_query(";").await.is_ok());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_unnamed_statements() {
    let db = support::fresh_db("proto_ext");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let c = support::app(&p, &db).await;
    c.simple_query("CREATE TABLE kv (k int primary key, v text)").await.unwrap();
    for i in 0..20i32 {
        let n = c
            .execute_typed(
                "INSERT INTO kv VALUES ($1, $2)",
                &[(&i, tokio_postgres::types::Type::INT4), (&format!("v{i}"), tokio_postgres::types::Type::TEXT)],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    let rows = c
        .query_typed("SELECT v FROM kv WHERE k >= $1 ORDER BY k", &[(&15i32, tokio_postgres::types::Type::INT4)])
        .await
        .unwrap();
    let vals: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(vals, vec!["v15", "v16", "v17", "v18", "v19"]);
    // An error in the extended protocol is reported and the session recovers.
    let e = c.query_typed("SELECT 1/$1", &[(&0i32, tokio_postgres::types::Type::INT4)]).await.unwrap_err();
    assert_eq!(code(&e), "22012");
    assert_eq!(scalar(&c, "SELECT count(*) FROM kv").await, "20");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batch_with_error_recovers_at_sync() {
    let db = support::fresh_db("proto_pipe");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut r = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    // Batch 1: ok, error, (skipped), Sync. Batch 2 in the same write: ok, Sync.
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "SELECT 1");
    raw::bind(&mut b, "", "", &[]);
    raw::execute(&mut b, "", 0);
    raw::parse(&mut b, "", "SELECT 1/0");
    raw::bind(&mut b, "", "", &[]);
    raw::execute(&mut b, "", 0);
    raw::parse(&mut b, "", "SELECT 'skipped'");
    raw::bind(&mut b, "", "", &[]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    raw::parse(&mut b, "", "SELECT $1::int * 2");
    raw::bind(&mut b, "", "", &[Some("21")]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    r.send(&b).await;
    let first = r.until_ready().await;
    let (rows, errors) = raw::rows_and_errors(&first);
    assert_eq!(rows, vec!["1"]);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("22012"), "{errors:?}");
    let second = r.until_ready().await;
    assert_eq!(raw::rows_and_errors(&second).0, vec!["42"]);
    // A batch split across writes, with Sync arriving late, stays on one
    // server connection.
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "SELECT pg_backend_pid()");
    raw::bind(&mut b, "", "", &[]);
    r.send(&b).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut b = BytesMut::new();
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    r.send(&b).await;
    let (rows, errors) = raw::rows_and_errors(&r.until_ready().await);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(rows.len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let db = support::fresh_db("proto_copy");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut r = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    r.query("CREATE TABLE c (id int, v text)").await;
    let mut b = BytesMut::new();
    pgmux::protocol::messages::query(&mut b, "COPY c FROM STDIN");
    r.send(&b).await;
    let (tag, _) = r.recv().await;
    assert_eq!(tag, b'G', "CopyInResponse");
    let mut b = BytesMut::new();
    for chunk in 0..10 {
        let mut data = String::new();
        for i in 0..1000 {
            let id = chunk * 1000 + i;
            data.push_str(&format!("{id}\tvalue {id}\n"));
        }
        raw::copy_data(&mut b, data.as_bytes());
    }
    raw::copy_done(&mut b);
    r.send(&b).await;
    let msgs = r.until_ready().await;
    assert!(raw::rows_and_errors(&msgs).1.is_empty());
    assert_eq!(r.query("SELECT count(*) FROM c").await.0, vec!["10000"]);

    // COPY TO STDOUT.
    let mut b = BytesMut::new();
    pgmux::protocol::messages::query(&mut b, "COPY (SELECT id FROM c ORDER BY id) TO STDOUT");
    r.send(&b).await;
    let msgs = r.until_ready().await;
    let data: Vec<_> = msgs.iter().filter(|(t, _)| *t == b'd').collect();
    assert_eq!(data.len(), 10_000);
    assert!(msgs.iter().any(|(t, _)| *t == b'H'), "CopyOutResponse");

    // A COPY that fails mid-stream (bad row) reports the error and recovers.
    let mut b = BytesMut::new();
    pgmux::protocol::messages::query(&mut b, "COPY c FROM STDIN");
    r.send(&b).await;
    assert_eq!(r.recv().await.0, b'G');
    let mut b = BytesMut::new();
    raw::copy_data(&mut b, b"1\tok\nnot-a-number\tbad\n");
    raw::copy_done(&mut b);
    r.send(&b).await;
    let (_, errors) = raw::rows_and_errors(&r.until_ready().await);
    assert!(errors[0].starts_with("22P02"), "{errors:?}");
    assert_eq!(r.query("SELECT count(*) FROM c").await.0, vec!["10000"]);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_notifications_are_relayed() {
    let db = support::fresh_db("proto_notice");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut r = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    let mut b = BytesMut::new();
    pgmux::protocol::messages::query(
        &mut b,
        "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$; LISTEN chan; NOTIFY chan, 'payload-1'",
    );
    r.send(&b).await;
    let msgs = r.until_ready().await;
    let notice = msgs.iter().find(|(t, _)| *t == b'N').expect("NoticeResponse");
    assert!(String::from_utf8_lossy(&notice.1).contains("hello from plpgsql"));
    let notify = msgs.iter().find(|(t, _)| *t == b'A').expect("NotificationResponse");
    assert!(String::from_utf8_lossy(&notify.1).contains("payload-1"));
    p.stop().await;
}

async fn expect_protocol_error(port: u16, packet: &[u8]) {
    let mut s = Raw::open(port).await;
    s.write_all(packet).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("pgmux must close the connection");
    assert_eq!(buf.first(), Some(&b'E'), "expected ErrorResponse, got {buf:?}");
    let text = raw::error_text(&buf[5..]);
    assert!(text.starts_with("08P01"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unsupported_packets_get_08p01() {
    let db = support::fresh_db("proto_bad");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let port = p.addr.port();
    // Unknown protocol version 4.0.
    let mut b = BytesMut::new();
    b.put_i32(8);
    b.put_u32(4 << 16);
    expect_protocol_error(port, &b).await;
    // Negative and tiny startup lengths.
    expect_protocol_error(port, &(-5i32).to_be_bytes()).await;
    expect_protocol_error(port, &[0, 0, 0, 2, 0, 0, 0, 0]).await;
    // Startup packet larger than allowed.
    expect_protocol_error(port, &(100_000i32).to_be_bytes()).await;
    // Startup without terminator.
    let mut b = BytesMut::new();
    b.put_i32(8 + 4);
    b.put_u32(196_608);
    b.put_slice(b"user");
    expect_protocol_error(port, &b).await;

    // After login: negative length, > 1 GiB length, unknown message type.
    for bad in [
        [b'Q', 0xff, 0xff, 0xff, 0xfb].to_vec(),
        {
            let mut v = vec![b'Q'];
            v.extend_from_slice(&((1i32 << 30) + 5).to_be_bytes());
            v
        },
        vec![b'?', 0, 0, 0, 4],
    ] {
        let mut r = Raw::login(port, APP.0, APP.1, &db, &[]).await;
        r.send(&bad).await;
        let (tag, body) = r.recv().await;
        assert_eq!(tag, b'E');
        assert!(raw::error_text(&body).starts_with("08P01"), "{}", raw::error_text(&body));
        assert!(r.closed().await);
    }
    // pgmux is still fine, and the pool is not poisoned.
    let c = support::app(&p, &db).await;
    assert_eq!(scalar(&c, "SELECT 'alive'").await, "alive");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_declined() {
    let db = support::fresh_db("proto_ssl");
    let p = support::proxy(&db, "").await;
    for code in [80_877_103u32, 80_877_104] {
        let mut s = Raw::open(p.addr.port()).await;
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_u32(code);
        s.write_all(&b).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        // The client may go on with a plain startup on the same socket.
        let mut b = BytesMut::new();
        pgmux::protocol::messages::startup(&mut b, &[("user", support::TRUSTUSER.0), ("database", &db)]);
        s.write_all(&b).await.unwrap();
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], b'R');
        assert_eq!(&head[5..9], &0i32.to_be_bytes(), "AuthenticationOk for trust user");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_stream_through() {
    let db = support::fresh_db("proto_large");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let c = support::app(&p, &db).await;
    // 64 MiB value each way.
    let n = 64 * 1024 * 1024;
    let len = scalar(&c, &format!("SELECT length(repeat('x', {n}))")).await;
    assert_eq!(len, n.to_string());
    let rows = c.simple_query(&format!("SELECT repeat('y', {n})")).await.unwrap();
    let big = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::len),
        _ => None,
    });
    assert_eq!(big, Some(n));
    let big_literal = "z".repeat(8 * 1024 * 1024);
    assert_eq!(scalar(&c, &format!("SELECT length('{big_literal}')")).await, (8 * 1024 * 1024).to_string());
    p.stop().await;
}
