//! A throwaway certificate authority made with openssl, for the TLS tests (etcd, the HTTP API).

use std::{path::Path, process::Command};

use crate::netns::run;

/// Makes `dir/ca.pem` (and its key) and, for each `(name, extensions)`, `dir/NAME.pem` and
/// `dir/NAME.key` signed by it, valid two days. `extensions` are openssl x509 extension
/// lines, e.g. "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n".
pub fn make_certs(dir: &Path, certs: &[(&str, &str)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args)).map(|_| ());
    ssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bg-test-ca"])?;
    for (name, ext) in certs {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        ssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", &format!("/CN={name}")])?;
        ssl(&["x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", &format!("{name}.pem"), "-days", "2", "-extfile", &format!("{name}.ext")])?;
    }
    Ok(())
}
