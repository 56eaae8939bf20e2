//! One mapped RAM block.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::FileOffset;
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegion;

use super::received::ReceivedBitmap;
use crate::error::{Error, Result};
use multifd_wire::PAGE_SIZE_U64;

/// Whether a block may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mapped read-only (a migration source reading an image).
    ReadOnly,
    /// Mapped read-write (a destination).
    ReadWrite,
}

/// Whether a new RAM file's space is reserved when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Reserve {
    /// Always (a write into a hole through the mapping of a full file
    /// system is a SIGBUS).
    #[default]
    Always,
    /// Not on tmpfs, for files whose pages are only written through their
    /// descriptors (a full tmpfs fails such a write with an error).
    NotOnTmpfs,
}

/// A named RAM block mapped into this process.
///
/// Invariants: the mapping is `len` bytes long, page-aligned, and lives as
/// long as the `RamBlock`; `len` is a non-zero multiple of 4096.
pub struct RamBlock {
    name: String,
    len: u64,
    region: Arc<dyn Mapping>,
    access: Access,
    /// True when the memory is known to read as zero where nothing was
    /// written yet (fresh anonymous memory or a file we just created), so a
    /// zero page that was never received needs no write.
    starts_zeroed: bool,
    /// True when every page was faulted in when the block was made
    /// (`MAP_POPULATE` on a writable mapping) or by
    /// [`RamBlock::prefault`]: writing through the mapping then takes no
    /// fault that would first clear the page.
    populated: bool,
    path: Option<PathBuf>,
    /// The size of the pages the kernel backs the mapping with (see
    /// [`RamBlock::page_size`]); migration pages are 4096 bytes whatever it is.
    page_size: u64,
    received: ReceivedBitmap,
}

impl std::fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamBlock")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("access", &self.access)
            .field("path", &self.path)
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

/// A mapping a block's pages live in: one we made, or the caller's
/// vm-memory region (any dirty bitmap type), kept alive by the `Arc`.
trait Mapping: Send + Sync {
    /// Start of the mapping.
    fn ptr(&self) -> *mut u8;
    /// The file behind it, if any.
    fn file(&self) -> Option<&FileOffset>;
    /// Whether it is a shared mapping (writes land in the file, and the
    /// file's contents are the memory's).
    fn shared(&self) -> bool;
}

impl<B: Bitmap + Send + Sync> Mapping for MmapRegion<B> {
    fn ptr(&self) -> *mut u8 {
        self.as_ptr()
    }
    fn file(&self) -> Option<&FileOffset> {
        self.file_offset()
    }
    fn shared(&self) -> bool {
        self.flags() & libc::MAP_SHARED != 0
    }
}

/// Tells whether a block's mapping still exists (a block or a clone of its
/// handle in a page run keeps it), without keeping it.
#[derive(Clone)]
pub(crate) struct MappingWatch(std::sync::Weak<dyn Mapping>);

impl MappingWatch {
    /// Whether the mapping still exists: once it does not, it never will
    /// again.
    pub(crate) fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// Advice about a block's mapping (see [`RamBlock::advise`]).
#[derive(Clone, Copy)]
enum Advice {
    /// `MADV_RANDOM`: no read-around on a fault.
    NoReadAround,
    /// `MADV_HUGEPAGE`: transparent huge pages where allowed.
    HugePages,
}

/// Checks a block's name and length: the name must fit the wire (1 to 255
/// bytes, QEMU's `idstr`), the length be a non-zero multiple of 4096 that
/// this process can map.
fn check_name_and_len(name: &str, len: u64) -> Result<usize> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::Config(format!(
            "RAM block name {name:?}: must be 1 to 255 bytes"
        )));
    }
    if len == 0 || !len.is_multiple_of(PAGE_SIZE_U64) {
        return Err(Error::Config(format!(
            "RAM block {name:?}: length {len} is not a non-zero multiple of 4096"
        )));
    }
    usize::try_from(len)
        .map_err(|_| Error::Config(format!("RAM block {name:?}: length {len} too large")))
}

impl RamBlock {
    /// A watch on this block's mapping (see [`MappingWatch`]).
    pub(crate) fn watch(&self) -> MappingWatch {
        MappingWatch(Arc::downgrade(&self.region))
    }

