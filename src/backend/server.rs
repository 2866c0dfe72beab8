//! One server connection: connect, startup, authentication (whatever the
//! server asks: SCRAM-SHA-256, md5, cleartext, trust), and the queries pgmux
//! runs on its own behalf (parameter sync, rollback, reset).
//!
//! The relay itself reads and writes [`ServerConn::stream`] directly; this
//! module only keeps the state pgmux tracks per connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::messages::TxStatus;
use crate::protocol::tls::{ServerStream, ServerTls};

use std::sync::Arc;

use crate::config::HostPort;
use crate::protocol::auth::{self, ScramClient, ScramCredentials};
use crate::protocol::error::describe_server_error;
use crate::protocol::frame::{self, FrameError, MAX_PREAUTH_LEN};
use crate::protocol::messages::{self as msg, quote_literal};
use crate::protocol::prepared::ServerStatements;
use crate::protocol::settings::Settings;

/// Why a server connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    /// The server refused us with an ErrorResponse (body kept to relay it).
    #[error("server rejected the connection: {}", describe_server_error(.0))]
    Rejected(BytesMut),
    #[error("server authentication failed: {0}")]
    Auth(String),
    #[error("server query failed: {}", describe_server_error(.0))]
    Query(BytesMut),
    #[error("server protocol error: {0}")]
    Protocol(String),
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
}

impl From<FrameError> for ServerError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => ServerError::Io(e),
            FrameError::Truncated => {
                ServerError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the connection"))
            }
            other => ServerError::Protocol(other.to_string()),
        }
    }
}

/// How pgmux proves itself to PostgreSQL for one (database, user).
#[derive(Clone, Debug, Default)]
pub struct Login {
    pub user: String,
    pub database: String,
    /// Plain-text password, when known.
    pub password: Option<String>,
    /// `md5` + hex(md5(password ++ user)), when known.
    pub md5_hash: Option<String>,
    /// SCRAM credentials without plain text (ClientKey recovered from a
    /// client's SCRAM login against the stored verifier).
    pub scram: Option<ScramCredentials>,
}

/// Parameters whose ParameterStatus reflects the server, not a client choice.
pub fn is_server_owned(name: &str) -> bool {
    matches!(
        name,
        "server_version"
            | "server_encoding"
            | "integer_datetimes"
            | "is_superuser"
            | "session_authorization"
            | "in_hot_standby"
            | "default_transaction_read_only"
            | "scram_iterations"
    )
}

pub struct ServerConn {
    pub id: u64,
    pub stream: ServerStream,
    /// Bytes read from the server and not yet handled.
    pub rbuf: BytesMut,
    /// Shared with the cancel key a client holds while attached.
    pub addr: Arc<HostPort>,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Latest ParameterStatus value of each reported parameter.
    pub reported: BTreeMap<String, String>,
    /// Session settings made explicit on this connection (by pgmux or a
    /// client), compared with each client's on checkout.
    pub applied: Settings,
    /// Statements pgmux has prepared here (transaction mode).
    pub prepared: ServerStatements,
    /// A client changed session state pgmux cannot replay (role, ...):
    /// reset everything before the next client.
    pub needs_reset: bool,
    pub created: Instant,
    pub last_used: Instant,
    /// The transaction status after pgmux's own last query on it.
    pub status: TxStatus,
    /// The pool's generation when it opened (RECONNECT closes older ones).
    pub generation: u64,
    /// pgmux's own `BEGIN` for a part of a transaction across shards: sent
    /// with the next request ([`ServerConn::send`]) rather than a round
    /// trip before it, and answered first ([`ServerConn::settle`]).
    pub ahead: Ahead,
}

mod ahead;
pub use ahead::Ahead;

impl ServerConn {
    /// Open a connection and log in.
    pub async fn connect(
        id: u64,
        addr: &HostPort,
        login: &Login,
        timeout: Duration,
        tls: &ServerTls,
    ) -> Result<ServerConn, ServerError> {
        let name = addr.to_string();
        let connect = async {
            let tcp = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
            tcp.set_nodelay(true)?;
            tls.start(tcp, &addr.host).await
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ServerError::ConnectTimeout(name.clone()))?
            .map_err(|source| ServerError::Connect { addr: name.clone(), source })?;
        let now = Instant::now();
        let mut conn = ServerConn {
            id,
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            addr: Arc::new(addr.clone()),
            backend_pid: 0,
            backend_secret: 0,
            reported: BTreeMap::new(),
            applied: Settings::default(),
            prepared: ServerStatements::default(),
            needs_reset: false,
            created: now,
            last_used: now,
            status: TxStatus::Idle,
            generation: 0,
            ahead: Ahead::None,
        };
        tokio::time::timeout(timeout, conn.startup(login)).await.map_err(|_| ServerError::ConnectTimeout(name))??;
        // What the server starts with is its default, not a setting.
        conn.applied.clear();
        Ok(conn)
    }

