//! How failures reach the user: one line on stderr.
//!
//! `multifd: error: WHAT: CAUSE: CAUSE (hint: ...)`: the cause chain once
//! (the engine's messages never repeat their cause), then, where the CLI
//! knows which of its flags changes the outcome, a hint naming it. The
//! engine's messages do not name flags; hints are the CLI's business.
//! Usage errors (bad flags or values) exit with status 2, anything else
//! with 1.

use std::fmt;
use std::process::ExitCode;

use clap::error::ErrorKind;

/// A context message with advice for the user, shown at the end of the
/// error line (use it with `anyhow::Context::context`).
#[derive(Debug)]
pub struct Advice {
    /// What was being done (shown in the chain).
    pub context: String,
    /// What the user can do about it.
    pub hint: String,
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

/// A command line that parses but cannot be used as given (flags that
/// contradict each other, plain TCP beyond loopback without `--insecure`):
/// reported like a parse error, one line and exit status 2.
#[derive(Debug)]
pub struct Usage {
    message: String,
    hint: Option<String>,
}

impl Usage {
    /// A usage error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
        }
    }

    /// A usage error with advice naming the flags that resolve it.
    pub fn with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// The advice, if any.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Usage {}

/// Whether `e` is a usage error (exit status 2).
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Usage>().is_some())
}

/// The hint for an engine error whose outcome a flag changes.
fn engine_hint(e: &multifd::Error) -> Option<&'static str> {
    Some(match e {
        multifd::Error::Stalled { .. } => {
            "--idle-timeout SECS sets how long nothing may move; 0 waits forever"
        }
        multifd::Error::ConnectTimeout { .. } => "--connect-timeout SECS tries for longer",
        multifd::Error::HandshakeTimeout { .. } => {
            "--handshake-timeout SECS gives connections longer to identify themselves"
        }
        multifd::Error::RamLimit { .. } => "--max-ram SIZE raises the limit",
        multifd::Error::SourceUuidMismatch { .. } | multifd::Error::UuidMismatch { .. } => {
            "--uuid must be the destination VM's UUID on both sides"
        }
        multifd::Error::TlsCredentials { .. } => {
            "--tls-creds DIR holds ca-cert.pem, and server-cert.pem + server-key.pem \
             (receive) or client-cert.pem + client-key.pem (send); --tls-psk DIR holds \
             keys.psk with a line USERNAME:HEXKEY for --tls-psk-username (default qemu)"
        }
        multifd::Error::Tls { reason, .. } if reason.contains("not valid for name") => {
            "--tls-hostname NAME checks the destination's certificate for another name"
        }
        _ => return None,
    })
}

/// The error as one line: the chain, then a hint if there is one.
pub fn one_line(e: &anyhow::Error) -> String {
    let hint = e
        .downcast_ref::<Advice>()
        .map(|a| a.hint.clone())
        .or_else(|| {
            e.chain()
                .find_map(|c| c.downcast_ref::<Usage>())
                .and_then(|u| u.hint().map(str::to_owned))
        })
        .or_else(|| {
            e.chain()
                .find_map(|c| c.downcast_ref::<multifd::Error>())
                .and_then(engine_hint)
                .map(str::to_owned)
        });
    let mut line = format!("{e:#}");
    if let Some(hint) = hint {
        line.push_str(" (hint: ");
        line.push_str(&hint);
        line.push(')');
    }
    flatten(&line)
}

/// `s` with its lines joined by spaces and runs of blanks squeezed.
fn flatten(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reports a command-line parse failure: help and version go out as clap
/// prints them; an error is one line and exit status 2.
pub fn usage(e: &clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    eprintln!("multifd: error: {}", usage_line(&e.render().to_string()));
    ExitCode::from(2)
}

/// clap's rendered error as one line: its message and tips, without the
/// usage block and the "For more information" line.
fn usage_line(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        match parts.last_mut() {
            Some(last) if !line.starts_with("tip:") => {
                last.push(' ');
                last.push_str(line);
            }
            _ => parts.push(line.to_owned()),
        }
    }
    let mut out = flatten(&parts.join("; "));
    out.push_str(" (try --help)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn engine_errors_get_the_flag_that_changes_them() {
        let e = anyhow::Error::new(multifd::Error::Stalled {
            endpoint: multifd::Endpoint::Main,
            when: "in the middle of the stream",
            after_ms: 60_000,
        })
        .context("receiving a migration");
        let line = one_line(&e);
        assert!(
            line.starts_with("receiving a migration: main channel: stalled"),
            "{line}"
        );
        assert!(
            line.ends_with(
                "(hint: --idle-timeout SECS sets how long nothing may move; 0 waits forever)"
            ),
            "{line}"
        );
        let e = anyhow::Error::new(multifd::Error::Cancelled).context("x");
        assert_eq!(one_line(&e), "x: migration cancelled");
    }

    #[test]
    fn advice_is_shown_once_at_the_end() {
        let e: anyhow::Result<()> = Err(multifd::Error::UnknownBlock {
            endpoint: multifd::Endpoint::Main,
            name: "pc.bios".into(),
        })
        .context(Advice {
            context: "receiving a migration".into(),
            hint: "--ram pc.bios=FILE".into(),
        });
        let line = one_line(&e.unwrap_err());
        assert_eq!(
            line,
            "receiving a migration: main channel: unknown RAM block \"pc.bios\" (hint: --ram pc.bios=FILE)"
        );
    }

    #[test]
    fn usage_errors_are_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --listen <LISTEN>\n\nUsage: multifd receive --listen <LISTEN>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(rendered),
            "the following required arguments were not provided: --listen <LISTEN> (try --help)"
        );
        let rendered = "error: unexpected argument '--lisen' found\n\n  tip: a similar argument exists: '--listen'\n\nUsage: x\n";
        assert_eq!(
            usage_line(rendered),
            "unexpected argument '--lisen' found; tip: a similar argument exists: '--listen' (try --help)"
        );
    }
}
