//! A private certificate authority made in the test, for mutual TLS
//! against a real nats-server: the server's certificate and client
//! certificates, written as PEM files into a temporary folder.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct PrivateCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate (PEM).
    pub ca_file: PathBuf,
    dir: TempDir,
}

impl PrivateCa {
    /// A new CA named `name`, with its certificate in a fresh folder.
    pub fn new(name: &str) -> PrivateCa {
        let dir = tempfile::Builder::new()
            .prefix("gpufleet-ca-")
            .tempdir()
            .expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = name_of(name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca certificate");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write ca.pem");
        PrivateCa {
            issuer: Issuer::new(params, key),
            ca_file,
            dir,
        }
    }

    /// The server's certificate, for 127.0.0.1 and localhost.
    pub fn server(&self) -> CertFiles {
        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params");
        params.distinguished_name = name_of("nats-server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("server", params)
    }

    /// A client certificate whose subject is `CN=<name>`.
    pub fn client(&self, name: &str) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name = name_of(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&format!("client-{name}"), params)
    }

    fn issue(&self, file: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A nats-server `tls { ... }` block that requires a client
    /// certificate from this CA; with `map`, the certificate's subject
    /// names the user (`verify_and_map`).
    pub fn server_tls_block(&self, map: bool) -> String {
        let server = self.server();
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  {}: true\n  timeout: 5\n}}\n",
            server.cert.display(),
            server.key.display(),
            self.ca_file.display(),
            if map { "verify_and_map" } else { "verify" }
        )
    }
}

fn name_of(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}
