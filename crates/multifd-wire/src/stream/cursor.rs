//! A bounds-checked reader over the front of the decoder's input that turns
//! "not enough bytes" into a request for more instead of an error.

use crate::WireError;

/// Why decoding of the current item stopped.
#[derive(Debug)]
pub(super) enum Halt {
    /// The item is not complete: the buffer must hold at least this many bytes.
    NeedMore(usize),
    /// The bytes are invalid.
    Invalid(WireError),
}

impl From<WireError> for Halt {
    fn from(e: WireError) -> Self {
        Self::Invalid(e)
    }
}

/// Result of a decoding step.
pub(super) type Step<T> = Result<T, Halt>;

/// Reads big-endian primitives from the front of a buffer.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    /// The next `n` bytes.
    pub(super) fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.saturating_add(n);
        match self.buf.get(self.pos..end) {
            Some(bytes) => {
                self.pos = end;
                Ok(bytes)
            }
            None => Err(Halt::NeedMore(end)),
        }
    }

    /// The next `N` bytes as an array.
    pub(super) fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The next byte, without consuming it.
    pub(super) fn peek_u8(&self) -> Step<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(Halt::NeedMore(self.pos + 1))
    }

    pub(super) fn u8(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Step<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A counted string (u8 length + bytes) as raw bytes.
    pub(super) fn counted(&mut self) -> Step<&'a [u8]> {
        let len = self.u8()?;
        self.take(len.into())
    }

    /// A counted string that must be a non-empty UTF-8 name.
    pub(super) fn counted_name(&mut self, what: &'static str) -> Step<&'a str> {
        let bytes = self.counted()?;
        Ok(name_from_bytes(what, bytes)?)
    }
}

/// Checks that `bytes` is a non-empty UTF-8 name.
pub(super) fn name_from_bytes<'a>(
    what: &'static str,
    bytes: &'a [u8],
) -> Result<&'a str, WireError> {
    if bytes.is_empty() {
        return Err(WireError::BadName {
            what,
            reason: "empty",
        });
    }
    std::str::from_utf8(bytes).map_err(|_| WireError::BadName {
        what,
        reason: "not UTF-8",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_ask_for_the_total_size() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u8().unwrap(), 1);
        assert!(matches!(c.u32(), Err(Halt::NeedMore(5))));
        assert_eq!(c.pos(), 1, "a failed read consumes nothing");
        assert_eq!(c.u16().unwrap(), 0x0203);
        assert!(matches!(c.peek_u8(), Err(Halt::NeedMore(4))));
        assert!(matches!(
            Cursor::new(&[]).take(usize::MAX),
            Err(Halt::NeedMore(usize::MAX))
        ));
    }

    #[test]
    fn counted_names() {
        assert_eq!(Cursor::new(b"\x02m0").counted_name("t").unwrap(), "m0");
        assert!(matches!(
            Cursor::new(b"\x03m0").counted_name("t"),
            Err(Halt::NeedMore(4))
        ));
        assert!(matches!(
            Cursor::new(b"\x00").counted_name("t"),
            Err(Halt::Invalid(WireError::BadName {
                reason: "empty",
                ..
            }))
        ));
        assert!(matches!(
            Cursor::new(b"\x01\xff").counted_name("t"),
            Err(Halt::Invalid(WireError::BadName {
                reason: "not UTF-8",
                ..
            }))
        ));
    }
}
