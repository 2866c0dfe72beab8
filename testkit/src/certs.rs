//! Test certificates from the openssl command line: a CA and a server
//! certificate it signed, for TLS tests and `ClusterSpec::tls` clusters.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::ClusterError;
use crate::command::run;

type Res<T> = Result<T, ClusterError>;

/// A test CA and a certificate it signed (PEM files).
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Make a CA and a server certificate for `name`, 127.0.0.1 and ::1 in
/// `dir` (`ca.crt`, `server.crt`, `server.key`, P-256 keys) with the
/// openssl command line.
pub fn make_certs(dir: &Path, name: &str) -> Res<Certs> {
    let p = |f: &str| dir.join(f);
    let openssl = |args: &[&str]| {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(dir);
        run(&mut cmd)
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "3", "-subj", "/CN=pgmux test CA"],
        ]
        .concat(),
    )?;
    openssl(
        &[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", &format!("/CN={name}")]]
            .concat(),
    )?;
    std::fs::write(
        p("san.ext"),
        format!("subjectAltName=DNS:{name},IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\n"),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "3",
        "-extfile",
        "san.ext",
    ])?;
    let key = p("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(Certs { ca: p("ca.crt"), cert: p("server.crt"), key })
}
