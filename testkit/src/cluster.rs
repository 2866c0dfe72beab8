//! Throw-away, real PostgreSQL clusters built from the installed server binaries.
//!
//! Used by the integration tests and by `pgmux demo`. [`Cluster::start`] creates a
//! temporary directory (prefix `pgmux-`, in `$PGMUX_TMPDIR`, else `/dev/shm` when
//! usable, else the system temp dir) holding one primary, optional streaming
//! replicas (`pg_basebackup -R`) and optional independent "extra" primaries, each
//! listening on `127.0.0.1:<free port>` and on a unix socket in `<root>/sock`.
//! Roles and databases from the [`ClusterSpec`] are created on every primary; the
//! superuser `postgres` gets [`Cluster::superuser_password`] (SCRAM) for TCP use.
//!
//! When running as root (initdb refuses root), every server binary and the setup
//! `psql` run as `runuser -u postgres -- <bin>` and the directory is chowned to
//! `postgres`. Dropping the [`Cluster`] (also while unwinding from a panic, and when
//! [`Cluster::start`] fails half-way) stops every server with
//! `pg_ctl stop -m immediate` and removes the directory.
//! Nothing is printed to stdout; progress goes to `tracing::debug!`. Every call
//! blocks (seconds for `start`): from async code use `tokio::task::spawn_blocking`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
const SUPERUSER: &str = "postgres";
const SUPERUSER_PASSWORD: &str = "pgmux-superuser-secret";
/// libpq environment variables that would silently redirect the client tools.
const PG_ENV: &str = "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE \
    PGSERVICE PGSERVICEFILE PGOPTIONS PGDATA PGSSLMODE PGAPPNAME";

/// Everything that can go wrong while building or driving a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The server binaries (or the `postgres` OS user) are missing; carries a hint.
    #[error("PostgreSQL server binaries not found: {0}")]
    NotInstalled(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A command could not be spawned or exited unsuccessfully.
    #[error("command `{cmd}` failed ({status}):\n{output}")]
    Command { cmd: String, status: String, output: String },
    #[error("timed out: {0}")]
    Timeout(String),
}

type Res<T> = Result<T, ClusterError>;

pub use crate::certs::{make_certs, Certs};
pub use crate::pgbin::PgBin;

/// pg_hba.conf authentication method of a [`Role`] over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbaMethod {
    Trust,
    Password,
    Md5,
    Scram,
}

impl HbaMethod {
    /// The keyword used in pg_hba.conf.
    pub fn hba_keyword(self) -> &'static str {
        match self {
            HbaMethod::Trust => "trust",
            HbaMethod::Password => "password",
            HbaMethod::Md5 => "md5",
            HbaMethod::Scram => "scram-sha-256",
        }
    }
}

/// A login role created on every primary (md5-stored password for
/// [`HbaMethod::Md5`], SCRAM-stored otherwise).
#[derive(Clone, Debug)]
pub struct Role {
    pub name: String,
    pub password: String,
    pub method: HbaMethod,
    pub superuser: bool,
}

impl Role {
    /// A non-superuser login role.
    pub fn new(name: &str, password: &str, method: HbaMethod) -> Role {
        let (name, password) = (name.to_string(), password.to_string());
        Role { name, password, method, superuser: false }
    }
}

/// What [`Cluster::start`] builds.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Streaming replicas of the primary (via `pg_basebackup -R`).
    pub replicas: usize,
    /// Independent primaries (own initdb), e.g. for sharding tests.
    pub extra_primaries: usize,
    /// Created on every primary; replicas get them through replication.
    pub roles: Vec<Role>,
    /// Created on every primary, owned by the first role if any.
    pub databases: Vec<String>,
    pub max_connections: u32,
    /// Lines appended to postgresql.conf.
    pub extra_conf: Vec<String>,
    /// Serve TLS (`ssl = on`) with a certificate from [`make_certs`]
    /// (its CA at [`Cluster::tls_ca`]).
    pub tls: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            replicas: 0,
            extra_primaries: 0,
            roles: Vec::new(),
            databases: Vec::new(),
            max_connections: 200,
            extra_conf: Vec::new(),
            tls: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRole {
    Primary,
    Replica,
    ExtraPrimary,
}

/// One PostgreSQL server of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub role: NodeRole,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

impl Node {
    /// `"127.0.0.1:PORT"`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A libpq / tokio-postgres `key=value` connection string over TCP.
    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let (port, user, password, db) = (self.port, q(user), q(password), q(db));
        format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}")
    }

    /// The last `lines` lines of the server log (empty if unreadable).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Running PostgreSQL servers in a temporary directory; see the module docs.
