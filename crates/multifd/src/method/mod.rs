//! Payload methods: how a batch of pages becomes a packet payload and back
//! (QEMU's `MultiFDMethods`: `send_prepare` / `recv`).
//!
//! The contract is `pages -> prepare() -> I/O vectors`. Every method keeps
//! its state per channel (one compression stream per channel for the whole
//! migration, as QEMU frames it). Zero-page detection has already run: a
//! method only sees normal pages.

mod incompressible;
mod nocomp;
mod zlib;
mod zstd;

use multifd_wire::PAGE_SIZE;
use multifd_wire::packet::{Compression, RamPacketHeader};

use crate::config::MethodConfig;
use crate::error::{Endpoint, Error, Result};
use crate::ram::{PageList, Staging};
use crate::transport::{Connection, IoSlice};

/// The data pages a sending method turns into a payload.
#[derive(Clone, Copy)]
pub(crate) enum DataPages<'a, 'p> {
    /// In guest memory, which the guest may be writing: only copied with
    /// volatile reads or handed to the kernel.
    Guest(PageList<'a, 'p>),
    /// Copies in the channel's own memory (read through the block's file):
    /// a compressor reads them as they are.
    Own(&'a Staging),
}

impl DataPages<'_, '_> {
    /// Number of pages.
    pub(crate) fn len(&self) -> usize {
        match self {
            DataPages::Guest(list) => list.len(),
            DataPages::Own(staging) => staging.data_len(),
        }
    }
}

/// The bytes a compressor reads for `pages`: the staged copies as they are,
/// guest pages first copied into `buf` (the guest may keep writing the
/// originals).
fn compressor_input<'a>(
    pages: DataPages<'a, '_>,
    buf: &'a mut Vec<u8>,
) -> Box<dyn Iterator<Item = &'a [u8]> + 'a> {
    match pages {
        DataPages::Guest(list) => {
            gather(list, buf);
            Box::new(std::iter::once(&buf[..]))
        }
        DataPages::Own(staging) => Box::new(staging.data_pages().map(|p| &p[..])),
    }
}

/// Sending half of a payload method, one instance per channel.
pub(crate) trait SendMethod: Send {
    /// The method's flag on the wire.
    fn compression(&self) -> Compression;

    /// Produces the payload for the data pages `pages`: pushes the I/O
    /// vectors to write after the header and returns the payload size.
    fn prepare<'a>(
        &'a mut self,
        pages: DataPages<'a, '_>,
        iovs: &mut Vec<IoSlice<'a>>,
    ) -> Result<u32>;
}

/// Receiving half of a payload method, one instance per channel.
pub(crate) trait RecvMethod: Send {
    /// Reads the payload described by `hdr` from `conn` and stores it into
    /// the packet's data pages `pages`, marking them received.
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        pages: PageList<'_, '_>,
        conn: &mut Connection,
    ) -> Result<()>;
}

/// A sending method for one channel.
pub(crate) fn new_send(cfg: &MethodConfig) -> Result<Box<dyn SendMethod>> {
    Ok(match cfg.compression {
        Compression::None => Box::new(nocomp::NoCompSend),
        Compression::Zlib => Box::new(zlib::ZlibSend::new(cfg.zlib_level)),
        Compression::Zstd => Box::new(zstd::ZstdSend::new(cfg.zstd_level)?),
        other => {
            return Err(Error::Unsupported(format!("compression {other}")));
        }
    })
}

/// A receiving method for one channel.
pub(crate) fn new_recv(cfg: &MethodConfig, channel: u8) -> Result<Box<dyn RecvMethod>> {
    Ok(match cfg.compression {
        Compression::None => Box::new(nocomp::NoCompRecv::new(channel)),
        Compression::Zlib => Box::new(zlib::ZlibRecv::new(channel)),
        Compression::Zstd => Box::new(zstd::ZstdRecv::new(channel)?),
        other => {
            return Err(Error::Unsupported(format!("compression {other}")));
        }
    })
}

/// Reads a compressed payload of `size` bytes into `buf`.
fn read_payload(conn: &mut Connection, channel: u8, size: u32, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(size as usize, 0);
    payload_read(conn.read_exact_or_eof(buf), channel)
}

/// The engine's error for how reading a packet's payload ended (every
/// method reads one: into guest RAM or into a buffer to decompress).
fn payload_read(r: std::io::Result<bool>, channel: u8) -> Result<()> {
    let endpoint = Endpoint::Channel(channel);
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::PeerClosed {
            endpoint,
            when: "after a packet header",
        }),
        Err(e) => {
            let when = "inside a packet payload";
            let context = format!("{endpoint}: read failed {when}");
            Err(Error::from_read(e, endpoint, when, |e| {
                Error::io(context, e)
            }))
        }
    }
}

/// Copies the pages into `buf`, back to back: the private copy a
/// compressor reads (the guest may keep writing the originals).
fn gather(pages: PageList<'_, '_>, buf: &mut Vec<u8>) {
    buf.resize(pages.len() * PAGE_SIZE, 0);
    for (chunk, page) in buf.chunks_exact_mut(PAGE_SIZE).zip(pages.iter()) {
        page.copy_to(chunk.try_into().expect("page-sized chunk"));
    }
}

/// Stores back-to-back pages from `buf` into `pages`.
fn scatter(pages: PageList<'_, '_>, buf: &[u8]) -> Result<()> {
    for (chunk, page) in buf.chunks_exact(PAGE_SIZE).zip(pages.iter()) {
        page.write(chunk.try_into().expect("page-sized chunk"))?;
    }
    Ok(())
}

/// The error for a compressed payload that does not decode to its pages.
fn corrupt(channel: u8, method: &'static str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        endpoint: Endpoint::Channel(channel),
        method,
        reason: reason.into(),
    }
}

/// The error for our compressor failing or overflowing a packet.
fn compression_failed(method: &'static str, reason: impl std::fmt::Display) -> Error {
    Error::Compression {
        method,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
