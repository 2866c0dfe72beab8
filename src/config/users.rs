//! `[[users]]`: who may connect and how (auth method, password or the
//! verifier PostgreSQL stores), checked as they are read so that errors
//! point at the entry; and the login pgmux itself uses as one of them
//! (the lag monitor, `auth_query`, shard directories).

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::{Config, ConfigError, PoolMode};
use crate::protocol::auth::Secret;

/// How pgmux authenticates connecting clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "password")]
    Password,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUser {
    name: Spanned<String>,
    #[serde(default)]
    password: Option<Spanned<String>>,
    #[serde(default = "default_auth")]
    auth_method: Spanned<AuthMethod>,
    #[serde(default)]
    server_password: Option<String>,
    #[serde(default)]
    pool_mode: Option<PoolMode>,
    #[serde(default)]
    pool_size: Option<usize>,
}

fn default_auth() -> Spanned<AuthMethod> {
    Spanned::new(0..0, AuthMethod::ScramSha256)
}

/// `[[users]]`: who may connect, and how pgmux logs in for them.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    /// Plain text or a verifier (md5 / SCRAM) as pg_authid stores it.
    pub secret: Option<Secret>,
    pub auth_method: AuthMethod,
    /// Password for PostgreSQL when it differs from `password`.
    pub server_password: Option<String>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
}

/// The `[[users]]` entries by name; `invalid` builds an error at a span
/// of the file.
pub(super) fn resolve(
    raw: Vec<RawUser>,
    invalid: impl Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<BTreeMap<String, User>, ConfigError> {
    let mut users = BTreeMap::new();
    for (i, u) in raw.into_iter().enumerate() {
        let key = format!("users[{i}]");
        let name = u.name.get_ref().clone();
        if name.is_empty() {
            return Err(invalid(u.name.span(), &format!("{key}.name"), "must not be empty".into()));
        }
        let method = *u.auth_method.get_ref();
        let secret = match &u.password {
            Some(p) => Some(
                Secret::parse(p.get_ref()).map_err(|e| invalid(p.span(), &format!("{key}.password"), e.to_string()))?,
            ),
            None => None,
        };
        let span = u.password.as_ref().map(|p| p.span()).unwrap_or(u.name.span());
        match (method, &secret) {
            (AuthMethod::Trust, _) => {}
            (_, None) => {
                return Err(invalid(span, &format!("{key}.password"), format!("user \"{name}\" needs a password for this auth_method")))
            }
            (AuthMethod::ScramSha256, Some(Secret::Md5(_))) => {
                return Err(invalid(span, &format!("{key}.password"), "an md5 hash cannot verify SCRAM-SHA-256; give the password or its SCRAM verifier, or use auth_method = \"md5\"".into()))
            }
            (AuthMethod::Md5, Some(Secret::Scram(_))) => {
                return Err(invalid(span, &format!("{key}.password"), "a SCRAM verifier cannot verify md5; give the password or its md5 hash, or use auth_method = \"scram-sha-256\"".into()))
            }
            _ => {}
        }
        if u.pool_size == Some(0) {
            return Err(invalid(u.name.span(), &format!("{key}.pool_size"), "must be at least 1".into()));
        }
        let user = User {
            name: name.clone(),
            secret,
            auth_method: method,
            server_password: u.server_password,
            pool_mode: u.pool_mode,
            pool_size: u.pool_size,
        };
        if users.insert(name.clone(), user).is_some() {
            return Err(invalid(u.name.span(), &format!("{key}.name"), format!("user \"{name}\" is listed twice")));
        }
    }
    Ok(users)
}

impl Config {
    /// (user, password) the lag monitor logs in with.
    pub fn monitor_login(&self, name: &str) -> Option<(String, String)> {
        let u = self.users.get(name)?;
        let pw = match (&u.server_password, &u.secret) {
            (Some(p), _) => p.clone(),
            (None, Some(Secret::Plain(p))) => p.clone(),
            _ => return None,
        };
        Some((u.name.clone(), pw))
    }
}
