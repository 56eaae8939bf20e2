//! TLS-PSK through OpenSSL (QEMU's `tls-creds-psk`), behind the `tls-psk`
//! feature: rustls has no external pre-shared keys.
//!
//! QEMU's GnuTLS peer negotiates TLS 1.3 with an external PSK plus ECDHE
//! (`psk_dhe_ke`); the identity is the `username` bytes, the key the hex of
//! `keys.psk` decoded, the binder SHA-256, so only the SHA-256 suites can
//! be used. AES-128-GCM comes first (as a client: GnuTLS follows the
//! client's order; as a server: our preference), ChaCha20 second: QEMU's
//! own pick, ChaCha20, runs three times slower here.

use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use openssl::ssl::{
    SslContext, SslContextBuilder, SslMethod, SslOptions, SslVerifyMode, SslVersion,
};

use crate::error::{Error, Result};

/// The only suites a SHA-256 PSK binder allows, fastest first.
const SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// An OpenSSL context set up for one side of a PSK session.
pub(crate) struct PskContext {
    pub(super) ctx: SslContext,
}

/// Reads `keys.psk`: lines of `username:hexkey`.
fn read_psk_file(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let path: PathBuf = dir.join("keys.psk");
    let file = std::fs::File::open(&path).map_err(|e| bad_creds(&path, e))?;
    let mut out = Vec::new();
    for line in io::BufReader::new(file).lines() {
        let line = line.map_err(|e| bad_creds(&path, e))?;
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (user, hex) = line
            .split_once(':')
            .ok_or_else(|| bad_creds(&path, "a line is not username:hexkey"))?;
        if hex.len() % 2 != 0 || hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad_creds(&path, format!("the key of {user:?} is not hex")));
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex"))
            .collect();
        out.push((user.to_owned(), key));
    }
    Ok(out)
}

fn bad_creds(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::TlsCredentials {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn tls_error(what: &str, e: openssl::error::ErrorStack) -> Error {
    Error::Config(format!("TLS-PSK {what}: {e}"))
}

fn builder(server: bool) -> Result<SslContextBuilder> {
    let method = if server {
        SslMethod::tls_server()
    } else {
        SslMethod::tls_client()
    };
    let mut b = SslContextBuilder::new(method).map_err(|e| tls_error("context", e))?;
    b.set_verify(SslVerifyMode::NONE);
    b.set_min_proto_version(Some(SslVersion::TLS1_3))
        .map_err(|e| tls_error("version", e))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))
        .map_err(|e| tls_error("version", e))?;
    b.set_ciphersuites(SUITES)
        .map_err(|e| tls_error("suites", e))?;
    Ok(b)
}

impl PskContext {
    /// The client side: identity `username`, its key from `dir/keys.psk`.
    pub(crate) fn client(dir: &Path, username: &str) -> Result<Self> {
        let keys = read_psk_file(dir)?;
        let key = keys
            .into_iter()
            .find(|(u, _)| u == username)
            .map(|(_, k)| k)
            .ok_or_else(|| Error::TlsCredentials {
                path: dir.join("keys.psk"),
                reason: format!("no key for username {username:?}"),
            })?;
        let identity = username.as_bytes().to_vec();
        let mut b = builder(false)?;
        b.set_psk_client_callback(move |_ssl, _hint, id_buf, psk_buf| {
            // The identity goes out as a NUL-terminated C string.
            if identity.len() >= id_buf.len() || key.len() > psk_buf.len() {
                return Ok(0);
            }
            id_buf[..identity.len()].copy_from_slice(&identity);
            id_buf[identity.len()] = 0;
            psk_buf[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        Ok(Self { ctx: b.build() })
    }

    /// The server side: any username of `dir/keys.psk`, with its key.
    pub(crate) fn server(dir: &Path) -> Result<Self> {
        let keys = read_psk_file(dir)?;
        let mut b = builder(true)?;
        // A QEMU source never reads its sockets: send it nothing.
        b.set_num_tickets(0).map_err(|e| tls_error("tickets", e))?;
        b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
        b.set_psk_server_callback(move |_ssl, identity, psk_buf| {
            let Some(id) = identity else { return Ok(0) };
            match keys.iter().find(|(u, _)| u.as_bytes() == id) {
                Some((_, key)) if key.len() <= psk_buf.len() => {
                    psk_buf[..key.len()].copy_from_slice(key);
                    Ok(key.len())
                }
                // 0: unknown identity, the handshake fails.
                _ => Ok(0),
            }
        });
        Ok(Self { ctx: b.build() })
    }
}
