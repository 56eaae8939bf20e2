//! zstd streams that read and write guest pages in place.
//!
//! The compressor reads a run of guest pages straight from the mapping and
//! the decompressor writes a run of guest pages straight into it, so a
//! packet needs no staging copy on either side. Both go through libzstd's
//! C interface with raw pointers: no Rust reference is ever made over guest
//! memory. libzstd only reads an input buffer during the call that is given
//! it (it copies what it keeps into its own window) and only writes the
//! output buffer between `pos` and `size`, so the bounds of a [`PageRun`]
//! are the bounds of what it touches.
//!
//! A page the guest writes while it is being compressed still gives a
//! valid stream (the compressor only reads it, and every byte it read is
//! encoded); such a page is dirty and is sent again.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::ptr::NonNull;

use zstd::zstd_safe::zstd_sys;

use super::page::PageRun;
use crate::error::Result;

/// libzstd's name for the error `code` (a static string).
fn error_name(code: usize) -> &'static str {
    // SAFETY: ZSTD_getErrorName returns a pointer to a static,
    // NUL-terminated string for any code.
    unsafe { CStr::from_ptr(zstd_sys::ZSTD_getErrorName(code)) }
        .to_str()
        .unwrap_or("unknown zstd error")
}

/// The result of a libzstd call: a size, or the error's name.
fn check(code: usize) -> std::result::Result<usize, &'static str> {
    // SAFETY: ZSTD_isError only inspects the value.
    if unsafe { zstd_sys::ZSTD_isError(code) } != 0 {
        Err(error_name(code))
    } else {
        Ok(code)
    }
}

/// A zstd compression stream (one frame, never ended) whose input is guest
/// pages.
pub(crate) struct PageCompressor {
    cctx: NonNull<zstd_sys::ZSTD_CCtx>,
}

// SAFETY: a ZSTD_CCtx is plain memory owned by this value and used by one
// thread at a time (every use takes `&mut self`); libzstd keeps no
// thread-local state for it.
unsafe impl Send for PageCompressor {}

impl PageCompressor {
    /// A stream compressing at `level`.
    pub(crate) fn new(level: i32) -> std::result::Result<Self, String> {
        // SAFETY: plain constructor; a null result is an allocation failure.
        let cctx = NonNull::new(unsafe { zstd_sys::ZSTD_createCCtx() })
            .ok_or_else(|| "cannot allocate a zstd compression context".to_owned())?;
        let this = Self { cctx };
        // SAFETY: `cctx` is a live context owned by `this`.
        let r = unsafe {
            zstd_sys::ZSTD_CCtx_setParameter(
                this.cctx.as_ptr(),
                zstd_sys::ZSTD_cParameter::ZSTD_c_compressionLevel,
                level as c_int,
            )
        };
        check(r).map_err(|e| e.to_owned())?;
        Ok(this)
    }

