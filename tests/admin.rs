//! The admin console (database `pgmux`): who may log in and do what, its
//! commands through tokio-postgres `simple_query` and psql, and clear
//! errors for everything else.

mod support;

use std::process::Command;

use support::{code, rows, text, APP, MD5USER, PWUSER};

async fn console(
    p: &pgmux::proxy::RunningProxy,
    user: (&str, &str),
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    support::connect_str(&support::conn_str(p.addr.port(), user.0, user.1, "pgmux")).await
}

async fn start() -> (pgmux::proxy::RunningProxy, String) {
    let db = support::fresh_db("admin");
    let cfg = support::config_text(&db, "", "").replacen(
        "log_level = \"warn\"\n",
        &format!("log_level = \"warn\"\nadmin_users = [\"{}\"]\nstats_users = [\"{}\"]\n", APP.0, MD5USER.0),
        1,
    );
    (support::start_proxy(&cfg).await, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_users_commands_and_errors() {
    let (p, db) = start().await;
    let admin = console(&p, APP).await.unwrap();
    let version = rows(&admin, "SHOW VERSION").await;
    assert_eq!(version, vec![vec![Some(format!("pgmux {}", env!("CARGO_PKG_VERSION")))]]);
    let dbs = rows(&admin, "show databases;").await;
    let row = dbs.iter().find(|r| r[0].as_deref() == Some(db.as_str())).expect("the database listed");
    assert_eq!(row[1].as_deref(), Some("plain"));
    assert_eq!(row[2].as_deref(), Some(support::cluster().primary.addr().as_str()));
    // Several statements, SET (ignored), an empty query.
    let both = rows(&admin, "SET application_name = 'x'; SHOW VERSION; SHOW HELP").await;
    assert!(both.len() > 2, "{both:?}");
    admin.simple_query("").await.unwrap();
    // Errors are clear and the session goes on.
    let e = admin.simple_query("FROBNICATE now").await.unwrap_err();
    assert_eq!(code(&e), "42601", "{}", text(&e));
    let e = admin.simple_query("SHOW nonsense").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    let e = admin.query("SHOW VERSION", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000", "extended protocol: {}", text(&e));
    assert_eq!(rows(&admin, "SHOW VERSION").await.len(), 1);

    // A stats user may SHOW, not change anything.
    let stats = console(&p, MD5USER).await.unwrap();
    assert_eq!(rows(&stats, "SHOW VERSION").await.len(), 1);
    let e = stats.simple_query("SHARD MOVE shop m k TO s1").await.unwrap_err();
    assert_eq!(code(&e), "42501", "{}", text(&e));
    // Anyone else cannot log in; a wrong password fails as for any client.
    let e = console(&p, PWUSER).await.unwrap_err();
    assert_eq!(code(&e), "28000", "{}", text(&e));
    let e = console(&p, (APP.0, "wrong")).await.unwrap_err();
    assert_eq!(code(&e), "28P01", "{}", text(&e));

    // psql with its default settings.
    let out = Command::new("psql")
        .env_remove("PGOPTIONS")
        .env("PGPASSWORD", APP.1)
        .args(["-h", "127.0.0.1", "-p", &p.addr.port().to_string(), "-U", APP.0, "-d", "pgmux", "-X", "-A", "-t"])
        .args(["-c", "SHOW VERSION", "-c", "SHOW DATABASES"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("pgmux "), "{stdout}");
    assert!(stdout.contains(&db), "{stdout}");
    p.stop().await;
}