    /// Anonymous, zero-filled memory.
    pub fn anonymous(name: &str, len: u64) -> Result<Self> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        Self::map(name, len, None, Access::ReadWrite, true, flags)
    }

    /// Maps an existing file of exactly `len` bytes (or any length when
    /// `len` is `None`), shared, like a QEMU `memory-backend-file`.
    ///
    /// Read-write: the file's space is reserved first ([`Error::NoSpace`]
    /// when the file system cannot hold it), so a write into a page that
    /// was a hole cannot kill the process with SIGBUS later. Its contents
    /// are not changed.
    pub fn open_file(name: &str, path: &Path, access: Access, len: Option<u64>) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .map_err(|e| Error::io(format!("opening RAM file {}", path.display()), e))?;
        let actual = file
            .metadata()
            .map_err(|e| Error::io(format!("reading size of {}", path.display()), e))?
            .len();
        if let Some(want) = len
            && want != actual
        {
            return Err(Error::Config(format!(
                "RAM file {} is {actual} bytes but block {name:?} is {want} bytes",
                path.display()
            )));
        }
        check_name_and_len(name, actual)?;
        if access == Access::ReadWrite {
            reserve(&file, path, actual)?;
        }
        // A destination is populated up front (write faults come one page
        // at a time); a source is not: read faults map 16 pages each, spread
        // over the channel threads, which beats one serial populate pass.
        let populate = access == Access::ReadWrite;
        Self::map_file(name, path, file, actual, access, false, populate)
    }

    /// Creates a new file of `len` bytes, reserves its space and maps it
    /// read-write. Used for snapshot blocks and `--ram` files that do not
    /// exist yet.
    ///
    /// Never writes over anything: when a file or a symbolic link is
    /// already at `path` this is [`Error::FileExists`] (`O_CREAT|O_EXCL|
    /// O_NOFOLLOW`: a link planted there is not followed). When the file
    /// system cannot hold `len` bytes it is [`Error::NoSpace`]; on any
    /// error the file is removed again.
    pub fn create_file(name: &str, path: &Path, len: u64) -> Result<Self> {
        Self::create(name, path, len, false, Reserve::Always)
    }

    /// [`RamBlock::create_file`], reserving the space as `reserve` says.
    pub(crate) fn create_reserving(
        name: &str,
        path: &Path,
        len: u64,
        reserve: Reserve,
    ) -> Result<Self> {
        Self::create(name, path, len, false, reserve)
    }

    /// Like [`RamBlock::create_file`], but an existing *empty* file at
    /// `path` (one the user named, so a symbolic link is followed) is
    /// sized and used too. A non-empty one is [`Error::FileExists`].
    pub(crate) fn create_or_size_empty(
        name: &str,
        path: &Path,
        len: u64,
        reserve: Reserve,
    ) -> Result<Self> {
        Self::create(name, path, len, true, reserve)
    }

    /// Maps `len` bytes of `file` from file offset `offset` on (a multiple
    /// of 4096), shared: the block's pages *are* that part of the file (a
    /// mapped-ram file's pages region). The caller reserves the range's
    /// space first when the block is writable (a write into a hole of a
    /// full file system through a mapping is a SIGBUS), and says whether
    /// the range reads as zero where nothing is written yet
    /// (`starts_zeroed`: a file it just created). The mapping is advised
    /// `MADV_RANDOM` (no read-around, as for [`RamBlock::create_file`]).
    pub(crate) fn map_file_range(
        name: &str,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
        access: Access,
        starts_zeroed: bool,
    ) -> Result<Self> {
        check_name_and_len(name, len)?;
        if !offset.is_multiple_of(PAGE_SIZE_U64) {
            return Err(Error::Config(format!(
                "RAM block {name:?}: file offset {offset:#x} is not page-aligned"
            )));
        }
        let dup = file.try_clone().map_err(|e| {
            Error::io(
                format!("duplicating the descriptor of {}", path.display()),
                e,
            )
        })?;
        let size = check_name_and_len(name, len)?;
        let page_size = file_page_size(file);
        check_page_multiple(name, path, offset, len, file)?;
        let prot = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        let region = MmapRegion::<()>::build(Some(FileOffset::new(dup, offset)), size, prot, flags)
            .map_err(|e| Error::Map {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        let block = Self {
            name: name.to_owned(),
            len,
            region: Arc::new(region),
            access,
            starts_zeroed,
            populated: false,
            path: Some(path.to_owned()),
            page_size,
            received: ReceivedBitmap::new(len / PAGE_SIZE_U64),
        };
        block.advise(Advice::NoReadAround);
        Ok(block)
    }

    fn create(
        name: &str,
        path: &Path,
        len: u64,
        take_empty: bool,
        reserve_space: Reserve,
    ) -> Result<Self> {
        check_name_and_len(name, len)?;
        let ctx = || format!("creating RAM file {}", path.display());
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            // Guest memory: readable by its owner only.
            .mode(0o600)
            .open(path);
        let (file, ours) = match created {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && take_empty => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(ctx(), e))?;
                let md = file.metadata().map_err(|e| Error::io(ctx(), e))?;
                if !md.is_file() || md.len() != 0 {
                    return Err(Error::FileExists {
                        path: path.to_owned(),
                    });
                }
                (file, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::FileExists {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        let mapped = check_page_multiple(name, path, 0, len, &file)
            .and_then(|()| {
                file.set_len(len)
                    .map_err(|e| Error::io(format!("sizing RAM file {}", path.display()), e))
            })
            .and_then(|()| match reserve_space {
                Reserve::NotOnTmpfs if is_tmpfs(&file) => Ok(()),
                _ => reserve(&file, path, len),
            })
            .and_then(|()| Self::map_file(name, path, file, len, Access::ReadWrite, true, false));
        let block = match mapped {
            Ok(block) => block,
            Err(e) => {
                if ours {
                    // Ours since the exclusive create: give the space back.
                    let _ = std::fs::remove_file(path);
                } else {
                    // The user's empty file: empty again.
                    let _ = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_len(0));
                }
                return Err(e);
            }
        };
        // A new file holds nothing worth reading ahead: a write fault must
        // not read the pages around it in (8 MiB with a large read_ahead_kb),
        // which fills the page cache with zeros and makes reserved but
        // never-written ranges look like data to SEEK_HOLE, so that
        // `release_unwritten` could not give them back. Best effort.
        block.advise(Advice::NoReadAround);
        block.advise_huge_pages();
        Ok(block)
    }

    /// Asks for transparent huge pages (`MADV_HUGEPAGE`) for a file we
    /// created and mapped, where the file system gives them when asked
    /// (tmpfs mounted `huge=advise`); elsewhere this changes nothing. Best
    /// effort. It does not change [`RamBlock::page_size`]: on tmpfs the
    /// space reservation (`fallocate`) has already allocated the file's
    /// pages, small ones on a `huge=advise` mount (fallocate sees no
    /// mapping and its advice), so the advice only lets khugepaged collapse
    /// them later, and takes effect at once only where pages are faulted in
    /// rather than reserved (file systems that cannot reserve).
    ///
    /// Only for files, whose whole space is reserved before the migration
    /// (`fallocate`): huge pages there cost no memory that was not taken
    /// already. Never for anonymous destination RAM, which is allocated as
    /// pages arrive: there a hostile source writing one byte every 2 MiB
    /// would make each 4 KiB it sends cost a 2 MiB page, 512 times the
    /// memory it should.
    fn advise_huge_pages(&self) {
        if self.access != Access::ReadWrite || self.region.file().is_none() {
            return;
        }
        self.advise(Advice::HugePages);
    }

    /// Gives the kernel `advice` for the block's whole mapping. Best
    /// effort: a kernel or file system that ignores it changes nothing.
    fn advise(&self, advice: Advice) {
        let flag = match advice {
            Advice::NoReadAround => libc::MADV_RANDOM,
            Advice::HugePages => libc::MADV_HUGEPAGE,
        };
        // SAFETY: the range is exactly the block's mapping, page-aligned
        // and alive while `self` is; both pieces of advice only change the
        // kernel's policy for it (read-ahead, which page size later faults
        // and khugepaged may use), never its contents, protection or
        // extent.
        unsafe {
            libc::madvise(self.region.ptr().cast(), self.len as usize, flag);
        }
    }

    fn map_file(
        name: &str,
        path: &Path,
        file: File,
        len: u64,
        access: Access,
        starts_zeroed: bool,
        populate: bool,
    ) -> Result<Self> {
        // MAP_POPULATE: one kernel pass sets up every page-table entry,
        // instead of one fault per page later on the channel threads
        // (first-touch faults dominate a loopback migration here). A fresh
        // file is never populated: that would read all its zeros in.
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE | populate;
        Self::map(name, len, Some((file, path)), access, starts_zeroed, flags)
    }

    /// Maps `len` bytes of `backing` (a file and its path) or of anonymous
    /// memory, with mmap `flags`.
    fn map(
        name: &str,
        len: u64,
        backing: Option<(File, &Path)>,
        access: Access,
        starts_zeroed: bool,
        flags: libc::c_int,
    ) -> Result<Self> {
        let size = check_name_and_len(name, len)?;
        let prot = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let (file, path, page_size) = match backing {
            Some((file, path)) => {
                check_page_multiple(name, path, 0, len, &file)?;
                let page_size = file_page_size(&file);
                (
                    Some(FileOffset::new(file, 0)),
                    Some(path.to_owned()),
                    page_size,
                )
            }
            None => (None, None, PAGE_SIZE_U64),
        };
        let region = MmapRegion::<()>::build(file, size, prot, flags).map_err(|e| Error::Map {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            name: name.to_owned(),
            len,
            region: Arc::new(region),
            access,
            starts_zeroed,
            populated: access == Access::ReadWrite && flags & libc::MAP_POPULATE != 0,
            path,
            page_size,
            received: ReceivedBitmap::new(len / PAGE_SIZE_U64),
        })
    }

    /// A block over a vm-memory mapping the caller already has (a
    /// `GuestRegionMmap`'s `get_mmap()`, or an `MmapRegion` of its own),
    /// without copying: pages are read from and written to that mapping,
    /// which the block keeps alive. `access` must not ask for more than the
    /// mapping's protection allows. `starts_zeroed` promises that pages a
    /// destination never receives read as zero (fresh anonymous memory);
    /// when unsure, pass `false` (zero pages are then written).
    pub fn from_mmap<B: Bitmap + Send + Sync + 'static>(
        name: &str,
        region: Arc<MmapRegion<B>>,
        access: Access,
        starts_zeroed: bool,
    ) -> Result<Self> {
        let len = region.size() as u64;
        check_name_and_len(name, len)?;
        let need = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        if region.prot() & need != need {
            return Err(Error::Config(format!(
                "RAM block {name:?}: the mapping's protection does not allow {access:?}"
            )));
        }
        if !(region.as_ptr() as usize).is_multiple_of(PAGE_SIZE_U64 as usize) {
            return Err(Error::Config(format!(
                "RAM block {name:?}: the mapping is not page-aligned"
            )));
        }
        let page_size = region
            .file_offset()
            .map_or(PAGE_SIZE_U64, |fo| file_page_size(fo.file()));
        Ok(Self {
            name: name.to_owned(),
            len,
            region,
            access,
            starts_zeroed,
            populated: false,
            path: None,
            page_size,
            received: ReceivedBitmap::new(len / PAGE_SIZE_U64),
        })
    }

    /// The block's id (QEMU's RAMBlock idstr).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes (QEMU's used_length).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: blocks have at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE_U64
    }

    /// The size of the pages the kernel backs the block with: the huge
    /// page size on hugetlbfs, the transparent huge page size on a tmpfs
    /// that uses them for the file (mounted `huge=always` or
    /// `huge=within_size`), 4096 otherwise. Pages on the wire
    /// stay 4096 bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The file behind the mapping, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file and the file offset of the block's first byte, when the
    /// block is a shared mapping of a file this crate opened (so the
    /// file's holes are the memory's zeros, and nobody else uses the
    /// descriptor's file position).
    pub(super) fn own_shared_file(&self) -> Option<(&File, u64)> {
        let fo = self.region.file()?;
        (self.path.is_some() && self.region.shared()).then(|| (fo.file(), fo.start()))
    }

    /// The descriptor and file offset through which the block's pages can
    /// be read without touching its mapping: a shared mapping of a file
    /// this crate opened, whose page cache the mapping shows, so a `pread`
    /// there sees what the guest wrote.
    pub(crate) fn read_through_file(&self) -> Option<(&File, u64)> {
        self.own_shared_file()
    }

    /// The descriptor and file offset through which the block's pages can
    /// be written without touching its mapping: a writable shared mapping
    /// of a file this crate opened, whose page cache the mapping shows, so
    /// a `pwrite` there is what the guest reads. Not on hugetlbfs, which
    /// has no `write`.
    pub(crate) fn write_through_file(&self) -> Option<(&File, u64)> {
        if self.access != Access::ReadWrite {
            return None;
        }
        let (file, start) = self.own_shared_file()?;
        match statfs(file) {
            Some((HUGETLBFS_MAGIC, _)) | None => None,
            Some(_) => Some((file, start)),
        }
    }

    /// Whether the block may be written.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Pages received so far by a destination (QEMU's `receivedmap`).
    pub(crate) fn received(&self) -> &ReceivedBitmap {
        &self.received
    }

    /// Whether a destination received the page at `offset` (as data or as
    /// a zero page) in this migration.
    pub fn is_received(&self, offset: u64) -> bool {
        offset.is_multiple_of(PAGE_SIZE_U64) && self.received.get(offset / PAGE_SIZE_U64)
    }

    /// How many of the block's pages a destination received.
    pub fn received_pages(&self) -> u64 {
        self.received.count()
    }

    /// Whether a never-received page is known to read as zero.
    pub(crate) fn starts_zeroed(&self) -> bool {
        self.starts_zeroed
    }

    /// Records that every page not received since reads as zero.
    pub(super) fn set_starts_zeroed(&mut self) {
        self.starts_zeroed = true;
    }

    /// Whether every page of the mapping was faulted in up front (see the
    /// field): a write through the mapping takes no page fault.
    pub(crate) fn is_populated(&self) -> bool {
        self.populated
    }

    /// Records that every page has been faulted in for writing.
    pub(super) fn set_populated(&mut self) {
        self.populated = true;
    }

    /// Whether `offset` names a whole page inside the block.
    pub(super) fn holds_page(&self, offset: u64) -> bool {
        offset.is_multiple_of(PAGE_SIZE_U64)
            && offset
                .checked_add(PAGE_SIZE_U64)
                .is_some_and(|end| end <= self.len)
    }

    /// Raw pointer to the page at `offset`.
    ///
    /// # Safety
    /// `offset` must be a multiple of 4096 with `offset + 4096 <= len()`
    /// (what [`RamBlock::page`] checks; a [`Page`] carries that proof).
    /// The pointer is valid for as long as `self` is borrowed; it points to
    /// guest memory, which may only be accessed through volatile reads and
    /// writes or handed to the kernel, never turned into a reference.
    pub(crate) unsafe fn page_ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(self.holds_page(offset));
        // SAFETY: by the contract `offset + 4096 <= len`, and `len` is the
        // mapping's size, so the result stays inside the mapping; `offset <
        // len <= isize::MAX` (the mapping exists), so the add cannot overflow.
        unsafe { self.region.ptr().add(offset as usize) }
    }

    /// Maps the pages of `offset..offset + len` into this process with one
    /// system call (`MADV_POPULATE_READ`) instead of one page fault per 16
    /// pages when they are first read; page faults are expensive on a
    /// virtual machine. Best effort: errors (old kernels) are ignored.
    pub fn populate_read(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end || !self.holds_page(offset) {
            return;
        }
        // SAFETY:
        // - `offset` names a page inside the block (checked above), so the
        //   pointer is in the mapping and page-aligned, as madvise requires;
        //   `offset..end` stays inside the mapping (`end <= len`);
        // - MADV_POPULATE_READ only faults pages in for reading; it changes
        //   no memory contents and no mapping attributes.
        unsafe {
            libc::madvise(
                self.page_ptr(offset).cast(),
                (end - offset) as usize,
                libc::MADV_POPULATE_READ,
            );
        }
    }
}