    async fn startup(&mut self, login: &Login) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        msg::startup(&mut out, &[("user", &login.user), ("database", &login.database)]);
        self.stream.write_all(&out).await?;
        let mut scram: Option<ScramClient> = None;
        loop {
            let (tag, mut body) = self.read_message().await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(ServerError::Protocol("short authentication request".into()));
                    }
                    let code = body.get_i32();
                    self.authenticate(code, body, login, &mut scram).await?;
                }
                b'S' => {
                    self.note_status(&body);
                }
                b'K' if body.len() >= 8 => {
                    self.backend_pid = body.get_i32();
                    self.backend_secret = body.get_i32();
                }
                b'E' => return Err(ServerError::Rejected(body)),
                b'Z' => return Ok(()),
                b'N' | b'v' => {}
                t => return Err(ServerError::Protocol(format!("unexpected message '{}' during startup", t as char))),
            }
        }
    }

    async fn authenticate(
        &mut self,
        code: i32,
        body: BytesMut,
        login: &Login,
        scram: &mut Option<ScramClient>,
    ) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        match code {
            msg::AUTH_OK => return Ok(()),
            msg::AUTH_CLEARTEXT => {
                let pw = login.password.as_deref().ok_or_else(|| {
                    ServerError::Auth(
                        "server asks for a cleartext password; configure the password or server_password".into(),
                    )
                })?;
                msg::password_message(&mut out, pw);
            }
            msg::AUTH_MD5 => {
                let salt: [u8; 4] = body
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| ServerError::Protocol("md5 request without salt".into()))?;
                let hash = match (&login.md5_hash, &login.password) {
                    (Some(h), _) => h.clone(),
                    (None, Some(pw)) => auth::md5_password_hash(&login.user, pw),
                    _ => {
                        return Err(ServerError::Auth(
                            "server asks for md5 but only a SCRAM verifier is configured; set server_password".into(),
                        ))
                    }
                };
                msg::password_message(&mut out, &auth::md5_salted_response(&hash, salt));
            }
            msg::AUTH_SASL => {
                let offers_scram = body[..].split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256");
                if !offers_scram {
                    return Err(ServerError::Auth("server offers no SASL mechanism pgmux supports".into()));
                }
                let creds = match (&login.password, &login.scram) {
                    (Some(pw), _) => ScramCredentials::Password(pw.clone()),
                    (None, Some(c)) => c.clone(),
                    _ => {
                        return Err(ServerError::Auth(
                            "server asks for SCRAM-SHA-256 but no password is known: configure the password or server_password, or let a client log in with SCRAM first".into(),
                        ))
                    }
                };
                let client = ScramClient::new(creds);
                msg::sasl_initial_response(&mut out, "SCRAM-SHA-256", &client.client_first());
                *scram = Some(client);
            }
            msg::AUTH_SASL_CONTINUE => {
                let client =
                    scram.as_mut().ok_or_else(|| ServerError::Protocol("SASL continue before start".into()))?;
                let reply = client.handle_server_first(&body).map_err(|e| ServerError::Auth(e.to_string()))?;
                msg::sasl_response(&mut out, &reply);
            }
            msg::AUTH_SASL_FINAL => {
                let client = scram.as_ref().ok_or_else(|| ServerError::Protocol("SASL final before start".into()))?;
                client.handle_server_final(&body).map_err(|e| ServerError::Auth(e.to_string()))?;
                return Ok(());
            }
            other => return Err(ServerError::Auth(format!("unsupported authentication request {other}"))),
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }

    pub async fn read_message(&mut self) -> Result<(u8, BytesMut), ServerError> {
        Ok(frame::read_message(&mut self.stream, &mut self.rbuf, frame::MAX_MESSAGE_LEN.min(MAX_PREAUTH_LEN * 64))
            .await?)
    }

    /// Record a ParameterStatus body; returns the pair. A client-settable
    /// parameter that changed is now explicit on this connection.
    pub fn note_status(&mut self, body: &[u8]) -> Option<(String, String)> {
        let (k, v) = msg::parse_parameter_status(body)?;
        if !is_server_owned(&k) {
            self.applied.set(k.to_ascii_lowercase(), v.clone());
        }
        self.reported.insert(k.clone(), v.clone());
        Some((k, v))
    }

    /// Run pgmux's own simple query and read up to ReadyForQuery. Fails on
    /// an ErrorResponse (after draining to ReadyForQuery, so the connection
    /// stays usable) or a non-idle final status.
    pub async fn run(&mut self, sql: &str) -> Result<(), ServerError> {
        self.run_expecting(sql, TxStatus::Idle).await
    }

    /// Run pgmux's own simple query that must leave the transaction
    /// status `status` (`b'T'` for a BEGIN).
    pub async fn run_expecting(&mut self, sql: &str, status: TxStatus) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        msg::query(&mut out, sql);
        self.send(&out).await?;
        self.settle().await?;
        self.drain_expecting(1, status).await
    }

    /// Run pgmux's own simple query (outside a transaction) and return
    /// its DataRow bodies.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<BytesMut>, ServerError> {
        let mut out = BytesMut::new();
        msg::query(&mut out, sql);
        self.send(&out).await?;
        self.settle().await?;
        let (mut rows, mut err) = (Vec::new(), None);
        loop {
            match self.read_message().await? {
                (b'D', body) => rows.push(body),
                (b'E', body) => err = Some(body),
                (b'Z', body) => {
                    self.status = TxStatus::of_ready(&body);
                    break;
                }
                _ => {}
            }
        }
        match err {
            Some(body) => Err(ServerError::Query(body)),
            None => Ok(rows),
        }
    }

    /// Read and discard until `pending` ReadyForQuery messages have arrived;
    /// fails if any ErrorResponse came or the final status is not idle.
    pub async fn drain(&mut self, pending: usize) -> Result<(), ServerError> {
        self.drain_expecting(pending, TxStatus::Idle).await
    }

    async fn drain_expecting(&mut self, pending: usize, expected: TxStatus) -> Result<(), ServerError> {
        let (status, err) = self.drain_inner(pending).await?;
        if let Some(body) = err {
            return Err(ServerError::Query(body));
        }
        if status != expected {
            return Err(ServerError::Protocol(format!("status '{}' after pgmux query", status.byte() as char)));
        }
        Ok(())
    }

    /// Read and discard a departed client's replies up to `pending`
    /// ReadyForQuery messages; returns the final transaction status.
    pub async fn drain_status(&mut self, pending: usize) -> Result<TxStatus, ServerError> {
        Ok(self.drain_inner(pending).await?.0)
    }

    async fn drain_inner(&mut self, mut pending: usize) -> Result<(TxStatus, Option<BytesMut>), ServerError> {
        let mut err = None;
        let mut status = TxStatus::Idle;
        while pending > 0 {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'Z' => {
                    pending -= 1;
                    status = TxStatus::of_ready(&body);
                    self.status = status;
                }
                b'E' => err = Some(body),
                b'S' => {
                    self.note_status(&body);
                }
                _ => {}
            }
        }
        Ok((status, err))
    }

    /// Make the session settings match `wanted`: set what differs, reset
    /// what this connection has but the client does not. One round trip,
    /// none when nothing differs.
    pub async fn sync_params(&mut self, wanted: &Settings) -> Result<(), ServerError> {
        if self.needs_reset {
            self.run("SET SESSION AUTHORIZATION DEFAULT; RESET ALL").await?;
            self.applied.clear();
            self.needs_reset = false;
        }
        let mut sets = Vec::new();
        let mut resets = Vec::new();
        for (k, v) in wanted.iter() {
            if self.applied.get(k) != Some(v) {
                sets.push(format!("pg_catalog.set_config({}, {}, false)", quote_literal(k), quote_literal(v)));
            }
        }
        for k in self.applied.keys() {
            if !wanted.contains_key(k) {
                resets.push(format!("RESET {}", quote_ident_path(k)));
            }
        }
        if sets.is_empty() && resets.is_empty() {
            return Ok(());
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
            sql.push(';');
        }
        for r in resets {
            sql.push_str(&r);
            sql.push(';');
        }
        self.run(&sql).await?;
        self.applied = wanted.clone();
        Ok(())
    }

    /// Session-mode reset before reuse (e.g. DISCARD ALL): everything the
    /// previous client set is gone afterwards.
    pub async fn reset(&mut self, reset_query: &str) -> Result<(), ServerError> {
        if !reset_query.trim().is_empty() {
            self.run(reset_query).await?;
            self.applied.clear();
            self.prepared.clear();
        }
        Ok(())
    }

    /// True when an idle connection can no longer be used: the server closed
    /// it or sent something unprompted (e.g. FATAL on shutdown). Costs one
    /// non-blocking read.
    pub fn is_broken(&mut self) -> bool {
        self.stream.is_broken()
    }

    /// Send a cancel for this connection's running query.
    pub fn cancel_key(&self) -> CancelKey {
        (self.addr.clone(), self.backend_pid, self.backend_secret)
    }

    /// Close politely.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        msg::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(200), self.stream.write_all(&out)).await;
    }

    /// Read more from the server into `rbuf`; 0 means closed.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < 8192 {
            self.rbuf.reserve(32 * 1024);
        }
        self.stream.read_buf(&mut self.rbuf).await
    }
}

/// Where and how to cancel a connection's running query: its address,
/// backend pid and secret.
pub type CancelKey = (Arc<HostPort>, i32, i32);

/// Forward a CancelRequest to a server.
pub async fn send_cancel(addr: &HostPort, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut s = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
    let mut out = BytesMut::new();
    msg::cancel_request(&mut out, pid, secret);
    s.write_all(&out).await?;
    // PostgreSQL closes the socket once it has read the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut sink)).await;
    Ok(())
}

/// `a.b` → `"a"."b"` (GUC names with a prefix).
fn quote_ident_path(name: &str) -> String {
    name.split('.').map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}
