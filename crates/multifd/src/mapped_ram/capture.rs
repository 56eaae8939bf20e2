//! Capturing a network migration into a mapped-ram file: a [`RamProvider`]
//! for [`crate::receive`] whose RAM blocks are mappings of the file's pages
//! regions, so the receiver (any method, any number of channels, legacy
//! zero pages) writes every page at its fixed place in the file, the last
//! copy of a page over the earlier ones.
//!
//! When the receiver has the block list it calls
//! [`provide_for`](RamProvider::provide_for): the file is created, its
//! main stream written up to the block list (the configuration with the
//! `mapped-ram` capability added, each block's entry and header, as a QEMU
//! source lays them out), each pages region reserved and mapped. After the
//! receive, [`Capture::finish`] writes each block's bitmap (a page is
//! present where the file holds data: pages that were only ever zero were
//! never written and stay holes), gives back the reserved space nothing
//! was written to, and writes the rest of the stream: the end of the
//! `ram` START, SWITCHOVER_START if the source sent it, the `ram` END, and
//! the device state, EOF and vmdesc verbatim.

use multifd_wire::PAGE_SIZE_U64;
use multifd_wire::mapped_ram::{BitmapBuf, BlockLayout};
use multifd_wire::stream::{Command, RamBlockInfo};

use super::FileUri;
use super::file::{self, FileStream};
use crate::destination::{Incoming, RamProvider, StreamSetup};
use crate::error::{Error, Result};
use crate::ram::{self, Access, GuestRam, MappingWatch, RamBlock};

/// A mapped-ram file being written by a receiver (see the module
/// documentation).
#[derive(Debug)]
pub struct Capture {
    uri: FileUri,
    state: Option<State>,
}

struct State {
    stream: FileStream,
    layouts: Vec<BlockLayout>,
    section: u32,
    ours: bool,
    /// The mappings of the pages regions handed out as RAM.
    mappings: Vec<MappingWatch>,
}