    /// One compression step over `out[*out_pos..]`: feeds `input` (its
    /// bytes from `*in_pos` on) with `op`, advancing both positions.
    /// Returns what libzstd returns (for a flush: bytes still to flush).
    ///
    /// # Safety
    /// `input` must be valid for reads of `in_len` bytes for the call (or
    /// `in_len` be 0).
    unsafe fn step(
        &mut self,
        input: *const u8,
        in_len: usize,
        in_pos: &mut usize,
        out: &mut [u8],
        out_pos: &mut usize,
        op: zstd_sys::ZSTD_EndDirective,
    ) -> std::result::Result<usize, &'static str> {
        assert!(*in_pos <= in_len && *out_pos <= out.len());
        let mut ib = zstd_sys::ZSTD_inBuffer {
            src: input.cast::<c_void>(),
            size: in_len,
            pos: *in_pos,
        };
        let mut ob = zstd_sys::ZSTD_outBuffer {
            dst: out.as_mut_ptr().cast::<c_void>(),
            size: out.len(),
            pos: *out_pos,
        };
        // SAFETY: the context is live and ours; `ob` covers `out`, a
        // buffer we borrow mutably; `ib` covers memory valid for reads (the
        // caller's contract). libzstd reads `ib` only within the call and
        // writes `ob` only in `pos..size`.
        let r = unsafe { zstd_sys::ZSTD_compressStream2(self.cctx.as_ptr(), &mut ob, &mut ib, op) };
        let r = check(r)?;
        assert!(ib.pos <= in_len && ob.pos <= out.len());
        (*in_pos, *out_pos) = (ib.pos, ob.pos);
        Ok(r)
    }

    /// Feeds the guest pages of `run` ("continue": no flush), appending
    /// compressed bytes at `out[*out_pos..]`. Fails with libzstd's error,
    /// or with `Ok(false)` if `out` filled up.
    pub(crate) fn compress_run(
        &mut self,
        run: PageRun<'_>,
        out: &mut [u8],
        out_pos: &mut usize,
    ) -> std::result::Result<bool, &'static str> {
        // SAFETY: the run's `len` bytes lie inside the block's mapping,
        // which stays mapped (and readable) while `run` borrows the block.
        // The guest may write them meanwhile: libzstd only reads them,
        // through a raw pointer, and no Rust reference to guest memory
        // exists.
        unsafe { self.feed(run.ptr(), run.len() as usize, out, out_pos) }
    }

    /// As [`PageCompressor::compress_run`], for bytes of this process's
    /// own memory (pages read through a RAM file).
    pub(crate) fn compress_bytes(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        out_pos: &mut usize,
    ) -> std::result::Result<bool, &'static str> {
        // SAFETY: `input` is a slice we borrow: valid for reads of its
        // length for the call.
        unsafe { self.feed(input.as_ptr(), input.len(), out, out_pos) }
    }

    /// Feeds `len` bytes at `input` ("continue"), appending at
    /// `out[*out_pos..]`; `Ok(false)` if `out` filled up.
    ///
    /// # Safety
    /// `input` must be valid for reads of `len` bytes for the call.
    unsafe fn feed(
        &mut self,
        input: *const u8,
        len: usize,
        out: &mut [u8],
        out_pos: &mut usize,
    ) -> std::result::Result<bool, &'static str> {
        let mut pos = 0;
        while pos < len {
            // SAFETY: the caller's contract.
            unsafe {
                self.step(
                    input,
                    len,
                    &mut pos,
                    out,
                    out_pos,
                    zstd_sys::ZSTD_EndDirective::ZSTD_e_continue,
                )
            }?;
            if *out_pos == out.len() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Flushes what was fed (the packet's end), appending at
    /// `out[*out_pos..]`. Fails with libzstd's error, or with `Ok(false)`
    /// if `out` filled up.
    pub(crate) fn flush(
        &mut self,
        out: &mut [u8],
        out_pos: &mut usize,
    ) -> std::result::Result<bool, &'static str> {
        let mut none = 0;
        loop {
            // SAFETY: no input (length 0).
            let left = unsafe {
                self.step(
                    std::ptr::null(),
                    0,
                    &mut none,
                    out,
                    out_pos,
                    zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
                )
            }?;
            if left == 0 {
                return Ok(true);
            }
            if *out_pos == out.len() {
                return Ok(false);
            }
        }
    }
}

impl Drop for PageCompressor {
    fn drop(&mut self) {
        // SAFETY: the context is ours and not used after this.
        unsafe { zstd_sys::ZSTD_freeCCtx(self.cctx.as_ptr()) };
    }
}

/// A zstd decompression stream whose output is guest pages.
pub(crate) struct PageDecompressor {
    dctx: NonNull<zstd_sys::ZSTD_DCtx>,
}

// SAFETY: as for `PageCompressor`: owned memory, used through `&mut self`.
unsafe impl Send for PageDecompressor {}

