//! Client login: the startup packet (SSL/GSSENC negotiation, cancel
//! requests, protocol version) and authentication of the client against
//! pgmux's user list: SCRAM-SHA-256, md5, cleartext password or trust.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ClientTlsMode;
use crate::protocol::tls::{ClientStream, ClientTls, MaybeTls};

use crate::config::{AuthMethod, User};
use crate::protocol::auth::{self, ScramServer, ScramVerifier};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::{self, FrameError, MAX_PREAUTH_LEN};
use crate::protocol::messages as msg;

/// Why a login ended without a session.
#[derive(Debug)]
pub enum LoginError {
    /// Tell the client this, then close.
    Reply(PgError),
    /// The client went away or spoke nonsense we cannot answer.
    Gone,
}

impl From<FrameError> for LoginError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(_) | FrameError::Truncated => LoginError::Gone,
            other => LoginError::Reply(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid startup packet: {other}"),
            )),
        }
    }
}

impl From<PgError> for LoginError {
    fn from(e: PgError) -> Self {
        LoginError::Reply(e)
    }
}

impl From<std::io::Error> for LoginError {
    fn from(_: std::io::Error) -> Self {
        LoginError::Gone
    }
}

/// What a client asked for in its StartupMessage.
#[derive(Clone, Debug, Default)]
pub struct StartupInfo {
    pub user: String,
    pub database: String,
    /// Runtime parameters (incl. `options -c`), keyed by lower-case name.
    pub params: BTreeMap<String, String>,
}

pub enum Startup {
    Login(StartupInfo),
    Cancel { pid: i32, secret: i32 },
}

/// Read a new connection's startup packets; an SSLRequest is answered
/// with a TLS handshake when `tls` allows, and the rest is read over TLS.
/// The stream is `None` when the handshake failed (nothing to answer on).
pub async fn accept(
    mut tcp: TcpStream,
    buf: &mut BytesMut,
    tls: &ClientTls,
) -> (Option<ClientStream>, Result<Startup, LoginError>) {
    let Some(acceptor) = &tls.acceptor else {
        let mut stream = MaybeTls::Plain(tcp);
        let startup = read_startup(&mut stream, buf).await;
        return (Some(stream), startup);
    };
    let mut stream = match frame::read_startup(&mut tcp, buf).await {
        Ok((msg::SSL_REQUEST, _)) if buf.is_empty() => {
            if let Err(e) = tcp.write_all(b"S").await {
                return (None, Err(e.into()));
            }
            match acceptor.accept(tcp).await {
                Ok(t) => MaybeTls::Tls(Box::new(t)),
                Err(e) => {
                    tracing::info!("client TLS handshake failed: {e}");
                    return (None, Err(LoginError::Gone));
                }
            }
        }
        Ok((code, payload)) => {
            // Not TLS: put the packet back and read it as usual.
            let mut again = BytesMut::with_capacity(8 + payload.len() + buf.len());
            again.put_u32(8 + payload.len() as u32);
            again.put_u32(code);
            again.extend_from_slice(&payload);
            again.extend_from_slice(buf);
            *buf = again;
            MaybeTls::Plain(tcp)
        }
        Err(e) => return (Some(MaybeTls::Plain(tcp)), Err(e.into())),
    };
    let mut startup = read_startup(&mut stream, buf).await;
    if tls.mode == ClientTlsMode::Require && !stream.is_tls() && matches!(startup, Ok(Startup::Login(_))) {
        startup = Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "pgmux accepts only TLS connections (tls_mode = require): connect with sslmode=require",
        )
        .into());
    }
    (Some(stream), startup)
}

/// Read the startup-family packets until a StartupMessage or CancelRequest.
pub async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Startup, LoginError> {
    loop {
        let (code, mut payload) = frame::read_startup(stream, buf).await?;
        match code {
            msg::SSL_REQUEST | msg::GSSENC_REQUEST => {
                if !buf.is_empty() {
                    // Bytes pipelined after an encryption request would be
                    // read as plaintext later (CVE-2021-23214).
                    return Err(PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "received unencrypted data after SSL request",
                    )
                    .into());
                }
                stream.write_all(b"N").await?;
            }
            msg::CANCEL_REQUEST => {
                if payload.len() != 8 {
                    return Err(LoginError::Gone);
                }
                return Ok(Startup::Cancel { pid: payload.get_i32(), secret: payload.get_i32() });
            }
            version if version >> 16 == 3 => return parse_login(stream, version & 0xffff, payload).await,
            version => {
                return Err(PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                        version >> 16,
                        version & 0xffff
                    ),
                )
                .into())
            }
        }
    }
}

