//! A throw-away PKI in QEMU's credential directory layout, made with rcgen:
//! a CA, a server certificate for `127.0.0.1` and `localhost`, a client
//! certificate (`O=multifd,CN=client`), another client (`O=multifd,CN=hostile`),
//! a client without a certificate, and a `keys.psk`. ECDSA P-256 everywhere, key usage digitalSignature +
//! keyEncipherment (what QEMU's GnuTLS demands of certificates it loads),
//! so the same directories serve QEMU peers too.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The directories of one PKI.
pub struct Pki {
    /// Keeps the files alive.
    _root: tempfile::TempDir,
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub server: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub client: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem` of
    /// `O=multifd,CN=hostile`: a client the CA vouches for, whom an
    /// authorization list of `O=multifd,CN=client` refuses.
    pub hostile_client: PathBuf,
    /// `ca-cert.pem` only: a client that presents no certificate.
    pub anon_client: PathBuf,
    /// A server whose certificate names only `other.example`.
    pub other_host_server: PathBuf,
    /// `keys.psk` with `qemu:` and `other:` keys.
    pub psk: PathBuf,
    /// `keys.psk` with a different key for `qemu`.
    pub wrong_psk: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

fn leaf(
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
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
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Makes a fresh PKI in a temporary directory.
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("multifd-pki")
            .tempdir()
            .unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::OrganizationName, "multifd");
        ca.distinguished_name
            .push(DnType::CommonName, "multifd test CA");
        let ca = CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let ca_pem = ca.pem();
        let dir = |n: &str| root.path().join(n);
        let (server, other, client, hostile, anon) = (
            dir("server"),
            dir("other-host-server"),
            dir("client"),
            dir("hostile-client"),
            dir("anon-client"),
        );
        for d in [&server, &other, &client, &hostile, &anon] {
            write(d, "ca-cert.pem", &ca_pem);
        }
        let (c, k) = leaf(
            &["127.0.0.1", "localhost"],
            "server",
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        write(&server, "server-cert.pem", &c);
        write(&server, "server-key.pem", &k);
        let (c, k) = leaf(
            &["other.example"],
            "other",
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        write(&other, "server-cert.pem", &c);
        write(&other, "server-key.pem", &k);
        let (c, k) = leaf(&[], "client", ExtendedKeyUsagePurpose::ClientAuth, &ca);
        write(&client, "client-cert.pem", &c);
        write(&client, "client-key.pem", &k);
        let (c, k) = leaf(&[], "hostile", ExtendedKeyUsagePurpose::ClientAuth, &ca);
        write(&hostile, "client-cert.pem", &c);
        write(&hostile, "client-key.pem", &k);
        let psk = dir("psk");
        write(
            &psk,
            "keys.psk",
            "qemu:0c78b7e4d2a1f0936e5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f\n\
             other:00112233445566778899aabbccddeeff\n",
        );
        let wrong_psk = dir("wrong-psk");
        write(
            &wrong_psk,
            "keys.psk",
            "qemu:ffffb7e4d2a1f0936e5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f\n",
        );
        Self {
            _root: root,
            server,
            client,
            hostile_client: hostile,
            anon_client: anon,
            other_host_server: other,
            psk,
            wrong_psk,
        }
    }
}
