//! A throwaway PKI for TLS tests, made with the `openssl` command: CAs, a
//! server certificate for one DNS name, client certificates (also as a
//! PKCS#12 bundle). EC P-256 keys, valid two days.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let pki = flowgate_testkit::pki::Pki::new(dir.path());
//! pki.ca("ca");
//! pki.server("ca", "server", "broker.test");
//! pki.client("ca", "client", "my-service");
//! let ca_file = pki.path("ca.pem");
//! # let _ = ca_file;
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificates and keys in one directory (`<name>.pem`, `<name>.key`).
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A PKI writing into `dir`.
    pub fn new(dir: &Path) -> Pki {
        Pki {
            dir: dir.to_owned(),
        }
    }

    /// The path of one of its files (`ca.pem`, `client.key`, ...).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Runs `openssl` in the directory; panics with its stderr on failure.
    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("the openssl command runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed CA `<name>.pem` + `<name>.key`.
    pub fn ca(&self, name: &str) {
        let (subject, key, pem) = (
            format!("/CN={name}"),
            format!("{name}.key"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &key,
            "-out",
            &pem,
        ]);
    }

    /// A server certificate `<name>.pem` + `<name>.key` signed by `ca`,
    /// valid for `dns_name` only.
    pub fn server(&self, ca: &str, name: &str, dns_name: &str) {
        self.leaf(
            ca,
            name,
            dns_name,
            &format!(
                "subjectAltName=DNS:{dns_name}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
            ),
        );
    }

    /// A client certificate `<name>.pem` + `<name>.key` signed by `ca`, with
    /// common name `cn` (the user name a broker's EXTERNAL login takes).
    pub fn client(&self, ca: &str, name: &str, cn: &str) {
        self.leaf(
            ca,
            name,
            cn,
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        );
    }

    /// `<name>.p12`: the certificate and key `<name>` as a PKCS#12 bundle
    /// with this password.
    pub fn pkcs12(&self, name: &str, password: &str) {
        let (pem, key, p12, pass) = (
            format!("{name}.pem"),
            format!("{name}.key"),
            format!("{name}.p12"),
            format!("pass:{password}"),
        );
        self.openssl(&[
            "pkcs12", "-export", "-in", &pem, "-inkey", &key, "-out", &p12, "-passout", &pass,
        ]);
    }

    fn leaf(&self, ca: &str, name: &str, cn: &str, ext: &str) {
        let ext_file = format!("{name}.ext");
        std::fs::write(self.path(&ext_file), ext).expect("write the extensions file");
        let (subject, key, csr, pem, ca_pem, ca_key) = (
            format!("/CN={cn}"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{ca}.pem"),
            format!("{ca}.key"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &subject,
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &pem,
        ]);
    }
}
