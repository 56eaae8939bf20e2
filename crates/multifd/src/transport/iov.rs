//! I/O vectors split by direction, like std's `IoSlice` / `IoSliceMut`.
//!
//! An [`IoSlice`] is memory the kernel *reads* (a vectored write to a
//! socket); an [`IoSliceMut`] is memory the kernel *writes* (a vectored
//! read). Safe code makes them only from `&[u8]` and `&mut [u8]`
//! respectively, so it cannot hand the kernel a shared borrow to write
//! through:
//!
//! ```compile_fail,E0308
//! let shared = vec![0u8; 4096];
//! // A vector the kernel writes into needs an exclusive borrow.
//! let _ = multifd::IoSliceMut::new(&shared[..]);
//! ```
//!
//! Inside the crate, `ram` also makes them over guest pages (which no Rust
//! reference ever points to) through the `unsafe` constructors, whose
//! contracts say what the page must satisfy.
#![allow(unsafe_code)]

use std::marker::PhantomData;

use vm_memory::VolatileSlice;

/// Memory the kernel reads from, borrowed for `'a` (a `struct iovec`).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct IoSlice<'a> {
    iov: libc::iovec,
    _borrow: PhantomData<&'a [u8]>,
}

/// Memory the kernel writes into, borrowed for `'a` (a `struct iovec`).
#[repr(transparent)]
pub struct IoSliceMut<'a> {
    iov: libc::iovec,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoSlice is a shared borrow of bytes (`&[u8]` is Send + Sync);
// the raw pointer inside is only handed to the kernel.
unsafe impl Send for IoSlice<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for IoSlice<'_> {}
// SAFETY: an IoSliceMut is an exclusive borrow of bytes (`&mut [u8]` is
// Send + Sync); the raw pointer inside is only handed to the kernel.
unsafe impl Send for IoSliceMut<'_> {}
// SAFETY: as for Send; `&IoSliceMut` gives no access to the bytes.
unsafe impl Sync for IoSliceMut<'_> {}

/// Shows where a vector points and how long it is (never its bytes).
fn debug_iov(name: &str, iov: &libc::iovec, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.debug_struct(name)
        .field("base", &iov.iov_base)
        .field("len", &iov.iov_len)
        .finish()
}

impl std::fmt::Debug for IoSlice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_iov("IoSlice", &self.iov, f)
    }
}

impl std::fmt::Debug for IoSliceMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_iov("IoSliceMut", &self.iov, f)
    }
}

impl<'a> IoSlice<'a> {
    /// A vector over `buf`, for a write.
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: buf.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            },
            _borrow: PhantomData,
        }
    }

    /// A vector over raw memory, for a write.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and readable for `'a`. Other
    /// threads or processes may write it meanwhile (guest memory): the
    /// kernel then sends some mix of its states.
    pub(crate) unsafe fn from_raw_parts(ptr: *const u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            },
            _borrow: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// True when the vector is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }
}

impl<'a> IoSliceMut<'a> {
    /// A vector over `buf`, for a read.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            _borrow: PhantomData,
        }
    }

    /// A vector over raw memory, for a read.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and writable for `'a`, and no Rust
    /// reference may point into it while the vector lives (guest memory is
    /// only ever reached through raw pointers and volatile accesses, so the
    /// kernel writing it cannot invalidate a reference).
    pub(crate) unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _borrow: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// True when the vector is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }
}

impl IoSlice<'_> {
    /// Copies the bytes into `out` (exactly [`IoSlice::len`] long) with
    /// volatile reads: the memory may be guest RAM that a guest writes
    /// meanwhile (a TLS connection encrypts from a private copy).
    pub(super) fn copy_to(&self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.len(),
            "copy of an I/O vector into a buffer of another size"
        );
        // SAFETY: the vector's memory is mapped and readable for its
        // lifetime (the constructors' contracts), and every other access to
        // guest memory is volatile or by the kernel.
        let slice = unsafe { VolatileSlice::new(self.iov.iov_base.cast(), self.iov.iov_len) };
        slice.copy_to(out);
    }
}

impl IoSliceMut<'_> {
    /// Fills the vector from `src` (exactly [`IoSliceMut::len`] long) with
    /// volatile writes (a TLS connection decrypts into a private buffer
    /// first).
    pub(super) fn copy_from(&mut self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len(),
            "copy into an I/O vector from a buffer of another size"
        );
        // SAFETY: the vector's memory is mapped and writable for its
        // lifetime and borrowed exclusively (or guest memory no reference
        // points into), as its constructors require.
        let slice = unsafe { VolatileSlice::new(self.iov.iov_base.cast(), self.iov.iov_len) };
        slice.copy_from(src);
    }

    /// Fills `src.len()` bytes of the vector from offset `at` on, with
    /// volatile writes (a TLS connection copies each decrypted record
    /// where it belongs).
    pub(super) fn copy_from_at(&mut self, at: usize, src: &[u8]) {
        assert!(
            at <= self.len() && src.len() <= self.len() - at,
            "copy past the end of an I/O vector"
        );
        // SAFETY: `at + src.len()` is within the vector (checked above),
        // whose memory is mapped and writable for its lifetime and
        // borrowed exclusively (or guest memory no reference points into),
        // as its constructors require.
        let slice =
            unsafe { VolatileSlice::new(self.iov.iov_base.cast::<u8>().add(at), src.len()) };
        slice.copy_from(src);
    }
}

/// A vector the vectored transfer loop can move bytes through; the
/// direction is the type's, so a write can never be given an
/// [`IoSliceMut`]'s job or the reverse.
pub(super) trait Vector {
    /// True: the kernel reads the memory (`writev`); false: it writes it (`readv`).
    const KERNEL_READS: bool;
    /// The raw `iovec`.
    fn raw(&self) -> libc::iovec;
    /// Drops the first `n` bytes (after a partial transfer).
    fn advance(&mut self, n: usize);
}

/// Moves an `iovec`'s base `n` bytes on.
fn advance_raw(iov: &mut libc::iovec, n: usize) {
    assert!(n <= iov.iov_len, "advancing past the end of an I/O vector");
    // `wrapping_add` keeps this free of pointer-offset preconditions; with
    // `n <= len` the result stays inside (or one past) the same region.
    iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
    iov.iov_len -= n;
}

impl Vector for IoSlice<'_> {
    const KERNEL_READS: bool = true;
    fn raw(&self) -> libc::iovec {
        self.iov
    }
    fn advance(&mut self, n: usize) {
        advance_raw(&mut self.iov, n);
    }
}

impl Vector for IoSliceMut<'_> {
    const KERNEL_READS: bool = false;
    fn raw(&self) -> libc::iovec {
        self.iov
    }
    fn advance(&mut self, n: usize) {
        advance_raw(&mut self.iov, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_moves_base_and_length() {
        let buf = [1u8, 2, 3, 4];
        let mut v = IoSlice::new(&buf);
        v.advance(3);
        assert_eq!(v.len(), 1);
        // SAFETY: the base points at buf[3], inside `buf`.
        assert_eq!(unsafe { *v.raw().iov_base.cast::<u8>() }, 4);
        v.advance(1);
        assert!(v.is_empty());
    }

    #[test]
    #[should_panic(expected = "past the end")]
    fn advance_past_the_end_panics() {
        let mut buf = [0u8; 2];
        IoSliceMut::new(&mut buf).advance(3);
    }
}
