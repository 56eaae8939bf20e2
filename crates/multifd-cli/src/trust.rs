//! Whom a migration trusts: the TLS flags, and what happens without them.
//!
//! With `--tls-creds DIR` (x509) or `--tls-psk DIR` (pre-shared key) every
//! connection runs over TLS, the way QEMU's `tls-creds` does it: the
//! destination proves who it is to the source, and the source to the
//! destination (a client certificate, unless the receiver turns that off
//! with `--tls-verify-peer off`, or the key). Without TLS every connection
//! is plain (unencrypted, unauthenticated): on a Unix socket or loopback
//! TCP only this host can take part, so that is allowed; beyond loopback,
//! anyone who can reach the address can, so [`check`] refuses it unless
//! `--insecure` says the risk is accepted (then it warns).

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgAction, ArgGroup, Args};
use multifd::{TlsClient, TlsServer, Uri};

use crate::parse;
use crate::report::Usage;

/// The TLS flags of `multifd send` (QEMU's `tls-creds`, `tls-hostname`).
#[derive(Args, Debug, Clone)]
pub struct SourceTls {
    /// TLS with x509 certificates from DIR, laid out like QEMU's
    /// tls-creds-x509: ca-cert.pem, plus client-cert.pem and client-key.pem
    /// for a destination that verifies its clients (QEMU's default).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "tls_psk",
        help_heading = "TLS"
    )]
    tls_creds: Option<PathBuf>,
    /// The name the destination's certificate must carry (a DNS name or IP
    /// address in its subject alternative names; QEMU tls-hostname).
    /// Default: the host of --to (localhost for a Unix socket).
    #[arg(
        long,
        value_name = "NAME",
        requires = "tls_creds",
        help_heading = "TLS"
    )]
    tls_hostname: Option<String>,
    /// TLS with a pre-shared key from DIR/keys.psk (lines of
    /// username:hexkey, as QEMU's tls-creds-psk reads them).
    #[arg(long, value_name = "DIR", help_heading = "TLS")]
    tls_psk: Option<PathBuf>,
    /// The PSK identity: whose key of keys.psk to use (QEMU username).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "qemu",
        requires = "tls_psk",
        help_heading = "TLS"
    )]
    tls_psk_username: String,
    /// Migrate over plain TCP beyond loopback, unencrypted and
    /// unauthenticated (refused without this flag; see "Trust model" in the
    /// README).
    #[arg(long, conflicts_with_all = ["tls_creds", "tls_psk"], help_heading = "TLS")]
    insecure: bool,
}

impl SourceTls {
    /// Whether any TLS credentials were given.
    pub fn is_set(&self) -> bool {
        self.tls_creds.is_some() || self.tls_psk.is_some()
    }

    /// The TLS side of the source, if any; `uri` is checked: plain TCP
    /// beyond loopback needs `--insecure`.
    pub fn client(&self, uri: &Uri) -> Result<Option<TlsClient>> {
        let client = match (&self.tls_creds, &self.tls_psk) {
            (Some(dir), _) => Some(TlsClient::x509(dir, self.tls_hostname.clone())?),
            (None, Some(dir)) => Some(TlsClient::psk(dir, &self.tls_psk_username)?),
            (None, None) => None,
        };
        if client.is_none() {
            check(Role::Source, uri, Protection::Plain, self.insecure)?;
        }
        Ok(client)
    }
}

