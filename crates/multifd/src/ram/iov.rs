//! I/O vectors over guest memory or private buffers, for vectored socket I/O.
#![allow(unsafe_code)]

use std::marker::PhantomData;

/// One `struct iovec`, borrowed from its owner for `'a`.
///
/// An `IoVec` is only made from memory that stays valid for `'a`: a page of
/// a [`RamBlock`](super::RamBlock) (the block is borrowed), or a byte
/// buffer (borrowed). The kernel may read or write through it; Rust code
/// never does.
#[derive(Clone, Copy)]
pub struct IoVec<'a> {
    iov: libc::iovec,
    _owner: PhantomData<&'a [u8]>,
}

impl std::fmt::Debug for IoVec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVec")
            .field("base", &self.iov.iov_base)
            .field("len", &self.iov.iov_len)
            .finish()
    }
}

impl<'a> IoVec<'a> {
    /// An I/O vector over raw memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped (readable, and writable if the
    /// vector is used for reading from a socket) for `'a`.
    pub(crate) unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _owner: PhantomData,
        }
    }

    /// An I/O vector that the kernel reads from (a write to a socket).
    pub fn from_slice(buf: &'a [u8]) -> Self {
        // SAFETY: `buf` is valid for reads for `'a`. The pointer is only
        // handed to write-type system calls, which do not write through it.
        unsafe { Self::from_raw(buf.as_ptr().cast_mut(), buf.len()) }
    }

    /// An I/O vector that the kernel writes into (a read from a socket).
    pub fn from_mut_slice(buf: &'a mut [u8]) -> Self {
        // SAFETY: `buf` is exclusively borrowed and valid for writes for `'a`.
        unsafe { Self::from_raw(buf.as_mut_ptr(), buf.len()) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// True when the vector is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// The raw `iovec`, for the transport's system calls.
    pub(crate) fn raw(&self) -> libc::iovec {
        self.iov
    }

    /// Drops the first `n` bytes (after a partial transfer).
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(n <= self.iov.iov_len);
        // SAFETY: `n <= len`, so the new base stays inside (or one past) the
        // same region, which stays valid for `'a`.
        self.iov.iov_base = unsafe { self.iov.iov_base.cast::<u8>().add(n).cast() };
        self.iov.iov_len -= n;
    }
}
