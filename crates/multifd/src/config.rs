//! Migration parameters both sides must agree on (QEMU has no negotiation).

use std::time::Duration;

use multifd_wire::packet::Compression;

use crate::error::{Error, Result};

/// Where zero pages are detected (QEMU's `zero-page-detection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroPageDetection {
    /// By the channel threads; zero pages are listed in packets (QEMU 10.0 default).
    #[default]
    Multifd,
    /// By the migration thread; zero pages go as ZERO records on the main channel.
    Legacy,
    /// No detection: zero pages travel as data.
    None,
}

impl ZeroPageDetection {
    /// QEMU's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Multifd => "multifd",
            Self::Legacy => "legacy",
            Self::None => "none",
        }
    }
}

/// When SYNC packets are sent (QEMU's `multifd-flush-after-each-section`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlushMode {
    /// Once per pass over RAM, marked by a MULTIFD_FLUSH record (default since 8.1).
    #[default]
    PerRound,
    /// At the end of every `ram` section; no FLUSH records.
    PerSection,
}

/// The payload method of every channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodConfig {
    /// none, zlib or zstd.
    pub compression: Compression,
    /// `multifd-zlib-level`, 0..=9 (QEMU default 1).
    pub zlib_level: u32,
    /// `multifd-zstd-level`, 0..=20 (QEMU default 1).
    pub zstd_level: i32,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            compression: Compression::None,
            zlib_level: 1,
            zstd_level: 1,
        }
    }
}

/// Parameters shared by senders and receivers.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Number of multifd channels, 1..=255 (QEMU default 2).
    pub channels: u8,
    /// Payload method.
    pub method: MethodConfig,
    /// Zero-page detection mode.
    pub zero_page_detection: ZeroPageDetection,
    /// Flush mode.
    pub flush_mode: FlushMode,
    /// The destination's VM UUID: sent in every initial packet, checked by receivers.
    pub uuid: [u8; 16],
    /// How long a new connection may take to identify itself (send its first
    /// bytes / initial packet), how long all channels may take to arrive
    /// once the first one did, and how long the main stream may then take
    /// to deliver its setup (header, configuration, the `ram` block list).
    pub handshake_timeout: Duration,
    /// How long a sender tries to connect: refused connections are
    /// retried, a host that does not answer fails when it runs out.
    pub connect_timeout: Duration,
    /// A migration fails when no byte moves on any of its connections for
    /// this long ([`Error::Stalled`](crate::Error::Stalled)); zero: never
    /// (for a source that pauses before switchover).
    pub idle_timeout: Duration,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            channels: 2,
            method: MethodConfig::default(),
            zero_page_detection: ZeroPageDetection::default(),
            flush_mode: FlushMode::default(),
            uuid: [0; 16],
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl MigrationConfig {
    /// Checks ranges and combinations QEMU also refuses.
    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(Error::Config(
                "at least one multifd channel is needed".into(),
            ));
        }
        match self.method.compression {
            Compression::None | Compression::Zlib | Compression::Zstd => {}
            other => {
                return Err(Error::Config(format!(
                    "compression {other} needs vendor hardware, which this build does not drive"
                )));
            }
        }
        if self.method.zlib_level > 9 {
            return Err(Error::Config("zlib level must be 0..=9".into()));
        }
        if !(0..=20).contains(&self.method.zstd_level) {
            return Err(Error::Config("zstd level must be 0..=20".into()));
        }
        Ok(())
    }
}

/// Formats a UUID the canonical way (8-4-4-4-12 hex digits).
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses a canonical UUID string: 32 hex digits (either case) as
/// 8-4-4-4-12, with dashes. Anything else is an error, never a panic
/// (the input is looked at byte by byte, so multi-byte characters are just
/// wrong bytes).
pub fn parse_uuid(s: &str) -> Result<[u8; 16]> {
    const DASHES: [usize; 4] = [8, 13, 18, 23];
    let bad = || Error::Config(format!("bad UUID {s:?}"));
    let bytes = s.as_bytes();
    if bytes.len() != 36 {
        return Err(bad());
    }
    let mut digits = [0u8; 32];
    let mut n = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if DASHES.contains(&i) {
            if b != b'-' {
                return Err(bad());
            }
            continue;
        }
        digits[n] = char::from(b)
            .to_digit(16)
            .filter(|_| b.is_ascii())
            .ok_or_else(bad)? as u8;
        n += 1;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = pair[0] << 4 | pair[1];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let s = "12345678-9abc-def0-1122-334455667788";
        let u = parse_uuid(s).unwrap();
        assert_eq!(u[0], 0x12);
        assert_eq!(format_uuid(&u), s);
        assert!(parse_uuid("1234").is_err());
        assert_eq!(
            parse_uuid("12345678-9ABC-DEF0-1122-334455667788").unwrap(),
            u,
            "upper case"
        );
    }

    #[test]
    fn uuid_malformed_is_an_error_not_a_panic() {
        for bad in [
            // 36 bytes, 32 of them besides the dashes, with a multi-byte
            // character across a digit pair: the parser this replaces
            // sliced into it and panicked.
            "0\u{e9}345678-9abc-def0-1122-33445566778",
            "12345678-9abc-def0-1122-33445566\u{20ac}7",
            "\u{e9}2345678-9abc-def0-1122-33445566778",
            // Dashes in the wrong places, or none (it took the first).
            "1234567-89abc-def0-1122-334455667788",
            "123456789abcdef0112233445566778899aa",
            "------------------------------------",
            // A sign (from_str_radix takes "+2"), non-hex digits, a space.
            "+2345678-9abc-def0-1122-334455667788",
            "12345678-9abc-def0-1122-3344556677gg",
            "12345678-9abc-def0-1122-33445566 788",
            "",
        ] {
            assert!(parse_uuid(bad).is_err(), "{bad:?} accepted");
        }
    }
}
