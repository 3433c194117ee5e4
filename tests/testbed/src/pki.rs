//! A throwaway certificate authority for TLS tests, made with `openssl`: the CA, a server
//! certificate for `localhost` (a collector) and a client certificate (this host, for mutual
//! TLS), each with its key, as PEM files in a directory of its own.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

/// The files of a test CA; the directory is removed on drop.
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    /// Creates the CA `name` and its certificates under `parent/name`.
    pub fn create(parent: &Path, name: &str) -> io::Result<Self> {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)?;
        let ca = Self { dir };
        ca.new_key("ca", &format!("/CN=enforcer test CA {name}"))?;
        ca.new_key("server", "/CN=localhost")?;
        ca.sign("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")?;
        ca.new_key("client", "/CN=node-1")?;
        ca.sign("client", "extendedKeyUsage=clientAuth\n")?;
        Ok(ca)
    }

    /// The CA certificate, which clients of the server trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server's certificate and key (for `localhost` and 127.0.0.1).
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server.key"))
    }

    /// The client's certificate and key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.pem"), self.dir.join("client.key"))
    }

    fn openssl(&self, args: &[&str]) -> io::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    /// A P-256 key and a request for `subject`; for the CA, its self-signed certificate.
    fn new_key(&self, name: &str, subject: &str) -> io::Result<()> {
        let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ];
        args.extend(["-nodes", "-keyout", &key, "-subj", subject]);
        match name {
            "ca" => args.extend(["-x509", "-days", "1", "-out", "ca.pem"]),
            _ => args.extend(["-out", &csr]),
        }
        self.openssl(&args)
    }

    /// Signs `name`'s request with the CA, with `extensions`.
    fn sign(&self, name: &str, extensions: &str) -> io::Result<()> {
        let (csr, pem, ext) = (
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(self.dir.join(&ext), extensions)?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ])
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