/// The TLS flags of `multifd receive` (QEMU's `tls-creds`, `verify-peer`,
/// `tls-authz`, `multifd-clean-tls-termination`).
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("tls").args(["tls_creds", "tls_psk"])))]
pub struct DestinationTls {
    /// TLS with x509 certificates from DIR, laid out like QEMU's
    /// tls-creds-x509: ca-cert.pem, server-cert.pem, server-key.pem.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "tls_psk",
        help_heading = "TLS"
    )]
    tls_creds: Option<PathBuf>,
    /// Require a client certificate that chains to ca-cert.pem (QEMU
    /// verify-peer, on by default as QEMU's is); off lets any client in.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse::on_off, action = ArgAction::Set,
          requires = "tls_creds", help_heading = "TLS")]
    tls_verify_peer: bool,
    /// Accept only a client certificate with this distinguished name,
    /// written as GnuTLS (and QEMU tls-authz) writes it: O=org,CN=name, in
    /// certificate order; repeat for more.
    #[arg(long = "tls-authz", value_name = "DN", value_parser = parse::gnutls_dn,
          requires = "tls_creds", help_heading = "TLS")]
    tls_authz: Vec<String>,
    /// TLS with a pre-shared key: any username of DIR/keys.psk (lines of
    /// username:hexkey, as QEMU's tls-creds-psk reads them) with its key.
    #[arg(long, value_name = "DIR", help_heading = "TLS")]
    tls_psk: Option<PathBuf>,
    /// A multifd channel that ends without TLS close_notify is an error
    /// (QEMU multifd-clean-tls-termination; QEMU 10 sources send it; off
    /// for older ones).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse::on_off, action = ArgAction::Set,
          requires = "tls", help_heading = "TLS")]
    tls_clean_termination: bool,
    /// Listen for plain TCP beyond loopback, unencrypted and
    /// unauthenticated (refused without this flag; see "Trust model" in the
    /// README).
    #[arg(long, conflicts_with_all = ["tls_creds", "tls_psk"], help_heading = "TLS")]
    insecure: bool,
}

impl DestinationTls {
    /// Whether any TLS credentials were given.
    pub fn is_set(&self) -> bool {
        self.tls_creds.is_some() || self.tls_psk.is_some()
    }

    /// The TLS side of the destination, if any (credentials are loaded
    /// now, before anything listens).
    pub fn server(&self) -> Result<Option<TlsServer>> {
        if !self.tls_verify_peer && !self.tls_authz.is_empty() {
            return Err(Usage::new(
                "--tls-authz needs the client's certificate: it cannot be used with \
                 --tls-verify-peer off",
            )
            .into());
        }
        Ok(match (&self.tls_creds, &self.tls_psk) {
            (Some(dir), _) => Some(TlsServer::x509(
                dir,
                self.tls_verify_peer,
                (!self.tls_authz.is_empty()).then(|| self.tls_authz.clone()),
            )?),
            (None, Some(dir)) => Some(TlsServer::psk(dir)?),
            (None, None) => None,
        })
    }

    /// Whether multifd channels must end with close_notify.
    pub fn clean_termination(&self) -> bool {
        self.tls_clean_termination
    }

    /// Checks the address the receiver listens on against what protects
    /// it: plain TCP beyond loopback needs `--insecure`; x509 without
    /// client verification there is warned about.
    pub fn check(&self, bound: &Uri) -> Result<()> {
        let protection = match (&self.tls_creds, &self.tls_psk) {
            (Some(_), _) if !self.tls_verify_peer => Protection::AnyClient,
            (Some(_), _) | (None, Some(_)) => Protection::Tls,
            (None, None) => Protection::Plain,
        };
        check(Role::Destination, bound, protection, self.insecure)
    }
}

/// Which side of a migration we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `multifd send`: guest memory leaves this host.
    Source,
    /// `multifd receive`: guest memory arrives (the address it listens on).
    Destination,
}

/// Who can reach a plain connection at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only this host: a Unix socket, or TCP on a loopback address.
    Local,
    /// Anyone with a route to the address.
    Network,
}

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or 127.x.y.z
/// mapped into IPv6).
fn loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Who can reach a plain connection at `uri`. A host name counts as local
/// when it is `localhost` (or under `.localhost`, which resolvers keep on
/// this host) or when every address it resolves to is loopback; a name that
/// does not resolve counts as network.
pub fn reach(uri: &Uri) -> Reach {
    let Uri::Tcp { host, port } = uri else {
        return Reach::Local;
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if loopback_ip(ip) {
            Reach::Local
        } else {
            Reach::Network
        };
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Reach::Local;
    }
    match (host.as_str(), *port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if !addrs.is_empty() && addrs.iter().all(|a| loopback_ip(a.ip())) {
                Reach::Local
            } else {
                Reach::Network
            }
        }
        Err(_) => Reach::Network,
    }
}

/// What protects the connections of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Nothing: plain TCP or a Unix socket.
    Plain,
    /// TLS, both sides authenticated.
    Tls,
    /// TLS on a destination that lets any client in (`--tls-verify-peer
    /// off`): the source knows whom it talks to, the destination does not.
    AnyClient,
}

