//! The admin console: the virtual database `pgmux` on the client port
//! (`psql -p 6432 -U admin pgmux`), for the users in `admin_users` (every
//! command) and `stats_users` (SHOW only), logged in like any client.
//!
//! It speaks the simple query protocol (psql, tokio-postgres
//! `simple_query`); each statement of a Query is a [`command::Command`],
//! answered with a result set ([`table::Table`]) or a command tag.
//! Extended-protocol messages get `0A000` up to their Sync.

pub mod command;
pub mod show;
pub mod table;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::ops::control::ControlError;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::{self, MAX_MESSAGE_LEN};
use crate::protocol::messages::TxStatus;
use crate::protocol::messages::{self as msg, split_nul};
use crate::protocol::tls::ClientStream;
use crate::proxy::Proxy;
use crate::shard::mover::{self, MoveError, MoveRequest};
use command::Command;
use table::{v, Table, Type};

/// What a console user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every command.
    Admin,
    /// SHOW only.
    Stats,
}

/// The answer to one command.
enum Reply {
    Rows(Table, String),
    Tag(String),
    Empty,
}

/// Serve a console session after its login.
pub async fn serve(proxy: Arc<Proxy>, mut stream: ClientStream, mut buf: BytesMut, role: Role, key: (i32, i32)) {
    let mut out = BytesMut::new();
    msg::auth_request(&mut out, msg::AUTH_OK, &[]);
    let version = format!("15.0 (pgmux {})", env!("CARGO_PKG_VERSION"));
    for (k, val) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgmux"),
    ] {
        msg::parameter_status(&mut out, k, val);
    }
    msg::backend_key_data(&mut out, key.0, key.1);
    msg::ready_for_query(&mut out, TxStatus::Idle);
    if stream.write_all(&out).await.is_err() {
        return;
    }
    // An extended-protocol batch was refused: ignore up to its Sync.
    let mut skipping = false;
    loop {
        let Ok((tag, body)) = frame::read_message(&mut stream, &mut buf, MAX_MESSAGE_LEN).await else { return };
        let mut out = BytesMut::new();
        match tag {
            b'Q' => {
                let sql = String::from_utf8_lossy(split_nul(&body).0).into_owned();
                run_query(&proxy, role, &sql, &mut out).await;
            }
            b'X' => return,
            b'S' => {
                skipping = false;
                msg::ready_for_query(&mut out, TxStatus::Idle);
            }
            b'P' | b'B' | b'D' | b'E' | b'H' | b'C' | b'F' if !skipping => {
                skipping = true;
                let e = PgError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgmux admin console speaks the simple query protocol only",
                );
                e.encode(&mut out);
            }
            b'P' | b'B' | b'D' | b'E' | b'H' | b'C' | b'F' | b'd' | b'c' | b'f' => {}
            other => {
                let e = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid frontend message type {other}"));
                let _ = stream.write_all(&e.to_bytes()).await;
                return;
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Run each statement of a Query; stop at the first error.
async fn run_query(proxy: &Arc<Proxy>, role: Role, sql: &str, out: &mut BytesMut) {
    let stmts = command::statements(sql);
    if stmts.is_empty() {
        out.extend_from_slice(b"I\0\0\0\x04");
    }
    for s in stmts {
        let reply = match command::parse(s) {
            Ok(cmd) if cmd.is_admin() && role != Role::Admin => Err(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "pgmux: this user may only use SHOW (stats_users); changes need admin_users",
            )),
            Ok(cmd) => execute(proxy, cmd).await,
            Err(e) => Err(e),
        };
        match reply {
            Ok(Reply::Rows(t, tag)) => t.encode(out, &tag),
            Ok(Reply::Tag(tag)) => {
                let at = msg::start_message(out, b'C');
                out.extend_from_slice(tag.as_bytes());
                out.extend_from_slice(b"\0");
                msg::finish_message(out, at);
            }
            Ok(Reply::Empty) => out.extend_from_slice(b"I\0\0\0\x04"),
            Err(e) => {
                e.encode(out);
                break;
            }
        }
    }
    msg::ready_for_query(out, TxStatus::Idle);
}

async fn execute(proxy: &Arc<Proxy>, cmd: Command) -> Result<Reply, PgError> {
    match cmd {
        Command::Empty => Ok(Reply::Empty),
        Command::Set => Ok(Reply::Tag("SET".into())),
        Command::Show(what) => Ok(Reply::Rows(show::show(proxy, &what).await?, "SHOW".into())),
        Command::ShardMove { database, map, key, to, grace } => {
            let req = MoveRequest { database, map, key, to, grace };
            let moved = mover::move_key(&proxy.config(), &req).await.map_err(move_error)?;
            let mut t = Table::new(&[("moved_rows", Type::Int8)]);
            t.row(vec![v(moved)]);
            Ok(Reply::Rows(t, "SHARD MOVE".into()))
        }
        other => operate(proxy, other).await,
    }
}

/// How long PAUSE waits for running transactions.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn control_error(e: ControlError) -> PgError {
    let code = match e {
        ControlError::NoDatabase(_) => sqlstate::INVALID_CATALOG_NAME,
        ControlError::NoReplica(_) => sqlstate::UNDEFINED_OBJECT,
        ControlError::Timeout(_) => sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
    };
    PgError::error(code, format!("pgmux: {e}"))
}

async fn operate(proxy: &Arc<Proxy>, cmd: Command) -> Result<Reply, PgError> {
    let tag = |t: &str| Ok(Reply::Tag(t.into()));
    match cmd {
        Command::Pause(db) => match proxy.pause(db.as_deref(), PAUSE_WAIT).await {
            Err(ControlError::Timeout(_)) => Err(PgError::error(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pgmux: paused, but transactions are still running after 60 s (RESUME to let new ones in)",
            )),
            r => r.map_err(control_error).and_then(|()| tag("PAUSE")),
        },
        Command::Resume(db) => proxy.resume(db.as_deref()).map_err(control_error).and_then(|()| tag("RESUME")),
        Command::Kill(db) => proxy.kill(&db).map_err(control_error).and_then(|_| tag("KILL")),
        Command::Reconnect(db) => proxy.reconnect(db.as_deref()).map_err(control_error).and_then(|()| tag("RECONNECT")),
        Command::Ban(r, on) => {
            proxy.ban(&r, on).map_err(control_error).and_then(|()| tag(if on { "BAN" } else { "UNBAN" }))
        }
        Command::Reload => match proxy.reload() {
            Ok(()) => tag("RELOAD"),
            Err(e) => Err(PgError::error(sqlstate::CONFIG_FILE_ERROR, format!("pgmux: config not reloaded: {e}"))),
        },
        Command::Shutdown => {
            proxy.request_shutdown();
            tag("SHUTDOWN")
        }
        other => Err(PgError::error(sqlstate::INTERNAL_ERROR, format!("pgmux: {other:?} is not an operation"))),
    }
}

fn move_error(e: MoveError) -> PgError {
    let code = match &e {
        MoveError::Config(_) => sqlstate::INVALID_PARAMETER_VALUE.to_string(),
        MoveError::Db { source, .. } => {
            source.code().map_or(sqlstate::CONNECTION_FAILURE.to_string(), |c| c.code().to_string())
        }
    };
    PgError::error(code, format!("pgmux: shard move: {e}"))
}
