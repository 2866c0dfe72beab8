//! The rules of a parsed config that serde cannot state: sizes and
//! timeouts in range, settings that need one another (TLS files, a CA),
//! users that other keys name, and each database's servers, lag bounds
//! and function names (its sharding keys: [`super::shards::check`]).
//! These errors name the key, not a position in the file.

use super::database::default_lag;
use super::shards;
use super::{ClientTlsMode, Config, ConfigError, Database, ServerTlsMode};

/// A key and what is wrong with it.
type Invalid = (String, String);

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Result<(), Invalid> {
    Err((key.into(), message.into()))
}

impl Config {
    pub(super) fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let at =
            |(key, message): Invalid| ConfigError::Invalid { path: origin.to_string(), line: 0, col: 0, key, message };
        self.check_process_and_pool().map_err(at)?;
        for (name, db) in &self.databases {
            self.check_database(name, db).map_err(at)?;
        }
        Ok(())
    }

    /// `[pool]` and `[pgmux]`.
    fn check_process_and_pool(&self) -> Result<(), Invalid> {
        if self.pool.default_pool_size == 0 {
            return invalid("pool.default_pool_size", "must be at least 1");
        }
        if self.pool.min_pool_size > self.pool.default_pool_size {
            return invalid("pool.min_pool_size", "must not exceed pool.default_pool_size");
        }
        let g = &self.general;
        if g.tls_mode != ClientTlsMode::Disable && (g.tls_cert_file.is_none() || g.tls_key_file.is_none()) {
            return invalid("pgmux.tls_mode", "needs tls_cert_file and tls_key_file");
        }
        if matches!(self.pool.server_tls_mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull)
            && self.pool.server_tls_ca_file.is_none()
        {
            return invalid("pool.server_tls_mode", "verify-ca and verify-full need server_tls_ca_file");
        }
        if self.general.node_id > 1023 {
            return invalid("pgmux.node_id", "must be 0 to 1023");
        }
        if self.general.max_client_conn == 0 {
            return invalid("pgmux.max_client_conn", "must be at least 1");
        }
        if self.pool.server_connect_timeout.0.is_zero() {
            return invalid("pool.server_connect_timeout", "must be greater than zero");
        }
        if let Some(u) = &self.general.auth_user {
            if self.monitor_login(u).is_none() {
                return invalid(
                    "pgmux.auth_user",
                    format!("\"{u}\" must be a [[users]] entry with a plain-text password or a server_password"),
                );
            }
        }
        for (key, list) in
            [("pgmux.admin_users", &self.general.admin_users), ("pgmux.stats_users", &self.general.stats_users)]
        {
            if let Some(u) = list.iter().find(|u| !self.users.contains_key(*u)) {
                return invalid(key, format!("\"{u}\" is not a [[users]] entry"));
            }
        }
        Ok(())
    }

    /// `[databases.NAME]`.
    fn check_database(&self, name: &str, db: &Database) -> Result<(), Invalid> {
        let key = |k: &str| format!("databases.{name}.{k}");
        if db.pool_size == Some(0) {
            return invalid(key("pool_size"), "must be at least 1");
        }
        if name == crate::ADMIN_DB {
            return invalid(format!("databases.{name}"), "this name is reserved for the admin console");
        }
        match (&db.primary, db.shards.is_empty()) {
            (Some(_), false) => return invalid(key("shards"), "give primary or shards, not both"),
            (None, true) => return invalid(key("primary"), "missing (or give shards)"),
            (None, false) if !db.replicas.is_empty() => {
                return invalid(key("replicas"), "a sharded database lists replicas per shard")
            }
            (Some(_), true) if !db.tables.is_empty() || !db.maps.is_empty() => {
                return invalid(key("tables"), "tables and maps need shards")
            }
            _ => {}
        }
        shards::check(name, db)?;
        if db.max_lag_ms.is_some() && db.max_lag != default_lag() {
            return invalid(key("max_lag_ms"), "give max_lag or max_lag_ms, not both");
        }
        if let Some(f) = db.write_functions.iter().find(|f| f.trim().is_empty() || f.contains('(')) {
            return invalid(
                key("write_functions"),
                format!("\"{f}\" is not a function name (give names without arguments)"),
            );
        }
        if let Some(m) = &db.monitor_user {
            if self.monitor_login(m).is_none() {
                return invalid(
                    key("monitor_user"),
                    format!("\"{m}\" must be a [[users]] entry with a plain-text password or a server_password"),
                );
            }
        }
        Ok(())
    }
}