/// Reserves the file system space of `file`'s first `len` bytes
/// (`fallocate`, mode 0: holes become allocated, unwritten extents; the
/// contents and a larger size are kept). A file system that cannot do it
/// (some network and FUSE file systems, device files) is let through with
/// a warning: there a full file system can still end in SIGBUS.
fn reserve(file: &File, path: &Path, len: u64) -> Result<()> {
    reserve_range(file, path, 0, len)
}

/// Reserves the file system space of `len` bytes of `file` from `start` on,
/// as [`reserve`] does for a whole file; the file grows to `start + len`
/// if it is shorter.
pub(crate) fn reserve_range(file: &File, path: &Path, start: u64, len: u64) -> Result<()> {
    let (Ok(off_start), Ok(off_len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len))
    else {
        return Err(Error::Config(format!(
            "RAM file {}: length {len} too large",
            path.display()
        )));
    };
    loop {
        // SAFETY: fallocate only acts on the open file descriptor, which
        // `file` keeps open for the call; no memory of ours is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, off_start, off_len) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => {
                return Err(Error::NoSpace {
                    path: path.to_owned(),
                    needed: len,
                    source: e,
                });
            }
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV | libc::ESPIPE) => {
                tracing::warn!(
                    path = %path.display(),
                    "the file system cannot reserve space for this RAM file; \
                     if it fills up, a write to guest RAM ends the process"
                );
                return Ok(());
            }
            _ => {
                return Err(Error::io(
                    format!("reserving {len} bytes for RAM file {}", path.display()),
                    e,
                ));
            }
        }
    }
}

