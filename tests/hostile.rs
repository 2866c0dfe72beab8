//! Hostile input. Property tests (proptest, bounded case counts so CI stays
//! quick) throw random and half-valid bytes at every parser a client can
//! reach — the frame decoder, the startup packet, the SCRAM exchange, Bind
//! and DataRow parsing, the statement classifier and the session-state
//! scanners — and require an error or a result, never a panic or an
//! allocation the input size does not justify. Against a running pgmux:
//! a byte-at-a-time (slowloris) login is cut at `client_login_timeout`,
//! a message announcing more than the 1 GiB limit is refused (and one
//! within it only grows the buffer as its bytes arrive), and a storm of
//! wrong passwords does not slow a good client down.

mod support;

use std::time::{Duration, Instant};

use pgmux::protocol::auth::{ScramClient, ScramCredentials, ScramServer, ScramVerifier};
use pgmux::protocol::frame::{self, Flow, Relay, MAX_MESSAGE_LEN};
use pgmux::protocol::messages as msg;
use pgmux::sql::classify::Classifier;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Cases per property (`PROPTEST_CASES` overrides).
fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Well-formed frames with random tags and bodies, then random garbage.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let frame = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(tag, body)| {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    });
    (prop::collection::vec(frame, 0..8), prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(fs, tail)| {
        let mut out: Vec<u8> = fs.concat();
        out.extend_from_slice(&tail);
        out
    })
}

/// SQL-ish text: keywords, identifiers, literals, punctuation, hints.
fn sqlish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("SELECT"),
        Just("INSERT INTO t"),
        Just("UPDATE"),
        Just("DELETE FROM"),
        Just("WITH x AS ("),
        Just(")"),
        Just("("),
        Just("WHERE id ="),
        Just("IN ("),
        Just("'it''s'"),
        Just("$1"),
        Just("$$body$$"),
        Just("/* pgmux: shard=1 */"),
        Just("--"),
        Just(";"),
        Just("SET LOCAL"),
        Just("set_config('a', 'b', false)"),
        Just("BEGIN"),
        Just("COMMIT"),
        Just("FOR UPDATE"),
        Just("E'\\\\'"),
        Just("\""),
        Just("'"),
        Just("nextval("),
        Just("pg_advisory_lock(1)"),
        Just("LISTEN x"),
        Just("PREPARE p AS"),
        Just("DECLARE c CURSOR WITH HOLD FOR"),
        Just("12345678901234567890"),
        Just("é✓"),
    ];
    prop::collection::vec(token, 0..16).prop_map(|t| t.join(" "))
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn frame_scanner_never_panics(bytes in frames(), max in 0usize..256) {
        let mut relay = Relay::default();
        let _ = relay.scan(&bytes, max, |t| t % 2 == 0, |_, _| Flow::Forward);
        let mut relay = Relay::default();
        let _ = relay.scan(&bytes, MAX_MESSAGE_LEN, |_| true, |t, _| if t == b'Q' { Flow::Stop } else { Flow::Forward });
        let _ = frame::peek_header(&bytes, max);
    }

    #[test]
    fn startup_packets_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), code in any::<u32>()) {
        // As a whole startup packet (length, code, payload) from a socket.
        let mut packet = ((bytes.len() + 8) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        packet.extend_from_slice(&bytes);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for input in [&packet[..], &bytes[..]] {
            let mut buf = bytes::BytesMut::new();
            let mut reader = input;
            let _ = rt.block_on(frame::read_startup(&mut reader, &mut buf));
        }
        let _ = msg::parse_startup_params(bytes::BytesMut::from(&bytes[..]));
        let _ = msg::parse_options(&String::from_utf8_lossy(&bytes));
        let _ = msg::parse_bind(&bytes);
        let _ = msg::parse_parameter_status(&bytes);
        let _ = pgmux::shard::merge::parse_row(&bytes);
    }

    #[test]
    fn scram_exchange_never_panics(first in prop::collection::vec(any::<u8>(), 0..200), last in prop::collection::vec(any::<u8>(), 0..200)) {
        let verifier = ScramVerifier::from_password("pw", b"saltsaltsalt", 4096);
        let mut server = ScramServer::new(verifier.clone());
        let _ = server.handle_client_first("SCRAM-SHA-256", &first);
        let _ = server.handle_client_final(&last);
        // A well-formed first message, then a random final one.
        let mut server = ScramServer::new(verifier.clone());
        let client = ScramClient::new(ScramCredentials::Password("pw".into()));
        if server.handle_client_first("SCRAM-SHA-256", &client.client_first()).is_ok() {
            prop_assert!(server.handle_client_final(&last).is_err());
        }
        let mut client = ScramClient::new(ScramCredentials::Password("pw".into()));
        let _ = client.handle_server_first(&first);
        let _ = client.handle_server_final(&last);
    }

    #[test]
    fn statement_scanners_never_panic(sql in sqlish(), junk in ".{0,64}") {
        let classifier = Classifier::new(0, &["my_write".to_string()], false);
        for text in [sql.as_str(), junk.as_str()] {
            let _ = classifier.classify(text);
            let _ = pgmux::sql::scan::statements(text);
            let _ = pgmux::sql::scan::shape_and_literals(text);
            let _ = pgmux::sql::effects::pins_session(text);
            let _ = pgmux::sql::effects::setting_changes(text);
            let _ = pgmux::sql::effects::needs_full_reset(text);
            let _ = pgmux::sql::scan::leading_command(text);
        }
    }
}

