//! Guest RAM: named blocks of 4 KiB pages over `mmap`.
//!
//! A [`RamBlock`] is what QEMU calls a RAMBlock: a named, contiguous region
//! addressed by offsets inside it. Blocks are mapped either from a file
//! (`MAP_SHARED`, so a QEMU `memory-backend-file` image works and the bytes
//! land in the file) or anonymously. [`GuestRam`] is the set of blocks of one
//! migration, looked up by name.
//!
//! Guest memory is shared with whoever runs the guest, so no Rust reference
//! (`&[u8]`/`&mut [u8]`) is ever made over it: pages are copied and scanned
//! with volatile accesses (vm-memory's volatile slices, volatile vector
//! loads) and otherwise only handed to the kernel as I/O vectors. An offset
//! is checked once and then carried as a `Page` / `PageList`, which borrow
//! their block. This module and `transport` hold the only `unsafe` code of
//! the crate.

mod block;
mod holes;
mod huge_own_pages;
mod page;
mod received;
mod staged;
#[cfg(test)]
mod test_files;
mod write_tracker;
mod zero;
mod zstd_pages;

pub use block::{Access, RamBlock};
pub(crate) use block::{
    MappingWatch, Reserve, data_ranges, is_tmpfs, min_hole, physical_memory, punch, reserve_range,
};
pub(crate) use holes::Holes;
pub(crate) use huge_own_pages::HugeOwnPages;
pub(crate) use page::{PageBatch, PageList, PageRun};
pub(crate) use staged::{StagedRun, Staging};
pub use write_tracker::{WriteTracker, WriteTrackerError};
pub(crate) use zero::OwnPage;
pub(crate) use zstd_pages::{PageCompressor, PageDecompressor};

use crate::error::{Error, Result};
use multifd_wire::stream::RamBlockInfo;

/// The RAM blocks of one migration.
#[derive(Debug, Default)]
pub struct GuestRam {
    blocks: Vec<RamBlock>,
}

impl GuestRam {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a block; names must be unique.
    pub fn push(&mut self, block: RamBlock) -> Result<()> {
        if self.find(block.name()).is_some() {
            return Err(Error::Config(format!(
                "RAM block {:?} given twice",
                block.name()
            )));
        }
        self.blocks.push(block);
        Ok(())
    }

    /// All blocks, in the order they were added (the order of the MEM_SIZE list).
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Index of the block called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name() == name)
    }

    /// The block called `name`.
    pub fn get(&self, name: &str) -> Option<&RamBlock> {
        self.find(name).map(|i| &self.blocks[i])
    }

    /// Sum of all block lengths.
    pub fn total_len(&self) -> u64 {
        self.blocks.iter().map(RamBlock::len).sum()
    }

    /// The largest page size the blocks are backed with
    /// ([`RamBlock::page_size`]); 4096 when there are no blocks.
    pub fn page_size(&self) -> u64 {
        self.blocks
            .iter()
            .map(RamBlock::page_size)
            .max()
            .unwrap_or(multifd_wire::PAGE_SIZE_U64)
    }

    /// Total number of 4 KiB pages.
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(RamBlock::pages).sum()
    }

    /// Every region of a vm-memory `GuestMemoryMmap` as a block, without
    /// copying (see [`RamBlock::from_mmap`]), named by `name(index,
    /// region)`, read-write, not assumed zeroed.
    pub fn from_guest_memory<B: vm_memory::bitmap::Bitmap + Send + Sync + 'static>(
        memory: &vm_memory::GuestMemoryMmap<B>,
        mut name: impl FnMut(usize, &vm_memory::GuestRegionMmap<B>) -> String,
    ) -> Result<Self> {
        use vm_memory::GuestMemoryBackend;
        let mut ram = Self::new();
        for (i, region) in memory.iter().enumerate() {
            let id = name(i, region);
            ram.push(RamBlock::from_mmap(
                &id,
                region.get_mmap(),
                Access::ReadWrite,
                false,
            )?)?;
        }
        Ok(ram)
    }

    /// The MEM_SIZE block list describing these blocks.
    pub fn block_infos(&self) -> Vec<RamBlockInfo> {
        self.blocks
            .iter()
            .map(|b| RamBlockInfo {
                idstr: b.name().to_owned(),
                used_length: b.len(),
            })
            .collect()
    }
}
