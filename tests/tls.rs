//! TLS on both sides: psql with `sslmode=require` through pgmux
//! (`tls_mode = require` refuses plain text), SCRAM over TLS, and pgmux
//! to a PostgreSQL started with `ssl = on` (a primary and a replica) —
//! verify-full against the test CA (the lag monitor's connections too),
//! refused with another CA, require without checks.

mod support;

use std::process::Command;

use pgmux_testkit::{free_port, make_certs, Cluster, ClusterSpec, HbaMethod, Role};
use support::APP;

fn psql(port: u16, sslmode: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .env_remove("PGOPTIONS")
        .env("PGPASSWORD", APP.1)
        .env("PGCONNECT_TIMEOUT", "10")
        .arg(format!("host=127.0.0.1 port={port} user={} dbname=app sslmode={sslmode}", APP.0))
        .args(["-X", "-A", "-t", "-c", sql])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.trim().to_string())
}

fn config(c: &Cluster, certs: &pgmux_testkit::Certs, server_mode: &str, ca: &std::path::Path) -> String {
    format!(
        r#"[pgmux]
listen = "127.0.0.1:{port}"
log_level = "warn"
tls_mode = "require"
tls_cert_file = "{cert}"
tls_key_file = "{key}"

[pool]
server_tls_mode = "{server_mode}"
server_tls_ca_file = "{ca}"

[[users]]
name = "{user}"
password = "{pw}"

[databases.app]
primary = "{primary}"
replicas = ["{replica}"]
monitor_user = "{user}"
check_interval = "100ms"
"#,
        port = free_port().unwrap(),
        cert = certs.cert.display(),
        key = certs.key.display(),
        ca = ca.display(),
        user = APP.0,
        pw = APP.1,
        primary = c.primary.addr(),
        replica = c.replicas[0].addr(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_clients_and_to_servers() {
    let spec = ClusterSpec {
        roles: vec![Role::new(APP.0, APP.1, HbaMethod::Scram)],
        databases: vec!["app".into()],
        replicas: 1,
        tls: true,
        ..ClusterSpec::default()
    };
    let c = Cluster::start(&spec).expect("a primary with ssl = on");
    let dir = tempfile::tempdir().unwrap();
    let mine = make_certs(dir.path(), "localhost").unwrap();

    // verify-full against the CA that signed the server's certificate.
    let p = support::start_proxy(&config(&c, &mine, "verify-full", &c.tls_ca(&c.primary))).await;
    let port = p.addr.port();
    let (ok, out) = psql(port, "require", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert!(ok && out == "t", "pgmux to the server over TLS: {out}");
    // The client's own connection is TLS too (and SCRAM ran over it).
    let (ok, out) = psql(port, "require", "\\conninfo");
    assert!(ok && out.contains("SSL connection"), "{out}");
    let (ok, out) = psql(port, "disable", "SELECT 1");
    assert!(!ok && out.contains("tls_mode = require"), "plain text refused: {out}");
    // The lag monitor's own connections use TLS too.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let monitor_ssl = "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                       WHERE a.application_name = 'pgmux-monitor'";
    assert_eq!(c.psql(&c.primary, "postgres", monitor_ssl).unwrap(), "t");
    assert_eq!(c.psql(&c.replicas[0], "postgres", monitor_ssl).unwrap(), "t");
    p.stop().await;

    // Another CA: the server's certificate is refused, the client told why.
    let other = tempfile::tempdir().unwrap();
    let stranger = make_certs(other.path(), "localhost").unwrap();
    let p = support::start_proxy(&config(&c, &mine, "verify-ca", &stranger.ca)).await;
    let (ok, out) = psql(p.addr.port(), "require", "SELECT 1");
    assert!(!ok && out.to_lowercase().contains("certificate"), "{out}");
    p.stop().await;

    // require: encrypted, certificate not checked.
    let p = support::start_proxy(&config(&c, &mine, "require", &stranger.ca)).await;
    let (ok, out) = psql(p.addr.port(), "require", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert!(ok && out == "t", "{out}");
    p.stop().await;
}
