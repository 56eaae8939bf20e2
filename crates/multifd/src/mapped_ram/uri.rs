//! `file:PATH[,offset=N]`: where a mapped-ram file is, as QEMU names it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// A mapped-ram file and the offset its migration stream starts at
/// (QEMU's `file:PATH[,offset=N]`; the bytes before the offset are not
/// part of the migration and are left as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileUri {
    /// The file.
    pub path: PathBuf,
    /// Where the stream starts (0 by default).
    pub offset: u64,
}

impl FileUri {
    /// The file `path`, stream at offset 0.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            offset: 0,
        }
    }
}

/// Largest offset accepted (1 EiB).
const MAX_OFFSET: u64 = 1 << 60;

/// An offset as QEMU's `qemu_strtosz` reads it: decimal or `0x` hex, with
/// an optional binary suffix `B`, `K`, `M`, `G`, `T`.
fn parse_offset(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'B' | b'b' => (&s[..s.len() - 1], 0),
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()?
        }
        Some(_) => return None,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    n.checked_mul(1u64 << shift).filter(|&v| v <= MAX_OFFSET)
}

impl FromStr for FileUri {
    type Err = Error;

    /// `file:PATH` or `file:PATH,offset=N`; a path alone (no `file:`) is
    /// taken as it is.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("file URI {s:?}: {why}"));
        let rest = s.strip_prefix("file:").unwrap_or(s);
        let (path, offset) = match rest.rsplit_once(",offset=") {
            Some((path, off)) => (
                path,
                parse_offset(off).ok_or_else(|| bad("bad offset (decimal or 0x hex, K/M/G/T)"))?,
            ),
            None => (rest, 0),
        };
        if path.is_empty() {
            return Err(bad("no path"));
        }
        Ok(Self {
            path: PathBuf::from(path),
            offset,
        })
    }
}

impl fmt::Display for FileUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file:{}", self.path.display())?;
        if self.offset != 0 {
            write!(f, ",offset={}", self.offset)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u: FileUri = "file:/tmp/x.mr".parse().unwrap();
        assert_eq!((u.path.to_str().unwrap(), u.offset), ("/tmp/x.mr", 0));
        let u: FileUri = "file:/tmp/a,b.mr,offset=0x1000".parse().unwrap();
        assert_eq!((u.path.to_str().unwrap(), u.offset), ("/tmp/a,b.mr", 4096));
        assert_eq!("x,offset=1M".parse::<FileUri>().unwrap().offset, 1 << 20);
        assert_eq!("x,offset=4096".parse::<FileUri>().unwrap().offset, 4096);
        assert_eq!(u.to_string(), "file:/tmp/a,b.mr,offset=4096");
        for bad in [
            "file:",
            "file:x,offset=",
            "file:x,offset=-1",
            "file:x,offset=0x",
            "file:x,offset=12Q",
            "file:x,offset=2000000T",
            "file:x,offset=99999999999999999999999",
            ",offset=5",
        ] {
            assert!(bad.parse::<FileUri>().is_err(), "{bad:?} accepted");
        }
    }
}
