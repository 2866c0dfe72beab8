//! Building a cluster ([`Cluster::start`]): its directory and ports,
//! initdb and the configuration of each primary (postgresql.conf,
//! pg_hba.conf, TLS, the superuser's password, roles and databases), a base
//! backup of the primary for each replica, and waiting until they stream.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tempfile::TempDir;

use super::{Cluster, ClusterError, Node, NodeRole, Res, READY_TIMEOUT, SUPERUSER, SUPERUSER_PASSWORD};
use crate::command::{ident, io_err, is_root, lit, run};
use crate::{make_certs, ClusterSpec, HbaMethod, PgBin};

impl Cluster {
    /// Build and start every node of `spec`; returns once replicas are streaming.
    pub fn start(spec: &ClusterSpec) -> Result<Cluster, ClusterError> {
        let t0 = Instant::now();
        let bin = PgBin::locate()?;
        let owner = is_root().then(postgres_ids).transpose()?;
        let dir = temp_root()?;
        let root = dir.path().to_path_buf();
        let mut ports = free_ports(1 + spec.replicas + spec.extra_primaries)?.into_iter();
        let mut node = |name: String, role: NodeRole| Node {
            data_dir: root.join(&name),
            log_file: root.join(format!("{name}.log")),
            port: ports.next().unwrap_or_default(),
            name,
            role,
        };
        // From here on, dropping `cluster` (early return) cleans everything up.
        let cluster = Cluster {
            primary: node("primary".into(), NodeRole::Primary),
            replicas: (1..=spec.replicas).map(|i| node(format!("replica{i}"), NodeRole::Replica)).collect(),
            extra_primaries: (1..=spec.extra_primaries)
                .map(|i| node(format!("extra{i}"), NodeRole::ExtraPrimary))
                .collect(),
            bin,
            sock_dir: root.join("sock"),
            owner,
            dir,
        };
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        cluster.own(&root)?;
        std::fs::create_dir(&cluster.sock_dir)?;
        cluster.own(&cluster.sock_dir)?;

        let primaries: Vec<&Node> = cluster.nodes().filter(|n| n.role != NodeRole::Replica).collect();
        parallel(&primaries, |n| cluster.init_primary(n, spec))?;
        let replicas: Vec<&Node> = cluster.replicas.iter().collect();
        parallel(&replicas, |n| cluster.init_replica(n))?;
        tracing::debug!(root = %root.display(), elapsed = ?t0.elapsed(), "pgmux cluster up");
        Ok(cluster)
    }

