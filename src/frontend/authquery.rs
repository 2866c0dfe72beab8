//! `auth_query`: clients whose user is not in `[[users]]` are looked up on
//! the server — `auth_query` (default: `pg_shadow`) run on the primary of
//! the database they ask for, as `auth_user` — and authenticated against
//! the verifier it returns (SCRAM-SHA-256, or md5). pgmux then logs into
//! PostgreSQL for them with the client's own SCRAM proof (or the md5
//! hash), as for a `[[users]]` entry with a verifier: no password is
//! stored anywhere in pgmux.

use std::time::Duration;

use crate::config::{AuthMethod, Config, User};
use crate::protocol::auth::Secret;
use crate::protocol::tls::ServerTls;

#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("auth_query: {0}")]
    Failed(String),
}

/// The user `name` as the server knows it, or None when it does not (or
/// auth_query is not configured).
pub async fn lookup(
    config: &Config,
    tls: &ServerTls,
    database: &str,
    name: &str,
) -> Result<Option<User>, AuthQueryError> {
    let g = &config.general;
    let (Some(auth_user), Some(db)) = (g.auth_user.as_deref(), config.databases.get(database)) else { return Ok(None) };
    let (user, password) = config
        .monitor_login(auth_user)
        .ok_or_else(|| AuthQueryError::Failed(format!("no password for {auth_user}")))?;
    let addr = match db.shards.first() {
        Some(s) => s.primary.clone(),
        None => db.primary_addr(),
    };
    let dbname =
        db.shards.first().and_then(|s| s.dbname.clone()).unwrap_or_else(|| db.server_dbname(database).to_string());
    let mut pg = tokio_postgres::Config::new();
    pg.host(&addr.host).port(addr.port).user(&user).password(&password).dbname(&dbname);
    pg.application_name("pgmux-auth-query").connect_timeout(Duration::from_secs(5));
    let failed = |e: tokio_postgres::Error| AuthQueryError::Failed(e.to_string());
    let (client, task) = tls.pg_connect(&pg, None).await.map_err(failed)?;
    let rows = client.query(g.auth_query.as_str(), &[&name]).await.map_err(failed);
    drop(client);
    task.abort();
    let Some(row) = rows?.into_iter().next() else { return Ok(None) };
    let passwd: Option<String> = row.try_get(1).map_err(failed)?;
    let Some(secret) = passwd.and_then(|p| Secret::parse(&p).ok()) else { return Ok(None) };
    let auth_method = match secret {
        Secret::Md5(_) => AuthMethod::Md5,
        _ => AuthMethod::ScramSha256,
    };
    Ok(Some(User {
        name: name.to_string(),
        secret: Some(secret),
        auth_method,
        server_password: None,
        pool_mode: None,
        pool_size: None,
    }))
}
