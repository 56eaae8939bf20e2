//! Value parsers for command-line options.
//!
//! Every numeric option is checked when clap parses it, so a bad value is a
//! usage error (exit status 2, one line) before anything starts, and never
//! reaches code that could panic on it (`Duration::from_secs_f64` panics on
//! negative, NaN or huge values).

use std::time::Duration;

/// Longest duration any option takes: one week. Anything longer is a typo
/// (or a unit mix-up); "never" is spelled 0 where an option allows it.
pub const MAX_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// Shortest non-zero duration: 1 ms (a socket timeout of zero means
/// "none", so anything that would round to it is refused).
const MIN_SECS: f64 = 0.001;

/// Largest size any option takes: 1 EiB.
pub const MAX_BYTES: u64 = 1 << 60;

/// A page: sizes of guest RAM are whole pages.
const PAGE: u64 = 4096;

/// Seconds as a decimal number, finite, not negative, at most [`MAX_SECS`],
/// and either 0 or at least 1 ms.
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| "expected a number of seconds, like 10 or 0.5".to_owned())?;
    if v.is_nan() || v.is_infinite() {
        return Err("expected a finite number of seconds".into());
    }
    if v.is_sign_negative() {
        return Err("a duration cannot be negative".into());
    }
    if v > MAX_SECS {
        return Err(format!("at most {MAX_SECS} seconds (one week)"));
    }
    if v != 0.0 && v < MIN_SECS {
        return Err("a duration must be 0 or at least 0.001 seconds".into());
    }
    Ok(Duration::from_secs_f64(v))
}

/// A timeout that must not be zero (`--handshake-timeout`,
/// `--connect-timeout`, `--accept-timeout`).
pub fn timeout(s: &str) -> Result<Duration, String> {
    let d = seconds(s)?;
    if d.is_zero() {
        return Err("must be more than 0 seconds".into());
    }
    Ok(d)
}

/// A timeout where 0 means "never" (`--idle-timeout`).
pub fn timeout_or_never(s: &str) -> Result<Duration, String> {
    seconds(s)
}

/// A size in bytes: a whole number with an optional unit (`4GiB`,
/// `512MiB`, `1G` = 10^9, `4096`), or a decimal one with a unit (`1.5GiB`);
/// at most [`MAX_BYTES`].
fn bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err("a size cannot be negative".into());
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err("expected a size like 4GiB, 512MiB or 1048576".into());
    }
    let factor: u64 = if unit.is_empty() {
        1
    } else {
        format!("1{unit}")
            .parse::<bytesize::ByteSize>()
            .map_err(|_| format!("unknown unit {unit:?} (B, KiB, MiB, GiB, TiB, kB, MB, GB, ...)"))?
            .as_u64()
    };
    let too_big = || format!("at most {}", bytesize::ByteSize(MAX_BYTES));
    let n = if number.contains('.') {
        let v: f64 = number
            .parse()
            .map_err(|_| format!("{number:?} is not a number"))?;
        let n = v * factor as f64;
        if !n.is_finite() || n > MAX_BYTES as f64 {
            return Err(too_big());
        }
        n.round() as u64
    } else {
        let n: u128 = number.parse().map_err(|_| too_big())?;
        let n = n.checked_mul(u128::from(factor)).ok_or_else(too_big)?;
        if n > u128::from(MAX_BYTES) {
            return Err(too_big());
        }
        n as u64
    };
    Ok(n)
}

/// A limit in bytes that must not be zero (`--max-ram`).
pub fn byte_limit(s: &str) -> Result<u64, String> {
    match bytes(s)? {
        0 => Err("must be more than 0 bytes".into()),
        n => Ok(n),
    }
}

/// A guest RAM size: a non-zero multiple of 4096 bytes (`--size`).
pub fn ram_size(s: &str) -> Result<bytesize::ByteSize, String> {
    match bytes(s)? {
        0 => Err("must be more than 0 bytes".into()),
        n if !n.is_multiple_of(PAGE) => Err(format!("{n} bytes is not a multiple of 4096")),
        n => Ok(bytesize::ByteSize(n)),
    }
}

/// A whole number of pages in bytes, 0 included (the raw blast's `--bytes`).
pub fn page_bytes(s: &str) -> Result<bytesize::ByteSize, String> {
    match bytes(s)? {
        n if !n.is_multiple_of(PAGE) => Err(format!("{n} bytes is not a multiple of 4096")),
        n => Ok(bytesize::ByteSize(n)),
    }
}

/// A switch spelled as QEMU spells its booleans: `on` or `off` (also
/// `true`/`false`, `yes`/`no`).
pub fn on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

