//! A bare-bones protocol client for tests that need to see or send exact
//! messages: ParameterStatus values, pipelined batches, malformed packets.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use pgmux::protocol::auth;
use pgmux::protocol::error::{field, parse_fields};
use pgmux::protocol::frame::{read_message, MAX_MESSAGE_LEN};
use pgmux::protocol::messages as msg;

pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub params: HashMap<String, String>,
    pub key: (i32, i32),
}

impl Raw {
    pub async fn open(port: u16) -> TcpStream {
        TcpStream::connect(("127.0.0.1", port)).await.expect("tcp connect")
    }

    /// Log in with the given startup parameters; panics on failure.
    pub async fn login(port: u16, user: &str, password: &str, db: &str, extra: &[(&str, &str)]) -> Raw {
        Self::try_login(port, user, password, db, extra).await.unwrap_or_else(|e| panic!("login failed: {e}"))
    }

    /// Log in; Err carries "SQLSTATE message" of an ErrorResponse.
    pub async fn try_login(
        port: u16,
        user: &str,
        password: &str,
        db: &str,
        extra: &[(&str, &str)],
    ) -> Result<Raw, String> {
        let mut stream = Self::open(port).await;
        let mut params = vec![("user", user), ("database", db)];
        params.extend_from_slice(extra);
        let mut out = BytesMut::new();
        msg::startup(&mut out, &params);
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut raw = Raw { stream, buf: BytesMut::new(), params: HashMap::new(), key: (0, 0) };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = raw.recv().await;
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        3 => msg::password_message(&mut out, password),
                        5 => {
                            let salt = [body[4], body[5], body[6], body[7]];
                            msg::password_message(
                                &mut out,
                                &auth::md5_salted_response(&auth::md5_password_hash(user, password), salt),
                            );
                        }
                        10 => {
                            let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                            msg::sasl_initial_response(&mut out, "SCRAM-SHA-256", s.message());
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().expect("sasl started");
                            s.update(&body[4..]).map_err(|e| e.to_string())?;
                            msg::sasl_response(&mut out, s.message());
                        }
                        12 => {
                            scram.as_mut().expect("sasl started").finish(&body[4..]).map_err(|e| e.to_string())?;
                            continue;
                        }
                        c => return Err(format!("unexpected auth code {c}")),
                    }
                    raw.send(&out).await;
                }
                b'S' => {
                    let (k, v) = msg::parse_parameter_status(&body).expect("parameter status");
                    raw.params.insert(k, v);
                }
                b'K' => {
                    raw.key = (
                        i32::from_be_bytes(body[0..4].try_into().unwrap()),
                        i32::from_be_bytes(body[4..8].try_into().unwrap()),
                    )
                }
                b'E' => return Err(error_text(&body)),
                b'Z' => return Ok(raw),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Next message; panics on EOF.
    pub async fn recv(&mut self) -> (u8, BytesMut) {
        self.try_recv().await.expect("message")
    }

    pub async fn try_recv(&mut self) -> Option<(u8, BytesMut)> {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            read_message(&mut self.stream, &mut self.buf, MAX_MESSAGE_LEN),
        )
        .await
        .expect("timed out waiting for a message")
        .ok()
    }

    /// Messages up to and including the next ReadyForQuery; ParameterStatus
    /// values are recorded.
    pub async fn until_ready(&mut self) -> Vec<(u8, BytesMut)> {
        let mut out = Vec::new();
        loop {
            let (tag, body) = self.recv().await;
            if tag == b'S' {
                let (k, v) = msg::parse_parameter_status(&body).expect("parameter status");
                self.params.insert(k, v);
            }
            let done = tag == b'Z';
            out.push((tag, body));
            if done {
                return out;
            }
        }
    }

    /// Run a simple query; returns the text of the first column of each row,
    /// and the errors (as "SQLSTATE message").
    pub async fn query(&mut self, sql: &str) -> (Vec<String>, Vec<String>) {
        let mut out = BytesMut::new();
        msg::query(&mut out, sql);
        self.send(&out).await;
        rows_and_errors(&self.until_ready().await)
    }

    /// Whether the server side closed the connection (EOF) soon.
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), self.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub fn rows_and_errors(msgs: &[(u8, BytesMut)]) -> (Vec<String>, Vec<String>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (tag, body) in msgs {
        match tag {
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                rows.push(if len < 0 {
                    "NULL".into()
                } else {
                    String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                });
            }
            b'E' => errors.push(error_text(body)),
            _ => {}
        }
    }
    (rows, errors)
}

