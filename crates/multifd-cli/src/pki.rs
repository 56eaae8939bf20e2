//! A throw-away PKI in QEMU's credential directory layout (what
//! `tls-creds-x509,dir=...` reads), made with rcgen: a CA, a server
//! certificate for `127.0.0.1` and `localhost`, a client certificate
//! (`O=multifd,CN=client`) and a client without one. ECDSA P-256, key usage
//! digitalSignature + keyEncipherment (what QEMU's GnuTLS demands of the
//! certificates it loads), so the same directories serve QEMU peers too.
//!
//! Independent of the engine: only files are made.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The credential directories of one PKI (removed when dropped).
pub struct Pki {
    _root: tempfile::TempDir,
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub server: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub client: PathBuf,
    /// `ca-cert.pem` only: a client that presents no certificate.
    pub anon_client: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn leaf(
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    // A fresh name (rcgen's default already holds a CN), so the order is
    // O then CN, as tls-authz lists it.
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "multifd");
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    /// Makes a fresh PKI in a new temporary directory.
    pub fn new() -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("multifd-pki")
            .tempdir()
            .context("creating a directory for TLS credentials")?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::OrganizationName, "multifd");
        ca.distinguished_name
            .push(DnType::CommonName, "multifd test CA");
        let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
        let ca_pem = ca.pem();
        let dir = |n: &str| root.path().join(n);
        let (server, client, anon) = (dir("server"), dir("client"), dir("anon-client"));
        for d in [&server, &client, &anon] {
            write(d, "ca-cert.pem", &ca_pem)?;
        }
        let (c, k) = leaf(
            &["127.0.0.1", "localhost"],
            "server",
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        )?;
        write(&server, "server-cert.pem", &c)?;
        write(&server, "server-key.pem", &k)?;
        let (c, k) = leaf(&[], "client", ExtendedKeyUsagePurpose::ClientAuth, &ca)?;
        write(&client, "client-cert.pem", &c)?;
        write(&client, "client-key.pem", &k)?;
        Ok(Self {
            _root: root,
            server,
            client,
            anon_client: anon,
        })
    }
}