/// Decides whether `role` may use `uri` with `protection`: for a
/// destination, `uri` is the address it actually listens on. Only a peer
/// the other side cannot tell from anyone else beyond loopback matters:
/// plain TCP there is refused (a usage error) unless `insecure`, then
/// warned about; a destination that lets any TLS client in is warned
/// about.
pub fn check(role: Role, uri: &Uri, protection: Protection, insecure: bool) -> Result<()> {
    if reach(uri) == Reach::Local || protection == Protection::Tls {
        return Ok(());
    }
    let text = warning(role, uri, protection);
    if protection == Protection::Plain && !insecure {
        return Err(Usage::with_hint(
            text,
            "--tls-creds DIR or --tls-psk DIR protects the migration; --insecure accepts the risk",
        )
        .into());
    }
    eprintln!("multifd: warning: {text}");
    Ok(())
}

/// The warning for a connection beyond loopback that `protection` does
/// not cover.
fn warning(role: Role, uri: &Uri, protection: Protection) -> String {
    match (role, protection) {
        (Role::Destination, Protection::AnyClient) => format!(
            "listening on {uri} with TLS but without verifying clients (--tls-verify-peer off): \
             anyone who can reach this port can connect and supply the guest memory this \
             receiver stores (see \"Trust model\" in the README)"
        ),
        (Role::Destination, _) => format!(
            "listening on {uri} without TLS: anyone who can reach this port can connect \
             and supply the guest memory this receiver stores (see \"Trust model\" in the README)"
        ),
        (Role::Source, _) => format!(
            "migrating to {uri} without TLS: guest memory crosses the network unencrypted; \
             anyone on the path can read it, and whoever answers at that address receives it \
             (see \"Trust model\" in the README)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reach {
        reach(&s.parse().unwrap())
    }

    #[test]
    fn loopback_and_unix_are_local() {
        for s in [
            "tcp:127.0.0.1:1",
            "tcp:127.1.2.3:1",
            "tcp:[::1]:1",
            "tcp:[::ffff:127.0.0.1]:1",
            "tcp:localhost:1",
            "tcp:LOCALHOST.:1",
            "tcp:db.localhost:1",
            "unix:/tmp/x.sock",
        ] {
            assert_eq!(r(s), Reach::Local, "{s}");
        }
    }

    #[test]
    fn everything_else_is_network() {
        for s in [
            "tcp:0.0.0.0:1",
            "tcp:[::]:1",
            "tcp:10.0.0.1:1",
            "tcp:192.168.1.1:1",
            "tcp:[fe80::1]:1",
            "tcp:[::ffff:10.0.0.1]:1",
            "tcp:no-such-host.invalid:1",
        ] {
            assert_eq!(r(s), Reach::Network, "{s}");
        }
    }

    #[test]
    fn warnings_say_what_is_exposed() {
        let uri: Uri = "tcp:0.0.0.0:4444".parse().unwrap();
        let w = warning(Role::Destination, &uri, Protection::Plain);
        assert!(
            w.contains("anyone who can reach") && w.contains("supply"),
            "{w}"
        );
        let w = warning(Role::Source, &uri, Protection::Plain);
        assert!(w.contains("read it"), "{w}");
        assert!(!w.contains('\n'));
        let w = warning(Role::Destination, &uri, Protection::AnyClient);
        assert!(w.contains("--tls-verify-peer off"), "{w}");
    }

    #[test]
    fn plain_beyond_loopback_needs_insecure() {
        let net: Uri = "tcp:0.0.0.0:4444".parse().unwrap();
        let local: Uri = "tcp:127.0.0.1:4444".parse().unwrap();
        for role in [Role::Source, Role::Destination] {
            let e = check(role, &net, Protection::Plain, false).unwrap_err();
            let usage = e.downcast_ref::<Usage>().expect("a usage error");
            assert!(usage.to_string().contains("without TLS"), "{usage}");
            assert!(usage.hint().is_some_and(|h| h.contains("--insecure")));
            check(role, &net, Protection::Plain, true).unwrap();
            check(role, &net, Protection::Tls, false).unwrap();
            check(role, &local, Protection::Plain, false).unwrap();
        }
        check(Role::Destination, &net, Protection::AnyClient, false).unwrap();
    }
}
