//! QEMU-style migration URIs: `tcp:HOST:PORT` and `unix:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT` (HOST may be a name, an IPv4 address or `[IPv6]`).
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port; 0 when listening means "any free port".
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Uri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("bad URI {s:?}: {why}"));
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            let port = port
                .parse()
                .map_err(|_| bad("port is not a number 0-65535"))?;
            Ok(Self::Tcp {
                host: host.to_owned(),
                port,
            })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            Err(bad("expected tcp:HOST:PORT or unix:PATH"))
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Uri>().unwrap(),
            Uri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        let v6: Uri = "tcp:[::1]:5".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:5");
        assert_eq!(
            "unix:/tmp/s".parse::<Uri>().unwrap(),
            Uri::Unix("/tmp/s".into())
        );
        for bad in [
            "tcp:1.2.3.4",
            "tcp::80",
            "tcp:h:99999",
            "file:/x",
            "unix:",
            "exec:cat",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad}");
        }
    }
}
