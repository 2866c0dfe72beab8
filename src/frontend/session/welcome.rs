//! The client's welcome after login: AuthenticationOk, the server's
//! ParameterStatus values (for a parameter the client set, the server's
//! spelling of the client's value), BackendKeyData and ReadyForQuery; and
//! the pid a client sees in the notifications it sends itself.

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{pool_error, Session};
use crate::backend::server::ServerError;
use crate::config::PoolMode;
use crate::frontend::cancel::{CancelGuard, CancelRegistry};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;

/// Startup parameters PostgreSQL accepts at any time; others are checked
/// against a server at login so a typo fails the login as it would there.
const KNOWN_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "search_path",
    "standard_conforming_strings",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "bytea_output",
    "geqo",
    "work_mem",
    "timezone_abbreviations",
];

impl Session {
    /// Greet the client: AuthenticationOk, ParameterStatus, BackendKeyData,
    /// ReadyForQuery; returns the registration of its cancel key. In
    /// session mode the server connection the client will use is checked
    /// out now, and the key carries its backend pid (the secret is
    /// pgmux's). Parameters outside [`KNOWN_PARAMS`] are tried on a server
    /// first so that an invalid one fails the login.
    pub async fn welcome<'r>(&mut self, cancels: &'r CancelRegistry) -> Result<CancelGuard<'r>, PgError> {
        let base = self.pool.welcome_params().await.map_err(|e| pool_error(e, false))?;
        if self.mode == PoolMode::Session {
            self.reserved = Some(self.pool.get().await.map_err(|e| pool_error(e, false))?);
        }
        let values = self.startup_values(base).await?;
        let guard = match &mut self.reserved {
            Some(server) => cancels.register_pid(server.conn().backend_pid),
            None => cancels.register(),
        };
        let (pid, secret) = guard.key();
        self.cancel = guard.slot.clone();
        self.key_pid = pid;
        let mut out = BytesMut::with_capacity(512);
        msg::auth_request(&mut out, msg::AUTH_OK, &[]);
        let mut told = BTreeMap::new();
        for (k, v) in values {
            msg::parameter_status(&mut out, &k, &v);
            told.insert(k.to_ascii_lowercase(), v);
        }
        self.told = self.pool.interned.intern(told.into());
        msg::backend_key_data(&mut out, pid, secret);
        msg::ready_for_query(&mut out, TxStatus::Idle);
        self.stream.write_all(&out).await.map_err(|e| PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string()))?;
        Ok(guard)
    }

    /// The reported parameters (`base`: the server's values) as the client
    /// is told them, as PostgreSQL itself would: for one its startup packet
    /// set, the server's spelling of the client's value (`utf8` is `UTF8`,
    /// `sql,dmy` is `SQL, DMY`). A spelling is learned from a server once
    /// per pool and value: a login whose spellings are known costs no
    /// round trip (unless it sets parameters outside [`KNOWN_PARAMS`]).
    async fn startup_values(&mut self, base: Vec<(String, String)>) -> Result<Vec<(String, String)>, PgError> {
        let mut learn = false;
        let mut values = Vec::with_capacity(base.len());
        for (k, v) in base {
            let told = match self.wanted.get(&k.to_ascii_lowercase()) {
                None => Some(v),
                Some(w) if *w == v || kept_as_is(&k, w) => Some(w.clone()),
                Some(w) => self.pool.spelling(&k.to_ascii_lowercase(), w),
            };
            learn |= told.is_none();
            values.push((k, told));
        }
        if learn || self.wanted.keys().any(|k| !KNOWN_PARAMS.contains(&k.as_str())) {
            let reported = self.try_settings(learn).await?;
            for (k, told) in values.iter_mut().filter(|(_, told)| told.is_none()) {
                let lk = k.to_ascii_lowercase();
                let wanted = self.wanted.get(&lk).cloned().unwrap_or_default();
                *told = Some(match reported.get(k.as_str()) {
                    Some(spelled) => {
                        self.pool.learn_spelling(&lk, &wanted, spelled);
                        spelled.clone()
                    }
                    None => wanted,
                });
            }
        }
        Ok(values.into_iter().map(|(k, told)| (k, told.unwrap_or_default())).collect())
    }

    /// Apply the client's settings on a server connection (the one
    /// reserved in session mode, else one borrowed for this) and return
    /// what the server reports then; an invalid setting fails the login.
    /// With `fresh`, the settings are applied over the server's defaults,
    /// as at a direct login: DateStyle `sql` keeps the default day order,
    /// not the one a previous client set on that connection.
    async fn try_settings(&mut self, fresh: bool) -> Result<BTreeMap<String, String>, PgError> {
        let keep = self.reserved.is_some();
        let mut server = match self.reserved.take() {
            Some(server) => server,
            None => self.pool.get().await.map_err(|e| pool_error(e, false))?,
        };
        let conn = server.conn();
        conn.needs_reset |= fresh && !conn.applied.is_empty();
        match conn.sync_params(&self.wanted).await {
            Ok(()) => {}
            Err(ServerError::Query(body)) => {
                server.release();
                return Err(PgError::fatal_from_server(&body));
            }
            Err(e) => return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string())),
        }
        let reported = conn.reported.clone();
        if keep {
            self.reserved = Some(server);
        } else {
            server.release();
        }
        Ok(reported)
    }
}

/// Values the server reports exactly as the client wrote them:
/// application_name in printable ASCII (PostgreSQL replaces or escapes
/// only other bytes). Spares a round trip for the many names clients use.
fn kept_as_is(name: &str, value: &str) -> bool {
    name.eq_ignore_ascii_case("application_name") && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A NotificationResponse body that came from the client's own server
/// connection (`pids.0`: its backend pid; the client notified itself),
/// rewritten to carry the pid of the client's BackendKeyData (`pids.1`),
/// as it would from PostgreSQL itself. `None` for a notification from
/// another session (it keeps the sender's pid), or when the pids agree
/// (session mode).
pub(super) fn own_notification(body: &[u8], pids: (i32, i32)) -> Option<BytesMut> {
    let (own, told) = pids;
    let pid = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    if pid != own || own == told {
        return None;
    }
    let mut out = BytesMut::with_capacity(5 + body.len());
    let at = msg::start_message(&mut out, b'A');
    out.put_i32(told);
    out.extend_from_slice(&body[4..]);
    msg::finish_message(&mut out, at);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{kept_as_is, own_notification};

    #[test]
    fn own_notifications_carry_the_key_pid() {
        let mut body = 42i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"chan\0payload\0");
        let out = own_notification(&body, (42, 7)).expect("rewritten");
        assert_eq!(&out[..1], b"A");
        assert_eq!(i32::from_be_bytes(out[1..5].try_into().unwrap()) as usize, 4 + body.len());
        assert_eq!(&out[5..9], &7i32.to_be_bytes());
        assert_eq!(&out[9..], &body[4..]);
        assert!(own_notification(&body, (43, 7)).is_none(), "another session's");
        assert!(own_notification(&body, (42, 42)).is_none(), "session mode");
        assert!(own_notification(b"\0\0", (0, 7)).is_none(), "short body");
    }

    #[test]
    fn printable_application_names_are_kept() {
        assert!(kept_as_is("application_name", "psql 15 (x)"));
        assert!(!kept_as_is("application_name", "caf\u{e9}"));
        assert!(!kept_as_is("TimeZone", "utc"));
    }
}
