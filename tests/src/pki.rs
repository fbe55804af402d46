//! Test certificates made with the real `openssl` command: certificate authorities, server and
//! client certificates signed by them, and self-signed server certificates.
//!
//! Every file lands in one directory under the names `{name}-key.pem` / `{name}-cert.pem`
//! (plus the CSR, extension file and CA serial beside them). Certificates are valid for two
//! days: long enough for any test run, short enough that a leaked one is worthless.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require_tool, run};

/// Extensions of a server certificate for this machine's loopback address.
pub const SERVER_EXT: &str =
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";

/// A directory of keys and certificates.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Uses (and creates) `dir`; fails the test when openssl is missing.
    pub fn new(dir: &Path) -> Pki {
        require_tool("openssl");
        std::fs::create_dir_all(dir).unwrap();
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a file in the directory, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    pub fn openssl(&self, args: &[&str]) {
        run(Command::new("openssl").current_dir(&self.dir).args(args));
    }

    /// A self-signed certificate authority `{name}-cert.pem` with its key.
    pub fn ca(&self, name: &str) {
        self.req_x509(
            &format!("/CN=Standby test {name}"),
            name,
            &[
                "basicConstraints=critical,CA:TRUE",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    /// `openssl req -x509`: a new 2048-bit key `{name}-key.pem` and a self-signed
    /// certificate `{name}-cert.pem` for `subject` with the extensions `ext`.
    fn req_x509(&self, subject: &str, name: &str, ext: &[&str]) {
        let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
        let mut args = vec![
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
            "-keyout", &key, "-out", &cert,
        ];
        for e in ext {
            args.extend(["-addext", e]);
        }
        self.openssl(&args);
    }

    /// Signs `{name}-key.pem` (a 2048-bit key made here if missing) with the CA `ca` into
    /// `{name}-cert.pem`; `ext` holds extension lines beyond the leaf constraints.
    pub fn sign(&self, name: &str, ca: &str, subject: &str, ext: &str) {
        let key = format!("{name}-key.pem");
        if !self.dir.join(&key).exists() {
            self.openssl(&["genrsa", "-out", &key, "2048"]);
        }
        let csr = format!("{name}.csr");
        self.openssl(&["req", "-new", "-key", &key, "-subj", subject, "-out", &csr]);
        let extfile = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&extfile),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{ext}"),
        )
        .unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &format!("{name}-cert.pem"),
        ]);
    }

    /// A self-signed server certificate `{name}-cert.pem` (and key) for 127.0.0.1/localhost;
    /// returns the certificate's and the key's paths.
    pub fn self_signed(&self, name: &str) -> (String, String) {
        self.req_x509(
            "/CN=localhost",
            name,
            &["subjectAltName=IP:127.0.0.1,DNS:localhost"],
        );
        (
            self.file(&format!("{name}-cert.pem")),
            self.file(&format!("{name}-key.pem")),
        )
    }
}
