//! Whom a migration trusts, said out loud.
//!
//! There is no TLS yet: every connection is plain (unencrypted,
//! unauthenticated). On a Unix socket or loopback TCP only this host can
//! take part; anywhere else, anyone who can reach the address can. That is
//! a warning today. Once TLS exists, plain TCP beyond loopback will need an
//! explicit `--insecure`: [`check_plain`] is the one place that decides,
//! and its `Reach::Network` arm is where that error goes.

use std::net::{IpAddr, ToSocketAddrs};

use anyhow::Result;
use multifd::Uri;

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

/// Decides whether a plain connection on `uri` may be used by `role`: for
/// a destination, `uri` is the address it actually listens on. Today the
/// answer is always yes, with a warning on stderr when the address is
/// reachable from the network.
pub fn check_plain(role: Role, uri: &Uri) -> Result<()> {
    match reach(uri) {
        Reach::Local => Ok(()),
        // The seam: once TLS exists, this arm fails unless `--insecure`
        // was given, with a message that names both.
        Reach::Network => {
            eprintln!("multifd: warning: {}", warning(role, uri));
            Ok(())
        }
    }
}

/// The warning for plain TCP beyond loopback.
fn warning(role: Role, uri: &Uri) -> String {
    match role {
        Role::Destination => format!(
            "listening on {uri} without TLS: anyone who can reach this port can connect \
             and supply the guest memory this receiver stores (see \"Trust model\" in the README)"
        ),
        Role::Source => format!(
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
        let w = warning(Role::Destination, &uri);
        assert!(
            w.contains("anyone who can reach") && w.contains("supply"),
            "{w}"
        );
        let w = warning(Role::Source, &uri);
        assert!(w.contains("read it"), "{w}");
        assert!(!w.contains('\n'));
    }
}
