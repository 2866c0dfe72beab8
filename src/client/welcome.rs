//! The client's welcome after login: AuthenticationOk, the server's
//! ParameterStatus values (with the client's own settings), BackendKeyData
//! and ReadyForQuery.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{pool_error, Session};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages as msg;
use crate::server::ServerError;

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
    /// ReadyForQuery. Parameters outside [`KNOWN_PARAMS`] are tried on a
    /// server first so that an invalid one fails the login.
    pub async fn welcome(&mut self, key: (i32, i32)) -> Result<(), PgError> {
        let base = self.pool.welcome_params().await.map_err(|e| pool_error(e, false))?;
        if self.wanted.keys().any(|k| !KNOWN_PARAMS.contains(&k.as_str())) {
            let mut c = self.pool.get().await.map_err(|e| pool_error(e, false))?;
            match c.conn().sync_params(&self.wanted).await {
                Ok(_) => c.release(),
                Err(ServerError::Query(body)) => {
                    c.release();
                    return Err(PgError::fatal_from_server(&body));
                }
                Err(e) => return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string())),
            }
        }
        let mut out = BytesMut::with_capacity(512);
        msg::auth_request(&mut out, msg::AUTH_OK, &[]);
        for (k, v) in base {
            let lk = k.to_ascii_lowercase();
            let v = self.wanted.get(&lk).cloned().unwrap_or(v);
            msg::parameter_status(&mut out, &k, &v);
            self.told.insert(lk, v);
        }
        msg::backend_key_data(&mut out, key.0, key.1);
        msg::ready_for_query(&mut out, b'I');
        self.stream.write_all(&out).await.map_err(|e| PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string()))
    }
}