/// The smallest hole worth punching in `file`: a page on tmpfs, where a
/// punched page is memory given back and costs about a microsecond;
/// 1 MiB elsewhere, where every punch splits an extent in a journalled
/// transaction (a GiB of scattered 4 KiB holes took 4 to 20 s on ext4)
/// and leaves the file fragmented.
pub(crate) fn min_hole(file: &File) -> u64 {
    if is_tmpfs(file) {
        PAGE_SIZE_U64
    } else {
        1 << 20
    }
}

/// Whether `file` is on tmpfs (where reserving space allocates memory).
pub(crate) fn is_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    statfs(file).is_some_and(|(magic, _)| magic == TMPFS_MAGIC)
}

/// `fstatfs` of `file`: its file system's magic number and block size.
fn statfs(file: &File) -> Option<(libc::c_long, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one `struct statfs` into the buffer it is
    // given, which is that size; the descriptor is kept open by `file`.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    // SAFETY: fstatfs filled the struct when it returned 0.
    let st = (r == 0).then(|| unsafe { st.assume_init() })?;
    Some((st.f_type as libc::c_long, st.f_bsize as u64))
}

const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;

/// Fails unless `offset..offset + len` of `file` covers whole pages of a
/// hugetlbfs file (which is mapped and sized in huge pages only).
fn check_page_multiple(name: &str, path: &Path, offset: u64, len: u64, file: &File) -> Result<()> {
    let Some((HUGETLBFS_MAGIC, page)) = statfs(file) else {
        return Ok(());
    };
    if page == 0 || (offset.is_multiple_of(page) && len.is_multiple_of(page)) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "RAM block {name:?}: {len} bytes at offset {offset} of {} are not whole pages \
         of its hugetlbfs ({page} bytes each)",
        path.display()
    )))
}