/// A distinguished name as GnuTLS prints it and QEMU's `tls-authz`
/// matches it: `ATTR=value` pairs joined by commas, in certificate order
/// (`O=org,CN=name`). Checked for shape only: a name that is well formed
/// but wrong is found out when a client is denied (its name is shown).
pub fn gnutls_dn(s: &str) -> Result<String, String> {
    let fail = |why: &str| {
        Err(format!(
            "{why}: expected ATTR=value pairs joined by commas, in certificate order, \
             like O=org,CN=name"
        ))
    };
    if s.is_empty() {
        return fail("empty");
    }
    if s.contains(",,") {
        // QEMU's -object syntax doubles commas; here they are single.
        return fail("a doubled comma (QEMU's -object escaping is not needed here)");
    }
    // Split on commas that are not escaped (GnuTLS prints `\,` inside a value).
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            ',' if !escaped => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
    }
    parts.push(&s[start..]);
    for part in parts {
        match part.split_once('=') {
            Some((attr, _)) if !attr.is_empty() && attr.trim() == attr => {}
            _ => return fail(&format!("{part:?} is not ATTR=value")),
        }
    }
    Ok(s.to_owned())
}

/// A VM UUID in its canonical form (`--uuid`).
pub fn uuid(s: &str) -> Result<[u8; 16], String> {
    multifd::parse_uuid(s).map_err(|_| {
        "expected 32 hex digits as 8-4-4-4-12, like 12345678-9abc-def0-1122-334455667788".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(timeout("10").unwrap(), Duration::from_secs(10));
        assert_eq!(timeout("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(timeout_or_never("0").unwrap(), Duration::ZERO);
        assert_eq!(timeout("604800").unwrap(), Duration::from_secs(604_800));
        for bad in [
            "-1",
            "-0",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "infinity",
            "1e400",
            "604801",
            "1e20",
            "",
            "ten",
            "5s",
            "0x10",
            "0.0000001",
        ] {
            assert!(timeout_or_never(bad).is_err(), "{bad:?} accepted");
        }
        assert!(timeout("0").is_err());
        assert!(timeout("0.0").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(byte_limit("4GiB").unwrap(), 4 << 30);
        assert_eq!(byte_limit("4 GiB").unwrap(), 4 << 30);
        assert_eq!(byte_limit("1G").unwrap(), 1_000_000_000);
        assert_eq!(byte_limit("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(byte_limit("4096").unwrap(), 4096);
        assert_eq!(byte_limit("1EiB").unwrap(), MAX_BYTES);
        for bad in [
            "0",
            "0GiB",
            "-1",
            "-1GiB",
            "GiB",
            "",
            "2EiB",
            "99999999999999999999999999",
            "99999999999999999999999999999999999999999999",
            "1e400",
            "1.2.3GiB",
            "4 GiBs",
            "4XB",
            "inf",
            "NaN",
            "1é",
        ] {
            assert!(byte_limit(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(ram_size("1GiB").unwrap().as_u64(), 1 << 30);
        assert!(ram_size("1000").is_err());
        assert!(ram_size("1G").is_err());
        assert!(ram_size("0").is_err());
        assert_eq!(page_bytes("0").unwrap().as_u64(), 0);
        assert!(page_bytes("4095").is_err());
    }

    #[test]
    fn switches_and_names() {
        assert_eq!(on_off("on"), Ok(true));
        assert_eq!(on_off("OFF"), Ok(false));
        assert_eq!(on_off("false"), Ok(false));
        assert!(on_off("").is_err() && on_off("1").is_err() && on_off("onn").is_err());
        assert_eq!(
            gnutls_dn("O=multifd,CN=client").unwrap(),
            "O=multifd,CN=client"
        );
        assert_eq!(gnutls_dn("CN=a=b").unwrap(), "CN=a=b");
        assert!(gnutls_dn(r"O=Acme\, Inc.,CN=x").is_ok());
        for bad in ["", "client", "O=x,,CN=y", "O=x,", "=x", " CN=x", "O=x,CN"] {
            assert!(gnutls_dn(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uuids() {
        let u = uuid("12345678-9ABC-def0-1122-334455667788").unwrap();
        assert_eq!(u[0], 0x12);
        assert_eq!(u[15], 0x88);
        for bad in [
            "",
            "1234",
            "12345678-9abc-def0-1122-33445566778",
            "12345678-9abc-def0-1122-3344556677889",
            "123456789abcdef01122334455667788",
            "0é345678-9abc-def0-1122-33445566778",
            "12345678-9abc-def0-1122-33445566778é",
            "1234567-89abc-def0-1122-334455667788",
            "+2345678-9abc-def0-1122-334455667788",
            "12345678-9abc-def0-1122-3344556677gg",
            "１2345678-9abc-def0-1122-334455667788",
        ] {
            assert!(uuid(bad).is_err(), "{bad:?} accepted");
        }
    }
}