impl PageDecompressor {
    /// A stream refusing frames whose window is over `2^window_log_max`.
    pub(crate) fn new(window_log_max: u32) -> std::result::Result<Self, String> {
        // SAFETY: plain constructor; a null result is an allocation failure.
        let dctx = NonNull::new(unsafe { zstd_sys::ZSTD_createDCtx() })
            .ok_or_else(|| "cannot allocate a zstd decompression context".to_owned())?;
        let this = Self { dctx };
        // SAFETY: `dctx` is a live context owned by `this`.
        let r = unsafe {
            zstd_sys::ZSTD_DCtx_setParameter(
                this.dctx.as_ptr(),
                zstd_sys::ZSTD_dParameter::ZSTD_d_windowLogMax,
                window_log_max as c_int,
            )
        };
        check(r).map_err(|e| e.to_owned())?;
        Ok(this)
    }

    /// One decompression step from `input[*in_pos..]` into the `out_len`
    /// bytes at `out`, from `*out_pos` on.
    ///
    /// # Safety
    /// `out` must be valid for writes of `out_len` bytes for the call.
    unsafe fn step(
        &mut self,
        input: &[u8],
        in_pos: &mut usize,
        out: *mut u8,
        out_len: usize,
        out_pos: &mut usize,
    ) -> std::result::Result<(), &'static str> {
        assert!(*in_pos <= input.len() && *out_pos <= out_len);
        let mut ib = zstd_sys::ZSTD_inBuffer {
            src: input.as_ptr().cast::<c_void>(),
            size: input.len(),
            pos: *in_pos,
        };
        let mut ob = zstd_sys::ZSTD_outBuffer {
            dst: out.cast::<c_void>(),
            size: out_len,
            pos: *out_pos,
        };
        // SAFETY: the context is live and ours; `ib` covers `input`;
        // `ob` covers memory valid for writes (the caller's contract), of
        // which libzstd writes only `pos..size`.
        let r = unsafe { zstd_sys::ZSTD_decompressStream(self.dctx.as_ptr(), &mut ob, &mut ib) };
        check(r)?;
        assert!(ib.pos <= input.len() && ob.pos <= out_len);
        (*in_pos, *out_pos) = (ib.pos, ob.pos);
        Ok(())
    }

    /// Decompresses from `input[*in_pos..]` straight into the guest pages
    /// of `run`, from byte `*filled` of the run on, advancing both. Stops
    /// when the run is full or the input gives no more. A read-only block
    /// is an `Err`; a stream libzstd rejects is `Ok(Err(its error's
    /// name))`.
    pub(crate) fn decompress_into_run(
        &mut self,
        input: &[u8],
        in_pos: &mut usize,
        run: PageRun<'_>,
        filled: &mut usize,
    ) -> Result<std::result::Result<(), &'static str>> {
        run.check_writable()?;
        // SAFETY: the run lies inside the block's mapping, which stays
        // mapped while `run` borrows the block, and the block is mapped
        // writable (checked above); libzstd writes it through a raw
        // pointer only, so no Rust reference to guest memory exists.
        Ok(unsafe { self.step(input, in_pos, run.ptr(), run.len() as usize, filled) })
    }

    /// Decompresses from `input[*in_pos..]` into `out[*out_pos..]` (a
    /// private buffer), advancing both.
    pub(crate) fn decompress(
        &mut self,
        input: &[u8],
        in_pos: &mut usize,
        out: &mut [u8],
        out_pos: &mut usize,
    ) -> std::result::Result<(), &'static str> {
        // SAFETY: `out` is a buffer we borrow mutably, valid for writes of
        // its length.
        unsafe { self.step(input, in_pos, out.as_mut_ptr(), out.len(), out_pos) }
    }
}

impl Drop for PageDecompressor {
    fn drop(&mut self) {
        // SAFETY: the context is ours and not used after this.
        unsafe { zstd_sys::ZSTD_freeDCtx(self.dctx.as_ptr()) };
    }
}