async fn parse_login<S: AsyncWrite + Unpin>(
    stream: &mut S,
    minor: u32,
    payload: BytesMut,
) -> Result<Startup, LoginError> {
    let pairs = msg::parse_startup_params(payload).ok_or_else(|| {
        PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "invalid startup packet layout: expected terminator as last byte")
    })?;
    let mut info = StartupInfo::default();
    let mut unsupported = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "user" => info.user = v,
            "database" => info.database = v,
            "replication" => {
                return Err(PgError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "pgmux does not proxy replication connections",
                )
                .into())
            }
            "options" => {
                let opts = msg::parse_options(&v).map_err(|e| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e))?;
                for (k, v) in opts {
                    info.params.insert(k.to_ascii_lowercase(), v);
                }
            }
            k if k.starts_with("_pq_.") => unsupported.push(k.to_string()),
            _ => {
                info.params.insert(k.to_ascii_lowercase(), v);
            }
        }
    }
    if info.user.is_empty() {
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .into());
    }
    if info.database.is_empty() {
        info.database = info.user.clone();
    }
    if minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        msg::negotiate_protocol_version(&mut out, 0, &unsupported);
        stream.write_all(&out).await?;
    }
    Ok(Startup::Login(info))
}

fn auth_failed(user: &str) -> LoginError {
    PgError::fatal(sqlstate::INVALID_PASSWORD, format!("password authentication failed for user \"{user}\"")).into()
}

/// Read the client's next PasswordMessage-family message body.
async fn read_password<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<BytesMut, LoginError> {
    let (tag, body) = frame::read_message(stream, buf, MAX_PREAUTH_LEN).await?;
    if tag != b'p' {
        return Err(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("expected password response, got message type {}", tag as char),
        )
        .into());
    }
    Ok(body)
}

fn cstr(mut body: BytesMut) -> Option<String> {
    msg::get_cstr(&mut body)
}

/// Authenticate the client. Returns the SCRAM ClientKey when SCRAM was
/// used, so the pool can log into PostgreSQL without a plain-text password.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &User,
    verifier: Option<&ScramVerifier>,
) -> Result<Option<[u8; 32]>, LoginError> {
    let mut out = BytesMut::new();
    let secret = user.secret.as_ref();
    match user.auth_method {
        AuthMethod::Trust => Ok(None),
        AuthMethod::Password => {
            msg::auth_request(&mut out, msg::AUTH_CLEARTEXT, &[]);
            stream.write_all(&out).await?;
            let body = read_password(stream, buf).await?;
            let pw = cstr(body).ok_or_else(|| auth_failed(&user.name))?;
            match secret {
                Some(s) if auth::cleartext_verify(s, &user.name, &pw) => Ok(None),
                _ => Err(auth_failed(&user.name)),
            }
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            msg::auth_request(&mut out, msg::AUTH_MD5, &salt);
            stream.write_all(&out).await?;
            let body = read_password(stream, buf).await?;
            let resp = cstr(body).ok_or_else(|| auth_failed(&user.name))?;
            match secret {
                Some(s) if auth::md5_verify(s, &user.name, salt, &resp) => Ok(None),
                _ => Err(auth_failed(&user.name)),
            }
        }
        AuthMethod::ScramSha256 => {
            let verifier = verifier.ok_or_else(|| auth_failed(&user.name))?;
            let mut server = ScramServer::new(verifier.clone());
            msg::auth_sasl(&mut out, "SCRAM-SHA-256");
            stream.write_all(&out).await?;
            let body = read_password(stream, buf).await?;
            let (mech, data) = msg::parse_sasl_initial(body)
                .ok_or_else(|| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "malformed SASLInitialResponse message"))?;
            let first = server
                .handle_client_first(&mech, &data)
                .map_err(|e| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("malformed SCRAM message: {e}")))?;
            out.clear();
            msg::auth_request(&mut out, msg::AUTH_SASL_CONTINUE, &first);
            stream.write_all(&out).await?;
            let body = read_password(stream, buf).await?;
            let (last, client_key) = server.handle_client_final(&body).map_err(|_| auth_failed(&user.name))?;
            out.clear();
            msg::auth_request(&mut out, msg::AUTH_SASL_FINAL, &last);
            stream.write_all(&out).await?;
            Ok(Some(client_key))
        }
    }
}