fn slow_config(db: &str) -> String {
    support::config_text(db, "", "").replacen(
        "log_level = \"warn\"\n",
        "log_level = \"warn\"\nclient_login_timeout = \"1s\"\n",
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_oversized_and_brute_force_clients_are_contained() {
    let db = support::fresh_db("hostile");
    let p = support::start_proxy(&slow_config(&db)).await;
    let addr = p.addr;

    // Slowloris: a startup packet one byte every 200 ms is cut at 1 s.
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut packet = Vec::new();
        msg::startup(&mut bytes::BytesMut::new(), &[]);
        packet.extend_from_slice(&[0, 0, 0, 40, 0, 3, 0, 0]);
        packet.extend_from_slice(b"user\0app\0database\0postgres\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let started = Instant::now();
        for b in packet {
            if s.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
                break;
            }
        }
        started.elapsed()
    });

    // A message announcing 2 GiB: refused at once with 08P01.
    let good = support::app(&p, &db).await;
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut startup = bytes::BytesMut::new();
    msg::startup(&mut startup, &[("user", support::TRUSTUSER.0), ("database", &db)]);
    raw.write_all(&startup).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    loop {
        let (tag, _) = frame::read_message(&mut raw, &mut buf, 1 << 20).await.unwrap();
        if tag == b'Z' {
            break;
        }
    }
    raw.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff, b'S']).await.unwrap();
    let (tag, body) = frame::read_message(&mut raw, &mut buf, 1 << 20).await.unwrap();
    assert_eq!(tag, b'E');
    assert!(String::from_utf8_lossy(&body).contains("08P01"));

    // 40 wrong passwords at once; the good client is not held up.
    let mut storm = Vec::new();
    for _ in 0..40 {
        let url = support::conn_str(addr.port(), support::APP.0, "wrong", &db);
        storm.push(tokio::spawn(async move { support::connect_str(&url).await.is_err() }));
    }
    let started = Instant::now();
    assert_eq!(support::scalar(&good, "SELECT 1").await, "1");
    let fresh = support::app(&p, &db).await;
    assert_eq!(support::scalar(&fresh, "SELECT 2").await, "2");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    for s in storm {
        assert!(s.await.unwrap(), "a wrong password logged in");
    }
    let took = slow.await.unwrap();
    assert!(took < Duration::from_secs(4), "the slow login lasted {took:?}");
    p.stop().await;
}
