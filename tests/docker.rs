//! The docker deployments without a Docker engine: every compose file is
//! parsed and what it references is checked (services, files, ports, the
//! pgmux config it mounts and the backends that config names), and the
//! bootstrap scripts the compose files run are run here against a real
//! primary: `primary-init.sh` prepares it, `replica-start.sh` copies it
//! through a replication slot into a replica that then streams.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pgmux::config::Config;
use pgmux_testkit::{free_port, Cluster, ClusterSpec};
use serde_yaml::Value;

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn compose(file: &str) -> Value {
    let text = std::fs::read_to_string(docker_dir().join(file)).unwrap();
    let mut v: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    v.apply_merge().unwrap();
    v
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Checks one compose file; returns its services.
fn check_compose(file: &str, config_port: u16, metrics: bool) -> BTreeMap<String, Value> {
    let v = compose(file);
    let services: BTreeMap<String, Value> = v["services"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{file}: no services"))
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect();
    let dir = docker_dir();
    for (name, s) in &services {
        // depends_on names services of this file.
        let deps: Vec<String> = match &s["depends_on"] {
            Value::Mapping(m) => m.keys().filter_map(|k| k.as_str().map(str::to_string)).collect(),
            other => strings(other),
        };
        for d in deps {
            assert!(services.contains_key(&d), "{file}: {name} depends on unknown service {d}");
        }
        // Bind mounts point at files of the repository.
        for vol in strings(&s["volumes"]) {
            let src = vol.split(':').next().unwrap();
            if src.starts_with('.') {
                assert!(dir.join(src).exists(), "{file}: {name} mounts missing {src}");
            }
        }
        // Entrypoint scripts exist (mounted from ./scripts or ./seed) and run.
        for e in strings(&s["entrypoint"]) {
            for (inside, outside) in [("/scripts/", "scripts/"), ("/seed/", "seed/")] {
                if let Some(rest) = e.strip_prefix(inside) {
                    let path = dir.join(outside).join(rest);
                    let mode = std::fs::metadata(&path).unwrap_or_else(|_| panic!("{file}: {name}: {e}")).permissions();
                    assert!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0, "{e} is not executable");
                }
            }
        }
        if let Some(build) = s.get("build") {
            let context = dir.join(build["context"].as_str().unwrap());
            assert!(context.join(build["dockerfile"].as_str().unwrap()).exists(), "{file}: {name}: Dockerfile");
        }
        // A replica's slot is one its primary creates.
        if let (Some(primary), Some(slot)) =
            (s["environment"]["PRIMARY_HOST"].as_str(), s["environment"]["REPLICA_SLOT"].as_str())
        {
            let slots = services[primary]["environment"]["REPLICA_SLOTS"].as_str().unwrap_or_default();
            assert!(
                slots.split_whitespace().any(|x| x == slot),
                "{file}: {name}: slot {slot} not created on {primary}"
            );
        }
    }
    // pgmux: its config parses, names only services of this file, and
    // listens where the ports are published.
    let pgmux = &services["pgmux"];
    let mount = strings(&pgmux["volumes"]).into_iter().find(|v| v.contains(":/etc/pgmux/pgmux.toml")).unwrap();
    let config = Config::load(&dir.join(mount.split(':').next().unwrap())).unwrap();
    let ports = strings(&pgmux["ports"]);
    assert!(ports.contains(&format!("{config_port}:{}", config.general.listen.port)), "{file}: {ports:?}");
    if metrics {
        let m = config.general.metrics_listen.as_ref().expect("metrics_listen");
        assert!(ports.contains(&format!("{}:{}", m.port, m.port)), "{file}: metrics port {ports:?}");
    }
    let mut backends = Vec::new();
    for db in config.databases.values() {
        backends.extend(db.primary.iter().cloned());
        backends.extend(db.replicas.iter().map(|r| r.addr.clone()));
        for s in &db.shards {
            backends.push(s.primary.clone());
            backends.extend(s.replicas.iter().map(|r| r.addr.clone()));
        }
        for m in db.maps.values() {
            if let pgmux::config::MapConfig::Directory { backend, .. } = m {
                backends.push(backend.clone());
            }
        }
    }
    assert!(!backends.is_empty());
    for b in backends {
        assert!(services.contains_key(&b.host) && b.port == 5432, "{file}: pgmux names {b}, not a service");
    }
    services
}

#[test]
fn compose_files_reference_what_exists() {
    let plain = check_compose("docker-compose.yml", 6432, true);
    for s in ["primary", "replica1", "replica2", "pgmux", "prometheus", "grafana"] {
        assert!(plain.contains_key(s), "{s}");
    }
    let sharded = check_compose("docker-compose.sharded.yml", 6432, false);
    for s in ["shard0", "shard0-replica", "shard1", "shard1-replica", "directory", "seed"] {
        assert!(sharded.contains_key(s), "{s}");
    }
    // The dashboard is valid JSON and the seed schema has every table the
    // sharded config maps.
    let dash = std::fs::read_to_string(docker_dir().join("monitoring/grafana/dashboards/pgmux.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dash).unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 4));
    let schema = std::fs::read_to_string(docker_dir().join("seed/schema.sql")).unwrap();
    let config = Config::load(&docker_dir().join("../config/sharded.toml")).unwrap();
    for t in config
        .databases
        .values()
        .flat_map(|d| d.tables.iter().map(|t| t.name.clone()).chain(d.reference_tables.clone()))
    {
        assert!(schema.contains(&format!("CREATE TABLE IF NOT EXISTS {t} ")), "schema.sql lacks {t}");
    }
}

#[test]
fn bootstrap_scripts_build_a_streaming_replica() {
    let c = Cluster::start(&ClusterSpec::default()).expect("a primary");
    let scripts = docker_dir().join("scripts");
    let run = |script: &str, env: &[(&str, String)]| {
        let mut cmd = c.as_server_user(scripts.join(script));
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{script}: {text}");
        text
    };
    let sock = c.socket_dir().display().to_string();
    let primary_env = [
        ("PGHOST", sock.clone()),
        ("PGPORT", c.primary.port.to_string()),
        ("PGDATA", c.primary.data_dir.display().to_string()),
        ("APP_USER", "dockerapp".into()),
        ("APP_PASSWORD", "dockerpw".into()),
        ("APP_DB", "dockerdb".into()),
        ("REPLICATION_PASSWORD", "replpw".into()),
        ("REPLICA_SLOTS", "slot_a slot_b".into()),
    ];
    run("primary-init.sh", &primary_env);
    // Idempotent: a second run changes nothing and succeeds.
    run("primary-init.sh", &primary_env);
    let slots = c
        .psql(&c.primary, "postgres", "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots")
        .unwrap();
    assert_eq!(slots, "slot_a,slot_b");
    let data = c.root().join("docker-replica");
    run(
        "replica-start.sh",
        &[
            ("PRIMARY_HOST", "127.0.0.1".into()),
            ("PRIMARY_PORT", c.primary.port.to_string()),
            ("REPLICATION_PASSWORD", "replpw".into()),
            ("REPLICA_SLOT", "slot_a".into()),
            ("PGDATA", data.display().to_string()),
            ("REPLICA_BOOTSTRAP_ONLY", "1".into()),
        ],
    );
    assert!(data.join("standby.signal").exists(), "pg_basebackup -R wrote standby.signal");
    // Start the copy as a replica and see it stream through its slot.
    let port = free_port().unwrap();
    let mut pg_ctl = c.as_server_user(c.bin_path("pg_ctl"));
    pg_ctl.arg("-D").arg(&data).args(["-w", "-l"]).arg(data.join("log")).arg("-o");
    pg_ctl.arg(format!("-p {port} -k {sock} -c listen_addresses=127.0.0.1")).arg("start");
    assert!(pg_ctl.status().unwrap().success());
    let psql = |port: u16, db: &str, sql: &str| {
        let out = std::process::Command::new(c.bin_path("psql"))
            .args(["-X", "-A", "-t", "-h", &sock, "-U", "postgres", "-p", &port.to_string(), "-d", db, "-c", sql])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(psql(port, "postgres", "SELECT pg_is_in_recovery()"), "t");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while psql(c.primary.port, "postgres", "SELECT active FROM pg_replication_slots WHERE slot_name = 'slot_a'") != "t"
    {
        assert!(std::time::Instant::now() < deadline, "the replica never used its slot");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    c.psql(&c.primary, "dockerdb", "CREATE TABLE seen (x int); INSERT INTO seen VALUES (42)").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let seen = || psql(port, "dockerdb", "SELECT x FROM seen");
    while seen() != "42" {
        assert!(std::time::Instant::now() < deadline, "the replica did not replay the primary's write");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut stop = c.as_server_user(c.bin_path("pg_ctl"));
    let _ = stop.arg("-D").arg(&data).args(["-m", "immediate", "stop"]).status();
}