/// "SQLSTATE message" of an ErrorResponse body.
pub fn error_text(body: &[u8]) -> String {
    let f = parse_fields(body);
    format!("{} {}", field(&f, b'C').unwrap_or_default(), field(&f, b'M').unwrap_or_default())
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn finish(b: &mut BytesMut, tag: u8, body: BytesMut) {
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(&body);
}

/// Parse (unnamed or named), no parameter types.
pub fn parse(b: &mut BytesMut, name: &str, sql: &str) {
    let mut body = BytesMut::new();
    put_cstr(&mut body, name);
    put_cstr(&mut body, sql);
    body.put_i16(0);
    finish(b, b'P', body);
}

/// Bind with text parameters, text results.
pub fn bind(b: &mut BytesMut, portal: &str, stmt: &str, params: &[Option<&str>]) {
    let mut body = BytesMut::new();
    put_cstr(&mut body, portal);
    put_cstr(&mut body, stmt);
    body.put_i16(0);
    body.put_i16(params.len() as i16);
    for p in params {
        match p {
            Some(v) => {
                body.put_i32(v.len() as i32);
                body.put_slice(v.as_bytes());
            }
            None => body.put_i32(-1),
        }
    }
    body.put_i16(0);
    finish(b, b'B', body);
}

pub fn describe_portal(b: &mut BytesMut, portal: &str) {
    let mut body = BytesMut::new();
    body.put_u8(b'P');
    put_cstr(&mut body, portal);
    finish(b, b'D', body);
}

pub fn describe_statement(b: &mut BytesMut, name: &str) {
    let mut body = BytesMut::new();
    body.put_u8(b'S');
    put_cstr(&mut body, name);
    finish(b, b'D', body);
}

pub fn execute(b: &mut BytesMut, portal: &str, max_rows: i32) {
    let mut body = BytesMut::new();
    put_cstr(&mut body, portal);
    body.put_i32(max_rows);
    finish(b, b'E', body);
}

pub fn sync(b: &mut BytesMut) {
    b.put_u8(b'S');
    b.put_i32(4);
}

pub fn copy_data(b: &mut BytesMut, data: &[u8]) {
    b.put_u8(b'd');
    b.put_i32(data.len() as i32 + 4);
    b.put_slice(data);
}

pub fn copy_done(b: &mut BytesMut) {
    b.put_u8(b'c');
    b.put_i32(4);
}

impl Raw {
    /// Parse a named statement (Parse + Sync) and wait for ReadyForQuery.
    pub async fn prepare(&mut self, name: &str, sql: &str) -> Vec<(u8, BytesMut)> {
        let mut b = BytesMut::new();
        parse(&mut b, name, sql);
        sync(&mut b);
        self.send(&b).await;
        self.until_ready().await
    }

    /// Bind + Execute + Sync of a named statement (no parameters): its rows
    /// and errors.
    pub async fn run_prepared(&mut self, name: &str) -> (Vec<String>, Vec<String>) {
        let mut b = BytesMut::new();
        bind(&mut b, "", name, &[]);
        execute(&mut b, "", 0);
        sync(&mut b);
        self.send(&b).await;
        rows_and_errors(&self.until_ready().await)
    }
}

/// Parse + Bind + Execute of an unnamed statement that fails (division by
/// zero), for errors in the middle of a pipeline.
pub fn failing_execute(b: &mut BytesMut) {
    parse(b, "", "SELECT 1/0");
    bind(b, "", "", &[]);
    execute(b, "", 0);
}