/// The size of the pages the kernel backs a shared mapping of `file` with
/// (see [`RamBlock::page_size`]).
fn file_page_size(file: &File) -> u64 {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    match statfs(file) {
        Some((HUGETLBFS_MAGIC, page)) if page >= PAGE_SIZE_U64 => page,
        Some((TMPFS_MAGIC, _)) if tmpfs_uses_huge_pages(file) => thp_size(),
        _ => PAGE_SIZE_U64,
    }
}

/// The transparent huge page size (`hpage_pmd_size`; 2 MiB if unknown).
fn thp_size() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2 << 20)
}

/// Whether the tmpfs `file` is on gives it transparent huge pages: the
/// system-wide `shmem_enabled` forces or denies them, else the mount's
/// `huge=` option decides (`always`, `within_size`; not `advise`, see
/// [`RamBlock::advise_huge_pages`]).
fn tmpfs_uses_huge_pages(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    if shmem.contains("[force]") {
        return true;
    }
    if shmem.contains("[deny]") || shmem.is_empty() {
        return false;
    }
    let Ok(md) = file.metadata() else {
        return false;
    };
    let dev = format!("{}:{}", libc::major(md.dev()), libc::minor(md.dev()));
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // "ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - TYPE SOURCE SUPER_OPTS"
    let huge = mounts.lines().find_map(|line| {
        let mut fields = line.split(' ');
        if fields.nth(2) != Some(dev.as_str()) {
            return None;
        }
        let (_, tail) = line.split_once(" - ")?;
        let super_opts = tail.split(' ').nth(2)?;
        Some(
            super_opts
                .split(',')
                .find_map(|o| o.strip_prefix("huge="))
                .unwrap_or("never")
                .to_owned(),
        )
    });
    matches!(huge.as_deref(), Some("always" | "within_size"))
}

