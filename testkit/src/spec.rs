//! What [`crate::Cluster::start`] builds: a [`ClusterSpec`] (replicas, extra
//! primaries, roles, databases, settings, TLS) and the login [`Role`]s it
//! creates on every primary, with their pg_hba.conf method ([`HbaMethod`]).

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

/// What [`Cluster::start`](crate::Cluster::start) builds.
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
    /// Serve TLS (`ssl = on`) with a certificate from [`make_certs`](crate::make_certs)
    /// (its CA at [`Cluster::tls_ca`](crate::Cluster::tls_ca)).
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