pub struct Cluster {
    pub primary: Node,
    pub replicas: Vec<Node>,
    pub extra_primaries: Vec<Node>,
    bin: PgBin,
    sock_dir: PathBuf,
    /// uid/gid of `postgres` when we are root and must switch users.
    owner: Option<(u32, u32)>,
    dir: TempDir,
}

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

    /// Password of the superuser `postgres` (SCRAM-stored, usable over TCP).
    pub fn superuser_password() -> &'static str {
        SUPERUSER_PASSWORD
    }

    /// Run `sql` with psql as superuser over the unix socket against `node`/`db`
    /// (`-X -A -t -q -v ON_ERROR_STOP=1`, statements fed on stdin and run one by
    /// one, so `CREATE DATABASE` works); returns the trimmed stdout.
    pub fn psql(&self, node: &Node, db: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = self.server_cmd("psql");
        cmd.args("-X -A -t -q -v ON_ERROR_STOP=1 -U postgres -f - -h".split(' '));
        cmd.arg(&self.sock_dir).args(["-p", &node.port.to_string(), "-d", db]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
        let short: String = sql.chars().take(300).collect();
        let desc = format!("{} <<< {short}", describe(&cmd));
        let mut child = cmd.spawn().map_err(|e| spawn_err(desc.clone(), e))?;
        // Feed stdin from a thread so that a large result cannot deadlock us.
        let writer = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_owned();
            std::thread::spawn(move || stdin.write_all(sql.as_bytes()))
        });
        let out = child.wait_with_output()?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        check_output(desc, out).map(|s| s.trim().to_string())
    }

    /// The CA that signed `node`'s certificate (`ClusterSpec::tls`).
    pub fn tls_ca(&self, node: &Node) -> PathBuf {
        node.data_dir.join("ca.crt")
    }

    /// `pg_ctl stop -m fast -w`.
    pub fn stop_node(&self, node: &Node) -> Result<(), ClusterError> {
        self.pg_ctl_stop(node, "fast")
    }

    /// `pg_ctl stop -m immediate -w`: a crash, as far as clients can tell.
    pub fn kill_node(&self, node: &Node) -> Result<(), ClusterError> {
        self.pg_ctl_stop(node, "immediate")
    }

    fn pg_ctl_stop(&self, node: &Node, mode: &str) -> Result<(), ClusterError> {
        let mut cmd = self.server_cmd("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&node.data_dir).args(["-m", mode]);
        run(cmd.args("-w -t 30 -s".split(' '))).map(drop)
    }

    /// `pg_ctl start -w -l <log_file>`, then wait until `pg_isready` succeeds.
    pub fn start_node(&self, node: &Node) -> Result<(), ClusterError> {
        let mut cmd = self.server_cmd("pg_ctl");
        cmd.arg("start").arg("-D").arg(&node.data_dir).arg("-l").arg(&node.log_file);
        if let Err(mut e) = run(cmd.args(["-w", "-t", "30", "-s"])) {
            if let ClusterError::Command { output, .. } = &mut e {
                let _ = write!(output, "\n--- tail of {} ---\n{}", node.name, node.log_tail(30));
            }
            return Err(e);
        }
        let isready = self.bin.path("pg_isready");
        let deadline = Instant::now() + READY_TIMEOUT;
        self.poll_until(node, deadline, "accepting connections", || {
            let mut cmd = Command::new(&isready);
            cmd.args("-q -t 2 -h 127.0.0.1 -d postgres -U postgres -p".split(' '));
            clean_env(cmd.arg(node.port.to_string()).stdin(Stdio::null()));
            Ok(cmd.output()?.status.success())
        })?;
        tracing::debug!(node = %node.name, port = node.port, "postgres node ready");
        Ok(())
    }

    /// Wait (30 s max) until every replica has replayed the end of the last
    /// WAL record the primary inserted, asynchronous commits included (a
    /// dummy synchronous commit flushes nothing: an xid-only transaction
    /// commits asynchronously whatever the setting).
    pub fn wait_replicas_caught_up(&self) -> Result<(), ClusterError> {
        // At a page start the insert position is past the page header
        // (24 bytes; 40 on a segment's first page), where no record ends.
        let sql = "SELECT CASE WHEN (l - '0/0') % seg = 40 THEN l - 40 \
                   WHEN (l - '0/0') % blk = 24 THEN l - 24 ELSE l END \
                   FROM (SELECT pg_current_wal_insert_lsn() AS l, \
                   current_setting('wal_block_size')::numeric AS blk, \
                   pg_size_bytes(current_setting('wal_segment_size')) AS seg) s";
        let out = self.psql(&self.primary, "postgres", sql)?;
        let lsn = out.trim().to_string();
        if !lsn.contains('/') {
            return Err(ClusterError::Command { cmd: sql.into(), status: "unexpected output".into(), output: out });
        }
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= {}::pg_lsn", lit(&lsn));
        let deadline = Instant::now() + READY_TIMEOUT;
        for r in &self.replicas {
            let what = format!("replayed up to {lsn}");
            self.poll_until(r, deadline, &what, || Ok(self.psql(r, "postgres", &sql)? == "t"))?;
        }
        Ok(())
    }

    /// The temporary directory holding data dirs, logs and the socket dir.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Directory of the unix sockets of all nodes.
    pub fn socket_dir(&self) -> &Path {
        &self.sock_dir
    }

    /// Primary, replicas, then extra primaries.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        let primary = std::iter::once(&self.primary);
        primary.chain(&self.replicas).chain(&self.extra_primaries)
    }

    /// The path of PostgreSQL binary `name` (server or client tool).
    pub fn bin_path(&self, name: &str) -> PathBuf {
        self.bin.path(name)
    }

    /// A command running `program` (a script, a binary) as the user the
    /// servers run as, with the PostgreSQL binaries first on PATH.
    pub fn as_server_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let bin_dir = self.bin.path("postgres").parent().map(Path::to_path_buf).unwrap_or_default();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(if self.owner.is_some() { "runuser".as_ref() } else { program.as_ref() });
        if self.owner.is_some() {
            cmd.args(["-u", "postgres", "--", "env", &format!("PATH={path}")]).arg(program.as_ref());
        } else {
            cmd.env("PATH", path);
        }
        clean_env(cmd.current_dir(self.dir.path()));
        cmd
    }

    /// A command for binary `name` of [`PgBin`], as `postgres` when we are root.
    fn server_cmd(&self, name: &str) -> Command {
        let (prog, as_postgres) = (self.bin.path(name), self.owner.is_some());
        let mut cmd = Command::new(if as_postgres { Path::new("runuser") } else { &prog });
        if as_postgres {
            cmd.args(["-u", "postgres", "--"]).arg(&prog);
        }
        clean_env(cmd.current_dir(self.dir.path()));
        cmd
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

    /// Call `check` every [`POLL`] until it returns true; Timeout past `deadline`.
    fn poll_until(&self, node: &Node, deadline: Instant, what: &str, mut check: impl FnMut() -> Res<bool>) -> Res<()> {
        while !check()? {
            if Instant::now() >= deadline {
                let (name, port, log) = (&node.name, node.port, node.log_file.display());
                return Err(ClusterError::Timeout(format!(
                    "node {name} (port {port}) not {what} within {READY_TIMEOUT:?}; \
                     tail of {log}:\n{}",
                    node.log_tail(30)
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Cluster {
    /// `pg_ctl stop -m immediate` for every running node (in parallel, errors
    /// ignored). Drop calls it; a cluster kept in a `static` (never dropped)
    /// should call it at exit, e.g. from a `libc::atexit` hook.
    pub fn shutdown(&self) {
        let children: Vec<_> = self
            .nodes()
            .filter(|n| n.data_dir.join("postmaster.pid").exists())
            .filter_map(|n| {
                let mut cmd = self.server_cmd("pg_ctl");
                cmd.arg("stop").arg("-D").arg(&n.data_dir);
                cmd.args("-m immediate -w -t 10 -s".split(' '));
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
                cmd.stdin(Stdio::null()).spawn().ok()
            })
            .collect();
        for mut child in children {
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    /// Stop every node, then remove the directory (the `dir` TempDir is
    /// dropped right after).
    fn drop(&mut self) {
        self.shutdown();
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

/// Drop libpq variables that would redirect the client tools; C-locale messages.
fn clean_env(cmd: &mut Command) {
    for var in PG_ENV.split_whitespace() {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C");
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
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

/// Run to completion with stdin closed; stdout on success, else Command error.
pub(crate) fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd.stdin(Stdio::null()).output();
    check_output(describe(cmd), out.map_err(|e| spawn_err(describe(cmd), e))?)
}

fn check_output(cmd: String, out: Output) -> Res<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let output = stdout + &String::from_utf8_lossy(&out.stderr);
    Err(cmd_err(cmd, out.status.to_string(), output))
}

fn spawn_err(cmd: String, e: std::io::Error) -> ClusterError {
    cmd_err(cmd, "could not be spawned".into(), e.to_string())
}

fn cmd_err(cmd: String, status: String, output: String) -> ClusterError {
    ClusterError::Command { cmd, status, output }
}

fn describe(cmd: &Command) -> String {
    let parts = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    parts.map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

fn io_err(msg: &str) -> ClusterError {
    ClusterError::Io(std::io::Error::other(msg.to_string()))
}

/// SQL identifier quoting.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL / postgresql.conf string literal quoting.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