/// Gives back the space of `len` bytes of `file` from `start` on
/// (`FALLOC_FL_PUNCH_HOLE`, size kept): they read as zeros afterwards.
/// Only for ranges nobody maps, or whose mapped pages read as zero
/// already. Does nothing where the file system cannot punch holes.
pub(crate) fn punch(file: &File, start: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    loop {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate acts on the descriptor only; no memory of ours
        // is passed. The caller's contract keeps mapped memory unchanged.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EOPNOTSUPP) => return Ok(()),
            _ => return Err(e),
        }
    }
}

/// `lseek(fd, from, whence)` for `SEEK_HOLE` / `SEEK_DATA`: the offset
/// found, or `None` when there is none past `from` (`ENXIO`).
pub(super) fn seek(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek only moves the file offset of a descriptor that `file`
    // keeps open; nothing else in this process reads or writes through
    // that offset (the file is only mapped and given to fallocate).
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

impl RamBlock {
    /// Gives back the file system space of pages never written since the
    /// space was reserved, keeping the file's length and contents: every
    /// range the file system reports as a hole (`SEEK_HOLE`; reserved but
    /// never written space counts as one on ext4, xfs and tmpfs) is
    /// punched (`FALLOC_FL_PUNCH_HOLE`), page-aligned, when it is worth it
    /// (every hole on tmpfs; holes of 1 MiB or more elsewhere, where each
    /// punch costs a journalled extent split). Returns the bytes
    /// punched. Call it when nothing writes the block any more (a snapshot
    /// that is complete): a write into a punched page is again a write
    /// into a hole. Does nothing for anonymous or read-only blocks, nor on
    /// file systems that cannot punch holes.
    pub fn release_unwritten(&self) -> Result<u64> {
        let (Some(fo), Access::ReadWrite, Some(_)) = (self.region.file(), self.access, &self.path)
        else {
            return Ok(0);
        };
        let path = self.path.as_deref().unwrap_or(Path::new("?"));
        let start = fo.start();
        release_unwritten_range(fo.file(), path, start, start + self.len)
    }
}

/// Gives back the space of the never-written parts of `start..end` of
/// `file` (see [`RamBlock::release_unwritten`]); returns the bytes punched.
pub(crate) fn release_unwritten_range(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
) -> Result<u64> {
    {
        let fail = |e| Error::io(format!("punching holes in RAM file {}", path.display()), e);
        let min = min_hole(file);
        let mut punched = 0u64;
        let mut at = start;
        while at < end {
            let Some(hole) = seek(file, at, libc::SEEK_HOLE).map_err(fail)? else {
                break;
            };
            if hole >= end {
                break;
            }
            let data = seek(file, hole, libc::SEEK_DATA)
                .map_err(fail)?
                .unwrap_or(end)
                .min(end);
            let start = hole.next_multiple_of(PAGE_SIZE_U64);
            let end = data - data % PAGE_SIZE_U64;
            if end >= start + min {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fallocate acts on the descriptor only. Punching
                // replaces the range with zeros in the file and in every
                // mapping of it, and the range is one the file system just
                // reported as a hole, which reads as zeros already: no
                // memory anyone can see changes.
                let r = unsafe {
                    libc::fallocate(file.as_raw_fd(), mode, start as i64, (end - start) as i64)
                };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        return Ok(punched);
                    }
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(fail(e));
                    }
                    continue;
                }
                punched += end - start;
            }
            if data <= at {
                break;
            }
            at = data;
        }
        Ok(punched)
    }
}