impl State {
    /// Undoes the file (see [`file::discard`]): while any of its pages
    /// regions is still mapped, it is not cut.
    fn discard(&self, uri: &FileUri) {
        let mapped = self.mappings.iter().any(MappingWatch::alive);
        file::discard(uri, self.stream.file(), self.ours, mapped);
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("layouts", &self.layouts)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// A capture into `uri` (created when the block list arrives; at
    /// offset 0 it must not exist yet).
    pub fn new(uri: FileUri) -> Self {
        Self { uri, state: None }
    }

    /// The file.
    pub fn uri(&self) -> &FileUri {
        &self.uri
    }

    /// Completes the file after `incoming` (the receive's result with this
    /// capture's RAM) arrived whole. Returns the file's length.
    pub fn finish(mut self, incoming: &Incoming) -> Result<u64> {
        let Some(mut st) = self.state.take() else {
            return Err(Error::Internal("finishing a capture that never started"));
        };
        let result = complete(&mut st, &self.uri, incoming);
        if result.is_err() {
            st.discard(&self.uri);
        }
        result
    }

    /// Removes the file again (after a failed receive). A file that was
    /// there before (a capture at an offset) is cut back to the offset, or,
    /// while the capture's RAM is still held (its pages are mappings of
    /// the file), left at its length with the stream's magic cleared.
    pub fn discard(mut self) {
        if let Some(st) = self.state.take() {
            st.discard(&self.uri);
        }
    }

    fn start(&mut self, setup: &StreamSetup<'_>) -> Result<GuestRam> {
        let (f, ours) = file::create(&self.uri)?;
        let path = self.uri.path.clone();
        let mut stream = FileStream::new(f, &path, self.uri.offset);
        let mut st_layouts = Vec::new();
        let made = (|| -> Result<GuestRam> {
            stream.prefix(setup.configuration)?;
            let layouts = stream.ram_start(setup.ram_section_id, setup.blocks)?;
            let mut ram = GuestRam::new();
            for (b, layout) in setup.blocks.iter().zip(&layouts) {
                // Pages arrive through a mapping: a hole of a full file
                // system must not turn into a SIGBUS.
                ram::reserve_range(stream.file(), &path, layout.pages_offset(), b.used_length)?;
                ram.push(RamBlock::map_file_range(
                    &b.idstr,
                    stream.file(),
                    &path,
                    layout.pages_offset(),
                    b.used_length,
                    Access::ReadWrite,
                    true,
                )?)?;
            }
            st_layouts = layouts;
            Ok(ram)
        })();
        match made {
            Ok(ram) => {
                self.state = Some(State {
                    stream,
                    layouts: st_layouts,
                    section: setup.ram_section_id,
                    ours,
                    mappings: ram.blocks().iter().map(RamBlock::watch).collect(),
                });
                Ok(ram)
            }
            Err(e) => {
                // The blocks made so far are gone with `made`.
                file::discard(&self.uri, stream.file(), ours, false);
                Err(e)
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // Neither finished nor discarded: an incomplete file is useless
        // (and QEMU crashes on some), so it goes.
        if let Some(st) = self.state.take() {
            st.discard(&self.uri);
        }
    }
}

impl RamProvider for Capture {
    fn provide(&mut self, _blocks: &[RamBlockInfo]) -> Result<GuestRam> {
        Err(Error::Internal(
            "a capture needs the source's configuration (provide_for)",
        ))
    }

    fn provide_for(&mut self, setup: &StreamSetup<'_>) -> Result<GuestRam> {
        if self.state.is_some() {
            return Err(Error::Internal("a capture provides RAM once"));
        }
        self.start(setup)
    }
}

fn complete(st: &mut State, uri: &FileUri, incoming: &Incoming) -> Result<u64> {
    let path = &uri.path;
    let blocks = incoming.ram.blocks();
    if blocks.len() != st.layouts.len() {
        return Err(Error::Internal("the captured RAM is not the capture's"));
    }
    let mut bitmaps = Vec::with_capacity(blocks.len());
    for (block, layout) in blocks.iter().zip(&st.layouts) {
        block.release_unwritten()?;
        let mut bitmap = BitmapBuf::for_length(layout.used_length())
            .map_err(|_| Error::Internal("a captured block of a bad length"))?;
        let start = layout.pages_offset();
        let data = ram::data_ranges(st.stream.file(), start, layout.next_offset())
            .map_err(|e| Error::io(format!("looking for data in {}", path.display()), e))?;
        for r in data {
            let first = (r.start - start) / PAGE_SIZE_U64;
            let end = (r.end - start).div_ceil(PAGE_SIZE_U64);
            for k in first..end {
                bitmap
                    .set(k, true)
                    .map_err(|_| Error::Internal("a data range past its block"))?;
            }
        }
        bitmaps.push(bitmap.as_bytes().to_vec());
    }
    file::write_bitmaps(st.stream.file(), path, &st.layouts, bitmaps)?;
    let section = st.section;
    st.stream.eos(section)?;
    if incoming.switchover_start {
        st.stream.command(Command::SwitchoverStart);
    }
    st.stream.end(section);
    st.stream.eos(section)?;
    st.stream.raw(&incoming.tail)?;
    st.stream.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapped_ram::{ReadLimits, read_file};
    use multifd_wire::stream::Configuration;

    /// A capture into an existing file at an offset, given up while its
    /// RAM (mappings of the file) is still held: the RAM stays readable
    /// (cutting the file under it would make every touch a SIGBUS), the
    /// bytes before the offset stay, and what follows no longer reads as a
    /// migration. Given up after its RAM is gone, the file is cut back to
    /// the offset; at offset 0 it is removed, and the RAM still reads.
    #[test]
    fn a_capture_given_up_never_cuts_pages_still_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.mr");
        std::fs::write(&path, [0xab; 4096]).unwrap();
        let at_offset = FileUri {
            path: path.clone(),
            offset: 4096,
        };
        let cfg = Configuration {
            machine: "none".into(),
            ..Configuration::default()
        };
        let blocks = [RamBlockInfo {
            idstr: "m0".into(),
            used_length: 64 * PAGE_SIZE_U64,
        }];
        let setup = StreamSetup {
            configuration: &cfg,
            ram_section_id: 2,
            blocks: &blocks,
        };
        let mut page = [0u8; 4096];

        let mut capture = Capture::new(at_offset.clone());
        let ram = capture.provide_for(&setup).unwrap();
        ram.blocks()[0].write_page(5 * 4096, &[0x5a; 4096]).unwrap();
        capture.discard();
        ram.blocks()[0].read_page(5 * 4096, &mut page).unwrap();
        assert_eq!(page, [0x5a; 4096]);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 4096 + 64 * 4096);
        assert_eq!(bytes[..4096], [0xab; 4096]);
        assert_eq!(bytes[4096..4100], [0; 4]);
        assert!(read_file(&at_offset, &ReadLimits::default()).is_err());
        drop(ram);

        // Dropped unfinished, its RAM gone first.
        let mut capture = Capture::new(at_offset.clone());
        drop(capture.provide_for(&setup).unwrap());
        drop(capture);
        assert_eq!(std::fs::read(&path).unwrap(), [0xab; 4096]);

        let new_file = FileUri::new(dir.path().join("new.mr"));
        let mut capture = Capture::new(new_file.clone());
        let ram = capture.provide_for(&setup).unwrap();
        ram.blocks()[0].write_page(0, &[0x33; 4096]).unwrap();
        drop(capture);
        assert!(!new_file.path.exists());
        ram.blocks()[0].read_page(0, &mut page).unwrap();
        assert_eq!(page, [0x33; 4096]);
    }
}
