//! Moving one key of a `directory` map to another shard (`pgmux shard
//! move`): every row of the key in the map's tables goes to the target
//! shard, and the directory entry switches, while pgmux holds new
//! transactions for the key.
//!
//! 1. The directory entry is marked `moving` (its NOTIFY drops it from
//!    every pgmux's cache; lookups of a moving key wait).
//! 2. After a grace period (transactions that resolved the key just before
//!    get to start), the source shard locks the map's tables against
//!    writes (`SHARE ROW EXCLUSIVE`), which waits for the transactions
//!    already writing them.
//! 3. The key's rows are copied to the target shard (`COPY`, committed),
//!    deleted on the source (committed), and the entry switches to the
//!    target shard, no longer moving.
//!
//! A failure before the target commits changes nothing; after it, the
//! copies are deleted from the target again (best effort) and the entry
//! stays on the source.
//!
//! A move that died part-way (the process killed) leaves the key marked
//! moving — its transactions wait — until the move is run again, which
//! finishes it: the copy first deletes whatever rows of the key the
//! target holds (the directory names the source, so they can only be an
//! earlier attempt's copies), so no row is ever doubled.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::protocol::tls::ServerTls;

use crate::config::{Config, Database, MapConfig};
use crate::protocol::messages::quote_literal;

/// What to move.
#[derive(Clone, Debug)]
pub struct MoveRequest {
    pub database: String,
    pub map: String,
    pub key: String,
    /// Target shard name.
    pub to: String,
    /// How long to wait after marking the key moving.
    pub grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Db { what: String, source: tokio_postgres::Error },
}

fn db_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> MoveError + '_ {
    move |source| MoveError::Db { what: what.to_string(), source }
}

/// A connection as `server_tls_mode` says, for one move.
struct Connector {
    tls: ServerTls,
    user: String,
    password: String,
}

impl Connector {
    async fn connect(&self, host: &str, port: u16, dbname: &str) -> Result<Client, MoveError> {
        let mut pg = tokio_postgres::Config::new();
        pg.host(host).port(port).user(&self.user).password(&self.password).dbname(dbname);
        pg.application_name("pgmux-shard-move").connect_timeout(Duration::from_secs(10));
        Ok(self.tls.pg_connect(&pg, None).await.map_err(db_err("connect"))?.0)
    }
}