    fn own(&self, path: &Path) -> Res<()> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// initdb, configure, start, then set passwords and create roles and databases.
    fn init_primary(&self, node: &Node, spec: &ClusterSpec) -> Res<()> {
        let mut cmd = self.server_cmd("initdb");
        cmd.arg("-D").arg(&node.data_dir);
        cmd.args("-U postgres -E UTF8 --auth-local=trust --auth-host=scram-sha-256".split(' '));
        run(cmd.args(["--locale=C", "--no-sync", "--no-instructions"]))?;

        let mut conf = format!(
            "\n# ---- pgmux test cluster ----\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\nmax_connections = {}\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nshared_buffers = '32MB'\n\
             wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\n\
             wal_keep_size = '256MB'\nwal_writer_delay = '10ms'\nlogging_collector = off\n\
             password_encryption = 'scram-sha-256'\n",
            lit(&self.sock_dir.to_string_lossy()),
            spec.max_connections
        );
        spec.extra_conf.iter().for_each(|l| conf.extend([l, "\n"]));
        if spec.tls {
            let certs = make_certs(&node.data_dir, "localhost")?;
            for f in [&certs.cert, &certs.key, &certs.ca] {
                self.own(f)?;
            }
            // The CA's own files go: a base backup copies the whole directory.
            for f in ["ca.key", "ca.srl", "server.csr", "san.ext"] {
                let _ = std::fs::remove_file(node.data_dir.join(f));
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let conf_path = node.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new().append(true).open(conf_path)?;
        file.write_all(conf.as_bytes())?;
        set_node_conf(node)?;

        let mut hba = "local all all trust\nhost replication all 127.0.0.1/32 trust\n".to_string();
        for role in &spec.roles {
            let (name, method) = (ident(&role.name), role.method.hba_keyword());
            let _ = writeln!(hba, "host all {name} 127.0.0.1/32 {method}");
        }
        hba.push_str("host all all 127.0.0.1/32 scram-sha-256\n");
        // Writing into the existing file keeps its owner (postgres) and mode.
        std::fs::write(node.data_dir.join("pg_hba.conf"), hba)?;

        self.start_node(node)?;

        let mut sql = format!("ALTER ROLE postgres PASSWORD {};\n", lit(SUPERUSER_PASSWORD));
        for role in &spec.roles {
            let enc = if role.method == HbaMethod::Md5 { "md5" } else { "scram-sha-256" };
            let sup = if role.superuser { "SUPERUSER" } else { "" };
            let (name, pw) = (ident(&role.name), lit(&role.password));
            let _ = writeln!(sql, "SET password_encryption = '{enc}';");
            let _ = writeln!(sql, "CREATE ROLE {name} LOGIN {sup} PASSWORD {pw};");
        }
        for db in &spec.databases {
            let _ = write!(sql, "CREATE DATABASE {}", ident(db));
            if let Some(owner) = spec.roles.first() {
                let _ = write!(sql, " OWNER {}", ident(&owner.name));
            }
            sql.push_str(";\n");
        }
        self.psql(node, "postgres", &sql).map(drop)
    }

    /// pg_basebackup from the primary, start, wait until streaming.
    fn init_replica(&self, node: &Node) -> Res<()> {
        let primary = &self.primary;
        let mut cmd = self.server_cmd("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-U", SUPERUSER, "-p"]).arg(primary.port.to_string());
        cmd.arg("-D").arg(&node.data_dir);
        run(cmd.args("-R -X stream -c fast --no-sync".split(' ')))?;
        set_node_conf(node)?;
        self.start_node(node)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        self.poll_until(node, deadline, "in recovery", || {
            Ok(self.psql(node, "postgres", "SELECT pg_is_in_recovery()")? == "t")
        })?;
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = {} AND state = 'streaming'",
            lit(&node.name)
        );
        self.poll_until(node, deadline, "streaming from the primary", || {
            Ok(self.psql(primary, "postgres", &sql)? == "1")
        })
    }
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it, release it).
pub fn free_port() -> Result<u16, ClusterError> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// `n` distinct free ports (all listeners are held until every port is known).
fn free_ports(n: usize) -> Res<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind(("127.0.0.1", 0))).collect::<Result<_, _>>()?;
    let ports = listeners.iter().map(|l| Ok(l.local_addr()?.port()));
    ports.collect()
}

/// Rewrite the per-node `port` and `cluster_name` lines of postgresql.conf (the
/// cluster name doubles as the walreceiver's application_name on replicas).
fn set_node_conf(node: &Node) -> Res<()> {
    let path = node.data_dir.join("postgresql.conf");
    let old = std::fs::read_to_string(&path)?;
    let keep = |l: &&str| !l.starts_with("port = ") && !l.starts_with("cluster_name = ");
    let mut conf: String = old.lines().filter(keep).flat_map(|l| [l, "\n"]).collect();
    let _ = write!(conf, "port = {}\ncluster_name = {}\n", node.port, lit(&node.name));
    std::fs::write(&path, conf)?;
    Ok(())
}

/// Run `job` for every node concurrently; the first error wins.
fn parallel(nodes: &[&Node], job: impl Fn(&Node) -> Res<()> + Sync) -> Res<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes.iter().map(|n| s.spawn(|| job(n))).collect();
        let panicked = || Err(io_err("cluster setup thread panicked"));
        let results: Vec<Res<()>> = handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panicked())).collect();
        results.into_iter().collect()
    })
}

/// The cluster directory: in `$PGMUX_TMPDIR` if set, else in `/dev/shm` when usable
/// (tmpfs makes initdb and pg_basebackup several times faster), else in the temp dir.
fn temp_root() -> Res<TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("pgmux-");
    if let Some(dir) = std::env::var_os("PGMUX_TMPDIR") {
        return Ok(builder.tempdir_in(dir)?);
    }
    let shm = builder.tempdir_in("/dev/shm");
    Ok(shm.or_else(|_| builder.tempdir())?)
}

/// uid and gid of the `postgres` OS user.
fn postgres_ids() -> Res<(u32, u32)> {
    let id = |flag: &str| -> Res<u32> {
        let out = run(Command::new("id").args([flag, "postgres"])).map_err(|e| {
            let hint = PgBin::INSTALL_HINT;
            ClusterError::NotInstalled(format!("no `postgres` OS user ({e}); {hint}"))
        })?;
        let bad = || io_err(&format!("unexpected `id {flag} postgres` output: {out}"));
        out.trim().parse().map_err(|_| bad())
    };
    Ok((id("-u")?, id("-g")?))
}
