//! Payload methods: how a batch of pages becomes a packet payload and back
//! (QEMU's `MultiFDMethods`: `send_prepare` / `recv`).
//!
//! The contract is `pages -> prepare() -> I/O vectors`. Every method keeps
//! its state per channel (one compression stream per channel for the whole
//! migration, as QEMU frames it). Zero-page detection has already run: a
//! method only sees normal pages.

mod nocomp;
mod zlib;
mod zstd;

use multifd_wire::packet::{Compression, RamPacketHeader};

use crate::config::MethodConfig;
use crate::error::Result;
use crate::ram::{IoVec, RamBlock};
use crate::transport::Connection;

/// Sending half of a payload method, one instance per channel.
pub trait SendMethod: Send {
    /// The method's flag on the wire.
    fn compression(&self) -> Compression;

    /// Produces the payload for `normal` pages of `block`: pushes the I/O
    /// vectors to write after the header and returns the payload size.
    fn prepare<'a>(
        &'a mut self,
        block: &'a RamBlock,
        normal: &[u64],
        iovs: &mut Vec<IoVec<'a>>,
    ) -> Result<u32>;
}

/// Receiving half of a payload method, one instance per channel.
pub trait RecvMethod: Send {
    /// Reads the payload described by `hdr` from `conn` and stores its
    /// normal pages into `block`, marking them received.
    fn load(
        &mut self,
        hdr: &RamPacketHeader,
        block: &RamBlock,
        conn: &mut Connection,
    ) -> Result<()>;
}

/// A sending method for one channel.
pub fn new_send(cfg: &MethodConfig) -> Result<Box<dyn SendMethod>> {
    Ok(match cfg.compression {
        Compression::None => Box::new(nocomp::NoCompSend),
        Compression::Zlib => Box::new(zlib::ZlibSend::new(cfg.zlib_level)),
        Compression::Zstd => Box::new(zstd::ZstdSend::new(cfg.zstd_level)?),
        other => {
            return Err(crate::Error::Unsupported(format!("compression {other}")));
        }
    })
}

/// A receiving method for one channel.
pub fn new_recv(cfg: &MethodConfig, channel: u8) -> Result<Box<dyn RecvMethod>> {
    Ok(match cfg.compression {
        Compression::None => Box::new(nocomp::NoCompRecv::new(channel)),
        Compression::Zlib => Box::new(zlib::ZlibRecv::new(channel)),
        Compression::Zstd => Box::new(zstd::ZstdRecv::new(channel)?),
        other => {
            return Err(crate::Error::Unsupported(format!("compression {other}")));
        }
    })
}

/// Reads a compressed payload of `hdr.next_packet_size` bytes into `buf`.
fn read_payload(conn: &mut Connection, channel: u8, size: u32, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(size as usize, 0);
    payload_read(conn.read_exact_or_eof(buf), channel)
}

/// The engine's error for how reading a packet's payload ended (every
/// method reads one: into guest RAM or into a buffer to decompress).
fn payload_read(r: std::io::Result<bool>, channel: u8) -> Result<()> {
    let endpoint = crate::error::Endpoint::Channel(channel);
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(crate::Error::PeerClosed {
            endpoint,
            when: "after a packet header",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(crate::Error::PeerClosed {
            endpoint,
            when: "inside a packet payload",
        }),
        Err(e) => Err(crate::Error::io(
            format!("multifd channel {channel}: reading packet payload"),
            e,
        )),
    }
}

/// Copies the pages at `offsets` of `block` into `buf`, back to back: the
/// private copy a compressor reads (the guest may keep writing the originals).
fn gather(block: &RamBlock, offsets: &[u64], buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(offsets.len() * multifd_wire::PAGE_SIZE, 0);
    for (page, &off) in buf.chunks_exact_mut(multifd_wire::PAGE_SIZE).zip(offsets) {
        block.read_page(off, page.try_into().expect("page-sized chunk"))?;
    }
    Ok(())
}

/// Stores back-to-back pages from `buf` at `offsets` of `block`.
fn scatter(block: &RamBlock, offsets: &[u64], buf: &[u8]) -> Result<()> {
    for (page, &off) in buf.chunks_exact(multifd_wire::PAGE_SIZE).zip(offsets) {
        block.write_page(off, page)?;
    }
    Ok(())
}

/// The error for a compressed payload that does not decode to its pages.
fn corrupt(channel: u8, method: &'static str, reason: impl Into<String>) -> crate::Error {
    crate::Error::Corrupt {
        endpoint: crate::error::Endpoint::Channel(channel),
        method,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests;