/// The ranges of `start..end` of `file` that hold data (`SEEK_DATA` /
/// `SEEK_HOLE`: on ext4, xfs and tmpfs, space reserved and never written
/// counts as a hole), clipped to `start..end`.
pub(crate) fn data_ranges(
    file: &File,
    start: u64,
    end: u64,
) -> std::io::Result<Vec<std::ops::Range<u64>>> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        if hole <= data {
            // A file system that reports nothing sensible: all data.
            out.push(data..end);
            break;
        }
        out.push(data..hole);
        at = hole;
    }
    Ok(out)
}

/// This host's physical memory in bytes (`u64::MAX` when unknown).
pub(crate) fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration; these names are
    // valid on every Linux system.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s),
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use multifd_wire::PAGE_SIZE;

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn create_file_never_writes_over_anything() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("existing");
        std::fs::write(&existing, b"keep me").unwrap();
        let e = RamBlock::create_file("m0", &existing, 4096).unwrap_err();
        assert!(
            matches!(&e, Error::FileExists { path } if *path == existing),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

        // A planted link, to a file or to nothing, is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&existing, &link).unwrap();
        let e = RamBlock::create_file("m0", &link, 4096).unwrap_err();
        assert!(matches!(e, Error::FileExists { .. }), "{e:?}");
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
        let target = dir.path().join("target");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(&target, &dangling).unwrap();
        let e = RamBlock::create_file("m0", &dangling, 4096).unwrap_err();
        assert!(matches!(e, Error::FileExists { .. }), "{e:?}");
        assert!(!target.exists(), "the link's target was created");

        // An empty file the user named is taken; a non-empty one is not.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let b = RamBlock::create_or_size_empty("m0", &empty, 8192, Reserve::Always).unwrap();
        assert_eq!(b.len(), 8192);
        assert!(b.starts_zeroed());
        drop(b);
        let e = RamBlock::create_or_size_empty("m0", &existing, 4096, Reserve::Always).unwrap_err();
        assert!(matches!(e, Error::FileExists { .. }), "{e:?}");
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    }

    #[test]
    fn created_and_opened_files_have_their_space_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let len = 64 * PAGE_SIZE_U64;
        let b = RamBlock::create_file("m0", &path, len).unwrap();
        assert!(
            allocated(&path) >= len,
            "{} of {len} reserved",
            allocated(&path)
        );
        drop(b);
        // A sparse file opened read-write is reserved too, its bytes kept.
        let sparse = dir.path().join("sparse");
        let f = File::create(&sparse).unwrap();
        f.set_len(len).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"data", 4096).unwrap();
        drop(f);
        assert!(allocated(&sparse) < len);
        let b = RamBlock::open_file("m0", &sparse, Access::ReadWrite, None).unwrap();
        assert!(allocated(&sparse) >= len);
        let mut page = [0u8; PAGE_SIZE];
        b.read_page(4096, &mut page).unwrap();
        assert_eq!(&page[..4], b"data");
        // Read-only: nothing reserved.
        drop(b);
        let ro_path = dir.path().join("ro");
        File::create(&ro_path).unwrap().set_len(len).unwrap();
        let _ro = RamBlock::open_file("m0", &ro_path, Access::ReadOnly, None).unwrap();
        assert_eq!(allocated(&ro_path), 0);
    }

    /// On tmpfs (where guest RAM files usually live) every never-written
    /// page is given back; on ext4 runs of 1 MiB or more are.
    #[test]
    fn release_unwritten_keeps_contents_and_frees_the_rest() {
        for base in [Path::new("/dev/shm"), &std::env::temp_dir()] {
            if !base.is_dir() {
                continue;
            }
            let fs_type = std::process::Command::new("stat")
                .args(["-f", "-c", "%T"])
                .arg(base)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            let dir = tempfile::tempdir_in(base).unwrap();
            let path = dir.path().join("ram");
            let pages = 1024u64;
            let b = RamBlock::create_file("m0", &path, pages * PAGE_SIZE_U64).unwrap();
            // Small gaps everywhere below 2 MiB, nothing written above.
            let written: Vec<u64> = (0..512)
                .filter(|p| p % 97 == 0 || (300..340).contains(p))
                .collect();
            for &p in &written {
                b.write_page(p * PAGE_SIZE_U64, &[p as u8 | 1; PAGE_SIZE])
                    .unwrap();
            }
            let before = allocated(&path);
            let punched = b.release_unwritten().unwrap();
            let after = allocated(&path);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                pages * PAGE_SIZE_U64
            );
            let mut page = [0u8; PAGE_SIZE];
            for p in 0..pages {
                b.read_page(p * PAGE_SIZE_U64, &mut page).unwrap();
                let want = if written.contains(&p) { p as u8 | 1 } else { 0 };
                assert!(page.iter().all(|&x| x == want), "{base:?}: page {p}");
            }
            assert!(after <= before, "{base:?}");
            let data = written.len() as u64 * PAGE_SIZE_U64;
            match fs_type.as_str() {
                "tmpfs" => {
                    assert_eq!(after, data, "{base:?}: {after} allocated, {data} written");
                    assert_eq!(punched, pages * PAGE_SIZE_U64 - data);
                }
                "ext2/ext3" => {
                    // The top 2 MiB; the small gaps are not worth a punch.
                    assert!(punched >= 2 << 20, "{base:?}: {punched} punched");
                    assert!(punched < 3 << 20, "{base:?}: {punched} punched");
                    assert!(after <= before - (2 << 20), "{base:?}: {before} -> {after}");
                }
                _ => {}
            }
        }
    }
}
