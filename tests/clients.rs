//! End to end with the stock PostgreSQL tools: psql and pgbench through
//! pgmux, and the pgmux command line itself.

mod support;

use std::process::Command;

use support::{scalar, APP};

fn tool(name: &str) -> Command {
    let mut cmd = Command::new(name);
    for v in ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGOPTIONS", "PGSSLMODE"] {
        cmd.env_remove(v);
    }
    cmd.env("PGPASSWORD", APP.1).env("PGCONNECT_TIMEOUT", "10");
    cmd
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_through_pgmux() {
    let db = support::fresh_db("e2e_tools");
    let p = support::proxy(&db, "default_pool_size = 4").await;
    let port = p.addr.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", &port, "-U", APP.0];
    // psql: multi-statement, \copy both ways, variables, errors.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("in.csv");
    std::fs::write(&csv, (1..=500).map(|i| format!("{i},name {i}\n")).collect::<String>()).unwrap();
    let out_csv = dir.path().join("out.csv");
    let script = format!(
        "CREATE TABLE people (id int primary key, name text);\n\\copy people FROM '{}' WITH (FORMAT csv)\nSELECT count(*) AS n FROM people \\gset\n\\echo rows=:n\n\\copy (SELECT * FROM people WHERE id <= 10 ORDER BY id) TO '{}' WITH (FORMAT csv)\n",
        csv.display(),
        out_csv.display()
    );
    let text = run(tool("psql").args(base).args([
        "-d",
        &db,
        "-X",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "SELECT 1 AS one; SELECT 2 AS two",
    ]));
    assert!(text.contains("one") && text.contains("two"), "{text}");
    let script_file = dir.path().join("script.sql");
    std::fs::write(&script_file, script).unwrap();
    let text = run(tool("psql")
        .args(base)
        .args(["-d", &db, "-X", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&script_file)
        .env("PGAPPNAME", "psql-e2e"));
    assert!(text.contains("rows=500"), "{text}");
    let copied = std::fs::read_to_string(&out_csv).unwrap();
    assert_eq!(copied.lines().count(), 10);
    assert!(copied.starts_with("1,name 1\n"));
    let out = tool("psql").args(base).args(["-d", &db, "-X", "-c", "SELECT * FROM no_such_table"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // pgbench: initialize through pgmux (COPY, DDL) and run simple and
    // extended protocol with more clients than server connections.
    run(tool("pgbench").args(base).args(["-i", "-s", "1", "-q", &db]));
    for mode in ["simple", "extended"] {
        let text = run(tool("pgbench").args(base).args(["-c", "12", "-j", "2", "-T", "3", "-M", mode, "-n", &db]));
        assert!(text.contains("number of failed transactions: 0"), "{mode}: {text}");
        let tps: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
            .expect("tps line");
        assert!(tps > 50.0, "{mode}: {tps} tps");
    }
    let direct = support::direct(&db).await;
    assert!(support::backends(&direct, &db).await <= 4);
    assert_eq!(scalar(&direct, "SELECT count(*) FROM pgbench_accounts").await, "100000");
    p.stop().await;
}

fn pgmux() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgmux"))
}

#[test]
fn cli_help_and_check_config() {
    let text = run(pgmux().arg("--help"));
    assert!(text.contains("check-config") && text.contains("demo") && text.contains("--config"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgmux.toml"), &good).unwrap();
    let text = run(pgmux().arg("check-config").arg(&good));
    assert!(text.contains("ok"), "{text}");
    let text = run(pgmux().arg("check-config").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sharded.toml")));
    assert!(text.contains("ok"), "{text}");
    // The resolved topology: shards, their replicas and read routing, maps, tables.
    for line in [
        "database shop: 2 shards",
        "cross-shard writes allowed, two-phase commit",
        "  shard s0 [0] -> shop on shard0:5432",
        "    replicas: shard1-replica:5432 (weight 1)",
        "(round_robin), primary reads fallback",
        "  map by_tenant: directory of text in table pgmux_directory on directory:5432/directory",
        "  table orders sharded by user_id (by_user)",
        "  reference tables (any shard reads): countries",
        "users: app (scram-sha-256)",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pool]\ndefault_pool_size = \"many\"\n").unwrap();
    let out = pgmux().arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("default_pool_size"), "{err}");
    let out = pgmux().args(["--config", "/nonexistent/pgmux.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// A running `pgmux demo` (with `args`): the child, the lines it printed
/// before its psql line (and, last, the path of its log), and the URL of
/// that line.
fn start_demo(args: &[&str]) -> (std::process::Child, Vec<String>, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    // Its log goes to a file, shown when a check fails.
    let log = std::env::temp_dir().join(format!("pgmux-demo-{}-{}.log", std::process::id(), args.len()));
    let stderr = std::fs::File::create(&log).map(Stdio::from).unwrap_or_else(|_| Stdio::null());
    let mut child = pgmux().arg("demo").args(args).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        if let Some(url) = line.trim_start().strip_prefix("psql ") {
            let url = url.trim().trim_matches('"').to_string();
            // Keep reading: the demo (and its log) writes on.
            std::thread::spawn(move || lines.for_each(drop));
            seen.push(log.display().to_string());
            return (child, seen, url);
        }
        seen.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no psql line in demo output: {seen:?}");
}

/// Stop the demo with Ctrl-C: it exits cleanly and leaves no data dir.
fn stop_demo(mut child: std::process::Child, seen: &[String]) {
    let dirs: Vec<String> =
        seen.iter().filter_map(|l| Some(l.split("(data in ").nth(1)?.trim_end_matches("):").to_string())).collect();
    assert!(!dirs.is_empty(), "{seen:?}");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for d in dirs {
        assert!(!std::path::Path::new(&d).exists(), "{d} left behind");
    }
    if let Some(log) = seen.last() {
        let _ = std::fs::remove_file(log);
    }
}

fn psql_at(url: &str, sql: &str) -> String {
    run(tool("psql").arg(url).args(["-X", "-A", "-t", "-c", sql])).trim().to_string()
}

#[test]
fn demo_brings_up_a_replicated_topology_and_tears_it_down() {
    let port = pgmux_testkit::free_port().unwrap();
    let (child, seen, url) = start_demo(&["--port", &port.to_string()]);
    let replicas: Vec<String> =
        seen.iter().filter_map(|l| l.trim().strip_prefix("replica")).map(|a| a.trim().to_string()).collect();
    assert_eq!(replicas.len(), 2, "{seen:?}");
    assert!(url.contains(&format!(":{port}/")), "{url}");
    // Reads go to the replicas, writes (and hinted statements) to the primary.
    assert_eq!(psql_at(&url, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(psql_at(&url, "/* pgmux: primary */ SELECT pg_is_in_recovery()"), "f");
    for r in &replicas {
        let (host, rport) = r.rsplit_once(':').unwrap();
        let out = run(tool("psql")
            .args(["-h", host, "-p", rport, "-U", "demo", "-d", "demo", "-X", "-A", "-t", "-c"])
            .arg("SELECT pg_is_in_recovery()")
            .env("PGPASSWORD", "demo"));
        assert_eq!(out.trim(), "t", "replica {r}");
    }
    stop_demo(child, &seen);
}

#[test]
fn sharded_demo_serves_the_tour() {
    let port = pgmux_testkit::free_port().unwrap();
    let (child, seen, url) = start_demo(&["--sharded", "--port", &port.to_string()]);
    let primaries: Vec<String> =
        seen.iter().filter_map(|l| l.trim().strip_prefix("primary")).map(|a| a.trim().to_string()).collect();
    let replicas = seen.iter().filter(|l| l.trim().starts_with("replica")).count();
    assert_eq!((primaries.len(), replicas), (2, 2), "{seen:?}");
    // The tour's statements: a keyed read on its shard (a replica), reads
    // across shards merged, a multi-row insert split, ids made by the
    // shards, the console's view of the shards.
    let port_of =
        |id: i64| psql_at(&url, &format!("/* pgmux: primary */ SELECT inet_server_port() FROM users WHERE id = {id}"));
    let shard_ports: Vec<String> = primaries.iter().map(|p| p.rsplit_once(':').unwrap().1.to_string()).collect();
    assert!(shard_ports.contains(&port_of(1)) && shard_ports.contains(&port_of(2)), "{shard_ports:?}");
    assert_eq!(psql_at(&url, "SELECT count(*), avg(score) FROM users"), "5|3.6000000000000000");
    assert_eq!(psql_at(&url, "SELECT pg_is_in_recovery() FROM users WHERE id = 2"), "t");
    let inserted = psql_at(&url, "INSERT INTO users (id, name) VALUES (10, 'x'), (11, 'y'), (12, 'z')");
    assert_eq!(inserted, "INSERT 0 3");
    let id = psql_at(&url, "INSERT INTO users (name) VALUES ('fay') RETURNING id");
    let id = id.lines().next().unwrap_or_default().to_string();
    assert_eq!(psql_at(&url, &format!("/* pgmux: primary */ SELECT name FROM users WHERE id = {id}")), "fay");
    assert_eq!(
        psql_at(&url, "SELECT string_agg(name, ',' ORDER BY name) FROM countries"),
        "France,Switzerland,United States"
    );
    assert_eq!(psql_at(&url, "SELECT sum(amount) FROM orders"), "52.50");
    let console = url.replace("/shop", "/pgmux");
    assert!(psql_at(&console, "SHOW SHARDS").lines().count() >= 2);
    stop_demo(child, &seen);
}