/// Move `req.key`; returns the number of rows moved (0 when the key is
/// already on the target shard).
pub async fn move_key(config: &Config, req: &MoveRequest) -> Result<u64, MoveError> {
    let bad = |m: String| MoveError::Config(m);
    let db: &Database =
        config.databases.get(&req.database).ok_or_else(|| bad(format!("no database {}", req.database)))?;
    let Some(MapConfig::Directory { backend, dbname, table, user, .. }) = db.maps.get(&req.map) else {
        return Err(bad(format!("{} is not a directory map of {}", req.map, req.database)));
    };
    let login = user.as_deref().or(db.monitor_user.as_deref()).and_then(|u| config.monitor_login(u));
    let (user, password) = login.ok_or_else(|| bad("the directory's user needs a usable password".into()))?;
    let shard = |name: &str| db.shards.iter().find(|s| s.name == name);
    let target = shard(&req.to).ok_or_else(|| bad(format!("no shard {}", req.to)))?;
    let tables: Vec<(&str, &str)> =
        db.tables.iter().filter(|t| t.map == req.map).map(|t| (t.name.as_str(), t.key.as_str())).collect();
    let dir_db = dbname.clone().unwrap_or_else(|| db.server_dbname(&req.database).to_string());
    let tls = ServerTls::new(config.pool.server_tls_mode, config.pool.server_tls_ca_file.as_deref())
        .map_err(|e| bad(e.to_string()))?;
    let conn = Connector { tls, user, password };
    let dir = conn.connect(&backend.host, backend.port, &dir_db).await?;
    let t = table;
    let row = dir
        .query_opt(&format!("SELECT shard FROM {t} WHERE map = $1 AND key = $2"), &[&req.map, &req.key])
        .await
        .map_err(db_err("directory lookup"))?;
    let from_name: String =
        row.map(|r| r.get(0)).ok_or_else(|| bad(format!("key {} is not in the directory", req.key)))?;
    if from_name == req.to {
        return Ok(0);
    }
    let source = shard(&from_name).ok_or_else(|| bad(format!("the directory names unknown shard {from_name}")))?;
    let shard_db =
        |s: &crate::config::Shard| s.dbname.clone().unwrap_or_else(|| db.server_dbname(&req.database).to_string());
    let src = conn.connect(&source.primary.host, source.primary.port, &shard_db(source)).await?;
    let dst = conn.connect(&target.primary.host, target.primary.port, &shard_db(target)).await?;
    let mark = format!("UPDATE {t} SET moving = $3 WHERE map = $1 AND key = $2");
    dir.execute(&mark, &[&req.map, &req.key, &true]).await.map_err(db_err("mark moving"))?;
    tokio::time::sleep(req.grace).await;
    let moved = copy_rows(&src, &dst, &tables, &req.key).await;
    let result = match moved {
        Ok(n) => {
            let switch = format!("UPDATE {t} SET shard = $3, moving = false WHERE map = $1 AND key = $2");
            dir.execute(&switch, &[&req.map, &req.key, &req.to]).await.map(|_| n).map_err(db_err("switch directory"))
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = dir.execute(&mark, &[&req.map, &req.key, &false]).await;
    }
    result
}

/// Lock, copy, commit on the target, delete and commit on the source.
async fn copy_rows(src: &Client, dst: &Client, tables: &[(&str, &str)], key: &str) -> Result<u64, MoveError> {
    let lit = quote_literal(key);
    src.batch_execute("BEGIN").await.map_err(db_err("begin on the source"))?;
    let locked = async {
        for (table, _) in tables {
            src.batch_execute(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")).await?;
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    if let Err(e) = locked.await {
        let _ = src.batch_execute("ROLLBACK").await;
        return Err(db_err("lock on the source")(e));
    }
    let copied = async {
        dst.batch_execute("BEGIN").await?;
        let mut total = 0u64;
        for (table, col) in tables {
            // An interrupted earlier attempt's copies.
            dst.batch_execute(&format!("DELETE FROM {table} WHERE {col} = {lit}")).await?;
            let out = src.copy_out(&format!("COPY (SELECT * FROM {table} WHERE {col} = {lit}) TO STDOUT")).await?;
            pin_mut!(out);
            let mut data = Vec::new();
            while let Some(chunk) = out.next().await {
                data.extend_from_slice(&chunk?);
            }
            let sink = dst.copy_in(&format!("COPY {table} FROM STDIN")).await?;
            pin_mut!(sink);
            sink.send(Bytes::from(data)).await?;
            total += sink.finish().await?;
        }
        dst.batch_execute("COMMIT").await?;
        Ok::<u64, tokio_postgres::Error>(total)
    };
    let total = match copied.await {
        Ok(n) => n,
        Err(e) => {
            let _ = dst.batch_execute("ROLLBACK").await;
            let _ = src.batch_execute("ROLLBACK").await;
            return Err(db_err("copy to the target")(e));
        }
    };
    let deleted = async {
        for (table, col) in tables {
            src.batch_execute(&format!("DELETE FROM {table} WHERE {col} = {lit}")).await?;
        }
        src.batch_execute("COMMIT").await
    };
    if let Err(e) = deleted.await {
        let _ = src.batch_execute("ROLLBACK").await;
        for (table, col) in tables {
            let _ = dst.batch_execute(&format!("DELETE FROM {table} WHERE {col} = {lit}")).await;
        }
        return Err(db_err("delete on the source")(e));
    }
    Ok(total)
}
